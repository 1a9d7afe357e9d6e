"""Fine-tuning against training from scratch, on data this machine has: digits 0-4 -> 5-9.

    python -m benchmarks.finetune                  # 2 seeds: 21 min here (2 cores, load ~7)
    python -m benchmarks.finetune --seeds 1 --per-class 0 --batch-size 64 --epochs 5  # all images

1. The source: a small ConvMixer (default dim 64, depth 2, kernel 5, patch 2, 16 px: the 8x8
   digits lose nothing) trained with the digits default recipe on the training images of
   digits 0-4, written as an image folder (train/ and test/, one folder per class) as a
   user's data would be.
2. On digits 5-9 (five classes the source never saw; the same test split), from 10 training
   images per class (a user's small folder; `--per-class 0`: all, ~140), every arm trains
   the same number of steps (epochs x steps per epoch) through `train()` as
   `convmixer-train` runs it, and is measured on the 5-9 test images:
     scratch        the digits default recipe, random initialisation
     scratch+recipe the finetune preset's recipe, random initialisation (the recipe alone)
     finetune       --weights source.keras --preset finetune
     head-first     the same with --freeze-backbone-epochs 1 (the head alone first)
     linear-probe   the same with --freeze-backbone (every backbone weight is checked
                    bit-identical to the source's after training)
   Digits are not mirror-symmetric: every arm runs with --hflip 0.
Prints one line per run and a summary (mean, min, max over seeds); `--log` writes them.
"""

import argparse
import os
import platform
import statistics
import subprocess
import tempfile
import time

import numpy as np

ARMS = ("scratch", "scratch+recipe", "finetune", "head-first", "linear-probe")
SOURCE_CLASSES, TARGET_CLASSES = tuple(range(5)), tuple(range(5, 10))


def write_folder(root, images, labels, classes, per_class=0):
    """`root/<digit>/<i>.png` for the images of `classes` (the first `per_class` of each;
    0 = all); returns root."""
    from PIL import Image

    for digit in classes:
        folder = os.path.join(root, str(digit))
        os.makedirs(folder, exist_ok=True)
        chosen = np.flatnonzero(labels == digit)
        for i in chosen[:per_class or len(chosen)]:
            Image.fromarray(images[i]).save(os.path.join(folder, f"{i}.png"))
    return root


def digit_folders(root, image_size, per_class=0):
    """(source folder, target folder): digits 0-4 and 5-9, each with train/ and test/ (the
    digits source's own split); `per_class` caps the target's training images per class."""
    from convmixer_tf.training.data import sources

    (x_train, y_train), (x_test, y_test) = sources.load_digits(image_size)
    folders = []
    for name, classes, cap in (("digits0-4", SOURCE_CLASSES, 0),
                               ("digits5-9", TARGET_CLASSES, per_class)):
        folder = os.path.join(root, name)
        write_folder(os.path.join(folder, "train"), x_train, y_train, classes, cap)
        write_folder(os.path.join(folder, "test"), x_test, y_test, classes)
        folders.append(folder)
    return folders


def arm_config(arm, target, source_path, seed, epochs, common, max_lr=0.0):
    from convmixer_tf.training.config import TrainConfig

    values = dict(common, dataset="folder:" + target, seed=seed, epochs=epochs,
                  name=f"{arm.replace('+', '_')}_{seed}")
    if arm == "scratch":
        return TrainConfig.create(**values)
    values.update(preset="finetune", **({"max_lr": max_lr} if max_lr else {}))
    if arm != "scratch+recipe":
        values.update(weights=source_path)
    if arm == "head-first":
        values.update(freeze_backbone_epochs=1)
    if arm == "linear-probe":
        values.update(freeze_backbone=True)
    return TrainConfig.create(**values)


