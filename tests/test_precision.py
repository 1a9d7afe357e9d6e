"""Mixed precision end to end: every precision `convmixer-train` offers trains and exports (the
real command, in a subprocess), the fast layers apply only where the device table says, and any
ConvMixer `.keras` exports through `convmixer-export` as float32 whatever its dtype policy."""

import itertools
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import convmixer_tf
from convmixer_tf import artifacts, fast_layers
from convmixer_tf.deploy import logits as logits_lib

from helpers import ROOT, subprocess_env, worker
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")


def _env(**extra):
    # oneDNN on, as on the AVX512 machines users train on (this CPU's default is off): the
    # path where the float16 depthwise gradient crashed.
    return subprocess_env(TF_ENABLE_ONEDNN_OPTS="1", **extra)


def _command(name, *args, timeout=600, setup=""):
    """Runs console command `name` (a cli function) in a fresh process, after `setup` code."""
    argv = [sys.executable, "-c", f"import sys; from convmixer_tf import cli; {setup}"
            f"sys.exit(cli.{name}(sys.argv[1:]))", *map(str, args)]
    return subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


# ---------------------------------------------------------------------------- the device table


@pytest.mark.parametrize("devices, precision, expected", [
    (["CPU"], "float32", {"batchnorm", "gelu", "depthwise"}),
    (["CPU"], "mixed_bfloat16", {"batchnorm", "gelu", "depthwise"}),
    (["CPU"], "mixed_float16", set()),  # not measured on CPU
    (["CPU", "GPU"], "float32", set()),  # a GPU keeps the stock layers (under XLA)
    (["CPU", "GPU", "GPU"], "mixed_float16", set()),
    (["CPU", "GPU"], "mixed_bfloat16", set()),
    (["CPU", "TPU"], "float32", set()),
])
def test_fast_layers_follow_the_device_table(devices, precision, expected):
    options = fast_layers.fast_layers_for(precision, devices)
    assert {swap for swap, on in options.items() if on} == expected
    line = fast_layers.describe_fast_layers(options, precision, devices)
    assert precision in line and fast_layers.device_kind(devices) in line
    assert ("none" in line) == (not expected)


def test_grouped_depthwise_gradient_dtypes_follow_the_cpu():
    assert fast_layers._grouped_gradient_dtypes(["avx2"]) == ("float32",)
    assert fast_layers._grouped_gradient_dtypes(["avx512_bf16"]) == ("float32", "bfloat16")


GRADIENT_SCRIPT = r"""
import json, numpy as np, tensorflow as tf
from convmixer_tf import compat, fast_layers
assert compat.onednn_enabled()
rng = np.random.default_rng(0)
x = tf.constant(rng.normal(size=(4, 8, 8, 32)), tf.float32)
k = tf.constant(rng.normal(size=(5, 5, 32, 1)), tf.float32)
out = {}
for dtype in ("float16", "bfloat16", "float32"):
    xs, ks = tf.cast(x, dtype), tf.cast(k, dtype)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([xs, ks])
        fast = fast_layers._depthwise_same_tf(xs, ks)
        stock = tf.nn.depthwise_conv2d(xs, ks, [1, 1, 1, 1], "SAME")
    g_fast, g_stock = (tape.gradient(y, ks, output_gradients=tf.ones_like(y))
                       for y in (fast, stock))
    ref = tf.cast(g_stock, "float32")
    out[dtype] = float(tf.reduce_max(tf.abs(tf.cast(g_fast, "float32") - ref))
                       / tf.reduce_max(tf.abs(ref)))
print(json.dumps(out))
"""


