"""PyTorch checkpoint conversion: the converted Keras model gives the paper's PyTorch logits.

Tolerance: `np.testing.assert_allclose(keras, torch, rtol=1e-4, atol=1e-5)` on logits, eval mode
(BN running statistics), float32 on CPU.
"""

import argparse
import os
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import convmixer_tf  # noqa: E402
from convmixer_tf import checkpoints, cli, model as model_lib, presets  # noqa: E402
from benchmarks import reference_torch as rt  # noqa: E402

RTOL, ATOL = 1e-4, 1e-5
DIM, DEPTH, CLASSES = 24, 2, 10
# Two image sizes, neither a multiple of 7, 14 or 2 in both axes: the stem drops the remainder.
SIZES = ((30, 45), (47, 29))


def reduced(variant):
    """A named variant's kernel, patch and activation at test size."""
    config = dict(presets.MODEL_CONFIGS[variant])
    config.update(dim=DIM, depth=DEPTH)
    return config


def torch_model(config, layout="timm", classes=CLASSES, seed=0):
    torch.manual_seed(seed)
    model = rt.ConvMixer(
        config["dim"], config["depth"], config["kernel_size"], config["patch_size"],
        config["activation"], num_classes=classes, layout=layout,
    )
    return rt.randomize_batchnorm(model, seed=seed).eval()


def save_checkpoint(model, path, wrap=True):
    """As a DistributedDataParallel run's training checkpoint: `module.` keys in a wrapper."""
    state = model.state_dict()
    state = {"module." + k: v for k, v in state.items()} if wrap else state
    torch.save({"state_dict": state, "epoch": 7, "args": argparse.Namespace(lr=0.01)} if wrap
               else state, path)
    return str(path)


def torch_logits(model, images_nhwc):
    with torch.no_grad():
        return model(torch.from_numpy(np.transpose(images_nhwc, (0, 3, 1, 2)).copy())).numpy()


def normalised_images(size, seed=0):
    return np.random.default_rng(seed).standard_normal((2,) + size + (3,)).astype("float32")


def keras_model(config, path, **kwargs):
    args = dict(include_preprocessing=False, classifier_activation=None, classes=CLASSES)
    args.update(kwargs)
    return convmixer_tf.ConvMixer(**config, weights=path, **args)


@pytest.mark.parametrize("layout", checkpoints.LAYOUTS)
@pytest.mark.parametrize("variant", sorted(presets.MODEL_CONFIGS))
def test_converted_logits_match_pytorch(variant, layout, tmp_path):
    config = reduced(variant)
    reference = torch_model(config, layout)
    path = save_checkpoint(reference, tmp_path / "ckpt.pth.tar")
    model = keras_model(config, path)
    for i, size in enumerate(SIZES):
        x = normalised_images(size, seed=i)
        np.testing.assert_allclose(
            model(x).numpy(), torch_logits(reference, x), rtol=RTOL, atol=ATOL
        )


def test_preprocessing_model_on_raw_pixels_matches_pytorch_on_normalised(tmp_path):
    config = reduced("convmixer_768_32")
    reference = torch_model(config, "official")
    model = keras_model(config, save_checkpoint(reference, tmp_path / "c.pth"),
                        include_preprocessing=True)
    pixels = np.random.default_rng(3).integers(0, 256, (2, 35, 40, 3)).astype("float32")
    normalised = (pixels / 255.0 - np.array(presets.IMAGENET_MEAN)) / np.array(presets.IMAGENET_STD)
    np.testing.assert_allclose(
        model(pixels).numpy(), torch_logits(reference, normalised.astype("float32")),
        rtol=RTOL, atol=ATOL,
    )


def test_build_from_checkpoint_infers_the_architecture(tmp_path):
    config = dict(dim=16, depth=3, kernel_size=5, patch_size=3, activation="gelu")
    reference = torch_model(config, "official", classes=6)
    path = save_checkpoint(reference, tmp_path / "c.pt", wrap=False)
    model = model_lib.build_from_checkpoint(
        path, include_preprocessing=False, classifier_activation=None
    )
    assert model.output_shape == (None, 6)
    assert model.get_layer("block2_depthwise").kernel_size == (5, 5)
    x = normalised_images((20, 26))
    np.testing.assert_allclose(model(x).numpy(), torch_logits(reference, x), rtol=RTOL, atol=ATOL)


