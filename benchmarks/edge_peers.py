"""Edge peers: batch-1 CPU latency, file size and held-out accuracy of every way a user gets a
ConvMixer onto a CPU, at 1 and 2 threads, from one interleaved run (`pip install -e ".[bench]"`:
torch, onnx, onnxruntime).

    python -m benchmarks.edge_peers                          # ConvMixer-256/8, 32 px, digits
    python -m benchmarks.edge_peers --variant 768_32 --fit-images 0 --rounds 3 --test-images 16
    python -m benchmarks.edge_peers --quick                  # tiny model, no torch.compile

The peers share the weights (the paper's PyTorch model, benchmarks/reference_torch.py, trained
on scikit-learn's digits at the variant's input size by `train_digits`, converted to our Keras
model by `checkpoints`; with `--fit-images 0`, as for 768/32 at 224 px, random weights, and
what counts is top-1 agreement with the Keras float model) and the calibration images (the
first `--calibration` digits training images):

- keras export: stock Keras `model.export(path, format="litert")`, float32, and its int8
  through the converter options Keras passes on (`optimizations=[tf.lite.Optimize.DEFAULT]`,
  `representative_dataset`);
- onnxruntime: `torch.onnx.export` -> ONNX Runtime (CPU provider) float32, and static int8
  (`onnxruntime.quantization.quant_pre_process` + `quantize_static`, QDQ, the settings its
  documentation gives for x86 CPUs without VNNI: uint8 activations, int8 weights,
  reduce_range), per tensor and per channel;
- torch: eager and `torch.compile`, float32 and bf16 autocast, NCHW and channels_last;
- ours: every build of `convmixer_tf.deploy.tflite.convert_builds` (the export's TFLite set);
  "ours edge build" is the one the export ships as `<name>_int8.tflite`: the fastest int8
  build the export's gate passes (`deploy.gate.gate`: held-out accuracy at most 1 point below
  the Keras model's; with random weights, top-1 agreement >= 98%; `choose_edge_build`),
  chosen here at 1 thread.

Timing: `convmixer_tf.timing.interleaved`, every (peer, threads) pair once per round in
rotating order, after a warm-up; each call is one image, pre-converted to the peer's input
(raw NHWC pixels for TFLite, normalised NCHW for torch and ONNX Runtime). At 1 thread the
figure is the calling thread's CPU time (`time.thread_time`: all three runtimes compute in the
calling thread there; the process's CPU time, also logged, shows it), at 2 threads wall time. Before each call (untimed) torch's thread count
is set and the process sleeps 5 ms so no runtime's spinning workers overlap the next call.
"""

import argparse
import contextlib
import copy
import io
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from convmixer_tf import timing  # noqa: E402

from .harness import keras_model, model_shape, torch_model, variant  # noqa: E402

THREADS = (1, 2)
# The calling thread's CPU time (the 1-thread figure), wall time (the 2-thread one) and the
# process's CPU time (at 1 thread equal to the thread's if no other thread worked).
CLOCKS = ("cpu", "wall", "process")


# ----------------------------------------------------------------------------- data, weights


def digits(cfg, n_test):
    """(x_train, y_train), (x_test, y_test): scikit-learn's digits at the variant's size, raw
    uint8 RGB pixels (`convmixer_tf.training.data.sources.load_digits`)."""
    from convmixer_tf.training.data import sources

    (x_train, y_train), (x_test, y_test) = sources.load_digits(cfg["image"])
    return (x_train, y_train), (x_test[:n_test], y_test[:n_test])


def normalised_nchw(images):
    """Raw 0-255 NHWC pixels -> the PyTorch model's input: ImageNet-normalised NCHW float32
    (what our Keras model does inside, `include_preprocessing`)."""
    import numpy as np

    from convmixer_tf import presets

    mean = np.array(presets.IMAGENET_MEAN, "float32") * 255
    std = np.array(presets.IMAGENET_STD, "float32") * 255
    return np.ascontiguousarray(((np.asarray(images, "float32") - mean) / std)
                                .transpose(0, 3, 1, 2))


