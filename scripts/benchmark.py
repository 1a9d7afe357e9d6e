"""ConvMixer speed, this project against the paper's PyTorch model, side by side in one run.

    python scripts/benchmark.py                    # everything, CPU, ~15 min on 2 cores
    python scripts/benchmark.py --quick            # tiny shapes, < 1 min: a smoke run
    python scripts/benchmark.py --only train       # peak,train,infer,tflite (comma list)
    python scripts/benchmark.py --backend jax      # GPU: Keras on JAX (XLA, bf16) vs torch eager/compile

Every comparison is interleaved: each round runs every candidate once, in rotating order, after a
warm-up, and the median over rounds is reported, so load changes hit ours and torch alike. Both
frameworks get the same number of threads (`--threads`, default 2). Results print as Markdown
tables (and `--json PATH` writes them); BENCHMARKS.md has the commands and the numbers.
torch is an optional extra (`pip install convmixer_tf[torch]`); its side is the paper's model from
scripts/reference_torch.py (the same modules timm uses), eager and, on GPU, torch.compile.
"""

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import sys
import time

SECTIONS = ("peak", "train", "infer", "tflite")
# LiteRT candidates: the export's builds (convmixer_tf.deploy.tflite.MODES), plus the
# full-int8 build without the large-depthwise split and without XNNPACK, to show what each buys.
TFLITE_MODES = ("float32", "float16", "dynamic_int8", "full_int8", "int8_float_gelu")

# Shapes from the issue: the paper's CIFAR model for training, the ImageNet one for inference.
FULL = dict(
    train=dict(dim=256, depth=8, kernel_size=5, patch_size=2, image=32, batch=128, classes=10,
               activation="gelu", rounds=3, steps=2),
    infer=dict(dim=768, depth=32, kernel_size=7, patch_size=7, image=224, batches=(1, 32),
               classes=1000, activation="relu", rounds={1: 7, 32: 2}),
    tflite=[
        dict(dim=256, depth=8, kernel_size=5, patch_size=2, image=32, classes=10,
             activation="gelu", rounds=30),
        dict(dim=768, depth=32, kernel_size=7, patch_size=7, image=224, classes=1000,
             activation="relu", rounds=5),
    ],
    peak=dict(n=2048, rounds=8),
    calibration=8,
)
QUICK = dict(
    train=dict(dim=32, depth=2, kernel_size=5, patch_size=2, image=16, batch=16, classes=10,
               activation="gelu", rounds=2, steps=1),
    infer=dict(dim=32, depth=2, kernel_size=7, patch_size=7, image=28, batches=(1, 4),
               classes=10, activation="relu", rounds={1: 2, 4: 2}),
    tflite=[
        dict(dim=16, depth=1, kernel_size=3, patch_size=2, image=16, classes=10,
             activation="gelu", rounds=3),
    ],
    peak=dict(n=256, rounds=2),
    calibration=2,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default=",".join(SECTIONS),
                   help=f"comma-separated sections to run, from {','.join(SECTIONS)}")
    p.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run in < 1 min")
    p.add_argument("--threads", type=int, default=2,
                   help="intra-op threads for TF, torch and LiteRT alike (default 2)")
    p.add_argument("--inter-op", type=int, default=1,
                   help="TF inter-op threads (default 1; TF's own default is the core count)")
    p.add_argument("--backend", choices=("tensorflow", "jax"), default="tensorflow",
                   help="Keras backend for our side; jax is the GPU path (XLA, bfloat16)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch side")
    p.add_argument("--ablations", action="store_true",
                   help="train: also each speed-up alone (fused BN, GELU gradient, bf16, input "
                        "pipeline), to measure what each one brings")
    p.add_argument("--rounds", type=int, default=0, help="override the rounds of every section")
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = sorted(set(args.sections) - set(SECTIONS))
    if bad or not args.sections:
        p.error(f"--only takes a comma list of {', '.join(SECTIONS)}; got {args.only!r}")
    if args.threads < 1 or args.inter_op < 1:
        p.error("--threads and --inter-op must be >= 1")
    if args.backend == "jax" and "tflite" in args.sections:
        if args.only != ",".join(SECTIONS):
            p.error("the tflite section needs --backend tensorflow")
        args.sections.remove("tflite")  # TFLite converts TF graphs: not part of the JAX run
    return args


