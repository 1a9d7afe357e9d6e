"""Pipeline assembly: `build_datasets` turns a source into train / test / calibration
`tf.data` pipelines.

Training reads a stream of global positions g = epoch * n + i (n = images per epoch). Position
g is example `index_shuffle(i, key=(seed, epoch))`: every epoch a fresh uniform permutation of
the whole split, keyed by (seed, epoch number) alone, so every worker and a resumed run read the
same order; its augmentation is seeded by (seed, g) and its batch's mixing by (seed, batch g),
so a run killed mid-epoch and resumed ends with the uninterrupted run's weights. Under several
input pipelines (workers) each takes only its own slice of every global batch, chosen from
positions before any file is read.
"""

import functools
import logging
import time

import keras
import numpy as np
import tensorflow as tf

from convmixer_tf import preprocessing
from convmixer_tf.training import augment as augment_lib, config
from convmixer_tf.training.data import cache as cache_lib, sources
from convmixer_tf.training.data.sources import AUTOTUNE, plain as _plain

logger = logging.getLogger(__name__)

DEFAULT_CACHE_BUDGET_MB = config.TrainConfig.cache_budget_mb  # MB of decoded pixels in memory
_NO_CONTEXT = tf.distribute.InputContext()  # one pipeline, one replica


def epoch_permutation(positions, size, seed, used):
    """Example index of each global position: position g is index_shuffle(g % used) of epoch
    g // used under key (seed, epoch); `used` <= size images are read per epoch."""
    epoch = positions // used
    key = tf.stack([tf.cast(seed, tf.int64) + tf.zeros_like(epoch), epoch], axis=-1)
    return tf.random.experimental.index_shuffle(positions % used, key, size - 1)


def epoch_order(size, seed, epoch=0):
    """The indices 0..size-1 of epoch `epoch`'s permutation (every index once)."""
    return tf.data.Dataset.range(epoch * size, (epoch + 1) * size).map(
        _plain(lambda g: epoch_permutation(g, size, seed, size)))


def _strict(split, x):
    """The pixels of an encoded `split`'s `x`; an error for an unreadable image."""
    if split.decode is None:
        return preprocessing.decode_image(x)
    image, valid = split.decode(x)
    with tf.control_dependencies([tf.debugging.assert_equal(valid, True, "unreadable image")]):
        return tf.identity(image)


class Datasets:
    """What `build_datasets` returns: the pipelines and what a trainer needs to know.

    `train` (one epoch: `epoch`, a tf.Variable), `test` and `calibration` are built on first
    use, so a caller that only evaluates never decodes the training set. `train_stream` and
    `test_shard` are the per-input-pipeline versions for `distribute_datasets_from_function`."""

    def __init__(self, pipeline, num_classes, class_names, train_size, test_size,
                 steps_per_epoch, image_size):
        self._pipeline = pipeline
        self.num_classes = num_classes
        self.class_names = class_names
        self.train_size = train_size
        self.test_size = test_size
        self.steps_per_epoch = steps_per_epoch  # train_size // global batch (rest dropped)
        self.image_size = image_size
        self.epoch = pipeline.epoch  # where `train` starts
        self.skipped = pipeline.skipped  # unreadable images met

    def train_stream(self, input_context=None, steps_per_epoch=None):
        """Every epoch from `epoch` on, without end: `steps_per_epoch` batches each (default
        all), of the per-replica batch; the input pipeline `input_context` names reads only
        its share of each global batch."""
        return self._pipeline.train(input_context or _NO_CONTEXT,
                                    steps_per_epoch or self.steps_per_epoch)

    def service_stream(self, steps_per_epoch, epochs, start_epoch, send):
        """Every epoch from `start_epoch` to `epochs` run by the tf.data service: `send`
        (e.g. `data_service.distribute` with its address) takes the graph-only stream and
        returns what the service serves; the trainer reads that (`_Pipeline.service_stream`)."""
        return self._pipeline.service_stream(steps_per_epoch, epochs, start_epoch, send)

    def test_shard(self, input_context=None):
        """The test split for one input pipeline: alone, every image once; one of several,
        its share of each global batch padded to equal length with weight-0 examples (every
        worker runs the same number of steps; weighted metrics stay exact)."""
        return self._pipeline.test(input_context or _NO_CONTEXT)

    def wait_for_cache(self):
        """Blocks until the decoded caches made so far are full (training need not wait: the
        images not cached yet are decoded from their files)."""
        for split in self._pipeline.splits.values():
            if isinstance(split, cache_lib.CachedSplit):
                split.store.wait()

    @functools.cached_property
    def train(self):
        """One epoch (`epoch`): a fresh full permutation, augmented, one-hot, full batches."""
        return self.train_stream().take(self.steps_per_epoch)

    @functools.cached_property
    def test(self):
        """Every test image once, in order, eval-preprocessed."""
        return self.test_shard()

    @functools.cached_property
    def calibration(self):
        """Training images in a seeded uniform random order, eval-preprocessed (int8
        calibration takes the first few hundred)."""
        return self._pipeline.calibration()


