"""ConvMixer speed, this project against the paper's PyTorch model, side by side in one run.

    python -m benchmarks                    # everything, CPU, ~20 min on 2 cores
    python -m benchmarks --quick            # tiny shapes, ~1 min: a smoke run
    python -m benchmarks --only peak,train  # peak,train,layers,infer,tflite (comma list)
    python -m benchmarks --backend jax      # GPU: Keras on JAX (XLA, bf16) vs torch eager/compile

Every comparison is interleaved: each round runs every candidate once, in rotating order, after a
warm-up, and the median over rounds is reported, so load changes hit ours and torch alike. Both
frameworks get the same number of threads (`--threads`, default 2). Results print as Markdown
tables (and `--json PATH` writes them); BENCHMARKS.md has the commands and the numbers.
torch comes with the `[bench]` extra; its side is the paper's model from
benchmarks/reference_torch.py (the same modules timm uses) in every configuration a PyTorch user
would pick (eager NCHW and channels_last, torch.compile, bf16 autocast), and every ratio is
against PyTorch's fastest configuration of the same precision and against its overall best.
Sections: harness.py (shared), train.py (train, layers), infer.py (infer), tflite.py (tflite,
the library's LiteRT builds).
"""

import argparse
import json
import os
import sys
import time

# The sections import Keras, TF, torch and the library lazily: KERAS_BACKEND is set first.
from . import harness, infer, train

SECTIONS = ("peak", "train", "layers", "infer", "tflite")

# Models by preset name (harness.model_shape: the paper's CIFAR model for training, the
# ImageNet one for inference, both for the edge); rounds and sizes of each section.
FULL = dict(
    train=dict(variant="256_8", batch=128, rounds=3, steps=2),
    infer=dict(variant="768_32", batches=(1, 32), rounds={1: 7, 32: 2}),
    tflite=[dict(variant="256_8", rounds=30), dict(variant="768_32", rounds=5)],
    peak=dict(n=2048, rounds=8),
    calibration=8,
)
QUICK = dict(
    train=dict(FULL["train"], batch=16, rounds=2, steps=1),
    infer=dict(FULL["infer"], batches=(1, 4), rounds={1: 2, 4: 2}),
    tflite=[dict(variant="256_8", dim=16, depth=1, rounds=3)],
    peak=dict(n=256, rounds=2),
    calibration=2,
)


def shapes_for(quick):
    """FULL or QUICK with every `variant` resolved to its model shape."""
    def resolve(section):
        section = dict(section)
        return harness.model_shape(section.pop("variant"), quick, **section)

    plan = QUICK if quick else FULL
    return dict(plan, train=resolve(plan["train"]), infer=resolve(plan["infer"]),
                tflite=[resolve(s) for s in plan["tflite"]])


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks",
                                description=__doc__.split("\n")[0])
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
                   help="train: also each speed-up alone (fused BN, GELU gradient, depthwise "
                        "gradients, bf16), to measure what each one brings")
    p.add_argument("--rounds", type=int, default=0, help="override the rounds of every section")
    p.add_argument("--train-batch", type=int, default=0,
                   help="train/layers: override the batch (default 128; 16 with --quick)")
    p.add_argument("--train-steps", type=int, default=0,
                   help="train: override the steps per round (default 2; 1 with --quick)")
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = sorted(set(args.sections) - set(SECTIONS))
    if bad or not args.sections:
        p.error(f"--only takes a comma list of {', '.join(SECTIONS)}; got {args.only!r}")
    if args.threads < 1 or args.inter_op < 1:
        p.error("--threads and --inter-op must be >= 1")
    if args.train_batch < 0 or args.train_steps < 0 or args.rounds < 0:
        p.error("--train-batch, --train-steps and --rounds must be >= 1 (0: the plan's)")
    if args.backend == "jax" and "tflite" in args.sections:
        if args.only != ",".join(SECTIONS):
            p.error("the tflite section needs --backend tensorflow")
        args.sections.remove("tflite")  # TFLite converts TF graphs: not part of the JAX run
    return args


# ----------------------------------------------------------------------------- main


def setup(args):
    """Environment that must be set before TF / JAX / torch start."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import warnings

    warnings.filterwarnings("ignore")
    os.environ["KERAS_BACKEND"] = args.backend
    if args.backend == "tensorflow":
        from convmixer_tf import fast_layers  # after KERAS_BACKEND is set

        fast_layers.configure_threads(args.threads, args.inter_op)
        import tensorflow as tf

        tf.get_logger().setLevel("ERROR")
    if not args.no_torch:
        try:
            import torch
        except ImportError:
            print('torch is not installed (pip install -e ".[bench]"): skipping it')
            args.no_torch = True
        else:
            torch.set_num_threads(args.threads)
            # TF's CPU thread pools flush denormals to zero; give torch the same, or its side
            # of a randomly initialised deep model crawls through denormal arithmetic.
            torch.set_flush_denormal(True)


def main(argv=None):
    args = parse_args(argv)
    setup(args)
    shapes = shapes_for(args.quick)
    if args.backend == "jax" and not args.quick:
        # Steps take milliseconds on a GPU: more of them per round for a stable median.
        shapes = dict(shapes, train=dict(shapes["train"], steps=50, rounds=5),
                      infer=dict(shapes["infer"], rounds={1: 50, 32: 10}),
                      peak=dict(n=8192, rounds=10))
    overrides = {k: v for k, v in (("batch", args.train_batch), ("steps", args.train_steps)) if v}
    shapes = dict(shapes, train=dict(shapes["train"], **overrides))
    started = time.time()
    info = harness.machine_info(args)
    print("## ConvMixer benchmark: " + " ".join(["python -m benchmarks", *(argv or
                                                                          sys.argv[1:])]))
    print(json.dumps(info))
    results = dict(machine=info)
    peak = {}
    if "peak" in args.sections:  # the MFU denominator of train and infer ("-" without it)
        results["peak"] = harness.matmul_peak(shapes["peak"], args)
        peak = results["peak"]["peak_flops"]
    if "train" in args.sections:
        results["train_skipped"] = {}  # PyTorch configurations that cannot run here, and why
        results["train"] = train.train_section(shapes["train"], args, peak,
                                               results["train_skipped"])
    if "layers" in args.sections:
        results["layers"] = train.layers_section(shapes["train"], args)
    if "infer" in args.sections:
        results["infer"] = infer.infer_section(shapes["infer"], args, peak)
    if "tflite" in args.sections:
        from . import tflite  # LiteRT: only where the section runs

        results["tflite"] = tflite.tflite_section(
            shapes["tflite"], shapes["calibration"], args)
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
