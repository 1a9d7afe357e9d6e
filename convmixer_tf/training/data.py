"""Input pipelines: the offline digits default, tensorflow-datasets names and image folders.

`build_datasets` is the one entry point the trainer calls; `load_digits` reads the default data
set. Evaluation images go through `preprocessing` (the same function serving and prediction use).
"""

import collections
import dataclasses
import os

import numpy as np
import tensorflow as tf

from convmixer_tf import preprocessing
from convmixer_tf.training import augment as augment_lib, config

DIGITS_CLASS_NAMES = tuple(str(i) for i in range(10))
IMAGE_EXTENSIONS = preprocessing.IMAGE_EXTENSIONS
TEST_FOLDER_NAMES = ("test", "val", "validation")
AUTOTUNE = tf.data.AUTOTUNE


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


@dataclasses.dataclass(frozen=True)
class Datasets:
    """What `build_datasets` returns: the two pipelines and what a trainer needs to know."""

    train: tf.data.Dataset
    test: tf.data.Dataset
    calibration: tf.data.Dataset  # training images, shuffled by the seed, eval-preprocessed
    num_classes: int
    class_names: tuple
    train_size: int
    test_size: int
    steps_per_epoch: int  # train_size // global batch (the remainder is dropped)
    image_size: int


# A source: examples as (image, int label) where image is either uint8 HxWx3 or encoded bytes.
_Source = collections.namedtuple("_Source", "train test train_size test_size class_names encoded")


def build_datasets(dataset="digits", image_size=32, global_batch_size=64, augment=None,
                   data_dir=None, seed=0, validation_split=0.1, eval_crop_pct=1.0,
                   shuffle_buffer=16384):
    """Train and test `tf.data` pipelines yielding `(images, labels)`.

    `dataset` is "digits" (offline, scikit-learn), a tensorflow-datasets name ("cifar10" or
    "tfds:cifar10", any data set with an Image and a ClassLabel feature, read from `data_dir`,
    never downloaded), or an image folder ("folder:/path" or a path; one sub-folder per class,
    see `_folder_source`). Images are 0-255 pixels (uint8, or float32 once augmented or
    resized; the model normalises itself), labels one-hot float32 (soft after mixup/cutmix).

    Train: shuffled, augmented per image (`augment`, a `config.AugmentConfig`; None = none),
    batched by the GLOBAL batch with `drop_remainder=True` so every step has the same static
    shape (XLA compiles once), then mixed per batch. Under a `tf.distribute` strategy, Keras
    `fit` splits each global batch across replicas, so pass the global batch here. Test: resize
    the short side to `image_size / eval_crop_pct` (bicubic) and centre-crop `image_size`
    (timm's eval transform; 0.96 for the ImageNet checkpoints), no augmentation, last partial
    batch kept. Data sets without a test split hold out `validation_split` of train.
    """
    augment = augment or config.AugmentConfig()
    if not 0.0 < eval_crop_pct <= 1.0:
        raise ValueError(f"eval_crop_pct must be in (0, 1]. Received {eval_crop_pct!r}")
    if not 0.0 < validation_split < 1.0:
        raise ValueError(f"validation_split must be in (0, 1). Received {validation_split!r}")
    kind, name = _parse_dataset(dataset)
    if kind == "digits":
        source = _digits_source(image_size, seed)
    elif kind == "folder":
        source = _folder_source(name, validation_split, seed)
    else:
        source = _tfds_source(name, data_dir, validation_split, seed)

    steps = source.train_size // global_batch_size
    if steps < 1:
        raise ValueError(
            f"The global batch ({global_batch_size}) is larger than the training set "
            f"({source.train_size} images of {dataset!r}); lower --batch-size."
        )
    num_classes = len(source.class_names)

    def decode(image):
        if source.encoded:
            return preprocessing.decode_image(image)
        return tf.ensure_shape(image, [None, None, 3])

    def eval_map(image, label):
        return preprocessing.resize_centre_crop(decode(image), image_size, eval_crop_pct), label

    def train_map(example, seed_pair):
        image, label = example
        image = decode(image)
        if augment.crop_scale:
            image = augment_lib.augment_image(image, seed_pair, augment, image_size)
        else:
            image = preprocessing.resize_centre_crop(image, image_size, 1.0)
            if augment.per_image:
                image = augment_lib.augment_image(image, seed_pair, augment, image_size)
        return image, label

    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
    train = source.train.shuffle(min(source.train_size, shuffle_buffer), seed=seed,
                                 reshuffle_each_iteration=True)
    train = tf.data.Dataset.zip(train, seeds).map(train_map, num_parallel_calls=AUTOTUNE)
    train = train.batch(global_batch_size, drop_remainder=True)

    def batch_map(images, labels, seed_pair):
        labels = tf.one_hot(labels, num_classes)
        if augment.per_batch:
            images, labels = augment_lib.mix_batch(images, labels, seed_pair, augment)
        return images, labels

    batch_seeds = tf.data.Dataset.random(seed=seed + 1, rerandomize_each_iteration=True)
    train = tf.data.Dataset.zip(train, batch_seeds.batch(2)).map(
        lambda xy, s: batch_map(*xy, s), num_parallel_calls=AUTOTUNE)

    def evaluation(ds):
        ds = ds.map(eval_map, num_parallel_calls=AUTOTUNE).batch(global_batch_size)
        return ds.map(lambda x, y: (x, tf.one_hot(y, num_classes)),
                      num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE)

    calibration = source.train.shuffle(min(source.train_size, shuffle_buffer), seed=seed + 2)
    return Datasets(
        train=train.prefetch(AUTOTUNE), test=evaluation(source.test),
        calibration=evaluation(calibration), num_classes=num_classes,
        class_names=tuple(source.class_names), train_size=source.train_size,
        test_size=source.test_size, steps_per_epoch=steps, image_size=image_size,
    )


