"""The decoded-image cache: decide memory / disk / stream BEFORE decoding anything, from the
file count and a small sample of image headers; then decode once, in chunks of images from one
flat parallel map, kept in memory or written to a file (disk, only within an explicit budget),
or decode every epoch (stream).

Unreadable images are skipped and named, never a crash mid-run: the stream's `decode_flagged`
decodes each image with a validity flag (tf.data's `ignore_errors` would drop the name); the
decode-once cache carries each image's index through `ignore_errors`, so an absent index names
the file."""

import dataclasses
import hashlib
import logging
import os
import tempfile
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


@dataclasses.dataclass(frozen=True)
class CachedSplit(Split):
    nbytes: int = 0
    in_memory: bool = True


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


def decode_once(split, decision, cache_dir, which):
    """`split` decoded once to uint8 in stored order (unreadable images skipped, named), held
    in memory as the decoded chunks themselves (`CHUNK` images each, no copy into a second
    buffer: peak ~1x the pixels; a captured tensor or tf.Variable would cost another full
    copy), or written to a file `<cache_dir>/<which>-<content hash>.u8` read through a memory
    map (disk); both read by `tf.numpy_function`. A complete file from an earlier run of the
    same content is reused."""
    start = time.monotonic()
    name = hashlib.sha1(f"{split.key}|{split.size}".encode()).hexdigest()[:16]
    temporary = cache_dir is None
    in_memory = decision.mode == "memory"
    path = os.path.join(cache_dir or "", f"{which}-{name}")
    reused = (not in_memory and not temporary and split.key and os.path.exists(path + ".npz")
              and os.path.exists(path + ".u8"))
    chunks = []  # memory: the decoded chunks; disk: the file's memory map (one chunk)
    chunk_of = np.zeros(split.size, np.int64)  # the chunk holding each image ...
    if reused:
        with np.load(path + ".npz") as index:
            offsets, shapes, labels, valid = (index[k] for k in ("offsets", "shapes", "labels",
                                                                  "valid"))
    else:
        offsets = np.zeros(split.size + 1, np.int64)  # ... and where it starts there
        shapes = np.zeros((split.size, 3), np.int64)  # (0, 0, 0): skipped
        labels = np.zeros(split.size, np.int32)
        valid = np.zeros(split.size, bool)
        if not in_memory:
            if temporary:
                cache_dir = tempfile.mkdtemp(prefix="convmixer_cache_")
                path = os.path.join(cache_dir, f"{which}-{name}")
            os.makedirs(cache_dir, exist_ok=True)
            file = open(path + ".u8.tmp", "wb")
        written = 0

        def store(decoded):
            nonlocal written
            for pixels, shape, index, label in decoded.as_numpy_iterator():
                valid[index], shapes[index], labels[index] = True, shape, label
                within = np.concatenate([[0], np.cumsum(np.prod(shape, axis=1))[:-1]])
                if in_memory:
                    chunk_of[index], offsets[index] = len(chunks), within
                    chunks.append(pixels)
                else:
                    offsets[index] = written + within
                    file.write(pixels)
                written += pixels.size

        store(decode_chunks(split))
        failed = np.flatnonzero(~valid)  # chunks with an unreadable file: one file at a time
        if len(failed):
            store(decode_chunks(split, failed, chunk=1))
        offsets[-1] = written
        if not in_memory:
            file.close()
            np.savez(path + ".npz.tmp.npz", offsets=offsets, shapes=shapes, labels=labels,
                     valid=valid)
            os.replace(path + ".u8.tmp", path + ".u8")
            os.replace(path + ".npz.tmp.npz", path + ".npz")  # last: marks the cache complete
    kept = np.flatnonzero(valid)
    skipped = [] if reused else np.flatnonzero(~valid)
    nbytes = int(np.prod(shapes[kept], axis=1).sum()) if len(kept) else 0
    where = "memory" if in_memory else path + ".u8" + (" (temporary)" if temporary else "")
    logger.info(f"{'Reused' if reused else 'Decoded'} {len(kept):,} {which} images"
                f"{'' if reused else ' once'}: {nbytes / 2**20:,.0f} MB of uint8 pixels in "
                f"{where} ({time.monotonic() - start:.1f} s)")
    if len(skipped):
        names = [split.paths[i] if split.paths else f"example #{i}" for i in skipped]
        logger.info(f"Skipped {len(skipped):,} unreadable {which} image(s): "
                    f"{', '.join(names[:10])}"
                    + (f" ... and {len(names) - 10} more" if len(names) > 10 else ""))

    kept_t = tf.constant(kept.astype(np.int64))
    labels_t = tf.constant(labels[kept])
    if not in_memory:  # one chunk: the whole file
        total = int(offsets[-1])
        chunks = [np.memmap(path + ".u8", np.uint8, "r") if total else np.zeros(0, np.uint8)]
        if temporary:  # the mapping stays valid; the file goes when the process ends
            for suffix in (".u8", ".npz"):
                os.remove(path + suffix)
            os.rmdir(cache_dir)
    sizes = np.prod(shapes, axis=1)

    def fetch(index):
        start = offsets[index]
        return np.array(chunks[chunk_of[index]][start:start + sizes[index]]).reshape(
            shapes[index])

    def pixels(index):
        return tf.numpy_function(fetch, [index], tf.uint8, stateful=False)

    def read(position):
        """The `position`-th kept image (0..len(kept)-1) and its label."""
        index = tf.gather(kept_t, position)
        return tf.ensure_shape(pixels(index), [None, None, 3]), tf.gather(labels_t, position)

    def examples():
        return tf.data.Dataset.range(len(kept)).map(_plain(read), num_parallel_calls=AUTOTUNE)

    return CachedSplit(len(kept), examples, read, False, split.key, nbytes=nbytes,
                       in_memory=in_memory)

