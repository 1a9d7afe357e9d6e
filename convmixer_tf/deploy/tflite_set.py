"""The export's TFLite set: every requested build converted, checked against the Keras model,
gated, timed and written, one log line per build (`export_all`, called by `deploy.export`).

    from convmixer_tf.deploy import tflite_set
    from convmixer_tf.deploy.config import ExportConfig
    report = tflite_set.export_all(model, "out", "name", x_train[:256], x_test, (32, 32),
                                   eval_labels=y_test, config=ExportConfig())
    # float32, float16 and every int8 build, gated; out/name_int8.tflite is the edge build

Lines go to `logging.getLogger("convmixer_tf.deploy.tflite_set")`; the returned report (what
the metadata file records) holds every number and verdict they show.
"""

import dataclasses
import logging
import os

import numpy as np

from convmixer_tf.deploy import gate as gating
from convmixer_tf.deploy import tflite
from convmixer_tf.deploy.config import ExportConfig
from convmixer_tf.deploy.litert import (LiteRTModel, delegation_table, fit_size,
                                        min_runtime_version)
from convmixer_tf.deploy.logits import logits_model
from convmixer_tf.deploy.modes import EDGE_BUILD, INT8_MODES, TFLITE_MODES, check_modes

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Build:
    """One file of the TFLite set: what was converted, what the gate measured and decided,
    how fast it ran and where it was written."""

    mode: str  # a `TFLITE_MODES` name
    dynamic: bool  # any batch and image size; else a fixed 1 x height x width input
    input: tuple  # the TFLite input (batch, height, width); None = dynamic
    flat: bytes = dataclasses.field(repr=False)  # the flatbuffer
    min_runtime_version: str = None  # the oldest TFLite runtime that loads it
    accuracy: dict = None  # `gate.accuracy_report`: accuracy, agreement, max_logit_error
    refused: str = None  # the gate's verdict: why it may not ship; None: it may
    latency_ms: float = None  # batch 1 on this machine (a dynamic build: its fixed twin's)
    files: list = dataclasses.field(default_factory=list)  # its names in the set's folder

    @property
    def label(self):
        """Its name in the report and its file: `<mode>` or `<mode>_dynamic`."""
        return self.mode + ("_dynamic" if self.dynamic else "")

    @property
    def size_bytes(self):
        return len(self.flat)

    def entry(self):
        """Its entry in the report (the metadata file's `tflite.builds[label]`)."""
        entry = dict(mode=self.mode, input=list(self.input), size_bytes=self.size_bytes,
                     min_runtime_version=self.min_runtime_version, **(self.accuracy or {}))
        if self.refused:
            entry["refused"] = self.refused
        if self.latency_ms is not None:
            entry["latency_ms_at_fixed_size" if self.dynamic else "latency_ms"] = self.latency_ms
        entry["files"] = list(self.files)
        return entry


