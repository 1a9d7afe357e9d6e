"""Input pipelines: the offline digits default, Keras's data sets, tensorflow-datasets names and
image folders.

`build_datasets` is the one entry point the trainer calls. Every source is an indexed list of
examples (file paths, array rows or cached images), and every epoch reads a fresh seeded
permutation of ALL of it (`index_shuffle` on indices: no buffer, no class-sorted head), so any
prefix of an epoch (`--steps-per-epoch`) is a uniform sample. Images are decoded once and cached
as uint8 before augmentation (in memory up to a budget, else in a file). Evaluation images go
through `preprocessing` (the same function serving and prediction use).
"""

import dataclasses
import functools
import hashlib
import os
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf

from convmixer_tf import _extras, preprocessing
from convmixer_tf.training import augment as augment_lib, config

DIGITS_CLASS_NAMES = tuple(str(i) for i in range(10))
IMAGE_EXTENSIONS = preprocessing.IMAGE_EXTENSIONS
TEST_FOLDER_NAMES = ("test", "val", "validation")
AUTOTUNE = tf.data.AUTOTUNE
CACHE_MODES = config.CACHE_MODES  # auto, memory, disk, off
DEFAULT_CACHE_BUDGET_MB = config.TrainConfig.cache_budget_mb  # MB of decoded pixels in memory

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


def _log(message):
    """One line of the run log (stdout, flushed so it interleaves with Keras's progress)."""
    print(message, flush=True)


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


class Datasets:
    """What `build_datasets` returns: the pipelines and what a trainer needs to know.

    `train`, `test` and `calibration` are built on first use, so a caller that only evaluates
    never decodes the training set."""

    def __init__(self, make, num_classes, class_names, train_size, test_size, steps_per_epoch,
                 image_size, service_parts=None):
        self._make = make
        self.service_parts = service_parts  # data_service.training_stream's pieces
        self.num_classes = num_classes
        self.class_names = class_names
        self.train_size = train_size
        self.test_size = test_size
        self.steps_per_epoch = steps_per_epoch  # train_size // global batch (rest dropped)
        self.image_size = image_size

    @functools.cached_property
    def train(self):
        """Shuffled (a fresh full permutation per epoch), augmented, one-hot, full batches."""
        return self._make("train")

    @functools.cached_property
    def test(self):
        """Every test image once, in order, eval-preprocessed."""
        return self._make("test")

    @functools.cached_property
    def calibration(self):
        """Training images in a seeded uniform random order, eval-preprocessed (int8
        calibration takes the first few hundred)."""
        return self._make("calibration")


@dataclasses.dataclass(frozen=True)
class _Split:
    """One split of a source: `size` examples that `examples()` yields in stored order as
    (image, int32 label), and that `read(index)` returns one at a time (None for sources
    without random access: tfds before caching). `encoded`: images are file bytes."""

    size: int
    examples: object
    read: object = None
    encoded: bool = False
    key: str = ""  # identifies the content (paths / tfds split) for the disk cache's file name


@dataclasses.dataclass(frozen=True)
class _Source:
    train: _Split
    test: _Split
    class_names: tuple


def _indexed(size, read, encoded=False, key=""):
    """A `_Split` whose stored order is `read(0), read(1), ...`."""
    def examples():
        return tf.data.Dataset.range(size).map(read, num_parallel_calls=AUTOTUNE)
    return _Split(size, examples, read, encoded, key)


def _array_split(images, labels):
    """A split read from uint8 arrays [N, H, W, C] (C = 1 is repeated to RGB on read)."""
    images, labels = tf.constant(images), tf.constant(np.asarray(labels, "int32").reshape(-1))

    def read(index):
        image = tf.gather(images, index)
        if image.shape[-1] == 1:
            image = tf.image.grayscale_to_rgb(image)
        return image, tf.gather(labels, index)

    return _indexed(int(labels.shape[0]), read)


