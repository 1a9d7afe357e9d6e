"""What every benchmark shares: model shapes from `presets`, interleaved timing
(`convmixer_tf.timing`), FLOP counts, the models of both frameworks, the matmul peak (the MFU
denominator), ratios against PyTorch's best, tables."""

import os
import platform
import statistics

from convmixer_tf import presets, timing

# The input each benchmarked variant is measured at (the paper's: CIFAR-10 for 256/8, ImageNet
# for the others), and its `--quick` size: the same kernel, patch and activation, tiny.
INPUTS = {
    "convmixer_256_8_ks5_p2": dict(image=32, classes=10, quick=dict(dim=32, depth=2, image=16)),
}
IMAGENET_INPUT = dict(image=224, classes=1000, quick=dict(dim=32, depth=2, image=28, classes=10))


def variant(name):
    """The MODEL_CONFIGS name of `name`: itself, or a short form ("256_8" for
    convmixer_256_8_ks5_p2)."""
    names = [k for k in presets.MODEL_CONFIGS
             if name in (k, k.removeprefix("convmixer_")) or k.startswith(f"convmixer_{name}_")]
    if len(names) != 1:
        short = sorted(k.removeprefix("convmixer_") for k in presets.MODEL_CONFIGS)
        raise ValueError(f"unknown or ambiguous model variant {name!r}: choose from "
                         f"{', '.join(short)} (presets.MODEL_CONFIGS)")
    return names[0]


def model_shape(name, quick=False, **overrides):
    """A benchmark's model: the preset's architecture (dim, depth, kernel_size, patch_size,
    activation) at its input (image, classes); `quick` shrinks it, `overrides` win."""
    full = variant(name)
    inputs = dict(INPUTS.get(full, IMAGENET_INPUT))
    small = inputs.pop("quick")
    return {**presets.MODEL_CONFIGS[full], **inputs, **(small if quick else {}), **overrides}


def short_name(cfg):
    """"768_32": the dim and depth a result is filed under."""
    return f"{cfg['dim']}_{cfg['depth']}"


def flops_per_image(dim, depth, kernel_size, patch_size, image, classes, **_):
    """Forward FLOPs (2 x multiply-adds) of one image: stem, depthwise, pointwise, head.
    Elementwise work (GELU, BN, adds) is left out, as usual for MFU."""
    tokens = (image // patch_size) ** 2
    macs = tokens * dim * 3 * patch_size**2  # stem
    macs += depth * tokens * dim * (kernel_size**2 + dim)  # depthwise + pointwise
    macs += dim * classes  # head
    return 2 * macs


def interleaved(candidates, rounds, warmup=1):
    """`timing.interleaved` over `candidates[name]()` (each returns the items it processed):
    {name: dict(median_s, items, per_s, best_per_s, times)}, wall clock."""
    out = {}
    for name, r in timing.interleaved(candidates, rounds, warmup).items():
        times = r["wall"]
        med = statistics.median(times)
        out[name] = dict(median_s=med, items=r["result"], per_s=r["result"] / med,
                         best_per_s=r["result"] / min(times), times=[round(t, 4) for t in times])
    return out


def precision_class(name):
    """"bf16" for a candidate computing in bfloat16 (its name says bf16), else "fp32"."""
    return "bf16" if "bf16" in name else "fp32"


def best_torch(results, precision=None):
    """(name, result) of the fastest PyTorch candidate, of one precision class or overall;
    None when no PyTorch candidate ran."""
    torch = {n: r for n, r in results.items() if n.startswith("torch")
             and (precision is None or precision_class(n) == precision)}
    if not torch:
        return None
    name = max(torch, key=lambda n: torch[n]["per_s"])
    return name, torch[name]


def ratio(value, reference):
    """`value / reference` as '1.23x', '-' without a reference."""
    return f"{value / reference:.2f}x" if reference else "-"


def mfu(per_s, flops_per_item, peak):
    return f"{100 * per_s * flops_per_item / peak:.1f}%" if peak else "-"


def machine_info(args):
    """The machine a run measured: CPU model, ISA flags and class, cores, load average at the
    start (callers add `loadavg_end`), threads, framework versions."""
    info = dict(python=platform.python_version(), machine=platform.machine())
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f
                               if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    from convmixer_tf import fast_layers

    isa = {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16"}
    info["cpu_flags"] = sorted(fast_layers.cpu_flags() & isa)
    # What oneDNN uses (ONEDNN_MAX_CPU_ISA honoured), and the class each figure is filed under.
    info["usable_cpu_flags"] = sorted(fast_layers.usable_cpu_flags() & isa)
    info["cpu_class"] = fast_layers.cpu_class()
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

    for dist in ("tensorflow", "keras", "torch", "ai-edge-litert", "onnx", "onnxruntime", "jax",
                 "jaxlib"):
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


# ----------------------------------------------------------------------------- models


def keras_model(cfg, precision="float32", fast=False):
    """Our ConvMixer for `cfg`; `fast` is False, True (every `fast_layers.accelerate` swap) or
    a dict of `accelerate` switches."""
    import keras

    from convmixer_tf import fast_layers, model as model_lib

    keras.mixed_precision.set_global_policy(precision)
    try:
        model = model_lib.ConvMixer(
            cfg["dim"], cfg["depth"], cfg["kernel_size"], cfg["patch_size"],
            activation=cfg["activation"], input_shape=(cfg["image"], cfg["image"], 3),
            classes=cfg["classes"], classifier_activation=None,
        )
        if not fast:
            return model
        return fast_layers.accelerate(model, **(fast if isinstance(fast, dict) else {}))
    finally:
        keras.mixed_precision.set_global_policy("float32")


def torch_device(args):
    import torch

    if args.backend == "jax" and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def torch_model(cfg, device="cpu", channels_last=False):
    """The paper's PyTorch ConvMixer (benchmarks/reference_torch.py) on `device`."""
    import torch

    from . import reference_torch

    model = reference_torch.ConvMixer(cfg["dim"], cfg["depth"], cfg["kernel_size"],
                                      cfg["patch_size"], cfg["activation"], cfg["classes"])
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


# ----------------------------------------------------------------------------- peak


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

        dev = torch_device(args)
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


def peak_for(name, peak):
    """The matmul peak (FLOP/s) of a candidate's precision class."""
    return peak.get("bfloat16" if precision_class(name) == "bf16" else "float32")
