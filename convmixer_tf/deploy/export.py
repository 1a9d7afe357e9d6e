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
import os
import re
import shutil
import sys

import keras
import numpy as np

from convmixer_tf import artifacts, preprocessing
from convmixer_tf.deploy import saved_model, tflite_set
from convmixer_tf.deploy.logits import check_precision, compute_dtype
from convmixer_tf.deploy.modes import DEFAULT_MODES, INT8_IO, check_modes

TFLITE_MODES = DEFAULT_MODES  # the old name of the default modes, kept for one release
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a folder name TF Serving and shells take


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


def stored_samples(model_path, meta, calibration_dir=None):
    """(calibration images, held-out images, held-out labels or None): from `calibration_dir`
    when given, else the `.samples.npz` training wrote, else (None, None, None)."""
    if calibration_dir:
        images = folder_images(calibration_dir, meta["image_size"], meta["crop_pct"])
        return images, images, None
    samples = artifacts.read_samples(model_path) if model_path else None
    if samples is None:
        return None, None, None
    return samples["calibration"], samples["held_out"], samples["held_out_labels"]


def export(model, export_dir, name=None, class_names=None, image_size=None, crop_pct=1.0,
           calibration_images=None, held_out=None, saved_model_export=True,
           tflite_modes=DEFAULT_MODES, int8_io="float32", tolerance=None,
           max_accuracy_drop=0.01, min_int8_agreement=0.98, serving_precision="float32",
           serving_limits=None, log=print):
    """Exports a Keras ConvMixer classifier in memory: `<export_dir>/<name>/<version>/` (TF
    Serving, validated in a fresh process) and `<export_dir>/<name>_tflite/<version>/` (the
    TFLite builds, each gated on `held_out`). What `convmixer-export` does for a `.keras` file.

    `name`: default `model.name`. `class_names`: default "0".."N-1". `image_size` (h, w): the
    size `serving_image_bytes` resizes to and the fixed TFLite files take; default the model's
    input size. `crop_pct`: evaluation's centre crop. `calibration_images`: uint8 0-255 training
    images [N, h, w, 3] for the full-int8 builds (without them those builds are skipped).
    `held_out`: `(images, labels)` (the gate compares held-out accuracy with the Keras model's)
    or images alone (top-1 agreement >= `min_int8_agreement`); without it the builds are
    measured on synthetic images and not gated. `max_accuracy_drop`: a fraction (0.01 = 1
    point). The TFLite builds are converted from a float32 rebuild of the model whatever its
    dtype policy; the SavedModel computes in float32 too unless `serving_precision="policy"`
    keeps the model's own (e.g. bfloat16 for a GPU server; `tolerance` then defaults to that
    dtype's, `logits.TOLERANCES`). `serving_limits`: dict(max_image_pixels=,
    max_request_pixels=), the SavedModel's pixel budgets (`saved_model.serving_limits`;
    default 40 MP per image, 4x that per request). Returns dict(saved_model=...,
    tflite=report with `version`, `path`, `refused` and `failed` builds, log=the log file); a refused or failed build is not
    written, the rest is (`convmixer-export` then exits 3). Bad arguments raise
    ValueError before any work.
    """
    model = _network(model)
    meta, modes, calibration, held_images, labels = _checked(
        model, export_dir, name, class_names, image_size, crop_pct, calibration_images,
        held_out, tflite_modes, int8_io, tolerance, max_accuracy_drop, min_int8_agreement,
        serving_precision)
    limits = saved_model.serving_limits(meta["image_size"], meta["crop_pct"],
                                        **(serving_limits or {}))  # checked before any work
    name, export_dir = name or model.name, os.fspath(export_dir)
    tflite_root = os.path.join(export_dir, f"{name}_tflite")
    os.makedirs(export_dir, exist_ok=True)
    stale = [path for folder in (export_dir, os.path.join(export_dir, name), tflite_root)
             for path in artifacts.remove_stale_temps(folder)]
    if stale:
        log(f"removed {len(stale)} temp folder(s) an interrupted export left: "
            + ", ".join(os.path.relpath(p, export_dir) for p in stale))
    dtype = compute_dtype(model, "policy")
    if dtype != "float32":
        served = (f", and the SavedModel serves float32 (serving precision 'policy' keeps "
                  f"{dtype})" if serving_precision == "float32"
                  else f"; the SavedModel keeps {dtype}")
        log(f"the model computes in {dtype}: TFLite converts a float32 rebuild of it{served}")
    log_path = os.path.join(export_dir, f"{name}.export.log")
    result = dict(log=log_path)
    work = artifacts.make_temp_dir(export_dir)
    try:
        with stderr_to(log_path) as logged, artifacts.temp_files_in(work):
            log = _tee(log, logged)
            if saved_model_export:
                result["saved_model"] = saved_model.export_saved_model(
                    None, export_dir, name, model=model, tolerance=tolerance, log=log, meta=meta,
                    sample_images=None if held_images is None else held_images[:8],
                    serving_precision=serving_precision, **limits,
                )
            if modes:
                gated = held_images is not None
                if not gated:
                    log("TFLite builds not gated: no held-out images (export(held_out=...); "
                        "convmixer-export: a <name>.samples.npz or --calibration-dir)")
                    rng = np.random.default_rng(0)
                    held_images = rng.integers(0, 256, (16, *meta["image_size"], 3),
                                               dtype=np.uint8)
                result["tflite"] = export_tflite_version(
                    model, tflite_root, name, meta, calibration, held_images, labels,
                    modes, max_accuracy_drop=max_accuracy_drop,
                    min_int8_agreement=min_int8_agreement, int8_io=int8_io, gated=gated,
                    log=log)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def _network(model):
    """The classifier a trainer wraps (`training.distribute.ReplicaTrainer` keeps it as
    `.model`), else `model`: what `make_trainer` returned can be exported as it is."""
    inner = getattr(model, "model", None)
    if (isinstance(model, keras.Model) and isinstance(inner, keras.Model)
            and "predictions" not in [layer.name for layer in model.layers]):
        return inner
    return model


