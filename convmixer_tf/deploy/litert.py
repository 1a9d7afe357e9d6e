"""Running and reading `.tflite` files: `LiteRTModel` (ai_edge_litert's interpreter, XNNPACK
on), the flatbuffer's ops and minimum runtime, and which ops XNNPACK took.

    from convmixer_tf.deploy import litert
    runner = litert.LiteRTModel("digits_int8.tflite")  # a path or the flatbuffer's bytes
    logits = runner.predict(images)                     # uint8/float pixels, any batch size
    print(litert.delegation_table(runner.delegation()), litert.min_runtime_version(flat))

Input: raw 0-255 pixels `images` [batch, H, W, 3], fixed (e.g. 1x32x32x3) or dynamic
([-1, -1, -1, 3]: `resize_tensor_input` before `allocate_tensors`, which `predict` does).
Output: `logits` [batch, classes] (the `predictions` activation is removed; apply softmax).
"""

import os

import numpy as np
import tensorflow as tf

from convmixer_tf import _extras, compat


def fit_size(images, size):
    """`images` [N, h, w, C] resized (bilinear) to `size` (height, width) and rounded to whole
    pixels, as a fixed-size `.tflite` file takes them; unchanged if `size` is None (a dynamic
    file) or they are that size already. The one resize of the TFLite checks: calibration,
    the gate's accuracy, latency."""
    images = np.asarray(images)
    if size is None or None in tuple(size) or tuple(images.shape[1:3]) == tuple(size):
        return images
    return np.round(tf.image.resize(images.astype(np.float32), tuple(size)).numpy())


def op_counts(flat):
    """{op name: count} of a flatbuffer's operators (custom ops by their custom code)."""
    schema = _extras.require("ai_edge_litert.schema_py_generated", "Reading a .tflite file")

    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    model = schema.Model.GetRootAsModel(flat, 0)
    codes = []
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        custom = code.CustomCode()
        codes.append(custom.decode() if custom else names.get(builtin, str(builtin)))
    counts = {}
    for s in range(model.SubgraphsLength()):
        graph = model.Subgraphs(s)
        for i in range(graph.OperatorsLength()):
            name = codes[graph.Operators(i).OpcodeIndex()]
            counts[name] = counts.get(name, 0) + 1
    return counts