def shapes_only(variant, layout):
    """A state dict with the real variant's shapes, stored as zero-byte broadcast views."""
    c = presets.MODEL_CONFIGS[variant]
    d, k, p = c["dim"], c["kernel_size"], c["patch_size"]
    model = rt.ConvMixer(8, c["depth"], k, p, c["activation"], layout=layout)
    state = {}
    for key, value in model.state_dict().items():
        shape = tuple(d if s == 8 else s for s in value.shape)
        state[key] = np.broadcast_to(np.float32(0), shape)
    return state


@pytest.mark.parametrize("layout", checkpoints.LAYOUTS)
@pytest.mark.parametrize("variant", ["convmixer_1536_20", "convmixer_768_32",
                                     "convmixer_1024_20_ks9_p14"])
def test_infer_config_of_the_published_variants(variant, layout):
    config = checkpoints.infer_config(shapes_only(variant, layout))
    expected = dict(presets.MODEL_CONFIGS[variant], classes=1000, in_channels=3, layout=layout)
    assert config == expected  # 768/32 comes back ReLU, the others GELU


def test_wrappers_prefixes_and_ema(tmp_path):
    reference = torch_model(reduced("convmixer_1536_20"))
    plain = reference.state_dict()
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in plain.items()}
    torch.save({"model": {"_orig_mod." + k: v for k, v in plain.items()},
                "state_dict_ema": {"module." + k: v for k, v in ema.items()}}, tmp_path / "w.pth")
    loaded = checkpoints.load_state_dict(tmp_path / "w.pth")
    assert "num_batches_tracked" not in " ".join(loaded)
    np.testing.assert_array_equal(loaded["stem.0.weight"], plain["stem.0.weight"].numpy())
    ema_loaded = checkpoints.load_state_dict(tmp_path / "w.pth", prefer_ema=True)
    np.testing.assert_array_equal(ema_loaded["head.bias"], ema["head.bias"].numpy())


class NotATensor:
    pass


def test_pickled_objects_need_trust(tmp_path):
    reference = torch_model(reduced("convmixer_768_32"))
    torch.save({"state_dict": reference.state_dict(), "extra": NotATensor()}, tmp_path / "c.pth")
    with pytest.raises(ValueError, match="trust_checkpoint=True"):
        checkpoints.load_state_dict(tmp_path / "c.pth")
    assert "head.weight" in checkpoints.load_state_dict(tmp_path / "c.pth", trust_checkpoint=True)


@pytest.fixture(scope="module")
def timm_ckpt(tmp_path_factory):
    """A timm-layout checkpoint of a reduced 1536/20 (kernel 9, patch 7, GELU), 10 classes."""
    reference = torch_model(reduced("convmixer_1536_20"), "timm")
    return reference, save_checkpoint(reference, tmp_path_factory.mktemp("c") / "c.pth.tar")


def test_wrong_variant_names_the_first_key_and_both_shapes(timm_ckpt):
    _, path = timm_ckpt
    model = convmixer_tf.ConvMixer(**reduced("convmixer_768_32"), classes=CLASSES)
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(ValueError) as error:
        checkpoints.load_weights(model, path)
    message = str(error.value)
    assert "'blocks.0.0.fn.0.weight' has shape (24, 1, 9, 9)" in message
    assert "needs (24, 1, 7, 7) in PyTorch layout" in message
    assert "kernel_size=9" in message  # says what the checkpoint is
    for a, b in zip(before, model.get_weights()):  # nothing half-loaded
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"'stem.0.weight' has shape \(24, 3, 7, 7\)"):
        convmixer_tf.ConvMixer(dim=32, depth=DEPTH, weights=path, classes=CLASSES)


def test_missing_and_unexpected_keys(tmp_path, timm_ckpt):
    reference, path = timm_ckpt
    state = reference.state_dict()
    del state["blocks.1.3.running_var"]
    torch.save(state, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="missing key 'blocks.1.3.running_var'"):
        keras_model(reduced("convmixer_1536_20"), str(tmp_path / "missing.pth"))
    deeper = dict(reduced("convmixer_1536_20"), depth=DEPTH + 1)
    with pytest.raises(ValueError, match="missing key 'blocks.2.0.fn.0.weight'"):
        keras_model(deeper, path)
    shallower = dict(reduced("convmixer_1536_20"), depth=1)
    with pytest.raises(ValueError, match="unexpected key 'blocks.1.0.fn.0.weight'.*depth=2"):
        keras_model(shallower, path)
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="Not a ConvMixer checkpoint"):
        keras_model(reduced("convmixer_1536_20"), str(tmp_path / "other.pth"))


