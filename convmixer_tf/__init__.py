"""convmixer_tf: ConvMixer ("Patches Are All You Need?") for Keras 3 / TensorFlow."""

from convmixer_tf.model import (
    ConvMixer,
    ConvMixer256_8,
    ConvMixer768_32,
    ConvMixer1024_20,
    ConvMixer1536_20,
)
from convmixer_tf.imagenet import decode_predictions
from convmixer_tf.presets import MODEL_CONFIGS

__version__ = "0.1.0"

__all__ = [
    "ConvMixer",
    "ConvMixer256_8",
    "ConvMixer768_32",
    "ConvMixer1024_20",
    "ConvMixer1536_20",
    "MODEL_CONFIGS",
    "decode_predictions",
]
