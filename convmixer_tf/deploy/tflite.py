"""TFLite / LiteRT export for edge CPUs, and a LiteRT runner that checks the result.

    from convmixer_tf.deploy import tflite
    flat = tflite.convert(model, "int8_float_gelu", representative_images=x_train[:200])
    runner = tflite.LiteRTModel(flat)               # ai_edge_litert.interpreter, XNNPACK on
    logits = runner.predict(images)                 # uint8/float pixels, any batch size
    report = tflite.export_all(model, "out", "name", x_train[:256], x_test, (32, 32),
                               eval_labels=y_test)  # every build, gated; out/name_int8.tflite

Modes (all builtin ops only, never Flex/Select TF ops):
    float32          plain float model
    float16          float16 weights, float compute (half the size)
    dynamic_int8     int8 weights, activations quantized on the fly (dynamic range)
    full_int8        full integer: int8 weights and activations, calibrated on representative
                     training images; `io_type` float32 (default: drop-in), int8 or uint8
                     (uint8 input is exactly the raw pixel bytes: scale 1, zero point 0)
    int8_float_gelu  full_int8 with the GELUs kept in float32 (XNNPACK has no int8 GELU, so
                     the graph stays in one XNNPACK partition)
The export's edge build, `<name>_int8.tflite`, is the fastest int8 build measured on the
model that passes the accuracy `gate` (`export_all`, `choose_edge_build`).
Input: raw 0-255 pixels `images` [batch, H, W, 3], fixed (e.g. 1x32x32x3) or dynamic
([-1, -1, -1, 3]: call `resize_tensor_input` before `allocate_tensors`, which `predict` does).
Output: `logits` [batch, classes] (the `predictions` activation is removed; apply softmax).
"""

import os
import re
import tempfile
import time
import traceback
import warnings

import keras
import numpy as np
import tensorflow as tf
from tensorflow.lite.python import convert as tflite_convert
from tensorflow.lite.python.convert_phase import ConverterError

from convmixer_tf import _extras, artifacts
from convmixer_tf.deploy.logits import logits_model
from convmixer_tf.deploy.modes import EDGE_BUILD, INT8_MODES, MODES, REFUSED_EXIT_CODE  # noqa: F401

FLOAT_OPS = ("GELU",)  # ops `int8_float_gelu` keeps in float32 (XNNPACK has no int8 GELU)
IO_TYPES = {"float32": tf.float32, "int8": tf.int8, "uint8": tf.uint8}


def convert(model, mode="float32", representative_images=None, input_shape=(1, None, None),
            io_type="float32", split_depthwise=True):
    """Converts a Keras image classifier to a `.tflite` flatbuffer (bytes) returning logits.

    `input_shape` is `(batch, height, width)` of the TFLite input; `None` entries stay
    dynamic. `representative_images` (uint8/float pixels) are required for the calibrated
    modes (`full_int8`, `int8_float_gelu`). `split_depthwise`: depthwise kernels larger than
    5x5 are converted as row groups XNNPACK runs fast (`RowSplitDepthwiseConv2D`; every mode
    but `dynamic_int8`, whose depthwise convolutions XNNPACK does not take).
    """
    return convert_builds(model, [mode], representative_images, input_shape, io_type,
                          split_depthwise)[mode]


