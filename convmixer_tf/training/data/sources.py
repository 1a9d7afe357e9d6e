"""Where examples come from: one prefix -> factory table (`SOURCES`) of digits, Keras's data
sets, image folders and tensorflow-datasets names. Every source gives a train and a test
`Split`: an indexed list of (image, int32 label) examples; folders also give their file paths
(sampled for the cache decision, named when one is unreadable)."""

import dataclasses
import functools
import hashlib
import logging
import os
import random
import tempfile

import keras
import numpy as np
import tensorflow as tf

from convmixer_tf import _extras, compat, preprocessing
from convmixer_tf.training.config import DATASET_PREFIXES, parse_dataset

logger = logging.getLogger(__name__)

DIGITS_CLASS_NAMES = tuple(str(i) for i in range(10))
IMAGE_EXTENSIONS = preprocessing.IMAGE_EXTENSIONS
TEST_FOLDER_NAMES = ("test", "val", "validation")
AUTOTUNE = tf.data.AUTOTUNE

# keras.datasets.<name>.load_data(): the files it reads under the Keras cache
# (~/.keras/datasets, or $KERAS_HOME/datasets) and where they come from.
FASHION_MNIST_FILES = tuple(f"fashion-mnist/{split}-{kind}-ubyte.gz" for split in ("train", "t10k")
                            for kind in ("images-idx3", "labels-idx1"))
KERAS_DATASETS = {
    "mnist": dict(files=("mnist.npz",), class_names=DIGITS_CLASS_NAMES,
                  url="https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz"),
    "fashion_mnist": dict(
        files=FASHION_MNIST_FILES,
        class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                     "Sneaker", "Bag", "Ankle boot"),
        url="https://storage.googleapis.com/tensorflow/tf-keras-datasets/ (the four .gz files)",
        debian="apt-get install dataset-fashion-mnist; mkdir -p {home}/fashion-mnist; "
               "cp /usr/share/datasets/fashion-mnist/*.gz {home}/fashion-mnist/"),
    "cifar10": dict(
        files=("cifar-10-batches-py-target_archive",),
        class_names=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                     "ship", "truck"),
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (saved under that name)"),
    "cifar100": dict(
        files=("cifar-100-python-target_archive",),
        class_names=tuple("""apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl
            boy bridge bus butterfly camel can castle caterpillar cattle chair chimpanzee clock
            cloud cockroach couch crab crocodile cup dinosaur dolphin elephant flatfish forest fox
            girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man
            maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree
            pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road
            rocket rose sea seal shark shrew skunk skyscraper snail snake spider squirrel
            streetcar sunflower sweet_pepper table tank telephone television tiger tractor train
            trout tulip turtle wardrobe whale willow_tree wolf woman worm""".split()),
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz (saved under that name)"),
}


def plain(fn):
    """`fn` for tf.data without AutoGraph: the pipeline's functions have no tensor-dependent
    Python control flow, and converting them (parsing their source) cost ~10 s of startup."""
    return tf.autograph.experimental.do_not_convert(fn)


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
class Split:
    """One split of a source: `size` examples that `examples()` yields in stored order as
    (image, int32 label), and that `read(index)` returns one at a time (None for sources
    without random access: tfds before caching). `encoded`: images are file bytes. `paths`:
    the files (folders only), `sample_shapes(k, seed)`: decoded [H, W, 3] shapes of about k
    examples, read from headers where possible (the cache decision's sample). `labels`: every
    example's label where known without reading a file (folders). `decode(x)` -> (pixels,
    valid): how an encoded `read` value becomes pixels with its own validity flag (the decoded
    cache); None: `x` is file bytes, decoded inside `cache.decode_flagged`."""

    size: int
    examples: object
    read: object = None
    encoded: bool = False
    key: str = ""  # identifies the content (paths / tfds split) for the disk cache's file name
    paths: tuple = ()
    sample_shapes: object = None
    labels: object = None
    decode: object = None


@dataclasses.dataclass(frozen=True)
class Source:
    train: Split
    test: Split
    class_names: tuple


def _indexed(size, read, **kwargs):
    """A `Split` whose stored order is `read(0), read(1), ...`."""
    def examples():
        return tf.data.Dataset.range(size).map(read, num_parallel_calls=AUTOTUNE)
    return Split(size, examples, read, **kwargs)


