"""Time to accuracy: training seconds until a fixed held-out accuracy, ours vs the paper's
PyTorch ConvMixer, each side at its fastest CPU configuration here, on real images.

    python -m benchmarks.time_to_accuracy \
        --json benchmarks/results/time-to-accuracy-AMX.json \
        --png benchmarks/results/time-to-accuracy-AMX.png \
        | tee benchmarks/results/time-to-accuracy-AMX.log

Both sides train ConvMixer-256/8 (kernel 5, patch 2) on the same Fashion-MNIST images (28x28
grey as RGB, `parity.load_fashion_mnist`), in the same batches in the same order
(`parity.epoch_orders`), with the paper's CIFAR recipe without augmentation (AdamW, one-cycle
to `--max-lr`, label smoothing 0.1, gradient-norm clipping 1.0, batch 128) and the same
initial-weight distribution. Ours: the training job's steps (`train.start`,
`train.build_trainer`: fast layers where measured faster) in `--ours-precision` (default
mixed_bfloat16), through Keras `fit` on one `tf.data` stream of those batches, as the job
feeds it. PyTorch: the paper's model and loop in `--torch-config`
(default eager bf16 autocast NCHW, the fastest of the 8 PyTorch configurations for this model on
this AMX CPU: benchmarks/results/cpu-2core-train-amx.log). `--evals-per-epoch` times per epoch
the clock stops, the held-out images are classified, and the clock resumes: the curve is
(training seconds, accuracy), evaluation excluded; first-step compilation and tracing are
inside the clock on both sides. The sides run one after the other, in `--order`.
"""

import argparse
import json
import os
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from convmixer_tf import fast_layers, presets  # noqa: E402
from convmixer_tf.training import train as train_lib  # noqa: E402
from convmixer_tf.training.config import TrainConfig  # noqa: E402

from . import parity  # noqa: E402

TORCH_OPTIONS = {"eager-bf16-nchw": dict(bf16=True), "eager-fp32-nchw": dict(),
                 "eager-bf16-channels-last": dict(bf16=True, channels_last=True)}


class Clock:
    """Training seconds: runs except between `stop()` and `go()`."""

    def __init__(self):
        self.spent, self.since = 0.0, None

    def go(self):
        self.since = time.perf_counter()

    def stop(self):
        self.spent += time.perf_counter() - self.since
        return self.spent


def eval_steps(steps_per_epoch, epochs, per_epoch):
    """The optimizer steps (1-based counts) after which to evaluate."""
    marks = {round(steps_per_epoch * (e + k / per_epoch)) for e in range(epochs)
             for k in range(1, per_epoch + 1)}
    return sorted(marks)


class _Curve(keras.callbacks.Callback):
    """Ours: at each of `marks` steps, stop the clock, classify the held-out images, resume."""

    def __init__(self, clock, marks, test, batch):
        super().__init__()
        self.clock, self.marks, self.test, self.batch = clock, set(marks), test, batch
        self.points, self.step = [], 0

    def on_train_begin(self, logs=None):
        self.clock.go()

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.step in self.marks:
            float(logs["loss"])  # the step has finished
            seconds = self.clock.stop()
            x, y = self.test
            logits = self.model.predict(x, batch_size=self.batch, verbose=0)
            self.points.append((self.step, seconds, float(np.mean(logits.argmax(1) == y))))
            self.clock.go()


