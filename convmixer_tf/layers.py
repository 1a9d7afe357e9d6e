"""Old name of `convmixer_tf.fast_layers` (the CPU training speed-ups, not the model's layers),
kept for one release: every name resolves there, with a DeprecationWarning."""

import importlib
import warnings


def __getattr__(name):
    warnings.warn("convmixer_tf.layers is now convmixer_tf.fast_layers; the old name goes in "
                  "the next release", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module("convmixer_tf.fast_layers"), name)