def test_wrong_class_count_errors_or_loads_the_backbone(timm_ckpt):
    reference, path = timm_ckpt
    config = reduced("convmixer_1536_20")
    strict = convmixer_tf.ConvMixer(**config, classes=5)
    with pytest.raises(ValueError, match=r"'head.weight' has shape \(10, 24\).*\(5, 24\)"
                       r".*skip_head=True"):
        checkpoints.load_weights(strict, path)
    checkpoints.load_weights(strict, path, skip_head=True)  # explicit: backbone only, silently
    with pytest.warns(UserWarning, match="backbone only"):
        new_head = keras_model(config, path, classes=5)
    full = keras_model(config, path)
    for name in ("stem_conv", "block1_pointwise_bn"):
        for a, b in zip(new_head.get_layer(name).get_weights(), full.get_layer(name).get_weights()):
            np.testing.assert_array_equal(a, b)
    assert new_head.output_shape == (None, 5)


def test_include_top_false_gives_pytorch_features(timm_ckpt):
    reference, path = timm_ckpt
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no head, no warning
        backbone = keras_model(reduced("convmixer_1536_20"), path, include_top=False)
    x = normalised_images((30, 45))
    with torch.no_grad():
        features = reference.blocks(reference.stem(torch.from_numpy(x.transpose(0, 3, 1, 2))))
    np.testing.assert_allclose(
        backbone(x).numpy(), features.numpy().transpose(0, 2, 3, 1), rtol=RTOL, atol=ATOL
    )


def test_keras_file_loads_by_layer_name_into_a_backbone(tmp_path, timm_ckpt):
    _, path = timm_ckpt
    config = reduced("convmixer_1536_20")
    full = keras_model(config, path)
    full.save(tmp_path / "full.keras")
    backbone = keras_model(config, str(tmp_path / "full.keras"), include_top=False)
    np.testing.assert_array_equal(
        backbone.get_layer("block1_depthwise").get_weights()[0],
        full.get_layer("block1_depthwise").get_weights()[0],
    )
    with pytest.warns(UserWarning, match="backbone only"):
        keras_model(config, str(tmp_path / "full.keras"), classes=3)
    with pytest.raises(ValueError, match="layer 'stem_conv'"):
        convmixer_tf.ConvMixer(dim=8, depth=DEPTH, weights=str(tmp_path / "full.keras"))


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        checkpoints.load_state_dict(tmp_path / "nope.pth")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(ValueError, match="Unknown weights format"):
        convmixer_tf.ConvMixer(dim=8, depth=1, weights=str(tmp_path / "w.npz"))
    (tmp_path / "corrupt.pth").write_bytes(b"not a zip or pickle")
    with pytest.raises(ValueError, match="corrupt.pth"):
        checkpoints.load_state_dict(tmp_path / "corrupt.pth")


def test_missing_torch_says_how_to_install(tmp_path, monkeypatch):
    (tmp_path / "c.pth").write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match=r'pip install "convmixer_tf\[torch\]"'):
        checkpoints.load_state_dict(tmp_path / "c.pth")


def test_cli_writes_keras_and_weights_atomically(tmp_path, timm_ckpt, capsys):
    reference, path = timm_ckpt
    out = str(tmp_path / "model.keras")
    args = [path, out, "--no-include-preprocessing", "--classifier-activation", "none"]
    assert cli.convert_main(args) == 0
    assert "dim=24 depth=2 kernel_size=9 patch_size=7 activation=gelu classes=10" in (
        capsys.readouterr().out
    )
    import keras

    model = keras.saving.load_model(out)
    x = normalised_images((30, 45))
    np.testing.assert_allclose(model(x).numpy(), torch_logits(reference, x), rtol=RTOL, atol=ATOL)

    before = open(out, "rb").read()
    assert cli.convert_main(args) == 2  # never overwrites silently
    assert "--overwrite" in capsys.readouterr().err
    assert open(out, "rb").read() == before
    assert cli.convert_main(args + ["--overwrite"]) == 0

    h5 = str(tmp_path / "model.weights.h5")
    assert cli.convert_main([path, h5, "--no-include-preprocessing"]) == 0
    again = convmixer_tf.ConvMixer(**reduced("convmixer_1536_20"), classes=CLASSES, weights=h5,
                                   include_preprocessing=False, classifier_activation=None)
    np.testing.assert_allclose(again(x).numpy(), model(x).numpy(), rtol=1e-6, atol=1e-6)

    assert cli.convert_main([path, str(tmp_path / "model.h5")]) == 2
    assert cli.convert_main([str(tmp_path / "missing.pth"), out, "--overwrite"]) == 2
    assert sorted(os.listdir(tmp_path)) == ["model.keras", "model.weights.h5"]  # no temp files


