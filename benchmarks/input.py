"""CPU cost per image of the ImageNet training input: ours (tf.data: read, JPEG decode, random
resized crop 224, flip, RandAugment m9 n2, erasing 0.25, mixup/cutmix per batch) against
timm's, the paper's code (PIL decode, `timm.data.create_transform(224, is_training=True,
auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, interpolation="bicubic")`, then timm's
`Mixup(0.5, 0.5)` per batch), on the same JPEG files.

Each side runs in its own process (timm in a separate virtualenv: torchvision does not pair
with this project's torch build) and reports its process CPU time for a round of batches; the
parent alternates the sides round by round (the rotation of `convmixer_tf.timing.interleaved`,
done here over processes, whose CPU time the parent's clocks cannot see) and reports medians.
Ours is the data package's own training stream (`Datasets.train_stream`, cache off: what
`convmixer-train --preset imagenet` streams at ImageNet size). One thread of compute each
(tf.data private thread pool 1 + intra/inter-op 1; torch.set_num_threads(1), no DataLoader
workers), so CPU ms per image is the cost whatever the machine is doing.

    python scripts/make_synthetic_imagenet.py /tmp/synth_in --classes 10 --images 1000
    python -m benchmarks.input --folder /tmp/synth_in \
        --timm-python /work/venv-timm/bin/python --rounds 10 --batches 4 --batch 32 \
        --before /tmp/before   # optional: git archive OLD | tar -x -C /tmp/before
    python -m benchmarks.input --folder /tmp/synth_in --stages

The children run this file as a script (no package imports at the top: the timm side's
Python has no TensorFlow; `--before`'s side imports the older checkout's convmixer_tf).
Logs: benchmarks/results/input-imagenet-vs-timm.log.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

TIMM_AUTO_AUGMENT = "rand-m9-mstd0.5-inc1"  # the paper's --aa (n=2 is timm's default)


def _files(folder):
    classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    return [(os.path.join(folder, c, f), label) for label, c in enumerate(classes)
            for f in sorted(os.listdir(os.path.join(folder, c))) if f.endswith(".jpg")], classes


# ---------------------------------------------------------------- the two sides (children)


def tf_side(args):
    """Our pipeline as convmixer-train --preset imagenet builds it (cache off: read + decode +
    augment every image), yielding `args.batch`-image batches."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from convmixer_tf.training.data import pipeline
    from convmixer_tf.training.config import TrainConfig

    config = TrainConfig.create(preset="imagenet", dataset=f"folder:{args.folder}",
                                batch_size=args.batch)
    datasets = pipeline.build_datasets(
        config.dataset, image_size=config.image_size, global_batch_size=args.batch,
        augment=config.augment, seed=0, validation_split=0.05, cache="off")
    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    options.threading.max_intra_op_parallelism = 1
    options.autotune.enabled = False  # no background tuning thread
    # The endless epoch-keyed stream fit reads (an older checkout: its one-epoch `train`).
    stream = getattr(datasets, "train_stream", None)
    ds = (stream() if stream else datasets.train.repeat()).with_options(options)
    iterator = iter(ds)

    def batch():
        images, labels = next(iterator)
        assert images.shape[1:] == (224, 224, 3) and labels.shape[-1] == len(datasets.class_names)
        return int(images.shape[0])

    return batch


def timm_side(args):
    """timm's training transform on PIL images (as timm's loader without workers), batched
    and mixed with timm's Mixup."""
    import random

    import torch
    from PIL import Image
    from timm.data import Mixup, create_transform

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    transform = create_transform(224, is_training=True, auto_augment=TIMM_AUTO_AUGMENT,
                                 re_prob=0.25, re_mode="pixel", interpolation="bicubic")
    files, classes = _files(args.folder)
    mixup = Mixup(mixup_alpha=0.5, cutmix_alpha=0.5, label_smoothing=0.1,
                  num_classes=len(classes))
    order = random.Random(0)
    position = [len(files)]

    def batch():
        images, labels = [], []
        for _ in range(args.batch):
            if position[0] >= len(files):
                order.shuffle(files)
                position[0] = 0
            path, label = files[position[0]]
            position[0] += 1
            with Image.open(path) as image:
                images.append(transform(image.convert("RGB")))
            labels.append(label)
        x, y = mixup(torch.stack(images), torch.tensor(labels))
        assert x.shape[1:] == (3, 224, 224) and y.shape[-1] == len(classes)
        return int(x.shape[0])

    return batch


def child(args):
    """Prints "ready", then for each "round N" line on stdin runs N batches and prints
    {"cpu_s", "wall_s", "images"} as JSON. CPU time counts from the end of the previous round:
    tf.data keeps filling its prefetch buffers while the other side runs, and that work is
    for the images of this round (the buffers are full at both ends in the steady state)."""
    batch = {"tf": tf_side, "timm": timm_side}[args.side](args)
    for _ in range(2):
        batch()  # warm-up: graph building, first decodes, imports
    print("ready", flush=True)
    cpu = time.process_time()
    for line in sys.stdin:
        n = int(line.split()[1])
        wall = time.perf_counter()
        images = sum(batch() for _ in range(n))
        now = time.process_time()
        print(json.dumps(dict(cpu_s=now - cpu, wall_s=time.perf_counter() - wall,
                              images=images)), flush=True)
        cpu = now


# ---------------------------------------------------------------- ours, stage by stage


