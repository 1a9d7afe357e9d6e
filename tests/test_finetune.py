"""Fine-tuning from a weights file: the architecture read from each format without a model,
the head replaced for other classes, the source's normalisation kept, a linear probe that
leaves every backbone weight bit-identical, head-first-then-all, and exact resume in either
phase."""

import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

from convmixer_tf import artifacts, checkpoints, fast_layers, model as model_lib
from convmixer_tf.training import callbacks as callbacks_lib, finetune

SOURCE = dict(dim=8, depth=2, kernel_size=3, patch_size=2)
SIZE = 16


def convmixer(classes, seed=0, **kwargs):
    keras.utils.set_random_seed(seed)
    return model_lib.ConvMixer(**SOURCE, input_shape=(SIZE, SIZE, 3), classes=classes,
                               classifier_activation=None, name="tiny", **kwargs)


def with_bn_stats(model, seed=0):
    """Non-trivial BatchNorm statistics, as a trained source has."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([gamma * 1.5, beta + 0.1, mean + rng.normal(0, 0.3, mean.shape),
                               var * rng.uniform(0.5, 2, var.shape)])
    return model


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A 5-class source model as convmixer-train leaves it: .keras with its metadata, and the
    same weights as .weights.h5."""
    folder = tmp_path_factory.mktemp("source")
    model = with_bn_stats(convmixer(5, seed=1))
    path = artifacts.save_model(model, folder / "source.keras")
    artifacts.write_metadata(path, artifacts.Metadata([str(i) for i in range(5)], (SIZE, SIZE)))
    artifacts.save_model(model, folder / "source.weights.h5")
    return model, folder


def backbone_weights(model):
    return {layer.name: [np.array(w) for w in layer.get_weights()]
            for layer in model.layers if layer.weights and layer.name != finetune.HEAD}


def assert_same_backbone(a, b):
    a, b = backbone_weights(a), backbone_weights(b)
    assert a.keys() == b.keys()
    for name in a:
        assert all(np.array_equal(x, y) for x, y in zip(a[name], b[name], strict=True)), name


def test_keras_and_h5_architecture_without_a_model(source):
    _, folder = source
    arch = finetune.source_architecture(folder / "source.keras")
    assert {k: arch[k] for k in finetune.SHAPE_FIELDS} == SOURCE
    assert arch["num_classes"] == 5 and arch["activation"] == "gelu"
    assert arch["class_names"] == ["0", "1", "2", "3", "4"]
    assert arch["normalisation"]["offset"][0] == pytest.approx(-0.485 / 0.229)
    h5 = finetune.source_architecture(folder / "source.weights.h5")
    assert {k: h5[k] for k in finetune.SHAPE_FIELDS} == SOURCE
    assert h5["num_classes"] == 5 and h5["activation"] is None and h5["normalisation"] is None


def test_bad_weights_files_are_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="--weights file not found"):
        finetune.source_architecture(tmp_path / "missing.keras")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"--weights must be a \.keras, \.weights\.h5 or PyTorch"):
        finetune.source_architecture(tmp_path / "notes.txt")
    (tmp_path / "broken.keras").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(ValueError, match="not a .keras model file"):
        finetune.source_architecture(tmp_path / "broken.keras")
    other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    other.save(tmp_path / "other.keras")
    with pytest.raises(ValueError, match="not a ConvMixer of this package.*stem_conv"):
        finetune.source_architecture(tmp_path / "other.keras")


@pytest.mark.parametrize("fmt", ["keras", "weights.h5"])
def test_other_classes_replace_the_head_and_say_so(source, fmt, caplog):
    model, folder = source
    path = str(folder / f"source.{fmt}")
    target = convmixer(3, seed=7)
    fresh_head = [w.copy() for w in target.get_layer("predictions").get_weights()]
    with caplog.at_level(logging.INFO, logger="convmixer_tf.training.finetune"):
        target = finetune.load_pretrained(target, path)
    assert "Replaced the head" in caplog.text and "5 classes, this run 3" in caplog.text
    assert_same_backbone(target, model)
    for fresh, got in zip(fresh_head, target.get_layer("predictions").get_weights()):
        np.testing.assert_array_equal(fresh, got)  # its own initialisation, not the file's


