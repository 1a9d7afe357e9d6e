"""The decoded-image cache: decide memory / disk / stream BEFORE decoding anything, from the
file count and a small sample of image headers; then decode once in the background while
training starts (a `Store`: chunks of images from one flat parallel map, kept in memory or
written to a file, disk only within an explicit budget), or decode every epoch (stream).

Unreadable images are skipped and named, never a crash mid-run: every read passes through
`decode_flagged`, which decodes each image with a validity flag (tf.data's `ignore_errors`
would drop the name); the store's fill carries each image's index through `ignore_errors`, so
an absent index names the file."""

import atexit
import dataclasses
import hashlib
import logging
import os
import tempfile
import threading
import time

import numpy as np
import tensorflow as tf

from convmixer_tf import preprocessing
from convmixer_tf.training.data.sources import AUTOTUNE, Split, plain as _plain

logger = logging.getLogger(__name__)

SAMPLE = 64  # headers read for the size estimate (a few KB each, in parallel)
_PLACEHOLDER = np.zeros((1, 1, 3), np.uint8)


@dataclasses.dataclass(frozen=True)
class Decision:
    """What the cache does with one split and why (the run log's line)."""

    mode: str  # memory | disk | stream
    estimate: int  # estimated decoded bytes of the whole split
    reason: str


def decide(mode, split, memory_budget, disk_budget, seed=0):
    """The `Decision` for an encoded `split` under `--cache mode` (auto/memory/disk/off) with
    byte budgets for memory and disk. Reads about `SAMPLE` headers, decodes nothing."""
    shapes = split.sample_shapes(SAMPLE, seed) if split.sample_shapes else []
    per_image = float(np.mean([np.prod(s) for s in shapes])) if shapes else 0.0
    estimate = int(per_image * split.size)
    sizes = (f"{split.size:,} images x ~{per_image:,.0f} bytes decoded "
             f"(mean of {len(shapes)} headers) = ~{estimate / 2**20:,.0f} MB")
    if mode == "off":
        return Decision("stream", estimate, f"--cache off; {sizes}")
    if mode in ("memory", "disk"):
        return Decision(mode, estimate, f"--cache {mode}; {sizes}")
    if estimate <= memory_budget:
        return Decision("memory", estimate, f"{sizes} fits the memory budget "
                                            f"({memory_budget / 2**20:,.0f} MB)")
    if estimate <= disk_budget:
        return Decision("disk", estimate, f"{sizes} exceeds the memory budget "
                                          f"({memory_budget / 2**20:,.0f} MB) and fits the disk "
                                          f"budget ({disk_budget / 2**30:,.1f} GB)")
    return Decision("stream", estimate,
                    f"{sizes} exceeds the memory budget ({memory_budget / 2**20:,.0f} MB) and "
                    f"the disk budget ({disk_budget / 2**30:,.1f} GB, --cache-disk-budget-gb): "
                    f"reading and decoding every epoch")


def decode_flagged(ds, cycle_length=None, decode=None, placeholder=_PLACEHOLDER):
    """`ds` of (encoded bytes, meta) -> (image uint8 [H, W, 3], valid, meta), `meta` (a tuple
    whose first field is the example's index) passed through: an image that fails to decode
    comes out as a 1x1 placeholder with valid=False, so the caller can count and name it.
    Decodes in parallel, in order. `decode(bytes, meta)` replaces the plain decode (e.g. the
    whole train transform, a JPEG decoding only its crop window), `placeholder` its failure.
    Graph ops only: it serializes for the tf.data service."""
    decode = decode or (lambda x, m: preprocessing.decode_image(x))

    def one(encoded, meta):
        good = tf.data.Dataset.from_tensors((encoded, meta)).map(
            _plain(lambda x, m: (decode(x, m), True, m))).ignore_errors()
        bad = tf.data.Dataset.from_tensors((tf.constant(placeholder), False, meta))
        return good.concatenate(bad).take(1)

    return ds.interleave(_plain(one), cycle_length=cycle_length or AUTOTUNE, block_length=1,
                         num_parallel_calls=AUTOTUNE, deterministic=True)


