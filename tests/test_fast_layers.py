"""accelerate() must be the same function as the stock model: outputs, gradients, BN stats."""

import numpy as np
import pytest
import tensorflow as tf
import keras

from convmixer_tf import compat, fast_layers, model as model_lib


def _tiny(activation="gelu"):
    keras.utils.set_random_seed(0)
    return model_lib.ConvMixer(16, 2, 3, 2, activation=activation, input_shape=(8, 8, 3),
                               classes=5, classifier_activation=None)


def _images(n=4):
    return np.random.default_rng(0).integers(0, 256, (n, 8, 8, 3)).astype("float32")


def _grads(model, x):
    with tf.GradientTape() as tape:
        out = model(x, training=True)
        loss = tf.reduce_sum(tf.square(out))
    return out, tape.gradient(loss, model.trainable_variables)


def test_accelerate_swaps_layers_keeps_names_and_weights():
    model = _tiny()
    fast = fast_layers.accelerate(model)
    kinds = {type(l).__name__ for l in fast.layers}
    assert {"FusedBatchNormalization", "GELU", "FastDepthwiseConv2D"} <= kinds
    assert not kinds & {"BatchNormalization", "Activation", "DepthwiseConv2D"}
    assert [l.name for l in fast.layers] == [l.name for l in model.layers]
    for a, b in zip(model.weights, fast.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_accelerate_same_outputs_gradients_and_moving_stats():
    model, x = _tiny(), _images()
    fast = fast_layers.accelerate(model)
    out_a, grads_a = _grads(model, x)
    out_b, grads_b = _grads(fast, x)
    np.testing.assert_allclose(out_a, out_b, atol=1e-4, rtol=1e-4)
    scale = max(float(tf.reduce_max(tf.abs(g))) for g in grads_a)
    for ga, gb in zip(grads_a, grads_b):
        np.testing.assert_allclose(ga, gb, atol=1e-4 * scale, rtol=1e-3)
    # Both models took one training step's BN statistics: the biased variance, momentum 0.9.
    for a, b in zip(model.non_trainable_weights, fast.non_trainable_weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(model(x, training=False), fast(x, training=False),
                               atol=1e-4, rtol=1e-4)


def test_relu_model_only_swaps_batchnorm():
    fast = fast_layers.accelerate(_tiny("relu"))
    kinds = [type(l).__name__ for l in fast.layers]
    assert "GELU" not in kinds and kinds.count("Activation") == 5


def test_standardize_round_trip_saves_with_stock_layers(tmp_path):
    model, x = _tiny(), _images()
    back = fast_layers.standardize(fast_layers.accelerate(model))
    kinds = {type(l).__name__ for l in back.layers}
    assert kinds >= {"BatchNormalization", "Activation", "DepthwiseConv2D"}
    assert not kinds & {"FusedBatchNormalization", "GELU", "FastDepthwiseConv2D"}
    path = str(tmp_path / "m.keras")
    back.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded(x), model(x), atol=1e-5)


def test_accelerated_model_saves_and_loads(tmp_path):
    fast, x = fast_layers.accelerate(_tiny()), _images()
    path = str(tmp_path / "fast.keras")
    fast.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded.get_layer("stem_bn")).__name__ == "FusedBatchNormalization"
    np.testing.assert_allclose(loaded(x), fast(x), atol=1e-5)


def test_mixed_bfloat16_training_step_runs():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    fast = fast_layers.accelerate(_tiny())
    fast.compile(optimizer="adam", loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    y = np.eye(5, dtype="float32")[[0, 1, 2, 3]]
    loss = fast.train_on_batch(_images(), y)
    assert np.isfinite(loss)
    assert fast.get_layer("stem_act").compute_dtype == "bfloat16"
    assert fast.get_layer("block0_depthwise").compute_dtype == "bfloat16"
    assert fast.get_layer("predictions").compute_dtype == "float32"


def _depthwise_pair(channels, kernel_size, **kwargs):
    keras.utils.set_random_seed(1)
    stock = keras.layers.DepthwiseConv2D(kernel_size, padding="same", **kwargs)
    stock.build((None, 9, 7, channels))
    stock.bias.assign(np.random.default_rng(2).standard_normal(stock.bias.shape).astype("float32"))
    fast = fast_layers.FastDepthwiseConv2D.from_config(stock.get_config())
    fast.build((None, 9, 7, channels))
    fast.set_weights(stock.get_weights())
    return stock, fast


def _depthwise_grads(layer, x, dy):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
        loss = tf.reduce_sum(y * dy)
    return [y, *tape.gradient(loss, [x, *layer.trainable_variables])]


# 32 channels: groups of 16 in the filter gradient; 12: groups of 4; 7: one channel each.
@pytest.mark.parametrize("channels,kernel_size", [(32, 5), (12, 3), (7, 7), (32, (3, 5))])
@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "tf-kernel-fallback"])
def test_fast_depthwise_matches_autodiff(channels, kernel_size, onednn, monkeypatch):
    """Output, input gradient and filter/bias gradients equal the stock layer's autodiff
    (float32, relative 1e-5), eagerly and inside a tf.function (oneDNN's graph rewrites)."""
    if onednn and not compat.onednn_enabled():
        pytest.skip("TF runs without oneDNN here")
    monkeypatch.setattr(compat, "onednn_enabled", lambda: onednn)
    stock, fast = _depthwise_pair(channels, kernel_size)
    rng = np.random.default_rng(3)
    x = tf.constant(rng.standard_normal((3, 9, 7, channels)).astype("float32"))
    dy = tf.constant(rng.standard_normal((3, 9, 7, channels)).astype("float32"))
    want = _depthwise_grads(stock, x, dy)
    for got in (_depthwise_grads(fast, x, dy), tf.function(_depthwise_grads)(fast, x, dy)):
        for a, b in zip(want, got):
            scale = float(tf.reduce_max(tf.abs(a)))
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * scale)