def _array_split(images, labels):
    """A split read from uint8 arrays [N, H, W, C] (C = 1 is repeated to RGB on read)."""
    images, labels = tf.constant(images), tf.constant(np.asarray(labels, "int32").reshape(-1))

    def read(index):
        image = tf.gather(images, index)
        if image.shape[-1] == 1:
            image = tf.image.grayscale_to_rgb(image)
        return image, tf.gather(labels, index)

    return _indexed(int(labels.shape[0]), read)


# ---------------------------------------------------------------- sources


def _digits_source(image_size, seed):
    (x_train, y_train), (x_test, y_test) = load_digits(image_size, seed=seed)
    return Source(_array_split(x_train, y_train), _array_split(x_test, y_test),
                   DIGITS_CLASS_NAMES)

def keras_cache_dir():
    """The folder `keras.datasets.*.load_data()` read from: `$KERAS_HOME/datasets`
    (default ~/.keras/datasets; Keras falls back to /tmp/.keras when that is not writable)."""
    base = os.path.expanduser(compat.keras_home())
    if not os.access(base, os.W_OK):
        base = os.path.join("/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir(), ".keras")
    return os.path.join(base, "datasets")


def _keras_source(name):
    """`keras.datasets.<name>.load_data()`, after checking its files are already in Keras's
    cache (`keras_cache_dir()`), so an offline machine fails at once naming the files to place
    instead of trying to download. Grey images (mnist, fashion_mnist) are repeated to 3
    channels on read; cifar100 uses its 100 fine labels."""
    if name not in KERAS_DATASETS:
        raise ValueError(f"Unknown Keras data set {name!r}; choose one of "
                         f"{sorted(KERAS_DATASETS)} (--dataset keras:NAME).")
    spec = KERAS_DATASETS[name]
    home = keras_cache_dir()
    missing = [f for f in spec["files"] if not os.path.isfile(os.path.join(home, f))]
    if missing:
        debian = ("\nOn Debian/Ubuntu: " + spec["debian"].format(home=home)
                  if "debian" in spec else "")
        raise FileNotFoundError(
            f"keras:{name} is not in Keras's cache and this job never downloads. Missing: "
            f"{', '.join(os.path.join(home, f) for f in missing)}. Place the file(s) there "
            f"(from {spec['url']}).{debian}"
        )
    loader = getattr(keras.datasets, name).load_data
    (x_train, y_train), (x_test, y_test) = (loader(label_mode="fine") if name == "cifar100"
                                            else loader())
    if x_train.ndim == 3:
        x_train, x_test = x_train[..., None], x_test[..., None]
    return Source(_array_split(x_train, y_train), _array_split(x_test, y_test),
                   spec["class_names"])


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


def _folder_source(root, validation_split, seed):
    """An image folder: `root/<class>/*.{jpg,jpeg,png,bmp,gif}` (nested folders included,
    other files ignored), class names sorted, label = index. If `root` holds `train/` and one
    of `test/`, `val/`, `validation/` (each with the same class folders) those are the splits;
    otherwise `validation_split` of each class (at least one image) is held out, chosen by
    `seed`. Files are not opened here (startup stays seconds at any size): the pipeline skips
    and names unreadable ones, or `check_images` refuses them first (--strict-images)."""
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
    return Source(_file_split(train), _file_split(test), tuple(classes))


def _file_split(pairs):
    """A split of (path, label) pairs: `read(i)` reads file i's bytes (decoded later)."""
    paths, labels = zip(*((str(p), y) for p, y in pairs))
    paths_t, labels_t = tf.constant(list(paths)), tf.constant(np.array(labels, "int32"))

    def read(index):
        return tf.io.read_file(tf.gather(paths_t, index)), tf.gather(labels_t, index)

    key = hashlib.sha1("\n".join(f"{p}:{y}" for p, y in pairs).encode()).hexdigest()

    def sample_shapes(k, seed):
        chosen = random.Random(seed).sample(paths, min(k, len(paths)))
        return [shape for shape in header_shapes(chosen) if shape is not None]

    return _indexed(len(pairs), read, encoded=True, key=key, paths=tuple(paths),
                    sample_shapes=sample_shapes, labels=np.array(labels, "int32"))


def _header_shape(path):
    """(H, W, 3) from an image file's header (PIL reads a few KB, decodes nothing); None when
    PIL cannot open it."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return (img.height, img.width, 3)
    except Exception:  # PIL raises many types for broken files
        return None


def header_shapes(paths, workers=16):
    """`_header_shape` of every path, read in parallel threads (I/O bound)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(_header_shape, paths, chunksize=64))


