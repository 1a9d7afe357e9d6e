"""TFLite conversion for edge CPUs: a Keras classifier to a `.tflite` flatbuffer returning
logits, in each mode of `modes.TFLITE_MODES`, builtin ops only (never Flex/Select TF ops).

    from convmixer_tf.deploy import tflite
    flat = tflite.convert(model, "int8_float_gelu", representative_images=x_train[:200])
    tflite.save(flat, "out/digits_int8_float_gelu.tflite")

Modes (what each does to the converter: its branch in `convert_mode`):
{modes}
Full-integer modes take `io_type` float32 (default: drop-in), int8 or uint8 (uint8 input is
exactly the raw pixel bytes: scale 1, zero point 0). Running and reading the files:
`deploy.litert`; the accuracy gate and the edge-build choice: `deploy.gate`; the export's whole
TFLite set (every build converted, gated, timed, written): `deploy.tflite_set.export_all`.
"""

import os
import re
import tempfile
import traceback
import warnings

import keras
import numpy as np
import tensorflow as tf

from convmixer_tf import artifacts, compat
from convmixer_tf.deploy.litert import fit_size, op_counts
from convmixer_tf.deploy.logits import logits_model
from convmixer_tf.deploy.modes import INT8_IO, TFLITE_MODES, check_modes

if __doc__:  # the modes listed from the table (python -OO drops docstrings)
    __doc__ = __doc__.format(modes="\n".join(f"    {name:<16} {mode.about}"
                                              for name, mode in TFLITE_MODES.items()))
IO_TYPES = {"float32": tf.float32, "int8": tf.int8, "uint8": tf.uint8}


def convert(model, mode="float32", representative_images=None, input_shape=(1, None, None),
            io_type="float32", split_depthwise=True):
    """Converts a Keras image classifier to a `.tflite` flatbuffer (bytes) returning logits.

    `input_shape` is `(batch, height, width)` of the TFLite input; `None` entries stay
    dynamic. `representative_images` (uint8/float pixels) are required for the calibrated
    modes (`full_int8`, `int8_float_gelu`). `split_depthwise`: depthwise kernels larger than
    5x5 are converted as row groups XNNPACK runs fast (`RowSplitDepthwiseConv2D`, in the modes
    whose branch of `convert_mode` asks for them: all but `dynamic_int8`); False keeps them
    whole in every mode.
    """
    return convert_builds(model, [mode], representative_images, input_shape, io_type,
                          split_depthwise)[mode]


def convert_builds(model, modes, representative_images=None, input_shape=(1, None, None),
                   io_type="float32", split_depthwise=True, failures=None):
    """{mode: flatbuffer} for several modes (arguments as `convert`); the calibrated modes
    share one calibration run. With a `failures` dict, a mode the converter cannot convert is
    left out and recorded there as `{mode: one-line reason}` (its traceback and the converter's
    diagnostics go to stderr: the export's log file) instead of raising."""
    modes = check_modes(modes, "mode", edge_build=False)
    takes = [m for m, settings in TFLITE_MODES.items() if len(settings.io_types) > 1]
    if io_type not in IO_TYPES or any(io_type not in TFLITE_MODES[m].io_types for m in modes):
        raise ValueError(
            f"`io_type` must be float32, or {'/'.join(INT8_IO[1:])} with the modes "
            f"{' and '.join(takes)} only. Received io_type={io_type!r} for modes {list(modes)}"
        )
    calibrated_modes = [m for m in modes if TFLITE_MODES[m].calibrated]
    if calibrated_modes and (representative_images is None or len(representative_images) == 0):
        raise ValueError(f"modes {calibrated_modes} need `representative_images` (training images)")
    flats = {}
    with tempfile.TemporaryDirectory(prefix="convmixer-tflite-") as tmp:
        graphs = Graphs(model, input_shape, representative_images, split_depthwise, tmp)
        for mode in modes:
            try:
                flat = convert_mode(mode, graphs, IO_TYPES[io_type])
                custom = [name for name in op_counts(flat) if not name.isupper()]
                if custom:
                    raise RuntimeError(f"conversion to {mode} produced non-builtin ops {custom}")
                flats[mode] = flat
            except CONVERSION_ERRORS as error:
                if failures is None:
                    raise
                traceback.print_exc()  # beside the converter's C++ diagnostics on fd 2
                failures[mode] = "conversion failed (" + conversion_failure(error) + ")"
    return flats


