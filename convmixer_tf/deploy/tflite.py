"""TFLite / LiteRT export for edge CPUs, and a LiteRT runner that checks the result.

    from convmixer_tf.deploy import tflite
    flat = tflite.convert(model, "int8", representative_images=x_train[:200])
    runner = tflite.LiteRTModel(flat)               # ai_edge_litert.interpreter, XNNPACK on
    logits = runner.predict(images)                 # uint8/float pixels, any batch size

Modes (all builtin ops only, never Flex/Select TF ops):
    float32       plain float model
    float16       float16 weights, float compute (half the size)
    dynamic_int8  int8 weights, activations quantized on the fly (dynamic range)
    int8          full integer: int8 weights and activations, calibrated on representative
                  training images; `io_type` float32 (default: drop-in), int8 or uint8
                  (uint8 input is exactly the raw pixel bytes: scale 1, zero point 0)
Input: raw 0-255 pixels `images` [batch, H, W, 3], fixed (e.g. 1x32x32x3) or dynamic
([-1, -1, -1, 3]: call `resize_tensor_input` before `allocate_tensors`, which `predict` does).
Output: `logits` [batch, classes] (the `predictions` activation is removed; apply softmax).
"""

import os
import tempfile
import time
import warnings

import keras
import numpy as np
import tensorflow as tf

from convmixer_tf import _extras, artifacts
from convmixer_tf.deploy.logits import logits_model

MODES = ("float32", "float16", "dynamic_int8", "int8")
IO_TYPES = {"float32": tf.float32, "int8": tf.int8, "uint8": tf.uint8}


def convert(model, mode="float32", representative_images=None, input_shape=(1, None, None),
            io_type="float32"):
    """Converts a Keras image classifier to a `.tflite` flatbuffer (bytes) returning logits.

    `input_shape` is `(batch, height, width)` of the TFLite input; `None` entries stay
    dynamic. `representative_images` (uint8/float pixels) are required for `mode="int8"`.
    """
    if mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}. Received mode={mode!r}")
    if io_type not in IO_TYPES or (io_type != "float32" and mode != "int8"):
        raise ValueError(
            f"`io_type` must be float32, or int8/uint8 with mode='int8'. Received {io_type!r}"
        )
    if mode == "int8" and (representative_images is None or len(representative_images) == 0):
        raise ValueError("mode='int8' needs `representative_images` (training images)")
    logits = logits_model(model, fixed_shape=input_shape)
    with tempfile.TemporaryDirectory(prefix="convmixer-tflite-") as tmp:
        # Through a SavedModel signature: variables frozen, input/output named images/logits.
        archive = keras.export.ExportArchive()
        archive.track(logits)
        archive.add_endpoint(
            "serving_default",
            lambda images: {"logits": logits(images, training=False)},
            input_signature=[tf.TensorSpec(logits.input_shape, tf.float32, name="images")],
        )
        archive.write_out(tmp, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if mode != "float32":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if mode == "float16":
            converter.target_spec.supported_types = [tf.float16]
        if mode == "int8":
            converter.representative_dataset = _representative(
                representative_images, logits.input_shape
            )
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.inference_input_type = IO_TYPES[io_type]
            converter.inference_output_type = IO_TYPES[io_type]
        with warnings.catch_warnings():  # the calibrator's own tf.lite.Interpreter warning
            warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated")
            flat = converter.convert()
    custom = [name for name in op_counts(flat) if not name.isupper()]
    if custom:
        raise RuntimeError(f"conversion produced non-builtin ops {custom}")
    return flat


def _representative(images, input_shape):
    """Calibration batches of one image, resized to the fixed input size if there is one."""
    images = np.asarray(images, np.float32)
    size = input_shape[1:3]
    if None not in size and tuple(images.shape[1:3]) != tuple(size):
        images = tf.image.resize(images, size).numpy()

    def generate():
        for image in images:
            yield {"images": image[None]}

    return generate


def save(flat, path):
    """Writes a flatbuffer atomically, so a failed run never leaves half a model."""
    return artifacts.write_bytes(path, flat)


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
        self._allocated = None

    @property
    def image_size(self):
        """(height, width) of a fixed-size model, None for a dynamic one."""
        h, w = self.signature[1:3]
        return None if h < 0 or w < 0 else (h, w)

    def _allocate(self, shape):
        if self._allocated != shape:
            if any(d < 0 for d in self.signature):
                self.interpreter.resize_tensor_input(self.input["index"], list(shape))
            self.interpreter.allocate_tensors()
            self.input = self.interpreter.get_input_details()[0]
            self.output = self.interpreter.get_output_details()[0]
            self._allocated = shape

    def _check(self, images):
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
        ops = self.interpreter._get_ops_details()
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


def compare(flat, model, images, batch_size=None):
    """(max abs logit error, top-1 agreement) of a flatbuffer against the Keras model."""
    runner = LiteRTModel(flat)
    images = np.asarray(images)
    size = runner.image_size
    if size is not None and tuple(images.shape[1:3]) != size:
        images = np.round(tf.image.resize(images.astype(np.float32), size).numpy())
    reference = np.asarray(logits_model(model)(images.astype(np.float32), training=False))
    if runner.signature[0] < 0 and batch_size:
        got = np.concatenate([runner.predict(images[i:i + batch_size])
                              for i in range(0, len(images), batch_size)])
    else:
        got = runner.predict(images)
    error = float(np.abs(got - reference).max())
    agreement = float(np.mean(got.argmax(-1) == reference.argmax(-1)))
    return error, agreement


def latency_ms(runner, image, repeats=20):
    """Median milliseconds per single-image `predict` after one warm-up run."""
    image = np.asarray(image)[None]
    runner.predict(image)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        runner.predict(image)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def export_all(model, out_dir, name, representative_images, eval_images, input_size,
               modes=MODES, log=print, min_int8_agreement=None, int8_io="float32"):
    """Writes `<out_dir>/<name>_<mode>.tflite` (fixed 1xHxW input) and
    `<name>_<mode>_dynamic.tflite` (any batch and size) for every mode, validating each
    against the Keras model; prints one line per file and the XNNPACK delegation table.
    `int8_io` is the int8 files' input/output type (float32, int8 or uint8)."""
    results = {}
    for mode in modes:
        for dynamic in (False, True):
            shape = (None, None, None) if dynamic else (1, *input_size)
            flat = convert(model, mode, representative_images, input_shape=shape,
                           io_type=int8_io if mode == "int8" else "float32")
            error, agreement = compare(flat, model, eval_images, batch_size=64)
            label = f"{mode}{'_dynamic' if dynamic else ''}"
            if mode == "int8" and min_int8_agreement is not None and agreement < min_int8_agreement:
                raise RuntimeError(
                    f"tflite {label}: top-1 agreement {agreement:.2%} is below "
                    f"{min_int8_agreement:.0%}; not written"
                )
            path = save(flat, os.path.join(out_dir, f"{name}_{label}.tflite"))
            runner = LiteRTModel(path)
            ms = latency_ms(runner, eval_images[0])
            log(f"tflite {label:<20} {len(flat) / 1024:8.1f} KiB  max abs logit error "
                f"{error:.2e}  top-1 agreement {agreement:.2%}  latency {ms:.2f} ms/image  "
                f"-> {path}")
            results[label] = dict(path=path, error=error, agreement=agreement, latency_ms=ms)
            if not dynamic:
                log(delegation_table(runner.delegation()))
    return results
