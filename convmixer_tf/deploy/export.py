"""The export job: a Keras classifier -> a new TF Serving SavedModel version and a new version of
the TFLite set, each validated against the Keras model and renamed into place whole, so a kill
never leaves a partial or mixed version. `export` takes a model in memory; `export_model` reads
a trained-model file set (`artifacts`: `.keras` + metadata + samples) and calls it.

    import convmixer_tf
    convmixer_tf.export(model, "saved_models", name="digits", class_names=names,
                        calibration_images=x_train[:256], held_out=(x_test, y_test))

    from convmixer_tf.deploy import export
    export.export_model("saved_models/convmixer_digits.keras")

TensorFlow's own output during the job (C++ logging, the converter's MLIR diagnostics, retracing
warnings) goes to `<export_dir>/<name>.export.log`, not the terminal; a TFLite build the
converter cannot make is named with a one-line reason and the rest of the set is still written.
"""

import contextlib
import dataclasses
import logging
import os
import shutil
import sys

import keras
import numpy as np

from convmixer_tf import artifacts, preprocessing
from convmixer_tf.deploy import saved_model, tflite_set
from convmixer_tf.deploy.config import ExportConfig
from convmixer_tf.deploy.logits import compute_dtype

log = logging.getLogger(__name__)


def folder_images(folder, image_size, crop_pct=1.0):
    """uint8 images of every image file in `folder` (other files skipped, as training folders
    do), preprocessed like evaluation; a clear error when it holds none."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"no such calibration folder: {folder}")
    paths = preprocessing.list_image_files(folder)
    if not paths:
        raise ValueError(f"no image files ({'/'.join(preprocessing.IMAGE_EXTENSIONS)}) in "
                         f"{folder}")
    images = [preprocessing.resize_centre_crop(preprocessing.read_image_file(p), image_size,
                                               crop_pct).numpy() for p in paths]
    return np.stack(images).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class ExportInputs:
    """`export`'s inputs once checked: the model's name and metadata, the uint8 calibration
    images (or None), the held-out uint8 images (or None) and their labels (or None), and the
    SavedModel's pixel budgets."""

    name: str
    metadata: artifacts.Metadata
    calibration: np.ndarray
    held_out: np.ndarray
    labels: np.ndarray
    limits: dict