class LiteRTModel:
    """Runs a `.tflite` classifier with `ai_edge_litert.interpreter.Interpreter` (XNNPACK
    applied by default): resizes dynamic inputs before allocating, (de)quantizes int8 I/O."""

    def __init__(self, model, num_threads=None, xnnpack=True):
        litert = _extras.require("ai_edge_litert.interpreter", "Running a .tflite model")

        kwargs = dict(num_threads=num_threads)
        if not xnnpack:
            kwargs["experimental_op_resolver_type"] = (
                litert.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
            )
        if isinstance(model, (bytes, bytearray)):
            kwargs["model_content"] = bytes(model)
        elif not os.path.isfile(model):
            raise FileNotFoundError(f"no such TFLite model: {model}")
        else:
            kwargs["model_path"] = os.fspath(model)
        try:
            self.interpreter = litert.Interpreter(**kwargs)
        except ValueError as error:
            raise ValueError(f"not a valid .tflite model ({error})") from error
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self.signature = tuple(int(d) for d in self.input["shape_signature"])
        self._allocated = self._min_size = None

    @property
    def image_size(self):
        """(height, width) of a fixed-size model, None for a dynamic one."""
        h, w = self.signature[1:3]
        return None if h < 0 or w < 0 else (h, w)

    @property
    def min_size(self):
        """The smallest height/width the model takes: the first convolution's kernel size
        (the patch size), 1 without one."""
        if self._min_size is None:
            shapes = {t["index"]: t["shape"] for t in self.interpreter.get_tensor_details()}
            sizes = [shapes[op["inputs"][1]][1:3]  # filter [out, kh, kw, in]
                     for op in compat.interpreter_ops(self.interpreter)
                     if op["op_name"] == "CONV_2D"]
            self._min_size = int(min(sizes[0])) if sizes else 1
        return self._min_size

    def _allocate(self, shape):
        if self._allocated != shape:
            self._allocated = None  # a failed resize leaves nothing allocated
            if any(d < 0 for d in self.signature):
                self.interpreter.resize_tensor_input(self.input["index"], list(shape))
            self.interpreter.allocate_tensors()
            self.input = self.interpreter.get_input_details()[0]
            self.output = self.interpreter.get_output_details()[0]
            self._allocated = shape

    def _check(self, images):
        """ValueError naming the problem for anything the interpreter would reject (or run
        into an error or a meaningless answer): rank, channels, batch, size, dtype, NaN/inf."""
        if images.dtype.kind not in "uif":
            raise ValueError(f"images must be uint8 or float pixels, got dtype {images.dtype}")
        if images.ndim != 4 or images.shape[-1] != self.signature[-1]:
            raise ValueError(
                f"expected images of shape [batch, height, width, {self.signature[-1]}], "
                f"got {list(images.shape)}"
            )
        if images.shape[0] == 0:
            raise ValueError("empty batch: pass at least one image")
        for got, want in zip(images.shape[1:3], self.signature[1:3]):
            if want > 0 and got != want:
                raise ValueError(
                    f"this model takes {self.signature[1]}x{self.signature[2]} images, got "
                    f"{images.shape[1]}x{images.shape[2]} (resize first, or export with a "
                    "dynamic input size)"
                )
        if min(images.shape[1:3]) < self.min_size:
            raise ValueError(f"image height and width must be >= {self.min_size} (the patch "
                             f"size), got {images.shape[1]}x{images.shape[2]}")
        if images.dtype.kind == "f" and not np.isfinite(images).all():
            raise ValueError("images hold NaN or infinite values: pass 0-255 pixels")

    def predict(self, images):
        """Logits (float32, dequantized) for a batch of raw 0-255 pixels."""
        images = np.asarray(images)
        self._check(images)
        batch = self.signature[0]
        if batch > 0 and images.shape[0] != batch:  # fixed batch: run in chunks of `batch`
            if images.shape[0] % batch:
                raise ValueError(f"batch must be a multiple of {batch}, got {images.shape[0]}")
            return np.concatenate(
                [self.predict(images[i:i + batch]) for i in range(0, len(images), batch)]
            )
        self._allocate(tuple(images.shape))
        self.interpreter.set_tensor(self.input["index"], _quantize(images, self.input))
        self.interpreter.invoke()
        return _dequantize(self.interpreter.get_tensor(self.output["index"]), self.output)

    def delegation(self, input_shape=None):
        """Which ops XNNPACK took: [(op, tensor dtype, delegated count, total count)].

        The interpreter keeps the original nodes and appends one DELEGATE node per partition;
        a node belongs to a partition if it lies between that partition's inputs and outputs.
        """
        if input_shape is not None:
            self._allocate(tuple(input_shape))
        elif self._allocated is None:
            self._allocate(tuple(max(d, 1) if d < 0 else d for d in self.signature))
        ops = compat.interpreter_ops(self.interpreter)
        producer = {t: op["index"] for op in ops if op["op_name"] != "DELEGATE"
                    for t in op["outputs"]}
        delegated = set()
        for op in ops:
            if op["op_name"] != "DELEGATE":
                continue
            boundary, stack = set(op["inputs"]), list(op["outputs"])
            while stack:
                node = producer.get(stack.pop())
                if node is None or node in delegated:
                    continue
                delegated.add(node)
                stack.extend(t for t in ops[node]["inputs"] if t not in boundary)
        table = {}
        for op in ops:
            if op["op_name"] == "DELEGATE":
                continue
            key = (op["op_name"], op["result_types"][0].__name__ if op["result_types"] else "")
            done, total = table.get(key, (0, 0))
            table[key] = (done + (op["index"] in delegated), total + 1)
        return [(name, dtype, done, total) for (name, dtype), (done, total) in table.items()]


def _quantize(images, detail):
    dtype = detail["dtype"]
    if dtype in (np.float32, np.float16):
        return images.astype(dtype)
    scale, zero = detail["quantization"]
    info = np.iinfo(dtype)
    q = np.round(images.astype(np.float32) / scale + zero)
    return np.clip(q, info.min, info.max).astype(dtype)


def _dequantize(values, detail):
    if detail["dtype"] in (np.float32, np.float16):
        return values.astype(np.float32)
    scale, zero = detail["quantization"]
    return (values.astype(np.float32) - zero) * scale


def delegation_table(rows):
    """The `LiteRTModel.delegation()` rows as a printable table, not-delegated ops first."""
    lines = [f"{'op':<20} {'dtype':<8} {'XNNPACK':>8}"]
    for name, dtype, done, total in sorted(rows, key=lambda r: (r[2] == r[3], r[0])):
        lines.append(f"{name:<20} {dtype:<8} {done:>3}/{total:<4}"
                     + ("" if done == total else "  <- not delegated"))
    return "\n".join(lines)


def min_runtime_version(flat):
    """The converter's `min_runtime_version` metadata of a flatbuffer ("2.9.0"): the oldest
    TFLite runtime whose kernels cover every op version in it; None if it has none."""
    schema = _extras.require("ai_edge_litert.schema_py_generated", "Reading a .tflite file")
    flat = bytes(flat)
    if flat[4:8] != b"TFL3":
        raise ValueError("not a TFLite flatbuffer (no TFL3 file identifier)")
    model = schema.Model.GetRootAsModel(flat, 0)
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if entry.Name() == b"min_runtime_version":
            raw = model.Buffers(entry.Buffer()).DataAsNumpy().tobytes()
            return raw.split(b"\0")[0].decode()
    return None


def predict_batched(runner, images, batch_size=64):
    """`runner.predict` over `images` in chunks (a dynamic-size file takes a batch per call)."""
    if runner.signature[0] > 0:
        return runner.predict(images)
    return np.concatenate([runner.predict(images[i:i + batch_size])
                           for i in range(0, len(images), batch_size)])