def epoch_order(size, seed):
    """The indices 0..size-1 in a fresh seeded random order each time the dataset is iterated
    (each epoch): `tf.random.experimental.index_shuffle` keyed by (seed, a per-epoch draw), O(1)
    memory at any size, the same orders for the same seed."""
    per_epoch = tf.data.Dataset.random(seed=seed + 3, rerandomize_each_iteration=True).take(1)

    def permutation(epoch_key):
        key = tf.stack([tf.constant(seed, tf.int64), epoch_key])
        return tf.data.Dataset.range(size).map(
            lambda i: tf.random.experimental.index_shuffle(i, key, size - 1))

    return per_epoch.flat_map(permutation).apply(tf.data.experimental.assert_cardinality(size))


def build_datasets(dataset="digits", image_size=32, global_batch_size=64, augment=None,
                   data_dir=None, seed=0, validation_split=0.1, eval_crop_pct=1.0,
                   cache="auto", cache_budget_mb=DEFAULT_CACHE_BUDGET_MB, cache_dir=None):
    """Train and test `tf.data` pipelines yielding `(images, labels)`.

    `dataset` is "digits" (offline, scikit-learn), "keras:NAME" (mnist, fashion_mnist, cifar10,
    cifar100 from Keras's cache, see `_keras_source`), a tensorflow-datasets name ("cifar10"
    or "tfds:cifar10", any data set with an Image and a ClassLabel feature, read from
    `data_dir`, never downloaded), or an image folder ("folder:/path" or a path; one
    sub-folder per class, see `_folder_source`). Images are 0-255 pixels (uint8, or float32
    once augmented or resized; the model normalises itself), labels one-hot float32 (soft
    after mixup/cutmix).

    Train: each epoch a fresh permutation of the whole split (`epoch_order`), decoded images
    from the cache, augmented per image (`augment`, a `config.AugmentConfig`; None = none),
    batched by the GLOBAL batch with `drop_remainder=True` so every step has the same static
    shape (XLA compiles once), then mixed per batch. Under a `tf.distribute` strategy, Keras
    `fit` splits each global batch across replicas, so pass the global batch here. Test: resize
    the short side to `image_size / eval_crop_pct` (bicubic) and centre-crop `image_size`
    (timm's eval transform; 0.96 for the ImageNet checkpoints), no augmentation, last partial
    batch kept. Data sets without a test split hold out `validation_split` of train.

    `cache` (encoded sources: folders, tfds): "auto" decodes every image once and keeps the
    uint8 pixels in memory while they fit `cache_budget_mb`, spilling to a file in `cache_dir`
    (a temporary folder if None) past it; "memory" / "disk" force one; "off" decodes every
    epoch (a tfds set then falls back to shuffled files + a buffer: approximate).
    """
    augment = augment or config.AugmentConfig()
    if not 0.0 < eval_crop_pct <= 1.0:
        raise ValueError(f"eval_crop_pct must be in (0, 1]. Received {eval_crop_pct!r}")
    if not 0.0 < validation_split < 1.0:
        raise ValueError(f"validation_split must be in (0, 1). Received {validation_split!r}")
    if cache not in CACHE_MODES:
        raise ValueError(f"cache must be one of {CACHE_MODES}. Received cache={cache!r}")
    if cache_budget_mb < 0:
        raise ValueError(f"cache_budget_mb must be >= 0. Received {cache_budget_mb!r}")
    kind, name = _parse_dataset(dataset)
    if kind == "digits":
        source = _digits_source(image_size, seed)
    elif kind == "keras":
        source = _keras_source(name)
    elif kind == "folder":
        source = _folder_source(name, validation_split, seed)
    else:
        source = _tfds_source(name, data_dir, validation_split, seed)

    steps = source.train.size // global_batch_size
    if steps < 1:
        raise ValueError(
            f"The global batch ({global_batch_size}) is larger than the training set "
            f"({source.train.size} images of {dataset!r}); lower --batch-size."
        )
    num_classes = len(source.class_names)
    budget = dict(auto=cache_budget_mb * 2**20, memory=float("inf"), disk=0, off=None)[cache]
    cached = {}

    def split(which):
        """`which` split, decoded into the cache on first use (memory budget shared)."""
        if which not in cached:
            raw = getattr(source, which)
            if not raw.encoded or cache == "off":
                cached[which] = raw
            else:
                spent = sum(s.nbytes for s in cached.values() if isinstance(s, _CachedSplit)
                            and s.in_memory)
                cached[which] = _decode_once(raw, max(0, budget - spent), cache_dir, which)
        return cached[which]

    def decode(image, encoded):
        if encoded:
            return preprocessing.decode_image(image)
        return tf.ensure_shape(image, [None, None, 3])

    def eval_map(image, label, encoded):
        return preprocessing.resize_centre_crop(decode(image, encoded), image_size,
                                                eval_crop_pct), label

    def train_map(image, label, seed_pair, encoded):
        if augment.crop_scale:  # file bytes: a JPEG decodes only the crop's window
            return augment_lib.augment_image(image, seed_pair, augment, image_size,
                                             encoded=encoded), label
        image = preprocessing.resize_centre_crop(decode(image, encoded), image_size, 1.0)
        if augment.per_image:
            image = augment_lib.augment_image(image, seed_pair, augment, image_size)
        return image, label

    def batch_map(images, labels, seed_pair):
        labels = tf.one_hot(labels, num_classes)
        if augment.per_batch:
            images, labels = augment_lib.mix_batch(images, labels, seed_pair, augment)
        return images, labels

    def evaluation(ds, encoded):
        ds = ds.map(lambda x, y: eval_map(x, y, encoded), num_parallel_calls=AUTOTUNE)
        return ds.batch(global_batch_size).map(
            lambda x, y: (x, tf.one_hot(y, num_classes)), num_parallel_calls=AUTOTUNE
        ).prefetch(AUTOTUNE)

    def make(which):
        if which == "test":
            test = split("test")
            return evaluation(test.examples(), test.encoded)
        train = split("train")
        if train.read is None:  # tfds with cache="off": the best a stream allows
            ordered, read = _tfds_stream_shuffled(train, seed), lambda example: example
        else:
            ordered = epoch_order(train.size, seed + (2 if which == "calibration" else 0))
            read = train.read
        if which == "calibration":
            return evaluation(ordered.map(read, num_parallel_calls=AUTOTUNE), train.encoded)
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        # One map reads, decodes and augments (fewer tf.data stages per image).
        ds = tf.data.Dataset.zip(ordered, seeds).map(
            lambda i, s: train_map(*read(i), s, train.encoded), num_parallel_calls=AUTOTUNE)
        ds = ds.batch(global_batch_size, drop_remainder=True)
        batch_seeds = tf.data.Dataset.random(seed=seed + 1, rerandomize_each_iteration=True)
        ds = tf.data.Dataset.zip(ds, batch_seeds.batch(2)).map(
            lambda xy, s: batch_map(*xy, s), num_parallel_calls=AUTOTUNE)
        return ds.prefetch(AUTOTUNE)

    def service_parts():
        """The training pipeline's pieces for `data_service.training_stream`: the source's own
        reader (files or arrays, never the cache), the per-image and per-batch maps."""
        raw = source.train
        if raw.read is None:
            raise ValueError(f"--data-service needs a source with random access (an image "
                             f"folder, digits or keras:NAME); {dataset!r} is read as a stream.")
        return dict(size=raw.size, read=raw.read, encoded=raw.encoded, image_map=train_map,
                    batch_map=batch_map, batch_size=global_batch_size)

    return Datasets(make, num_classes=num_classes, class_names=tuple(source.class_names),
                    train_size=source.train.size, test_size=source.test.size,
                    steps_per_epoch=steps, image_size=image_size, service_parts=service_parts)