def _parse_dataset(dataset):
    """("digits" | "folder" | "tfds", name) from the `dataset` string."""
    if not isinstance(dataset, str) or not dataset.strip():
        raise ValueError(f"dataset must be a non-empty string. Received {dataset!r}")
    if dataset == "digits":
        return "digits", dataset
    for prefix in ("folder:", "tfds:"):
        if dataset.startswith(prefix):
            return prefix[:-1], dataset[len(prefix):]
    if os.sep in dataset or dataset.startswith(".") or os.path.isdir(dataset):
        return "folder", dataset
    return "tfds", dataset


# ---------------------------------------------------------------- sources


def _digits_source(image_size, seed):
    (x_train, y_train), (x_test, y_test) = load_digits(image_size, seed=seed)
    return _Source(
        tf.data.Dataset.from_tensor_slices((x_train, y_train)),
        tf.data.Dataset.from_tensor_slices((x_test, y_test)),
        len(y_train), len(y_test), DIGITS_CLASS_NAMES, encoded=False,
    )


def _list_class_folder(root):
    """(sorted class names, files per class) of `root`/<class>/<image files>."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    files = {}
    for name in classes:
        folder = os.path.join(root, name)
        found = []
        for dirpath, _, filenames in os.walk(folder):
            found += [os.path.join(dirpath, f) for f in filenames
                      if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
        files[name] = sorted(found)
    return classes, files


def _check_images(paths, workers=8):
    """Fails fast on files with an image extension that PIL cannot open/verify (not an
    image, wrong format, truncated PNG), naming them; a header check, not a full decode."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    def bad(path):
        try:
            with Image.open(path) as img:
                if img.format not in ("JPEG", "PNG", "BMP", "GIF", "MPO"):
                    return f"{path} ({img.format}, not JPEG/PNG/BMP/GIF)"
                img.verify()
        except Exception as error:  # PIL raises many types for broken files
            return f"{path} ({type(error).__name__}: {error})"
        return None

    with ThreadPoolExecutor(workers) as pool:
        problems = [p for p in pool.map(bad, paths) if p]
    if problems:
        shown = "\n  ".join(problems[:5])
        more = f"\n  ... and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise ValueError(
            f"{len(problems)} unreadable image file(s); remove or fix them:\n  {shown}{more}"
        )


