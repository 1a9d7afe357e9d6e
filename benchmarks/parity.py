"""Training-dynamics parity: the paper's PyTorch ConvMixer and ours, trained alike on Fashion-MNIST.

    python -m benchmarks.parity               # the BENCHMARKS.md table (24 min, 2 busy cores)
    python -m benchmarks.parity --seeds 0 --epochs 1 --train-size 1024 --test-size 512 --dim 32
    python -m benchmarks.parity --sides keras --init keras   # ablation: Keras's default init

Both sides get the same real images (Fashion-MNIST through `keras.datasets`, 28x28 grey repeated
to 3 channels and kept at 28, so patch 2 gives a 14x14 grid), the same batches in the same order
(one numpy permutation per epoch, generated once and fed to both), no augmentation, the same
one-cycle schedule (checked step by step against the paper's formula), AdamW hyper-parameters,
label-smoothed cross-entropy and gradient-norm clipping. Ours is the training job's own steps
with a `TrainConfig`: `train.start` (seed, precision), `train.build_model` (the builder's
initialisation, or `--init`'s), `train.build_trainer` (fused layers, trainer, AdamW on the
one-cycle schedule, compile), then Keras `fit` on the fixed-order batches (the run folder's
callbacks and the final save, which do not change what is learnt, are left out); the PyTorch
side is the paper's model (`reference_torch.ConvMixer`) with `torch.optim.AdamW` in the paper's
plain loop.
"""

import argparse
import json
import os
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from convmixer_tf import checkpoints, presets  # noqa: E402
from convmixer_tf.training import schedules, train as train_lib  # noqa: E402
from convmixer_tf.training.config import TrainConfig  # noqa: E402

CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot")
INITS = ("ours", "keras", "copied")
GATE_POINTS = 1.0  # ours may end at most this far below PyTorch (mean over seeds), issue 10


def load_fashion_mnist(train_size=0, test_size=0, subset_seed=0):
    """`((x_train, y_train), (x_test, y_test))`: uint8 (N, 28, 28, 3) images, int64 labels; a
    fixed random `train_size` subset of the 60,000 training images and the first `test_size`
    of the 10,000 test images (0 = all)."""
    try:
        (x_train, y_train), (x_test, y_test) = keras.datasets.fashion_mnist.load_data()
    except Exception as error:  # offline and not cached: say what to place where
        raise FileNotFoundError(
            "Fashion-MNIST is not in ~/.keras/datasets/fashion-mnist/ and cannot be downloaded: "
            "`apt-get install dataset-fashion-mnist` and copy its four *-ubyte.gz files there "
            f"({type(error).__name__}: {error})"
        ) from error
    if train_size:
        keep = np.sort(np.random.default_rng(subset_seed).permutation(len(y_train))[:train_size])
        x_train, y_train = x_train[keep], y_train[keep]
    if test_size:
        x_test, y_test = x_test[:test_size], y_test[:test_size]

    def rgb(x):
        return np.repeat(x[..., None], 3, axis=-1)

    return (rgb(x_train), y_train.astype("int64")), (rgb(x_test), y_test.astype("int64"))


def epoch_orders(seed, epochs, n, batch_size):
    """(epochs, steps * batch_size) training indices: one permutation of `n` per epoch, the
    remainder dropped (drop_remainder, as our training pipeline does)."""
    rng = np.random.default_rng(seed)
    steps = n // batch_size
    if steps < 1:
        raise ValueError(f"batch_size {batch_size} is larger than the {n} training images")
    return np.stack([rng.permutation(n)[:steps * batch_size] for _ in range(epochs)])


def one_cycle(step, max_lr, total_steps):
    """The paper's schedule in its own formula (np.interp through the four points)."""
    e = total_steps
    return float(np.interp(step, [0, e * 2 / 5, e * 4 / 5, e], [0, max_lr, max_lr / 20, 0]))


def check_schedule(max_lr, total_steps):
    """Our `OneCycle` must give the paper's formula's lr at every step (same lr both sides)."""
    ours = schedules.OneCycle(max_lr, total_steps)
    for step in range(total_steps):
        a, b = float(ours(step)), one_cycle(step, max_lr, total_steps)
        if abs(a - b) > 1e-6 * max_lr:
            raise RuntimeError(f"OneCycle({step}) = {a}; the paper's formula gives {b}")