class Skipped:
    """Unreadable images met by the pipeline: `note(index)` (from tf.data, through
    `tf.py_function`) records one; `take()` returns and forgets the names seen since."""

    def __init__(self, paths):
        self.paths, self.seen = paths, []
        self.unnamed = 0  # skipped where names cannot travel (the tf.data service's workers)

    def note(self, index):
        self.seen.append(int(index))
        return False

    def count(self, n):
        """`n` more skipped, names unknown (from the trainer's side of the data service)."""
        self.unnamed += int(n)
        return True

    def filter(self, ds):
        """The valid elements of a `decode_flagged` dataset as (image, meta); notes others."""
        def keep(image, valid, meta):
            return tf.cond(valid, lambda: tf.constant(True),
                           lambda: tf.py_function(self.note, [meta[0]], tf.bool))
        return ds.filter(_plain(keep)).map(_plain(lambda image, valid, meta: (image, meta)))

    def take(self):
        seen, self.seen = self.seen, []
        return [self.paths[i] if i < len(self.paths) else f"example #{i}" for i in seen]

    def take_unnamed(self):
        unnamed, self.unnamed = self.unnamed, 0
        return unnamed


class CountSkipped:
    """Graph-only skipping for the tf.data service (its workers run no py_function): drops the
    unreadable elements of a `decode_flagged` dataset and appends to each kept element's meta
    how many were dropped just before it (per worker), so batches carry the count home."""

    def filter(self, ds):
        def step(dropped, element):
            image, valid, meta = element
            return (tf.where(valid, tf.constant(0, tf.int64), dropped + 1),
                    (image, valid, (*meta, dropped)))

        counted = ds.scan(tf.constant(0, tf.int64), _plain(step))
        return counted.filter(_plain(lambda image, valid, meta: valid)).map(
            _plain(lambda image, valid, meta: (image, meta)))


CHUNK = 64  # images per decoded chunk: one tf.data element, one numpy array (ImageNet: ~30 MB)


def decode_chunks(split, indices=None, chunk=CHUNK):
    """`split` (or only its examples `indices`) decoded in stored order, `chunk` images per
    element: (their flat uint8 pixels, shapes [k, 3], indices [k], labels [k]). Each element
    reads and decodes its files in one `tf.map_fn` inside a parallel map: no Python and no
    thread hand-off per file, which cost ~1 ms a file on a shared 2-core machine
    (benchmarks/results/cache-start-AVX2.log). A chunk holding an unreadable file is dropped
    whole by `ignore_errors` (its indices are absent): decode those files with `chunk=1`."""
    def decode(encoded, label):
        image = preprocessing.decode_image(encoded)
        return tf.reshape(image, [-1]), tf.shape(image, tf.int64), label

    spec = (tf.RaggedTensorSpec([None], tf.uint8, 0), tf.TensorSpec([3], tf.int64),
            tf.TensorSpec([], tf.int32))

    def decoded(index, one):  # one(k): the k-th file's decode
        pixels, shapes, labels = tf.map_fn(one, tf.range(tf.size(index)),
                                           fn_output_signature=spec)
        return pixels.flat_values, shapes, index, labels

    if split.read is not None:  # folders: each element reads its own files
        wanted = tf.data.Dataset.range(split.size) if indices is None else (
            tf.data.Dataset.from_tensor_slices(np.asarray(indices, np.int64)))
        ds = wanted.batch(chunk).map(
            _plain(lambda i: decoded(i, lambda k: decode(*split.read(i[k])))),
            num_parallel_calls=AUTOTUNE)
    else:  # tfds: stored order, no random access
        ds = split.examples().enumerate()
        if indices is not None:
            wanted = tf.constant(np.asarray(indices, np.int64))
            ds = ds.filter(_plain(lambda i, xy: tf.reduce_any(tf.equal(i, wanted))))
        ds = ds.batch(chunk).map(
            _plain(lambda i, xy: decoded(i, lambda k: decode(xy[0][k], xy[1][k]))),
            num_parallel_calls=AUTOTUNE)
    return ds.ignore_errors().prefetch(2)


_UNKNOWN, _READY, _BAD = 0, 1, 2  # each image's state in a `Store`


@dataclasses.dataclass(frozen=True)
class CachedSplit(Split):
    """A split served by a `Store`: indexed as the split it caches (so its epochs, seeds and
    skipped images are those of the stream), `read(i)` -> (i, label), `decode(i)` -> pixels."""

    store: object = None


