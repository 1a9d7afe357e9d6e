"""Top-k predictions for image files from a `.tflite` file (LiteRT) or a SavedModel, with the
evaluation's own preprocessing (`preprocessing`), and the latency of each.

    rows = predict.predict_files(
        "saved_models/convmixer_digits_tflite/1/convmixer_digits_float32.tflite", ["digit.png"])
"""

import json
import os
import time

import numpy as np
import tensorflow as tf

from convmixer_tf import artifacts, preprocessing
from convmixer_tf.deploy import litert, saved_model


def read_labels(path):
    """The metadata JSON beside an exported model (class names, image size, crop), or {}."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None


def softmax(logits):
    """Row-wise softmax in float64 (numerically safe for any logits)."""
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def predict_tflite(model_path, paths, top_k=3, labels=None, threads=None):
    """[dict(path, top=[(label, probability)], ms, logits)] for image files through a
    `.tflite` classifier. Images are preprocessed to the metadata's size and crop (or the
    file's fixed size)."""
    if not model_path.endswith(".tflite"):
        raise ValueError(f"{model_path}: expected a .tflite file or a SavedModel directory")
    runner = litert.LiteRTModel(model_path, num_threads=threads)
    labels_path = labels or os.path.join(os.path.dirname(model_path), "metadata.json")
    if labels and not os.path.isfile(labels):
        raise FileNotFoundError(f"no such labels file: {labels}")
    meta = read_labels(labels_path)
    size = runner.image_size or tuple(meta.get("image_size") or ()) or None
    crop_pct = float(meta.get("crop_pct", 1.0))
    images = [preprocessing.read_image_file(p) for p in paths]  # all readable before running
    rows = []
    for path, image in zip(paths, images):
        if size is not None:
            image = preprocessing.resize_centre_crop(image, size, crop_pct).numpy()
        runner.predict(image[None])  # warm-up: allocation for this size
        start = time.perf_counter()
        logits = runner.predict(image[None])[0]
        ms = 1000 * (time.perf_counter() - start)
        names = meta.get("class_names") or [str(i) for i in range(len(logits))]
        probs = softmax(logits)
        order = np.argsort(-probs)[:top_k]
        rows.append(dict(path=path, top=[(names[i], float(probs[i])) for i in order], ms=ms,
                         logits=logits))
    return rows


def predict_saved_model(model_dir, paths, top_k=3):
    """[dict(path, top=[(label, score)], ms, logits)] through the SavedModel's image-bytes
    signature (the server's own decoding and preprocessing); non-JPEG/PNG files are re-encoded
    as PNG."""
    images = [preprocessing.read_image_file(p) for p in paths]
    try:
        version_dir = artifacts.latest_version_dir(model_dir)
    except FileNotFoundError:
        raise FileNotFoundError(f"no SavedModel in {model_dir} (neither saved_model.pb nor "
                                "<version>/saved_model.pb)") from None
    signature = tf.saved_model.load(version_dir).signatures[
        saved_model.SIGNATURE_BYTES
    ]
    rows = []
    for path, image in zip(paths, images):
        with open(path, "rb") as f:
            encoded = f.read()
        if preprocessing.image_format(encoded) not in ("JPEG", "PNG"):
            encoded = saved_model.encode_png(image[None])[0]
        batch = tf.constant([encoded])
        signature(image_bytes=batch)  # warm-up
        start = time.perf_counter()
        out = signature(image_bytes=batch)
        ms = 1000 * (time.perf_counter() - start)
        labels = [c.decode() for c in out["classes"].numpy()[0]][:top_k]
        scores = out["scores"].numpy()[0][:top_k]
        rows.append(dict(path=path, top=list(zip(labels, map(float, scores))), ms=ms,
                         logits=out["logits"].numpy()[0]))
    return rows


def tflite_files(folder):
    """The .tflite files of the latest version in a `<name>_tflite/` folder (or in a version
    folder itself), sorted; [] when there are none."""
    try:
        version_dir = artifacts.latest_version_dir(folder, marker="metadata.json")
    except FileNotFoundError:
        version_dir = folder
    return sorted(os.path.join(version_dir, f) for f in os.listdir(version_dir)
                  if f.endswith(".tflite"))


def predict_files(model, paths, top_k=3, labels=None, threads=None):
    """`predict_saved_model` for a directory, `predict_tflite` for a file."""
    if os.path.isdir(model):
        found = tflite_files(model)
        if found and not os.path.isfile(os.path.join(model, "saved_model.pb")):
            raise ValueError(f"{model} is a TFLite folder: pass one of its .tflite files, "
                             f"e.g. {found[0]}")
        return predict_saved_model(model, paths, top_k)
    return predict_tflite(model, paths, top_k, labels, threads)
