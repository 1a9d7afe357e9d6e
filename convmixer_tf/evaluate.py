"""Top-1 / top-5 accuracy of a saved model on a dataset's test split.

    convmixer-evaluate saved_models/convmixer_digits.keras     # or python -m convmixer_tf.evaluate
    from convmixer_tf.evaluate import evaluate_saved_model
"""

import os
import sys
import zipfile

import numpy as np


def load_saved_model(path):
    """`keras.saving.load_model` with clear errors for a missing or damaged file."""
    import keras

    if not os.path.isfile(path):
        raise FileNotFoundError(f"No model file at {path!r}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path!r} is not a .keras model file (not a zip archive): damaged?")
    try:
        return keras.saving.load_model(path)
    except Exception as error:  # Keras raises many types for damaged archives
        raise ValueError(f"Cannot load the model in {path!r}: {error}") from error


def top_k_accuracy(logits, labels, k):
    """Fraction of rows whose label is among the `k` largest scores."""
    k = min(k, logits.shape[-1])
    top = np.argpartition(-logits, k - 1, axis=-1)[:, :k]
    return float(np.mean(np.any(top == labels[:, None], axis=-1)))


def test_split(dataset, image_size, seed=0):
    """`(images, labels)` of `dataset`'s test split (uint8 pixels, int labels)."""
    from convmixer_tf import data

    if dataset != "digits":
        raise ValueError(f"Unknown dataset. Received dataset={dataset!r}")
    _, (x_test, y_test) = data.load_digits(image_size, seed=seed)
    return x_test, y_test


def evaluate_saved_model(path, dataset="digits", image_size=0, batch_size=64):
    """Returns dict(top1, top5, examples) of the model in `path` on `dataset`'s test split;
    `image_size` 0 takes the model's own input size."""
    model = load_saved_model(path)
    if not image_size:
        image_size = model.input_shape[1]
        if image_size is None:
            raise ValueError("The model accepts any image size: pass --image-size")
    images, labels = test_split(dataset, image_size)
    logits = model.predict(images, batch_size=batch_size, verbose=0)
    if logits.shape[-1] <= int(labels.max()):
        raise ValueError(
            f"The model has {logits.shape[-1]} outputs but {dataset} has label {labels.max()}"
        )
    return dict(
        top1=top_k_accuracy(logits, labels, 1),
        top5=top_k_accuracy(logits, labels, 5),
        examples=len(labels),
    )


if __name__ == "__main__":
    from convmixer_tf.cli import evaluate_main

    sys.exit(evaluate_main())