class Store:
    """One split's decoded uint8 pixels, filled in the background while training reads it.

    `start()` decodes the split once in a thread (`decode_chunks`: chunks of `CHUNK` images,
    no Python per file) into memory (the chunks themselves: peak ~1x the pixels) or into a file
    `<cache_dir>/<which>-<content hash>.u8` (disk; a complete file from an earlier run of the
    same content is reused, nothing decoded). Meanwhile `split` serves every image already
    stored from the cache and decodes the others from their files, by the same op, so the pixels
    (and a run's batches) do not depend on how far the fill has got. Unreadable files are
    skipped by the pipeline's validity check either way, and named once the fill ends."""

    def __init__(self, split, decision, cache_dir, which):
        self.raw, self.which = split, which
        self.in_memory = decision.mode == "memory"
        self.nbytes = decision.estimate  # exact once filled
        self.temporary = cache_dir is None and not self.in_memory
        name = hashlib.sha1(f"{split.key}|{split.size}".encode()).hexdigest()[:16]
        self.cache_dir = tempfile.mkdtemp(prefix="convmixer_cache_") if self.temporary else (
            cache_dir)
        self.path = os.path.join(self.cache_dir or "", f"{which}-{name}")
        n = split.size
        self.state = np.zeros(n, np.uint8)  # _UNKNOWN / _READY / _BAD
        self.offsets = np.zeros(n + 1, np.int64)  # where each image starts (chunk or file)
        self.shapes = np.zeros((n, 3), np.int64)
        self.labels = np.zeros(n, np.int32)
        self.chunk_of = np.zeros(n, np.int64)  # memory: the chunk holding each image
        self.chunks, self.fd, self.thread = [], None, None
        self.done, self.stop = threading.Event(), threading.Event()
        self.seconds, self.reused = None, False
        complete = (not self.in_memory and not self.temporary and split.key
                    and os.path.exists(self.path + ".npz") and os.path.exists(self.path + ".u8"))
        if complete:
            with np.load(self.path + ".npz") as index:
                self.offsets, self.shapes, self.labels, valid = (
                    index[k] for k in ("offsets", "shapes", "labels", "valid"))
            self.fd = os.open(self.path + ".u8", os.O_RDONLY)
            self.state = np.where(valid, _READY, _BAD).astype(np.uint8)
            self.reused, self.seconds = True, 0.0
            self._finished()
        elif not self.in_memory:
            os.makedirs(self.cache_dir, exist_ok=True)
        self.split = self._split()

    # ------------------------------------------------------------ the fill (one thread)

    def start(self):
        """Fills the store in a background thread (nothing to do for a reused file)."""
        if not self.done.is_set() and self.thread is None:
            self.thread = threading.Thread(target=self._fill, name=f"cache-{self.which}",
                                           daemon=True)
            atexit.register(self._halt)
            self.thread.start()
        return self

    def wait(self):
        """Blocks until the split is fully cached."""
        if self.thread is not None:
            self.thread.join()
        return self

    def _halt(self):  # at interpreter exit: end the fill between two chunks
        self.stop.set()
        self.wait()

    def _fill(self):
        start = time.monotonic()
        file = None if self.in_memory else open(self.path + ".u8.tmp", "wb")
        if file is not None:
            self.fd = os.open(self.path + ".u8.tmp", os.O_RDONLY)
        written = 0

        def store(decoded):
            nonlocal written
            for pixels, shape, index, label in decoded.as_numpy_iterator():
                if self.stop.is_set():
                    return False
                self.shapes[index], self.labels[index] = shape, label
                within = np.concatenate([[0], np.cumsum(np.prod(shape, axis=1))[:-1]])
                if file is None:
                    self.chunk_of[index], self.offsets[index] = len(self.chunks), within
                    self.chunks.append(pixels)
                else:
                    self.offsets[index] = written + within
                    file.write(pixels)
                    file.flush()  # readable through `fd` before it is marked ready
                written += pixels.size
                self.state[index] = _READY  # last: readers only look at ready images
            return True

        try:
            complete = store(decode_chunks(self.raw))
            failed = np.flatnonzero(self.state != _READY)
            if complete and len(failed):  # chunks with an unreadable file: one at a time
                complete = store(decode_chunks(self.raw, failed, chunk=1))
        except Exception as error:  # e.g. a full disk: training goes on reading the files
            logger.warning(f"Input cache ({self.which}): filling stopped ({error}); the "
                           f"images not cached yet are decoded from their files every epoch")
            return
        if not complete:  # stopped at exit: an incomplete file is never reused
            if file is not None:
                file.close()
                os.remove(self.path + ".u8.tmp")
                if self.temporary:
                    os.rmdir(self.cache_dir)
            return
        self.state[self.state != _READY] = _BAD
        self.offsets[-1] = written
        if file is not None:
            file.close()
            np.savez(self.path + ".npz.tmp.npz", offsets=self.offsets, shapes=self.shapes,
                     labels=self.labels, valid=self.state == _READY)
            os.replace(self.path + ".u8.tmp", self.path + ".u8")
            os.replace(self.path + ".npz.tmp.npz", self.path + ".npz")  # last: complete
        self.seconds = time.monotonic() - start
        self._finished()

    def _finished(self):
        kept = self.state == _READY
        self.nbytes = int(np.prod(self.shapes[kept], axis=1).sum())
        if self.temporary:  # the open descriptor stays valid; the file goes with the process
            for suffix in (".u8", ".npz"):
                if os.path.exists(self.path + suffix):
                    os.remove(self.path + suffix)
            os.rmdir(self.cache_dir)
        where = ("memory" if self.in_memory else
                 self.path + ".u8" + (" (temporary)" if self.temporary else ""))
        how = ("" if self.reused else
               f" once ({self.seconds:.1f} s{', in the background' if self.thread else ''})")
        logger.info(f"{'Reused' if self.reused else 'Decoded'} {int(kept.sum()):,} "
                    f"{self.which} images{how}: {self.nbytes / 2**20:,.0f} MB of uint8 pixels "
                    f"in {where}")
        skipped = np.flatnonzero(~kept)
        if len(skipped) and not self.reused:
            names = [self.raw.paths[i] if self.raw.paths else f"example #{i}" for i in skipped]
            logger.info(f"Skipped {len(skipped):,} unreadable {self.which} image(s): "
                        f"{', '.join(names[:10])}"
                        + (f" ... and {len(names) - 10} more" if len(names) > 10 else ""))
        self.done.set()

    # ------------------------------------------------------------ the reads (tf.data)

    def lookup(self, index):
        """(pixels, valid) of image `index` (Python, through `tf.numpy_function`): the stored
        pixels; not stored yet, the file's own decode (the same op, eagerly, so the pixels do
        not depend on the fill's progress); unreadable, a placeholder and False."""
        state = self.state[index]
        if state == _READY:
            shape = self.shapes[index]
            size, start = int(np.prod(shape)), int(self.offsets[index])
            if self.in_memory:
                flat = self.chunks[self.chunk_of[index]][start:start + size]
            else:
                flat = np.frombuffer(os.pread(self.fd, size, start), np.uint8)
            return flat.reshape(shape), True
        if state == _UNKNOWN and self.raw.read is not None:
            try:
                return preprocessing.decode_image(self.raw.read(index)[0]).numpy(), True
            except tf.errors.OpError:  # unreadable, truncated, gone
                pass
        return _PLACEHOLDER, False

    def _split(self):
        raw = self.raw
        if raw.labels is not None:  # folders: known from the listing
            labels_t = tf.constant(raw.labels)

            def read(index):
                return index, tf.gather(labels_t, index)
        else:  # a stream's labels: known once filled (such a split is read only then)
            def read(index):
                label = tf.numpy_function(lambda i: self.labels[i], [index], tf.int32,
                                          stateful=False)
                return index, tf.ensure_shape(label, [])

        def decode(index):
            image, valid = tf.numpy_function(self.lookup, [index], (tf.uint8, tf.bool),
                                             stateful=False)
            return tf.ensure_shape(image, [None, None, 3]), tf.ensure_shape(valid, [])

        def examples():
            return tf.data.Dataset.range(raw.size).map(_plain(read), num_parallel_calls=AUTOTUNE)

        return CachedSplit(raw.size, examples, read, True, raw.key, raw.paths,
                           labels=raw.labels, decode=decode, store=self)


def decode_once(split, decision, cache_dir, which):
    """`split` cached as `decision` says (memory or disk): a `CachedSplit` to read at once
    while a `Store` fills it in the background. A split without random access (tfds before
    caching) cannot serve what is not stored yet: it is filled first."""
    store = Store(split, decision, cache_dir, which).start()
    if split.read is None:
        store.wait()
    return store.split