# ----------------------------------------------------------------------------- measurement


def flops_per_image(dim, depth, kernel_size, patch_size, image, classes, **_):
    """Forward FLOPs (2 x multiply-adds) of one image: stem, depthwise, pointwise, head.
    Elementwise work (GELU, BN, adds) is left out, as usual for MFU."""
    tokens = (image // patch_size) ** 2
    macs = tokens * dim * 3 * patch_size**2  # stem
    macs += depth * tokens * dim * (kernel_size**2 + dim)  # depthwise + pointwise
    macs += dim * classes  # head
    return 2 * macs


def interleaved(candidates, rounds, warmup=1):
    """Runs each `candidates[name]()` (returns items processed) `warmup` times, then `rounds`
    rounds in rotating order; returns {name: dict(median_s, items, per_s, times)}."""
    names = list(candidates)
    for name in names:
        for _ in range(warmup):
            candidates[name]()
    times = {n: [] for n in names}
    items = {}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            items[name] = candidates[name]()
            times[name].append(time.perf_counter() - start)
    out = {}
    for name in names:
        med = statistics.median(times[name])
        out[name] = dict(median_s=med, items=items[name], per_s=items[name] / med,
                         best_per_s=items[name] / min(times[name]),
                         times=[round(t, 4) for t in times[name]])
    return out


def machine_info(args):
    info = dict(python=platform.python_version(), machine=platform.machine())
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            text = f.read()
        info["cpu"] = next(l.split(":", 1)[1].strip() for l in text.splitlines()
                           if l.startswith("model name"))
        flags = next(l for l in text.splitlines() if l.startswith("flags")).split()
        info["cpu_flags"] = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni",
                                         "amx_bf16") if f in flags]
    except (OSError, StopIteration):
        pass
    info["cores"] = os.cpu_count()
    if args.backend == "jax":
        import jax

        info["jax_devices"] = [str(d) for d in jax.devices()]
    if not args.no_torch:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    info["loadavg_start"] = os.getloadavg()
    info["threads"] = args.threads
    from importlib import metadata

    for dist in ("tensorflow", "keras", "torch", "ai-edge-litert", "jax", "jaxlib"):
        try:  # read from the installed metadata: importing TF would claim a GPU's memory
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return info