def fit_digits(cfg, x, y, seed=0, bn_images=512):
    """The paper's PyTorch model fitted to (x, y) without backpropagation: PyTorch's default
    init for the convolutions, BatchNorm statistics from the first `bn_images` images (the
    cumulative average over batches of 64), then the head fitted by logistic regression on the
    pooled features (scikit-learn). A model with real held-out accuracy and real activation
    ranges for two forward passes: training it end to end takes an hour on a loaded 2-core
    machine. Returned in eval mode."""
    import torch
    from sklearn.linear_model import LogisticRegression

    torch.manual_seed(seed)
    model = torch_model(cfg)
    xs = torch.from_numpy(normalised_nchw(x))
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average
    model.train()
    with torch.no_grad():
        for i in range(0, min(bn_images, len(xs)), 64):
            model(xs[i:i + 64])
    model.eval()
    body, head = model[:-1], model[-1]  # official layout: ..., Flatten, Linear
    with torch.no_grad():
        features = torch.cat([body(xs[i:i + 128]) for i in range(0, len(xs), 128)]).numpy()
    fitted = LogisticRegression(max_iter=3000).fit(features, y)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(fitted.coef_.astype("float32")))
        head.bias.copy_(torch.from_numpy(fitted.intercept_.astype("float32")))
    return model


