"""ImageNet-1k class names and `decode_predictions`, offline (the names ship with the package).

`imagenet_class_names.json` lists the 1000 ILSVRC-2012 classes in the output order of the
official and timm checkpoints: WordNet ids from tensorflow_datasets, names from WordNet 3.0
(see scripts/make_imagenet_class_names.py for how it was made and the WordNet notice).
"""

import functools
import json
import os

import numpy as np

CLASS_NAMES_PATH = os.path.join(os.path.dirname(__file__), "imagenet_class_names.json")
NUM_CLASSES = 1000


@functools.cache
def imagenet_classes():
    """The 1000 classes as a tuple of `(wnid, name, all_lemmas)`, in output order."""
    with open(CLASS_NAMES_PATH, encoding="utf-8") as f:
        classes = tuple(tuple(entry) for entry in json.load(f)["classes"])
    if len(classes) != NUM_CLASSES:
        raise ValueError(f"{CLASS_NAMES_PATH} holds {len(classes)} classes, expected 1000")
    return classes


def decode_predictions(preds, top=5):
    """Decodes ImageNet predictions like `keras.applications.*.decode_predictions`.

    Args:
        preds: array-like `(batch, 1000)` of probabilities or logits (ranking is the same).
        top: how many classes to return per image.

    Returns:
        One list per image of `(wnid, name, score)` tuples, best first.
    """
    preds = np.asarray(keras_to_numpy(preds))
    if preds.ndim != 2 or preds.shape[1] != NUM_CLASSES:
        raise ValueError(
            "`decode_predictions` expects a batch of ImageNet predictions, shape "
            f"(samples, {NUM_CLASSES}). Received preds.shape={preds.shape}"
        )
    if not isinstance(top, int) or isinstance(top, bool) or not 1 <= top <= NUM_CLASSES:
        raise ValueError(f"`top` must be an integer in [1, {NUM_CLASSES}]. Received top={top!r}")
    classes = imagenet_classes()
    results = []
    for row in preds:
        best = np.argsort(-row, kind="stable")[:top]
        results.append([(classes[i][0], classes[i][1], float(row[i])) for i in best])
    return results


def keras_to_numpy(x):
    """Accepts numpy arrays, lists and backend tensors alike."""
    return x.numpy() if hasattr(x, "numpy") else x
