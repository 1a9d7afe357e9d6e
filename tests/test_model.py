import numpy as np
import pytest

import keras
import convmixer_tf
from convmixer_tf import presets


def tiny(**kwargs):
    args = dict(dim=16, depth=2, kernel_size=3, patch_size=2, classes=5)
    args.update(kwargs)
    return convmixer_tf.ConvMixer(**args)


def trainable_params(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


PAPER_PARAMS = {"ConvMixer1536_20": 51.6, "ConvMixer768_32": 21.1, "ConvMixer1024_20": 24.4,
                "ConvMixer256_8": 0.59}  # millions, paper Table 1 and Sec. 3


@pytest.mark.parametrize("variant", sorted(presets.VARIANTS))
def test_parameter_counts_match_the_paper(variant):
    """Every exported variant (one `presets.VARIANTS` entry each) builds, is exported from the
    package, documents itself and has the paper's parameter count."""
    config_name, classes, params = presets.VARIANTS[variant]
    builder = getattr(convmixer_tf, variant)
    assert variant in convmixer_tf.__all__ and builder.__name__ == variant
    assert builder.__doc__.startswith(f"Instantiates the {variant}") and params in builder.__doc__
    model = builder(classes=classes)
    assert model.name == config_name
    millions = PAPER_PARAMS[variant]
    assert round(trainable_params(model) / 1e6, 2 if millions < 1 else 1) == millions
    assert params.startswith(str(millions))


@pytest.mark.parametrize("variant", sorted(presets.VARIANTS))
def test_every_variant_is_a_function_of_model_py_with_its_tables_architecture(variant):
    """Each `presets.VARIANTS` name is a plain `def` in model.py (so "go to definition" finds
    it), and the package's name is that function; it builds its table entry's architecture."""
    import inspect

    from convmixer_tf import model as model_lib

    function = model_lib.__dict__[variant]
    assert inspect.isfunction(function) and function.__module__ == "convmixer_tf.model"
    assert inspect.getsource(function).startswith(f"def {variant}(")
    assert getattr(convmixer_tf, variant) is function
    config = presets.MODEL_CONFIGS[presets.VARIANTS[variant][0]]
    model = function(input_shape=(28, 28, 3), classes=3)
    blocks = [l for l in model.layers if l.name.endswith("_add")]
    assert len(blocks) == config["depth"] and model.output_shape == (None, 3)
    assert model.get_layer("stem_conv").filters == config["dim"]
    assert model.get_layer("stem_conv").strides == (config["patch_size"],) * 2
    assert model.get_layer("block0_depthwise").kernel_size == (config["kernel_size"],) * 2
    assert model.get_layer("stem_act").get_config()["activation"] == config["activation"]


def test_variants_carry_their_architecture():
    model = convmixer_tf.ConvMixer768_32(input_shape=(28, 28, 3))
    assert model.name == "convmixer_768_32"
    assert model.get_layer("stem_conv").kernel_size == (7, 7)
    assert model.get_layer("stem_conv").strides == (7, 7)
    assert model.get_layer("block0_depthwise").kernel_size == (7, 7)
    assert model.get_layer("stem_act").get_config()["activation"] == "relu"
    assert len([l for l in model.layers if l.name.endswith("_add")]) == 32
    p14 = convmixer_tf.ConvMixer1024_20(input_shape=(28, 28, 3))
    assert p14.get_layer("stem_conv").strides == (14, 14)
    assert p14.get_layer("block0_depthwise").kernel_size == (9, 9)
    assert convmixer_tf.ConvMixer1536_20.__doc__.startswith("Instantiates the ConvMixer1536_20")


@pytest.mark.parametrize("size", [(32, 32), (17, 23), (64, 48), (2, 2)])
def test_output_shapes_for_several_input_sizes(size):
    model = tiny(input_shape=size + (3,))
    x = np.random.uniform(0, 255, (2,) + size + (3,)).astype("float32")
    assert model.predict(x, verbose=0).shape == (2, 5)
    features = tiny(input_shape=size + (3,), include_top=False)
    assert features(x).shape == (2, size[0] // 2, size[1] // 2, 16)


def test_variable_input_size_one_model():
    model = tiny(input_shape=(None, None, 3))
    for size in [(16, 16), (30, 22), (9, 40)]:
        x = np.random.uniform(0, 255, (1,) + size + (3,)).astype("float32")
        out = model(x)
        assert out.shape == (1, 5)
        np.testing.assert_allclose(np.sum(out, axis=-1), 1.0, rtol=1e-5)
    assert model.input_shape == (None, None, None, 3)


def test_block_structure_residual_around_depthwise_only():
    model = tiny(depth=1)
    order = [l.name for l in model.layers]
    expected = [
        "block0_depthwise", "block0_depthwise_act", "block0_depthwise_bn", "block0_add",
        "block0_pointwise", "block0_pointwise_act", "block0_pointwise_bn",
    ]
    start = order.index("block0_depthwise")
    assert order[start : start + len(expected)] == expected
    add = model.get_layer("block0_add")
    add_inputs = {t._keras_history.operation.name for t in add._inbound_nodes[0].input_tensors}
    assert add_inputs == {"block0_depthwise_bn", "stem_bn"}
    pointwise = model.get_layer("block0_pointwise")
    assert pointwise.kernel_size == (1, 1)
    assert pointwise._inbound_nodes[0].input_tensors[0]._keras_history.operation.name == "block0_add"
    assert isinstance(model.get_layer("block0_depthwise"), keras.layers.DepthwiseConv2D)


def test_block_output_equals_hand_computation():
    """The block is BN(act(PW(BN(act(DW(x))) + x))), checked against numpy with real BN stats."""
    model = tiny(depth=1, include_top=False, include_preprocessing=False)
    rng = np.random.default_rng(0)
    for w in model.weights:
        w.assign(rng.normal(0.5 if "variance" in w.path else 0, 0.3, w.shape).astype("float32")
                 if "variance" not in w.path else rng.uniform(0.5, 2.0, w.shape).astype("float32"))
    x = rng.normal(size=(1, 8, 8, 3)).astype("float32")
    stem = keras.Model(model.input, model.get_layer("stem_bn").output)(x).numpy()

    def bn(name, v):
        layer = model.get_layer(name)
        g, b, m, var = (w.numpy() for w in layer.weights)
        return g * (v - m) / np.sqrt(var + 1e-5) + b

    from scipy.special import erf
    gelu = lambda v: 0.5 * v * (1 + erf(v / np.sqrt(2)))
    dw = model.get_layer("block0_depthwise")
    k, bias = dw.kernel.numpy()[:, :, :, 0], dw.bias.numpy()
    padded = np.pad(stem, ((0, 0), (1, 1), (1, 1), (0, 0)))
    conv = sum(padded[:, i : i + 4, j : j + 4, :] * k[i, j] for i in range(3) for j in range(3))
    y = bn("block0_depthwise_bn", gelu(conv + bias)) + stem
    pw = model.get_layer("block0_pointwise")
    y = bn("block0_pointwise_bn", gelu(y @ pw.kernel.numpy()[0, 0] + pw.bias.numpy()))
    np.testing.assert_allclose(model(x).numpy(), y, rtol=1e-4, atol=1e-4)


def test_paper_numerics_batchnorm_and_exact_gelu():
    model = tiny()
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            assert layer.epsilon == 1e-5 and layer.momentum == 0.9
    act = model.get_layer("stem_act")
    x = np.array([-1.0, 0.5, 2.0], "float32")
    from scipy.special import erf
    np.testing.assert_allclose(act(x), 0.5 * x * (1 + erf(x / np.sqrt(2))), rtol=1e-6)


def test_initialisation_is_pytorchs_default():
    """Kernels and biases uniform on +-1/sqrt(fan_in) as PyTorch's Conv2d/Linear (groups=dim
    for the depthwise conv: fan_in = k*k), so training from scratch starts as the paper's."""
    dim, k, p = 64, 5, 2
    model = convmixer_tf.ConvMixer(dim, 2, k, p, input_shape=(16, 16, 3), classes=10)
    fan_in = {"stem_conv": 3 * p * p, "block0_depthwise": k * k, "block1_pointwise": dim,
              "predictions": dim}

    def check(w, bound, what):
        w = np.asarray(w).ravel()
        assert np.abs(w).max() <= bound, what
        if w.size >= 64:  # the 10 head biases are too few to pin the distribution
            assert np.abs(w).max() > 0.8 * bound, what  # not zero, not glorot's narrower range
            assert abs(w.std() - bound / np.sqrt(3)) < 0.25 * bound / np.sqrt(3), what

    for name, fan in fan_in.items():
        for weight in model.get_layer(name).weights:
            check(weight.numpy(), 1 / np.sqrt(fan), f"{name} {weight.name}")
    torch = pytest.importorskip("torch")
    from benchmarks import reference_torch

    torch.manual_seed(0)  # the same bounds hold for the paper's model
    reference = dict(reference_torch.ConvMixer(dim, 2, k, p, num_classes=10).named_parameters())
    for key, name in (("0", "stem_conv"), ("3.0.fn.0", "block0_depthwise"),
                      ("4.1", "block1_pointwise"), ("7", "predictions")):
        for suffix in ("weight", "bias"):
            check(reference[f"{key}.{suffix}"].detach().numpy(), 1 / np.sqrt(fan_in[name]),
                  f"torch {key}.{suffix}")


def test_preprocessing_inside_takes_raw_uint8_pixels():
    with_pre = tiny(input_shape=(8, 8, 3))
    without = tiny(input_shape=(8, 8, 3), include_preprocessing=False)
    without.set_weights(with_pre.get_weights())
    pixels = np.random.default_rng(1).integers(0, 256, (2, 8, 8, 3)).astype("uint8")
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    normalised = ((pixels / 255.0 - mean) / std).astype("float32")
    np.testing.assert_allclose(with_pre(pixels), without(normalised), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(with_pre.predict(pixels, verbose=0), without(normalised),
                               rtol=1e-5, atol=1e-6)


def test_names_on_input_and_output():
    model = tiny()
    assert model.input.name == "images"
    assert model.output_names == ["predictions"]
    assert model.layers[-1].name == "predictions"


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_float32_output(policy):
    keras.mixed_precision.set_global_policy(policy)
    model = tiny(classifier_activation=None)
    assert model.get_layer("block0_pointwise").compute_dtype == policy.split("_")[1]
    assert model.get_layer("predictions").compute_dtype == "float32"
    x = np.random.uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    assert model(x).dtype == "float32"


def test_keras_applications_options():
    notop = tiny(include_top=False, pooling="avg", input_shape=(123, 123, 3))
    assert notop.output_shape == (None, 16)
    assert tiny(include_top=False, pooling="max").layers[-1].name == "max_pool"
    features = tiny(include_top=False)
    assert features.output_shape == (None, None, None, 16)
    tensor = keras.Input((20, 20, 3), name="custom")
    custom = tiny(input_tensor=tensor)
    assert custom.input.name == "custom" and custom.output_shape == (None, 5)
    logits = tiny(classifier_activation=None)
    x = np.random.uniform(0, 255, (3, 8, 8, 3)).astype("float32")
    assert not np.allclose(np.sum(logits(x), -1), 1.0)


def test_keras_round_trip_and_config(tmp_path):
    model = tiny(input_shape=(None, None, 3))
    x = np.random.uniform(0, 255, (2, 12, 12, 3)).astype("float32")
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded(x), model(x), rtol=1e-6)
    rebuilt = keras.Model.from_config(model.get_config())
    assert [l.name for l in rebuilt.layers] == [l.name for l in model.layers]


def test_weights_argument_loads_a_file(tmp_path):
    model = tiny()
    path = str(tmp_path / "w.weights.h5")
    model.save_weights(path)
    again = tiny(weights=path)
    for a, b in zip(model.get_weights(), again.get_weights()):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(FileNotFoundError, match="missing.weights.h5"):
        tiny(weights=str(tmp_path / "missing.weights.h5"))
    with pytest.raises(ValueError, match="imagenet"):
        tiny(weights="imagenet")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(input_shape=(32, 32)), "input_shape"),
        (dict(input_shape=(1, 32, 32, 3)), "input_shape"),
        (dict(input_shape=(8, 8, 3), patch_size=9), "patch_size"),
        (dict(dim=0), "dim"),
        (dict(depth=-1), "depth"),
        (dict(kernel_size=0), "kernel_size"),
        (dict(patch_size=0), "patch_size"),
        (dict(classes=0), "classes"),
        (dict(pooling="mean"), "pooling"),
        (dict(activation="swish"), "activation"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kwargs)
