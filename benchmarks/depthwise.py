"""Per-op account of ConvMixer-768/32 on LiteRT: one block's depthwise and pointwise
convolutions at its shape (batch 1, 32x32x768), per TFLite build, with and without XNNPACK.

    python -m benchmarks.depthwise                 # 1 thread, CPU time, ~3 min
    python -m benchmarks.depthwise --threads 2     # wall time (needs a quiet machine)

Each op is converted alone (input -> op -> global pooling -> dense) by the export's own code
(`convmixer_tf.deploy.tflite.convert_builds`), so the numbers are what the op costs inside an
exported file; "7x7 split" is the export's default (`RowSplitDepthwiseConv2D`: 3x7 + 3x7 + 1x7),
"7x7 unsplit" the converter's plain 7x7. Candidates are timed interleaved (median of rounds,
`convmixer_tf.timing`); with one thread the time is the calling thread's CPU time
(`time.thread_time`: robust to other jobs on a shared machine), with more it is wall time.
"""

import argparse
import contextlib
import io
import json
import os

from convmixer_tf import timing

from .harness import model_shape

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
BLOCK = model_shape("768_32")  # the block shape measured: (224 / 7)^2 tokens x 768

OPS = {  # name: (kernel size or None for the 1x1 pointwise, split the depthwise?)
    "depthwise 3x3": (3, True),
    "depthwise 5x5": (5, True),
    "depthwise 7x7 unsplit": (7, False),
    "depthwise 7x7 split": (7, True),
    "pointwise 1x1": (None, True),
}


def op_model(kernel, size=BLOCK["image"] // BLOCK["patch_size"], dim=BLOCK["dim"]):
    import keras

    inputs = keras.Input((size, size, dim), name="images")
    if kernel is None:
        x = keras.layers.Conv2D(dim, 1, name="pointwise")(inputs)
    else:
        x = keras.layers.DepthwiseConv2D(kernel, padding="same", name="depthwise")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(10, name="predictions")(x))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.depthwise",
                                description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--modes", default="float32,dynamic_int8,full_int8")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    import numpy as np

    from convmixer_tf.deploy import litert, tflite

    side, dim = BLOCK["image"] // BLOCK["patch_size"], BLOCK["dim"]
    rng = np.random.default_rng(0)
    calibration = rng.uniform(0, 3, (4, side, side, dim)).astype("float32")
    x = calibration[:1]
    runners = {}
    for op, (kernel, split) in OPS.items():
        with contextlib.redirect_stdout(io.StringIO()):
            flats = tflite.convert_builds(op_model(kernel), args.modes.split(","), calibration,
                                          (1, side, side), split_depthwise=split)
        for mode, flat in flats.items():
            for xnnpack in (True, False):
                runners[(op, mode, xnnpack)] = litert.LiteRTModel(
                    flat, num_threads=args.threads, xnnpack=xnnpack)
    clock = timing.clock_for_threads(args.threads)
    timed = timing.interleaved({key: lambda r=r: r.predict(x) for key, r in runners.items()},
                               args.rounds, clocks=(clock,))
    ms = {key: timing.median_ms(t[clock]) for key, t in timed.items()}
    modes = args.modes.split(",")
    what = "CPU" if clock == "cpu" else "wall"
    print(f"## LiteRT per op, batch 1, {side}x{side}x{dim}, {args.threads} thread(s), {what} "
          f"ms, median of {args.rounds} interleaved rounds (XNNPACK / TFLite builtin kernels)\n")
    print("| op | " + " | ".join(modes) + " |")
    print("|---|" + "---|" * len(modes))
    for op in OPS:
        cells = [f"{ms[(op, m, True)]:.2f} / {ms[(op, m, False)]:.2f}" for m in modes]
        print(f"| {op} | " + " | ".join(cells) + " |")
    print(f"\nload average at the end: {os.getloadavg()}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({f"{op} | {m} | {'xnnpack' if x else 'builtin'}": v
                       for (op, m, x), v in ms.items()}, f, indent=1)


if __name__ == "__main__":
    main()