def convert_builds(model, modes, representative_images=None, input_shape=(1, None, None),
                   io_type="float32", split_depthwise=True, failures=None):
    """{mode: flatbuffer} for several modes (arguments as `convert`); the calibrated modes
    share one calibration run. With a `failures` dict, a mode the converter cannot convert is
    left out and recorded there as `{mode: one-line reason}` (its traceback and the converter's
    diagnostics go to stderr) instead of raising."""
    for mode in modes:
        if mode not in MODES:
            hint = (" ('int8' is the export's edge build, chosen among " + ", ".join(INT8_MODES)
                    + ")") if mode == EDGE_BUILD else ""
            raise ValueError(f"`mode` must be one of {MODES}. Received mode={mode!r}{hint}")
    calibrated_modes = [m for m in modes if m in ("full_int8", "int8_float_gelu")]
    if io_type not in IO_TYPES or (io_type != "float32" and len(calibrated_modes) < len(modes)):
        raise ValueError(
            "`io_type` must be float32, or int8/uint8 with the modes full_int8 and "
            f"int8_float_gelu only. Received io_type={io_type!r} for modes {list(modes)}"
        )
    if calibrated_modes and (representative_images is None or len(representative_images) == 0):
        raise ValueError(f"modes {calibrated_modes} need `representative_images` (training images)")
    plain = logits_model(model, fixed_shape=input_shape)
    split = split_large_depthwise(plain) if split_depthwise else plain
    flats = {}
    # dynamic_int8 stays unsplit: XNNPACK never takes its hybrid depthwise convolutions, and
    # on TFLite's builtin kernel one 7x7 layer is faster than three row groups (BENCHMARKS.md).
    groups = [(split, [m for m in modes if split is plain or m != "dynamic_int8"]),
              (plain, [m for m in modes if split is not plain and m == "dynamic_int8"])]
    for logits, group in groups:
        if not group:
            continue
        with tempfile.TemporaryDirectory(prefix="convmixer-tflite-") as tmp:
            _write_signature(logits, tmp)
            calibrated = []  # the calibration run, or the error it raised

            def build(mode):
                if mode not in calibrated_modes:
                    return _convert_float_or_dynamic(tmp, mode)
                if not calibrated:
                    try:
                        calibrated.append(_calibrate(tmp, representative_images,
                                                     logits.input_shape))
                    except CONVERSION_ERRORS as error:
                        calibrated.append(error)
                if isinstance(calibrated[0], Exception):
                    raise calibrated[0]
                return _quantize_calibrated(calibrated[0], mode, IO_TYPES[io_type])

            for mode in group:
                try:
                    flat = build(mode)
                    custom = [name for name in op_counts(flat) if not name.isupper()]
                    if custom:
                        raise RuntimeError(f"conversion to {mode} produced non-builtin ops "
                                           f"{custom}")
                    flats[mode] = flat
                except CONVERSION_ERRORS as error:
                    if failures is None:
                        raise
                    traceback.print_exc()
                    failures[mode] = "conversion failed (" + conversion_failure(error) + ")"
    return {mode: flats[mode] for mode in modes if mode in flats}


# What the converter raises for a graph it cannot convert (ConverterError: an op TFLite lacks,
# a dtype it cannot take; RuntimeError/ValueError from its C++ passes and our builtin-op check).
CONVERSION_ERRORS = (ConverterError, RuntimeError, ValueError, tf.errors.OpError)
MLIR_DTYPES = {"bf16": "bfloat16", "f16": "float16", "f32": "float32", "f64": "float64",
               "i8": "int8", "i16": "int16", "i32": "int32", "i64": "int64", "ui8": "uint8",
               "i1": "bool"}


def conversion_failure(error):
    """One line saying why the converter refused a graph: for ops TFLite lacks, which ops on
    which dtype ("tf.Mul, tf.AddV2 on bfloat16 are not TFLite builtin ops"), else the first
    line of the error."""
    missing = {}
    for data in getattr(error, "errors", None) or ():
        message = data.error_message
        if "neither a custom op nor a flex op" in message:
            types = re.findall(r"tensor<(?:[?\d]+x)*(\w+)>", message)
            dtype = MLIR_DTYPES.get(types[-1], types[-1]) if types else "?"
            missing.setdefault(dtype, [])
            op = data.operator.name or message.split("'")[1]
            if op not in missing[dtype]:
                missing[dtype].append(op)
    if missing:
        return "; ".join(
            f"{', '.join(ops)} on {dtype} {'is' if len(ops) == 1 else 'are'} not "
            f"{'a TFLite builtin op' if len(ops) == 1 else 'TFLite builtin ops'}"
            for dtype, ops in missing.items())
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    first = lines[0] if lines else type(error).__name__
    return f"{type(error).__name__}: {first[:200]}"