def _folder_source(root, validation_split, seed):
    """An image folder: `root/<class>/*.{jpg,jpeg,png,bmp,gif}` (nested folders included,
    other files ignored), class names sorted, label = index. If `root` holds `train/` and one
    of `test/`, `val/`, `validation/` (each with the same class folders) those are the splits;
    otherwise `validation_split` of each class (at least one image) is held out, chosen by
    `seed`. Every image file is header-checked up front so a corrupt one fails fast by name."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"Image folder not found: {root!r}")
    subdirs = {e.name for e in os.scandir(root) if e.is_dir()}
    test_dir = next((d for d in TEST_FOLDER_NAMES if d in subdirs), None)
    if "train" in subdirs and test_dir:
        classes, train_files = _list_class_folder(os.path.join(root, "train"))
        test_classes, test_files = _list_class_folder(os.path.join(root, test_dir))
        if test_classes != classes:
            raise ValueError(
                f"{root}/train and {root}/{test_dir} have different class folders: "
                f"{sorted(set(classes) ^ set(test_classes))}"
            )
    else:
        classes, train_files = _list_class_folder(root)
        test_files = None
    if len(classes) < 2:
        raise ValueError(
            f"An image folder needs one sub-folder per class and at least 2 classes; "
            f"{root!r} has {len(classes)} ({classes}). Expected {root}/<class>/<image>.jpg"
        )
    empty = [c for c in classes if not train_files[c]]
    if empty:
        raise ValueError(f"Class folder(s) without images ({'/'.join(IMAGE_EXTENSIONS)}) "
                         f"in {root!r}: {empty}")

    rng = np.random.default_rng(seed)
    train, test = [], []
    for label, name in enumerate(classes):
        if test_files is not None:
            train += [(p, label) for p in train_files[name]]
            test += [(p, label) for p in test_files[name]]
            continue
        files = list(rng.permutation(train_files[name]))
        n_test = max(1, int(round(len(files) * validation_split))) if len(files) > 1 else 0
        test += [(p, label) for p in files[:n_test]]
        train += [(p, label) for p in files[n_test:]]
    if not test:
        raise ValueError(f"No held-out images in {root!r}: each class needs >= 2 images.")
    _check_images([p for p, _ in train + test])

    def source(pairs):
        paths, labels = zip(*pairs)
        ds = tf.data.Dataset.from_tensor_slices((list(paths), np.array(labels, "int32")))
        return ds.map(lambda p, y: (tf.io.read_file(p), y), num_parallel_calls=AUTOTUNE)

    return _Source(source(train), source(test), len(train), len(test), classes, encoded=True)


def _tfds_features(info, name):
    """(image key, label key) of a tfds data set: its supervised keys, else the first Image and
    ClassLabel features."""
    import tensorflow_datasets as tfds

    features = info.features
    keys = info.supervised_keys
    if (isinstance(keys, tuple) and len(keys) == 2 and all(isinstance(k, str) for k in keys)
            and isinstance(features[keys[0]], tfds.features.Image)
            and isinstance(features[keys[1]], tfds.features.ClassLabel)):
        return keys
    images = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
    labels = [k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)]
    if not images or not labels:
        raise ValueError(
            f"tfds data set {name!r} has no Image + ClassLabel feature pair to classify: "
            f"{ {k: type(f).__name__ for k, f in features.items()} }"
        )
    return images[0], labels[0]


def _tfds_source(name, data_dir, validation_split, seed):
    """A prepared tensorflow-datasets data set, read offline from `data_dir` (default
    `$TFDS_DATA_DIR` or ~/tensorflow_datasets). Test split: "test", else "validation", else
    the last `validation_split` of "train"."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(
            f"Unknown dataset {name!r}: not 'digits', not an existing image folder and not a "
            f"tensorflow-datasets name (see `tfds.list_builders()`)."
        ) from None
    if not builder.is_prepared():
        where = data_dir or "~/tensorflow_datasets (or $TFDS_DATA_DIR)"
        manual = ""
        if getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
            manual = (f" {name} needs a manual download: put its files in "
                      f"{os.path.join(str(data_dir or '~/tensorflow_datasets'), 'downloads', 'manual')}"
                      f" and run `tfds build {name} --data_dir {where}`.")
        raise FileNotFoundError(
            f"tfds data set {name!r} is not prepared in {where} and this job never downloads. "
            f"Prepare it on a machine with internet (`tfds build {name} --data_dir DIR`, or "
            f"`python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', "
            f"data_dir='DIR').download_and_prepare()\"`), copy DIR here and pass "
            f"--data-dir DIR.{manual}"
        )
    info = builder.info
    image_key, label_key = _tfds_features(info, name)
    splits = set(info.splits)
    if "train" not in splits:
        raise ValueError(f"tfds data set {name!r} has no 'train' split: {sorted(splits)}")
    test_split = next((s for s in ("test", "validation") if s in splits), None)
    train_split = "train"
    if test_split is None:
        cut = int(round(100 * (1 - validation_split)))
        train_split, test_split = f"train[:{cut}%]", f"train[{cut}%:]"

    def load(split, shuffle):
        ds = builder.as_dataset(
            split=split, shuffle_files=shuffle,
            decoders={image_key: tfds.decode.SkipDecoding()},
            read_config=tfds.ReadConfig(shuffle_seed=seed, try_autocache=False),
        )
        return ds.map(lambda ex: (ex[image_key], tf.cast(ex[label_key], tf.int32)),
                      num_parallel_calls=AUTOTUNE)

    return _Source(
        load(train_split, True), load(test_split, False),
        info.splits[train_split].num_examples, info.splits[test_split].num_examples,
        tuple(info.features[label_key].names), encoded=True,
    )
