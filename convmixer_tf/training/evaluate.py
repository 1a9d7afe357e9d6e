"""Top-1 / top-5 accuracy of a saved model on a dataset's test split, preprocessed as the
model's metadata says (the same crop serving applies).

    convmixer-evaluate saved_models/convmixer_digits.keras
    from convmixer_tf.training.evaluate import evaluate_saved_model
"""

import numpy as np

from convmixer_tf import artifacts
from convmixer_tf.training import data


def top_k_accuracy(logits, labels, k):
    """Fraction of rows whose label is among the `k` largest scores."""
    k = min(k, logits.shape[-1])
    top = np.argpartition(-logits, k - 1, axis=-1)[:, :k]
    return float(np.mean(np.any(top == labels[:, None], axis=-1)))


def evaluate_saved_model(path, dataset="digits", image_size=0, batch_size=64, data_dir=None):
    """Returns dict(top1, top5, examples) of the model in `path` on `dataset`'s test split
    (any `data.build_datasets` name: digits, a prepared tfds set, an image folder);
    `image_size` 0 takes the metadata's (else the model's own) input size."""
    model = artifacts.load_model(path)
    meta = artifacts.read_metadata(model, path)
    if not image_size:
        image_size = meta["image_size"][0] if model.input_shape[1] is None else model.input_shape[1]
    # Batches of 1 here, rebatched below: build_datasets wants a full training batch, which
    # evaluation never uses (a small folder's train split may hold fewer than batch_size).
    datasets = data.build_datasets(
        dataset, image_size=image_size, global_batch_size=1, data_dir=data_dir,
        eval_crop_pct=meta["crop_pct"],
    )
    test = datasets.test.unbatch().batch(batch_size)
    if model.output_shape[-1] != datasets.num_classes:
        raise ValueError(
            f"The model has {model.output_shape[-1]} outputs but {dataset} has "
            f"{datasets.num_classes} classes"
        )
    logits, labels = [], []
    for images, one_hot in test:
        logits.append(model.predict_on_batch(images))
        labels.append(np.argmax(one_hot, axis=-1))
    logits, labels = np.concatenate(logits), np.concatenate(labels)
    return dict(
        top1=top_k_accuracy(logits, labels, 1),
        top5=top_k_accuracy(logits, labels, 5),
        examples=len(labels),
    )
