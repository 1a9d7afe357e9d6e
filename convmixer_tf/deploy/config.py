"""The deployment jobs' configurations: every setting once, with its default, unit and `--help`
line. `convmixer-export`'s flags are made from `ExportConfig`'s fields and `convmixer-predict`'s
from `PredictConfig`'s (`cli.add_config_flags`); the object travels whole from the CLI or
`convmixer_tf.export(model, export_dir, **fields)` down to the SavedModel and the TFLite gate.

Pure Python (no TensorFlow import), so `convmixer-export --help` answers at once.
"""

import dataclasses
import math
import re

from convmixer_tf.deploy.modes import (DEFAULT_MODES, EDGE_BUILD, EXPORT_MODES, INT8_IO,
                                       MAX_IMAGE_PIXELS, REQUEST_IMAGES, SERVING_PRECISIONS,
                                       check_modes)
from convmixer_tf.knobs import knob

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a folder name TF Serving and shells take


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """What to export and how each build is checked (the model and its metadata come apart:
    `export(model, export_dir, class_names=, image_size=, crop_pct=, ...)`)."""

    CHOICES = {"int8_io": INT8_IO, "serving_precision": SERVING_PRECISIONS}

    name: str = knob(None, "model name, the folder TF Serving serves; None: the model's file "
                           "name, or model.name")
    saved_model: bool = knob(True, "write the TF Serving SavedModel version")
    tflite_modes: tuple = knob(DEFAULT_MODES, "TFLite builds to write: comma-separated, from "
                               f"{','.join(EXPORT_MODES)} ({EDGE_BUILD}: every int8 build, the "
                               "fastest that passes the gate also written as "
                               f"<name>_{EDGE_BUILD}.tflite), or none")
    calibration_dir: str = knob(None, "images for int8 calibration and the gate; None: the samples "
                                      "training stored beside the model")
    int8_io: str = knob("float32", "input/output type of the int8 builds (uint8 = raw pixel "
                                   "bytes)")
    serving_precision: str = knob("float32", "what the SavedModel computes in: float32 (a "
                                             "float32 rebuild of any mixed-precision model) or "
                                             "policy (the dtype policy it was saved with, e.g. "
                                             "bfloat16 for GPU serving); TFLite is always "
                                             "converted from float32")
    tolerance: float = knob(None, "max abs logit error of the SavedModel against Keras; "
                                  "None: 1e-4 in float32; with serving precision policy, "
                                  "1e-2 (float16) or 5e-2 (bfloat16) times the largest logit")
    max_accuracy_drop: float = knob(1.0, "the TFLite gate: points of held-out top-1 accuracy a "
                                         "build may lose against Keras on the same labelled "
                                         "images")
    min_int8_agreement: float = knob(0.98, "the TFLite gate without labels (a calibration "
                                           "folder): top-1 agreement with Keras (a fraction)")
    max_image_pixels: int = knob(MAX_IMAGE_PIXELS, "the SavedModel refuses (INVALID_ARGUMENT, "
                                                   "before decoding) an image with more pixels "
                                                   "(height x width, read from a JPEG/PNG "
                                                   "header)")
    max_request_pixels: int = knob(None, "... and a request whose images hold more pixels "
                                         f"together; None: {REQUEST_IMAGES} x "
                                         "max_image_pixels")

    def __post_init__(self):
        if self.name is not None and not (isinstance(self.name, str) and NAME.match(self.name)):
            raise ValueError(f"`name` must be a folder name (letters, digits, '.', '_', '-'). "
                             f"Received name={self.name!r}")
        object.__setattr__(self, "tflite_modes", tuple(check_modes(self.tflite_modes)))
        if self.int8_io not in INT8_IO:
            raise ValueError(f"`int8_io` must be one of {INT8_IO}. Received "
                             f"int8_io={self.int8_io!r}")
        if self.serving_precision not in SERVING_PRECISIONS:
            raise ValueError(f"`serving_precision` must be one of {SERVING_PRECISIONS}. "
                             f"Received serving_precision={self.serving_precision!r}")
        for key, low, high, unit in (("tolerance", 0, math.inf, "max abs logit error"),
                                     ("max_accuracy_drop", 0, 100, "points of accuracy"),
                                     ("min_int8_agreement", 0, 1, "a fraction")):
            value = getattr(self, key)
            if key == "tolerance" and value is None:  # the default of the serving precision
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not low <= value <= high:
                raise ValueError(f"`{key}` must be a number in [{low}, {high}] ({unit}). "
                                 f"Received {key}={value!r}")
        for key in ("max_image_pixels", "max_request_pixels"):
            value = getattr(self, key)
            if key == "max_request_pixels" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{key}` must be at least 1, got {value!r} (a pixel budget: "
                                 "height x width)")

    @classmethod
    def create(cls, config=None, **fields):
        """`config` (default: the defaults) with `fields` winning over it; a name that is not
        a field is a TypeError naming the valid ones."""
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(fields) - set(valid))
        if unknown:
            raise TypeError(f"unknown export setting(s) {', '.join(unknown)}: the "
                            f"{cls.__name__} fields are {', '.join(valid)}")
        return dataclasses.replace(config or cls(), **fields)


@dataclasses.dataclass(frozen=True)
class PredictConfig:
    """`convmixer-predict`'s settings (the model and the image files come apart)."""

    top_k: int = knob(3, "labels to show per image, best first")
    labels: str = knob(None, "metadata .json with class_names; None: the metadata.json beside "
                             "the .tflite file")
    threads: int = knob(0, "LiteRT CPU threads; 0 = the runtime's default")

    def __post_init__(self):
        if self.top_k < 1 or self.threads < 0:
            raise ValueError(f"--top-k must be >= 1 and --threads >= 0. Received "
                             f"top_k={self.top_k}, threads={self.threads}")