def train_digits(cfg, x, y, epochs, seed=0, batch=64, max_lr=0.01):
    """The paper's PyTorch model trained end to end on (x, y): the paper's CIFAR recipe without
    augmentation (AdamW, one-cycle to `max_lr`, label smoothing 0.1, clipping 1.0), bf16
    autocast on the CPU (PyTorch's fastest training configuration here). Trained weights give
    the int8 builds real activation ranges, as a user's model has. Returned in eval mode."""
    import numpy as np
    import torch

    torch.manual_seed(seed)
    model = torch_model(cfg)
    xs, ys = torch.from_numpy(normalised_nchw(x)), torch.from_numpy(np.asarray(y, "int64"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=0.01)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    steps = len(xs) // batch
    total, rng = epochs * steps, np.random.default_rng(seed)
    model.train()
    for epoch in range(epochs):
        order = torch.from_numpy(rng.permutation(len(xs)))
        for i in range(steps):
            step = epoch * steps + i
            for group in optimizer.param_groups:
                group["lr"] = float(np.interp(step, [0, total * 2 / 5, total * 4 / 5, total],
                                              [0, max_lr, max_lr / 20, 0]))
            idx = order[i * batch:(i + 1) * batch]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = loss_fn(model(xs[idx]), ys[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
    return model.eval()


def reference_weights(cfg, args, x_train, y_train):
    """(torch model, how its weights came): trained on the first `--fit-images` digits
    training images for `--train-epochs` (`train_digits`), or with `--train-epochs 0` fitted
    without backpropagation (`fit_digits`), or random with `--fit-images 0`."""
    if not args.fit_images:
        return torch_model(cfg).eval(), "random (PyTorch's default init; --fit-images 0)"
    start = time.perf_counter()
    x, y = x_train[:args.fit_images], y_train[:args.fit_images]
    if args.train_epochs:
        model = train_digits(cfg, x, y, args.train_epochs)
        return model, (f"the paper's model trained end to end on {len(x)} digits training "
                       f"images for {args.train_epochs} epochs (bf16 autocast, AdamW one-cycle; "
                       f"{time.perf_counter() - start:.0f} s)")
    model = fit_digits(cfg, x, y)
    return model, (f"PyTorch's default init, BatchNorm statistics and a logistic-regression "
                   f"head fitted to {len(x)} digits training images "
                   f"({time.perf_counter() - start:.0f} s)")


def keras_twin(cfg, torch_module):
    """Our Keras ConvMixer (stock layers, logits) holding the PyTorch model's weights."""
    from convmixer_tf import checkpoints

    model = keras_model(cfg)
    state = checkpoints.normalize_state_dict(torch_module.state_dict())
    return checkpoints.assign_weights(model, checkpoints.keras_weights_from_state_dict(state,
                                                                                       model))


# ----------------------------------------------------------------------------- the peers


class TFLitePeer:
    """A .tflite flatbuffer on LiteRT (XNNPACK applied, as `deploy.litert.LiteRTModel` runs it);
    float32 input and output (every build here keeps float I/O)."""

    def __init__(self, flat, threads):
        import numpy as np

        from convmixer_tf.deploy import litert

        self.runner = litert.LiteRTModel(flat, num_threads=threads)
        self.runner.predict(np.zeros((1, *self.runner.image_size, 3), "float32"))  # allocates
        self.interpreter = self.runner.interpreter
        self.input, self.output = self.runner.input["index"], self.runner.output["index"]

    def feed(self, images):
        return images.astype("float32")

    def __call__(self, x):
        self.interpreter.set_tensor(self.input, x)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.output)


class OnnxPeer:
    """An .onnx file on ONNX Runtime's CPU provider, `threads` intra-op threads, default
    graph optimisations."""

    def __init__(self, path, threads):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.name = self.session.get_inputs()[0].name

    def feed(self, images):
        return normalised_nchw(images)

    def __call__(self, x):
        return self.session.run(None, {self.name: x})[0]


class TorchPeer:
    """The PyTorch model, eager or compiled, in float32 or bf16 autocast, NCHW or
    channels_last, at `threads` (torch's thread count is global: `before` sets it)."""

    def __init__(self, module, threads, image, bf16=False, channels_last=False,
                 compile_=False):
        import numpy as np
        import torch

        self.threads, self.bf16, self.channels_last = threads, bf16, channels_last
        module = copy.deepcopy(module).eval()
        if channels_last:
            module = module.to(memory_format=torch.channels_last)
        self.module = torch.compile(module) if compile_ else module
        if compile_:  # compiles now, at this thread count (inductor's code takes it)
            self.before()
            self(self.feed(np.zeros((1, image, image, 3), "float32")))

    def before(self):
        import torch

        torch.set_num_threads(self.threads)

    def feed(self, images):
        import torch

        x = torch.from_numpy(normalised_nchw(images))
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def __call__(self, x):
        import torch

        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            return self.module(x).float().numpy()


TORCH_PEERS = {  # name: TorchPeer options
    "torch eager fp32 NCHW": dict(),
    "torch eager fp32 channels_last": dict(channels_last=True),
    "torch eager bf16 autocast NCHW": dict(bf16=True),
    "torch eager bf16 autocast channels_last": dict(bf16=True, channels_last=True),
    "torch.compile fp32 channels_last": dict(compile_=True, channels_last=True),
    "torch.compile bf16 autocast channels_last": dict(bf16=True, compile_=True,
                                                      channels_last=True),
}


def keras_export_files(model, calibration, folder):
    """{name: path} of stock Keras `model.export(format="litert")`, float32 and int8 (the
    converter options Keras passes to the TFLite converter)."""
    import numpy as np
    import tensorflow as tf

    def representative():
        for image in calibration:
            yield [np.asarray(image[None], "float32")]

    paths = {}
    variants = {"keras export litert fp32": {},
                "keras export litert int8": dict(optimizations=[tf.lite.Optimize.DEFAULT],
                                                 representative_dataset=representative)}
    for name, options in variants.items():
        path = os.path.join(folder, name.replace(" ", "_") + ".tflite")
        with contextlib.redirect_stdout(io.StringIO()):
            model.export(path, format="litert", verbose=False, **options)
        paths[name] = path
    return paths


def onnx_files(module, cfg, calibration, folder):
    """{name: path}: `torch.onnx.export` of the PyTorch model (batch 1), and ONNX Runtime's
    static int8 quantizations of it (per tensor, per channel), calibrated on `calibration`."""
    import torch
    from onnxruntime import quantization as q

    path = os.path.join(folder, "model.onnx")
    example = torch.zeros(1, 3, cfg["image"], cfg["image"])
    with contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(copy.deepcopy(module).eval(), (example,), path, input_names=["x"],
                          output_names=["logits"], external_data=False)
    paths = {"onnxruntime fp32": path}
    prepared = os.path.join(folder, "model.prep.onnx")
    q.quant_pre_process(path, prepared)
    inputs = normalised_nchw(calibration)

    class Reader(q.CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"x": inputs[i:i + 1]} for i in range(len(inputs))])

        def get_next(self):
            return next(self.items, None)

    for label, per_channel in (("per tensor", False), ("per channel", True)):
        out = os.path.join(folder, f"model.int8.{'channel' if per_channel else 'tensor'}.onnx")
        q.quantize_static(prepared, out, Reader(), quant_format=q.QuantFormat.QDQ,
                          per_channel=per_channel, reduce_range=True,
                          activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8)
        paths[f"onnxruntime int8 static, {label}"] = out
    return paths


