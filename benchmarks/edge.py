"""Batch-1 latency of the TFLite builds against every PyTorch CPU configuration, one thread
each, as CPU time per image: what one core spends, unaffected by other jobs on a shared machine.

    python -m benchmarks.edge                         # ConvMixer-768/32, 224x224, ~15 min
    python -m benchmarks.edge --variant 256_8         # ConvMixer-256/8, 32x32 (any preset)
    python -m benchmarks.edge --quick                 # the variant at tiny size, no torch.compile

With one thread, LiteRT (XNNPACK and the builtin kernels) and PyTorch (eager, bf16 autocast,
torch.compile) compute in the calling thread, so `time.thread_time()` around one call is its
CPU time; wall time (also reported) counts the time other processes held the core. Candidates
are interleaved (`convmixer_tf.timing.interleaved`: each round runs every candidate once,
rotating order) and the median over rounds is reported. Weights are random (latency does not
depend on them); the LiteRT builds are the export's (`convmixer_tf.deploy.tflite.convert_builds`),
plus the full-int8 build without the large-depthwise split, and full int8 without XNNPACK.
"""

import argparse
import contextlib
import copy
import io
import json
import os

from convmixer_tf import timing

from .harness import keras_model, model_shape, torch_model, variant

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def litert_candidates(cfg, model, calibration, x):
    """{name: (run, info)} for the export's builds (+ full int8 unsplit / without XNNPACK)."""
    import numpy as np

    from convmixer_tf.deploy import litert, tflite

    modes = ["float32", "float16", "dynamic_int8", "full_int8"]
    if cfg["activation"] == "gelu":
        modes.append("int8_float_gelu")
    size = (1, cfg["image"], cfg["image"])
    with contextlib.redirect_stdout(io.StringIO()):
        flats = tflite.convert_builds(model, modes, calibration, size)
        if cfg["kernel_size"] ** 2 > tflite.MAX_DEPTHWISE_TAPS:
            k = cfg["kernel_size"]
            flats[f"full_int8, {k}x{k} depthwise unsplit"] = tflite.convert_builds(
                model, ["full_int8"], calibration, size, split_depthwise=False)["full_int8"]
    reference = np.asarray(model(x, training=False))
    out = {}
    for name, flat in flats.items():
        for xnnpack in (True, False) if name == "full_int8" else (True,):
            runner = litert.LiteRTModel(flat, num_threads=1, xnnpack=xnnpack)
            err = float(np.abs(runner.predict(x) - reference).max() / np.abs(reference).max())
            info = dict(mb=round(len(flat) / 1e6, 2), rel_err=round(err, 4),
                        min_runtime=litert.min_runtime_version(flat))
            label = f"litert {name}" + ("" if xnnpack else ", no XNNPACK")
            out[label] = (lambda runner=runner: runner.predict(x), info)
    return out


def torch_candidates(cfg, x, compile_=True):
    """{name: (run, {})}: eager fp32 NCHW / channels_last, bf16 autocast, torch.compile."""
    import numpy as np
    import torch

    from convmixer_tf import presets

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # as TF's thread pools do
    model = torch_model(cfg).eval()
    mean = np.array(presets.IMAGENET_MEAN, "float32") * 255
    std = np.array(presets.IMAGENET_STD, "float32") * 255
    nchw = torch.from_numpy(((x - mean) / std).transpose(0, 3, 1, 2).copy())
    last = nchw.contiguous(memory_format=torch.channels_last)
    model_last = copy.deepcopy(model).to(memory_format=torch.channels_last)

    def run(m, xin, bf16):
        def call():
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                m(xin).float().sum().item()
        return call

    out = {
        "torch eager fp32 NCHW": run(model, nchw, False),
        "torch eager fp32 channels_last": run(model_last, last, False),
        "torch eager bf16 autocast NCHW": run(model, nchw, True),
        "torch eager bf16 autocast channels_last": run(model_last, last, True),
    }
    if compile_:
        for bf16 in (False, True):
            compiled = torch.compile(copy.deepcopy(model_last))
            name = f"torch.compile {'bf16 autocast' if bf16 else 'fp32'} channels_last"
            out[name] = run(compiled, last, bf16)
    return {name: (call, {}) for name, call in out.items()}


def measure(candidates, rounds):
    """{name: dict(cpu_ms, wall_ms)}: medians of interleaved rounds (the warm-up round also
    runs torch.compile's compilation)."""
    timed = timing.interleaved({n: c[0] for n, c in candidates.items()}, rounds,
                               clocks=("cpu", "wall"))
    return {n: dict(cpu_ms=timing.median_ms(t["cpu"]), wall_ms=timing.median_ms(t["wall"]))
            for n, t in timed.items()}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.edge",
                                description=__doc__.split("\n")[0])
    p.add_argument("--variant", default="768_32",
                   help="a presets.MODEL_CONFIGS name, or its short form (768_32, 256_8)")
    p.add_argument("--quick", action="store_true",
                   help="the variant's kernel, patch and activation at tiny size; no torch.compile")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    try:
        variant(args.variant)
    except ValueError as error:
        p.error(str(error))
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1; got {args.rounds}")
    cfg = model_shape(args.variant, quick=args.quick)
    import keras
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    keras.utils.set_random_seed(0)
    model = keras_model(cfg)
    rng = np.random.default_rng(1)
    calibration = rng.integers(0, 256, (8, cfg["image"], cfg["image"], 3)).astype("float32")
    x = calibration[:1]
    candidates = litert_candidates(cfg, model, calibration, x)
    candidates.update(torch_candidates(cfg, x, compile_=not (args.quick or args.no_compile)))
    results = measure(candidates, args.rounds)
    best = min((r["cpu_ms"], n) for n, r in results.items() if n.startswith("torch"))
    print(f"## Edge, batch 1, 1 thread: ConvMixer-{cfg['dim']}/{cfg['depth']} "
          f"(k{cfg['kernel_size']}, {cfg['activation']}), {cfg['image']}x{cfg['image']}; "
          f"median of {args.rounds} interleaved rounds\n")
    print("| candidate | CPU ms / image | x torch best (CPU) | wall ms | MB | max rel. logit err "
          "| min runtime |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        info = candidates[name][1]
        print(f"| {name} | {r['cpu_ms']:.2f} | {r['cpu_ms'] / best[0]:.2f} | {r['wall_ms']:.2f} "
              f"| {info.get('mb', '')} | {info.get('rel_err', '')} | "
              f"{info.get('min_runtime', '')} |")
    print(f"\ntorch best: {best[1]}; load average at the end: {os.getloadavg()}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(dict(config=cfg, torch_best=best[1], results=results,
                           info={n: c[1] for n, c in candidates.items()}), f, indent=1)


if __name__ == "__main__":
    main()
