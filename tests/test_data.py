import os
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from convmixer_tf.training import augment, data
from convmixer_tf.training.config import AugmentConfig, TrainConfig
from convmixer_tf.training.train import train

COLOURS = {"cat": (200, 30, 30), "dog": (30, 200, 30), "emu": (30, 30, 200)}


def _write_folder(root, per_class=5, formats=("png", "jpg", "bmp", "gif", "png")):
    """root/<class>/<i>.<fmt>: solid-colour images of varied sizes, one colour per class."""
    for name, colour in COLOURS.items():
        os.makedirs(root / name, exist_ok=True)
        for i in range(per_class):
            size = (20 + 3 * i, 16 + 2 * i)
            Image.new("RGB", size, colour).save(root / name / f"{i}.{formats[i % len(formats)]}")
    (root / "cat" / "notes.txt").write_text("not an image, ignored")
    return root


def _all(ds):
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
    return np.concatenate(xs), np.concatenate(ys)


def test_image_folder_classes_splits_shapes_and_labels(tmp_path):
    root = _write_folder(tmp_path / "pets")
    ds = data.build_datasets(f"folder:{root}", image_size=16, global_batch_size=4,
                             validation_split=0.2)
    assert ds.class_names == ("cat", "dog", "emu") and ds.num_classes == 3
    assert (ds.train_size, ds.test_size) == (12, 3)  # one image per class held out
    assert ds.steps_per_epoch == 3
    batches = list(ds.train)
    assert len(batches) == 3  # drop_remainder: every batch full
    for x, y in batches:
        assert x.shape == (4, 16, 16, 3) and y.shape == (4, 3) and y.dtype == tf.float32
    x_test, y_test = _all(ds.test)
    assert x_test.shape == (3, 16, 16, 3)
    # Labels line up with pixels: each image is its class's colour after resize + crop.
    for image, label in zip(x_test, y_test):
        np.testing.assert_allclose(image[8, 8], COLOURS[ds.class_names[label.argmax()]], atol=3)
    np.testing.assert_array_equal(y_test.sum(1), 1)


def test_image_folder_with_train_and_val_folders(tmp_path):
    _write_folder(tmp_path / "train", per_class=4)
    _write_folder(tmp_path / "val", per_class=2)
    ds = data.build_datasets(str(tmp_path), image_size=8, global_batch_size=4)
    assert (ds.train_size, ds.test_size) == (12, 6)


def test_image_folder_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        data.build_datasets(f"folder:{tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="at least 2 classes"):
        data.build_datasets(f"folder:{tmp_path / 'empty'}")
    one = tmp_path / "one" / "cat"
    one.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(one / "a.png")
    with pytest.raises(ValueError, match="at least 2 classes"):
        data.build_datasets(f"folder:{tmp_path / 'one'}")
    root = _write_folder(tmp_path / "broken")
    (root / "dog" / "bad.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(ValueError, match="bad.jpg"):
        data.build_datasets(f"folder:{root}", global_batch_size=2)
    (root / "dog" / "bad.jpg").unlink()
    (root / "emu" / "gone").mkdir()
    os.rename(root / "emu", root / "emu_old")
    (root / "emu").mkdir()
    with pytest.raises(ValueError, match="without images.*emu"):
        data.build_datasets(f"folder:{root}", global_batch_size=2)


class ConvmixerTestShapes(tfds.core.GeneratorBasedBuilder):
    """A tiny real tfds data set (numpy images), prepared offline into a temp data_dir. Its
    feature names are not image/label and it has no supervised keys and no test split."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "picture": tfds.features.Image(shape=(None, None, 3)),
                "note": tfds.features.Text(),
                "kind": tfds.features.ClassLabel(names=["dark", "light"]),
            }),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(20), "validation": self._generate_examples(6)}

    def _generate_examples(self, n):
        for i in range(n):
            kind = i % 2
            image = np.full((10 + i, 12, 3), 40 + 170 * kind, np.uint8)
            yield i, {"picture": image, "note": f"#{i}", "kind": kind}


def test_tfds_builder_prepared_offline_loads(tmp_path):
    ConvmixerTestShapes(data_dir=str(tmp_path)).download_and_prepare()
    ds = data.build_datasets("tfds:convmixer_test_shapes", image_size=8, global_batch_size=4,
                             data_dir=str(tmp_path))
    assert ds.class_names == ("dark", "light")
    assert (ds.train_size, ds.test_size, ds.steps_per_epoch) == (20, 6, 5)
    x, y = _all(ds.train)
    assert x.shape == (20, 8, 8, 3) and y.shape == (20, 2)
    np.testing.assert_allclose(x[:, 4, 4, 0], np.where(y[:, 1] == 1, 210, 40), atol=2)
    x_test, y_test = _all(ds.test)
    assert x_test.shape == (6, 8, 8, 3) and y_test.sum() == 6


def test_tfds_not_available_offline_fails_fast_and_clearly(tmp_path):
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match="not prepared.*never downloads.*tfds build"):
        data.build_datasets("cifar10", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="manual download"):
        data.build_datasets("tfds:imagenet2012", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="Unknown dataset 'no_such_set_xyz'"):
        data.build_datasets("no_such_set_xyz", data_dir=str(tmp_path))
    assert time.monotonic() - start < 20
    assert not any(tmp_path.iterdir())  # nothing downloaded or created


def test_digits_build_datasets_shapes_batches_and_determinism():
    ds = data.build_datasets("digits", image_size=16, global_batch_size=64)
    assert (ds.train_size, ds.test_size, ds.steps_per_epoch) == (1438, 359, 22)
    batches = list(ds.train)
    assert len(batches) == 22
    x, y = batches[0]
    assert x.dtype == tf.uint8 and x.shape == (64, 16, 16, 3)  # no augmentation: raw pixels
    np.testing.assert_array_equal(y.numpy().sum(1), 1)
    assert sum(len(b[0]) for b in ds.test) == 359  # test keeps its last partial batch
    with pytest.raises(ValueError, match="larger than the training set"):
        data.build_datasets("digits", global_batch_size=4096)

    config = AugmentConfig(crop_scale=0.35, hflip=0.5, randaug_n=2,
                                   erase_prob=0.25, mixup=0.8, cutmix=1.0)

    def first(seed):
        built = data.build_datasets("digits", 16, 32, augment=config, seed=seed)
        return [b for b in built.train.take(2)]

    a, b, c = first(0), first(0), first(1)
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert not np.array_equal(a[0][0], c[0][0])
    xa, ya = a[0]
    assert xa.dtype == tf.float32 and float(tf.reduce_max(xa)) <= 255
    np.testing.assert_allclose(ya.numpy().sum(1), 1, atol=1e-6)


def test_train_with_augmentation_and_a_folder(tmp_path):
    root = _write_folder(tmp_path / "pets", per_class=6)
    result = train(TrainConfig(
        dataset=str(root), image_size=16, dim=16, depth=1, epochs=2, batch_size=4,
        hflip=0.5, randaug_n=1, mixup=0.2, erase_prob=0.5, crop_scale=0.5,
        output_dir=str(tmp_path / "out"), verbose=0,
    ))
    assert result["model"].output_shape == (None, 3)
    assert len(result["history"].history["loss"]) == 2
    assert os.path.exists(result["model_path"])
