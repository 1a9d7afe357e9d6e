import logging
import os
import re
import tempfile
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from convmixer_tf.training.data import pipeline, sources
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
    ds = pipeline.build_datasets(f"folder:{root}", image_size=16, global_batch_size=4,
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
    ds = pipeline.build_datasets(str(tmp_path), image_size=8, global_batch_size=4)
    assert (ds.train_size, ds.test_size) == (12, 6)


def test_image_folder_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        pipeline.build_datasets(f"folder:{tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="at least 2 classes"):
        pipeline.build_datasets(f"folder:{tmp_path / 'empty'}")
    one = tmp_path / "one" / "cat"
    one.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(one / "a.png")
    with pytest.raises(ValueError, match="at least 2 classes"):
        pipeline.build_datasets(f"folder:{tmp_path / 'one'}")
    root = _write_folder(tmp_path / "broken")
    (root / "dog" / "bad.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(ValueError, match="(?s)--strict-images.*bad.jpg"):
        pipeline.build_datasets(f"folder:{root}", global_batch_size=2, strict_images=True)
    (root / "dog" / "bad.jpg").unlink()
    (root / "emu" / "gone").mkdir()
    os.rename(root / "emu", root / "emu_old")
    (root / "emu").mkdir()
    with pytest.raises(ValueError, match="without images.*emu"):
        pipeline.build_datasets(f"folder:{root}", global_batch_size=2)


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
    ds = pipeline.build_datasets("tfds:convmixer_test_shapes", image_size=8, global_batch_size=4,
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
        pipeline.build_datasets("cifar10", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="manual download"):
        pipeline.build_datasets("tfds:imagenet2012", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="Unknown dataset 'no_such_set_xyz'"):
        pipeline.build_datasets("no_such_set_xyz", data_dir=str(tmp_path))
    assert time.monotonic() - start < 20
    assert not any(tmp_path.iterdir())  # nothing downloaded or created


@pytest.mark.parametrize("cache,crop", [("off", 0.0), ("off", 0.5), ("memory", 0.0),
                                        ("memory", 0.5)])
def test_unreadable_images_are_skipped_and_named(tmp_path, cache, crop, caplog):
    """Without --strict-images a broken file costs nothing up front: the stream and the cache
    (while it fills and after) skip it and name it after the epoch (SkippedImages); the cache's
    fill names it once more when it ends. With a random-resized crop the stream decodes a
    JPEG's crop window only, inside the same validity check."""
    _write_folder(tmp_path / "train", per_class=4)
    _write_folder(tmp_path / "val", per_class=1)
    (tmp_path / "train" / "dog" / "bad.jpg").write_bytes(b"this is not a jpeg")
    (tmp_path / "train" / "emu" / "cut.png").write_bytes(
        (tmp_path / "train" / "emu" / "0.png").read_bytes()[:40])  # truncated
    caplog.set_level(logging.INFO, logger="convmixer_tf")
    ds = pipeline.build_datasets(str(tmp_path), image_size=8, global_batch_size=2, cache=cache,
                                 augment=AugmentConfig(crop_scale=crop))
    assert ds.train_size == 14
    seen = sum(len(x) for x, _ in ds.train.take(6))
    assert seen == 12
    # One batch into epoch 2: the filter has passed every file of epoch 1 (a broken file
    # after epoch 1's last good one is otherwise met only if prefetching got there).
    next(iter(ds.train_stream().skip(6)))
    pipeline.SkippedImages(ds).on_epoch_end(0)
    # At least epoch 1's two; prefetching may already have met later epochs' copies of them.
    skipped = re.search(r"Epoch 1: skipped (\d+) unreadable image\(s\)", caplog.text)
    assert skipped and int(skipped.group(1)) >= 2, caplog.text
    ds.wait_for_cache()
    if cache == "memory":
        assert "Skipped 2 unreadable train image(s)" in caplog.text
    assert "bad.jpg" in caplog.text and "cut.png" in caplog.text


def test_digits_build_datasets_shapes_batches_and_determinism():
    ds = pipeline.build_datasets("digits", image_size=16, global_batch_size=64)
    assert (ds.train_size, ds.test_size, ds.steps_per_epoch) == (1438, 359, 22)
    batches = list(ds.train)
    assert len(batches) == 22
    x, y = batches[0]
    assert x.dtype == tf.uint8 and x.shape == (64, 16, 16, 3)  # no augmentation: raw pixels
    np.testing.assert_array_equal(y.numpy().sum(1), 1)
    assert sum(len(b[0]) for b in ds.test) == 359  # test keeps its last partial batch
    with pytest.raises(ValueError, match="larger than the training set"):
        pipeline.build_datasets("digits", global_batch_size=4096)

    config = AugmentConfig(crop_scale=0.35, hflip=0.5, randaug_n=2,
                                   erase_prob=0.25, mixup=0.8, cutmix=1.0)

    def first(seed):
        built = pipeline.build_datasets("digits", 16, 32, augment=config, seed=seed)
        return [b for b in built.train.take(2)]

    a, b, c = first(0), first(0), first(1)
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert not np.array_equal(a[0][0], c[0][0])
    xa, ya = a[0]
    assert xa.dtype == tf.float32 and float(tf.reduce_max(xa)) <= 255
    np.testing.assert_allclose(ya.numpy().sum(1), 1, atol=1e-6)


def test_train_with_augmentation_and_a_folder(tmp_path, caplog):
    root = _write_folder(tmp_path / "pets", per_class=6)
    caplog.set_level(logging.INFO, logger="convmixer_tf")
    result = train(TrainConfig(
        dataset=str(root), image_size=16, dim=16, depth=1, epochs=2, batch_size=4,
        augment=AugmentConfig(hflip=0.5, randaug_n=1, mixup=0.2, erase_prob=0.5,
                              crop_scale=0.5),
        output_dir=str(tmp_path / "out"), run_dir=str(tmp_path / "runs"), verbose=0,
    ))
    assert result["model"].output_shape == (None, 3)
    assert len(result["history"].history["loss"]) == 2
    assert os.path.exists(result["model_path"])
    out = caplog.text
    assert "Decoded 15 train images once" in out and "Input pipeline:" in out


# ---------------------------------------------------------------- shuffling at any size

CLASSES, PER_CLASS, BATCH = 10, 300, 60  # 3,000 files, class-sorted on disk
CHI2_P = 0.001  # the uniformity bound's p-value


def _chi2_bound(classes=CLASSES):
    from scipy import stats

    return stats.chi2.ppf(1 - CHI2_P, classes - 1)


def _chi2(labels, classes=CLASSES):
    """Pearson's chi-square statistic of `labels` against a uniform class distribution."""
    counts = np.bincount(labels, minlength=classes)
    expected = len(labels) / classes
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.fixture(scope="module")
def sorted_folder(tmp_path_factory):
    """root/c0..c9/00000.png ...: 4x4 PNGs whose pixel (0, 0) encodes the file's number (R, G)
    and class (B), so every image read back names its file."""
    root = tmp_path_factory.mktemp("sorted") / "images"
    for label in range(CLASSES):
        os.makedirs(root / f"c{label}")
        for i in range(PER_CLASS):
            number = label * PER_CLASS + i
            image = np.zeros((4, 4, 3), np.uint8)
            image[0, 0] = (number // 256, number % 256, label)
            Image.fromarray(image).save(root / f"c{label}" / f"{i:05d}.png")
    os.makedirs(root.parent / "test" / "c0")  # a train/test layout: all 3,000 files train
    for label in range(CLASSES):
        os.makedirs(root.parent / "test" / f"c{label}", exist_ok=True)
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root.parent / "test" / f"c{label}"
                                                              / "0.png")
    os.rename(root, root.parent / "train")
    return root.parent


def _epoch(ds):
    """(file numbers, labels) of one pass over a train pipeline of the sorted folder."""
    numbers, labels = [], []
    for x, y in ds:
        pixel = x.numpy()[:, 0, 0].astype(int)
        numbers.append(pixel[:, 0] * 256 + pixel[:, 1])
        labels.append(y.numpy().argmax(1))
        np.testing.assert_array_equal(pixel[:, 2], labels[-1])  # label matches its image
    return np.concatenate(numbers), np.concatenate(labels)


@pytest.mark.parametrize("cache", ["auto", "off"])  # "disk": the same reads (test below)
def test_folder_epochs_are_full_uniform_shuffles(sorted_folder, cache, tmp_path):
    def build(seed):
        return pipeline.build_datasets(str(sorted_folder), image_size=4, global_batch_size=BATCH,
                                       seed=seed, cache=cache, cache_dir=str(tmp_path))

    ds = build(seed=0)
    assert (ds.train_size, ds.steps_per_epoch) == (CLASSES * PER_CLASS, 50)
    first, first_labels = _epoch(ds.train)
    ds.epoch.assign(1)  # what EpochKey does when fit starts at (or resumes) epoch 1
    second, second_labels = _epoch(ds.train)
    bound = _chi2_bound()
    for numbers, labels in ((first, first_labels), (second, second_labels)):
        # Every file exactly once per epoch ...
        np.testing.assert_array_equal(np.sort(numbers), np.arange(CLASSES * PER_CLASS))
        # ... and the head of the epoch (what --steps-per-epoch 5 trains on) is uniform.
        head = labels[:5 * BATCH]
        assert _chi2(head) < bound, (np.bincount(head, minlength=CLASSES), _chi2(head), bound)
    assert not np.array_equal(first, second)  # reshuffled each epoch
    ds.epoch.assign(0)  # keyed by (seed, epoch): epoch 0 again reads epoch 0's order
    np.testing.assert_array_equal(_epoch(ds.train)[0], first)
    # The calibration sample is uniform too (int8 calibration takes its first images).
    calibration = np.concatenate([y.numpy().argmax(1) for _, y in ds.calibration.take(5)])
    assert _chi2(calibration) < bound
    if cache == "auto":
        np.testing.assert_array_equal(first, _epoch(build(seed=0).train)[0])  # same seed
        assert not np.array_equal(first, _epoch(build(seed=1).train)[0])


def test_epoch_heads_follow_the_chi_square_law_over_many_epochs():
    """Beyond one head: over 100 epochs of `epoch_order` on a class-sorted list, the heads'
    statistics behave as uniform samples drawn without replacement should (mean 9 x 0.9 = 8.1,
    ~4% above the p = 0.05 bound; a broken permutation shifts both)."""
    from scipy import stats

    labels = np.repeat(np.arange(CLASSES), PER_CLASS)
    values = np.array([
        _chi2(labels[next(iter(pipeline.epoch_order(CLASSES * PER_CLASS, 0, epoch).batch(
            5 * BATCH))).numpy()]) for epoch in range(100)])
    assert abs(values.mean() - 8.1) < 1.5, values.mean()
    assert (values > stats.chi2.ppf(0.95, CLASSES - 1)).mean() < 0.1


def test_the_uniformity_bound_catches_a_buffered_shuffle():
    """Control: the chi-square check fails the old pipeline (a shuffle buffer smaller than a
    class-sorted list), so passing it above means something."""
    sorted_labels = np.repeat(np.arange(CLASSES), PER_CLASS)
    shuffled = tf.data.Dataset.from_tensor_slices(sorted_labels).shuffle(1000, seed=0)
    head = np.array(list(shuffled.take(5 * BATCH).as_numpy_iterator()))
    assert _chi2(head) > 10 * _chi2_bound()


def test_disk_cache_matches_memory_and_is_reused(sorted_folder, tmp_path, caplog):
    def first_batches(cache_dir=None, **kwargs):
        ds = pipeline.build_datasets(str(sorted_folder), image_size=4, global_batch_size=BATCH,
                                     cache_dir=cache_dir and str(cache_dir), **kwargs)
        batches = [x.numpy() for x, _ in ds.train.take(3)]
        ds.wait_for_cache()
        return batches

    def log():
        text = caplog.text
        caplog.clear()
        return text

    caplog.set_level(logging.INFO, logger="convmixer_tf")
    memory = first_batches(cache="memory")
    assert "uint8 pixels in memory" in log()
    # auto above the memory budget streams (no file) unless a disk budget allows a file:
    # the same pixels either way.
    for a, b in zip(memory, first_batches(tmp_path, cache="auto", cache_budget_mb=0)):
        np.testing.assert_array_equal(a, b)
    assert "Input cache (train): stream" in log()
    assert not os.listdir(tmp_path)
    for a, b in zip(memory, first_batches(tmp_path, cache="auto", cache_budget_mb=0,
                                          cache_disk_budget_gb=1)):
        np.testing.assert_array_equal(a, b)
    assert "Input cache (train): disk" in log()
    assert any(name.endswith(".u8") for name in os.listdir(tmp_path))
    first_batches(tmp_path, cache="disk")  # a resumed run reuses the complete file
    assert "Reused 3,000 train images:" in log()
    # Without a cache_dir the file is temporary: unlinked once mapped, nothing left behind.
    before = set(os.listdir(tempfile.gettempdir()))
    np.testing.assert_array_equal(first_batches(cache="disk")[0], memory[0])
    assert not any(n.startswith("convmixer_cache_")
                   for n in set(os.listdir(tempfile.gettempdir())) - before)



@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_cache_serves_each_files_own_decode_before_during_and_after_its_fill(tmp_path, mode,
                                                                             caplog):
    """The cache gives, for every readable file, exactly what decoding that file alone gives
    (mixed formats and sizes, chunk boundaries crossed), with its label, whether the image is
    stored yet or not (so batches do not depend on the fill's progress); unreadable files
    (not an image, truncated, missing) are flagged either way and named when the fill ends."""
    from convmixer_tf import preprocessing
    from convmixer_tf.training.data import cache, sources

    _write_folder(tmp_path / "train", per_class=30)  # 90 files: two chunks of 64
    _write_folder(tmp_path / "val", per_class=1)
    (tmp_path / "train" / "dog" / "bad.jpg").write_bytes(b"this is not a jpeg")
    (tmp_path / "train" / "emu" / "cut.png").write_bytes(
        (tmp_path / "train" / "emu" / "0.png").read_bytes()[:40])
    split = sources.load_source(str(tmp_path), image_size=8, seed=0, validation_split=0.1,
                                data_dir=None).train
    os.remove(split.paths[70])  # listed, then gone before decoding
    unreadable = {split.paths.index(str(tmp_path / "train" / "dog" / "bad.jpg")),
                  split.paths.index(str(tmp_path / "train" / "emu" / "cut.png")), 70}
    kept = [i for i in range(split.size) if i not in unreadable]
    expected = {i: preprocessing.decode_image(split.read(i)[0]).numpy() for i in kept}
    caplog.set_level(logging.INFO, logger="convmixer_tf")
    store = cache.Store(split, cache.Decision(mode, 0, ""), None, "train")
    cached = store.split

    def served():
        pixels = [(x.numpy(), bool(valid)) for x, valid in
                  (cached.decode(index) for index, _ in cached.examples())]
        for i, (image, valid) in enumerate(pixels):
            assert valid == (i in expected), i
            if valid:
                np.testing.assert_array_equal(image, expected[i])
        return pixels

    assert cached.size == split.size == 92
    assert not store.state.any()
    before = served()  # nothing stored: every image from its file
    store.start()
    during = served()  # racing the fill
    store.wait()
    assert (store.state == 1).sum() == 89  # all stored
    after = served()
    for a, b, c in zip(before, during, after):
        np.testing.assert_array_equal(a[0], c[0])
        np.testing.assert_array_equal(b[0], c[0])
    assert [int(y) for _, y in cached.examples()] == list(split.labels)
    assert store.nbytes == sum(x.size for x in expected.values())
    out = caplog.text
    assert "Skipped 3 unreadable train image(s)" in out, out
    assert "bad.jpg" in out and "cut.png" in out and split.paths[70] in out


def test_cache_of_a_stream_without_random_access_fills_first_and_skips_and_names(caplog):
    """A split read only in stored order (tfds before caching): it is filled before the
    first read; the chunk holding a broken image is decoded again image by image, so only
    that one is skipped, named by its index."""
    from convmixer_tf.training.data import cache, sources

    images = [np.full((4 + i % 3, 5, 3), i, np.uint8) for i in range(70)]
    encoded = [tf.io.encode_png(x).numpy() for x in images]
    encoded[66] = b"broken"
    labels = np.arange(70, dtype=np.int32) % 3
    split = sources.Split(70, lambda: tf.data.Dataset.from_tensor_slices((encoded, labels)),
                          None, True, "stream")
    caplog.set_level(logging.INFO, logger="convmixer_tf")
    cached = cache.decode_once(split, cache.Decision("memory", 0, ""), None, "train")
    assert "Skipped 1 unreadable train image(s): example #66" in caplog.text
    assert cached.size == 70
    for index in range(70):
        x, label = cached.read(index)
        image, valid = cached.decode(x)
        assert bool(valid) == (index != 66)
        if index != 66:
            np.testing.assert_array_equal(image.numpy(), images[index])
            assert int(label) == labels[index]


class ConvmixerTestSorted(tfds.core.GeneratorBasedBuilder):
    """A class-sorted, single-shard tfds set (shuffling disabled at preparation): the layout
    a buffered stream cannot shuffle."""

    VERSION = tfds.core.Version("1.0.0")
    PER_CLASS = 100

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(4, 4, 3)),
                "label": tfds.features.ClassLabel(num_classes=CLASSES),
            }),
            supervised_keys=("image", "label"),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for label in range(CLASSES):
            for i in range(self.PER_CLASS):
                number = label * self.PER_CLASS + i
                image = np.zeros((4, 4, 3), np.uint8)
                image[0, 0] = (number // 256, number % 256, label)
                yield number, {"image": image, "label": label}


def test_tfds_class_sorted_single_shard_is_shuffled_uniformly(tmp_path):
    ConvmixerTestSorted(data_dir=str(tmp_path)).download_and_prepare()
    ds = pipeline.build_datasets("tfds:convmixer_test_sorted", image_size=4, global_batch_size=50,
                                 data_dir=str(tmp_path), validation_split=0.2,
                                 cache_dir=str(tmp_path / "cache"))
    assert ds.train_size == 800  # train[:80%]: classes 0-7 only (sorted: the split shows it)
    numbers, labels = _epoch(ds.train)
    np.testing.assert_array_equal(np.sort(numbers), np.arange(800))
    head = labels[:200]
    assert _chi2(head, 8) < _chi2_bound(8), np.bincount(head)
    ds.epoch.assign(1)
    assert not np.array_equal(numbers, _epoch(ds.train)[0])
    # cache="off": the stream fallback (shuffled files + buffer) still yields every example.
    off = pipeline.build_datasets("tfds:convmixer_test_sorted", image_size=4, global_batch_size=50,
                                  data_dir=str(tmp_path), validation_split=0.2, cache="off")
    np.testing.assert_array_equal(np.sort(_epoch(off.train)[0]), np.arange(800))


# ---------------------------------------------------------------- keras:NAME

FASHION_HOME = os.path.expanduser("~/.keras/datasets/fashion-mnist")


@pytest.mark.skipif(not all(os.path.isfile(os.path.join(FASHION_HOME, os.path.basename(f)))
                            for f in sources.FASHION_MNIST_FILES),
                    reason="Fashion-MNIST not in ~/.keras/datasets (apt-get install "
                           "dataset-fashion-mnist; see docs/training.md)")
def test_keras_fashion_mnist_real_files():
    ds = pipeline.build_datasets("keras:fashion_mnist", image_size=28, global_batch_size=500)
    assert (ds.train_size, ds.test_size) == (60000, 10000)
    assert ds.class_names[0] == "T-shirt/top" and ds.class_names[-1] == "Ankle boot"
    x, y = next(iter(ds.train))
    assert x.shape == (500, 28, 28, 3) and x.dtype == tf.uint8
    np.testing.assert_array_equal(x[..., 0], x[..., 2])  # grey repeated to RGB
    assert _chi2(y.numpy().argmax(1)) < _chi2_bound()  # the stored order is not the one read
    x_test, _ = next(iter(ds.test))
    assert x_test.shape == (500, 28, 28, 3)


def test_keras_missing_files_fail_at_once_naming_them(tmp_path, monkeypatch):
    from keras.src.backend import config as keras_config
    from keras.src.utils import file_utils

    monkeypatch.setattr(keras_config, "_KERAS_DIR", str(tmp_path / "keras_home"))
    os.makedirs(tmp_path / "keras_home")

    def no_network(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(file_utils, "urlretrieve", no_network)
    home = str(tmp_path / "keras_home" / "datasets")
    start = time.monotonic()
    with pytest.raises(FileNotFoundError) as error:
        pipeline.build_datasets("keras:fashion_mnist")
    message = str(error.value)
    assert os.path.join(home, "fashion-mnist", "train-images-idx3-ubyte.gz") in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "/usr/share/datasets/fashion-mnist" in message
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py-target_archive"):
        pipeline.build_datasets("keras:cifar10")
    with pytest.raises(ValueError, match="Unknown Keras data set 'svhn'"):
        pipeline.build_datasets("keras:svhn")
    assert time.monotonic() - start < 5
    assert not os.path.exists(home)  # nothing created, nothing fetched
    assert len(sources.KERAS_DATASETS["cifar100"]["class_names"]) == 100


def test_input_share_line():
    assert "bottleneck" not in pipeline.input_share_line(0.1, 1.0, 64)
    line = pipeline.input_share_line(0.9, 1.0, 64)
    assert "~90% of a step" in line and "bottleneck" in line and "71 images/s alone" in line


def test_cli_strict_images_and_cache_disk_budget(tmp_path, capsys):
    """Through the command: --strict-images refuses a folder with a broken file (exit 2,
    naming it); without it the run trains, skipping it; --cache-disk-budget-gb lets auto
    write the decoded pixels to the run's cache folder once they exceed the memory budget."""
    from convmixer_tf import cli

    _write_folder(tmp_path / "pets" / "train", per_class=4)
    _write_folder(tmp_path / "pets" / "val", per_class=1)
    (tmp_path / "pets" / "train" / "dog" / "bad.jpg").write_bytes(b"not a jpeg")
    common = ["--dataset", str(tmp_path / "pets"), "--no-export", "--image-size", "8",
              "--dim", "8", "--depth", "1", "--epochs", "1", "--batch-size", "4",
              "--verbose", "0", "--output-dir", str(tmp_path / "out"),
              "--run-dir", str(tmp_path / "runs"), "--name", "pets"]
    with pytest.raises(SystemExit) as exit_info:  # a config error is a usage error
        cli.train_main(common + ["--cache-disk-budget-gb", "-1"])
    assert exit_info.value.code == 2
    assert "cache_disk_budget_gb must be >= 0" in capsys.readouterr().err
    assert cli.train_main(common + ["--strict-images"]) == 2
    assert "bad.jpg" in capsys.readouterr().err
    assert cli.train_main(common + ["--overwrite", "--cache-budget-mb", "0",
                                    "--cache-disk-budget-gb", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "Input cache (train): disk" in out and "fits the disk budget (0.5 GB)" in out
    assert "Skipped 1 unreadable train image(s)" in out and "bad.jpg" in out
    assert any(f.endswith(".u8") for f in os.listdir(tmp_path / "runs" / "pets" / "cache"))


def test_the_source_table_and_the_parser_name_the_same_prefixes():
    """`config.parse_dataset` (TF-free: the CLI's default run name) reads the prefixes that
    `sources.SOURCES` serves."""
    from convmixer_tf.training.data import sources

    assert tuple(sources.SOURCES) == sources.DATASET_PREFIXES
    assert sources.parse_dataset("keras:mnist") == ("keras:", "mnist")
