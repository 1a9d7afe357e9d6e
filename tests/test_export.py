import hashlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from convmixer_tf import artifacts
from convmixer_tf.deploy import export
from convmixer_tf.deploy.config import ExportConfig
from convmixer_tf.model import ConvMixer

from helpers import ROOT, subprocess_env


def write_image(path, seed, size=(20, 24)):
    image = np.random.default_rng(seed).integers(0, 256, (*size, 3)).astype(np.uint8)
    encode = tf.io.encode_png if path.endswith(".png") else tf.io.encode_jpeg
    with open(path, "wb") as f:
        f.write(encode(image).numpy())


def test_calibration_folder_skips_non_images(tmp_path):
    folder = tmp_path / "calibration"
    folder.mkdir()
    write_image(str(folder / "a.png"), 0)
    write_image(str(folder / "b.jpg"), 1)
    (folder / "README.txt").write_text("calibration images for the int8 export")
    (folder / ".DS_Store").write_bytes(b"\0\1")
    (folder / "nested").mkdir()
    images = export.folder_images(str(folder), (16, 16))
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8

    (folder / "a.png").unlink()
    (folder / "b.jpg").unlink()
    with pytest.raises(ValueError, match="no image files"):
        export.folder_images(str(folder), (16, 16))
    with pytest.raises(FileNotFoundError, match="no such calibration folder"):
        export.folder_images(str(tmp_path / "missing"), (16, 16))


# Runs convmixer-export's main with one pause point; the test SIGKILLs it there.
KILLABLE_EXPORT = r"""
import sys, time
import tensorflow as tf
from convmixer_tf import artifacts, cli
from convmixer_tf.deploy import saved_model

stage, argv = sys.argv[1], sys.argv[2:]

def pause(where):
    print("PAUSED", where, flush=True)
    time.sleep(600)

if stage == "saved_model":  # the version written to its temp folder, validation starting
    saved_model.validate_saved_model = lambda export_dir, *a, **k: pause(export_dir)
elif stage == "tflite":  # mid-conversion: one file done, the converter's scratch on disk
    convert, calls = tf.lite.TFLiteConverter.from_saved_model, []
    def from_saved_model(path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            pause(path)
        return convert(path, *a, **k)
    tf.lite.TFLiteConverter.from_saved_model = from_saved_model
elif stage == "publish":  # every TFLite file and metadata.json written, not yet renamed
    publish = artifacts.publish_version
    def publish_version(tmp, root):
        if root.endswith("_tflite"):
            pause(tmp)
        return publish(tmp, root)
    artifacts.publish_version = publish_version
sys.exit(cli.export_main(argv))
"""


def _run_until_paused(stage, argv, cwd, timeout=240):
    env = subprocess_env()
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE_EXPORT, stage, *argv], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    deadline, lines = time.monotonic() + timeout, []
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            line = proc.stdout.readline() if ready else ""
            lines.append(line)
            if line.startswith("PAUSED "):
                return proc, line.split(" ", 1)[1].strip()
            if proc.poll() is not None and not line:
                break
        raise AssertionError(f"export never reached {stage}:\n" + "".join(lines)[-3000:])
    except BaseException:
        _kill(proc)
        raise


def _kill(proc):
    os.killpg(proc.pid, signal.SIGKILL)  # the export and its validation child, if any
    proc.wait()
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL


def _digest(path):
    digest = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(files):
            with open(os.path.join(folder, name), "rb") as f:
                digest.update(os.path.relpath(os.path.join(folder, name), path).encode()
                              + f.read())
    return digest.hexdigest()


def _temps(*folders):
    return sorted(os.path.join(f, e) for f in folders if os.path.isdir(f)
                  for e in os.listdir(f) if e.startswith(artifacts.TMP_PREFIX))


