"""Console entry points: what a user sees on stderr besides our own lines."""

import subprocess
import sys

import pytest

from convmixer_tf import cli

from helpers import subprocess_env


@pytest.mark.skipif(cli._has_nvidia_driver(), reason="the noise is that of a machine without GPU")
def test_cpu_machine_start_is_quiet_and_unprepared_tfds_has_one_error(tmp_path, tiny_model):
    """No "cuInit" error, no pre-absl info lines, no tfds warning about a missing folder: only
    our error saying the data set is not prepared."""
    model = tiny_model(classifier_activation="softmax")
    model.save(tmp_path / "m.keras")
    env = subprocess_env()
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # as a user's shell
    argv = [sys.executable, "-c", "import sys; from convmixer_tf import cli; "
            "sys.exit(cli.evaluate_main(sys.argv[1:]))", str(tmp_path / "m.keras"),
            "--dataset", "cifar10", "--data-dir", str(tmp_path / "tfds")]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "'cifar10' is not prepared" in proc.stderr
    for noise in ("cuInit", "cuda drivers", "absl::InitializeLog", "I0000", "dataset_info.json"):
        assert noise not in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr  # the one line of our error


def test_startup_filter_keeps_other_lines():
    noise = ["E0000 00:00:1.2 123 cuda_platform.cc:52] failed call to cuInit: INTERNAL",
             "I0000 00:00:1.2 123 cudart_stub.cc:31] Could not find cuda drivers",
             "WARNING: All log messages before absl::InitializeLog() is called are written"]
    kept = ["E0000 00:00:1.2 123 some_kernel.cc:1] a real error", "Traceback (most recent"]
    assert all(cli._STARTUP_NOISE.match(line) for line in noise)
    assert not any(cli._STARTUP_NOISE.match(line) for line in kept)


@pytest.mark.parametrize("command", ["train", "export", "convert", "evaluate", "predict"])
def test_every_flag_has_a_description_and_shows_its_default(command, capsys):
    main = getattr(cli, f"{command}_main")
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    if command == "train":
        parser = cli._train_parser()
        flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
        assert len(flags) > 40
        for action in flags:
            assert action.help and action.help.strip(), action.option_strings
        assert "--cluster-timeout" in text and "--overwrite" in text
    blocks = text.split("\n  -")[1:]  # one block per option
    for block in blocks:
        if block.startswith("h, --help"):
            continue
        assert len(block.split()) > 2, block  # the flag and a description
    if command == "train":
        assert " ".join(text.split()).count("(default:") >= len(flags) - 1


# ---------------------------------------------------------------------------- help from metadata


def test_every_config_field_has_help_text_and_help_needs_no_source(monkeypatch, capsys):
    """`--help` reads each field's metadata["help"] (knobs.knob), not the source file."""
    import dataclasses
    import inspect

    from convmixer_tf.training.config import AugmentConfig, TrainConfig

    for cls in (AugmentConfig, TrainConfig):
        for field in dataclasses.fields(cls):
            assert field.metadata.get("help", "").strip(), f"{cls.__name__}.{field.name}"

    def no_source(*args, **kwargs):
        raise OSError("could not get source code")

    monkeypatch.setattr(inspect, "getsource", no_source)
    with pytest.raises(SystemExit) as exit_info:
        cli.train_main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--dim DIM width h: small enough for 2 CPU cores, wide enough for >97% on digits" in text
    assert "--mix-switch-prob MIX_SWITCH_PROB with both on: probability of cutmix" in text


# ---------------------------------------------------------------------------- train flags

TRAIN_FLAG_VALUES = dict(  # a valid value other than the default, for the str fields
    dataset="cifar10", data_dir="/tmp/tfds", cache="memory", data_service="grpc://host:5050",
    variant="convmixer_768_32", activation="relu", precision="mixed_bfloat16",
    output_dir="out", name="mine", verbose="2", strategy="mirrored", xla="on", run_dir="r",
    erase_mode="mean", weights="pretrained.keras", weights_sha256="0" * 64)
# Flags that are valid only with another: given with it (which is then left out of the check).
TRAIN_FLAG_NEEDS = dict(freeze_backbone=["--weights", "pretrained.keras"],
                        freeze_backbone_epochs=["--weights", "pretrained.keras"],
                        weights_sha256=["--weights", "pretrained.keras"])


def _other_value(field):
    default = field.default
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        return default + 1
    if isinstance(default, float):
        return 2.0 if field.name == "crop_ratio" else default + 1 if default > 1 else 0.25
    return TRAIN_FLAG_VALUES[field.name]


def _train_fields():
    import dataclasses

    from convmixer_tf.training.config import AugmentConfig, TrainConfig

    for field in dataclasses.fields(TrainConfig):
        if field.name != "augment":
            yield field, lambda config: config
    for field in dataclasses.fields(AugmentConfig):
        yield field, lambda config: config.augment