def expand_modes(modes, model_ops=None, io_type="float32", calibration=True):
    """The builds to convert for the export's `modes` ("int8" = every int8 candidate, then
    the fastest that passes becomes `<name>_int8.tflite`), and {build: why it was skipped},
    from the modes' `TFLITE_MODES` entries. `model_ops`: the model's activations (lower case,
    `model_activations`), None if unknown; `io_type`: the int8 builds' I/O type."""
    builds, skipped = [], {}
    for mode in check_modes(modes):
        for m in (INT8_MODES if mode == EDGE_BUILD else (mode,)):
            settings = TFLITE_MODES[m]
            if settings.calibrated and not calibration:
                skipped[m] = ("no calibration images (export(calibration_images=...); "
                              "convmixer-export: a <name>.samples.npz or --calibration-dir)")
            elif (settings.requires and model_ops is not None
                  and not any(settings.requires in activation for activation in model_ops)):
                skipped[m] = (f"the model has no {settings.requires.upper()} (same file as "
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
               eval_labels=None, *, config=None, gated=True, num_threads=None,
               latency_rounds=20):
    """Converts, gates, times and writes the TFLite builds into `out_dir` (the export job,
    `deploy.export`, passes a temp folder it publishes as a version); returns the report for
    the metadata file.

    `config` (a `deploy.config.ExportConfig`, default its defaults) gives the builds
    (`tflite_modes`), the int8 builds' I/O type (`int8_io`: the calibrated modes take it, the
    others keep float32) and the gate (`max_accuracy_drop` in points, `min_int8_agreement`).
    Each mode gives `<out_dir>/<name>_<mode>.tflite` (fixed 1xHxW input) and
    `<name>_<mode>_dynamic.tflite` (any batch and size). With "int8" in the modes every int8
    candidate (`INT8_MODES`) is built and timed on this machine (batch 1, LiteRT with XNNPACK,
    interleaved), and the fastest that passes `gate.gate` is also written as
    `<name>_int8.tflite` (+ `_dynamic`): the default edge build. A build the gate refuses is
    not written; the report lists it under "refused" with the reason, and the caller decides
    the exit status (the CLI's 3). A build the converter cannot make is left out the same way,
    under "failed" with a one-line reason (`tflite.conversion_failure`); the rest is still
    converted, gated and written. `gated=False` (no held-out images exist: `eval_images` are
    synthetic) reports the numbers without gating on them.
    """
    config = config or ExportConfig()
    modes = check_modes(config.tflite_modes)
    eval_images = np.asarray(eval_images)
    labels = None if eval_labels is None else np.asarray(eval_labels).reshape(-1)
    if labels is not None and len(labels) != len(eval_images):
        raise ValueError(f"{len(labels)} eval labels for {len(eval_images)} eval images")
    resized = fit_size(eval_images, input_size)
    reference = np.asarray(logits_model(model).predict(
        resized.astype(np.float32), batch_size=64, verbose=0))
    keras_accuracy = None if labels is None else float(np.mean(reference.argmax(-1) == labels))
    calibration = representative_images is not None and len(representative_images) > 0
    wanted, skipped = expand_modes(modes, model_activations(model), config.int8_io, calibration)

    builds, failed = _convert(model, wanted, representative_images, input_size, config.int8_io)
    _gate(builds, reference, resized, labels, keras_accuracy, config, gated)
    _time(builds, resized[0], latency_rounds, num_threads)
    edge = _choose_edge_build(builds) if EDGE_BUILD in modes else None
    fastest = gating.choose_fastest_build({b.mode: b.entry() for b in builds if not b.dynamic})
    _write(builds, out_dir, name, edge)
    report = dict(
        keras_accuracy=keras_accuracy, eval_images=len(eval_images), labelled=labels is not None,
        io_type=config.int8_io, gate=gating.describe(config, labels is not None, gated),
        latency=dict(batch=1, runtime="ai_edge_litert + XNNPACK", num_threads=num_threads or 1,
                     rounds=latency_rounds,
                     clock="thread CPU time" if (num_threads or 1) == 1 else "wall"),
        builds={b.label: b.entry() for b in builds}, skipped=skipped,
        refused={b.label: b.refused for b in builds if b.refused}, failed=failed,
        edge_build=edge, fastest_build=fastest)
    if EDGE_BUILD in modes and edge is None:
        report["refused"][EDGE_BUILD] = "no int8 candidate converted and passed the gate"
    _log(builds, report, name)
    return report


def _convert(model, modes, representative_images, input_size, int8_io):
    """The fixed builds, then the dynamic ones (a mode that failed fixed is not tried again),
    and {label: why the converter could not make it}."""
    builds, failed = [], {}
    for dynamic in (False, True):
        shape = (None, None, None) if dynamic else (1, *input_size)
        failures, converted = {}, {}
        todo = [m for m in modes if m not in failed]
        for io_type in dict.fromkeys(_io_type(m, int8_io) for m in todo):  # one run each
            converted.update(tflite.convert_builds(
                model, [m for m in todo if _io_type(m, int8_io) == io_type],
                representative_images, shape, io_type, failures=failures))
        failed.update({m + ("_dynamic" if dynamic else ""): why for m, why in failures.items()})
        builds += [Build(m, dynamic, shape, converted[m], min_runtime_version(converted[m]))
                   for m in todo if m in converted]
    return builds, failed


