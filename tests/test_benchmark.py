"""scripts/benchmark.py: its pieces, and one --quick smoke run (no timing assertions)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "benchmark.py")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flops_match_the_layers_of_the_keras_model(bench):
    from convmixer_tf import model as model_lib

    cfg = dict(dim=32, depth=3, kernel_size=5, patch_size=2, image=16, classes=7)
    model = model_lib.ConvMixer(32, 3, 5, 2, input_shape=(16, 16, 3), classes=7)
    macs = 0
    for layer in model.layers:
        kind = type(layer).__name__
        if kind in ("Conv2D", "DepthwiseConv2D"):
            out = layer.output.shape  # (None, h, w, c)
            kernel = layer.kernel.shape  # (kh, kw, in, out or multiplier)
            per_output = kernel[0] * kernel[1] * (kernel[2] if kind == "Conv2D" else 1)
            macs += out[1] * out[2] * out[3] * per_output
        elif kind == "Dense":
            macs += layer.kernel.shape[0] * layer.kernel.shape[1]
    assert bench.flops_per_image(**cfg) == 2 * macs


def test_interleaved_rotates_and_takes_medians(bench):
    calls = []

    def make(name, n):
        def run():
            calls.append(name)
            return n
        return run

    res = bench.interleaved(dict(a=make("a", 2), b=make("b", 3)), rounds=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert set(res) == {"a", "b"} and len(res["a"]["times"]) == 3
    assert res["b"]["items"] == 3
    assert res["a"]["per_s"] == pytest.approx(2 / res["a"]["median_s"])


def test_ops_outside_delegates(bench):
    def node(i, name, inputs, outputs):
        return dict(index=i, op_name=name, inputs=inputs, outputs=outputs)

    # 0 -QUANTIZE-> 1 -CONV-> 2 -GELU-> 3 -CONV-> 4 ; XNNPACK took each CONV alone.
    nodes = [
        node(0, "QUANTIZE", [0], [1]),
        node(1, "CONV_2D", [1, 9], [2]),
        node(2, "GELU", [2], [3]),
        node(3, "CONV_2D", [3, 8], [4]),
        node(4, "DELEGATE", [1, 9], [2]),
        node(5, "DELEGATE", [3, 8], [4]),
    ]
    assert bench.ops_outside_delegates(nodes) == {"DELEGATE": 2, "QUANTIZE": 1, "GELU": 1}
    one = nodes[:4] + [node(4, "DELEGATE", [0, 8, 9], [4])]
    assert bench.ops_outside_delegates(one) == {"DELEGATE": 1}


def test_bad_flags_are_rejected(bench, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--only", "train,gpu"])
    assert "--only takes" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--threads", "0"])
    args = bench.parse_args(["--only", "peak, tflite"])
    assert args.sections == ["peak", "tflite"]


def test_convert_tflite_rejects_unknown_mode(bench):
    with pytest.raises(ValueError, match="must be one of"):
        bench.convert_tflite(None, ["int4"], [])


def test_quick_run_reports_every_section(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--quick", "--rounds", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=240, env=env, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for title in ("Matmul peak", "Training, ConvMixer", "Inference, ConvMixer", "Edge, batch 1"):
        assert title in proc.stdout
    results = json.loads(out.read_text())
    assert set(results) >= {"machine", "peak", "train", "infer", "tflite"}
    train = results["train"]
    assert "torch eager fp32" in train and "keras fp32 + fused BN/GELU" in train
    assert all(r["per_s"] > 0 for r in train.values())
    edge = results["tflite"]["16_1"]
    assert set(edge["results"]) >= {f"litert {m}" for m in
                                    ("float32", "float16", "dynamic_int8", "full_int8",
                                     "int8_float_gelu")} | {"litert full_int8, no XNNPACK"}
    # Full int8 leaves GELU to TFLite's kernels; keeping GELU in float gives XNNPACK everything.
    assert "GELU" in edge["info"]["litert full_int8"][3]
    assert edge["info"]["litert int8_float_gelu"][2:4] == [1, "none"]
    assert edge["info"]["litert full_int8, no XNNPACK"][2] == 0  # no partitions