def test_fast_depthwise_filter_gradient_in_every_dtype_with_onednn():
    """The grouped-convolution filter gradient failed under float16/bfloat16 on CPUs without
    native support ("filter_size does not have enough elements"); now it matches TF's own."""
    proc = subprocess.run([sys.executable, "-c", GRADIENT_SCRIPT], env=_env(),
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    assert errors["float32"] < 1e-5
    assert errors["float16"] < 2e-3 and errors["bfloat16"] < 2e-2, errors


# ---------------------------------------------------------------------------- convmixer-train


DEFAULT_CELLS = {  # (precision, fast layers, strategy, xla): the ones users hit
    ("mixed_float16", True, "default", "off"),  # crashed in step 1 (fp16 depthwise gradient),
    # then its TFLite conversion died on float16 ops (the --no-fast-layers cell is large)
    ("mixed_bfloat16", True, "mirrored", "on"),  # the design card: mirrored + XLA + mixed
}
CELLS = [cell for cell in itertools.product(PRECISIONS, (True, False), ("default", "mirrored"),
                                            ("off", "on"))]


def _builds_only(*modes):
    """Setup code for `_command`: the real export (`cli.train_main` calls
    `export.export_model`) with these TFLite builds only."""
    return ("import functools; from convmixer_tf.deploy import export; "
            "export.export_model = functools.partial(export.export_model, "
            f"tflite_modes={modes!r}); ")


@pytest.mark.parametrize("precision, fast, strategy, xla", [
    cell if cell in DEFAULT_CELLS else pytest.param(*cell, marks=pytest.mark.large)
    for cell in CELLS
])
def test_train_and_export_every_precision(tmp_path, precision, fast, strategy, xla):
    """`convmixer-train` runs a tiny job, exit 0; the saved `.keras` computes in float32 (stock
    layers) and its metadata records the training policy. The large cells also export it
    (SavedModel, TFLite float builds); the default cells stop at the saved model (time): what
    the export then reads is that stock float32 `.keras` whatever the policy, the same file
    test_train.py::test_train_command_exports_through_the_library_and_passes_exit_3_on
    exports through the command (and a mixed-precision model's own export is
    test_any_policy_exports_as_float32[user_script-mixed_bfloat16]). The float16 build is
    made where training ran in float16 (its conversion once died on float16 ops); elsewhere
    the float32 build alone; int8 builds through the CLI are
    test_tflite.py::test_export_cli_finishes_and_exits_3_when_a_build_is_refused's."""
    exported = (precision, fast, strategy, xla) not in DEFAULT_CELLS
    modes = ("float32", "float16") if precision == "mixed_float16" else ("float32",)
    proc = _command(
        "train_main", "--epochs", 1, "--steps-per-epoch", 2, "--batch-size", 16, "--dim", 16,
        "--depth", 1, "--image-size", 16, "--name", "t", "--output-dir", tmp_path,
        "--run-dir", tmp_path / "runs", "--precision", precision, "--strategy", strategy,
        "--xla", xla, "--fast-layers" if fast else "--no-fast-layers", "--verbose", 0,
        *(() if exported else ("--no-export",)), setup=_builds_only(*modes))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    if exported:
        assert os.path.isdir(tmp_path / "t" / "1")
        builds = os.listdir(tmp_path / "t_tflite" / "1")
        assert {f"t_{mode}.tflite" for mode in modes} <= set(builds), builds
    assert ("fast layers" in proc.stdout) == fast
    meta = json.loads((tmp_path / "t.json").read_text())
    assert meta["training_precision"] == precision
    expected = fast_layers.fast_layers_for(precision) if fast else {}
    assert meta["fast_layers_applied"] == [s for s, on in expected.items() if on]
    saved = artifacts.load_model(str(tmp_path / "t.keras"))
    assert {layer.compute_dtype for layer in saved.layers} == {"float32"}


# ---------------------------------------------------------------------------- convmixer-export


def _functional(policy):
    keras.mixed_precision.set_global_policy(policy)
    try:
        return convmixer_tf.ConvMixer(dim=16, depth=2, kernel_size=3, patch_size=2,
                                      input_shape=(16, 16, 3), classes=10)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _trained(model, trainer_fn=lambda m: m):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (32, 16, 16, 3)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, 10, 32), 10)
    trainer = trainer_fn(model)
    trainer.compile(keras.optimizers.AdamW(1e-2), "categorical_crossentropy")
    trainer.fit(x, y, batch_size=16, epochs=1, verbose=0)
    return model


def _source(kind, policy, path):
    """Writes a `.keras` model of `kind` trained under `policy` to `path` (not "user_script":
    that process exports too, `_export_user_script`)."""
    import tensorflow as tf
    from convmixer_tf.training import distribute

    if kind == "functional":
        model = _trained(_functional(policy))
    elif kind == "accelerated":
        model = _trained(fast_layers.accelerate(_functional(policy)))
    else:  # "trainer": a ReplicaTrainer under a strategy, its inner model saved in its scope
        strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
        with strategy.scope():
            model = _trained(_functional(policy), distribute.make_trainer)
            model.save(path)
        return
    model.save(path)


def _export_user_script(path, policy, *flags, jit_compile=False):
    """A user's script (MirroredStrategy on 2 logical CPUs: its own process) trains under
    `policy` (XLA with `jit_compile`), saves `path`, then runs `convmixer-export path flags`
    in the same process (one TensorFlow start, not two)."""
    return subprocess.run([sys.executable, worker("precision_worker.py"),
                           *(["--jit-compile"] if jit_compile else []), str(path), policy,
                           *flags], env=_env(), capture_output=True, text=True, timeout=600,
                          cwd=ROOT)


def _tflite_logits(path, images):
    from convmixer_tf.deploy import litert

    return litert.predict_batched(litert.LiteRTModel(str(path)), images)


SOURCES = ("functional", "accelerated", "trainer", "user_script", "user_script_xla")
# The user's script without XLA by default: XLA under 2 replicas with the same trainer is
# test_distribute.py::test_mirrored_two_replicas_xla_matches_no_xla's, and with
# mixed_bfloat16 the default train cell's (mirrored + XLA); XLA's compile is ~1/3 of this.
DEFAULT_EXPORTS = {("user_script", "mixed_bfloat16")}


