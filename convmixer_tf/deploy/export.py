"""The export job: a trained-model file set (`artifacts`) -> a new TF Serving SavedModel version
and a new version of the TFLite set, each validated against the Keras model and renamed into
place whole, so a kill never leaves a partial or mixed version.

    from convmixer_tf.deploy import export
    export.export_model("saved_models/convmixer_digits.keras")
"""

import os
import shutil

import numpy as np

from convmixer_tf import artifacts, preprocessing
from convmixer_tf.deploy import saved_model, tflite

TFLITE_MODES = ("float32", "float16", tflite.EDGE_BUILD)  # int8: every int8 build + the edge build


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


def sample_images(model_path, meta, calibration_dir=None):
    """(calibration images, held-out images, held-out labels or None): from `calibration_dir`
    when given, else the `.samples.npz` training wrote, else (None, None, None)."""
    if calibration_dir:
        images = folder_images(calibration_dir, meta["image_size"], meta["crop_pct"])
        return images, images, None
    samples = artifacts.read_samples(model_path) if model_path else None
    if samples is None:
        return None, None, None
    return samples["calibration"], samples["held_out"], samples["held_out_labels"]


def export_model(model_path, export_dir=None, name=None, saved_model_export=True,
                 tflite_modes=TFLITE_MODES, calibration_dir=None, int8_io="float32",
                 tolerance=saved_model.TOLERANCE, max_accuracy_drop=0.01, min_int8_agreement=0.98,
                 log=print, serving_limits=None):
    """Exports `model_path` (a `.keras` file with its metadata and samples) to `export_dir`
    (default: the model's folder) as `<name>/<version>/` (TF Serving) and
    `<name>_tflite/<version>/` (the TFLite files and their metadata.json); returns
    dict(saved_model=..., tflite=report + version, path). TFLite builds the gate refuses are
    listed in `report["refused"]` (the rest is written; `tflite.REFUSED_EXIT_CODE` for a
    command). `serving_limits`: dict(max_image_pixels=, max_request_pixels=) for the
    SavedModel (`saved_model.serving_limits`; default 40 MP per image, 4x per request).

    Each version is written into a `.tmp-<pid>-*` folder and renamed into place only when
    complete and validated, so a kill at any point leaves the published versions as they were
    and no partial one. The job's scratch (converter, validation) lives in
    `<export_dir>/.tmp-<pid>-*/`. Temp folders a killed run left are removed when the next
    export starts, and this run's own are removed when it ends, failed or not."""
    model = artifacts.load_model(model_path)
    meta = artifacts.read_metadata(model, model_path)
    name = name or os.path.splitext(os.path.basename(model_path))[0]
    export_dir = export_dir or os.path.dirname(os.path.abspath(model_path))
    tflite_root = os.path.join(export_dir, f"{name}_tflite")
    stale = [path for folder in (export_dir, os.path.join(export_dir, name), tflite_root)
             for path in artifacts.remove_stale_temps(folder)]
    if stale:
        log(f"removed {len(stale)} temp folder(s) an interrupted export left: "
            + ", ".join(os.path.relpath(p, export_dir) for p in stale))
    calibration, held_out, labels = sample_images(model_path, meta, calibration_dir)
    result = {}
    work = artifacts.make_temp_dir(export_dir)
    try:
        with artifacts.temp_files_in(work):
            if saved_model_export:
                result["saved_model"] = saved_model.export_saved_model(
                    model_path, export_dir, name, model=model, tolerance=tolerance, log=log,
                    sample_images=None if held_out is None else held_out[:8],
                    **(serving_limits or {}),
                )
            modes = list(tflite_modes)
            if modes:
                gated = held_out is not None
                if not gated:
                    log("TFLite builds not gated: no held-out images (no <name>.samples.npz "
                        "beside the model; pass --calibration-dir)")
                    rng = np.random.default_rng(0)
                    held_out = rng.integers(0, 256, (16, *meta["image_size"], 3), dtype=np.uint8)
                result["tflite"] = export_tflite_version(
                    model, tflite_root, name, meta, calibration, held_out, labels, modes,
                    max_accuracy_drop=max_accuracy_drop, min_int8_agreement=min_int8_agreement,
                    int8_io=int8_io, gated=gated, log=log)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result


def export_tflite_version(model, tflite_root, name, meta, calibration, held_out, labels, modes,
                          max_accuracy_drop=0.01, min_int8_agreement=0.98, int8_io="float32",
                          gated=True, log=print):
    """Converts, gates and writes every build into a temp folder in `tflite_root`, adds
    metadata.json (with the builds' report), then renames the set to
    `<tflite_root>/<next version>/` in one step. Returns the report with the published
    `version` and `path` (each build's `files` are names in that folder)."""
    with artifacts.new_version(tflite_root) as published:
        report = tflite.export_all(
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
