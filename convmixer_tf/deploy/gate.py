"""Whether a TFLite build may ship, and which int8 build is the edge build: accuracy against
the Keras model on held-out images (`accuracy_report`, `gate`), batch-1 latency on this machine
(`interleaved_latency_ms`, the one interleaved timer `convmixer_tf.timing`) and the choice
(`choose_edge_build`: the fastest int8 build the gate passed). The thresholds are the export's
(`deploy.config.ExportConfig`: `max_accuracy_drop` in points, `min_int8_agreement` a fraction).
"""

import numpy as np

from convmixer_tf import timing
from convmixer_tf.deploy.config import ExportConfig
from convmixer_tf.deploy.litert import LiteRTModel, fit_size, predict_batched
from convmixer_tf.deploy.modes import INT8_MODES


def accuracy_report(flat, reference_logits, images, labels=None, batch_size=64):
    """What the gate reads, for one flatbuffer on held-out images: top-1 `accuracy` on
    `labels` (None without labels), `agreement` with the Keras top-1 and `max_logit_error`
    (max abs difference from the Keras logits `reference_logits`)."""
    runner = LiteRTModel(flat)
    got = predict_batched(runner, fit_size(images, runner.image_size), batch_size)
    report = dict(
        accuracy=None if labels is None else float(np.mean(got.argmax(-1) == labels)),
        agreement=float(np.mean(got.argmax(-1) == reference_logits.argmax(-1))),
        max_logit_error=float(np.abs(got - reference_logits).max()),
    )
    return report


def gate(report, keras_accuracy=None, config=None):
    """None if a build may ship, else why not, with the thresholds of `config` (an
    `ExportConfig`; default its defaults). With labels: held-out top-1 accuracy at most
    `config.max_accuracy_drop` points (default 1) below the Keras model's on the same images
    (agreement and logit error are reported, not gated: a low-margin model flips many
    near-ties without losing accuracy). Without labels the only evidence is top-1 agreement
    >= `config.min_int8_agreement` (a fraction, default 0.98)."""
    config = config or ExportConfig()
    if report.get("accuracy") is not None and keras_accuracy is not None:
        drop = 100 * (keras_accuracy - report["accuracy"])  # points
        if drop > config.max_accuracy_drop + 1e-7:
            return (f"held-out accuracy {report['accuracy']:.2%} is {drop:.2f} points "
                    f"below the Keras model's {keras_accuracy:.2%} (allowed: "
                    f"{config.max_accuracy_drop:g})")
        return None
    if report["agreement"] < config.min_int8_agreement:
        return (f"top-1 agreement with Keras {report['agreement']:.2%} is below "
                f"{config.min_int8_agreement:.0%} (no labelled held-out images to measure "
                "accuracy)")
    return None


def describe(config, labelled, gated=True):
    """The gate `gate` applies, in words (the report's "gate" entry)."""
    if not gated:
        return "none: no held-out images (numbers on synthetic images)"
    if labelled:
        return f"held-out accuracy within {config.max_accuracy_drop:g} point(s) of Keras"
    return f"top-1 agreement >= {config.min_int8_agreement:.0%} (no labels)"


def interleaved_latency_ms(flats, image, rounds=20, num_threads=None):
    """{name: median ms per single-image `predict`} for several flatbuffers, measured
    interleaved (`timing.interleaved`: each round runs every build once, in rotating order,
    after a warm-up), so load changes on a shared machine hit every build alike. With one
    thread (the runtime's default) the time is the calling thread's CPU time, which other jobs
    on the machine do not inflate; with more threads it is wall time."""
    runners = {name: LiteRTModel(flat, num_threads=num_threads) for name, flat in flats.items()}
    if not runners:
        return {}
    image = fit_size(np.asarray(image)[None], next(iter(runners.values())).image_size)
    clock = timing.clock_for_threads(num_threads)
    timed = timing.interleaved({name: (lambda runner=runner: runner.predict(image))
                                for name, runner in runners.items()}, rounds, clocks=(clock,))
    return {name: timing.median_ms(times[clock]) for name, times in timed.items()}


def choose_edge_build(builds):
    """The default edge build: the int8 candidate with the lowest measured latency among
    those the gate passed (`builds`: {mode: {"latency_ms", "refused"}}); None if none did."""
    return choose_fastest_build({m: b for m, b in builds.items() if m in INT8_MODES})


def choose_fastest_build(builds):
    """The build of any mode with the lowest measured latency among those the gate passed:
    on a CPU where float32 outruns every int8 build the gate kept, the log says so."""
    passed = {m: b for m, b in builds.items()
              if not b.get("refused") and b.get("latency_ms") is not None}
    return min(passed, key=lambda m: passed[m]["latency_ms"]) if passed else None
