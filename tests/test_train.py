import csv
import dataclasses
import json
import os
import shutil
import zipfile

import keras
import numpy as np
import pytest

from convmixer_tf import artifacts, cli, errors
from convmixer_tf.training import schedules, train as train_lib
from convmixer_tf.training.data import sources
from convmixer_tf.training.config import TrainConfig
from convmixer_tf.training.train import train


def test_digits_ship_offline_as_uint8_rgb():
    (x_train, y_train), (x_test, y_test) = sources.load_digits(image_size=24)
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
    (_, _), (x_test, _) = sources.load_digits(16)
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
    # Every flag has a description (its field's metadata["help"]) and shows its default.
    with pytest.raises(SystemExit):
        cli.train_main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--dim DIM width h" in help_text and "(default: 128)" in help_text
    assert "--randaug-n RANDAUG_N RandAugment: ops per image" in help_text


def _tiny_config(tmp_path, **values):
    values = {"image_size": 16, "dim": 8, "depth": 1, "kernel_size": 3, "epochs": 1,
              "steps_per_epoch": 2, "batch_size": 32, "verbose": 0,
              "output_dir": str(tmp_path / "models"), "run_dir": str(tmp_path / "runs"),
              **values}
    return TrainConfig(**values)


def test_unwritable_output_locations_fail_before_training(tmp_path, capsys):
    """--output-dir / --run-dir that are files, under a file or read-only: a message naming
    the flag, before any step (no run folder appears)."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        (dict(output_dir=str(a_file)), "--output-dir", "is a file"),
        (dict(run_dir=str(a_file / "runs")), "--run-dir", "cannot be created"),
        (dict(output_dir=str(a_file / "deeper" / "models")), "--output-dir", "is a file"),
    ]
    # Permission bits stop normal users only; root writes anyway (and is then not refused:
    # the test write succeeds), so this case runs for normal users.
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    if not os.access(read_only, os.W_OK):
        cases.append((dict(run_dir=str(read_only)), "--run-dir", "not writable"))
    for values, flag, message in cases:
        config = _tiny_config(tmp_path, **values)
        with pytest.raises(ValueError, match=message) as error:
            train(config)
        assert flag in str(error.value) and "pass " + flag in str(error.value)
        assert not os.path.exists(os.path.join(config.run_dir, config.name))
    read_only.chmod(0o755)
    assert cli.train_main(["--output-dir", str(a_file), "--no-export"]) == 2
    assert "--output-dir" in capsys.readouterr().err


def test_failed_final_save_keeps_backup_and_says_where_the_weights_are(tmp_path, monkeypatch):
    config = _tiny_config(tmp_path, epochs=2)
    final = os.path.join(config.output_dir, config.name + ".keras")
    original = train_lib.save_trained_model

    def disk_full_at_the_end(model, path):
        if path == final:
            raise OSError(28, "No space left on device")
        return original(model, path)

    monkeypatch.setattr(train_lib, "save_trained_model", disk_full_at_the_end)
    with pytest.raises(errors.FinalSaveError) as error:
        train(config)
    run_dir = os.path.join(config.run_dir, config.name)
    last = os.path.join(run_dir, "checkpoints", "last.keras")
    assert last in str(error.value) and os.path.join(run_dir, "backup") in str(error.value)
    with open(os.path.join(run_dir, "backup", "training_metadata.json")) as f:
        assert json.load(f)["epoch"] == 2  # the finished run's state is still there
    assert keras.saving.load_model(last).output_shape == (None, 10)
    # Fixed: the same command resumes after the last epoch, saves, then drops the backup.
    monkeypatch.setattr(train_lib, "save_trained_model", original)
    result = train(config)
    assert result["history"].epoch == [] and os.path.exists(final)
    assert not os.path.exists(os.path.join(run_dir, "backup"))


def test_a_run_name_holds_one_run(tmp_path):
    """Before any work (`preflight`): same --name with another architecture or data set is
    refused naming the fields, or starts afresh with overwrite; the same identity goes on;
    the output model of another run is never replaced silently."""
    first = _tiny_config(tmp_path)
    run_dir = tmp_path / "runs" / first.name
    assert train_lib.preflight(first) == str(run_dir)
    record = json.loads((run_dir / "run_config.json").read_text())
    assert record["identity"]["dim"] == 8 and record["config"]["epochs"] == 1
    (run_dir / "history.csv").write_text("epoch,loss\n0,1.0\n")  # the run's files
    with pytest.raises(ValueError, match=r"dim 8 -> 16.*--overwrite"):
        train_lib.preflight(_tiny_config(tmp_path, dim=16))
    with pytest.raises(ValueError, match=r"dataset 'digits' -> './elsewhere'"):
        train_lib.preflight(_tiny_config(tmp_path, dataset="./elsewhere", name=first.name))
    with pytest.raises(ValueError, match=r"depth 1 -> 20.*patch_size 2 -> 7"):
        train_lib.preflight(_tiny_config(tmp_path, variant="convmixer_1536_20"))
    train_lib.preflight(_tiny_config(tmp_path, seed=3, epochs=5))  # same identity: goes on
    assert (run_dir / "history.csv").exists()
    train_lib.preflight(_tiny_config(tmp_path, dim=16, overwrite=True))  # afresh
    assert not (run_dir / "history.csv").exists()
    assert json.loads((run_dir / "run_config.json").read_text())["identity"]["dim"] == 16
    # A folder of files without a record (an older version's run) is not adopted.
    (run_dir / "run_config.json").unlink()
    (run_dir / "history.csv").write_text("epoch,loss\n")
    with pytest.raises(ValueError, match="no run_config.json"):
        train_lib.preflight(_tiny_config(tmp_path, dim=16))
    # The output model of another run (its metadata says which) is refused, run folder or not.
    shutil.rmtree(run_dir)
    model_path = tmp_path / "models" / (first.name + ".keras")
    model_path.write_bytes(b"a model")
    artifacts.write_metadata(str(model_path), artifacts.Metadata(
        ["0"], (16, 16), config=dataclasses.asdict(_tiny_config(tmp_path, dim=32))))
    with pytest.raises(ValueError, match=r"is the model of another run: dim 32 -> 8"):
        train_lib.preflight(first)
    assert not run_dir.exists() and model_path.read_bytes() == b"a model"
    train_lib.preflight(_tiny_config(tmp_path, dim=32))  # its own run may replace it
    os.remove(artifacts.metadata_path(str(model_path)))
    with pytest.raises(ValueError, match="no training metadata"):
        train_lib.preflight(first)


@pytest.mark.large
def test_rerun_with_another_architecture_end_to_end(tmp_path):
    """The same through `train`: refused, then overwrite gives best/last of the new run only."""
    first = _tiny_config(tmp_path)
    train(first)
    run_dir = tmp_path / "runs" / first.name
    model_path = tmp_path / "models" / (first.name + ".keras")
    before = model_path.read_bytes()
    with pytest.raises(ValueError, match=r"dim 8 -> 16.*--overwrite"):
        train(_tiny_config(tmp_path, dim=16))
    assert model_path.read_bytes() == before
    train(_tiny_config(tmp_path, dim=16, overwrite=True))
    for name in ("best.keras", "last.keras"):
        model = keras.saving.load_model(run_dir / "checkpoints" / name)
        assert model.get_layer("stem_conv").filters == 16
    assert _history_epochs(run_dir / "history.csv") == [0]
    assert keras.saving.load_model(model_path).get_layer("stem_conv").filters == 16


def _history_epochs(path):
    with open(path) as f:
        return [int(row[0]) for row in list(csv.reader(f))[1:]]


def test_train_command_exports_through_the_library_and_passes_exit_3_on(tmp_path, capsys,
                                                                        monkeypatch):
    """`convmixer-train` hands its file set to `deploy.export.export_model` (the wings never
    import each other; the CLI wires them) and returns the export's status: 3 when the gate
    refuses a build, with every other file written."""
    from convmixer_tf.deploy import export, gate, tflite

    calls = []
    real_export, real_gate = export.export_model, gate.gate

    def float32_only(model_path, **kwargs):  # the real export, fewer builds (time)
        calls.append(model_path)
        return real_export(model_path, tflite_modes=("float32",), **kwargs)

    monkeypatch.setattr(export, "export_model", float32_only)
    monkeypatch.setattr(gate, "gate", lambda report, *a, **k: "refused by the test"
                        if report["input"][0] is None else real_gate(report, *a, **k))
    out = tmp_path / "models"
    code = cli.train_main(["--image-size", "16", "--dim", "8", "--depth", "1",
                           "--kernel-size", "3", "--epochs", "1", "--steps-per-epoch", "2",
                           "--batch-size", "32", "--verbose", "0", "--output-dir", str(out),
                           "--run-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == cli.EXIT_PARTIAL
    assert calls == [str(out / "convmixer_digits.keras")]
    assert "convmixer-train: refused TFLite build float32_dynamic: refused by the test" in err
    assert (out / "convmixer_digits" / "1" / "saved_model.pb").is_file()
    assert sorted(os.listdir(out / "convmixer_digits_tflite" / "1")) == [
        "convmixer_digits_float32.tflite", "metadata.json"]
    assert (out / "convmixer_digits.export.log").is_file()
