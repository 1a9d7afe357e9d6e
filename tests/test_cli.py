"""Console entry points: what a user sees on stderr besides our own lines."""

import os
import subprocess
import sys

import pytest

from convmixer_tf import cli, model as model_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(cli._has_nvidia_driver(), reason="the noise is that of a machine without GPU")
def test_cpu_machine_start_is_quiet_and_unprepared_tfds_has_one_error(tmp_path):
    """No "cuInit" error, no pre-absl info lines, no tfds warning about a missing folder: only
    our error saying the data set is not prepared."""
    model = model_lib.ConvMixer(dim=8, depth=1, kernel_size=3, patch_size=2,
                                input_shape=(16, 16, 3), classes=10)
    model.save(tmp_path / "m.keras")
    env = dict(os.environ, PYTHONPATH=ROOT)
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


@pytest.mark.parametrize("command", ["train", "convert", "evaluate"])
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