def convert_mode(mode, graphs, io_type=tf.float32):
    """One mode's flatbuffer from `graphs` (a `Graphs`): the whole of what each mode does to
    the converter, one branch per `TFLITE_MODES` name. `io_type`: the input/output tf.DType of
    the full-integer modes (float32, int8, or uint8: the raw pixel bytes); `convert_builds`
    checks it against the mode's `io_types`."""
    if mode == "float32":  # the plain float model
        return _converter(graphs.saved_model(split=True)).convert()
    if mode == "float16":  # float16 weights (half the size), dequantized to float32 compute
        converter = _converter(graphs.saved_model(split=True), optimize=True)
        converter.target_spec.supported_types = [tf.float16]
        return converter.convert()
    if mode == "dynamic_int8":  # int8 weights, activations quantized on the fly
        # Depthwise kernels whole: XNNPACK never takes hybrid depthwise convolutions, and on
        # TFLite's builtin kernel one 7x7 layer is faster than three row groups (BENCHMARKS.md).
        converter = _converter(graphs.saved_model(split=False), optimize=True)
        # Per-channel hybrid FULLY_CONNECTED is op version 12 (min runtime 2.17: tflite-runtime
        # 2.14 refuses the file); a per-tensor dense layer keeps version <= 9 (runtime 2.9+).
        compat.per_tensor_dense_quantization(converter)
        return converter.convert()
    if mode == "full_int8":
        # int8 weights (per channel) and activations, ranges calibrated on training images.
        # I/O `io_type`: float32 (a drop-in), int8, or uint8 (input scale 1, zero point 0: the
        # raw pixel bytes, as the pixels' calibrated range is 0-255).
        return compat.mlir_quantize(graphs.calibrated(), io_type)
    if mode == "int8_float_gelu":
        # full_int8 from the same calibration, every GELU kept in float32 between
        # DEQUANTIZE/QUANTIZE (the quantizer's denylist, as QuantizationDebugger applies it):
        # XNNPACK has no int8 GELU, so the int8 graph would leave its partition at each one.
        # Its `TFLITE_MODES` entry skips it for a model without GELU (the file of full_int8).
        return compat.mlir_quantize(graphs.calibrated(), io_type, denylisted_ops=["GELU"])
    raise ValueError(f"`tflite.convert_mode` has no branch for TFLite mode {mode!r}: add one "
                     f"beside its TFLITE_MODES entry")


class Graphs:
    """What the modes convert from, each made once on first use and shared: the logits
    SavedModel (`saved_model`, with or without the large depthwise kernels split) and the
    calibrated float model (`calibrated`; a calibration error is raised again to every mode
    that asks)."""

    def __init__(self, model, input_shape, representative_images, split_depthwise, folder):
        self.plain = logits_model(model, fixed_shape=input_shape)
        self.split = split_large_depthwise(self.plain) if split_depthwise else self.plain
        self.images, self.folder = representative_images, folder
        self._dirs, self._calibrated = {}, []

    def saved_model(self, split):
        logits = self.split if split else self.plain
        if id(logits) not in self._dirs:
            path = os.path.join(self.folder, f"saved_model_{len(self._dirs)}")
            _write_signature(logits, path)
            self._dirs[id(logits)] = path
        return self._dirs[id(logits)]

    def calibrated(self):
        """The float model with activation ranges recorded on the representative images (the
        converter's own calibration step), from the split graph."""
        if not self._calibrated:
            try:
                converter = compat.calibrate_only(
                    _converter(self.saved_model(split=True), optimize=True))
                converter.representative_dataset = _representative(self.images,
                                                                   self.split.input_shape)
                with warnings.catch_warnings():  # the calibrator's tf.lite.Interpreter warning
                    warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprec")
                    self._calibrated.append(converter.convert())
            except CONVERSION_ERRORS as error:
                self._calibrated.append(error)
        if isinstance(self._calibrated[0], Exception):
            raise self._calibrated[0]
        return self._calibrated[0]


# What the converter raises for a graph it cannot convert (ConverterError: an op TFLite lacks,
# a dtype it cannot take; RuntimeError/ValueError from its C++ passes and our builtin-op check).
CONVERSION_ERRORS = (compat.converter_error(), RuntimeError, ValueError, tf.errors.OpError)
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


def _converter(saved_model_dir, optimize=False):
    """The converter every mode starts from: builtin ops only, optionally quantizing."""
    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if optimize:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    return converter


def _representative(images, input_shape):
    """Calibration batches of one image, resized to the fixed input size if there is one."""
    images = fit_size(np.asarray(images, np.float32), input_shape[1:3]).astype(np.float32)

    def generate():
        for image in images:
            yield {"images": image[None]}

    return generate


def save(flat, path):
    """Writes a flatbuffer atomically, so a failed run never leaves half a model."""
    return artifacts.write_bytes(path, flat)

