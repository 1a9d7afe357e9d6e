"""RandAugment in tf.data: convmixer_tf.training.augment.rand_augment vs keras.layers.RandAugment.

Per-image `Dataset.map` with AUTOTUNE parallelism, same op count (2) and comparable strength
(timm m9 vs Keras factor 0.9), uint8 random images; prints images/s and the ratio.

    PYTHONPATH=. python scripts/benchmark_augment.py [--sizes 32 224]

Measured here (2 CPU cores shared with other jobs, so noisy; TF 2.21, Keras 3.15; every drawn
op applied, prob=1.0), two runs: 32 px 2086 vs 623 and 4347 vs 878 images/s (3.3x, 5.0x);
224 px 639 vs 56 and 897 vs 28 images/s (11x, 32x). Keras's layer computes all 11 of its ops
for every image and selects with `where`; ours runs only the drawn op (`tf.switch_case`).
"""

import argparse
import time

import keras
import numpy as np
import tensorflow as tf

from convmixer_tf.training import augment


def images_per_second(fn, size, count):
    pixels = np.random.default_rng(0).integers(0, 256, (64, size, size, 3)).astype("uint8")
    ds = tf.data.Dataset.from_tensor_slices(pixels).repeat().take(count)
    ds = tf.data.Dataset.zip(ds, tf.data.Dataset.random(seed=0).batch(2))
    ds = ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE).prefetch(8)
    it = iter(ds)
    next(it)
    start, seen = time.perf_counter(), 0
    for _ in it:
        seen += 1
    return seen / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 224])
    args = parser.parse_args()
    layer = keras.layers.RandAugment(value_range=(0, 255), num_ops=2, factor=0.9, seed=1)
    for size in args.sizes:
        count = max(400, 3000 * 32 * 32 // (size * size))
        ours = images_per_second(lambda x, s: augment.rand_augment(x, s, 2, 9.0, prob=1.0),
                                  size, count)
        theirs = images_per_second(lambda x, s: layer(x, training=True), size, count)
        print(f"{size:4d} px: convmixer_tf {ours:7.0f} images/s, keras.layers.RandAugment "
              f"{theirs:7.0f} images/s, ratio {ours / theirs:.1f}x")


if __name__ == "__main__":
    main()
