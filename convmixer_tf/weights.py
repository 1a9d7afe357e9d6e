"""Loading weights into a built ConvMixer from a local file (no downloads: paths only).

Keras files (`.weights.h5`, `.keras`) and PyTorch checkpoints of the official or timm ConvMixer
(`.pth`, `.pth.tar`, `.pt`, `.bin`, `.safetensors`; see convmixer_tf/convert.py and
docs/weights.md).
"""

import os
import warnings

import keras

from convmixer_tf import convert

KERAS_SUFFIXES = (".weights.h5", ".keras")
SUFFIXES = KERAS_SUFFIXES + convert.TORCH_SUFFIXES + (convert.SAFETENSORS_SUFFIX,)


def _keras_file_weights(model, path, skip_head):
    """`{layer: [arrays]}` from a `.keras` model, matched by layer name so that a full model
    loads into an `include_top=False` or new-`classes` one; clear error on any mismatch."""
    source = keras.saving.load_model(path, compile=False)
    result = {}
    for layer in model.layers:
        if not layer.weights:
            continue
        is_head = layer.name == convert.HEAD_LAYER
        if is_head and skip_head is True:
            continue
        try:
            source_layer = source.get_layer(layer.name)
        except ValueError:
            source_layer = None
        need = [tuple(w.shape) for w in layer.weights]
        got = [tuple(w.shape) for w in source_layer.weights] if source_layer else None
        if got != need:
            problem = (
                f"{path!r} has no layer {layer.name!r}"
                if source_layer is None
                else f"layer {layer.name!r} of {path!r} has weight shapes {got}, the model "
                f"needs {need}"
            )
            if is_head and skip_head == "auto":
                warnings.warn(f"{problem}: loaded the backbone only.", stacklevel=3)
                continue
            raise ValueError(f"{problem}. Build the model with the file's architecture.")
        result[layer.name] = source_layer.get_weights()
    return result


def load_weights(model, path, skip_head=False, prefer_ema=False, trust_checkpoint=False):
    """Loads `path` into `model`; a clear error, and an untouched model, if it cannot.

    `skip_head`: True never loads `predictions`; "auto" loads it only if it fits (the builders'
    `weights=` uses "auto", so another `classes` gets the backbone only). A model without
    `predictions` (`include_top=False`) takes the backbone of a `.keras` or PyTorch file.
    `prefer_ema` / `trust_checkpoint`: PyTorch checkpoints only, see `convert.load_state_dict`.
    """
    path = os.fspath(path)
    if path == "imagenet":
        raise ValueError(
            "weights='imagenet' would need a download, which convmixer_tf never does. Pass the "
            "path of a local checkpoint instead (docs/weights.md: convert the official PyTorch "
            "checkpoints). Received weights='imagenet'"
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found. Received weights={path!r}")
    if path.endswith(".weights.h5"):
        model.load_weights(path)
        return model
    if path.endswith(".keras"):
        weights = _keras_file_weights(model, path, skip_head)
    elif path.endswith(SUFFIXES):
        state_dict = convert.load_state_dict(path, prefer_ema, trust_checkpoint)
        weights = convert.keras_weights_from_state_dict(state_dict, model, skip_head)
    else:
        raise ValueError(
            f"Unknown weights format; expected one of {SUFFIXES}. Received weights={path!r}"
        )
    return convert.assign_weights(model, weights)