def our_builds(model, cfg, calibration):
    """{"ours <mode>": flatbuffer} for every mode of the export's TFLite set."""
    from convmixer_tf.deploy import tflite

    modes = ["float32", "float16", "dynamic_int8", "full_int8"]
    if cfg["activation"] == "gelu":
        modes.append("int8_float_gelu")
    with contextlib.redirect_stdout(io.StringIO()):
        flats = tflite.convert_builds(model, modes, calibration,
                                      (1, cfg["image"], cfg["image"]))
    return {f"ours {mode}": flat for mode, flat in flats.items()}


# ----------------------------------------------------------------------------- measuring


def peers(cfg, args, module, model, calibration, folder, skipped):
    """({(name, threads): peer}, {name: MB}); what cannot be built goes to `skipped`."""
    import torch

    files, sizes = {}, {}

    def attempt(what, make):
        try:
            return make()
        except Exception as error:  # noqa: BLE001 - recorded in the log, the run goes on
            skipped[what] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}"
            print(f"skipped {what}: {skipped[what]}", flush=True)
            return {}

    tflite_flats = {}
    for name, path in attempt("keras export litert",
                              lambda: keras_export_files(model, calibration, folder)).items():
        with open(path, "rb") as f:
            tflite_flats[name] = f.read()
    tflite_flats.update(attempt("ours", lambda: our_builds(model, cfg, calibration)))
    onnx = attempt("onnxruntime", lambda: onnx_files(module, cfg, calibration, folder))
    for name, flat in tflite_flats.items():
        sizes[name] = len(flat) / 1e6
        for t in THREADS:
            files[(name, t)] = lambda flat=flat, t=t: TFLitePeer(flat, t)
    for name, path in onnx.items():
        sizes[name] = os.path.getsize(path) / 1e6
        for t in THREADS:
            files[(name, t)] = lambda path=path, t=t: OnnxPeer(path, t)
    state = io.BytesIO()
    torch.save(module.state_dict(), state)
    for name, options in TORCH_PEERS.items():
        if options.get("compile_") and args.no_compile:
            skipped[name] = "--no-compile / --quick"
            continue
        sizes[name] = len(state.getvalue()) / 1e6
        for t in THREADS:
            files[(name, t)] = lambda o=options, t=t: TorchPeer(module, t, cfg["image"], **o)
    built = {}
    for key, make in files.items():
        if key[0] in skipped:
            continue
        peer = attempt(key[0], make)
        if peer:
            built[key] = peer
    return built, sizes


def accuracy(peer, images, labels, reference):
    """Top-1 accuracy on `labels` and agreement with the Keras float model's top-1
    (`reference`), one image at a time (the peers' batch-1 inputs)."""
    import numpy as np

    if hasattr(peer, "before"):
        peer.before()
    top1 = np.array([int(np.argmax(peer(peer.feed(images[i:i + 1]))))
                     for i in range(len(images))])
    return (float(np.mean(top1 == labels)) if labels is not None else None,
            float(np.mean(top1 == reference)))


def measure(built, x, rounds):
    """{(name, threads): {clock: [s]}} over `rounds` interleaved rounds (`CLOCKS`)."""
    keys = list(built)
    inputs = {k: built[k].feed(x) for k in keys}
    label = {k: f"{k[0]} @{k[1]}" for k in keys}

    def prepare_for(peer):
        def prepare():
            if hasattr(peer, "before"):
                peer.before()
            time.sleep(0.005)  # spinning worker threads of the previous call go idle
        return prepare

    timed = timing.interleaved({label[k]: (lambda _, k=k: built[k](inputs[k])) for k in keys},
                               rounds, warmup=2, clocks=CLOCKS,
                               prepare={label[k]: prepare_for(built[k]) for k in keys})
    return {k: {c: timed[label[k]][c] for c in CLOCKS} for k in keys}