def backbone_identical(model_path, source_path):
    """Whether every weight but the head's equals the source's, bit for bit."""
    from convmixer_tf import artifacts

    tuned, source = artifacts.load_model(model_path), artifacts.load_model(source_path)
    return all(np.array_equal(a, b)
               for layer in tuned.layers if layer.weights and layer.name != "predictions"
               for a, b in zip(layer.get_weights(), source.get_layer(layer.name).get_weights()))


def _machine():
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout

    changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no")
               .splitlines() if line.strip()]
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load "
            f"average {load[0]:.2f}; checkout {git('rev-parse', '--short', 'HEAD').strip() or '?'}"
            + (f" with uncommitted changes to {', '.join(changed)}" if changed else ""))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.finetune",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--source-epochs", type=int, default=12, help="the digits default")
    parser.add_argument("--epochs", type=int, default=10, help="every target arm's epochs")
    parser.add_argument("--steps-per-epoch", type=int, default=0, help="0 = the whole split")
    parser.add_argument("--per-class", type=int, default=10,
                        help="target training images per class; 0 = all (~140)")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--max-lr", type=float, default=0.0,
                        help="the finetune arms' one-cycle peak; 0 = the preset's")
    parser.add_argument("--log", default="", help="also write the lines to this file")
    args = parser.parse_args(argv)
    arms = args.arms.split(",")
    if args.seeds < 1 or not set(arms) <= set(ARMS):
        parser.error(f"--seeds must be >= 1 and --arms a comma list from {','.join(ARMS)}")

    from convmixer_tf.training.config import TrainConfig
    from convmixer_tf.training.train import train

    lines = []

    def say(line):
        print(line, flush=True)
        lines.append(line)

    say("# python -m benchmarks.finetune " + " ".join(argv if argv is not None else
                                                       __import__("sys").argv[1:]))
    say(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {_machine()}")
    with tempfile.TemporaryDirectory() as root:
        source_dir, target = digit_folders(root, args.image_size, args.per_class)
        common = dict(output_dir=os.path.join(root, "models"), run_dir=os.path.join(root, "runs"),
                      steps_per_epoch=args.steps_per_epoch, augment=dict(hflip=0.0), verbose="0",
                      dim=args.dim, depth=args.depth, kernel_size=5, patch_size=2,
                      image_size=args.image_size, batch_size=args.batch_size)
        start = time.perf_counter()
        source = train(TrainConfig.create(**common, dataset="folder:" + source_dir,
                                          epochs=args.source_epochs, name="source"))
        say(f"source: digits 0-4, {args.source_epochs} epochs (dim {args.dim}, depth "
            f"{args.depth}, k5, p2, {args.image_size} px, batch {args.batch_size}, the digits "
            f"default recipe): test top-1 {source['test_accuracy']:.2%} "
            f"({time.perf_counter() - start:.0f} s)")
        results = {arm: [] for arm in arms}
        for seed in range(args.seeds):
            for arm in arms:
                config = arm_config(arm, target, source["model_path"], seed, args.epochs, common,
                                    args.max_lr)
                start = time.perf_counter()
                result = train(config)
                steps = len(result["history"].history["loss"]) * (
                    config.steps_per_epoch or result["history"].params["steps"])
                results[arm].append(float(result["test_accuracy"]))
                note = ""
                if arm == "linear-probe":
                    same = backbone_identical(result["model_path"], source["model_path"])
                    note = f"; backbone bit-identical to the source: {same}"
                say(f"{arm:15s} seed {seed}: {steps} steps (lr {config.max_lr:g}, wd "
                    f"{config.weight_decay:g}), digits 5-9 test top-1 "
                    f"{result['test_accuracy']:.2%} ({time.perf_counter() - start:.0f} s){note}")
    say("# summary: digits 5-9 test top-1 over seeds, mean (min - max)")
    for arm, values in results.items():
        say(f"{arm:15s} {statistics.mean(values):.2%} ({min(values):.2%} - {max(values):.2%}) "
            f"over {len(values)} seed(s)")
    if args.log:
        with open(args.log, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
