"""Loading weights into a built ConvMixer from a local file (no downloads: paths only)."""

import os

import keras

KERAS_SUFFIXES = (".weights.h5", ".keras")


def load_weights(model, path):
    """Loads `path` (`.weights.h5` or `.keras`) into `model`; a clear error if it cannot."""
    path = os.fspath(path)
    if path == "imagenet":
        raise ValueError(
            "weights='imagenet' would need a download, which convmixer_tf never does. Pass the "
            "path of a local checkpoint instead. Received weights='imagenet'"
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found. Received weights={path!r}")
    if path.endswith(".weights.h5"):
        model.load_weights(path)
    elif path.endswith(".keras"):
        source = keras.saving.load_model(path, compile=False)
        model.set_weights(source.get_weights())
    else:
        raise ValueError(
            f"Unknown weights format; expected one of {KERAS_SUFFIXES}. Received weights={path!r}"
        )
    return model
