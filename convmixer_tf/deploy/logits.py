"""The exportable form of a trained classifier: logits out, any (or one fixed) input size.

Both exporters (`saved_model`, `tflite`) and their validations start from `logits_model`.
"""

import keras


class ExportError(RuntimeError):
    """An export failed or did not validate; what was published before is untouched."""


def output_activation(model):
    """The activation of the `predictions` layer (None for logits), by name."""
    layer = model.get_layer("predictions")
    name = keras.activations.serialize(layer.activation)
    name = name if isinstance(name, str) else name.get("config", {}).get("name", str(name))
    return None if name in ("linear", None) else name


def logits_model(model, fixed_shape=None):
    """A copy of `model` that returns logits (the `predictions` activation removed) and accepts
    any image size (or exactly `fixed_shape` = (batch, h, w)); ConvMixer is fully convolutional
    up to its global pooling, so the weights are the same for every size."""
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
