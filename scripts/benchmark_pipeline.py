"""Input pipeline speed: the training pipeline alone and end-to-end training, images/s, with
the decoded-image cache off (every epoch reads, decodes and augments each JPEG: the work the
pipeline did before the cache) and on (decoded once, then augmented from memory).

A CIFAR-10-like JPEG folder (32x32, train/<class>/*.jpg, test/<class>/*.jpg) is made first
from Fashion-MNIST (Keras's cache, grey repeated to RGB) or, without it, random images. The
cifar10 recipe's augmentation (hflip, RandAugment n2, colour jitter, erasing) runs in both.
Modes alternate round by round in one process; medians over rounds. Besides wall-clock
images/s it reports the process CPU time per image, which other jobs on the machine barely
change, and 2 cores / that time: the rate with two cores to itself.

    git show 7323ce4:convmixer_tf/training/data.py > /tmp/data_before.py   # the old pipeline
    PYTHONPATH=. python scripts/benchmark_pipeline.py --folder /tmp/cifar_like --images 5000 \
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

from convmixer_tf import layers, model as model_lib, presets
from convmixer_tf.training import data
from convmixer_tf.training.config import TrainConfig


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


def clocks():
    """(wall seconds, this process's CPU seconds): the CPU time is what an image costs the
    cores whatever else runs on the machine; the wall rate is what you get under that load."""
    return time.perf_counter(), time.process_time()


def rates(images, begin):
    """(images/s, CPU ms per image) since `begin` = clocks()."""
    wall, cpu = clocks()
    return images / (wall - begin[0]), 1000 * (cpu - begin[1]) / images


def pipeline_rate(train, batch_size, batches):
    """(images/s, CPU ms/image) of `batches` batches of a pipeline (after a warm-up batch)."""
    iterator = iter(train)
    next(iterator)
    begin = clocks()
    for _ in range(batches):
        next(iterator)
    return rates(batches * batch_size, begin)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default="/tmp/convmixer_cifar_like")
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=30, help="timed per pipeline round")
    parser.add_argument("--train-steps", type=int, default=4, help="timed per training round")
    parser.add_argument("--train-batch-size", type=int, default=64)
    parser.add_argument("--before", default="",
                        help="an older training/data.py to compare with (its build_datasets)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variant", default="convmixer_256_8_ks5_p2")
    parser.add_argument("--size", type=int, default=32, help="JPEG side made (and trained on)")
    parser.add_argument("--no-training", action="store_true", help="pipelines only")
    args = parser.parse_args()
    if not os.path.isdir(os.path.join(args.folder, "train")):
        start = time.perf_counter()
        make_folder(args.folder, args.images, size=args.size)
        print(f"made {args.folder} in {time.perf_counter() - start:.0f} s")

    recipe = TrainConfig.create(preset="cifar10", dataset=args.folder).augment
    builders = {"off": data.build_datasets, "auto": data.build_datasets}
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
                begin = clocks()
                kwargs = {} if cache == "before" else dict(cache=cache)
                ds = build(args.folder, args.size, batch, augment=augment, **kwargs)
                ds.train  # the cache's decode pass happens here
                builds[cache, name, batch] = ds
                print(f"{cache}, {name}, batch {batch}: built in "
                      f"{time.perf_counter() - begin[0]:.1f} s ({ds.train_size} train images)")

    model = layers.accelerate(model_lib.ConvMixer(
        **presets.MODEL_CONFIGS[args.variant], input_shape=(args.size, args.size, 3),
        classes=10, classifier_activation=None))
    model.compile(optimizer=keras.optimizers.AdamW(1e-3),
                  loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    if not args.no_training:
        model.fit(builds["off", "cifar10 augmentation", args.train_batch_size].train.take(2),
                  verbose=0)  # compile once (the same shapes for every candidate)

    results = {}
    for round_ in range(args.rounds):
        order = list(builders) if round_ % 2 == 0 else list(reversed(builders))
        for cache in order:
            for name in ("cifar10 augmentation", "no augmentation"):
                results.setdefault(("pipeline", cache, name), []).append(pipeline_rate(
                    builds[cache, name, args.batch_size].train, args.batch_size, args.batches))
        for cache in order if not args.no_training else ():
            ds = builds[cache, "cifar10 augmentation", args.train_batch_size].train
            marks = []
            callback = keras.callbacks.LambdaCallback(
                on_train_batch_end=lambda batch, logs: marks.append(clocks()))
            model.fit(ds.take(args.train_steps + 1), verbose=0, callbacks=[callback])
            results.setdefault(("training", cache, "cifar10 augmentation"), []).append(
                rates(args.train_steps * args.train_batch_size, marks[0]))
        print(f"round {round_ + 1}: " + "; ".join(
            f"{k[0]} {k[1]} {k[2]}: {v[-1][0]:.0f}/s {v[-1][1]:.3f} ms"
            for k, v in results.items()), flush=True)
    print(f"\nmedians of {args.rounds} rounds (images/s wall | CPU ms per image | 2 cores "
          f"/ CPU time = images/s with the 2 cores to itself):")
    for (what, cache, name), values in results.items():
        wall = statistics.median(v[0] for v in values)
        cpu = statistics.median(v[1] for v in values)
        print(f"  {what:8s} {cache:6s} {name:22s} {wall:7.1f} images/s | "
              f"{cpu:6.3f} ms | {2000 / cpu:7.1f} images/s")


if __name__ == "__main__":
    main()