def test_every_train_flag_parses_to_its_field():
    """Flat flags, one per field (the augmentation ones too): each sets its own field alone."""
    from convmixer_tf.training.config import TrainConfig

    default = TrainConfig()
    for field, part in _train_fields():
        flag = "--" + field.name.replace("_", "-")
        value = _other_value(field)
        if isinstance(value, bool):
            argv = [flag if value else "--no-" + flag[2:]]
        else:
            argv = [flag, str(value)]
        needs = TRAIN_FLAG_NEEDS.get(field.name, [])
        config, export = cli.parse_train_args(argv + needs)
        assert getattr(part(config), field.name) == value, argv
        assert export is True
        skip = (field.name, "name", *(n[2:].replace("-", "_") for n in needs[::2]))
        others = [(f.name, getattr(p(config), f.name)) for f, p in _train_fields()
                  if f.name not in skip]
        assert others == [(f.name, getattr(p(default), f.name)) for f, p in _train_fields()
                          if f.name not in skip], argv
    assert cli.parse_train_args(["--no-export"])[1] is False


def test_a_flag_beats_the_preset_wherever_it_stands():
    from convmixer_tf.training.config import TrainConfig

    expected = TrainConfig.create(preset="cifar10", epochs=3, augment=dict(hflip=0.0))
    for argv in (["--preset", "cifar10", "--epochs", "3", "--hflip", "0"],
                 ["--epochs", "3", "--hflip", "0", "--preset=cifar10"]):
        config, _ = cli.parse_train_args(argv)
        assert config == expected, argv
        assert (config.epochs, config.augment.hflip) == (3, 0.0)  # the flags
        assert (config.batch_size, config.augment.randaug_n) == (512, 2)  # the recipe
    assert cli.parse_train_args(["--preset", "imagenet"])[0] == TrainConfig.create("imagenet")