class FixedOrder(keras.utils.PyDataset):
    """Training batches of (uint8 images, one-hot labels) in `orders[epoch]` order, moving to
    the next epoch's order after each complete epoch; logs every batch it serves."""

    def __init__(self, images, labels, orders, batch_size, num_classes):
        super().__init__(workers=1, use_multiprocessing=False)
        self.images, self.labels, self.orders = images, labels, orders
        self.batch_size, self.num_classes = batch_size, num_classes
        self.epoch, self.fetched = 0, 0
        self.served = []  # (epoch, batch index), in serving order

    def __len__(self):
        return self.orders.shape[1] // self.batch_size

    def __getitem__(self, i):
        self.served.append((self.epoch, i))
        self.fetched += 1
        idx = self.orders[self.epoch, i * self.batch_size:(i + 1) * self.batch_size]
        return self.images[idx], np.eye(self.num_classes, dtype="float32")[self.labels[idx]]

    def on_epoch_begin(self):
        self.fetched = 0

    def on_epoch_end(self):
        # Keras's first peek at a batch (to build its metrics) opens and closes an epoch too:
        # only a complete epoch moves on.
        if self.fetched >= len(self) and self.epoch + 1 < len(self.orders):
            self.epoch += 1


def torch_model(args, seed):
    """The paper's model as `torch.manual_seed(seed)` initialises it."""
    import torch

    from . import reference_torch

    torch.manual_seed(seed)
    return reference_torch.ConvMixer(args.dim, args.depth, args.kernel_size, args.patch_size,
                                     num_classes=10)


def initialise(model, args, seed):
    """Sets our model's initial weights as `--init` asks: ours (the builder's, kept), keras
    (Keras's layer defaults: glorot-uniform kernels, zero biases; ablation) or copied (the
    PyTorch side's exact initial tensors; ablation)."""
    if args.init == "keras":
        for layer in model.layers:
            kernel, bias = getattr(layer, "kernel", None), getattr(layer, "bias", None)
            if kernel is not None:
                kernel.assign(keras.initializers.GlorotUniform()(kernel.shape, kernel.dtype))
            if bias is not None:
                bias.assign(np.zeros(bias.shape, "float32"))
    elif args.init == "copied":
        state = checkpoints.normalize_state_dict(torch_model(args, seed).state_dict())
        checkpoints.assign_weights(model, checkpoints.keras_weights_from_state_dict(state, model))


def run_keras(args, seed, train, test, orders):
    """Ours, through the training job's steps; returns (test accuracy per epoch, seconds)."""
    (x_train, y_train), (x_test, y_test) = train, test
    batches = FixedOrder(x_train, y_train, orders, args.batch_size, 10)
    test_ds = tf.data.Dataset.from_tensor_slices(
        (x_test, np.eye(10, dtype="float32")[y_test])).batch(args.eval_batch_size)
    config = TrainConfig(
        dataset="keras:fashion_mnist", image_size=x_train.shape[1], dim=args.dim,
        depth=args.depth, kernel_size=args.kernel_size, patch_size=args.patch_size,
        epochs=args.epochs, batch_size=args.batch_size, max_lr=args.max_lr,
        weight_decay=args.weight_decay, label_smoothing=args.label_smoothing,
        clip_norm=args.clip_norm, adam_epsilon=args.adam_epsilon,
        decay_all_weights=True,  # the paper's AdamW(model.parameters())
        seed=seed, name="parity", verbose="0",
    )
    start = time.perf_counter()
    strategy, xla = train_lib.start(config)
    model = train_lib.build_model(config, 10, x_train.shape[1:])
    initialise(model, args, seed)
    _, trainer, _ = train_lib.build_trainer(config, strategy, 10, args.epochs * len(batches),
                                            xla, model=model)
    history = trainer.fit(batches, epochs=args.epochs, validation_data=test_ds,
                          shuffle=False, verbose=0)
    seconds = time.perf_counter() - start
    expected = [(e, i) for e in range(args.epochs) for i in range(len(batches))]
    if batches.served[-len(expected):] != expected:
        raise RuntimeError(f"Our training job was not fed the fixed order: {batches.served}")
    return [float(a) for a in history.history["val_accuracy"]], seconds


