"""`deploy.gate`: whether a build may ship (accuracy against Keras), its latency through the
one interleaved timer, and the edge-build choice."""

import keras
import numpy as np
import pytest

from convmixer_tf import timing
from convmixer_tf.deploy import gate, litert, tflite
from convmixer_tf.deploy.config import ExportConfig
from convmixer_tf.model import ConvMixer


def test_gate_is_accuracy_within_one_point_when_labelled():
    low_margin = dict(accuracy=0.258, agreement=0.943, max_logit_error=2.0)  # issue 12's CIFAR
    assert gate.gate(low_margin, keras_accuracy=0.263) is None  # -0.5 points: ships
    lossy = dict(accuracy=0.861, agreement=0.99, max_logit_error=0.1)
    reason = gate.gate(lossy, keras_accuracy=0.8712)
    assert reason and "1.02 points below" in reason and "87.12%" in reason
    assert gate.gate(dict(lossy, accuracy=0.8612), keras_accuracy=0.8712) is None  # 1.00
    unlabelled = dict(accuracy=None, agreement=0.95, max_logit_error=0.1)
    assert "no labelled" in gate.gate(unlabelled, keras_accuracy=None)
    assert gate.gate(dict(unlabelled, agreement=0.99), keras_accuracy=None) is None


def test_gate_thresholds_are_the_export_configs_in_its_units():
    """`max_accuracy_drop` in points, as `convmixer-export --max-accuracy-drop` takes it;
    `min_int8_agreement` a fraction; the defaults are ExportConfig's."""
    lossy = dict(accuracy=0.861, agreement=0.99, max_logit_error=0.1)  # 1.02 points below
    assert gate.gate(lossy, 0.8712, ExportConfig(max_accuracy_drop=1.5)) is None
    reason = gate.gate(lossy, 0.8712, ExportConfig(max_accuracy_drop=0.5))
    assert "1.02 points below" in reason and "(allowed: 0.5)" in reason
    unlabelled = dict(accuracy=None, agreement=0.95, max_logit_error=0.1)
    assert gate.gate(unlabelled, None, ExportConfig(min_int8_agreement=0.9)) is None
    assert "below 96%" in gate.gate(unlabelled, None, ExportConfig(min_int8_agreement=0.96))
    assert gate.describe(ExportConfig(), labelled=True) == \
        "held-out accuracy within 1 point(s) of Keras"
    assert gate.describe(ExportConfig(), labelled=False) == \
        "top-1 agreement >= 98% (no labels)"
    assert gate.describe(ExportConfig(), labelled=True, gated=False).startswith("none")


def test_choose_edge_build_is_the_fastest_that_passed():
    builds = dict(float32=dict(latency_ms=0.1), dynamic_int8=dict(latency_ms=5.0),
                  full_int8=dict(latency_ms=2.0, refused="lost accuracy"),
                  int8_float_gelu=dict(latency_ms=3.0))
    assert gate.choose_edge_build(builds) == "int8_float_gelu"  # float32 is no candidate
    builds["int8_float_gelu"]["refused"] = "lost accuracy"
    assert gate.choose_edge_build(builds) == "dynamic_int8"
    assert gate.choose_fastest_build(builds) == "float32"  # of every mode the gate passed
    builds["dynamic_int8"]["refused"] = "lost accuracy"
    assert gate.choose_edge_build(builds) is None
    builds["float32"]["refused"] = "lost accuracy"
    assert gate.choose_fastest_build(builds) is None


def test_latency_is_measured_with_the_interleaved_timer(monkeypatch):
    """Every build timed in the same rounds by `timing.interleaved` (CPU clock at one
    thread, wall clock with more), the image resized to a fixed file's size first."""
    keras.utils.set_random_seed(0)
    model = ConvMixer(dim=8, depth=1, kernel_size=3, patch_size=2, input_shape=(16, 16, 3),
                      classes=4, classifier_activation=None)
    flats = {"fixed": tflite.convert(model, "float32", input_shape=(1, 16, 16)),
             "float16": tflite.convert(model, "float16", input_shape=(1, 16, 16))}
    calls, real = [], timing.interleaved

    def spy(candidates, rounds, warmup=1, clocks=("wall",), prepare=None):
        calls.append((sorted(candidates), rounds, clocks))
        return real(candidates, rounds, warmup, clocks, prepare)

    monkeypatch.setattr(timing, "interleaved", spy)
    image = np.random.default_rng(0).integers(0, 256, (24, 20, 3)).astype(np.uint8)
    ms = gate.interleaved_latency_ms(flats, image, rounds=3)
    assert set(ms) == {"fixed", "float16"} and all(0 < v < 1000 for v in ms.values()), ms
    assert gate.interleaved_latency_ms(flats, image, rounds=2, num_threads=2)
    assert calls == [(["fixed", "float16"], 3, ("cpu",)), (["fixed", "float16"], 2, ("wall",))]
    assert gate.interleaved_latency_ms({}, image) == {}


def test_accuracy_report_resizes_to_the_files_size():
    keras.utils.set_random_seed(0)
    model = ConvMixer(dim=8, depth=1, kernel_size=3, patch_size=2, input_shape=(16, 16, 3),
                      classes=4, classifier_activation=None)
    flat = tflite.convert(model, "float32", input_shape=(1, 16, 16))
    images = np.random.default_rng(0).integers(0, 256, (6, 20, 20, 3)).astype(np.uint8)
    reference = np.asarray(model(litert.fit_size(images, (16, 16)), training=False))
    report = gate.accuracy_report(flat, reference, images, labels=reference.argmax(-1))
    assert report["accuracy"] == report["agreement"] == 1.0
    assert report["max_logit_error"] < 1e-4
    assert gate.gate(report, keras_accuracy=1.0) is None
    with pytest.raises(ValueError, match="takes 16x16 images"):  # the runner's own check
        litert.LiteRTModel(flat).predict(images)
