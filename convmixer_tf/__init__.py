"""convmixer_tf: ConvMixer ("Patches Are All You Need?") for Keras 3 / TensorFlow.

The public names load lazily (PEP 562), so the console entry points can quiet TensorFlow's
start-up logging and answer `--help` before TensorFlow is imported. The `TYPE_CHECKING` block
imports the same names for type checkers and IDEs ("go to definition").
"""

import importlib
import typing

__version__ = "0.2.0"

# Public name -> the module that defines it (imported on first use).
_EXPORTS = {
    "ConvMixer": "convmixer_tf.model",
    "ConvMixer1536_20": "convmixer_tf.model",
    "ConvMixer768_32": "convmixer_tf.model",
    "ConvMixer1024_20": "convmixer_tf.model",
    "ConvMixer256_8": "convmixer_tf.model",
    "MODEL_CONFIGS": "convmixer_tf.presets",
    "decode_predictions": "convmixer_tf.imagenet",
    "export": "convmixer_tf.deploy.export",
}

__all__ = list(_EXPORTS)

if typing.TYPE_CHECKING:
    from convmixer_tf.deploy.export import export
    from convmixer_tf.imagenet import decode_predictions
    from convmixer_tf.model import (ConvMixer, ConvMixer256_8, ConvMixer768_32, ConvMixer1024_20,
                                    ConvMixer1536_20)
    from convmixer_tf.presets import MODEL_CONFIGS


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'convmixer_tf' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