def run_torch(args, seed, train, test, orders):
    """The paper's model and optimizer in a plain loop; returns (test accuracy per epoch, s)."""
    import torch

    (x_train, y_train), (x_test, y_test) = train, test
    mean = np.array(presets.IMAGENET_MEAN, "float32").reshape(1, 3, 1, 1)
    std = np.array(presets.IMAGENET_STD, "float32").reshape(1, 3, 1, 1)

    def tensor(images):  # NHWC uint8 -> normalised NCHW float32, what our model's Rescaling does
        x = images.transpose(0, 3, 1, 2).astype("float32") / 255.0
        return torch.from_numpy((x - mean) / std)

    model = torch_model(args, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=args.weight_decay,
                                  eps=args.torch_epsilon)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    steps = orders.shape[1] // args.batch_size
    total = args.epochs * steps
    x_test_t, y_test_t = tensor(x_test), torch.from_numpy(y_test)
    curve, start = [], time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        for i in range(steps):
            idx = orders[epoch, i * args.batch_size:(i + 1) * args.batch_size]
            # Keras evaluates the schedule at the optimizer's step count before the update.
            for group in optimizer.param_groups:
                group["lr"] = one_cycle(epoch * steps + i, args.max_lr, total)
            loss = loss_fn(model(tensor(x_train[idx])), torch.from_numpy(y_train[idx]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_norm)
            optimizer.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for j in range(0, len(y_test), args.eval_batch_size):
                logits = model(x_test_t[j:j + args.eval_batch_size])
                correct += (logits.argmax(1) == y_test_t[j:j + args.eval_batch_size]).sum().item()
        curve.append(correct / len(y_test))
    return curve, time.perf_counter() - start


def add_recipe_args(p, dim, depth, epochs, test_size, test_help):
    """The model, data-size and schedule flags this benchmark and `time_to_accuracy` share."""
    p.add_argument("--dim", type=int, default=dim)
    p.add_argument("--depth", type=int, default=depth)
    p.add_argument("--kernel-size", type=int, default=5)
    p.add_argument("--patch-size", type=int, default=2)
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--eval-batch-size", type=int, default=500)
    p.add_argument("--train-size", type=int, default=8000, help="0 = all 60,000")
    p.add_argument("--test-size", type=int, default=test_size, help=test_help)
    p.add_argument("--max-lr", type=float, default=0.01)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.parity",
                                description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                   help="init (torch and Keras) and data order")
    p.add_argument("--sides", nargs="+", default=["torch", "keras"], choices=["torch", "keras"])
    p.add_argument("--init", default="ours", choices=INITS,
                   help="our model's initial weights: ours (the builder's, PyTorch's "
                        "distribution), keras (Keras layer defaults; ablation), copied (the "
                        "PyTorch side's exact tensors; ablation)")
    add_recipe_args(p, dim=64, depth=4, epochs=5, test_size=0, test_help="0 = all 10,000")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--clip-norm", type=float, default=1.0, help="0 = no clipping")
    p.add_argument("--adam-epsilon", type=float, default=1e-8, help="ours (Keras AdamW)")
    p.add_argument("--torch-epsilon", type=float, default=1e-8, help="torch AdamW's default")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1: on a busy 2-core machine 2 threads spin "
                        "and run 3-5x slower)")
    p.add_argument("--json", default="", help="also write the curves and args here")
    args = p.parse_args(argv)
    if args.init != "ours" and "torch" in args.sides and len(args.sides) == 1:
        p.error("--init changes our side only; add --sides keras")
    return args


def main(argv=None):
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as TF's thread pools do
    train, test = load_fashion_mnist(args.train_size, args.test_size)
    results = {}
    for seed in args.seeds:
        orders = epoch_orders(seed, args.epochs, len(train[1]), args.batch_size)
        check_schedule(args.max_lr, args.epochs * (orders.shape[1] // args.batch_size))
        for side in args.sides:
            run = run_torch if side == "torch" else run_keras
            curve, seconds = run(args, seed, train, test, orders)
            results[f"{side}/{seed}"] = dict(curve=curve, seconds=seconds)
            print(f"seed {seed} {side:5s} {seconds:6.1f} s  "
                  + " ".join(f"{a:.4f}" for a in curve), flush=True)
    summary = print_table(args, results)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(dict(args=vars(args), results=results, summary=summary), f, indent=1)
    return dict(results=results, summary=summary)


def print_table(args, results):
    """Prints the per-epoch test accuracies side by side and the gate; returns the means."""
    print(f"\nTest accuracy (%) per epoch, PyTorch reference vs ours (init: {args.init}):")
    header = " | ".join(f"seed {s} torch | seed {s} ours" for s in args.seeds)
    print(f"| epoch | {header} |")
    for e in range(args.epochs):
        cells = []
        for s in args.seeds:
            for side in ("torch", "keras"):
                r = results.get(f"{side}/{s}")
                cells.append(f"{100 * r['curve'][e]:.2f}" if r else "-")
        print(f"| {e + 1} | " + " | ".join(cells) + " |")
    summary = {}
    for side in ("torch", "keras"):
        finals = [results[f"{side}/{s}"]["curve"][-1] for s in args.seeds
                  if f"{side}/{s}" in results]
        if finals:
            summary[side] = 100 * float(np.mean(finals))
    if len(summary) == 2:
        summary["difference"] = summary["keras"] - summary["torch"]
        summary["gate"] = bool(summary["difference"] >= -GATE_POINTS)
        print(f"mean final: torch {summary['torch']:.2f}  ours {summary['keras']:.2f}  "
              f"ours - torch {summary['difference']:+.2f} points "
              f"(gate >= -{GATE_POINTS:.2f}: {'PASS' if summary['gate'] else 'FAIL'})")
    return summary


if __name__ == "__main__":
    main()