def summary(times):
    """dict(median, min, max) in ms."""
    ms = sorted(1e3 * t for t in times)
    return dict(median=round(statistics.median(ms), 3), min=round(ms[0], 3),
                max=round(ms[-1], 3))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.edge_peers",
                                description=__doc__.split("\n")[0])
    p.add_argument("--variant", default="256_8",
                   help="a presets.MODEL_CONFIGS name or its short form (256_8, 768_32)")
    p.add_argument("--quick", action="store_true",
                   help="the variant's kernel, patch and activation at tiny size; no torch.compile")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--fit-images", type=int, default=10_000,
                   help="digits training images the weights are fitted to (fit_digits; default "
                        "all 1,437); 0: random weights, and agreement with Keras is what counts")
    p.add_argument("--train-epochs", type=int, default=4,
                   help="epochs the weights are trained end to end (train_digits); 0: fitted "
                        "without backpropagation (fit_digits)")
    p.add_argument("--calibration", type=int, default=100,
                   help="digits training images every int8 build calibrates on")
    p.add_argument("--test-images", type=int, default=360,
                   help="held-out digits images accuracy is measured on (360: all)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    try:
        variant(args.variant)
    except ValueError as error:
        p.error(str(error))
    for flag in ("rounds", "fit_images", "train_epochs", "calibration", "test_images"):
        least = 0 if flag in ("fit_images", "train_epochs") else 1
        if getattr(args, flag) < least:
            p.error(f"--{flag.replace('_', '-')} must be >= {least}; got {getattr(args, flag)}")
    args.no_compile = args.no_compile or args.quick
    cfg = model_shape(args.variant, quick=args.quick)
    cfg = dict(cfg, classes=10)  # the digits head, at any size
    started = time.time()
    from convmixer_tf import fast_layers

    fast_layers.configure_threads(2, 1)  # conversion and the Keras reference; not timed
    import numpy as np
    import torch

    from convmixer_tf.deploy import gate

    from . import harness

    torch.set_flush_denormal(True)  # as TF's thread pools do
    info = harness.machine_info(argparse.Namespace(backend="tensorflow", no_torch=False,
                                                   threads=list(THREADS)))
    print(json.dumps(info), flush=True)
    (x_train, y_train), (x_test, y_test) = digits(cfg, args.test_images)
    module, how = reference_weights(dict(cfg), args, x_train, y_train)
    print(f"weights: {how}", flush=True)
    model = keras_twin(cfg, module)
    calibration = x_train[:args.calibration].astype("float32")
    reference_logits = np.asarray(model.predict(x_test.astype("float32"), verbose=0))
    reference = reference_logits.argmax(-1)
    keras_acc = float(np.mean(reference == y_test))
    skipped = {}
    with tempfile.TemporaryDirectory(prefix="edge-peers-") as folder:
        start = time.perf_counter()
        built, sizes = peers(cfg, args, module, model, calibration, folder, skipped)
        build_s = time.perf_counter() - start
        names = list(dict.fromkeys(k[0] for k in built))
        acc = {n: accuracy(built[(n, 1)], x_test, y_test, reference) for n in names
               if (n, 1) in built}
        loadavg_start = os.getloadavg()
        timed = measure(built, x_test[:1].astype("float32"), args.rounds)
        loadavg_end = os.getloadavg()
    results = {}
    for (name, t), times in timed.items():
        results.setdefault(name, dict(mb=round(sizes[name], 3), accuracy=acc[name][0],
                                      agreement=acc[name][1]))
        results[name][f"threads {t}"] = {f"{c}_ms": summary(times[c]) for c in CLOCKS}
    figure = {1: ("cpu_ms", "CPU"), 2: ("wall_ms", "wall")}

    def latency(name, t):
        return results[name].get(f"threads {t}", {}).get(figure[t][0], {}).get("median")

    # The export's choice (deploy.gate): accuracy within 1 point of Keras's with trained
    # weights, top-1 agreement >= 98% with random ones; then the fastest at 1 thread.
    trained = bool(args.fit_images)
    passed = {n: dict(latency_ms=latency(n, 1), refused=gate.gate(
        dict(accuracy=r["accuracy"] if trained else None, agreement=r["agreement"]),
        keras_acc if trained else None)) for n, r in results.items()
        if n.startswith("ours ") and latency(n, 1) is not None}
    edge = gate.choose_edge_build({n.removeprefix("ours "): b for n, b in passed.items()})
    edge = edge and f"ours {edge}"
    best = {}
    for t in THREADS:
        for group, test in (("torch", lambda n: n.startswith("torch")),
                            ("peers", lambda n: not n.startswith("ours"))):
            have = [n for n in results if test(n) and latency(n, t) is not None]
            best[(group, t)] = min(have, key=lambda n: latency(n, t)) if have else None
    title = (f"## Edge peers, batch 1: ConvMixer-{cfg['dim']}/{cfg['depth']} (k{cfg['kernel_size']}"
             f", p{cfg['patch_size']}, {cfg['activation']}), {cfg['image']}x{cfg['image']}, "
             f"{info.get('cpu_class')} CPU; median (min-max) of {args.rounds} interleaved rounds")
    print(f"\n{title}\n\nweights: {how}; Keras float held-out top-1 {keras_acc:.2%} on "
          f"{len(y_test)} digits test images; calibration: {len(calibration)} digits training "
          "images\n")
    print("| candidate | 1 thread, CPU ms | × torch best | 2 threads, wall ms | × torch best "
          "| MB | held-out top-1 | agreement with Keras float |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        cells = []
        for t in THREADS:
            s = r.get(f"threads {t}", {}).get(figure[t][0])
            ref = best[("torch", t)] and latency(best[("torch", t)], t)
            cells += [f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})" if s else "-",
                      f"{s['median'] / ref:.2f}" if s and ref else "-"]
        shown = f"**{name}** (edge build)" if name == edge else name
        acc_cell = f"{r['accuracy']:.2%}" if r["accuracy"] is not None else "-"
        print(f"| {shown} | {' | '.join(cells)} | {r['mb']:.2f} | {acc_cell} | "
              f"{r['agreement']:.2%} |")
    for name, reason in skipped.items():
        print(f"| {name} | not run: {reason} | | | | | | |")
    lines = []
    for t in THREADS:
        torch_best, peer_best = best[("torch", t)], best[("peers", t)]
        if edge and torch_best:
            lines.append(f"{t} thread(s): ours edge build ({edge}) {latency(edge, t):.2f} ms = "
                         f"{latency(edge, t) / latency(torch_best, t):.2f}x torch's best "
                         f"({torch_best}, {latency(torch_best, t):.2f}) and "
                         f"{latency(edge, t) / latency(peer_best, t):.2f}x the fastest peer "
                         f"({peer_best}, {latency(peer_best, t):.2f})")
    lines += [f"refused by the export's gate: {n}: {b['refused']}" for n, b in passed.items()
              if b["refused"]]
    print("\n" + "\n".join(lines))
    print(f"\nload average before timing {loadavg_start}, after {loadavg_end}; building the "
          f"peers {build_s:.0f} s; wall {time.time() - started:.0f} s", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(dict(machine=dict(info, loadavg_timing_start=loadavg_start,
                                        loadavg_end=loadavg_end),
                           config=cfg, weights=how, keras_accuracy=keras_acc,
                           test_images=len(y_test), calibration_images=len(calibration),
                           rounds=args.rounds, edge_build=edge,
                           best={f"{g}, threads {t}": n for (g, t), n in best.items()},
                           results=results, skipped=skipped,
                           refused={n: b["refused"] for n, b in passed.items() if b["refused"]},
                           times={f"{n} @{t}": v for (n, t), v in timed.items()}),
                      f, indent=1)


if __name__ == "__main__":
    main()