def export(model, export_dir, *, class_names=None, image_size=None, crop_pct=1.0,
           calibration_images=None, held_out=None, config=None, **fields):
    """Exports a Keras ConvMixer classifier in memory: `<export_dir>/<name>/<version>/` (TF
    Serving, validated in a separate process) and `<export_dir>/<name>_tflite/<version>/` (the
    TFLite builds, each gated on `held_out`). What `convmixer-export` does for a `.keras` file.

    What the model's metadata is: `class_names` (default "0".."N-1"), `image_size` (h, w), the
    size `serving_image_bytes` resizes to and the fixed TFLite files take (default the model's
    input size), `crop_pct` (evaluation's centre crop). `calibration_images`: uint8 0-255
    training images [N, h, w, 3] for the full-int8 builds (without them those builds are
    skipped). `held_out`: `(images, labels)` (the gate compares held-out accuracy with the
    Keras model's) or images alone (top-1 agreement >= `min_int8_agreement`); without it the
    builds are measured on synthetic images and not gated.

    How to export: `config` (a `deploy.config.ExportConfig`) and/or its fields as keywords
    (they win over `config`): `name` (default `model.name`), `saved_model`, `tflite_modes`,
    `calibration_dir` (images for both, instead of `calibration_images` / `held_out`),
    `int8_io`, `serving_precision`, `tolerance`, `max_accuracy_drop` (points of accuracy),
    `min_int8_agreement`, `max_image_pixels`, `max_request_pixels`. The TFLite builds are
    converted from a float32 rebuild of the model whatever its dtype policy; the SavedModel
    computes in float32 too unless `serving_precision="policy"` keeps the model's own.

    Returns dict(saved_model=..., tflite=report with `version`, `path`, `refused` and `failed`
    builds, log=the log file); a refused or failed build is not written, the rest is
    (`convmixer-export` then exits 3). Bad arguments raise ValueError (an unknown keyword:
    TypeError) before any work. Progress goes to the logger `convmixer_tf.deploy.export`
    and, with TensorFlow's own output, to `<export_dir>/<name>.export.log`.
    """
    config = ExportConfig.create(config, **fields)
    model = _network(model)
    inputs = check_inputs(model, export_dir, config, class_names, image_size, crop_pct,
                          calibration_images, held_out)
    export_dir = os.fspath(export_dir)
    _prepare(model, export_dir, inputs.name, config)
    log_path = os.path.join(export_dir, f"{inputs.name}.export.log")
    result = dict(log=log_path)
    work = artifacts.make_temp_dir(export_dir)
    try:
        with stderr_to(log_path) as logged, _logged_to(logged), artifacts.temp_files_in(work):
            if config.saved_model:
                result["saved_model"] = export_saved_model_version(model, export_dir, inputs,
                                                                   config)
            if config.tflite_modes:
                result["tflite"] = export_tflite_version(
                    model, os.path.join(export_dir, f"{inputs.name}_tflite"), inputs, config)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def export_model(model_path, export_dir=None, config=None, **fields):
    """`export` of a trained-model file set: `model_path` (a `.keras` file) with its metadata
    (`<name>.json`: class names, image size, crop) and samples (`<name>.samples.npz`:
    calibration and labelled held-out images; `calibration_dir` replaces them), to
    `export_dir` (default: the model's folder) under `name` (default: the file name).
    `config` / `fields`: as for `export`.

    Each version is written into a `.tmp-<pid>-*` folder and renamed into place only when
    complete and validated, so a kill at any point leaves the published versions as they were
    and no partial one. The job's scratch (converter, validation) lives in
    `<export_dir>/.tmp-<pid>-*/`. Temp folders a killed run left are removed when the next
    export starts, and this run's own are removed when it ends, failed or not."""
    config = ExportConfig.create(config, **fields)  # before any long work
    model = artifacts.load_model(model_path)
    meta = artifacts.read_metadata(model, model_path)
    samples = None if config.calibration_dir else artifacts.read_samples(model_path)
    name = config.name or os.path.splitext(os.path.basename(model_path))[0]
    return export(
        model, export_dir or os.path.dirname(os.path.abspath(model_path)),
        class_names=meta.class_names, image_size=meta.image_size, crop_pct=meta.crop_pct,
        calibration_images=None if samples is None else samples["calibration"],
        held_out=None if samples is None else (samples["held_out"],
                                               samples["held_out_labels"]),
        config=dataclasses.replace(config, name=name))


def _network(model):
    """The classifier a trainer wraps (`training.distribute.ReplicaTrainer` keeps it as
    `.model`), else `model`: what `make_trainer` returned can be exported as it is."""
    inner = getattr(model, "model", None)
    if (isinstance(model, keras.Model) and isinstance(inner, keras.Model)
            and "predictions" not in [layer.name for layer in model.layers]):
        return inner
    return model