def _io_type(mode, int8_io):
    """The I/O type `mode` is converted with: `int8_io` where the mode takes it, else float32."""
    return int8_io if int8_io in TFLITE_MODES[mode].io_types else "float32"


def _gate(builds, reference, images, labels, keras_accuracy, config, gated):
    """Each build measured against the Keras logits `reference` and, if `gated`, its verdict."""
    for build in builds:
        build.accuracy = gating.accuracy_report(build.flat, reference, images, labels)
        if gated:
            build.refused = gating.gate(build.entry(), keras_accuracy, config) or None


def _time(builds, image, rounds, num_threads):
    """Batch-1 latency of the fixed builds that passed and of every fixed int8 candidate
    (refused ones too: the report shows what the gate cost), measured interleaved; a dynamic
    build gets its fixed twin's."""
    fixed = {b.mode: b for b in builds if not b.dynamic}
    timed = [m for m, b in fixed.items() if not b.refused]
    timed += [m for m, b in fixed.items() if b.refused and m in INT8_MODES]
    times = gating.interleaved_latency_ms({m: fixed[m].flat for m in timed}, image, rounds,
                                          num_threads)
    for build in builds:
        build.latency_ms = times.get(build.mode) if build.mode in fixed else None


def _choose_edge_build(builds):
    """The fastest fixed int8 build the gate passed (`gate.choose_edge_build`), None if none."""
    return gating.choose_edge_build({b.mode: b.entry() for b in builds if not b.dynamic})


def _write(builds, out_dir, name, edge):
    """Every build the gate passed as `<name>_<label>.tflite`, the edge build's also as
    `<name>_int8[_dynamic].tflite`."""
    for build in builds:
        if build.refused:
            continue
        build.files = [f"{name}_{build.label}.tflite"]
        if build.mode == edge:
            build.files.append(f"{name}_{EDGE_BUILD}{'_dynamic' if build.dynamic else ''}.tflite")
        for file in build.files:
            tflite.save(build.flat, os.path.join(out_dir, file))


CLEARLY_FASTER = 0.9  # a float build is named beside the edge build below this latency ratio


def _log(builds, report, name):
    """One line per build (+ XNNPACK's delegation of each fixed file written), then the
    skipped, the edge build, the refused and the failed."""
    emit = logger.log

    for build in builds:
        emit(logging.INFO, _build_line(build))
        if build.files and not build.dynamic:
            emit(logging.INFO, delegation_table(LiteRTModel(build.flat).delegation()))
    for mode, why in report["skipped"].items():
        emit(logging.INFO, f"tflite {mode:<22} skipped: {why}")
    if report["edge_build"]:
        emit(logging.INFO, f"tflite edge build: {name}_{EDGE_BUILD}.tflite = "
                           f"{report['edge_build']} (fastest int8 build; gate: {report['gate']})")
    fastest, edge = report["fastest_build"], report["edge_build"]
    ms = {b.mode: b.latency_ms for b in builds if not b.dynamic}
    if (fastest and edge and fastest not in INT8_MODES
            and ms[fastest] < CLEARLY_FASTER * ms[edge]):
        emit(logging.INFO, f"tflite fastest build: {name}_{fastest}.tflite, {ms[fastest]:.2f} "
                           f"ms/image against the edge build's {ms[edge]:.2f} on this CPU (both "
                           f"passed the gate): ship it where this CPU is the target")
    for label, why in report["refused"].items():
        emit(logging.WARNING, f"tflite {label:<22} REFUSED: {why}")
    for label, why in report["failed"].items():
        emit(logging.WARNING, f"tflite {label:<22} FAILED: {why}")


def _build_line(build):
    report = build.accuracy
    acc = "" if report["accuracy"] is None else f"accuracy {report['accuracy']:.2%}  "
    ms = "" if build.latency_ms is None or build.dynamic else f"  {build.latency_ms:.2f} ms/image"
    status = "REFUSED" if build.refused else "-> " + ", ".join(build.files)
    return (f"tflite {build.label:<22} {build.size_bytes / 1024:8.1f} KiB  {acc}agreement "
            f"{report['agreement']:.2%}  max abs logit error {report['max_logit_error']:.2e}"
            f"{ms}  runtime >= {build.min_runtime_version}  {status}")
