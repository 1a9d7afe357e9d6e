"""The export's TFLite set: every requested build converted, checked against the Keras model,
gated, timed and written, with one line per build (`export_all`, called by `deploy.export`).

    from convmixer_tf.deploy import tflite_set
    report = tflite_set.export_all(model, "out", "name", x_train[:256], x_test, (32, 32),
                                   eval_labels=y_test)  # every build, gated; out/name_int8.tflite
"""

import os

import numpy as np

from convmixer_tf.deploy import gate as gating
from convmixer_tf.deploy import tflite
from convmixer_tf.deploy.litert import (LiteRTModel, delegation_table, fit_size,
                                        min_runtime_version)
from convmixer_tf.deploy.logits import logits_model
from convmixer_tf.deploy.modes import (EDGE_BUILD, EXPORT_MODES, INT8_MODES, TFLITE_MODES,
                                       check_modes)


def expand_modes(modes, model_ops=None, io_type="float32", calibration=True):
    """The builds to convert for the export's `modes` ("int8" = every int8 candidate, then
    the fastest that passes becomes `<name>_int8.tflite`), and {build: why it was skipped},
    from the modes' `TFLITE_MODES` settings. `model_ops`: the model's activations (lower case,
    `model_activations`), None if unknown; `io_type`: the int8 builds' I/O type."""
    builds, skipped = [], {}
    for mode in check_modes(modes):
        for m in (INT8_MODES if mode == EDGE_BUILD else (mode,)):
            settings = TFLITE_MODES[m]
            missing = [op for op in settings.float_ops if model_ops is not None
                       and not any(op.lower() in activation for activation in model_ops)]
            if settings.calibrated and not calibration:
                skipped[m] = ("no calibration images (export(calibration_images=...); "
                              "convmixer-export: a <name>.samples.npz or --calibration-dir)")
            elif missing:
                skipped[m] = (f"the model has no {', '.join(missing)} (same file as "
                              f"{settings.base})")
            elif settings.edge_candidate and io_type not in settings.io_types:
                skipped[m] = f"{m} has {'/'.join(settings.io_types)} I/O, not {io_type}"
            elif m not in builds:
                builds.append(m)
    return builds, skipped


def model_activations(model):
    """The activations of `model`'s layers, lower case ("gelu", "relu", "linear", ...)."""
    return {str(layer.get_config().get("activation", "")).lower() for layer in model.layers}