def fixed_order_stream(images, labels, orders, batch_size, num_classes=10):
    """The batches of `orders` (epoch after epoch) as one `tf.data` stream, the way the
    training job feeds `fit` (one iterator, `steps_per_epoch`): a `keras.utils.PyDataset`
    such as `parity.FixedOrder` makes Keras retrace the step at every epoch's start (~8 s for
    ConvMixer-256/8 here)."""
    positions = tf.data.Dataset.from_tensor_slices(orders.reshape(-1))
    return positions.batch(batch_size, drop_remainder=True).map(
        lambda i: (tf.gather(images, i), tf.one_hot(tf.gather(labels, i), num_classes)),
        num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def run_ours(args, train, test, orders):
    (x_train, y_train) = train
    steps = orders.shape[1] // args.batch_size
    batches = fixed_order_stream(tf.constant(x_train), tf.constant(y_train), orders,
                                 args.batch_size)
    config = TrainConfig(
        dataset="keras:fashion_mnist", image_size=28, dim=args.dim, depth=args.depth,
        kernel_size=args.kernel_size, patch_size=args.patch_size, epochs=args.epochs,
        batch_size=args.batch_size, max_lr=args.max_lr, weight_decay=0.01,
        label_smoothing=0.1, clip_norm=1.0, decay_all_weights=True, seed=args.seed,
        precision=args.ours_precision, name="time_to_accuracy", verbose="0")
    strategy, xla = train_lib.start(config)
    _, trainer, fast = train_lib.build_trainer(config, strategy, 10, args.epochs * steps, xla)
    clock = Clock()
    curve = _Curve(clock, eval_steps(steps, args.epochs, args.evals_per_epoch), test,
                   args.eval_batch_size)
    trainer.fit(batches, epochs=args.epochs, steps_per_epoch=steps, shuffle=False, verbose=0,
                callbacks=[curve])
    swaps = ", ".join(name for name, on in fast.items() if on) or "none"
    return dict(points=curve.points, config=f"ours {args.ours_precision} + fast layers ({swaps})")


def run_torch(args, train, test, orders):
    import torch

    options = TORCH_OPTIONS[args.torch_config]
    (x_train, y_train), (x_test, y_test) = train, test
    mean = np.array(presets.IMAGENET_MEAN, "float32").reshape(1, 3, 1, 1)
    std = np.array(presets.IMAGENET_STD, "float32").reshape(1, 3, 1, 1)
    memory = torch.channels_last if options.get("channels_last") else torch.contiguous_format

    def tensor(images):  # NHWC uint8 -> normalised NCHW float32, as our model's Rescaling
        x = images.transpose(0, 3, 1, 2).astype("float32") / 255.0
        return torch.from_numpy((x - mean) / std).contiguous(memory_format=memory)

    model = parity.torch_model(args, args.seed).to(memory_format=memory)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=0.01)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    steps = orders.shape[1] // args.batch_size
    total, marks = args.epochs * steps, set(eval_steps(steps, args.epochs, args.evals_per_epoch))
    x_test_t = tensor(x_test)
    clock, points = Clock(), []
    clock.go()
    for epoch in range(args.epochs):
        for i in range(steps):
            model.train()
            idx = orders[epoch, i * args.batch_size:(i + 1) * args.batch_size]
            for group in optimizer.param_groups:
                group["lr"] = parity.one_cycle(epoch * steps + i, args.max_lr, total)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=options.get("bf16", False)):
                loss = loss_fn(model(tensor(x_train[idx])), torch.from_numpy(y_train[idx]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step = epoch * steps + i + 1
            if step in marks:
                seconds = clock.stop()
                model.eval()
                correct = 0
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16,
                                                     enabled=options.get("bf16", False)):
                    for j in range(0, len(y_test), args.eval_batch_size):
                        logits = model(x_test_t[j:j + args.eval_batch_size]).float()
                        correct += int((logits.argmax(1).numpy()
                                        == y_test[j:j + args.eval_batch_size]).sum())
                points.append((step, seconds, correct / len(y_test)))
                clock.go()
    return dict(points=points, config=f"torch {args.torch_config}")


def first_reaching(points, target):
    """(training seconds, step) of the first point at or above `target`; None if never."""
    for step, seconds, accuracy in points:
        if accuracy >= target:
            return seconds, step
    return None


def plot(results, target, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.2), dpi=110)
    for side, result in results.items():
        seconds = [s for _, s, _ in result["points"]]
        accuracy = [100 * a for _, _, a in result["points"]]
        axis.plot(seconds, accuracy, marker="o", markersize=3, label=result["config"])
    axis.axhline(100 * target, color="grey", linestyle="--", linewidth=1,
                 label=f"target {100 * target:.0f}%")
    axis.set_xlabel("training seconds (evaluation excluded)")
    axis.set_ylabel("held-out top-1 accuracy (%)")
    axis.set_ylim(max(0, min(100 * a for r in results.values() for _, _, a in r["points"]) - 5),
                  100)
    axis.set_title(title, fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.time_to_accuracy",
                                description=__doc__.split("\n")[0])
    parity.add_recipe_args(p, dim=256, depth=8, epochs=4, test_size=2000,
                           test_help="held-out images (the test split's first)")
    p.add_argument("--evals-per-epoch", type=int, default=4)
    p.add_argument("--target", type=float, default=0.85, help="held-out accuracy to reach")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ours-precision", default="mixed_bfloat16",
                   choices=["float32", "mixed_bfloat16"])
    p.add_argument("--torch-config", default="eager-bf16-nchw", choices=sorted(TORCH_OPTIONS))
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores, "
                                                          "as TensorFlow uses)")
    p.add_argument("--order", nargs="+", default=["torch", "keras"], choices=["torch", "keras"])
    p.add_argument("--json", default="")
    p.add_argument("--png", default="")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads or os.cpu_count())
    torch.set_flush_denormal(True)
    train, test = parity.load_fashion_mnist(args.train_size, args.test_size)
    orders = parity.epoch_orders(args.seed, args.epochs, len(train[1]), args.batch_size)
    parity.check_schedule(args.max_lr, args.epochs * (orders.shape[1] // args.batch_size))
    cpu = fast_layers.cpu_class()
    print(f"# python -m benchmarks.time_to_accuracy {' '.join(os.sys.argv[1:])}")
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; CPU class {cpu}, "
          f"{os.cpu_count()} cores; load average {os.getloadavg()}; tensorflow "
          f"{tf.__version__}, keras {keras.__version__}, torch {torch.__version__}")
    print(f"# ConvMixer-{args.dim}/{args.depth} k{args.kernel_size} p{args.patch_size}, "
          f"Fashion-MNIST {len(train[1]):,} train / {len(test[1]):,} held-out at 28 px, "
          f"{args.epochs} epochs of {orders.shape[1] // args.batch_size} steps, batch "
          f"{args.batch_size}, target {100 * args.target:.0f}%", flush=True)
    results = {}
    for side in args.order:
        run = run_ours if side == "keras" else run_torch
        results[side] = run(args, train, test, orders)
        print(f"\n{results[side]['config']}  (load average {os.getloadavg()[0]:.2f})")
        for step, seconds, accuracy in results[side]["points"]:
            print(f"  step {step:4d}  {seconds:7.1f} s  {100 * accuracy:6.2f}%", flush=True)
    print(f"\n| side | configuration | training s to {100 * args.target:.0f}% (step) "
          f"| final accuracy | training s, all steps |")
    print("|---|---|---|---|---|")
    reached = {}
    for side, result in results.items():
        reached[side] = first_reaching(result["points"], args.target)
        step, seconds, accuracy = result["points"][-1]
        cell = (f"{reached[side][0]:.1f} ({reached[side][1]})" if reached[side]
                else "not reached")
        print(f"| {'ours' if side == 'keras' else 'PyTorch'} | {result['config']} | {cell} "
              f"| {100 * accuracy:.2f}% | {seconds:.1f} |")
    if reached.get("keras") and reached.get("torch"):
        print(f"\nratio ours / PyTorch, training seconds to {100 * args.target:.0f}%: "
              f"{reached['keras'][0] / reached['torch'][0]:.2f}x "
              f"({reached['torch'][0] / reached['keras'][0]:.2f}x faster)")
    print(f"# load average at the end {os.getloadavg()}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(dict(args=vars(args), cpu=cpu, results=results), f, indent=1)
    if args.png:
        plot(results, args.target, args.png,
             f"ConvMixer-{args.dim}/{args.depth}, Fashion-MNIST {len(train[1]):,} train, "
             f"{cpu} CPU ({os.cpu_count()} cores)")
    return results


if __name__ == "__main__":
    main()
