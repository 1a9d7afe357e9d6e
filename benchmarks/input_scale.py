"""Input at scale, measured (BENCHMARKS.md "Input at scale"): `rss` decodes a folder into the
in-memory cache and reports peak RSS against the cached bytes; `startup` times build_datasets
to the first training batch (streaming, no per-image work before it).

    python scripts/make_synthetic_imagenet.py /tmp/synth --images 1500
    python -m benchmarks.input_scale rss /tmp/synth
    python scripts/make_synthetic_imagenet.py /tmp/tiny20k --images 20000 --tiny
    python -m benchmarks.input_scale startup /tmp/tiny20k
"""

import argparse
import resource
import time


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=("rss", "startup"))
    parser.add_argument("folder")
    parser.add_argument("--cache", default=None)
    args = parser.parse_args(argv)
    import tensorflow as tf

    from convmixer_tf.training.data import pipeline

    tf.zeros(1)  # TensorFlow's own start-up memory, before the baseline
    if args.what == "rss":
        before = peak_rss_mb()
        ds = pipeline.build_datasets(args.folder, image_size=32, global_batch_size=32,
                                     cache=args.cache or "memory")
        next(iter(ds.train))
        split = ds._pipeline.split("train")
        cached = split.nbytes / 2**20
        after = peak_rss_mb()
        print(f"cached {cached:,.0f} MB; peak RSS {after:,.0f} MB (baseline {before:,.0f} MB "
              f"after importing TF): increase {after - before:,.0f} MB = "
              f"{(after - before) / cached:.2f}x the cached bytes")
    else:
        start = time.perf_counter()
        ds = pipeline.build_datasets(args.folder, image_size=32, global_batch_size=32,
                                     cache=args.cache or "auto", cache_budget_mb=0)
        built = time.perf_counter()
        next(iter(ds.train))
        first = time.perf_counter()
        print(f"{ds.train_size + ds.test_size:,} files: build_datasets {built - start:.2f} s, "
              f"first batch {first - start:.2f} s")


if __name__ == "__main__":
    main()