class _Pipeline:
    """The pieces `Datasets` assembles: the splits (cached on first use) and the maps."""

    def __init__(self, source, image_size, batch_size, augment, seed, eval_crop_pct, cache,
                 memory_budget, disk_budget, cache_dir):
        self.source, self.image_size, self.batch_size = source, image_size, batch_size
        self.augment, self.seed, self.eval_crop_pct = augment, seed, eval_crop_pct
        self.cache, self.memory_budget, self.disk_budget = cache, memory_budget, disk_budget
        self.cache_dir = cache_dir
        self.num_classes = len(source.class_names)
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="data_epoch")
        self.skipped = cache_lib.Skipped(source.train.paths)
        self.splits = {}

    def split(self, which):
        """`which` split as the cache decision makes it (decoded once, or as stored)."""
        if which not in self.splits:
            raw = getattr(self.source, which)
            if not raw.encoded:
                self.splits[which] = raw
            else:
                spent = sum(s.store.nbytes for s in self.splits.values()
                            if isinstance(s, cache_lib.CachedSplit) and s.store.in_memory)
                decision = cache_lib.decide(self.cache, raw, max(0, self.memory_budget - spent),
                                            self.disk_budget, self.seed)
                logger.info(f"Input cache ({which}): {decision.mode} -- {decision.reason}")
                self.splits[which] = (raw if decision.mode == "stream" else
                                       cache_lib.decode_once(raw, decision, self.cache_dir, which))
        return self.splits[which]

    # ------------------------------------------------------------ per-image maps

    def _decoded(self, indices, split, skipped=None):
        """(image uint8 [H, W, 3], label, *extra) of each (index, *extra); encoded files are
        decoded with a validity flag and unreadable ones skipped (noted in `skipped`)."""
        def read(index, *extra):
            image, label = split.read(index)
            return image, (index, label, *extra)

        ds = indices.map(_plain(read), num_parallel_calls=AUTOTUNE)
        skipped = skipped or cache_lib.Skipped(())
        if split.decode is not None:  # the cache: its own validity flag
            ds = skipped.filter(ds.map(_plain(lambda x, meta: (*split.decode(x), meta)),
                                       num_parallel_calls=AUTOTUNE))
        elif split.encoded:
            ds = skipped.filter(cache_lib.decode_flagged(ds))
        return ds.map(_plain(lambda image, meta: (image, *meta[1:])))

    def _train_image(self, image, seed_pair, cropped=False):
        augment = self.augment
        if augment.crop_scale:
            return augment_lib.augment_image(image, seed_pair, augment, self.image_size,
                                             cropped=cropped)
        image = preprocessing.resize_centre_crop(image, self.image_size, 1.0)
        if augment.per_image:
            image = augment_lib.augment_image(image, seed_pair, augment, self.image_size)
        return image

    def _eval_image(self, image):
        return preprocessing.resize_centre_crop(image, self.image_size, self.eval_crop_pct)

    # ------------------------------------------------------------ the three pipelines

    def train(self, context, steps_per_epoch):
        """The endless training stream of one input pipeline (module docstring)."""
        train = self.split("train")
        if train.read is None:  # tfds streamed (no random access): the best a stream allows
            return self._tfds_train(train, context, steps_per_epoch)
        batch, share = self._shares(context)
        used = steps_per_epoch * self.batch_size
        offset = context.input_pipeline_id * share
        seed = self.seed

        def position(k):  # the k-th example this pipeline reads -> its global position
            return (k // share) * self.batch_size + offset + k % share

        start = tf.data.Dataset.from_tensors(0).map(_plain(lambda _: self.epoch.read_value()))
        local = start.flat_map(_plain(lambda epoch: tf.data.Dataset.range(
            epoch * steps_per_epoch * share, tf.int64.max)))
        positions = local.map(_plain(position))
        indices = positions.map(
            _plain(lambda g: (epoch_permutation(g, train.size, seed, used), g)))
        ds = self._augmented(indices, train, self.skipped).batch(batch, drop_remainder=True)
        return ds.map(_plain(self._mix), num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE)

    def _augmented(self, indices, split, skipped):
        """(augmented image, label, g, *counts) of each (index, g), seeded by (seed, g).
        Unreadable files are dropped (`skipped`: a `cache.Skipped` names them, a
        `cache.CountSkipped` appends counts). Files (not the cache's whole images) under a
        random-resized crop are decoded and cropped inside the validity check
        (`augment.decode_crop`), so a JPEG decodes only its crop's window (~half the decode
        work on average); the rest of the transform is a plain parallel map (inside the check
        it would be instantiated per file)."""
        def seed_pair(g):
            return tf.stack([tf.cast(self.seed, tf.int64), g])

        if split.encoded and self.augment.crop_scale and split.decode is None:
            def read(index, g):
                image, label = split.read(index)
                return image, (index, label, g)

            size = self.image_size
            flagged = cache_lib.decode_flagged(
                indices.map(_plain(read), num_parallel_calls=AUTOTUNE),
                decode=lambda x, meta: augment_lib.decode_crop(x, seed_pair(meta[2]),
                                                               self.augment, size),
                placeholder=np.zeros((size, size, 3), np.float32))
            images = skipped.filter(flagged).map(_plain(lambda image, meta: (image, *meta[1:])))
            cropped = True
        else:
            images, cropped = self._decoded(indices, split, skipped), False
        return images.map(_plain(lambda image, label, g, *counts: (
            self._train_image(image, seed_pair(g), cropped), label, g, *counts)),
            num_parallel_calls=AUTOTUNE)

    def service_stream(self, steps_per_epoch, epochs, start_epoch, send):
        """The training stream for the tf.data service (`data_service` module docstring):
        the local stream's positions, order, augmentation and mixing, from one splittable
        `Dataset.range` over epochs `start_epoch`..`epochs` plus a spare one (what workers
        drop at the end), read by the source's own reader (the decoded cache does not
        serialize), graph ops only. `send(dataset)` hands it to the service; what comes back
        is fit's input. Unreadable files are skipped on the workers and counted, unnamed."""
        train = self.source.train
        if train.read is None:
            raise ValueError("--data-service needs a source with random access (an image "
                             "folder, digits or keras:NAME); a tfds set is read as a stream: "
                             "drop --data-service or use the folder of its images.")
        used, seed = steps_per_epoch * self.batch_size, self.seed
        positions = tf.data.Dataset.range(start_epoch * used, (epochs + 1) * used)
        indices = positions.map(
            _plain(lambda g: (epoch_permutation(g, train.size, seed, used), g)))
        ds = self._augmented(indices, train, cache_lib.CountSkipped())
        if not train.encoded:  # arrays: nothing to skip
            ds = ds.map(_plain(lambda x, y, g: (x, y, g, tf.constant(0, tf.int64))))
        ds = ds.batch(self.batch_size, drop_remainder=True)
        ds = ds.map(_plain(lambda x, y, g, dropped: (*self._mix(x, y, g),
                                                     tf.reduce_sum(dropped))),
                    num_parallel_calls=AUTOTUNE)
        served = send(ds.prefetch(AUTOTUNE))

        def note(x, y, dropped):  # on the trainer: tell SkippedImages
            counted = tf.cond(dropped > 0, lambda: tf.py_function(self.skipped.count,
                                                                  [dropped], tf.bool),
                              lambda: tf.constant(True))
            with tf.control_dependencies([counted]):
                return tf.identity(x), y

        return served.map(_plain(note))

    def _mix(self, images, labels, positions):
        labels = tf.one_hot(labels, self.num_classes)
        if self.augment.per_batch:
            seed_pair = tf.stack([tf.cast(self.seed + 1, tf.int64), positions[0]])
            images, labels = augment_lib.mix_batch(images, labels, seed_pair, self.augment)
        return images, labels

    def _shares(self, context):
        """(per-replica batch, examples per global batch this input pipeline reads)."""
        batch = context.get_per_replica_batch_size(self.batch_size)
        replicas_here = context.num_replicas_in_sync // context.num_input_pipelines
        return batch, batch * max(1, replicas_here)

    def _tfds_train(self, train, context, steps_per_epoch):
        """A streamed tfds split (no random access): shuffled files + a buffer, repeated;
        approximate and not keyed by epoch (a warning says so; the cache avoids it). Several
        workers keep every N-th example of the stream (each still reads all of it)."""
        ordered = sources.tfds_stream_shuffled(train, self.seed)
        if context.num_input_pipelines > 1:
            ordered = ordered.shard(context.num_input_pipelines, context.input_pipeline_id)
        batch, _ = self._shares(context)
        seeds = tf.data.Dataset.random(seed=self.seed, rerandomize_each_iteration=True).batch(2)
        images = ordered.map(_plain(lambda x, y: (preprocessing.decode_image(x), y)),
                             num_parallel_calls=AUTOTUNE)
        ds = tf.data.Dataset.zip(images, seeds).map(
            _plain(lambda xy, s: (self._train_image(xy[0], s), xy[1])),
            num_parallel_calls=AUTOTUNE)
        ds = ds.batch(batch, drop_remainder=True).enumerate().map(
            _plain(lambda b, xy: self._mix(xy[0], xy[1], tf.fill([batch], b))))
        return ds.repeat().prefetch(AUTOTUNE)

    def test(self, context):
        """Test batches; one of several input pipelines gets its weighted, padded share."""
        test = self.split("test")
        workers, worker = context.num_input_pipelines, context.input_pipeline_id
        if workers == 1:
            ds = self._decoded(tf.data.Dataset.range(test.size), test)
            ds = ds.map(_plain(lambda x, y: (self._eval_image(x), y)), num_parallel_calls=AUTOTUNE)
            return ds.batch(self.batch_size).map(
                _plain(lambda x, y: (x, tf.one_hot(y, self.num_classes))),
                num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE)
        batch, share = self._shares(context)
        steps = -(-test.size // self.batch_size)
        k = tf.data.Dataset.range(steps * share)
        positions = k.map(
            _plain(lambda k: (k // share) * self.batch_size + worker * share + k % share))
        weighted = positions.map(_plain(lambda g: (tf.minimum(g, test.size - 1),
                                            tf.cast(g < test.size, tf.float32))))
        ds = weighted.map(_plain(lambda i, w: (*test.read(i), w)), num_parallel_calls=AUTOTUNE)
        if test.encoded:  # a broken test file would be a weight-1 hole: decode (strict)
            ds = ds.map(_plain(lambda x, y, w: (_strict(test, x), y, w)),
                        num_parallel_calls=AUTOTUNE)
        ds = ds.map(_plain(lambda x, y, w: (self._eval_image(x),
                                            tf.one_hot(y, self.num_classes), w)),
                    num_parallel_calls=AUTOTUNE)
        return ds.batch(batch).prefetch(AUTOTUNE)

    def calibration(self):
        """Training images in another seeded permutation, eval-preprocessed."""
        train = self.split("train")
        if train.read is None:
            ordered = sources.tfds_stream_shuffled(train, self.seed)
            images = ordered.map(_plain(lambda x, y: (preprocessing.decode_image(x), y)))
        else:
            images = self._decoded(epoch_order(train.size, self.seed + 2), train)
        ds = images.map(_plain(lambda x, y: (self._eval_image(x), y)), num_parallel_calls=AUTOTUNE)
        return ds.batch(self.batch_size).map(
            _plain(lambda x, y: (x, tf.one_hot(y, self.num_classes))),
            num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE)


def build_datasets(dataset="digits", image_size=32, global_batch_size=64, augment=None,
                   data_dir=None, seed=0, validation_split=0.1, eval_crop_pct=1.0,
                   cache="auto", cache_budget_mb=DEFAULT_CACHE_BUDGET_MB, cache_dir=None,
                   cache_disk_budget_gb=0.0, strict_images=False):
    """Train and test `tf.data` pipelines yielding `(images, labels)`.

    `dataset` is "digits" (offline, scikit-learn), "keras:NAME" (mnist, fashion_mnist, cifar10,
    cifar100 from Keras's cache), a tensorflow-datasets name ("cifar10" or "tfds:cifar10",
    read from `data_dir`, never downloaded), or an image folder ("folder:/path" or a path; one
    sub-folder per class): `sources.SOURCES`. Images are 0-255 pixels (uint8, or float32 once
    augmented or resized; the model normalises itself), labels one-hot float32 (soft after
    mixup/cutmix). Values are checked by `config.TrainConfig`.

    Train: the epochs' permutations (module docstring), decoded images, augmented per image
    (`augment`, a `config.AugmentConfig`; None = none), batched by the GLOBAL batch with
    `drop_remainder=True`, then mixed per batch. Test: short side to `image_size /
    eval_crop_pct` (bicubic), centre crop (timm's eval transform), last partial batch kept.
    Data sets without a test split hold out `validation_split` of train.

    `cache` (encoded sources: folders, tfds), decided before anything is decoded from the
    file count and ~64 image headers (`cache.decide`) and filled in the background while
    training starts (`cache.Store`): "auto" keeps decoded uint8 pixels in memory when they fit
    `cache_budget_mb`, else in a file in `cache_dir` (a temporary folder if None) when they fit
    `cache_disk_budget_gb`, else streams (reads and decodes every epoch); "memory" / "disk"
    force one; "off" streams. Unreadable images are skipped and named in the log;
    `strict_images` refuses them before any training instead.
    """
    augment = augment or config.AugmentConfig()
    source = sources.load_source(dataset, image_size=image_size, seed=seed,
                                 validation_split=validation_split, data_dir=data_dir)
    if strict_images and source.train.paths:
        sources.check_images(source.train.paths + source.test.paths)
    steps = source.train.size // global_batch_size
    if steps < 1:
        raise ValueError(
            f"The global batch ({global_batch_size}) is larger than the training set "
            f"({source.train.size} images of {dataset!r}); lower --batch-size."
        )
    memory = dict(auto=cache_budget_mb * 2**20, memory=float("inf"), disk=0, off=0)[cache]
    pipeline = _Pipeline(source, image_size, global_batch_size, augment, seed, eval_crop_pct,
                         cache, memory, cache_disk_budget_gb * 2**30, cache_dir)
    return Datasets(pipeline, num_classes=len(source.class_names),
                    class_names=tuple(source.class_names), train_size=source.train.size,
                    test_size=source.test.size, steps_per_epoch=steps, image_size=image_size)


# ---------------------------------------------------------------- callbacks for the run log


class EpochKey(keras.callbacks.Callback):
    """Tells the training stream which epoch `fit` starts at (0, or the epoch a resumed run
    restarts), before the stream's iterator is made; later epochs follow in the stream."""

    def __init__(self, datasets):
        super().__init__()
        self.variable, self.set = datasets.epoch, False

    def on_train_begin(self, logs=None):
        self.set = False

    def on_epoch_begin(self, epoch, logs=None):
        if not self.set:
            self.variable.assign(epoch)
            self.set = True


class SkippedImages(keras.callbacks.Callback):
    """One line per epoch naming the unreadable training images the stream skipped."""

    def __init__(self, datasets):
        super().__init__()
        self.skipped = datasets.skipped

    def on_epoch_end(self, epoch, logs=None):
        names, unnamed = self.skipped.take(), self.skipped.take_unnamed()
        if unnamed:
            logger.info(f"Epoch {epoch + 1}: the data service's workers skipped {unnamed:,} "
                        "unreadable image(s) (graph-only filter: counted, names unknown; "
                        "--strict-images checks every file before training)")
        if names:
            logger.info(f"Epoch {epoch + 1}: skipped {len(names):,} unreadable image(s): "
                        f"{', '.join(sorted(set(names))[:10])}"
                        + (f" ... and {len(set(names)) - 10} more" if len(set(names)) > 10
                           else ""))


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
        logger.info(input_share_line(pipeline, step, self.batch_size))


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