def check_inputs(model, export_dir, config, class_names=None, image_size=None, crop_pct=1.0,
                 calibration_images=None, held_out=None):
    """`export`'s inputs checked (`config` checked itself), each failure one line naming the
    value received; returns the `ExportInputs`."""
    if not isinstance(model, keras.Model):
        raise ValueError(f"`model` must be a Keras model. Received model of type "
                         f"{type(model).__name__}")
    if "predictions" not in [layer.name for layer in model.layers]:
        raise ValueError(f"`model` must be a classifier with a `predictions` layer (a "
                         f"convmixer_tf.ConvMixer with include_top=True). Received model "
                         f"{model.name!r} without one")
    if not export_dir or not isinstance(export_dir, (str, os.PathLike)):
        raise ValueError(f"`export_dir` must be a folder path. Received export_dir={export_dir!r}")
    name = dataclasses.replace(config, name=config.name or model.name).name  # checked
    meta = _metadata(model, class_names, image_size, crop_pct)
    if config.calibration_dir:
        if calibration_images is not None or held_out is not None:
            raise ValueError("give calibration_dir or calibration_images / held_out, not both. "
                             f"Received calibration_dir={config.calibration_dir!r}")
        calibration_images = held_out = folder_images(config.calibration_dir, meta.image_size,
                                                      meta.crop_pct)
    calibration = None if calibration_images is None else _pixels(
        "calibration_images", calibration_images)
    images, labels = _held_out(held_out, meta)
    limits = saved_model.serving_limits(meta.image_size, meta.crop_pct, config.max_image_pixels,
                                        config.max_request_pixels)
    return ExportInputs(name, meta, calibration, images, labels, limits)


def _metadata(model, class_names, image_size, crop_pct):
    """The `artifacts.Metadata` the export writes, from the model and what the caller gave."""
    classes = int(model.output_shape[-1])
    class_names = list(range(classes)) if class_names is None else list(class_names)
    if len(class_names) != classes:
        raise ValueError(f"`class_names` must name the model's {classes} classes. Received "
                         f"{len(class_names)} names")
    if image_size is None:
        image_size = tuple(model.input_shape[1:3])
        if None in image_size:
            raise ValueError(f"the model takes any image size (input shape "
                             f"{model.input_shape}): pass image_size=(height, width), the size "
                             "it was trained at. Received image_size=None")
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    if len(tuple(image_size)) != 2 or not all(isinstance(s, (int, np.integer)) and s > 0
                                              for s in image_size):
        raise ValueError(f"`image_size` must be (height, width) in pixels. Received "
                         f"image_size={image_size!r}")
    if not isinstance(crop_pct, (int, float)) or not 0 < crop_pct <= 1:
        raise ValueError(f"`crop_pct` must be in (0, 1]. Received crop_pct={crop_pct!r}")
    return artifacts.Metadata(class_names, image_size, crop_pct)


def _held_out(held_out, meta):
    """(uint8 images, int labels or None) of `held_out` ((images, labels) or images), or
    (None, None)."""
    if held_out is None:
        return None, None
    pair = isinstance(held_out, tuple) and len(held_out) == 2
    images, labels = held_out if pair else (held_out, None)
    images = _pixels("held_out images", images)
    size, classes = meta.image_size, len(meta.class_names)
    if tuple(images.shape[1:3]) != size:
        raise ValueError(f"`held_out` images must be {size[0]}x{size[1]} (the image_size). "
                         f"Received shape {images.shape}")
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if (len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer)
                or labels.min() < 0 or labels.max() >= classes):
            raise ValueError(f"`held_out` labels must be {len(images)} class ids in [0, "
                             f"{classes}). Received {len(labels)} labels of dtype "
                             f"{labels.dtype}" + (f", in [{labels.min()}, {labels.max()}]"
                                                  if len(labels) else ""))
    return images, labels


def _pixels(what, images):
    """uint8 images [N, h, w, 3] from 0-255 pixels (uint8 or float), or a ValueError."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0:
        raise ValueError(f"`{what}` must be images [N, height, width, 3] (N >= 1). Received "
                         f"shape {images.shape}")
    if not (np.issubdtype(images.dtype, np.integer) or np.issubdtype(images.dtype, np.floating)):
        raise ValueError(f"`{what}` must be numeric pixels. Received dtype {images.dtype}")
    low, high = float(images.min()), float(images.max())
    if not np.isfinite(low + high):
        raise ValueError(f"`{what}` must be finite pixels. Received NaN or infinite values")
    if low < 0 or high > 255 or (np.issubdtype(images.dtype, np.floating) and 0 < high <= 1):
        raise ValueError(f"`{what}` must be 0-255 pixels, as the model takes them (it "
                         f"normalises them itself). Received values in [{low:g}, {high:g}]")
    return np.round(images).astype(np.uint8)


@contextlib.contextmanager
def stderr_to(path):
    """Sends file descriptor 2 and `sys.stderr` to the file `path` while the block runs, so
    TensorFlow's C++ logging and the converter's MLIR diagnostics (written from C++ to fd 2),
    Python warnings and tracebacks land there, not on the terminal; restored afterwards, also
    on an exception. Yields a function that writes a line to the file."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "w", encoding="utf-8", buffering=1) as file:
        os.dup2(file.fileno(), 2)
        previous, sys.stderr = sys.stderr, file
        try:
            yield lambda line: (file.write(line + "\n"), file.flush())
        finally:
            file.flush()
            sys.stderr = previous
            os.dup2(saved, 2)
            os.close(saved)