def table(title, header, rows):
    lines = [f"\n### {title}\n", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    print("\n".join(lines), flush=True)


# ----------------------------------------------------------------------------- model builders


def keras_model(cfg, precision="float32", fast=False):
    """Our ConvMixer for `cfg`; `fast` is False, True (every `layers.accelerate` swap) or
    a dict of `accelerate` switches."""
    import keras

    from convmixer_tf import layers, model as model_lib

    keras.mixed_precision.set_global_policy(precision)
    try:
        model = model_lib.ConvMixer(
            cfg["dim"], cfg["depth"], cfg["kernel_size"], cfg["patch_size"],
            activation=cfg["activation"], input_shape=(cfg["image"], cfg["image"], 3),
            classes=cfg["classes"], classifier_activation=None,
        )
        if not fast:
            return model
        return layers.accelerate(model, **(fast if isinstance(fast, dict) else {}))
    finally:
        keras.mixed_precision.set_global_policy("float32")


def torch_model(cfg, device="cpu"):
    """The paper's PyTorch ConvMixer (NCHW), on `device`."""
    import reference_torch

    model = reference_torch.ConvMixer(cfg["dim"], cfg["depth"], cfg["kernel_size"],
                                      cfg["patch_size"], cfg["activation"], cfg["classes"])
    return model.to(device)


# ----------------------------------------------------------------------------- sections


def matmul_peak(cfg, args):
    """Measured dense matmul GFLOP/s (fp32 and bf16) of this machine: the MFU denominator."""
    import numpy as np

    n = cfg["n"]
    flops = 2 * n**3
    cands = {}
    if args.backend == "tensorflow":
        import tensorflow as tf

        for dtype in ("float32", "bfloat16"):
            a = tf.cast(tf.random.normal((n, n)), dtype)
            f = tf.function(lambda a=a: tf.matmul(a, a))

            def run(f=f):
                f().numpy()
                return flops

            cands[f"tf matmul {dtype}"] = run
    else:
        import jax
        import jax.numpy as jnp

        for dtype in ("float32", "bfloat16"):
            a = jnp.asarray(np.random.rand(n, n), dtype=dtype)
            f = jax.jit(lambda a: a @ a)

            def run(f=f, a=a):
                f(a).block_until_ready()
                return flops

            cands[f"jax matmul {dtype}"] = run
    if not args.no_torch:
        import torch

        dev = _torch_device(args)
        for dtype in (torch.float32, torch.bfloat16):
            a = torch.randn(n, n, device=dev, dtype=dtype)

            def run(a=a):
                (a @ a).sum().item()
                return flops

            cands[f"torch matmul {str(dtype).split('.')[-1]}"] = run
    res = interleaved(cands, args.rounds or cfg["rounds"])
    table(f"Matmul peak ({n}x{n}x{n})", ["kernel", "GFLOP/s (median)", "GFLOP/s (best)"],
          [(k, f"{v['per_s'] / 1e9:.1f}", f"{v['best_per_s'] / 1e9:.1f}")
           for k, v in res.items()])
    # The MFU denominator: the best rate any framework reached, per dtype.
    peak = {d: max(v["best_per_s"] for k, v in res.items() if k.endswith(d))
            for d in ("float32", "bfloat16")}
    return dict(results=res, peak_flops=peak)


def _torch_device(args):
    import torch

    if args.backend == "jax" and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def _tf_dataset(cfg, n_images=512):
    """The training job's input pipeline shape (uint8 images, shuffle, batch, one-hot, prefetch),
    over random data kept in memory."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n_images, cfg["image"], cfg["image"], 3), dtype=np.uint8)
    y = rng.integers(0, cfg["classes"], n_images).astype("int32")
    ds = tf.data.Dataset.from_tensor_slices((x, y)).repeat().shuffle(n_images, seed=0)
    ds = ds.batch(cfg["batch"], drop_remainder=True)
    ds = ds.map(lambda a, b: (a, tf.one_hot(b, cfg["classes"])),
                num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def _keras_train_candidate(cfg, args, precision, fast, jit_compile=False, pipeline=True):
    import keras

    model = keras_model(cfg, precision, fast)
    model.compile(
        optimizer=keras.optimizers.AdamW(1e-3, weight_decay=0.01, global_clipnorm=1.0),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1),
        jit_compile=jit_compile,
    )
    steps = cfg["steps"]
    if args.backend == "tensorflow":
        import tensorflow as tf

        ds = _tf_dataset(cfg)
        if not pipeline:  # one batch, materialised once: no input work on the step's path
            ds = tf.data.Dataset.from_tensors(next(iter(ds))).cache().repeat()
        # fit()'s own step function on one long-lived iterator: the steady state of an epoch.
        # (Each fit() call also pays ~1 s of iterator set-up/tear-down here, once per epoch.)
        model.make_train_function()
        iterator = iter(ds)

        def run():
            for _ in range(steps):
                logs = model.train_function(iterator)
            float(logs["loss"])  # waits for the last step
            return steps * cfg["batch"]
    else:
        import numpy as np

        rng = np.random.default_rng(0)
        n = steps * cfg["batch"]
        x = rng.integers(0, 256, (n, cfg["image"], cfg["image"], 3)).astype("float32")
        y = np.eye(cfg["classes"], dtype="float32")[rng.integers(0, cfg["classes"], n)]

        def run():
            model.fit(x, y, batch_size=cfg["batch"], epochs=1, verbose=0, shuffle=False)
            return n
    return run


def _torch_train_candidate(cfg, args, bf16=False, compile_=False, channels_last=False):
    import torch

    dev = _torch_device(args)
    model = torch_model(cfg, dev)
    x = torch.randn(cfg["batch"], 3, cfg["image"], cfg["image"], device=dev)
    y = torch.randint(0, cfg["classes"], (cfg["batch"],), device=dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), 1e-3, weight_decay=0.01)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    fwd = torch.compile(model) if compile_ else model
    steps = cfg["steps"]

    def run():
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
                loss = loss_fn(fwd(x), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        loss.item()
        return steps * cfg["batch"]

    return run


def train_section(cfg, args, peak):
    """Training images/s of ConvMixer-256/8 (k5 p2), 32x32, batch 128: our variants vs torch."""
    cands = {}
    if args.backend == "tensorflow":
        cands["keras fp32 (stock layers)"] = _keras_train_candidate(cfg, args, "float32", False)
        if args.ablations:
            cands["keras fp32 + fused BN"] = _keras_train_candidate(
                cfg, args, "float32", dict(gelu=False))
            cands["keras fp32 + GELU grad"] = _keras_train_candidate(
                cfg, args, "float32", dict(batchnorm=False, gelu_xla=False))
            cands["keras fp32 + GELU grad, XLA-fused"] = _keras_train_candidate(
                cfg, args, "float32", dict(batchnorm=False))
        cands["keras fp32 + fused BN/GELU"] = _keras_train_candidate(cfg, args, "float32", True)
        if args.ablations:
            cands["keras fp32 + fused BN/GELU, no input pipeline"] = _keras_train_candidate(
                cfg, args, "float32", True, pipeline=False)
            cands["keras bf16 (stock layers)"] = _keras_train_candidate(
                cfg, args, "mixed_bfloat16", False)
            cands["keras bf16 + fused BN/GELU, bf16 depthwise"] = _keras_train_candidate(
                cfg, args, "mixed_bfloat16", dict(depthwise_float32=False))
        cands["keras bf16 + fused BN/GELU, fp32 depthwise"] = _keras_train_candidate(
            cfg, args, "mixed_bfloat16", True)
    else:
        cands["keras-jax fp32 (XLA)"] = _keras_train_candidate(cfg, args, "float32", False, True)
        cands["keras-jax bf16 (XLA)"] = _keras_train_candidate(
            cfg, args, "mixed_bfloat16", False, True)
    if not args.no_torch:
        cands["torch eager fp32"] = _torch_train_candidate(cfg, args)
        cands["torch eager bf16 autocast"] = _torch_train_candidate(cfg, args, bf16=True)
        if args.backend == "jax":
            cands["torch.compile bf16"] = _torch_train_candidate(cfg, args, True, True)
    res = interleaved(cands, args.rounds or cfg["rounds"])
    train_flops = 3 * flops_per_image(**cfg)  # forward + backward (2x)
    base = res.get("torch eager fp32")
    rows = []
    for name, r in res.items():
        p = peak.get("bfloat16" if "bf16" in name else "float32")
        rows.append((name, f"{r['per_s']:.1f}",
                     f"{r['per_s'] / base['per_s']:.2f}" if base else "-",
                     f"{100 * r['per_s'] * train_flops / p:.1f}%" if p else "-"))
    table(f"Training, ConvMixer-{cfg['dim']}/{cfg['depth']} k{cfg['kernel_size']} "
          f"p{cfg['patch_size']}, {cfg['image']}x{cfg['image']}, batch {cfg['batch']}",
          ["candidate", "images/s", "x torch eager fp32", "MFU"], rows)
    return res


def _keras_infer_candidate(model, x, args):
    if args.backend == "tensorflow":
        import tensorflow as tf

        f = tf.function(lambda x: model(x, training=False))
        xt = tf.constant(x)

        def run():
            f(xt).numpy()
            return len(x)
    else:
        import jax

        tv = [v.value for v in model.trainable_variables]
        ntv = [v.value for v in model.non_trainable_variables]
        f = jax.jit(lambda tv, ntv, x: model.stateless_call(tv, ntv, x, training=False)[0])
        xj = jax.device_put(x)

        def run():
            f(tv, ntv, xj).block_until_ready()
            return len(x)

    return run


def _torch_infer_candidate(model, x, args, bf16=False, compile_=False):
    import torch

    dev = _torch_device(args)
    model = model.eval()
    fwd = torch.compile(model) if compile_ else model
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(dev)

    def run():
        with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
            fwd(xt).float().sum().item()
        return len(x)

    return run


def infer_section(cfg, args, peak):
    """Inference latency of ConvMixer-768/32 at 224x224, batch 1 and 32."""
    import numpy as np

    out = {}
    if args.backend == "tensorflow":
        ours = dict(fp32=keras_model(cfg), fused=keras_model(cfg, fast=True),
                    bf16=keras_model(cfg, "mixed_bfloat16", fast=True))
    else:
        ours = dict(fp32=keras_model(cfg), bf16=keras_model(cfg, "mixed_bfloat16"))
    ref = None if args.no_torch else torch_model(cfg, _torch_device(args))
    fwd_flops = flops_per_image(**cfg)
    for batch in cfg["batches"]:
        x = np.random.default_rng(0).standard_normal(
            (batch, cfg["image"], cfg["image"], 3)).astype("float32")
        cands = {}
        ours_name = "keras" if args.backend == "tensorflow" else "keras-jax"
        cands[f"{ours_name} fp32"] = _keras_infer_candidate(ours["fp32"], x, args)
        if "fused" in ours:
            cands["keras fp32 + fused BN"] = _keras_infer_candidate(ours["fused"], x, args)
        cands[f"{ours_name} bf16"] = _keras_infer_candidate(ours["bf16"], x, args)
        if ref is not None:
            cands["torch eager fp32"] = _torch_infer_candidate(ref, x, args)
            cands["torch eager bf16 autocast"] = _torch_infer_candidate(ref, x, args, bf16=True)
            if args.backend == "jax":
                cands["torch.compile bf16"] = _torch_infer_candidate(ref, x, args, True, True)
        rounds = args.rounds or cfg["rounds"][batch]
        res = interleaved(cands, rounds)
        base = res.get("torch eager fp32")
        rows = []
        for name, r in res.items():
            p = peak.get("bfloat16" if "bf16" in name else "float32")
            rows.append((name, f"{1e3 * r['median_s']:.1f}", f"{r['per_s']:.2f}",
                         f"{r['median_s'] / base['median_s']:.2f}" if base else "-",
                         f"{100 * r['per_s'] * fwd_flops / p:.1f}%" if p else "-"))
        table(f"Inference, ConvMixer-{cfg['dim']}/{cfg['depth']}, {cfg['image']}x{cfg['image']}, "
              f"batch {batch} ({rounds} rounds)",
              ["candidate", "latency ms", "images/s", "latency x torch fp32", "MFU"], rows)
        out[batch] = res
    return out


@contextlib.contextmanager
def _quiet():
    """Keras export prints every captured variable; keep the benchmark's tables readable."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def convert_tflite(model, modes, calibration_images, split_depthwise=True):
    """{mode: flatbuffer} for `modes` (see TFLITE_MODES), converted by the export's own code
    (`convmixer_tf.deploy.tflite.convert_builds`, fixed 1xHxW input)."""
    import numpy as np

    from convmixer_tf.deploy import tflite

    size = tuple(np.shape(calibration_images)[1:3])
    with _quiet():
        return tflite.convert_builds(model, modes, calibration_images, (1, *size),
                                     split_depthwise=split_depthwise)


def ops_outside_delegates(nodes):
    """{op name: count} of the nodes LiteRT still runs itself, plus "DELEGATE": the number of
    XNNPACK partitions. `nodes` lists the original nodes and the delegate nodes; a node runs
    outside a delegate when something in the execution plan needs a tensor it produces."""
    delegates = [n for n in nodes if n["op_name"] == "DELEGATE"]
    delegated_out = {int(t) for n in delegates for t in n["outputs"]}
    producer = {int(t): n for n in nodes if n["op_name"] != "DELEGATE" for t in n["outputs"]}
    needed = [int(t) for n in delegates for t in n["inputs"]]
    consumed = {int(t) for n in nodes for t in n["inputs"]}
    needed += [t for t in producer if t not in consumed]  # graph outputs
    outside, seen = {}, set()
    while needed:
        t = needed.pop()
        if t in seen or t in delegated_out or t not in producer:
            continue
        seen.add(t)
        node = producer[t]
        if node["index"] not in outside:
            outside[node["index"]] = node["op_name"]
            needed += [int(i) for i in node["inputs"]]
    counts = {"DELEGATE": len(delegates)}
    for name in outside.values():
        counts[name] = counts.get(name, 0) + 1
    return counts


def litert_runner(flatbuffer, threads, xnnpack=True):
    """(run(x) -> logits, ops) for a flatbuffer on LiteRT with XNNPACK (unless `xnnpack` is
    False) and `threads` threads; `ops` is `ops_outside_delegates`: partitions and the ops
    XNNPACK did not take."""
    import numpy as np
    from ai_edge_litert import interpreter as litert

    resolver = (litert.OpResolverType.AUTO if xnnpack
                else litert.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interp = litert.Interpreter(model_content=flatbuffer, num_threads=threads,
                                experimental_op_resolver_type=resolver)
    inp = interp.get_input_details()[0]
    out = interp.get_output_details()[0]
    interp.resize_tensor_input(inp["index"], [1, *inp["shape"][1:]])
    interp.allocate_tensors()
    ops = ops_outside_delegates(interp._get_ops_details())  # noqa: SLF001 - only op listing

    def run(x):
        if inp["dtype"] != np.float32:
            scale, zero = inp["quantization"]
            x = np.clip(np.round(x / scale + zero), -128, 127).astype(inp["dtype"])
        interp.set_tensor(inp["index"], x)
        interp.invoke()
        y = interp.get_tensor(out["index"])
        if out["dtype"] != np.float32:
            scale, zero = out["quantization"]
            y = (y.astype("float32") - zero) * scale
        return y

    return run, ops


def tflite_section(cfgs, calibration, args):
    """Batch-1 latency of LiteRT float32/float16/int8 builds beside TF and the PyTorch model."""
    import numpy as np

    results = {}
    for cfg in cfgs:
        rng = np.random.default_rng(1)
        images = rng.integers(0, 256, (calibration + 4, cfg["image"], cfg["image"], 3))
        images = images.astype("float32")
        calib, test = images[:calibration], images[calibration:]
        model = keras_model(cfg)
        reference = model.predict(test, verbose=0)
        modes = [m for m in TFLITE_MODES if m != "int8_float_gelu" or cfg["activation"] == "gelu"]
        start = time.perf_counter()
        flats = {f"litert {m}": f for m, f in convert_tflite(model, modes, calib).items()}
        convert_s = time.perf_counter() - start
        if cfg["kernel_size"] ** 2 > 25:  # what the large-depthwise split buys
            k = cfg["kernel_size"]
            flats[f"litert full_int8, {k}x{k} depthwise unsplit"] = convert_tflite(
                model, ["full_int8"], calib, split_depthwise=False)["full_int8"]
        cands, rows_info = {}, {}
        for name, flat in flats.items():
            for xnnpack in (True, False) if "full_int8" in name else (True,):
                label = name + ("" if xnnpack else ", no XNNPACK")
                run, ops = litert_runner(flat, args.threads, xnnpack)
                got = np.concatenate([run(t[None]) for t in test])
                err = np.max(np.abs(got - reference)) / (np.max(np.abs(reference)) + 1e-12)
                left = {k: v for k, v in ops.items() if k != "DELEGATE"}
                rows_info[label] = (
                    f"{len(flat) / 1e6:.2f}", f"{err:.3f}", ops.get("DELEGATE", 0),
                    ", ".join(f"{k}x{v}" for k, v in sorted(left.items())) or "none",
                    f"{convert_s:.0f}")
                x1 = test[:1]
                cands[label] = lambda run=run, x1=x1: (run(x1), 1)[1]
        cands["keras fp32 (TF)"] = _keras_infer_candidate(model, test[:1], args)
        if not args.no_torch:
            ref = torch_model(cfg)
            mean = np.array([0.485, 0.456, 0.406], "float32") * 255
            std = np.array([0.229, 0.224, 0.225], "float32") * 255
            x_torch = (test[:1] - mean) / std
            cands["torch eager fp32"] = _torch_infer_candidate(ref, x_torch, args)
            cands["torch eager bf16 autocast"] = _torch_infer_candidate(ref, x_torch, args,
                                                                        bf16=True)
        res = interleaved(cands, args.rounds or cfg["rounds"], warmup=2)
        base = res.get("torch eager fp32")
        torch_best = min((r["median_s"] for n, r in res.items() if n.startswith("torch")),
                         default=None)
        rows = []
        for name, r in res.items():
            info = rows_info.get(name, ("-",) * 5)
            rows.append((name, f"{1e3 * r['median_s']:.2f}",
                         f"{r['median_s'] / base['median_s']:.2f}" if base else "-",
                         f"{r['median_s'] / torch_best:.2f}" if torch_best else "-", *info))
        table(f"Edge, batch 1, {args.threads} threads: ConvMixer-{cfg['dim']}/{cfg['depth']} "
              f"({cfg['activation']}), {cfg['image']}x{cfg['image']}",
              ["candidate", "latency ms", "x torch fp32", "x torch best", "MB",
               "max rel. logit err", "XNNPACK partitions", "ops outside XNNPACK", "convert s"],
              rows)
        results[f"{cfg['dim']}_{cfg['depth']}"] = dict(
            results=res, info={k: list(v) for k, v in rows_info.items()})
    return results


# ----------------------------------------------------------------------------- main


def setup(args):
    """Environment that must be set before TF / JAX / torch start."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import warnings

    warnings.filterwarnings("ignore")
    os.environ["KERAS_BACKEND"] = args.backend
    if args.backend == "tensorflow":
        from convmixer_tf import layers

        layers.configure_threads(args.threads, args.inter_op)
        import tensorflow as tf

        tf.get_logger().setLevel("ERROR")
    if not args.no_torch:
        try:
            import torch
        except ImportError:
            print("torch is not installed (pip install convmixer_tf[torch]): skipping it")
            args.no_torch = True
        else:
            torch.set_num_threads(args.threads)
            # TF's CPU thread pools flush denormals to zero; give torch the same, or its side
            # of a randomly initialised deep model crawls through denormal arithmetic.
            torch.set_flush_denormal(True)


def main(argv=None):
    args = parse_args(argv)
    setup(args)
    shapes = QUICK if args.quick else FULL
    if args.backend == "jax" and not args.quick:
        # Steps take milliseconds on a GPU: more of them per round for a stable median.
        shapes = dict(shapes, train=dict(shapes["train"], steps=50, rounds=5),
                      infer=dict(shapes["infer"], rounds={1: 50, 32: 10}),
                      peak=dict(n=8192, rounds=10))
    started = time.time()
    info = machine_info(args)
    print("## ConvMixer benchmark: " + " ".join(["python scripts/benchmark.py", *(argv or
                                                                                    sys.argv[1:])]))
    print(json.dumps(info))
    results = dict(machine=info)
    peak = {}
    if "peak" in args.sections or "train" in args.sections or "infer" in args.sections:
        results["peak"] = matmul_peak(shapes["peak"], args)
        peak = results["peak"]["peak_flops"]
    if "train" in args.sections:
        results["train"] = train_section(shapes["train"], args, peak)
    if "infer" in args.sections:
        results["infer"] = infer_section(shapes["infer"], args, peak)
    if "tflite" in args.sections:
        results["tflite"] = tflite_section(shapes["tflite"], shapes["calibration"], args)
    info["loadavg_end"] = os.getloadavg()
    info["wall_s"] = round(time.time() - started, 1)
    print(f"\nwall {info['wall_s']} s, load average at start {info['loadavg_start']}, "
          f"at end {info['loadavg_end']}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1, default=str)
    return results


if __name__ == "__main__":
    main()