@pytest.mark.large  # four export processes: ~40 s of CPU, 2-3 min on the shared 2 cores
def test_export_killed_at_each_stage_leaves_versions_whole(tmp_path, tiny_model):
    """SIGKILL during the SavedModel write/validation, mid TFLite conversion and right before
    the TFLite set is published: the published versions stay byte-identical, no partial
    version appears, and the next run removes the temp folders (converter scratch included)."""
    root = tmp_path / "models"
    model_path = str(root / "tiny.keras")
    artifacts.save_model(tiny_model(4), model_path)
    artifacts.write_metadata(model_path, artifacts.Metadata(list("abcd"), (16, 16)))
    saved, lite = str(root / "tiny"), str(root / "tiny_tflite")
    first = export.export_model(model_path, tflite_modes=("float32",))
    assert first["saved_model"]["version"] == 1 and first["tflite"]["version"] == 1
    assert sorted(os.listdir(lite)) == ["1"]
    assert sorted(os.listdir(os.path.join(lite, "1"))) == [
        "metadata.json", "tiny_float32.tflite", "tiny_float32_dynamic.tflite"]
    assert _temps(str(root), saved, lite) == []
    before = {"saved": _digest(os.path.join(saved, "1")), "lite": _digest(os.path.join(lite, "1"))}

    def unchanged():
        assert artifacts.list_versions(saved) == [1] and artifacts.list_versions(lite) == [1]
        assert _digest(os.path.join(saved, "1")) == before["saved"]
        assert _digest(os.path.join(lite, "1")) == before["lite"]

    tflite_only = [model_path, "--no-saved-model", "--tflite-modes", "float32"]
    # 1. During the SavedModel write/validation.
    proc, where = _run_until_paused("saved_model", [model_path, "--tflite-modes", "float32"],
                                    tmp_path)
    assert os.path.dirname(where) == saved and os.path.isfile(os.path.join(where, "saved_model.pb"))
    _kill(proc)
    left = _temps(str(root), saved, lite)
    assert where in left and len(left) == 2  # + the job's scratch folder in the export root
    unchanged()

    # 2. Mid TFLite conversion (second build): the next run's start removed run 1's leftovers; the
    # converter's scratch SavedModel lives in this run's scratch folder in the export root.
    proc, where = _run_until_paused("tflite", tflite_only, tmp_path)
    assert not any(os.path.exists(p) for p in left)
    scratch = os.path.dirname(where)
    assert os.path.dirname(scratch) == str(root) and os.path.basename(where).startswith(
        "convmixer-tflite-")
    (partial,) = _temps(lite)
    # An incomplete set (the builds are written once all are converted and measured).
    assert "metadata.json" not in os.listdir(partial)
    _kill(proc)
    left = _temps(str(root), saved, lite)
    assert sorted(left) == sorted([scratch, partial])
    unchanged()

    # 3. Right before the TFLite set is renamed into place.
    proc, where = _run_until_paused("publish", tflite_only, tmp_path)
    assert not any(os.path.exists(p) for p in left)
    assert sorted(os.listdir(where)) == [
        "metadata.json", "tiny_float32.tflite", "tiny_float32_dynamic.tflite"]
    _kill(proc)
    left = _temps(str(root), saved, lite)
    assert where in left
    unchanged()

    # 4. A normal run: cleans up, publishes version 2 of both, leaves no temp behind.
    env = subprocess_env()
    done = subprocess.run([os.path.join(os.path.dirname(sys.executable), "convmixer-export"),
                           model_path, "--tflite-modes", "float32"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"removed {len(left)} temp folder(s) an interrupted export left" in done.stdout
    assert _temps(str(root), saved, lite) == []
    assert artifacts.list_versions(saved) == [1, 2] and artifacts.list_versions(lite) == [1, 2]
    assert _digest(os.path.join(saved, "1")) == before["saved"]
    assert _digest(os.path.join(lite, "1")) == before["lite"]
    assert "exported TFLite files: " + os.path.join(lite, "2") in done.stdout


def test_export_cli_on_a_text_file_or_truncated_keras(tmp_path, capsys, tiny_model):
    from convmixer_tf import cli

    text = tmp_path / "notes.txt"
    text.write_text("not a model")
    good = str(tmp_path / "tiny.keras")
    artifacts.save_model(tiny_model(4), good)
    truncated = tmp_path / "truncated.keras"
    with open(good, "rb") as f:
        data = f.read()
    truncated.write_bytes(data[: len(data) // 2])
    for path, message in ((text, "not a .keras model file (expected the .keras file"),
                          (truncated, "not a zip archive): damaged or truncated?")):
        assert cli.export_main([str(path), "--tflite-modes", "none"]) == 2
        err = capsys.readouterr().err
        assert f"convmixer-export: error: cannot load '{path}'" in err and message in err, err
        assert "File not found" not in err
    assert not any(name.startswith(artifacts.TMP_PREFIX) for name in os.listdir(tmp_path))


def test_metadata_round_trip_keeps_keys_it_does_not_know(tmp_path):
    """A metadata file with keys this version does not know (an older or newer writer's)
    loads, and writing it back keeps them; one without class names says what to give."""
    path = tmp_path / "m.json"
    path.write_text(json.dumps(dict(class_names=[0, 1], image_size=[16, 16], dataset="digits",
                                    written_by="another tool", tflite=dict(builds={}))))
    meta = artifacts.load_metadata(str(path))
    assert meta.class_names == ["0", "1"] and meta.image_size == (16, 16)
    assert meta.crop_pct == 1.0 and meta.dataset == "digits" and meta.tflite == dict(builds={})
    assert meta.extra == dict(written_by="another tool")
    artifacts.write_metadata(str(tmp_path / "copy.keras"), meta)
    assert json.loads((tmp_path / "copy.json").read_text()) == dict(
        class_names=["0", "1"], image_size=[16, 16], crop_pct=1.0, dataset="digits",
        tflite=dict(builds={}), written_by="another tool")
    path.write_text(json.dumps(dict(image_size=[16, 16])))
    with pytest.raises(ValueError, match="m.json has no class_names: give a metadata JSON"):
        artifacts.load_metadata(str(path))
    path.write_text("{not json")
    with pytest.raises(ValueError, match="m.json is not valid JSON"):
        artifacts.load_metadata(str(path))


def test_export_cli_flags_are_checked_by_the_config_before_loading(tmp_path, capsys):
    """`convmixer-export`'s flags are ExportConfig's: a bad value is a usage error (exit 2,
    one line naming the setting) before the model file is even looked for."""
    from convmixer_tf import cli

    for flags, message in ((["--max-accuracy-drop", "500"], "in [0, 100] (points of accuracy)"),
                           (["--min-int8-agreement", "2"], "in [0, 1] (a fraction)"),
                           (["--name", "../up"], "must be a folder name"),
                           (["--tflite-modes", "float32,int4"], "unknown TFLite mode 'int4'")):
        with pytest.raises(SystemExit) as exit_info:
            cli.export_main([str(tmp_path / "missing.keras"), *flags])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "no such model file" not in err, err


# ---------------------------------------------------------------------------- the export API


def test_export_api_rejects_bad_arguments_before_any_work(tmp_path, tiny_model):
    import convmixer_tf

    model = tiny_model(4)
    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3)).astype(np.uint8)
    out = str(tmp_path / "out")
    cases = [
        (dict(model="model.keras"), "must be a Keras model. Received model of type str"),
        (dict(name="../up"), r"folder name.* Received name='../up'"),
        (dict(class_names=["a", "b"]), "name the model's 4 classes. Received 2 names"),
        (dict(image_size=(16,)), r"\(height, width\) in pixels. Received image_size=\(16,\)"),
        (dict(crop_pct=1.5), r"crop_pct` must be in \(0, 1\]. Received crop_pct=1.5"),
        (dict(tflite_modes=["float32", "int4"]), "Received tflite_modes=\\['float32', 'int4'\\]"),
        (dict(int8_io="int16"), "Received int8_io='int16'"),
        (dict(max_accuracy_drop=500), r"in \[0, 100\] \(points of accuracy\). Received "
                                      "max_accuracy_drop=500"),
        (dict(max_image_pixels=0), "must be at least 1, got 0"),
        (dict(calibration_images=images / 255.0), r"0-255 pixels.* Received values in \[0, 1\]"),
        (dict(calibration_images=np.full((2, 16, 16, 3), np.nan)), "NaN or infinite"),
        (dict(calibration_images=images[0]), r"\[N, height, width, 3\].* shape \(16, 16, 3\)"),
        (dict(held_out=(np.zeros((4, 24, 24, 3)), [0, 1, 2, 3])),
         r"must be 16x16 \(the image_size\). Received shape \(4, 24, 24, 3\)"),
        (dict(held_out=(images, [0, 1, 2, 7])), r"4 class ids in \[0, 4\).* in \[0, 7\]"),
        (dict(held_out=(images, [0, 1])), "must be 4 class ids.* Received 2 labels"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            convmixer_tf.export(kwargs.pop("model", model), out, **kwargs)
    dynamic = ConvMixer(dim=8, depth=1, kernel_size=3, patch_size=2, classes=4)
    with pytest.raises(ValueError, match=r"takes any image size.* image_size=None"):
        convmixer_tf.export(dynamic, out)
    with pytest.raises(TypeError, match="unknown export setting.* max_accuracy_drop, "):
        convmixer_tf.export(model, out, max_acuracy_drop=2)
    with pytest.raises(TypeError, match="unknown export setting.* fields are name, "):
        export.export_model(str(tmp_path / "missing.keras"), log=print)  # before the load
    config = ExportConfig(tflite_modes="float32,int8", max_accuracy_drop=2)
    assert config.tflite_modes == ("float32", "int8")
    assert ExportConfig.create(config, tflite_modes="none") == ExportConfig(
        tflite_modes=(), max_accuracy_drop=2)  # a keyword wins over the config
    with pytest.raises(ValueError, match="mode 'int4'.* Received tflite_modes='float32,int4'"):
        convmixer_tf.export(model, out, config=config, tflite_modes="float32,int4")
    assert not os.path.exists(out)  # refused before any work



def test_export_api_writes_the_set_from_a_model_in_memory(tmp_path, tiny_model, caplog):
    """`convmixer_tf.export` without any file: the names, size and crop given reach the
    SavedModel's signatures and the TFLite set's metadata, gated on the labelled images."""
    import convmixer_tf
    from convmixer_tf.deploy import litert

    model = tiny_model(4)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 16, 16, 3)).astype(np.uint8)
    labels = rng.integers(0, 4, 12)
    caplog.set_level(logging.INFO, logger="convmixer_tf")
    result = convmixer_tf.export(model, str(tmp_path), name="mine", class_names=list("abcd"),
                                 crop_pct=0.875, held_out=(images, labels),
                                 config=ExportConfig(tflite_modes=["float32"],
                                                     max_accuracy_drop=100))
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("convmixer_tf.")]
    assert result["saved_model"]["path"] == str(tmp_path / "mine" / "1")
    assert result["tflite"]["path"] == str(tmp_path / "mine_tflite" / "1")
    assert not result["tflite"]["refused"] and not result["tflite"]["failed"]
    logged = (tmp_path / "mine.export.log").read_text()
    assert lines and all(line in logged for line in lines)
    assert "exported TFLite files" in logged and "validate serving_uint8" in logged
    logits = model.predict(images, verbose=0)
    served = tf.saved_model.load(str(tmp_path / "mine" / "1")).signatures["serving_uint8"](
        images=tf.constant(images))
    np.testing.assert_allclose(served["logits"].numpy(), logits, atol=1e-4)
    assert [c.decode() for c in served["classes"].numpy()[:, 0]] == \
        list(np.array(list("abcd"))[logits.argmax(-1)])
    meta = json.loads((tmp_path / "mine_tflite" / "1" / "metadata.json").read_text())
    assert meta["class_names"] == list("abcd") and meta["crop_pct"] == 0.875
    assert meta["image_size"] == [16, 16]
    assert meta["tflite"]["keras_accuracy"] == pytest.approx(np.mean(logits.argmax(-1) == labels))
    lite = litert.LiteRTModel(str(tmp_path / "mine_tflite" / "1" / "mine_float32.tflite"))
    np.testing.assert_allclose(lite.predict(images), logits, atol=1e-4)


def test_export_api_takes_the_trainer_a_user_fitted(tmp_path, tiny_model):
    """What `distribute.make_trainer` returned under a strategy (a ReplicaTrainer) exports as
    the network it wraps."""
    import convmixer_tf
    from convmixer_tf.deploy import litert
    from convmixer_tf.training import distribute

    model = tiny_model(3)
    images = np.random.default_rng(1).integers(0, 256, (4, 16, 16, 3)).astype(np.uint8)
    result = convmixer_tf.export(distribute.ReplicaTrainer(model), str(tmp_path), name="fitted",
                                 saved_model=False, tflite_modes=["float32"])
    lite = litert.LiteRTModel(os.path.join(result["tflite"]["path"], "fitted_float32.tflite"))
    np.testing.assert_allclose(lite.predict(images), model.predict(images, verbose=0), atol=1e-4)


def _bfloat16_graph_conversion(real):
    """`tflite.convert_mode` with float16 converting a graph whose Mul computes
    in bfloat16: the converter's real failure (ConverterError, MLIR diagnostics on fd 2)."""

    def convert(mode, graphs, io_type):
        if mode != "float16":
            return real(mode, graphs, io_type)

        @tf.function(input_signature=[tf.TensorSpec([1, 4], tf.float32)])
        def square(x):
            x = tf.cast(x, tf.bfloat16)
            return tf.cast(x * x, tf.float32)

        converter = tf.lite.TFLiteConverter.from_concrete_functions(
            [square.get_concrete_function()], square)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        return converter.convert()

    return convert


def test_failed_conversion_is_one_line_and_the_rest_of_the_set_is_written(tmp_path, capfd,
                                                                          monkeypatch, tiny_model):
    from convmixer_tf import cli
    from convmixer_tf.deploy import tflite

    path = str(tmp_path / "tiny.keras")
    artifacts.save_model(tiny_model(4), path)
    rng = np.random.default_rng(0)
    artifacts.write_samples(path, rng.integers(0, 256, (16, 16, 16, 3)),
                            rng.integers(0, 256, (16, 16, 16, 3)), rng.integers(0, 4, 16))
    monkeypatch.setattr(tflite, "convert_mode", _bfloat16_graph_conversion(tflite.convert_mode))
    capfd.readouterr()  # the setup's own output (TF starting)
    stderr, fd2 = sys.stderr, os.fstat(2)
    code = cli.export_main([path, "--no-saved-model", "--tflite-modes", "float32,float16",
                            "--max-accuracy-drop", "100"])
    out, err = capfd.readouterr()
    log = str(tmp_path / "tiny.export.log")
    assert code == cli.EXIT_PARTIAL == 3
    assert err.splitlines() == [
        "convmixer-export: float16: conversion failed (tf.Mul on bfloat16 is not a TFLite "
        f"builtin op); see {log}",
        "convmixer-export: finished; every other file was written (exit status 3: a TFLite "
        "build was refused or failed)"], err
    assert "error: loc(" not in out and "neither a custom op" not in out
    with open(log) as f:
        logged = f.read()
    assert "neither a custom op nor a flex op" in logged and "ConverterError" in logged
    assert "tflite float16                FAILED: conversion failed" in logged
    version = tmp_path / "tiny_tflite" / "1"
    assert sorted(os.listdir(version)) == ["metadata.json", "tiny_float32.tflite",
                                           "tiny_float32_dynamic.tflite"]
    report = json.loads((version / "metadata.json").read_text())["tflite"]
    assert set(report["failed"]) == {"float16"} and "float16_dynamic" not in report["builds"]
    assert sys.stderr is stderr and os.fstat(2).st_ino == fd2.st_ino  # both restored
    # Any other converter error: its type and first line.
    assert tflite.conversion_failure(RuntimeError("MLIR pass failed\n  at ...")) == \
        "RuntimeError: MLIR pass failed"


def test_stderr_to_a_log_restores_fd_2_even_on_an_exception(tmp_path, capfd):
    log = tmp_path / "job.export.log"
    stderr, fd2 = sys.stderr, os.fstat(2)
    with pytest.raises(RuntimeError, match="converter crashed"):
        with export.stderr_to(str(log)) as logged:
            os.write(2, b"from C++ on fd 2\n")
            print("a Python warning", file=sys.stderr)
            logged("our own line")
            raise RuntimeError("converter crashed")
    assert sys.stderr is stderr and os.fstat(2).st_ino == fd2.st_ino
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "after\n"
    assert log.read_text().splitlines() == ["from C++ on fd 2", "a Python warning",
                                            "our own line"]


def test_export_command_prints_no_tensorflow_noise(tmp_path, tiny_model):
    """The real `convmixer-export` (float32 + calibrated full_int8; the SavedModel's validation
    runs in its own process, whose output it keeps): stdout has our report, stderr nothing;
    TF's own lines (the converter's, XNNPACK's) are in `<name>.export.log`."""
    path = str(tmp_path / "tiny.keras")
    artifacts.save_model(tiny_model(4), path)
    rng = np.random.default_rng(0)
    artifacts.write_samples(path, rng.integers(0, 256, (16, 16, 16, 3)),
                            rng.integers(0, 256, (16, 16, 16, 3)), rng.integers(0, 4, 16))
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = ROOT
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from convmixer_tf import cli; "
         "sys.exit(cli.export_main())", path, "--no-saved-model",
         "--tflite-modes", "float32,full_int8",
         "--max-accuracy-drop", "100"],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "exported TFLite files" in proc.stdout
    for noise in ("cuInit", "retracing", "MLIR", "fully_quantize", "XNNPACK delegate", "I0000"):
        assert noise not in proc.stdout
    logged = (tmp_path / "tiny.export.log").read_text()
    assert "fully_quantize" in logged and "exported TFLite files" in logged