def _parse_dataset(dataset):
    """("digits" | "keras" | "folder" | "tfds", name) from the `dataset` string."""
    if not isinstance(dataset, str) or not dataset.strip():
        raise ValueError(f"dataset must be a non-empty string. Received {dataset!r}")
    if dataset == "digits":
        return "digits", dataset
    for prefix in ("folder:", "tfds:", "keras:"):
        if dataset.startswith(prefix):
            return prefix[:-1], dataset[len(prefix):]
    if os.sep in dataset or dataset.startswith(".") or os.path.isdir(dataset):
        return "folder", dataset
    return "tfds", dataset


# ---------------------------------------------------------------- the decoded-image cache


@dataclasses.dataclass(frozen=True)
class _CachedSplit(_Split):
    nbytes: int = 0
    in_memory: bool = True


def _decode_once(split, budget_bytes, cache_dir, which):
    """`split` with its images decoded once to uint8, in stored order: a flat buffer + offsets
    + shapes (any image sizes), held in memory while it fits `budget_bytes`, else written to
    `<cache_dir>/<content hash>.u8` and read back through a memory map. A complete file from an
    earlier run of the same content is reused (a resumed run does not decode again)."""
    start = time.monotonic()
    name = hashlib.sha1(f"{split.key}|{split.size}".encode()).hexdigest()[:16]
    temporary = cache_dir is None  # a file only this process reads: unlinked once mapped
    path = os.path.join(cache_dir or "", f"{which}-{name}")
    reused = (not temporary and split.key and os.path.exists(path + ".npz")
              and os.path.exists(path + ".u8"))
    if reused:
        with np.load(path + ".npz") as index:
            offsets, shapes, labels = index["offsets"], index["shapes"], index["labels"]
        flat, in_memory = None, False
    else:
        decoded = split.examples().map(lambda x, y: (preprocessing.decode_image(x), y),
                                       num_parallel_calls=AUTOTUNE, deterministic=True)
        chunks, shapes, labels, total, file = [], [], [], 0, None
        for image, label in decoded.as_numpy_iterator():
            if file is None and total + image.nbytes > budget_bytes:
                if temporary:
                    cache_dir = tempfile.mkdtemp(prefix="convmixer_cache_")
                    path = os.path.join(cache_dir, f"{which}-{name}")
                os.makedirs(cache_dir, exist_ok=True)
                file = open(path + ".u8.tmp", "wb")
                for chunk in chunks:
                    file.write(chunk.tobytes())
                chunks = None
            if file is None:
                chunks.append(image.reshape(-1))
            else:
                file.write(image.tobytes())
            shapes.append(image.shape)
            labels.append(label)
            total += image.nbytes
        shapes = np.asarray(shapes, np.int64).reshape(-1, 3)
        labels = np.asarray(labels, np.int32)
        offsets = np.concatenate([[0], np.cumsum(np.prod(shapes, axis=1))]).astype(np.int64)
        in_memory = file is None
        if in_memory:
            flat = np.concatenate(chunks) if chunks else np.zeros(0, np.uint8)
            del chunks
        else:
            file.close()
            np.savez(path + ".npz.tmp.npz", offsets=offsets, shapes=shapes, labels=labels)
            os.replace(path + ".u8.tmp", path + ".u8")
            os.replace(path + ".npz.tmp.npz", path + ".npz")  # last: marks the cache complete
    nbytes = int(offsets[-1])
    where = "memory" if in_memory else path + ".u8" + (" (temporary)" if temporary else "")
    _log(
        f"{'Reused' if reused else 'Decoded'} {len(labels):,} {which} images"
        f"{'' if reused else ' once'}: "
        f"{nbytes / 2**20:,.0f} MB of uint8 pixels in {where} ({time.monotonic() - start:.1f} s)")

    labels_t = tf.constant(labels)
    offsets_t, shapes_t = tf.constant(offsets), tf.constant(shapes)
    if in_memory:
        flat_t = tf.constant(flat)
        del flat

        def pixels(index):
            return tf.reshape(flat_t[offsets_t[index]:offsets_t[index + 1]], shapes_t[index])
    else:
        mapped = np.memmap(path + ".u8", np.uint8, "r") if nbytes else np.zeros(0, np.uint8)
        if temporary:  # the mapping stays valid; the file goes when the process ends
            for suffix in (".u8", ".npz"):
                os.remove(path + suffix)
            os.rmdir(cache_dir)

        def fetch(index):
            return np.array(mapped[offsets[index]:offsets[index + 1]]).reshape(shapes[index])

        def pixels(index):
            return tf.numpy_function(fetch, [index], tf.uint8, stateful=False)

    def read(index):
        return tf.ensure_shape(pixels(index), [None, None, 3]), tf.gather(labels_t, index)

    def examples():
        return tf.data.Dataset.range(len(labels)).map(read, num_parallel_calls=AUTOTUNE)

    return _CachedSplit(len(labels), examples, read, False, split.key, nbytes, in_memory)