MAX_DEPTHWISE_TAPS = 25  # XNNPACK's largest single-pass depthwise kernel (5x5)


class RowSplitDepthwiseConv2D(keras.layers.Layer):
    """A stride-1 "same" DepthwiseConv2D whose kernel has more than `MAX_DEPTHWISE_TAPS` taps,
    computed as a sum of depthwise convolutions over groups of its kernel rows (7x7: 3x7 + 3x7
    + 1x7), each small enough for XNNPACK's single-pass kernels. Same weights, same result up
    to float rounding; used only inside the TFLite conversion. At 32x32x768, int8, one
    thread: 3.5 ms split, 26.0 ms as one 7x7 on XNNPACK (its multi-pass kernel), 12.3 ms on
    TFLite's builtin kernel (BENCHMARKS.md)."""

    def __init__(self, source, **kwargs):
        super().__init__(name=source.name, **kwargs)
        self.source = source  # tracks the original kernel and bias
        kh, kw = source.kernel_size
        rows = max(1, MAX_DEPTHWISE_TAPS // kw)
        self.groups = [(a, min(rows, kh - a)) for a in range(0, kh, rows)]

    def call(self, x):
        layer = self.source
        kh, kw = layer.kernel_size
        padded = tf.pad(x, [[0, 0], [kh // 2, kh // 2], [kw // 2, kw // 2], [0, 0]])
        height = tf.shape(x)[1]
        out = None
        for start, rows in self.groups:
            part = tf.nn.depthwise_conv2d(
                padded[:, start:start + height + rows - 1], layer.kernel[start:start + rows],
                strides=[1, 1, 1, 1], padding="VALID")
            out = part if out is None else out + part
        if layer.use_bias:
            out = out + layer.bias
        return layer.activation(out)


def _splittable(layer):
    if type(layer) is not keras.layers.DepthwiseConv2D:
        return False
    kh, kw = layer.kernel_size
    return (kh * kw > MAX_DEPTHWISE_TAPS and kh % 2 == 1 and kw % 2 == 1
            and layer.padding == "same" and tuple(layer.strides) == (1, 1)
            and tuple(layer.dilation_rate) == (1, 1) and layer.depth_multiplier == 1
            and layer.data_format == "channels_last")


def split_large_depthwise(model):
    """`model` with every large stride-1 depthwise convolution replaced by a
    `RowSplitDepthwiseConv2D` sharing its weights (the model itself if it has none)."""
    if not any(_splittable(layer) for layer in model.layers):
        return model
    return keras.models.clone_model(
        model, clone_function=lambda layer: RowSplitDepthwiseConv2D(layer)
        if _splittable(layer) else layer)


def _write_signature(logits, path):
    """A SavedModel of `logits` with one signature (input `images`, output `logits`), the
    variables frozen by the converter."""
    archive = keras.export.ExportArchive()
    archive.track(logits)
    archive.add_endpoint(
        "serving_default",
        lambda images: {"logits": logits(images, training=False)},
        input_signature=[tf.TensorSpec(logits.input_shape, tf.float32, name="images")],
    )
    archive.write_out(path, verbose=False)


def _converter(saved_model_dir):
    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    return converter


def _convert_float_or_dynamic(saved_model_dir, mode):
    converter = _converter(saved_model_dir)
    if mode != "float32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if mode == "dynamic_int8":
        # Per-channel hybrid FULLY_CONNECTED is op version 12 (min runtime 2.17: tflite-runtime
        # 2.14 refuses the file); a per-tensor dense layer keeps version <= 9 (runtime 2.9).
        converter._experimental_disable_per_channel_quantization_for_dense_layers = True  # noqa: SLF001
    return converter.convert()


def _calibrate(saved_model_dir, images, input_shape):
    """The float model with activation ranges recorded on `images` (the converter's own
    calibration step, run once for every calibrated mode)."""
    converter = _converter(saved_model_dir)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = _representative(images, input_shape)
    converter._experimental_calibrate_only = True  # noqa: SLF001 - as QuantizationDebugger does
    with warnings.catch_warnings():  # the calibrator's own tf.lite.Interpreter warning
        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated")
        return converter.convert()


def _quantize_calibrated(calibrated, mode, io_dtype):
    """Full-integer quantization of a calibrated model, as `TFLiteConverter.convert` does it
    (per-channel weights);
    `int8_float_gelu` keeps the `FLOAT_OPS` in float32 between DEQUANTIZE/QUANTIZE (the
    converter's denylist, as `tf.lite.experimental.QuantizationDebugger` applies it)."""
    return tflite_convert.mlir_quantize(
        calibrated,
        input_data_type=io_dtype,
        output_data_type=io_dtype,
        denylisted_ops=list(FLOAT_OPS) if mode == "int8_float_gelu" else None,
    )


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
                     for op in self.interpreter._get_ops_details() if op["op_name"] == "CONV_2D"]
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


def min_runtime_version(flat):
    """The converter's `min_runtime_version` metadata of a flatbuffer ("2.9.0"): the oldest
    TFLite runtime whose kernels cover every op version in it; None if it has none."""
    from ai_edge_litert import schema_py_generated as schema

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


def _fit_size(images, runner):
    size = runner.image_size
    if size is not None and tuple(images.shape[1:3]) != size:
        images = np.round(tf.image.resize(images.astype(np.float32), size).numpy())
    return images


def accuracy_report(flat, reference_logits, images, labels=None, batch_size=64):
    """What the gate reads, for one flatbuffer on held-out images: top-1 `accuracy` on
    `labels` (None without labels), `agreement` with the Keras top-1 and `max_logit_error`
    (max abs difference from the Keras logits `reference_logits`)."""
    runner = LiteRTModel(flat)
    got = predict_batched(runner, _fit_size(np.asarray(images), runner), batch_size)
    report = dict(
        accuracy=None if labels is None else float(np.mean(got.argmax(-1) == labels)),
        agreement=float(np.mean(got.argmax(-1) == reference_logits.argmax(-1))),
        max_logit_error=float(np.abs(got - reference_logits).max()),
    )
    return report


def gate(report, keras_accuracy=None, max_accuracy_drop=0.01, min_agreement=0.98):
    """None if a build may ship, else why not. With labels: held-out top-1 accuracy at most
    `max_accuracy_drop` (1 point) below the Keras model's on the same images (agreement and
    logit error are reported, not gated: a low-margin model flips many near-ties without
    losing accuracy). Without labels the only evidence is top-1 agreement >= `min_agreement`."""
    if report.get("accuracy") is not None and keras_accuracy is not None:
        drop = keras_accuracy - report["accuracy"]
        if drop > max_accuracy_drop + 1e-9:
            return (f"held-out accuracy {report['accuracy']:.2%} is {100 * drop:.2f} points "
                    f"below the Keras model's {keras_accuracy:.2%} (allowed: "
                    f"{100 * max_accuracy_drop:g})")
        return None
    if report["agreement"] < min_agreement:
        return (f"top-1 agreement with Keras {report['agreement']:.2%} is below "
                f"{min_agreement:.0%} (no labelled held-out images to measure accuracy)")
    return None


def interleaved_latency_ms(flats, image, rounds=20, num_threads=None):
    """{name: median ms per single-image `predict`} for several flatbuffers, measured
    interleaved (each round runs every build once, in rotating order, after a warm-up), so
    load changes on a shared machine hit every build alike. With one thread (the runtime's
    default) the time is the calling thread's CPU time, which other jobs on the machine do
    not inflate; with more threads it is wall time."""
    runners = {name: LiteRTModel(flat, num_threads=num_threads) for name, flat in flats.items()}
    image = _fit_size(np.asarray(image)[None], next(iter(runners.values())))
    for runner in runners.values():
        runner.predict(image)
    clock = time.thread_time if (num_threads or 1) == 1 else time.perf_counter
    names = list(runners)
    times = {name: [] for name in names}
    for i in range(rounds):
        for name in names[i % len(names):] + names[:i % len(names)]:
            start = clock()
            runners[name].predict(image)
            times[name].append(clock() - start)
    return {name: 1000 * float(np.median(t)) for name, t in times.items()}


def choose_edge_build(builds):
    """The default edge build: the int8 candidate with the lowest measured latency among
    those the gate passed (`builds`: {mode: {"latency_ms", "refused"}}); None if none did."""
    passed = {m: b for m, b in builds.items() if m in INT8_MODES and not b.get("refused")}
    return min(passed, key=lambda m: passed[m]["latency_ms"]) if passed else None


def expand_modes(modes, model_has_gelu=True, io_type="float32", calibration=True):
    """The builds to convert for the export's `modes` ("int8" = every int8 candidate, then
    the fastest that passes becomes `<name>_int8.tflite`), and {build: why it was skipped}."""
    builds, skipped = [], {}
    for mode in modes:
        for m in (INT8_MODES if mode == EDGE_BUILD else (mode,)):
            if m not in MODES:
                raise ValueError(f"unknown TFLite mode {m!r}: choose from {MODES + (EDGE_BUILD,)}")
            if m in ("full_int8", "int8_float_gelu") and not calibration:
                skipped[m] = ("no calibration images (export(calibration_images=...); "
                              "convmixer-export: a <name>.samples.npz or --calibration-dir)")
            elif m == "int8_float_gelu" and not model_has_gelu:
                skipped[m] = "the model has no GELU (same file as full_int8)"
            elif m == "dynamic_int8" and io_type != "float32":
                skipped[m] = f"dynamic-range int8 has float32 I/O, not {io_type}"
            elif m not in builds:
                builds.append(m)
    return builds, skipped


def export_all(model, out_dir, name, representative_images, eval_images, input_size,
               eval_labels=None, modes=MODES + (EDGE_BUILD,), log=print, max_accuracy_drop=0.01,
               min_int8_agreement=0.98, int8_io="float32", num_threads=None, latency_rounds=20,
               gated=True):
    """Converts, measures, gates and writes the TFLite builds into `out_dir` (the export job,
    `deploy.export`, passes a temp folder it publishes as a version); returns the report for the
    metadata file.

    Each mode gives `<out_dir>/<name>_<mode>.tflite` (fixed 1xHxW input) and
    `<name>_<mode>_dynamic.tflite` (any batch and size). With "int8" in `modes` every int8
    candidate (`INT8_MODES`) is built and timed on this machine (batch 1, LiteRT with
    XNNPACK, interleaved), and the fastest that passes `gate` is also written as
    `<name>_int8.tflite` (+ `_dynamic`): the default edge build. A build the gate refuses is
    not written; the report lists it under "refused" with the reason, and the caller decides
    the exit status (`REFUSED_EXIT_CODE`). A build the converter cannot make is left out the
    same way, under "failed" with a one-line reason (`conversion_failure`); the rest is still
    converted, gated and written. `int8_io` is the I/O type of the calibrated modes.
    `gated=False` (no held-out images exist: `eval_images` are synthetic) reports the numbers
    without gating on them.
    """
    eval_images = np.asarray(eval_images)
    labels = None if eval_labels is None else np.asarray(eval_labels).reshape(-1)
    if labels is not None and len(labels) != len(eval_images):
        raise ValueError(f"{len(labels)} eval labels for {len(eval_images)} eval images")
    fixed = (1, *input_size)
    resized = np.round(tf.image.resize(eval_images.astype(np.float32), input_size).numpy()) \
        if tuple(eval_images.shape[1:3]) != tuple(input_size) else eval_images
    reference = np.asarray(logits_model(model).predict(
        resized.astype(np.float32), batch_size=64, verbose=0))
    keras_accuracy = None if labels is None else float(np.mean(reference.argmax(-1) == labels))
    has_gelu = any("gelu" in str(layer.get_config().get("activation", "")).lower()
                   for layer in model.layers)
    calibration = representative_images is not None and len(representative_images) > 0
    builds, skipped = expand_modes(modes, has_gelu, int8_io, calibration)
    report = dict(keras_accuracy=keras_accuracy, eval_images=len(eval_images),
                  labelled=labels is not None, io_type=int8_io,
                  gate=("none: no held-out images (numbers on synthetic images)" if not gated
                        else f"held-out accuracy within {100 * max_accuracy_drop:g} point(s) of "
                        "Keras" if labels is not None else
                        f"top-1 agreement >= {min_int8_agreement:.0%} (no labels)"),
                  latency=dict(batch=1, runtime="ai_edge_litert + XNNPACK",
                               num_threads=num_threads or 1, rounds=latency_rounds,
                               clock="thread CPU time" if (num_threads or 1) == 1 else "wall"),
                  builds={}, skipped=skipped, refused={}, failed={}, edge_build=None)
    flats = {}
    for dynamic in (False, True):
        shape = (None, None, None) if dynamic else fixed
        failures = {}
        converted = convert_builds(model, [m for m in builds if m not in report["failed"]],
                                   representative_images, shape, int8_io, failures=failures)
        report["failed"].update(
            {f"{mode}{'_dynamic' if dynamic else ''}": why for mode, why in failures.items()})
        for mode, flat in converted.items():
            label = f"{mode}{'_dynamic' if dynamic else ''}"
            entry = dict(mode=mode, input=list(shape), size_bytes=len(flat),
                         min_runtime_version=min_runtime_version(flat),
                         **accuracy_report(flat, reference, resized, labels))
            reason = gated and gate(entry, keras_accuracy, max_accuracy_drop, min_int8_agreement)
            if reason:
                entry["refused"] = reason
                report["refused"][label] = reason
            report["builds"][label] = entry
            flats[label] = flat
    converted = [m for m in builds if m in report["builds"]]
    timed = [m for m in converted if not report["builds"][m].get("refused")]
    timed += [m for m in converted if m not in timed and m in INT8_MODES]  # refused: still timed
    for mode, ms in interleaved_latency_ms({m: flats[m] for m in timed}, resized[0],
                                           latency_rounds, num_threads).items():
        report["builds"][mode]["latency_ms"] = ms
        report["builds"].get(f"{mode}_dynamic", {})["latency_ms_at_fixed_size"] = ms
    edge = choose_edge_build({m: report["builds"][m] for m in converted}) \
        if EDGE_BUILD in modes else None
    if EDGE_BUILD in modes:
        report["edge_build"] = edge
        if edge is None:
            report["refused"][EDGE_BUILD] = "no int8 candidate converted and passed the gate"
    for label, entry in report["builds"].items():
        files = [f"{name}_{label}.tflite"]
        if edge and entry["mode"] == edge:
            files.append(f"{name}_{EDGE_BUILD}{label[len(edge):]}.tflite")
        entry["files"] = [] if entry.get("refused") else files
        for file in entry["files"]:
            save(flats[label], os.path.join(out_dir, file))
        log(_build_line(label, entry, edge))
        if not entry.get("refused") and "_dynamic" not in label:
            log(delegation_table(LiteRTModel(flats[label]).delegation()))
    for mode, why in skipped.items():
        log(f"tflite {mode:<22} skipped: {why}")
    if edge:
        log(f"tflite edge build: {name}_{EDGE_BUILD}.tflite = {edge} (fastest int8 build; "
            f"gate: {report['gate']})")
    for label, why in report["refused"].items():
        log(f"tflite {label:<22} REFUSED: {why}")
    for label, why in report["failed"].items():
        log(f"tflite {label:<22} FAILED: {why}")
    return report


def _build_line(label, entry, edge):
    acc = "" if entry["accuracy"] is None else f"accuracy {entry['accuracy']:.2%}  "
    ms = f"  {entry['latency_ms']:.2f} ms/image" if "latency_ms" in entry else ""
    status = "REFUSED" if entry.get("refused") else "-> " + ", ".join(entry["files"])
    return (f"tflite {label:<22} {entry['size_bytes'] / 1024:8.1f} KiB  {acc}agreement "
            f"{entry['agreement']:.2%}  max abs logit error {entry['max_logit_error']:.2e}"
            f"{ms}  runtime >= {entry['min_runtime_version']}  {status}")
