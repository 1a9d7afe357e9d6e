"""The exportable form of a trained classifier: logits out, any (or one fixed) input size,
stock layers, float32 whatever dtype policy it was trained under.

Both exporters (`saved_model`, `tflite`) and their validations start from `logits_model`.
"""

import keras

from convmixer_tf import fast_layers
from convmixer_tf.deploy.modes import SERVING_PRECISIONS
from convmixer_tf.errors import ExportError

# Default max abs logit error of a SavedModel against the Keras model, by the dtype it computes
# in, relative to the largest logit (at least 1): a float32 export reproduces the model, a
# reduced-precision one rounds differently where TF's graph fuses ops differently.
TOLERANCES = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}


def output_activation(model):
    """The activation of the `predictions` layer (None for logits), by name."""
    layer = model.get_layer("predictions")
    name = keras.activations.serialize(layer.activation)
    name = name if isinstance(name, str) else name.get("config", {}).get("name", str(name))
    return None if name in ("linear", None) else name


def check_precision(precision):
    if precision not in SERVING_PRECISIONS:
        raise ValueError(f"serving precision must be one of {SERVING_PRECISIONS}. "
                         f"Received {precision!r}")
    return precision


def compute_dtype(model, precision="float32"):
    """The dtype the export of `model` computes in: float32, or with "policy" the compute dtype
    of its mixing layers (the stem convolution; the head is float32 under mixed precision)."""
    if check_precision(precision) == "float32":
        return "float32"
    try:
        return keras.backend.standardize_dtype(model.get_layer("stem_conv").compute_dtype)
    except ValueError:
        return keras.backend.standardize_dtype(model.compute_dtype)


def default_tolerance(model, precision="float32", logits=None):
    """`TOLERANCES` for what the export computes in, times max(1, max |logit|) of `logits`
    (the reference) for reduced precision."""
    dtype = compute_dtype(model, precision)
    scale = 1.0
    if dtype != "float32" and logits is not None:
        scale = max(1.0, float(abs(logits).max()))
    return TOLERANCES.get(dtype, TOLERANCES["bfloat16"]) * scale


def logits_model(model, fixed_shape=None, precision="float32"):
    """A copy of `model` that returns logits (the `predictions` activation removed) and accepts
    any image size (or exactly `fixed_shape` = (batch, h, w)); ConvMixer is fully convolutional
    up to its global pooling, so the weights are the same for every size. Stock layers (an
    `accelerate`d model too) in float32 (weights cast), whatever dtype policy `model` has, or
    with `precision="policy"` in the model's own policy."""
    model = fast_layers.standardize(model, float32=check_precision(precision) == "float32")
    config = model.get_config()
    channels = model.input_shape[-1]
    batch_shape = [None, None, None, channels] if fixed_shape is None else [*fixed_shape, channels]
    inputs = [layer for layer in config["layers"] if layer["class_name"] == "InputLayer"]
    if len(inputs) != 1:
        raise ExportError("only single-input image classifiers can be exported")
    inputs[0]["config"]["batch_shape"] = batch_shape
    for layer in config["layers"]:
        if layer["config"].get("name") == "predictions":
            layer["config"]["activation"] = "linear"
    clone = model.__class__.from_config(config)
    clone.set_weights(model.get_weights())
    return clone


def min_image_size(model):
    """The smallest height/width the model accepts (its patch size), 1 if unknown."""
    try:
        return int(model.get_layer("stem_conv").kernel_size[0])
    except ValueError:
        return 1