def _checked(model, export_dir, name, class_names, image_size, crop_pct, calibration_images,
             held_out, tflite_modes, int8_io, tolerance, max_accuracy_drop, min_int8_agreement,
             serving_precision):
    """`export`'s arguments checked, each failure one line naming the value received; returns
    (metadata, TFLite modes, calibration uint8 images, held-out uint8 images, labels)."""
    if not isinstance(model, keras.Model):
        raise ValueError(f"`model` must be a Keras model. Received model of type "
                         f"{type(model).__name__}")
    if "predictions" not in [layer.name for layer in model.layers]:
        raise ValueError(f"`model` must be a classifier with a `predictions` layer (a "
                         f"convmixer_tf.ConvMixer with include_top=True). Received model "
                         f"{model.name!r} without one")
    if not export_dir or not isinstance(export_dir, (str, os.PathLike)):
        raise ValueError(f"`export_dir` must be a folder path. Received export_dir={export_dir!r}")
    name = model.name if name is None else name
    if not isinstance(name, str) or not NAME.match(name):
        raise ValueError(f"`name` must be a folder name (letters, digits, '.', '_', '-'). "
                         f"Received name={name!r}")
    classes = int(model.output_shape[-1])
    class_names = [str(c) for c in range(classes)] if class_names is None else \
        [str(c) for c in class_names]
    if len(class_names) != classes:
        raise ValueError(f"`class_names` must name the model's {classes} classes. Received "
                         f"{len(class_names)} names")
    model_size = tuple(model.input_shape[1:3])
    if image_size is None:
        if None in model_size:
            raise ValueError(f"the model takes any image size (input shape "
                             f"{model.input_shape}): pass image_size=(height, width), the size "
                             "it was trained at. Received image_size=None")
        image_size = model_size
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    if len(tuple(image_size)) != 2 or not all(isinstance(s, (int, np.integer)) and s > 0
                                              for s in image_size):
        raise ValueError(f"`image_size` must be (height, width) in pixels. Received "
                         f"image_size={image_size!r}")
    image_size = tuple(int(s) for s in image_size)
    if not isinstance(crop_pct, (int, float)) or not 0 < crop_pct <= 1:
        raise ValueError(f"`crop_pct` must be in (0, 1]. Received crop_pct={crop_pct!r}")
    modes = check_modes(tflite_modes)
    if int8_io not in INT8_IO:
        raise ValueError(f"`int8_io` must be one of {INT8_IO}. Received int8_io={int8_io!r}")
    check_precision(serving_precision)
    for key, value, low, high in (("tolerance", tolerance, 0, np.inf),
                                  ("max_accuracy_drop", max_accuracy_drop, 0, 1),
                                  ("min_int8_agreement", min_int8_agreement, 0, 1)):
        if key == "tolerance" and value is None:  # the default of the serving precision
            continue
        if not isinstance(value, (int, float)) or not low <= value <= high:
            raise ValueError(f"`{key}` must be a number in [{low}, {high}]. Received "
                             f"{key}={value!r}")
    calibration = None if calibration_images is None else _pixels(
        "calibration_images", calibration_images)
    images = labels = None
    if held_out is not None:
        pair = isinstance(held_out, tuple) and len(held_out) == 2
        images, labels = held_out if pair else (held_out, None)
        images = _pixels("held_out images", images)
        if tuple(images.shape[1:3]) != image_size:
            raise ValueError(f"`held_out` images must be {image_size[0]}x{image_size[1]} (the "
                             f"image_size). Received shape {images.shape}")
        if labels is not None:
            labels = np.asarray(labels).reshape(-1)
            if (len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer)
                    or labels.min() < 0 or labels.max() >= classes):
                raise ValueError(f"`held_out` labels must be {len(images)} class ids in [0, "
                                 f"{classes}). Received {len(labels)} labels of dtype "
                                 f"{labels.dtype}" + (f", in [{labels.min()}, {labels.max()}]"
                                                      if len(labels) else ""))
    meta = dict(class_names=class_names, image_size=[int(s) for s in image_size],
                crop_pct=float(crop_pct))
    return meta, modes, calibration, images, labels


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


