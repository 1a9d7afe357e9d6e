"""Input pipelines. The offline default: scikit-learn's handwritten digits, upscaled to RGB."""

import numpy as np
import tensorflow as tf

DIGITS_CLASS_NAMES = tuple(str(i) for i in range(10))


def load_digits(image_size=32, test_fraction=0.2, seed=0):
    """Returns `((x_train, y_train), (x_test, y_test))`: uint8 RGB images and int labels.

    The 1,797 8x8 digits that ship inside scikit-learn (no download), resized bilinearly to
    `image_size` and scaled from 0-16 to 0-255, so they look like ordinary camera pixels.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = digits.images.astype("float32")[..., None] * (255.0 / 16.0)
    images = tf.image.resize(images, (image_size, image_size), method="bilinear").numpy()
    images = np.repeat(np.clip(np.round(images), 0, 255).astype("uint8"), 3, axis=-1)
    labels = digits.target.astype("int32")

    order = np.random.default_rng(seed).permutation(len(labels))
    n_test = int(round(len(labels) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return (images[train], labels[train]), (images[test], labels[test])


def make_dataset(images, labels, batch_size, training, num_classes, seed=0):
    """A batched `tf.data` pipeline of (uint8 images, one-hot labels), shuffled when training."""
    ds = tf.data.Dataset.from_tensor_slices((images, labels))
    if training:
        ds = ds.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, drop_remainder=training)
    ds = ds.map(
        lambda x, y: (x, tf.one_hot(y, num_classes)), num_parallel_calls=tf.data.AUTOTUNE
    )
    return ds.prefetch(tf.data.AUTOTUNE)