def test_train_help_shows_the_presets_values_as_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.train_main(["--preset", "cifar10", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 512)" in text and "(default: convmixer_cifar10)" in text


# ---------------------------------------------------------------------------- exit-code policy

COMMANDS = ("train", "export", "convert", "evaluate", "predict", "data_service")


@pytest.mark.parametrize("error, code", [
    (ValueError("bad value"), 2), (FileNotFoundError("no such file"), 2),
    (FileExistsError("exists"), 2), (ConnectionError("unreachable"), 2),
    (ImportError("pip install convmixer_tf[torch]"), 2),
    (KeyError("oops"), 1), (TypeError("oops"), 1), (RuntimeError("oops"), 1),
])
def test_exit_code_table(error, code, capsys):
    def fail():
        raise error

    assert cli.run("convmixer-x", fail) == code
    err = capsys.readouterr().err
    if code == 2:
        assert err == f"convmixer-x: error: {error}\n"
    else:
        assert err.startswith("Traceback (most recent call last):")
        assert err.splitlines()[-1].startswith(
            f"convmixer-x: internal error (a bug; the traceback is above): "
            f"{type(error).__name__}")


def test_exit_code_of_export_and_tensorflow_errors():
    import tensorflow as tf

    from convmixer_tf import errors

    assert cli.exit_code(errors.ExportError("validation failed")) == cli.EXIT_INPUT
    assert cli.exit_code(errors.FinalSaveError("disk full")) == cli.EXIT_INPUT
    assert cli.exit_code(tf.errors.InvalidArgumentError(None, None, "bad image")) == 2
    assert cli.exit_code(tf.errors.NotFoundError(None, None, "no file")) == 2
    assert cli.exit_code(tf.errors.InternalError(None, None, "?")) == cli.EXIT_INTERNAL
    assert cli.run("convmixer-x", lambda: cli.EXIT_PARTIAL) == 3


EXIT_CODES_WITHOUT_TF = """
import sys
from convmixer_tf import cli, errors
error = errors.ExportError("not exportable")
type(error).__module__, type(error).__qualname__ = "elsewhere", "Renamed"  # moved and renamed
print(cli.exit_code(error), cli.exit_code(KeyError("bug")), sorted(
    name for name in sys.modules if name.split(".")[0] in ("tensorflow", "keras")))
"""


def test_exit_codes_hold_the_classes_and_need_no_tensorflow():
    """The table holds the exception classes themselves: an ExportError maps to 2 whatever its
    module or name, with no deploy module loaded; and cli imports without TensorFlow."""
    proc = subprocess.run([sys.executable, "-c", EXIT_CODES_WITHOUT_TF], env=subprocess_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["2", "1", "[]"]


def test_run_prints_the_library_log_and_removes_its_handler(capsys):
    """During `cli.run` a library logger's INFO line is printed on stdout (the message alone)
    and a warning on stderr; outside it, the library's INFO log prints nothing."""
    import logging

    log = logging.getLogger("convmixer_tf.some_module")

    def command():
        log.info("exported %s", "model.tflite")
        log.debug("not shown")
        log.warning("a warning")
        return cli.EXIT_OK

    log.info("before: not printed")
    assert cli.run("convmixer-x", command) == cli.EXIT_OK
    log.info("after: not printed")
    captured = capsys.readouterr()
    assert captured.out == "exported model.tflite\n"
    assert captured.err == "a warning\n"
    assert logging.getLogger("convmixer_tf").handlers == []


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_exits_2_on_a_bad_flag(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        getattr(cli, f"{command}_main")([*INTERNAL_CASES[command][2], "--no-such-flag"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _input_error_case(command, tmp_path):
    """(argv, words of the one error line) for a real input error of `command`."""
    if command == "train":
        return (["--dataset", f"folder:{tmp_path / 'missing'}", "--no-export", "--output-dir",
                 str(tmp_path / "out"), "--run-dir", str(tmp_path / "runs")], "missing")
    if command == "export":
        return [str(tmp_path / "missing.keras")], "no such model file"
    if command == "convert":
        return [str(tmp_path / "missing.pth"), str(tmp_path / "out.keras")], "missing.pth"
    if command == "evaluate":
        return [str(tmp_path / "missing.keras")], "missing.keras"
    if command == "predict":
        return [str(tmp_path / "missing.tflite"), str(tmp_path / "a.png")], "missing.tflite"
    return (["worker", "--dispatcher", f"localhost:{_free_port()}", "--dispatcher-timeout",
             "0.5"], "Cannot reach")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_exits_2_with_one_line_on_bad_input(command, tmp_path, capsys):
    argv, words = _input_error_case(command, tmp_path)
    assert getattr(cli, f"{command}_main")(argv) == 2
    err = capsys.readouterr().err
    prog = "convmixer-" + command.replace("_", "-")
    assert err.splitlines()[-1].startswith(f"{prog}: error: ") and words in err, err
    assert "Traceback" not in err


def test_data_service_on_a_taken_port_exits_2(capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.data_service_main(["dispatcher", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"is port {port} in use? choose another --port" in err[0], err


# (command, the library function it calls, argv that reaches the call)
INTERNAL_CASES = {
    "train": ("convmixer_tf.training.train", "train", ["--no-export"]),
    "export": ("convmixer_tf.deploy.export", "export_model", ["m.keras", "--tflite-modes", "none"]),
    "convert": ("convmixer_tf.model", "convert_checkpoint", ["m.pth", "m.keras"]),
    "evaluate": ("convmixer_tf.evaluate", "evaluate", ["m.keras"]),
    "predict": ("convmixer_tf.deploy.predict", "predict_files", ["m.tflite", "a.png"]),
    "data_service": ("convmixer_tf.training.data_service", "start_worker",
                     ["worker", "--dispatcher", "localhost:1"]),
}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_exits_1_with_the_traceback_on_a_bug(command, monkeypatch, capsys):
    """A bug (here a KeyError raised where the command calls the library) is exit 1: the
    traceback, then one line saying it is an internal error."""
    import importlib

    module, function, argv = INTERNAL_CASES[command]

    def bug(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(importlib.import_module(module), function, bug)
    assert getattr(cli, f"{command}_main")(argv) == 1
    err = capsys.readouterr().err
    prog = "convmixer-" + command.replace("_", "-")
    assert "Traceback (most recent call last)" in err
    assert err.splitlines()[-1] == (f"{prog}: internal error (a bug; the traceback is above): "
                                    f"KeyError: 'a bug'"), err


# ---------------------------------------------------------------------------- default --name


@pytest.mark.parametrize("dataset, name", [
    ("digits", "convmixer_digits"), ("keras:fashion_mnist", "convmixer_fashion_mnist"),
    ("folder:/data/pets", "convmixer_pets"), ("/data/pets/", "convmixer_pets"),
    ("tfds:cifar10", "convmixer_cifar10"), ("cifar10", "convmixer_cifar10"),
    ("tfds:imagenette/320px:1.0.0", "convmixer_imagenette_320px"),
    ("folder:/data/my pets (2)", "convmixer_my_pets_2"),
])
def test_default_name_follows_the_data_set(dataset, name):
    from convmixer_tf.training.config import TrainConfig, default_name

    assert default_name(dataset) == name
    assert TrainConfig(dataset=dataset).name == name
    assert TrainConfig(dataset=dataset, name="mine").name == "mine"


def test_train_without_name_writes_the_data_sets_name(tmp_path, image_folder, capsys):
    """Through the command: --dataset folder:.../pets without --name -> convmixer_pets.keras."""
    folder = image_folder(tmp_path / "pets", size=(16, 16))
    out, runs = tmp_path / "models", tmp_path / "runs"
    assert cli.train_main([
        "--dataset", f"folder:{folder}", "--epochs", "1", "--steps-per-epoch", "1",
        "--dim", "8", "--depth", "1", "--kernel-size", "3", "--image-size", "16",
        "--batch-size", "4", "--verbose", "0", "--no-export",
        "--output-dir", str(out), "--run-dir", str(runs)]) == 0
    assert (out / "convmixer_pets.keras").is_file() and (runs / "convmixer_pets").is_dir()
    assert not (out / "convmixer_digits.keras").exists()
    assert f"saved model: {out / 'convmixer_pets.keras'}" in capsys.readouterr().out
