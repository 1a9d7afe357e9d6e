"""RandAugment in tf.data: convmixer_tf.training.augment.rand_augment vs keras.layers.RandAugment.

Per-image `Dataset.map` with AUTOTUNE parallelism, same op count (2) and comparable strength
(timm m9 vs Keras factor 0.9), uint8 random images; prints the median images/s of interleaved
rounds and the ratio.

    python -m benchmarks.augment [--sizes 32 224]

Measured here (2 CPU cores shared with other jobs, so noisy; TF 2.21, Keras 3.15; every drawn
op applied, prob=1.0), two runs: 32 px 2086 vs 623 and 4347 vs 878 images/s (3.3x, 5.0x);
224 px 639 vs 56 and 897 vs 28 images/s (11x, 32x). Keras's layer computes all 11 of its ops
for every image and selects with `where`; ours runs only the drawn op (`tf.switch_case`).
"""

import argparse

import keras
import numpy as np
import tensorflow as tf

from convmixer_tf.training import augment

from .harness import interleaved


def augmenting(fn, size, count):
    """A candidate: runs `count` uint8 random images through `Dataset.map(fn)` (AUTOTUNE) and
    returns how many came out."""
    pixels = np.random.default_rng(0).integers(0, 256, (64, size, size, 3)).astype("uint8")
    ds = tf.data.Dataset.from_tensor_slices(pixels).repeat().take(count)
    ds = tf.data.Dataset.zip(ds, tf.data.Dataset.random(seed=0).batch(2))
    ds = ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE).prefetch(8)

    def run():
        return sum(1 for _ in ds)

    return run


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.augment",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 224])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or min(args.sizes) < 8:
        parser.error(f"--rounds must be >= 1 and --sizes >= 8; got {args.rounds}, {args.sizes}")
    layer = keras.layers.RandAugment(value_range=(0, 255), num_ops=2, factor=0.9, seed=1)
    for size in args.sizes:
        count = max(400, 3000 * 32 * 32 // (size * size))
        res = interleaved({
            "ours": augmenting(lambda x, s: augment.rand_augment(x, s, 2, 9.0, prob=1.0),
                               size, count),
            "keras": augmenting(lambda x, s: layer(x, training=True), size, count),
        }, args.rounds)
        ours, theirs = res["ours"]["per_s"], res["keras"]["per_s"]
        print(f"{size:4d} px: convmixer_tf {ours:7.0f} images/s, keras.layers.RandAugment "
              f"{theirs:7.0f} images/s, ratio {ours / theirs:.1f}x (median of {args.rounds} "
              f"interleaved rounds)", flush=True)


if __name__ == "__main__":
    main()