def check_images(paths, workers=8):
    """--strict-images: refuses, before training and naming them, files with an image
    extension that PIL cannot open/verify (not an image, wrong format, truncated PNG); a
    parallel header check, not a full decode."""
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
        problems = [p for p in pool.map(bad, paths, chunksize=64) if p]
    if problems:
        shown = "\n  ".join(problems[:5])
        more = f"\n  ... and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise ValueError(
            f"{len(problems)} unreadable image file(s); remove or fix them (or drop "
            f"--strict-images to skip them and name them in the log):\n  {shown}{more}"
        )


def _import_tfds():
    return _extras.require("tensorflow_datasets", "A tensorflow-datasets data set", extra="tfds")


def _tfds_features(info, name):
    """(image key, label key) of a tfds data set: its supervised keys, else the first Image and
    ClassLabel features."""
    tfds = _import_tfds()

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
    the last `validation_split` of "train". Read in stored order (tfds has no random access);
    the cache makes the training split indexable for a true per-epoch shuffle."""
    tfds = _import_tfds()

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(
            f"Unknown dataset {name!r}: not 'digits', not keras:NAME, not an existing image "
            f"folder and not a tensorflow-datasets name (see `tfds.list_builders()`)."
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

    def load(split, shuffle_seed=None):
        """The split as (encoded image, label); `shuffle_seed`: files in a seeded order each
        epoch, interleaved one example at a time (the cache="off" fallback)."""
        shards = len(info.splits[split].file_instructions)
        read_config = tfds.ReadConfig(
            shuffle_seed=shuffle_seed, try_autocache=False,
            interleave_cycle_length=max(1, shards), interleave_block_length=1,
            enable_ordering_guard=False)  # we shuffle sets that tfds wrote in order, on purpose
        ds = builder.as_dataset(split=split, shuffle_files=shuffle_seed is not None,
                                decoders={image_key: tfds.decode.SkipDecoding()},
                                read_config=read_config)
        return ds.map(lambda ex: (ex[image_key], tf.cast(ex[label_key], tf.int32)),
                      num_parallel_calls=AUTOTUNE)

    def split_of(split):
        key = f"tfds:{name}:{info.version}:{split}:{builder.data_dir}"

        def sample_shapes(k, seed):  # tfds has no random access: the first k, decoded
            return [tuple(preprocessing.decode_image(x).shape) for x, _ in load(split).take(k)]

        return Split(info.splits[split].num_examples, functools.partial(load, split),
                     None, True, key, sample_shapes=sample_shapes)

    return Source(split_of(train_split), split_of(test_split),
                   tuple(info.features[label_key].names))


def tfds_stream_shuffled(split, seed, buffer=16384):
    """A tfds training split read without the cache: files shuffled per epoch, interleaved,
    then a `buffer`-element shuffle. Approximate: with few files or a class-sorted file, the
    head of an epoch is not a uniform sample (use the cache for that)."""
    logger.info(
        f"Warning: cache='off' reads tfds examples in stored order with a {buffer:,}-example "
        f"shuffle buffer; an epoch's first batches are not a uniform sample when the files are "
        f"few or class-sorted. Use --cache auto/disk for a full shuffle.")
    return split.examples(shuffle_seed=seed).shuffle(
        min(split.size, buffer), seed=seed, reshuffle_each_iteration=True)


# ---------------------------------------------------------------- the table

# `--dataset` prefix -> factory(name, options) returning a `Source`; `options` holds
# image_size, seed, validation_split and data_dir. A new source is one entry here.
SOURCES = {  # its keys are config.DATASET_PREFIXES (parse_dataset, TF-free, reads them)
    "digits": lambda name, o: _digits_source(o["image_size"], o["seed"]),
    "keras:": lambda name, o: _keras_source(name),
    "folder:": lambda name, o: _folder_source(name, o["validation_split"], o["seed"]),
    "tfds:": lambda name, o: _tfds_source(name, o["data_dir"], o["validation_split"], o["seed"]),
}


def load_source(dataset, **options):
    """The `Source` a `--dataset` string names."""
    prefix, name = parse_dataset(dataset)
    return SOURCES[prefix](name, options)
