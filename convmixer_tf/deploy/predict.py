"""Top-k predictions for image files from a `.tflite` file (LiteRT) or a SavedModel, with the
evaluation's own preprocessing (`preprocessing`), and the latency of each.

    rows = predict.predict_files(
        "saved_models/convmixer_digits_tflite/1/convmixer_digits_float32.tflite", ["digit.png"],
        PredictConfig(top_k=5))
"""

import os
import time

import numpy as np
import tensorflow as tf

from convmixer_tf import artifacts, preprocessing
from convmixer_tf.deploy import litert, saved_model
from convmixer_tf.deploy.config import PredictConfig


def softmax(logits):
    """Row-wise softmax in float64 (numerically safe for any logits)."""
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def predict_tflite(model_path, paths, config):
    """[dict(path, top=[(label, probability)], ms, logits)] for image files through a
    `.tflite` classifier. Images are preprocessed to the metadata's size and crop (the
    `config.labels` file, else the metadata.json beside the file; the file's fixed size wins);
    without metadata, labels are "0".."N-1" and images go in as they are."""
    if not model_path.endswith(".tflite"):
        raise ValueError(f"{model_path}: expected a .tflite file or a SavedModel directory")
    runner = litert.LiteRTModel(model_path, num_threads=config.threads or None)
    labels_path = config.labels or os.path.join(os.path.dirname(model_path), "metadata.json")
    if config.labels and not os.path.isfile(config.labels):
        raise FileNotFoundError(f"no such labels file: {config.labels}")
    meta = artifacts.load_metadata(labels_path) if os.path.isfile(labels_path) else None
    size = runner.image_size or (meta and meta.image_size)
    crop_pct = meta.crop_pct if meta else 1.0
    images = [preprocessing.read_image_file(p) for p in paths]  # all readable before running
    rows = []
    for path, image in zip(paths, images):
        if size is not None:
            image = preprocessing.resize_centre_crop(image, size, crop_pct).numpy()
        runner.predict(image[None])  # warm-up: allocation for this size
        start = time.perf_counter()
        logits = runner.predict(image[None])[0]
        ms = 1000 * (time.perf_counter() - start)
        names = meta.class_names if meta else [str(i) for i in range(len(logits))]
        probs = softmax(logits)
        order = np.argsort(-probs)[:config.top_k]
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


def predict_files(model, paths, config=None):
    """`predict_saved_model` for a directory, `predict_tflite` for a file; `config`: a
    `PredictConfig` (default: top 3)."""
    config = config or PredictConfig()
    if os.path.isdir(model):
        found = tflite_files(model)
        if found and not os.path.isfile(os.path.join(model, "saved_model.pb")):
            raise ValueError(f"{model} is a TFLite folder: pass one of its .tflite files, "
                             f"e.g. {found[0]}")
        return predict_saved_model(model, paths, config.top_k)
    return predict_tflite(model, paths, config)
