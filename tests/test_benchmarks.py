"""The benchmarks package: its pieces, its shape (a package, shapes from presets), and (with
`--large`) `python -m benchmarks --quick` smoke runs (no timing assertions)."""

import ast
import json
import os
import pathlib
import subprocess
import sys

import pytest

from benchmarks import __main__ as benchmark, harness as bench, train as benchmark_train
from convmixer_tf import presets

from helpers import ROOT, subprocess_env


def test_flops_match_the_layers_of_the_keras_model():
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


def _run(module, *args):
    """`python -m module args` from the checkout root: (return code, stdout, stderr)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True,
                          text=True, timeout=600, env=env, cwd=ROOT)
    return proc.returncode, proc.stdout, proc.stderr


def test_shapes_come_from_the_presets():
    cifar = presets.MODEL_CONFIGS["convmixer_256_8_ks5_p2"]
    assert bench.variant("256_8") == bench.variant("convmixer_256_8_ks5_p2") == (
        "convmixer_256_8_ks5_p2")
    assert bench.model_shape("256_8") == dict(cifar, image=32, classes=10)
    assert bench.model_shape("768_32") == dict(presets.MODEL_CONFIGS["convmixer_768_32"],
                                               image=224, classes=1000)
    quick = bench.model_shape("256_8", quick=True, depth=1)
    assert quick == dict(cifar, dim=32, depth=1, image=16, classes=10)
    with pytest.raises(ValueError, match="unknown or ambiguous model variant 'nope'.*768_32"):
        bench.variant("nope")
    # The run plan: every section's model is a preset (kernel, patch, activation kept --quick).
    for quick in (False, True):
        plan = benchmark.shapes_for(quick)
        for cfg, name in ((plan["train"], "convmixer_256_8_ks5_p2"),
                          (plan["infer"], "convmixer_768_32"),
                          (plan["tflite"][0], "convmixer_256_8_ks5_p2")):
            config = presets.MODEL_CONFIGS[name]
            assert {k: cfg[k] for k in ("kernel_size", "patch_size", "activation")} == {
                k: config[k] for k in ("kernel_size", "patch_size", "activation")}
            if quick:
                assert cfg["dim"] < config["dim"] and cfg["depth"] < config["depth"]
            else:
                assert (cfg["dim"], cfg["depth"]) == (config["dim"], config["depth"])
    assert bench.short_name(benchmark.shapes_for(True)["tflite"][0]) == "16_1"


def test_benchmarks_is_a_package_without_path_hacks():
    """Modules import each other relatively (no bare sibling names, no sys.path edits), so
    `python -m benchmarks...` and the tests need nothing on the path but the checkout."""
    folder = pathlib.Path(ROOT) / "benchmarks"
    siblings = {p.stem for p in folder.glob("*.py")}
    for path in folder.glob("*.py"):
        source = path.read_text(encoding="utf-8")
        assert "sys.path" not in source, path.name
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                bare = [a.name for a in node.names if a.name.split(".")[0] in siblings]
                assert not bare, (path.name, bare)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                assert (node.module or "").split(".")[0] not in siblings, (path.name,
                                                                            node.module)
    assert not list((pathlib.Path(ROOT) / "scripts").glob("benchmark*.py"))


def test_edge_rejects_an_unknown_variant_before_building_anything():
    code, _, err = _run("benchmarks.edge", "--variant", "512_4")
    assert code == 2 and "unknown or ambiguous model variant '512_4': choose from" in err


def test_interleaved_rotates_and_takes_medians():
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


def _result(per_s):
    return dict(per_s=per_s, median_s=1 / per_s)


def test_ratios_are_against_pytorch_best_of_each_precision_and_overall():
    res = {
        "keras fp32 + fast layers": _result(90.0),
        "keras bf16 + fast layers": _result(150.0),
        "torch eager fp32 NCHW": _result(30.0),
        "torch.compile fp32 channels_last": _result(45.0),
        "torch eager bf16 autocast NCHW": _result(100.0),
    }
    assert bench.best_torch(res, "fp32")[0] == "torch.compile fp32 channels_last"
    assert bench.best_torch(res)[0] == "torch eager bf16 autocast NCHW"
    assert bench.best_torch({"keras fp32": _result(1.0)}) is None
    rows = {r[0]: r for r in benchmark_train.compare_rows(res, 1e9, {"float32": 1e11,
                                                                     "bfloat16": 3e11})}
    assert rows["keras fp32 + fast layers"][2:5] == ("2.00x", "0.90x", "90.0%")
    assert rows["keras bf16 + fast layers"][2:5] == ("1.50x", "1.50x", "50.0%")


def test_a_torch_configuration_that_fails_to_build_is_left_out(capsys):
    class Args:
        backend = "tensorflow"

    def make(cfg, args, compile_=False, **_):
        if compile_:
            raise RuntimeError("no C++ compiler\nmore")
        return lambda: 1

    skipped = {}
    cands = benchmark_train.torch_candidates({}, Args(), make=make, skipped=skipped)
    assert "torch.compile fp32 channels_last" not in cands
    assert "torch eager bf16 autocast channels_last" in cands
    assert "skipped torch.compile fp32 channels_last: RuntimeError: no C++ compiler" in (
        capsys.readouterr().out)
    # Every compiled configuration is tried on CPU too, and the reason is kept for the log.
    assert set(skipped) == {n for n in benchmark_train.TORCH_CONFIGS if "compile" in n} == {
        "torch.compile fp32 NCHW", "torch.compile fp32 channels_last",
        "torch.compile bf16 autocast NCHW", "torch.compile bf16 autocast channels_last"}
    assert skipped["torch.compile fp32 NCHW"] == "RuntimeError: no C++ compiler"


def test_bad_flags_are_rejected(capsys):
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--only", "train,gpu"])
    assert "--only takes" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--threads", "0"])
    args = benchmark.parse_args(["--only", "peak, tflite"])
    assert args.sections == ["peak", "tflite"]


@pytest.mark.large  # ~65 s on a 2-core AVX2 machine (23 s AMX): every section's pieces are
# the unit tests above; this is the smoke run of them together
def test_quick_run_reports_every_section(tmp_path):
    out = tmp_path / "bench.json"
    code, stdout, stderr = _run("benchmarks", "--quick", "--rounds", 1, "--json", out)
    assert code == 0, stderr[-3000:]
    for title in ("Matmul peak", "Training, ConvMixer", "One layer of each type",
                  "Inference, ConvMixer", "Edge, batch 1", "PyTorch's best: fp32: torch"):
        assert title in stdout
    results = json.loads(out.read_text())
    assert set(results) >= {"machine", "peak", "train", "layers", "infer", "tflite"}
    train = results["train"]
    assert {"keras fp32 + fast layers", "keras bf16 + fast layers", "torch eager fp32 NCHW",
            "torch eager bf16 autocast channels_last"} <= set(train)
    assert all(r["per_s"] > 0 for r in train.values())
    assert "keras bf16 fast | depthwise conv | fwd+bwd" in results["layers"]
    # Every mode of the library's converter, from the library's runner and delegation report.
    from convmixer_tf.deploy import modes

    edge = results["tflite"]["16_1"]
    assert set(edge["results"]) >= {f"litert {m}" for m in modes.MODES}
    assert edge["info"]["litert float32"][3:5] == [1, "none"]
    # Full int8 leaves its int8 GELUs to TFLite's own kernels, outside XNNPACK; with GELU
    # kept in float32 they stay inside.
    assert "GELU" in edge["info"]["litert full_int8"][4]
    assert "GELU" not in edge["info"]["litert int8_float_gelu"][4]


@pytest.mark.large
def test_edge_quick_run_times_every_build_against_torch(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "edge.json"
    code, stdout, stderr = _run("benchmarks.edge", "--quick", "--rounds", 1, "--json", out)
    assert code == 0, stderr[-3000:]
    assert "## Edge, batch 1, 1 thread: ConvMixer-32/2 (k7, relu), 28x28" in stdout
    results = json.loads(out.read_text())
    assert results["config"] == bench.model_shape("768_32", quick=True)
    assert {"litert float32", "litert full_int8, no XNNPACK",
            "litert full_int8, 7x7 depthwise unsplit", "torch eager fp32 NCHW"} <= set(
        results["results"])
    assert all(r["cpu_ms"] > 0 and r["wall_ms"] > 0 for r in results["results"].values())


def test_edge_peers_rejects_bad_flags_before_building_anything():
    code, _, err = _run("benchmarks.edge_peers", "--variant", "512_4")
    assert code == 2 and "unknown or ambiguous model variant '512_4': choose from" in err
    code, _, err = _run("benchmarks.edge_peers", "--rounds", "0")
    assert code == 2 and "--rounds must be >= 1; got 0" in err


def test_benchmark_data_helpers_use_the_data_package(tmp_path):
    """The pieces the large quick runs use, by default: digits for the edge peers and the
    fine-tuning folders (a removed re-export once broke both unseen)."""
    from benchmarks import edge_peers, finetune

    (x_train, y_train), (x_test, y_test) = edge_peers.digits({"image": 16}, 5)
    assert x_train.shape[1:] == (16, 16, 3) and x_test.shape == (5, 16, 16, 3)
    source, target = finetune.digit_folders(tmp_path, 8, per_class=1)
    assert sorted(os.listdir(os.path.join(target, "train"))) == ["5", "6", "7", "8", "9"]
    assert sorted(os.listdir(os.path.join(source, "test"))) == ["0", "1", "2", "3", "4"]


@pytest.mark.large
def test_edge_peers_quick_run_measures_every_peer_family(tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "peers.json"
    code, stdout, stderr = _run("benchmarks.edge_peers", "--quick", "--rounds", 1,
                                "--fit-images", 64, "--calibration", 4, "--test-images", 8,
                                "--json", out)
    assert code == 0, stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["machine"]["cpu_class"] in ("AMX", "AVX512-BF16", "AVX-512", "AVX2", "older")
    assert all("compile" in name for name in results["skipped"])  # --quick: nothing else
    assert {"keras export litert fp32", "keras export litert int8", "onnxruntime fp32",
            "onnxruntime int8 static, per tensor", "torch eager fp32 NCHW", "ours float32",
            "ours int8_float_gelu"} <= set(results["results"])
    for r in results["results"].values():
        assert r["mb"] > 0 and 0 <= r["agreement"] <= 1
        assert r["threads 1"]["cpu_ms"]["median"] > 0 and r["threads 2"]["wall_ms"]["median"] > 0
    assert "| ours float32 |" in stdout


def _jpeg_folder(root, classes=2, per_class=6):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        os.makedirs(root / f"class_{c}")
        for i in range(per_class):
            pixels = rng.integers(0, 256, (60 + i, 80, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class_{c}" / f"{i}.jpg", quality=90)
    return root


def test_benchmark_input_our_side_answers_a_round(tmp_path):
    """python -m benchmarks.input: our side (the data package's training stream, run as the
    parent runs it: this file as a script) answers a round with its CPU time for the images it
    made (the protocol the parent interleaves)."""
    folder = _jpeg_folder(tmp_path / "jpegs")
    script = os.path.join(ROOT, "benchmarks", "input.py")
    side = subprocess.run(
        [sys.executable, script, "--side", "tf", "--folder", str(folder), "--batch", "4"],
        input="round 2\n", env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert side.returncode == 0, side.stderr[-2000:]
    ready, answer = side.stdout.strip().splitlines()[-2:]
    result = json.loads(answer)
    assert ready == "ready" and result["images"] == 8 and result["cpu_s"] > 0


@pytest.mark.large  # one more TF process timing every stage (~20 s on 2 AVX2 cores)
def test_benchmark_input_stages_prints_every_stage(tmp_path):
    folder = _jpeg_folder(tmp_path / "jpegs")
    stages = subprocess.run([sys.executable, "-m", "benchmarks.input", "--folder", str(folder),
                             "--stages"], cwd=ROOT, env=subprocess_env(), capture_output=True,
                            text=True, timeout=300)
    assert stages.returncode == 0, stages.stderr[-2000:]
    rows = [line for line in stages.stdout.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == 7 and all(float(r.split("|")[2]) > 0 for r in rows), stages.stdout