def stages(args, images=200, repeats=2):
    """CPU ms per image of our per-image work, cumulative stage by stage (one thread), and of
    the pre-flight header check per file: where the time goes."""
    import dataclasses

    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from convmixer_tf import preprocessing
    from convmixer_tf.training import augment
    from convmixer_tf.training.data import sources
    from convmixer_tf.training.config import TrainConfig

    files = [p for p, _ in _files(args.folder)[0]][:images]
    paths = tf.constant(files)
    recipe = TrainConfig.create(preset="imagenet").augment
    crop = ((recipe.crop_scale, 1.0), (1 / recipe.crop_ratio, recipe.crop_ratio))
    only = lambda **on: dataclasses.replace(  # noqa: E731
        recipe, **{k: on.get(k, 0) for k in ("hflip", "randaug_n", "erase_prob")})
    decode = preprocessing.decode_image
    rows = {
        "read + full decode": lambda b, s: decode(b),
        "+ random resized crop 224 (decode, then crop)":
            lambda b, s: augment.random_resized_crop(decode(b), 224, s, *crop),
        "read + window decode + crop 224 (ours)":
            lambda b, s: augment.decode_random_resized_crop(b, 224, s, *crop),
        "+ flip": lambda b, s: augment.augment_image(b, s, only(hflip=0.5), 224, encoded=True),
        "+ RandAugment m9 n2": lambda b, s: augment.augment_image(
            b, s, only(hflip=0.5, randaug_n=2), 224, encoded=True),
        "+ erasing 0.25 (the per-image recipe)":
            lambda b, s: augment.augment_image(b, s, recipe, 224, encoded=True),
    }
    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    options.autotune.enabled = False
    print("\n| our stage (cumulative) | CPU ms / image |\n|---|---|")
    for name, fn in rows.items():
        ds = tf.data.Dataset.range(len(files)).map(
            lambda i, fn=fn: fn(tf.io.read_file(paths[i]), tf.stack([i, i + 1]))
        ).with_options(options)
        for _ in ds.take(4):
            pass
        cpu = time.process_time()
        for _ in range(repeats):
            for _ in ds:
                pass
        print(f"| {name} | {1000 * (time.process_time() - cpu) / (repeats * len(files)):.2f} |",
              flush=True)
    cpu = time.process_time()
    sources.check_images(files, workers=1)
    print(f"| header check per file (PIL verify, before training) | "
          f"{1000 * (time.process_time() - cpu) / len(files):.2f} |")


# ---------------------------------------------------------------- the parent


def _spawn(python, side, args, pythonpath=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", OMP_NUM_THREADS="1")
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    proc = subprocess.Popen(
        [python, os.path.abspath(__file__), "--side", side, "--folder", args.folder,
         "--batch", str(args.batch)],
        cwd=pythonpath or None,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    said = []
    for line in proc.stdout:  # the pipeline's own log lines (the cache decision) come first
        if line.strip() == "ready":
            return proc
        said.append(line)
    proc.kill()
    raise SystemExit(f"the {side} side did not start (said {''.join(said)!r}); see its stderr")


def _round(proc, batches):
    proc.stdin.write(f"round {batches}\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    while not line.startswith("{"):  # a log line of the pipeline
        if not line:
            raise SystemExit("a side stopped mid-run; see its stderr")
        line = proc.stdout.readline()
    return json.loads(line)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", required=True, help="root/<class>/*.jpg (photo-sized)")
    parser.add_argument("--timm-python", default="/work/venv-timm/bin/python",
                        help="a Python with torch, torchvision and timm")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--batches", type=int, default=3, help="batches per round")
    parser.add_argument("--batch", type=int, default=32, help="images per batch (even: Mixup)")
    parser.add_argument("--before", default="",
                        help="a checkout of an earlier convmixer_tf to time as a third side")
    parser.add_argument("--stages", action="store_true",
                        help="only time our per-image work stage by stage")
    parser.add_argument("--side", choices=("tf", "timm"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side:
        return child(args)
    if args.stages:
        return stages(args)

    files, classes = _files(args.folder)
    sizes = [os.path.getsize(p) for p, _ in files]
    print(f"{len(files)} JPEGs in {len(classes)} classes, {statistics.mean(sizes) / 1024:.0f} "
          f"KB each on average; batch {args.batch}, {args.batches} batches per round, "
          f"{args.rounds} rounds; loadavg {os.getloadavg()[0]:.1f}", flush=True)
    procs = {"ours (tf.data)": _spawn(sys.executable, "tf", args),
             "timm (PIL + torchvision)": _spawn(args.timm_python, "timm", args)}
    if args.before:
        procs["ours before (--before)"] = _spawn(sys.executable, "tf", args, args.before)
    results = {name: [] for name in procs}
    try:
        names = list(procs)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                results[name].append(_round(procs[name], args.batches))
    finally:
        for proc in procs.values():
            proc.stdin.close()
            proc.wait(timeout=60)
    print("\n| pipeline | CPU ms / image (all rounds) | median of rounds | min-max over rounds "
          "| wall ms / image (shared machine) |")
    print("|---|---|---|---|---|")
    medians = {}
    for name, rounds in results.items():
        per = [1000 * r["cpu_s"] / r["images"] for r in rounds]
        wall = [1000 * r["wall_s"] / r["images"] for r in rounds]
        # All rounds together: tf.data's prefetching moves work between neighbouring rounds.
        medians[name] = 1000 * sum(r["cpu_s"] for r in rounds) / sum(r["images"] for r in rounds)
        print(f"| {name} | {medians[name]:.2f} | {statistics.median(per):.1f} | "
              f"{min(per):.1f}-{max(per):.1f} | {statistics.median(wall):.1f} |")
    ours, timm = list(medians.values())[:2]
    print(f"\nours / timm CPU time per image: {ours / timm:.2f}x "
          f"(loadavg at the end {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