def test_same_classes_keep_the_head_other_names_replace_it(source, caplog):
    model, folder = source
    path = str(folder / "source.keras")
    same = finetune.load_pretrained(convmixer(5, seed=7), path, class_names=list("01234"))
    np.testing.assert_array_equal(same.get_layer("predictions").get_weights()[0],
                                  model.get_layer("predictions").get_weights()[0])
    with caplog.at_level(logging.INFO, logger="convmixer_tf.training.finetune"):
        other = finetune.load_pretrained(convmixer(5, seed=7), path, class_names=list("56789"))
    assert "Replaced the head" in caplog.text
    assert not np.array_equal(other.get_layer("predictions").get_weights()[0],
                              model.get_layer("predictions").get_weights()[0])
    assert_same_backbone(other, model)


def test_the_sources_normalisation_is_kept(tmp_path):
    source = convmixer(5)

    def clone(layer):
        config = layer.get_config()
        if layer.name == "preprocessing":
            config.update(scale=1 / 127.5, offset=-1.0)  # [-1, 1] inputs
        return layer.__class__.from_config(config)

    odd = keras.models.clone_model(source, clone_function=clone)
    odd.set_weights(source.get_weights())
    path = artifacts.save_model(odd, tmp_path / "odd.keras")
    tuned = finetune.load_pretrained(convmixer(3), path)
    assert tuned.get_layer("preprocessing").get_config()["scale"] == pytest.approx(1 / 127.5)
    images = np.random.default_rng(0).integers(0, 256, (2, SIZE, SIZE, 3)).astype("float32")
    features = keras.Model(tuned.inputs, tuned.get_layer("block1_pointwise_bn").output)
    expected = keras.Model(odd.inputs, odd.get_layer("block1_pointwise_bn").output)
    np.testing.assert_allclose(features(images), expected(images), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["official", "timm"])
def test_pytorch_checkpoint_in_either_layout(tmp_path, layout, caplog):
    torch = pytest.importorskip("torch")
    from benchmarks import reference_torch as rt

    torch.manual_seed(0)
    reference = rt.randomize_batchnorm(rt.ConvMixer(**SOURCE, num_classes=6, layout=layout))
    path = str(tmp_path / f"{layout}.pth")
    torch.save({"state_dict": reference.state_dict(), "epoch": 3}, path)
    arch = finetune.source_architecture(path)
    assert {k: arch[k] for k in finetune.SHAPE_FIELDS} == SOURCE
    assert arch["num_classes"] == 6 and arch["format"] == layout
    with caplog.at_level(logging.INFO, logger="convmixer_tf.training.finetune"):
        tuned = finetune.load_pretrained(convmixer(4), path, arch)
    assert "6 classes, this run 4" in caplog.text
    expected = checkpoints.keras_weights_from_state_dict(
        checkpoints.load_state_dict(path), tuned, skip_head=True)
    assert set(expected) == set(backbone_weights(tuned))
    for name, arrays in expected.items():
        for want, got in zip(arrays, tuned.get_layer(name).get_weights(), strict=True):
            np.testing.assert_array_equal(want, got)


def test_accelerate_keeps_trainable():
    model = convmixer(3)
    finetune.set_backbone_trainable(model, False)
    fast = fast_layers.accelerate(model)
    assert [(layer.name, layer.trainable) for layer in fast.layers if layer.weights] == \
        [(layer.name, layer.trainable) for layer in model.layers if layer.weights]
    assert {v.path.split("/")[0] for v in fast.trainable_variables} == {"predictions"}


# === Training: fixed batches, one device ===

def batches(classes=3, count=48, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (count, SIZE, SIZE, 3)).astype("float32")
    labels = keras.utils.to_categorical(rng.integers(0, classes, count), classes)
    return tf.data.Dataset.from_tensor_slices((images, labels)).batch(16)


def compiled(source_dir, accelerate=True):
    """A 3-class fine-tune of the source, compiled as the trainer compiles (AdamW with weight
    decay on every weight, float32) with the optimizer built on every weight."""
    model = finetune.load_pretrained(convmixer(3, seed=3), source_dir / "source.keras")
    if accelerate:
        model = fast_layers.accelerate(model)
    model.compile(optimizer=keras.optimizers.AdamW(0.01, weight_decay=0.1),
                  loss=keras.losses.CategoricalCrossentropy(from_logits=True),
                  jit_compile=False)
    finetune.build_optimizer(model, model)
    return model


