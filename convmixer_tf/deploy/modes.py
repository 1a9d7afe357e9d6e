"""The export's named choices, without importing TensorFlow, so a command lists them in
`--help` and checks its flags before TensorFlow loads: the TFLite modes as one table of data
(names, descriptions, flags; what each does to the converter is its branch in
`deploy.tflite.convert_mode`), the serving precisions (`deploy.logits`) and the SavedModel's
pixel budgets (`deploy.saved_model`).

A new TFLite mode is one `TFLITE_MODES` entry, its branch in `tflite.convert_mode` and its
test in tests/test_tflite.py.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Mode:
    """Where one TFLite build fits: what the export checks, skips and chooses among before and
    after converting it (`deploy.tflite.convert_mode` says how it is converted)."""

    about: str  # one line for the docs and `--help`
    calibrated: bool = False  # needs representative training images (full integer)
    io_types: tuple = ("float32",)  # input/output types it can take (the export's --int8-io)
    requires: str = ""  # a layer activation the build differs by (lower case) ...
    base: str = ""  # ... else it is the same file as this mode: skipped for such a model
    edge_candidate: bool = False  # an int8 build the export's edge build is chosen among


INT8_IO = ("float32", "int8", "uint8")  # uint8 input is exactly the raw pixel bytes

TFLITE_MODES = {
    "float32": Mode("plain float model"),
    "float16": Mode("float16 weights, float compute (half the size)"),
    "dynamic_int8": Mode("int8 weights, activations quantized on the fly (dynamic range)",
                         edge_candidate=True),
    "full_int8": Mode("int8 weights and activations, calibrated on training images",
                      calibrated=True, io_types=INT8_IO, edge_candidate=True),
    "int8_float_gelu": Mode(
        "full_int8 with the GELUs in float32 (XNNPACK has no int8 GELU: one partition)",
        calibrated=True, io_types=INT8_IO, requires="gelu", base="full_int8",
        edge_candidate=True),
}
MODES = tuple(TFLITE_MODES)
INT8_MODES = tuple(m for m, mode in TFLITE_MODES.items() if mode.edge_candidate)
EDGE_BUILD = "int8"  # `<name>_int8.tflite`: the fastest int8 build that passes the gate
EXPORT_MODES = MODES + (EDGE_BUILD,)  # what `export(tflite_modes=...)` takes
DEFAULT_MODES = ("float32", "float16", EDGE_BUILD)  # export's and convmixer-export's default


def check_modes(modes, what="tflite_modes", edge_build=True):
    """The one check of TFLite mode names: `modes` (names, or one comma-separated string where
    "none" or "" is no build) as a list, each a `TFLITE_MODES` name or, with `edge_build`,
    `EDGE_BUILD` (a converter takes no "int8"), else a one-line ValueError naming the
    unknown ones, the choices and what was received."""
    received = modes
    if isinstance(modes, str):
        modes = [] if modes in ("", "none") else modes.split(",")
    modes = list(modes or ())
    choices = tuple(TFLITE_MODES) + ((EDGE_BUILD,) if edge_build else ())  # the table as is
    bad = [m for m in modes if m not in choices]
    if bad:
        hint = (f" ('{EDGE_BUILD}' is the export's edge build, chosen among "
                f"{', '.join(INT8_MODES)})" if EDGE_BUILD in bad and not edge_build else
                f" ({EDGE_BUILD}: every int8 build, the fastest that passes the gate also "
                f"written as <name>_{EDGE_BUILD}.tflite)" if edge_build else "")
        raise ValueError(f"unknown TFLite mode {', '.join(map(repr, bad))}: `{what}` must be "
                         f"from {','.join(choices)}{' or none' if edge_build else ''}{hint}. "
                         f"Received {what}={received!r}")
    return modes


# What the SavedModel computes in: "float32" (a float32 rebuild of the model, the default, and
# always for TFLite) or "policy" (the dtype policy the model was saved with, e.g. bfloat16).
SERVING_PRECISIONS = ("float32", "policy")
# Work budgets of the SavedModel's signatures, in pixels. Decoding holds 3 bytes per pixel
# (uint8; `preprocessing` resizes it without a float copy) and a request's images decode in
# parallel (tf.map_fn), so the request budget bounds a request's transient memory: measured
# +117 MB for a 40 MP PNG, +187 MB for 4 of them (docs/serving.md). The tensor signatures run
# the model at the size sent: the request budget bounds batch x height x width there too.
MAX_IMAGE_PIXELS = 40_000_000  # per image: above any 12-24 MP camera photo; a 16k x 16k is 256 MP
REQUEST_IMAGES = 4  # the default request budget: 4 images at the per-image budget
