"""Edge section of `python -m benchmarks`: LiteRT builds from the library's converter
(`convmixer_tf.deploy.tflite`, every mode of its table) at batch 1, beside TF and PyTorch."""

import time

from .harness import interleaved, keras_model, short_name, table, torch_model
from .infer import keras_infer_candidate, torch_infer_candidate


def _partitions(runner):
    """How many XNNPACK partitions (DELEGATE nodes) the interpreter made."""
    from convmixer_tf import compat

    return sum(op["op_name"] == "DELEGATE" for op in compat.interpreter_ops(runner.interpreter))


def tflite_section(cfgs, calibration, args):
    """Batch-1 latency of each LiteRT build of the library beside TF and the PyTorch model."""
    import numpy as np

    from convmixer_tf import presets
    from convmixer_tf.deploy import gate, litert, modes, tflite

    results = {}
    for cfg in cfgs:
        rng = np.random.default_rng(1)
        images = rng.integers(0, 256, (calibration + 4, cfg["image"], cfg["image"], 3))
        images = images.astype("float32")
        calib, test = images[:calibration], images[calibration:]
        model = keras_model(cfg)  # logits (no softmax): what the gate compares
        reference = np.asarray(model(test, training=False))
        cands, info = {}, {}
        for mode in modes.MODES:
            start = time.perf_counter()
            flat = tflite.convert(model, mode, calib, input_shape=(1, cfg["image"], cfg["image"]))
            convert_s = time.perf_counter() - start
            report = gate.accuracy_report(flat, reference, test)
            error, agreement = report["max_logit_error"], report["agreement"]
            runner = litert.LiteRTModel(flat, num_threads=args.threads)
            left = {f"{name}x{total - done}" for name, _, done, total in runner.delegation()
                    if done < total}
            info[f"litert {mode}"] = (f"{len(flat) / 1e6:.2f}", f"{error:.3g}",
                                      f"{agreement:.0%}", _partitions(runner),
                                      ", ".join(sorted(left)) or "none", f"{convert_s:.0f}")
            x1 = test[:1]
            cands[f"litert {mode}"] = lambda runner=runner, x1=x1: (runner.predict(x1), 1)[1]
        cands["keras fp32 (TF)"] = keras_infer_candidate(model, test[:1], args)
        if not args.no_torch:
            mean = 255 * np.array(presets.IMAGENET_MEAN, "float32")
            std = 255 * np.array(presets.IMAGENET_STD, "float32")
            cands["torch eager fp32"] = torch_infer_candidate(
                torch_model(cfg), (test[:1] - mean) / std, args)
        res = interleaved(cands, args.rounds or cfg["rounds"], warmup=2)
        base = res.get("torch eager fp32")
        rows = []
        for name, r in res.items():
            rows.append((name, f"{1e3 * r['median_s']:.2f}",
                         f"{r['median_s'] / base['median_s']:.2f}" if base else "-",
                         *info.get(name, ("-",) * 6)))
        table(f"Edge, batch 1, {args.threads} threads: ConvMixer-{cfg['dim']}/{cfg['depth']} "
              f"({cfg['activation']}), {cfg['image']}x{cfg['image']}",
              ["candidate", "latency ms", "x torch fp32", "MB", "max abs logit err",
               "top-1 agreement", "XNNPACK partitions", "ops outside XNNPACK", "convert s"],
              rows)
        results[short_name(cfg)] = dict(
            results=res, info={k: list(v) for k, v in info.items()})
    return results
