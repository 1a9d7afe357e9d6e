"""Training speed by precision and CPU class: ConvMixer-256/8 (the paper's CIFAR model, 32x32,
batch 128) in float32, mixed_bfloat16 and mixed_float16, each with the fast layers
`convmixer-train` applies for it, on this CPU as it is and capped to AVX2 (oneDNN's
ONEDNN_MAX_CPU_ISA, so an AVX-512 machine also measures what an AVX2-only CPU gets).

    python -m benchmarks.precision                      # 3 rounds, native and AVX2
    python -m benchmarks.precision --isa AVX2 --rounds 5 --json out.json

oneDNN reads its ISA cap when TensorFlow starts, so each measurement is a fresh process; the
rounds interleave the configurations (rotating order), so load changes hit all of them alike.
"""

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time

PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")


def _child(args):
    """One measurement: images/s over `--steps` training steps after one warm-up run."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from convmixer_tf import fast_layers

    fast_layers.configure_threads(args.threads, 1)
    from . import harness, train

    cfg = dict(harness.model_shape("256_8"), batch=args.batch, steps=args.steps)
    fast = fast_layers.fast_layers_for(args.precision)
    run = train.keras_candidate(cfg, argparse.Namespace(backend="tensorflow"), args.precision,
                                fast if any(fast.values()) else False)
    run()  # warm-up: tracing and the first steps
    start = time.perf_counter()
    images = run()
    seconds = time.perf_counter() - start
    print(json.dumps(dict(images_per_s=images / seconds, seconds=seconds,
                          cpu_class=fast_layers.cpu_class(),
                          fast_layers=fast_layers.describe_fast_layers(fast, args.precision))))


def measure(isa, precision, args):
    env = dict(os.environ)
    env.pop("ONEDNN_MAX_CPU_ISA", None)
    if isa != "native":
        env["ONEDNN_MAX_CPU_ISA"] = isa
    cmd = [sys.executable, "-m", "benchmarks.precision", "--child", "--precision", precision,
           "--steps", str(args.steps), "--batch", str(args.batch), "--threads",
           str(args.threads)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:  # e.g. oneDNN capped to AVX2 refuses bfloat16 convolutions
        errors = [line for line in done.stderr.splitlines() if "rror" in line or "exception" in line]
        return dict(images_per_s=None, error=(errors or ["exit %d" % done.returncode])[-1][:300])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.precision",
                                description=__doc__.split("\n")[0])
    p.add_argument("--isa", default="native,AVX2",
                   help="comma list: native (this CPU) and/or oneDNN ISA caps (AVX2, "
                        "AVX512_CORE, ...)")
    p.add_argument("--precisions", default=",".join(PRECISIONS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default="")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--precision", default="float32", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return _child(args)

    from convmixer_tf import fast_layers

    configs = list(itertools.product(args.isa.split(","), args.precisions.split(",")))
    info = dict(cpu_class=fast_layers.cpu_class(), cores=os.cpu_count(),
                loadavg_start=os.getloadavg(), batch=args.batch, steps=args.steps,
                model="ConvMixer-256/8 k5 p2, 32x32")
    print(json.dumps(info), flush=True)
    times, failed = {c: [] for c in configs}, {}
    for r in range(args.rounds):
        order = configs[r % len(configs):] + configs[:r % len(configs)]
        for isa, precision in order:
            result = measure(isa, precision, args)
            if result["images_per_s"] is None:
                failed[(isa, precision)] = result["error"]
                print(f"round {r + 1}: {isa} {precision}: failed: {result['error']}", flush=True)
                continue
            times[(isa, precision)].append(result["images_per_s"])
            print(f"round {r + 1}: {isa} {precision}: {result['images_per_s']:.1f} images/s "
                  f"({result['cpu_class']}; {result['fast_layers']})", flush=True)
    info["loadavg_end"] = os.getloadavg()
    rows = {}
    print(f"\n| CPU (oneDNN ISA) | precision | images/s, median of {args.rounds} (range) "
          "| x float32 on the same ISA |\n|---|---|---|---|")
    for isa, precision in configs:
        values = sorted(times[(isa, precision)])
        if not values:
            rows[f"{isa} {precision}"] = dict(failed=failed.get((isa, precision)))
            print(f"| {isa} | {precision} | fails: {failed.get((isa, precision))} | - |")
            continue
        median = statistics.median(values)
        floats = times.get((isa, "float32"))
        base = statistics.median(floats) if floats else None
        rows[f"{isa} {precision}"] = dict(median=median, values=values)
        print(f"| {isa} | {precision} | {median:.1f} ({values[0]:.1f}-{values[-1]:.1f}) | "
              + (f"{median / base:.2f}x |" if base else "- |"))
    print(json.dumps(dict(info, results=rows)), flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(dict(info, results=rows), f, indent=2)


if __name__ == "__main__":
    main()
