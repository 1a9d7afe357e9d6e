"""Input pipeline speed: the training pipeline alone and end-to-end training, images/s, with
the decoded-image cache off (every epoch reads, decodes and augments each JPEG: the work the
pipeline did before the cache) and on (decoded once, then augmented from memory).

A CIFAR-10-like JPEG folder (32x32, train/<class>/*.jpg, test/<class>/*.jpg) is made first
from Fashion-MNIST (Keras's cache, grey repeated to RGB) or, without it, random images. The
cifar10 recipe's augmentation (hflip, RandAugment n2, colour jitter, erasing) runs in both.
Candidates are interleaved in one process (`convmixer_tf.timing`: each round runs every one,
rotating order, after a warm-up); medians over rounds. Each timed call gets a fresh iterator
whose first batch (or training step: fit's own step function) was taken untimed. Besides
wall-clock images/s it reports the process CPU time per image, which other jobs on the machine
barely change, and 2 cores / that time: the rate with two cores to itself.

    git show 7323ce4:convmixer_tf/training/data.py > /tmp/data_before.py   # the old pipeline
    python -m benchmarks.pipeline --folder /tmp/cifar_like --images 5000 \
        --before /tmp/data_before.py
"""

import argparse
import importlib.util
import os
import statistics
import sys
import time

import keras
import numpy as np
from PIL import Image

from convmixer_tf import timing
from convmixer_tf.training.data import pipeline
from convmixer_tf.training.config import TrainConfig

from .harness import keras_model, model_shape


def make_folder(root, images, test_images=1000, size=32):
    """root/{train,test}/<class>/<i>.jpg, size x size RGB JPEGs (quality 90), 10 classes."""
    try:
        (x, y), _ = keras.datasets.fashion_mnist.load_data()
        x = np.repeat(np.pad(x, ((0, 0), (2, 2), (2, 2)))[..., None], 3, axis=-1)
    except Exception:  # no Fashion-MNIST here: random pixels are as costly to decode
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (images + test_images, 32, 32, 3), dtype=np.uint8)
        y = rng.integers(0, 10, len(x))
    for i in range(images + test_images):
        split = "train" if i < images else "test"
        folder = os.path.join(root, split, f"class{y[i]}")
        os.makedirs(folder, exist_ok=True)
        image = Image.fromarray(x[i])
        if size != image.size[0]:
            image = image.resize((size, size), Image.BICUBIC)
        image.save(os.path.join(folder, f"{i}.jpg"), quality=90)


def fresh(train, step=next):
    """`prepare` of a candidate: a new iterator over `train`, one `step` already taken (the
    pipeline started and filled; untimed, as each training epoch starts)."""
    def make():
        iterator = iter(train)
        step(iterator)
        return iterator

    return make


def pulling(batch_size, batches):
    """A candidate: the next `batches` batches of the prepared iterator; returns images."""
    def run(iterator):
        for _ in range(batches):
            next(iterator)
        return batches * batch_size

    return run


def training(model, batch_size, steps):
    """A candidate: `steps` training steps (fit's own step function) on the prepared
    iterator; returns images."""
    def run(iterator):
        for _ in range(steps):
            logs = model.train_function(iterator)
        float(logs["loss"])  # waits for the last step
        return steps * batch_size

    return run


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pipeline",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default="/tmp/convmixer_cifar_like")
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=30, help="timed per pipeline round")
    parser.add_argument("--train-steps", type=int, default=4, help="timed per training round")
    parser.add_argument("--train-batch-size", type=int, default=64)
    parser.add_argument("--before", default="",
                        help="an older training/data.py to compare with (its build_datasets)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variant", default="256_8",
                        help="a presets.MODEL_CONFIGS name or its short form")
    parser.add_argument("--size", type=int, default=32, help="JPEG side made (and trained on)")
    parser.add_argument("--no-training", action="store_true", help="pipelines only")
    args = parser.parse_args(argv)
    if min(args.rounds, args.batches, args.train_steps, args.images) < 1:
        parser.error("--rounds, --batches, --train-steps and --images must be >= 1")
    try:
        cfg = model_shape(args.variant, image=args.size, classes=10)
    except ValueError as error:
        parser.error(str(error))
    if not os.path.isdir(os.path.join(args.folder, "train")):
        start = time.perf_counter()
        make_folder(args.folder, args.images, size=args.size)
        print(f"made {args.folder} in {time.perf_counter() - start:.0f} s")

    recipe = TrainConfig.create(preset="cifar10", dataset=args.folder).augment
    builders = {"off": pipeline.build_datasets, "auto": pipeline.build_datasets}
    if args.before:
        spec = importlib.util.spec_from_file_location("data_before", args.before)
        before = importlib.util.module_from_spec(spec)
        sys.modules["data_before"] = before  # AutoGraph reads its functions' source
        spec.loader.exec_module(before)
        builders = {"before": before.build_datasets, **builders}
    builds = {}
    for cache, build in builders.items():
        for name, augment in (("cifar10 augmentation", recipe), ("no augmentation", None)):
            for batch in {args.batch_size, args.train_batch_size}:
                start = time.perf_counter()
                kwargs = {} if cache == "before" else dict(cache=cache)
                ds = build(args.folder, args.size, batch, augment=augment, **kwargs)
                ds.train  # the cache's decode pass happens here
                builds[cache, name, batch] = ds
                need = max((args.batches + 1) * args.batch_size,
                           (args.train_steps + 1) * args.train_batch_size)
                if ds.train_size < need:
                    parser.error(f"{args.folder} has {ds.train_size} training images; a round "
                                 f"takes {need} (one epoch): lower --batches / --train-steps")
                print(f"{cache}, {name}, batch {batch}: built in "
                      f"{time.perf_counter() - start:.1f} s ({ds.train_size} train images)")

    candidates, prepare = {}, {}
    for cache in builders:
        for name in ("cifar10 augmentation", "no augmentation"):
            key = "pipeline", cache, name
            candidates[key] = pulling(args.batch_size, args.batches)
            prepare[key] = fresh(builds[cache, name, args.batch_size].train)
    if not args.no_training:
        model = keras_model(cfg, fast=True)
        model.compile(optimizer=keras.optimizers.AdamW(1e-3),
                      loss=keras.losses.CategoricalCrossentropy(from_logits=True))
        model.make_train_function()  # one step function, the same shapes for every candidate
        for cache in builders:
            key = "training", cache, "cifar10 augmentation"
            candidates[key] = training(model, args.train_batch_size, args.train_steps)
            prepare[key] = fresh(builds[cache, key[2], args.train_batch_size].train,
                                 model.train_function)
    results = timing.interleaved(candidates, args.rounds, clocks=("wall", "process"),
                                 prepare=prepare)
    print(f"\nmedians of {args.rounds} interleaved rounds (images/s wall | CPU ms per image | "
          f"2 cores / CPU time = images/s with the 2 cores to itself):")
    for (what, cache, name), r in results.items():
        wall = r["result"] / statistics.median(r["wall"])
        cpu = timing.median_ms(r["process"]) / r["result"]
        print(f"  {what:8s} {cache:6s} {name:22s} {wall:7.1f} images/s | "
              f"{cpu:6.3f} ms | {2000 / cpu:7.1f} images/s")


if __name__ == "__main__":
    main()