def _tee(log, logged):
    def both(line):
        logged(line)
        log(line)
    return both


def export_model(model_path, export_dir=None, name=None, saved_model_export=True,
                 tflite_modes=DEFAULT_MODES, calibration_dir=None, int8_io="float32",
                 tolerance=None, max_accuracy_drop=0.01, min_int8_agreement=0.98,
                 log=print, serving_precision="float32", serving_limits=None):
    """`export` of a trained-model file set: `model_path` (a `.keras` file) with its metadata
    (`<name>.json`: class names, image size, crop) and samples (`<name>.samples.npz`:
    calibration and labelled held-out images, or the images in `calibration_dir`), to
    `export_dir` (default: the model's folder) under `name` (default: the file name).

    Each version is written into a `.tmp-<pid>-*` folder and renamed into place only when
    complete and validated, so a kill at any point leaves the published versions as they were
    and no partial one. The job's scratch (converter, validation) lives in
    `<export_dir>/.tmp-<pid>-*/`. Temp folders a killed run left are removed when the next
    export starts, and this run's own are removed when it ends, failed or not."""
    check_precision(serving_precision)  # before any long work
    model = artifacts.load_model(model_path)
    meta = artifacts.read_metadata(model, model_path)
    calibration, held_out, labels = stored_samples(model_path, meta, calibration_dir)
    return export(
        model, export_dir or os.path.dirname(os.path.abspath(model_path)),
        name or os.path.splitext(os.path.basename(model_path))[0],
        class_names=meta["class_names"], image_size=meta["image_size"],
        crop_pct=meta["crop_pct"], calibration_images=calibration,
        held_out=None if held_out is None else (held_out, labels),
        saved_model_export=saved_model_export, tflite_modes=tflite_modes, int8_io=int8_io,
        tolerance=tolerance, max_accuracy_drop=max_accuracy_drop,
        min_int8_agreement=min_int8_agreement, serving_precision=serving_precision,
        serving_limits=serving_limits, log=log)


def export_tflite_version(model, tflite_root, name, meta, calibration, held_out, labels, modes,
                          max_accuracy_drop=0.01, min_int8_agreement=0.98, int8_io="float32",
                          gated=True, log=print):
    """Converts, gates and writes every build into a temp folder in `tflite_root`, adds
    metadata.json (with the builds' report), then renames the set to
    `<tflite_root>/<next version>/` in one step. Returns the report with the published
    `version` and `path` (each build's `files` are names in that folder)."""
    with artifacts.new_version(tflite_root) as published:
        report = tflite_set.export_all(
            model, published["tmp"], name, calibration, held_out, meta["image_size"],
            eval_labels=labels, modes=modes, max_accuracy_drop=max_accuracy_drop,
            min_int8_agreement=min_int8_agreement, int8_io=int8_io, log=log, gated=gated,
        )
        artifacts.write_json(os.path.join(published["tmp"], "metadata.json"), dict(
            class_names=meta["class_names"], image_size=meta["image_size"],
            crop_pct=meta["crop_pct"], tflite=report,
        ))
    version, final = published["version"], published["path"]
    log(f"exported TFLite files: {final} (version {version})")
    return dict(report, version=version, path=final)