class BackboneAtEpochEnd(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seen = []

    def on_epoch_end(self, epoch, logs=None):
        self.seen.append(backbone_weights(self.model))


def changed(a, b):
    return any(not np.array_equal(x, y) for k in a for x, y in zip(a[k], b[k]))


def test_linear_probe_leaves_every_backbone_weight_bit_identical(source):
    _, folder = source
    model = compiled(folder)
    before = backbone_weights(model)
    head = [w.copy() for w in model.get_layer("predictions").get_weights()]
    finetune.set_backbone_trainable(model, False)
    model.fit(batches(), epochs=2, verbose=0, shuffle=False)
    assert not changed(before, backbone_weights(model))  # kernels, BN gamma/beta AND stats
    assert not np.array_equal(head[0], model.get_layer("predictions").get_weights()[0])


def test_head_first_then_everything(source):
    _, folder = source
    model = compiled(folder)
    before = backbone_weights(model)
    finetune.set_backbone_trainable(model, False)
    seen = BackboneAtEpochEnd()
    model.fit(batches(), epochs=3, verbose=0, shuffle=False,
              callbacks=[finetune.UnfreezeBackbone(model, 1), seen])
    assert not changed(before, seen.seen[0])  # epoch 1: the head alone
    assert changed(seen.seen[0], seen.seen[1]) and changed(seen.seen[1], seen.seen[2])
    assert all(layer.trainable for layer in model.layers)


@pytest.mark.parametrize("stop_after", [
    pytest.param(1, id="resume-in-head-phase", marks=pytest.mark.large),  # the simpler phase
    pytest.param(3, id="resume-after-unfreezing"),
])
def test_resume_is_exact_in_either_phase(source, tmp_path, stop_after):
    """Head alone for 2 epochs, then everything, 4 in all: stopped after `stop_after` epochs
    and resumed from the backup by new objects (as a rerun would), the weights and the
    optimizer state equal an uninterrupted run's bit for bit."""
    _, folder = source

    def run(epochs, backup_dir):
        model = compiled(folder)
        finetune.set_backbone_trainable(model, False)
        backup = callbacks_lib.AtomicBackupAndRestore(str(backup_dir), delete_checkpoint=False)
        model.fit(batches(), epochs=epochs, verbose=0, shuffle=False,
                  callbacks=[finetune.UnfreezeBackbone(model, 2), backup])
        return model

    clean = run(4, tmp_path / "clean")
    run(stop_after, tmp_path / "resumed")
    resumed = run(4, tmp_path / "resumed")
    for a, b in zip(clean.weights, resumed.weights, strict=True):
        assert np.array_equal(a, b), a.path
    assert int(resumed.optimizer.iterations) == int(clean.optimizer.iterations) == 12
    for a, b in zip(clean.optimizer.variables, resumed.optimizer.variables, strict=True):
        assert np.array_equal(a, b), a.path


# === The training job: convmixer-train --weights ===

def tiny_config(tmp_path, **values):
    from convmixer_tf.training.config import TrainConfig

    values = dict(dict(dataset="digits", image_size=SIZE, epochs=2, steps_per_epoch=3,
                       batch_size=16, xla="off", verbose="0", output_dir=str(tmp_path / "models"),
                       run_dir=str(tmp_path / "runs"), name="tuned", augment=dict(hflip=0.0)),
                  **values)
    return TrainConfig.create(preset="finetune", **values)


def test_conflicting_flags_are_one_line_errors_naming_both(source, tmp_path, capsys):
    from convmixer_tf import cli

    _, folder = source
    weights = str(folder / "source.keras")
    for flags, message in (
            (["--dim", "64"], "--dim 64 conflicts with --weights .*, which holds dim=8: drop "
                              "--dim"),
            (["--dim", "128"], "--dim 128 conflicts"),  # a flag given at its default value
            (["--variant", "convmixer_256_8_ks5_p2"], "--variant convmixer_256_8_ks5_p2 "
                                                      "conflicts.*drop --variant"),
            (["--activation", "relu"], "--activation relu conflicts.*activation=gelu")):
        code = cli.train_main(["--weights", weights, *flags, "--output-dir", str(tmp_path),
                               "--run-dir", str(tmp_path / "runs"), "--no-export"])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
        assert __import__("re").search(message, err), err
    assert not (tmp_path / "runs").exists()  # refused before any work


def test_resolve_takes_the_files_architecture_and_pins_its_sha256(source, tmp_path):
    _, folder = source
    config = finetune.resolve(tiny_config(tmp_path, weights=str(folder / "source.keras")))
    assert (config.dim, config.depth, config.kernel_size, config.patch_size) == (8, 2, 3, 2)
    assert config.weights_sha256 == finetune.file_sha256(folder / "source.keras")
    assert finetune.resolve(config) == config  # idempotent (train() resolves again)
    with pytest.raises(ValueError, match="has sha256 .* not the --weights-sha256 abc"):
        finetune.resolve(tiny_config(tmp_path, weights=str(folder / "source.keras"),
                                     weights_sha256="abc"))
    with pytest.raises(ValueError, match="pass --weights FILE too"):
        tiny_config(tmp_path, freeze_backbone=True)


def test_fine_tune_records_its_source_and_refuses_another(source, tmp_path):
    import json

    from convmixer_tf.training.train import train

    model, folder = source
    config = tiny_config(tmp_path, weights=str(folder / "source.keras"), freeze_backbone=True)
    result = train(config)
    meta = json.loads(open(artifacts.metadata_path(result["model_path"])).read())
    assert meta["source_weights"] == dict(path=str(folder / "source.keras"),
                                          sha256=finetune.file_sha256(folder / "source.keras"))
    assert meta["class_names"] == [str(i) for i in range(10)]
    tuned = artifacts.load_model(result["model_path"])
    assert_same_backbone(tuned, model)  # a linear probe through train(), fast layers and all
    other = folder / "other.keras"
    artifacts.save_model(with_bn_stats(convmixer(5, seed=9)), other, overwrite=True)
    with pytest.raises(ValueError, match="weights_sha256 '[0-9a-f]+' -> '[0-9a-f]+'"):
        train(tiny_config(tmp_path, weights=str(other), freeze_backbone=True))


@pytest.mark.large
@pytest.mark.parametrize("stop_after", [1, 2], ids=["head-phase", "after-unfreezing"])
def test_a_stopped_fine_tune_resumes_exactly(source, tmp_path, monkeypatch, stop_after):
    """train() stopped after `stop_after` of 3 epochs (head alone for the first 1), rerun:
    bit-identical to an uninterrupted run."""
    from convmixer_tf.training import callbacks
    from convmixer_tf.training.train import train

    _, folder = source
    values = dict(weights=str(folder / "source.keras"), epochs=3, freeze_backbone_epochs=1)
    clean = train(tiny_config(tmp_path / "clean", **values))

    class Stopped(Exception):
        pass

    class Stop(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch + 1 == stop_after:
                raise Stopped  # after the backup of this epoch (the callbacks before it)

    make = callbacks.make_callbacks
    monkeypatch.setattr(callbacks, "make_callbacks", lambda *a, **k: make(*a, **k) + [Stop()])
    with pytest.raises(Stopped):
        train(tiny_config(tmp_path / "resumed", **values))
    monkeypatch.setattr(callbacks, "make_callbacks", make)
    resumed = train(tiny_config(tmp_path / "resumed", **values))
    assert len(resumed["history"].history["loss"]) == 3 - stop_after
    for a, b in zip(artifacts.load_model(clean["model_path"]).weights,
                    artifacts.load_model(resumed["model_path"]).weights, strict=True):
        assert np.array_equal(a, b), a.path


@pytest.mark.large
@pytest.mark.parametrize("flags", [
    ["--strategy", "mirrored", "--precision", "mixed_bfloat16"],
    ["--precision", "mixed_float16"],
], ids=["mirrored-bfloat16", "float16"])
def test_fine_tune_command_under_each_strategy_and_precision(source, tmp_path, flags):
    """Head alone for 1 epoch then everything (the train function rebuilt), through the
    command; the saved model loads and its head has the data set's 10 classes."""
    import subprocess
    import sys

    from helpers import subprocess_env

    _, folder = source
    argv = [sys.executable, "-c", "import sys; from convmixer_tf import cli; "
            "sys.exit(cli.train_main(sys.argv[1:]))", "--weights", str(folder / "source.keras"),
            "--preset", "finetune", "--image-size", str(SIZE), "--epochs", "2",
            "--steps-per-epoch", "2", "--batch-size", "16", "--freeze-backbone-epochs", "1",
            "--hflip", "0", "--no-export", "--verbose", "0", "--name", "tuned",
            "--output-dir", str(tmp_path / "models"), "--run-dir", str(tmp_path / "runs"),
            *flags]
    proc = subprocess.run(argv, env=subprocess_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Replaced the head" in proc.stdout and "the backbone trains from now on" in proc.stdout
    tuned = artifacts.load_model(tmp_path / "models" / "tuned.keras")
    assert tuned.output_shape == (None, 10)