# ---------------------------------------------------------------- the run log's input share


class InputShare(keras.callbacks.Callback):
    """Prints one line after the first epoch: the training pipeline's images/s alone (timed
    over `batches` batches once the epoch is done) against fit's images/s, and the share of a
    step the input costs on these cores; it names the pipeline as the bottleneck above half."""

    def __init__(self, dataset, batch_size, batches=20):
        super().__init__()
        self.dataset, self.batch_size, self.batches = dataset, batch_size, batches
        self.times = []

    def on_train_batch_end(self, batch, logs=None):
        if len(self.times) <= 200:
            self.times.append(time.perf_counter())

    def on_epoch_end(self, epoch, logs=None):
        if epoch != 0 or len(self.times) < 3:
            return
        # The first step compiles; time the ones after it.
        step = (self.times[-1] - self.times[0]) / (len(self.times) - 1)
        pipeline = measure_pipeline(self.dataset, self.batches)
        _log(input_share_line(pipeline, step, self.batch_size))


def measure_pipeline(dataset, batches=20):
    """Seconds per batch of `dataset` alone (after one warm-up batch)."""
    iterator = iter(dataset)
    next(iterator)
    start = time.perf_counter()
    count = 0
    for _ in range(batches):
        try:
            next(iterator)
        except StopIteration:
            break
        count += 1
    return (time.perf_counter() - start) / max(count, 1)


