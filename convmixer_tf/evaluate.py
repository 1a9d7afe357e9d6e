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


def evaluate_saved_model(path, dataset="digits", image_size=0, batch_size=64, data_dir=None):
    """Returns dict(top1, top5, examples) of the model in `path` on `dataset`'s test split
    (any `data.build_datasets` name: digits, a prepared tfds set, an image folder);
    `image_size` 0 takes the model's own input size."""
    from convmixer_tf import data

    model = load_saved_model(path)
    if not image_size:
        image_size = model.input_shape[1]
        if image_size is None:
            raise ValueError("The model accepts any image size: pass --image-size")
    datasets = data.build_datasets(
        dataset, image_size=image_size, global_batch_size=batch_size, data_dir=data_dir
    )
    if model.output_shape[-1] != datasets.num_classes:
        raise ValueError(
            f"The model has {model.output_shape[-1]} outputs but {dataset} has "
            f"{datasets.num_classes} classes"
        )
    logits, labels = [], []
    for images, one_hot in datasets.test:
        logits.append(model.predict_on_batch(images))
        labels.append(np.argmax(one_hot, axis=-1))
    logits, labels = np.concatenate(logits), np.concatenate(labels)
    return dict(
        top1=top_k_accuracy(logits, labels, 1),
        top5=top_k_accuracy(logits, labels, 5),
        examples=len(labels),
    )


if __name__ == "__main__":
    from convmixer_tf.cli import evaluate_main

    sys.exit(evaluate_main())