def test_fast_depthwise_other_configs_run_the_stock_code():
    """Strides, 'valid' padding and depth multipliers take Keras's own (autodiff) path."""
    rng = np.random.default_rng(4)
    x = tf.constant(rng.standard_normal((2, 8, 8, 6)).astype("float32"))
    for kwargs in (dict(strides=2), dict(depth_multiplier=2)):
        stock, fast = _depthwise_pair(6, 3, **kwargs)
        assert not fast._fast(x)
        np.testing.assert_array_equal(fast(x), stock(x))
    stock = keras.layers.DepthwiseConv2D(3, padding="valid")
    assert not fast_layers.FastDepthwiseConv2D.from_config(stock.get_config())._fast(x)


def test_gelu_gradient_matches_erf_formula():
    x = tf.constant(np.linspace(-6, 6, 101, dtype="float32"))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        ours = fast_layers.GELU()(x)
        stock = keras.activations.gelu(x, approximate=False)
    np.testing.assert_allclose(ours, stock, atol=1e-6)
    np.testing.assert_allclose(tape.gradient(ours, x), tape.gradient(stock, x), atol=1e-5)


def test_cpu_flags_is_a_set():
    assert isinstance(fast_layers.cpu_flags(), set)


def test_recommended_precision_needs_native_bf16():
    assert fast_layers.recommended_precision({"avx2", "avx512f"}) == "float32"
    assert fast_layers.recommended_precision({"avx512f", "avx512_bf16"}) == "mixed_bfloat16"
    assert fast_layers.recommended_precision({"amx_bf16"}) == "mixed_bfloat16"
    assert fast_layers.recommended_precision() in ("float32", "mixed_bfloat16")


def test_configure_threads_rejects_after_init():
    # TF is initialised in this process already: TF itself refuses the change; say so clearly.
    with pytest.raises(RuntimeError):
        fast_layers.configure_threads(1, 1)


MIRRORED_SCRIPT = """
import os, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import numpy as np, keras
from convmixer_tf import compat, fast_layers, model as model_lib
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    model = fast_layers.accelerate(model_lib.ConvMixer(
        16, 1, 3, 2, input_shape=(8, 8, 3), classes=3, classifier_activation=None))
    model.compile(optimizer="adam", loss=keras.losses.CategoricalCrossentropy(from_logits=True))
x = np.random.default_rng(0).random((16, 8, 8, 3)).astype("float32") * 255
y = np.eye(3, dtype="float32")[np.arange(16) % 3]
history = model.fit(x, y, batch_size=8, epochs=2, verbose=0)
assert strategy.num_replicas_in_sync == 2
assert all(np.isfinite(history.history["loss"])), history.history
print("OK")
"""


def test_accelerated_model_trains_under_mirrored_strategy():
    """The XLA-fused GELU kernels sit inside each replica's step: no collective in them."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=root)
    proc = subprocess.run([sys.executable, "-c", MIRRORED_SCRIPT], capture_output=True,
                          text=True, timeout=180, env=env, cwd=root)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_cpu_class_and_precision_warning_follow_the_flags_and_the_onednn_cap(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    zen3, zen5 = {"avx2", "fma"}, {"avx2", "avx512f", "avx512_bf16"}
    assert fast_layers.cpu_class(zen3) == "AVX2"
    assert fast_layers.cpu_class(zen5) == "AVX512-BF16"
    assert fast_layers.cpu_class({"avx2", "amx_bf16", "avx512f"}) == "AMX"
    assert "float32" in fast_layers.precision_warning("mixed_bfloat16", zen3)
    assert fast_layers.precision_warning("mixed_bfloat16", zen5) is None
    assert fast_layers.precision_warning("float32", zen3) is None
    assert "mixed_bfloat16" in fast_layers.precision_warning("mixed_float16", zen5)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # oneDNN then uses no AVX-512
    assert fast_layers.cpu_class(zen5) == "AVX2"
    assert not fast_layers.native_bfloat16(zen5)
