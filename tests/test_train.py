import json
import zipfile

import keras
import numpy as np
import pytest

from convmixer_tf import cli
from convmixer_tf.training import data, schedules
from convmixer_tf.training.config import TrainConfig
from convmixer_tf.training.train import train


def test_digits_ship_offline_as_uint8_rgb():
    (x_train, y_train), (x_test, y_test) = data.load_digits(image_size=24)
    assert x_train.dtype == np.uint8 and x_train.shape[1:] == (24, 24, 3)
    assert len(x_train) + len(x_test) == 1797 and set(np.unique(y_test)) == set(range(10))
    assert x_train.max() > 200


def test_one_cycle_schedule_points():
    lr = schedules.OneCycle(max_lr=1.0, total_steps=100)
    values = [float(lr(s)) for s in (0, 20, 40, 60, 80, 90, 100)]
    np.testing.assert_allclose(values, [0, 0.5, 1.0, 0.525, 0.05, 0.025, 0], atol=1e-6)
    again = schedules.OneCycle.from_config(lr.get_config())
    assert float(again(30)) == pytest.approx(float(lr(30)))


def test_short_training_run_learns(tmp_path):
    config = TrainConfig(
        image_size=16, dim=32, depth=2, epochs=4, batch_size=32, max_lr=0.01,
        output_dir=str(tmp_path), run_dir=str(tmp_path / "runs"), verbose=0,
    )
    result = train(config)
    losses = result["history"].history["loss"]
    assert losses[-1] < 0.7 * losses[0]
    assert result["test_accuracy"] > 0.8
    loaded = keras.saving.load_model(result["model_path"])
    with zipfile.ZipFile(result["model_path"]) as archive:
        saved = json.loads(archive.read("config.json"))
    assert "compile_config" not in saved or not saved["compile_config"]
    stock = {"InputLayer", "Rescaling", "Conv2D", "Activation", "BatchNormalization",
             "DepthwiseConv2D", "Add", "GlobalAveragePooling2D", "Dense"}
    assert {layer["class_name"] for layer in saved["config"]["layers"]} <= stock
    (_, _), (x_test, _) = data.load_digits(16)
    np.testing.assert_allclose(
        loaded.predict(x_test[:8], verbose=0), result["model"].predict(x_test[:8], verbose=0),
        rtol=1e-4, atol=1e-4,
    )


def test_cli_help_and_bad_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.train_main(["--help"])
    assert exit_info.value.code == 0
    assert "--epochs" in capsys.readouterr().out
    for argv in (["--epochs", "zero"], ["--precision", "float8"], ["--no-such-flag"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.train_main(argv)
        assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        cli.train_main(["--epochs", "0"])
    assert "epochs must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # at parse time, before any work
        cli.train_main(["--variant", "convmixer_9_9", "--output-dir", "/nonexistent"])
    assert exit_info.value.code == 2 and "Unknown variant" in capsys.readouterr().err
    # Every flag has a description (from the config's comments) and shows its default.
    with pytest.raises(SystemExit):
        cli.train_main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--dim DIM width h" in help_text and "(default: 128)" in help_text
    assert "--randaug-n RANDAUG_N RandAugment: ops per image" in help_text