@contextlib.contextmanager
def _logged_to(write):
    """While the block runs, every line logged under "convmixer_tf" (at the level its loggers
    are set to) is also written by `write` (the export's log file)."""
    handler = _LineHandler(write)
    logger = logging.getLogger("convmixer_tf")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


class _LineHandler(logging.Handler):
    def __init__(self, write):
        super().__init__()
        self.write = write

    def emit(self, record):
        self.write(self.format(record))


def _prepare(model, export_dir, name, config):
    """Creates `export_dir`, removes the temp folders an interrupted export left and says
    what computes in which dtype."""
    os.makedirs(export_dir, exist_ok=True)
    stale = [path for folder in (export_dir, os.path.join(export_dir, name),
                                 os.path.join(export_dir, f"{name}_tflite"))
             for path in artifacts.remove_stale_temps(folder)]
    if stale:
        log.info("removed %d temp folder(s) an interrupted export left: %s", len(stale),
                 ", ".join(os.path.relpath(p, export_dir) for p in stale))
    dtype = compute_dtype(model, "policy")
    if dtype != "float32":
        served = (f", and the SavedModel serves float32 (serving precision 'policy' keeps "
                  f"{dtype})" if config.serving_precision == "float32"
                  else f"; the SavedModel keeps {dtype}")
        log.info("the model computes in %s: TFLite converts a float32 rebuild of it%s", dtype,
                 served)


def export_saved_model_version(model, export_dir, inputs, config):
    """The SavedModel version (`saved_model.export_saved_model`), validated on up to 8
    held-out images."""
    return saved_model.export_saved_model(
        None, export_dir, inputs.name, model=model, tolerance=config.tolerance,
        meta=inputs.metadata,
        sample_images=None if inputs.held_out is None else inputs.held_out[:8],
        serving_precision=config.serving_precision, **inputs.limits)


def export_tflite_version(model, tflite_root, inputs, config):
    """Converts, gates and writes every build into a temp folder in `tflite_root`, adds
    metadata.json (the model's metadata with the builds' report), then renames the set to
    `<tflite_root>/<next version>/` in one step. Returns the report with the published
    `version` and `path` (each build's `files` are names in that folder)."""
    held_out, gated = inputs.held_out, inputs.held_out is not None
    if not gated:
        log.info("TFLite builds not gated: no held-out images (export(held_out=...); "
                 "convmixer-export: a <name>.samples.npz or --calibration-dir)")
        held_out = np.random.default_rng(0).integers(
            0, 256, (16, *inputs.metadata.image_size, 3), dtype=np.uint8)
    with artifacts.new_version(tflite_root) as published:
        report = tflite_set.export_all(
            model, published["tmp"], inputs.name, inputs.calibration, held_out,
            inputs.metadata.image_size, eval_labels=inputs.labels, config=config, gated=gated)
        artifacts.write_json(os.path.join(published["tmp"], "metadata.json"),
                             dataclasses.replace(inputs.metadata, tflite=report).to_json())
    version, final = published["version"], published["path"]
    log.info("exported TFLite files: %s (version %d)", final, version)
    return dict(report, version=version, path=final)