@pytest.mark.large
@pytest.mark.parametrize("variant", ["convmixer_1536_20", "convmixer_768_32",
                                     "convmixer_1024_20_ks9_p14"])
def test_full_size_variant_at_224(variant, tmp_path):
    config = presets.MODEL_CONFIGS[variant]
    reference = torch_model(config, "timm", classes=1000)
    path = save_checkpoint(reference, tmp_path / "full.pth.tar")
    builder = {"convmixer_1536_20": convmixer_tf.ConvMixer1536_20,
               "convmixer_768_32": convmixer_tf.ConvMixer768_32,
               "convmixer_1024_20_ks9_p14": convmixer_tf.ConvMixer1024_20}[variant]
    model = builder(weights=path, include_preprocessing=False, classifier_activation=None)
    x = normalised_images((224, 224))[:1]
    np.testing.assert_allclose(model(x).numpy(), torch_logits(reference, x), rtol=RTOL, atol=1e-4)


def test_head_that_does_not_fit_its_own_width_is_an_error_unless_no_top(tmp_path, timm_ckpt,
                                                                        capsys):
    reference, _ = timm_ckpt
    state = reference.state_dict()
    state["head.weight"] = torch.zeros(CLASSES, DIM + 8)  # in_features 32, the model's dim 24
    path = str(tmp_path / "bad_head.pth")
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"'head.weight' has shape \(10, 32\).*--no-top"):
        model_lib.build_from_checkpoint(path)
    out = str(tmp_path / "m.keras")
    assert cli.convert_main([path, out]) == 2
    assert "head.weight" in capsys.readouterr().err and not os.path.exists(out)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "random head" warning
        assert cli.convert_main([path, out, "--no-top"]) == 0
    import keras

    backbone = keras.saving.load_model(out)
    assert backbone.output_shape == (None, None, None, DIM)
    assert "predictions" not in [layer.name for layer in backbone.layers]
    # Asking for another class count still gives a new head on the loaded backbone.
    with pytest.warns(UserWarning, match="backbone only"):
        assert model_lib.build_from_checkpoint(path, classes=3).output_shape == (None, 3)


def test_non_torch_files_say_what_they_are(tmp_path, timm_ckpt, capsys):
    _, good = timm_ckpt
    np.save(tmp_path / "array.npy", np.zeros(3))
    os.replace(tmp_path / "array.npy", tmp_path / "array.pth")
    (tmp_path / "random.pth").write_bytes(np.random.default_rng(0).bytes(1000))
    (tmp_path / "text.pth").write_text("hello\n" * 20)
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "truncated.pth").write_bytes(open(good, "rb").read()[:300])
    import zipfile

    with zipfile.ZipFile(tmp_path / "other.pth", "w") as archive:
        archive.writestr("config.json", "{}")
    cases = {"array.pth": "a NumPy .npy array", "random.pth": "neither",
             "text.pth": "neither", "empty.pth": "empty", "truncated.pth": "neither",
             "other.pth": "zip archive without the data.pkl"}
    for name, kind in cases.items():
        for trust in (False, True):
            with pytest.raises(ValueError, match="is not a PyTorch checkpoint") as error:
                checkpoints.load_state_dict(tmp_path / name, trust_checkpoint=trust)
            assert kind in str(error.value) and name in str(error.value)
        argv = [str(tmp_path / name), str(tmp_path / "o.keras"), "--trust-checkpoint"]
        assert cli.convert_main(argv) == 2
        assert "is not a PyTorch checkpoint" in capsys.readouterr().err
    # A pickle that torch cannot load even when trusted: a clear error, not UnpicklingError.
    (tmp_path / "damaged.pth").write_bytes(b"\x80\x02garbage that is not a pickle")
    with pytest.raises(ValueError, match="even with --trust-checkpoint"):
        checkpoints.load_state_dict(tmp_path / "damaged.pth", trust_checkpoint=True)


def test_convert_config_names_a_bad_choice():
    from convmixer_tf.checkpoints import ConvertConfig

    with pytest.raises(ValueError, match=r"activation must be one of .*Received activation='tanh'"):
        ConvertConfig(activation="tanh")
    with pytest.raises(ValueError, match="classifier_activation must be one of"):
        ConvertConfig(classifier_activation="sigmoid")