def export_all(model, out_dir, name, representative_images, eval_images, input_size,
               eval_labels=None, modes=EXPORT_MODES, log=print, max_accuracy_drop=0.01,
               min_int8_agreement=0.98, int8_io="float32", num_threads=None, latency_rounds=20,
               gated=True):
    """Converts, measures, gates and writes the TFLite builds into `out_dir` (the export job,
    `deploy.export`, passes a temp folder it publishes as a version); returns the report for the
    metadata file.

    Each mode gives `<out_dir>/<name>_<mode>.tflite` (fixed 1xHxW input) and
    `<name>_<mode>_dynamic.tflite` (any batch and size). With "int8" in `modes` every int8
    candidate (`INT8_MODES`) is built and timed on this machine (batch 1, LiteRT with
    XNNPACK, interleaved), and the fastest that passes `gate.gate` is also written as
    `<name>_int8.tflite` (+ `_dynamic`): the default edge build. A build the gate refuses is
    not written; the report lists it under "refused" with the reason, and the caller decides
    the exit status (the CLI's 3). A build the converter cannot make is left out the
    same way, under "failed" with a one-line reason (`tflite.conversion_failure`); the rest is still
    converted, gated and written. `int8_io` is the I/O type of the modes that take one
    (`Mode.io_types`: the calibrated ones); the others keep float32 I/O.
    `gated=False` (no held-out images exist: `eval_images` are synthetic) reports the numbers
    without gating on them.
    """
    eval_images = np.asarray(eval_images)
    labels = None if eval_labels is None else np.asarray(eval_labels).reshape(-1)
    if labels is not None and len(labels) != len(eval_images):
        raise ValueError(f"{len(labels)} eval labels for {len(eval_images)} eval images")
    fixed = (1, *input_size)
    resized = fit_size(eval_images, input_size)
    reference = np.asarray(logits_model(model).predict(
        resized.astype(np.float32), batch_size=64, verbose=0))
    keras_accuracy = None if labels is None else float(np.mean(reference.argmax(-1) == labels))
    calibration = representative_images is not None and len(representative_images) > 0
    builds, skipped = expand_modes(modes, model_activations(model), int8_io, calibration)
    report = dict(keras_accuracy=keras_accuracy, eval_images=len(eval_images),
                  labelled=labels is not None, io_type=int8_io,
                  gate=("none: no held-out images (numbers on synthetic images)" if not gated
                        else f"held-out accuracy within {100 * max_accuracy_drop:g} point(s) of "
                        "Keras" if labels is not None else
                        f"top-1 agreement >= {min_int8_agreement:.0%} (no labels)"),
                  latency=dict(batch=1, runtime="ai_edge_litert + XNNPACK",
                               num_threads=num_threads or 1, rounds=latency_rounds,
                               clock="thread CPU time" if (num_threads or 1) == 1 else "wall"),
                  builds={}, skipped=skipped, refused={}, failed={}, edge_build=None)
    flats = {}
    for dynamic in (False, True):
        shape = (None, None, None) if dynamic else fixed
        failures, converted = {}, {}
        for io_type in dict.fromkeys(_io_type(m, int8_io) for m in builds):  # one run each
            converted.update(tflite.convert_builds(
                model, [m for m in builds if m not in report["failed"]
                        and _io_type(m, int8_io) == io_type],
                representative_images, shape, io_type, failures=failures))
        converted = {m: converted[m] for m in builds if m in converted}
        report["failed"].update(
            {f"{mode}{'_dynamic' if dynamic else ''}": why for mode, why in failures.items()})
        for mode, flat in converted.items():
            label = f"{mode}{'_dynamic' if dynamic else ''}"
            entry = dict(mode=mode, input=list(shape), size_bytes=len(flat),
                         min_runtime_version=min_runtime_version(flat),
                         **gating.accuracy_report(flat, reference, resized, labels))
            reason = gated and gating.gate(entry, keras_accuracy, max_accuracy_drop,
                                           min_int8_agreement)
            if reason:
                entry["refused"] = reason
                report["refused"][label] = reason
            report["builds"][label] = entry
            flats[label] = flat
    converted = [m for m in builds if m in report["builds"]]
    timed = [m for m in converted if not report["builds"][m].get("refused")]
    timed += [m for m in converted if m not in timed and m in INT8_MODES]  # refused: still timed
    for mode, ms in gating.interleaved_latency_ms({m: flats[m] for m in timed}, resized[0],
                                           latency_rounds, num_threads).items():
        report["builds"][mode]["latency_ms"] = ms
        report["builds"].get(f"{mode}_dynamic", {})["latency_ms_at_fixed_size"] = ms
    edge = gating.choose_edge_build({m: report["builds"][m] for m in converted}) \
        if EDGE_BUILD in modes else None
    if EDGE_BUILD in modes:
        report["edge_build"] = edge
        if edge is None:
            report["refused"][EDGE_BUILD] = "no int8 candidate converted and passed the gate"
    for label, entry in report["builds"].items():
        files = [f"{name}_{label}.tflite"]
        if edge and entry["mode"] == edge:
            files.append(f"{name}_{EDGE_BUILD}{label[len(edge):]}.tflite")
        entry["files"] = [] if entry.get("refused") else files
        for file in entry["files"]:
            tflite.save(flats[label], os.path.join(out_dir, file))
        log(_build_line(label, entry, edge))
        if not entry.get("refused") and "_dynamic" not in label:
            log(delegation_table(LiteRTModel(flats[label]).delegation()))
    for mode, why in skipped.items():
        log(f"tflite {mode:<22} skipped: {why}")
    if edge:
        log(f"tflite edge build: {name}_{EDGE_BUILD}.tflite = {edge} (fastest int8 build; "
            f"gate: {report['gate']})")
    for label, why in report["refused"].items():
        log(f"tflite {label:<22} REFUSED: {why}")
    for label, why in report["failed"].items():
        log(f"tflite {label:<22} FAILED: {why}")
    return report


def _io_type(mode, int8_io):
    """The I/O type `mode` is converted with: `int8_io` where the mode takes it, else float32."""
    return int8_io if int8_io in TFLITE_MODES[mode].io_types else "float32"


def _build_line(label, entry, edge):
    acc = "" if entry["accuracy"] is None else f"accuracy {entry['accuracy']:.2%}  "
    ms = f"  {entry['latency_ms']:.2f} ms/image" if "latency_ms" in entry else ""
    status = "REFUSED" if entry.get("refused") else "-> " + ", ".join(entry["files"])
    return (f"tflite {label:<22} {entry['size_bytes'] / 1024:8.1f} KiB  {acc}agreement "
            f"{entry['agreement']:.2%}  max abs logit error {entry['max_logit_error']:.2e}"
            f"{ms}  runtime >= {entry['min_runtime_version']}  {status}")
