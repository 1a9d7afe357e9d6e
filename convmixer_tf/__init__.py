"""convmixer_tf: ConvMixer ("Patches Are All You Need?") for Keras 3 / TensorFlow.

The public names load lazily (PEP 562), so the console entry points can quiet TensorFlow's
start-up logging and answer `--help` before TensorFlow is imported.
"""

import importlib

from convmixer_tf import presets  # plain data, no TensorFlow

__version__ = "0.1.0"

_EXPORTS = {
    "ConvMixer": "convmixer_tf.model",
    **{variant: "convmixer_tf.model" for variant in presets.VARIANTS},
    "MODEL_CONFIGS": "convmixer_tf.presets",
    "decode_predictions": "convmixer_tf.imagenet",
    "export": "convmixer_tf.deploy.export",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'convmixer_tf' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