def input_share_line(pipeline_seconds, step_seconds, batch_size):
    """The run log's one line on the input pipeline (seconds per batch of each)."""
    share = pipeline_seconds / step_seconds if step_seconds > 0 else 0.0
    line = (f"Input pipeline: {batch_size / pipeline_seconds:,.0f} images/s alone, training "
            f"{batch_size / step_seconds:,.0f} images/s; the input costs ~{share:.0%} of a step's "
            f"time on these cores")
    if share > 0.5:
        line += (" -- the input pipeline is the bottleneck (cache on? fewer/lighter "
                 "augmentations? more CPU cores?)")
    return line


# ---------------------------------------------------------------- sources


def _digits_source(image_size, seed):
    (x_train, y_train), (x_test, y_test) = load_digits(image_size, seed=seed)
    return _Source(_array_split(x_train, y_train), _array_split(x_test, y_test),
                   DIGITS_CLASS_NAMES)


def keras_cache_dir():
    """The folder `keras.datasets.*.load_data()` read from: `$KERAS_HOME/datasets`
    (default ~/.keras/datasets; Keras falls back to /tmp/.keras when that is not writable)."""
    from keras.src.backend import config as keras_config  # where Keras keeps it (no public API)

    base = os.path.expanduser(keras_config.keras_home())
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
    return _Source(_array_split(x_train, y_train), _array_split(x_test, y_test),
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

    return _Source(_file_split(train), _file_split(test), tuple(classes))


def _file_split(pairs):
    """A split of (path, label) pairs: `read(i)` reads file i's bytes (decoded later)."""
    paths, labels = zip(*pairs)
    paths_t, labels_t = tf.constant(list(paths)), tf.constant(np.array(labels, "int32"))

    def read(index):
        return tf.io.read_file(tf.gather(paths_t, index)), tf.gather(labels_t, index)

    key = hashlib.sha1("\n".join(f"{p}:{y}" for p, y in pairs).encode()).hexdigest()
    return _indexed(len(pairs), read, encoded=True, key=key)


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
        return _Split(info.splits[split].num_examples, functools.partial(load, split),
                      None, True, key)

    return _Source(split_of(train_split), split_of(test_split),
                   tuple(info.features[label_key].names))


def _tfds_stream_shuffled(split, seed, buffer=16384):
    """A tfds training split read without the cache: files shuffled per epoch, interleaved,
    then a `buffer`-element shuffle. Approximate: with few files or a class-sorted file, the
    head of an epoch is not a uniform sample (use the cache for that)."""
    _log(
        f"Warning: cache='off' reads tfds examples in stored order with a {buffer:,}-example "
        f"shuffle buffer; an epoch's first batches are not a uniform sample when the files are "
        f"few or class-sorted. Use --cache auto/disk for a full shuffle.")
    return split.examples(shuffle_seed=seed).shuffle(
        min(split.size, buffer), seed=seed, reshuffle_each_iteration=True)