@pytest.mark.parametrize("kind, policy", [
    cell if cell in DEFAULT_EXPORTS else pytest.param(*cell, marks=pytest.mark.large)
    for cell in itertools.product(SOURCES, PRECISIONS)
])
def test_any_policy_exports_as_float32(tmp_path, kind, policy):
    """`convmixer-export` of a model of any dtype policy and origin: exit 0, a float32 TFLite
    file whose logits match the float32 rebuild, close to the mixed-precision model's own."""
    path = tmp_path / "m.keras"
    if kind.startswith("user_script"):
        proc = _export_user_script(path, policy, "--tflite-modes", "float32",
                                   jit_compile=kind == "user_script_xla")
    else:
        _source(kind, policy, path)
        proc = _command("export_main", path, "--tflite-modes", "float32")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert os.path.isdir(tmp_path / "m" / "1")
    dtype = keras.DTypePolicy(policy).compute_dtype
    assert (f"the model computes in {dtype}" in proc.stdout) == (policy != "float32")
    model = artifacts.load_model(str(path))
    images = np.random.default_rng(1).integers(0, 256, (8, 16, 16, 3)).astype("float32")
    got = _tflite_logits(tmp_path / "m_tflite" / "1" / "m_float32.tflite", images)
    rebuilt = np.asarray(logits_lib.logits_model(model)(images), np.float32)
    own = np.asarray(logits_lib.logits_model(model, precision="policy")(images), np.float32)
    assert np.abs(got - rebuilt).max() < 1e-4
    tolerance = logits_lib.default_tolerance(model, "policy", own)
    assert np.abs(got - own).max() < tolerance, (np.abs(got - own).max(), tolerance)
    _assert_graph_dtypes(tmp_path / "m" / "1", reduced=False)


def _assert_graph_dtypes(saved_model_dir, reduced):
    """Whether the SavedModel's serving graph computes in float16/bfloat16 anywhere."""
    import tensorflow as tf

    graph = tf.saved_model.load(str(saved_model_dir)).signatures["serving_default"]
    text = str(graph.graph.as_graph_def())
    assert (("DT_BFLOAT16" in text) or ("DT_HALF" in text)) == reduced


@pytest.mark.parametrize("policy", [pytest.param("mixed_float16", marks=pytest.mark.large),
                                    "mixed_bfloat16"])
def test_serving_precision_policy_keeps_reduced_precision(tmp_path, capsys, policy):
    """`--serving-precision policy`: the SavedModel computes in the model's own policy and
    validates against it with the reduced-precision tolerance. No TFLite build (time): TFLite
    converts a float32 rebuild whatever the serving precision (`export_tflite_version` does
    not take it); a mixed model's float32 TFLite build is
    test_any_policy_exports_as_float32[user_script-mixed_bfloat16]'s."""
    from convmixer_tf import cli

    path = tmp_path / "m.keras"
    _source("functional", policy, path)
    code = cli.export_main([str(path), "--tflite-modes", "none", "--serving-precision",
                            "policy"])  # in this process: one TF start fewer
    out, err = capsys.readouterr()
    assert code == 0, out[-2000:] + err[-4000:]
    dtype = keras.DTypePolicy(policy).compute_dtype
    assert f"the SavedModel keeps {dtype}" in out
    _assert_graph_dtypes(tmp_path / "m" / "1", reduced=True)


def test_serving_precision_is_validated_before_work(tmp_path):
    proc = _command("export_main", tmp_path / "missing.keras", "--serving-precision", "fp8")
    assert proc.returncode == 2
    assert "--serving-precision" in proc.stderr and "float32" in proc.stderr
    with pytest.raises(ValueError, match="serving precision must be one of"):
        logits_lib.check_precision("bfloat16")


def test_float32_rebuild_of_mixed_models():
    """`logits_model` rebuilds every policy's model (accelerated too) as stock float32 layers;
    `standardize(float32=True)` (what training saves) computes in float32."""
    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3)).astype("float32")
    for policy in PRECISIONS:
        model = fast_layers.accelerate(_functional(policy))
        for copy in (logits_lib.logits_model(model), fast_layers.standardize(model, float32=True)):
            assert {layer.compute_dtype for layer in copy.layers} == {"float32"}
            assert not any(type(layer).__module__.startswith("convmixer_tf")
                           for layer in copy.layers)
        kept = logits_lib.logits_model(model, precision="policy")
        assert kept.get_layer("stem_conv").compute_dtype == keras.DTypePolicy(policy).compute_dtype
        stem_dtype = kept.get_layer("stem_conv").compute_dtype
        assert logits_lib.compute_dtype(model, "policy") == stem_dtype
        diff = np.abs(np.asarray(logits_lib.logits_model(model)(images))
                      - np.asarray(kept(images), np.float32)).max()
        assert diff < logits_lib.default_tolerance(model, "policy", np.ones(1))
