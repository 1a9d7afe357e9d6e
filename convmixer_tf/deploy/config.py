"""The export job's configuration: every setting once, with its default, unit and `--help`
line. `convmixer-export`'s flags are made from these fields, and the same object travels whole
from the CLI or `convmixer_tf.export(model, export_dir, **fields)` down to the TFLite gate.

Pure Python (no TensorFlow import), so `convmixer-export --help` answers at once.
"""

import dataclasses

from convmixer_tf.deploy.modes import DEFAULT_MODES, MAX_IMAGE_PIXELS
from convmixer_tf.knobs import knob


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """What to export and how each build is checked (the model and its metadata come apart)."""

    name: str = knob(None, "model name, the folder TF Serving serves (default: the model's "
                           "file name, or model.name)")
    saved_model: bool = knob(True, "write the TF Serving SavedModel version")
    tflite_modes: tuple = knob(DEFAULT_MODES, "TFLite builds to write (comma-separated, or none)")
    calibration_dir: str = knob(None, "images for int8 calibration and the gate (default: the "
                                      "samples training stored beside the model)")
    int8_io: str = knob("float32", "input/output type of the int8 builds (uint8 = raw pixel "
                                   "bytes)")
    serving_precision: str = knob("float32", "what the SavedModel computes in: float32 or "
                                             "policy (the model's dtype policy)")
    tolerance: float = knob(None, "max abs logit error of the SavedModel against Keras "
                                  "(default: the serving precision's)")
    max_accuracy_drop: float = knob(1.0, "the TFLite gate: points of held-out top-1 accuracy a "
                                         "build may lose against Keras")
    min_int8_agreement: float = knob(0.98, "the TFLite gate without labels: top-1 agreement "
                                           "with Keras (a fraction)")
    max_image_pixels: int = knob(MAX_IMAGE_PIXELS, "the SavedModel refuses an image with more "
                                                   "pixels (read from its header)")
    max_request_pixels: int = knob(None, "... and a request whose images hold more together "
                                         "(default: 4 x max_image_pixels)")
