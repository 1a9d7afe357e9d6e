import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from convmixer_tf import artifacts, cli, errors
from convmixer_tf.deploy import logits, saved_model

from helpers import ROOT, worker

CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def png(image):
    return tf.io.encode_png(np.asarray(image, np.uint8)).numpy()


@contextlib.contextmanager
def logged_lines():
    """The lines the library logs (logger "convmixer_tf", INFO) while the block runs."""
    lines, logger = [], logging.getLogger("convmixer_tf")
    handler, level = logging.Handler(), logger.level
    handler.emit = lambda record: lines.append(record.getMessage())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model):
    """One validated export of a tiny model with metadata (class names), shared by the tests."""
    root = tmp_path_factory.mktemp("export")
    model = tiny_model(bn_stats=True)
    model_path = str(root / "tiny.keras")
    model.save(model_path)
    artifacts.write_metadata(model_path, artifacts.Metadata(CLASS_NAMES, (16, 16)))
    images = np.random.default_rng(1).integers(0, 256, (4, 16, 16, 3)).astype(np.uint8)
    with logged_lines() as lines:
        result = saved_model.export_saved_model(model_path, str(root), "tiny",
                                                sample_images=images)
    return dict(root=str(root), model=model, model_path=model_path, result=result, lines=lines)


@pytest.mark.xdist_group("saved_model_exported")
def test_layout_validation_warmup_and_configs(exported):
    from google.protobuf import text_format
    from tensorflow_serving.apis import prediction_log_pb2
    from tensorflow_serving.config import model_server_config_pb2

    root, result = exported["root"], exported["result"]
    version_dir = os.path.join(root, "tiny", "1")
    assert result["version"] == 1 and result["path"] == version_dir
    assert os.path.isfile(os.path.join(version_dir, "saved_model.pb"))
    assert os.path.isdir(os.path.join(version_dir, "variables"))
    # Validation ran both loaders on all three signatures and printed the logit error.
    assert len(result["report"]) == 6
    assert all(r["max_abs_logit_error"] <= 1e-4 for r in result["report"].values())
    assert any("tf1 session loader" in line and "max abs logit error" in line
               for line in exported["lines"])

    warmup = os.path.join(version_dir, "assets.extra", "tf_serving_warmup_requests")
    logs = [prediction_log_pb2.PredictionLog.FromString(r.numpy())
            for r in tf.data.TFRecordDataset(warmup)]
    signatures = {log.predict_log.request.model_spec.signature_name for log in logs}
    assert signatures == {"serving_default", "serving_uint8", "serving_image_bytes"}
    assert all(log.predict_log.request.model_spec.name == "tiny" for log in logs)

    config = model_server_config_pb2.ModelServerConfig()
    with open(os.path.join(root, "models.config")) as f:
        text_format.Parse(f.read(), config)
    (entry,) = config.model_config_list.config
    assert (entry.name, entry.base_path, entry.model_platform) == (
        "tiny", "/models/tiny", "tensorflow")
    with open(os.path.join(root, "batching_parameters.txt")) as f:
        assert "max_batch_size { value: 32 }" in f.read()


@pytest.mark.xdist_group("saved_model_exported")
def test_one_validation_process_serves_every_export_and_survives_failures(exported,
                                                                          monkeypatch):
    """The validation process (no convmixer_tf in it: it says so otherwise) starts once per
    exporting process: a second validation reuses it, a SavedModel it cannot load is an
    ExportError with its traceback and leaves it running, and one that died (or a changed
    environment) is replaced by a new one on the next validation."""
    import signal

    version_dir = os.path.join(exported["root"], "tiny", "1")
    images = np.random.default_rng(1).integers(0, 256, (2, 16, 16, 3)).astype(np.uint8)

    def validate(path=version_dir):
        return saved_model.validate_saved_model(path, exported["model"], images, CLASS_NAMES,
                                                (16, 16))

    validate()
    pid = saved_model._LOADER.proc.pid
    assert len(validate()) == 6 and saved_model._LOADER.proc.pid == pid
    with pytest.raises(errors.ExportError, match="(?s)separate process failed.*Traceback"):
        validate(os.path.join(exported["root"], "no-such-version"))
    assert saved_model._LOADER.proc.pid == pid and saved_model._LOADER.proc.poll() is None
    os.kill(pid, signal.SIGKILL)
    saved_model._LOADER.proc.wait()
    validate()
    replaced = saved_model._LOADER.proc.pid
    assert replaced != pid
    with monkeypatch.context() as patch:  # the child's env is the caller's
        patch.setenv("CONVMIXER_TEST_VALIDATION_ENV", "1")
        validate()
        assert saved_model._LOADER.proc.pid != replaced
    with monkeypatch.context() as patch:  # a process that dies before it answers
        patch.setattr(sys, "executable", "/bin/false")
        with pytest.raises(errors.ExportError, match="died \\(exit status 1\\)"):
            validate()
    validate()  # in the test's own environment: the later tests' validations reuse it


@pytest.mark.xdist_group("saved_model_exported")
def test_saved_model_cli_show_all(exported):
    cli_path = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    out = subprocess.run([cli_path, "show", "--all", "--dir", exported["result"]["path"]],
                         capture_output=True, text=True, check=True).stdout
    sections = {}
    for block in out.split("signature_def['")[1:]:
        sections[block.split("'")[0]] = block
    assert {"serving_default", "serving_uint8", "serving_image_bytes"} <= set(sections)
    assert "output_0" not in out
    # Inputs of unknown rank: the signatures check rank/size at run time (see ServingModule).
    float_sig = sections["serving_default"]
    assert "inputs['images'] tensor_info:\n        dtype: DT_FLOAT\n        shape: unknown_rank" \
        in float_sig
    assert "dtype: DT_UINT8\n        shape: unknown_rank" in sections["serving_uint8"]
    assert ("inputs['image_bytes'] tensor_info:\n        dtype: DT_STRING\n        shape: "
            "unknown_rank" in sections["serving_image_bytes"])
    for sig in ("serving_default", "serving_uint8", "serving_image_bytes"):
        block = sections[sig]
        assert "outputs['classes'] tensor_info:\n        dtype: DT_STRING\n        shape: (-1, 5)" \
            in block
        assert "outputs['logits'] tensor_info:\n        dtype: DT_FLOAT\n        shape: (-1, 10)" \
            in block
        for name in ("probabilities", "scores", "class_ids"):
            assert f"outputs['{name}']" in block
        assert "tensorflow/serving/predict" in block


@pytest.mark.xdist_group("saved_model_exported")
def test_signatures_any_size_labels_and_bad_input(exported):
    loaded = tf.saved_model.load(exported["result"]["path"])
    model = exported["model"]
    images = np.random.default_rng(2).integers(0, 256, (3, 24, 20, 3)).astype(np.uint8)
    out = loaded.signatures["serving_default"](images=tf.constant(images, tf.float32))
    np.testing.assert_allclose(out["logits"].numpy(),
                               logits.logits_model(model).predict(images, verbose=0), atol=1e-5)
    np.testing.assert_allclose(out["probabilities"].numpy().sum(-1), 1.0, atol=1e-5)
    top = out["logits"].numpy().argmax(-1)
    assert [c.decode() for c in out["classes"].numpy()[:, 0]] == [CLASS_NAMES[i] for i in top]
    out8 = loaded.signatures["serving_uint8"](images=tf.constant(images))
    np.testing.assert_array_equal(out8["class_ids"].numpy(), out["class_ids"].numpy())

    # Bytes of any size are decoded and resized to the training size (16x16).
    small = images[:, :16, :16]
    big = tf.image.resize(small.astype(np.float32), (48, 48), method="nearest").numpy()
    got = loaded.signatures["serving_image_bytes"](
        image_bytes=tf.constant([png(small[0]), png(big[1])]))
    assert got["classes"].shape == (2, 5)
    np.testing.assert_allclose(got["logits"].numpy()[0],
                               logits.logits_model(model).predict(small[:1], verbose=0)[0],
                               atol=1e-5)

    bad_calls = [
        ("serving_default", dict(images=tf.zeros([0, 16, 16, 3])), "empty batch"),
        ("serving_uint8", dict(images=tf.zeros([1, 1, 1, 3], tf.uint8)), "patch size"),
        ("serving_image_bytes", dict(image_bytes=tf.constant([], tf.string)), "empty batch"),
        ("serving_image_bytes", dict(image_bytes=tf.constant([b"not an image"])), "JPEG or PNG"),
        ("serving_image_bytes", dict(image_bytes=tf.constant([png(small[0])[:40]])), "PNG|png"),
    ]
    for signature, kwargs, message in bad_calls:
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            loaded.signatures[signature](**kwargs)
    with pytest.raises((ValueError, tf.errors.InvalidArgumentError), match="16, 3|height"):
        loaded.signatures["serving_default"](images=tf.zeros([1, 16, 16, 4]))


def test_softmax_head_is_detected_and_logits_recovered(tiny_model):
    model = tiny_model(4, classifier_activation="softmax")
    assert logits.output_activation(model) == "softmax"
    assert logits.output_activation(tiny_model(bn_stats=True)) is None
    module = saved_model.ServingModule(model, list("abcd"), (16, 16), top_k=3)
    x = np.random.default_rng(5).uniform(0, 255, (2, 16, 16, 3)).astype(np.float32)
    out = module.serve(saved_model.SIGNATURE_FLOAT, tf.constant(x))
    np.testing.assert_allclose(out["probabilities"].numpy(), model(x).numpy(), atol=1e-6)
    np.testing.assert_allclose(tf.nn.softmax(out["logits"]).numpy(), model(x).numpy(), atol=1e-6)
    assert out["classes"].shape == (2, 3)


def test_a_new_signature_is_one_table_entry(tmp_path, monkeypatch, tiny_model):
    """A `SIGNATURES` entry is served, warmed up and validated in the fresh process with no
    other edit: here 0-1 float pixels, scaled back to 0-255 by the signature itself."""
    monkeypatch.setitem(saved_model.SIGNATURES, "serving_unit_float", saved_model.Signature(
        "unit_images", "float32", lambda module, x: module.checked_images(x) * 255.0,
        lambda images: images.astype(np.float32) / 255.0,
        lambda images, size, crop_pct: images.astype(np.float32)))
    model = tiny_model()
    images = np.random.default_rng(3).integers(0, 256, (2, 16, 16, 3)).astype(np.uint8)
    with logged_lines() as lines:
        result = saved_model.export_saved_model(
            model=model, export_root=str(tmp_path), name="tiny", sample_images=images,
            meta=artifacts.Metadata(CLASS_NAMES, (16, 16)))
    assert {"tf1/serving_unit_float", "tf2/serving_unit_float"} <= set(result["report"])
    assert any("validate serving_unit_float" in line for line in lines)
    loaded = tf.saved_model.load(result["path"])
    got = loaded.signatures["serving_unit_float"](unit_images=tf.constant(images / 255.0,
                                                                          tf.float32))
    np.testing.assert_allclose(got["logits"], model(images.astype(np.float32)), atol=1e-4)
    warmup = os.path.join(result["path"], "assets.extra", "tf_serving_warmup_requests")
    records = list(tf.data.TFRecordDataset(warmup).as_numpy_iterator())
    assert len(records) == len(saved_model.SIGNATURES) == 4
    assert any(b"serving_unit_float" in record and b"unit_images" in record
               for record in records)


def _tree_digest(path):
    digest = hashlib.sha256()
    for folder, _, files in sorted(os.walk(path)):
        for name in sorted(files):
            with open(os.path.join(folder, name), "rb") as f:
                digest.update(name.encode() + f.read())
    return digest.hexdigest()


@pytest.mark.xdist_group("saved_model_exported")
def test_new_version_per_export_and_failures_leave_versions_untouched(exported, capsys):
    root, model_path = exported["root"], exported["model_path"]
    model_dir = os.path.join(root, "tiny")
    before = _tree_digest(os.path.join(model_dir, "1"))
    # The CLI: a second export is version 2, written beside version 1.
    assert cli.export_main([model_path, "--tflite-modes", "none"]) == 0
    assert artifacts.list_versions(model_dir) == [1, 2]
    assert "version 2" in capsys.readouterr().out

    # A failing validation (a tolerance no export can meet) publishes nothing.
    with pytest.raises(errors.ExportError, match="validation failed"):
        saved_model.export_saved_model(model_path, root, "tiny", tolerance=-1.0)
    # Metadata that contradicts the model fails before anything is written.
    bad_meta = os.path.join(root, "bad.keras")
    exported["model"].save(bad_meta)
    artifacts.write_metadata(bad_meta, artifacts.Metadata(["a", "b"], (16, 16)))
    assert cli.export_main([bad_meta, "--name", "tiny", "--tflite-modes", "none"]) == 2
    assert "lists 2 class names but the model has 10" in capsys.readouterr().err

    assert artifacts.list_versions(model_dir) == [1, 2]
    assert sorted(os.listdir(model_dir)) == ["1", "2"]  # no partial or temp dir left
    assert _tree_digest(os.path.join(model_dir, "1")) == before


def test_export_cli_bad_input(tmp_path, capsys):
    assert cli.export_main([str(tmp_path / "missing.keras")]) == 2
    assert "no such model file" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt.keras"
    corrupt.write_bytes(b"this is not a zip archive")
    assert cli.export_main([str(corrupt)]) == 2
    assert "cannot load" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.export_main([str(corrupt), "--tflite-modes", "float32,int4"])
    assert exit_info.value.code == 2


def _load_client():
    spec = importlib.util.spec_from_file_location(
        "serving_client", os.path.join(ROOT, "scripts", "serving_client.py"))
    client = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(client)
    return client


@pytest.mark.xdist_group("saved_model_exported")
def test_serving_client_requests_offline(exported, tmp_path, capsys):
    import base64

    client = _load_client()
    images = np.random.default_rng(3).integers(0, 256, (2, 16, 16, 3)).astype(np.uint8)
    paths = []
    for i, image in enumerate(images):
        paths.append(str(tmp_path / f"img{i}.png"))
        with open(paths[-1], "wb") as f:
            f.write(png(image))
    encoded = client.read_bytes(paths)

    request = client.predict_request("tiny", encoded, version=1)
    assert request.model_spec.name == "tiny" and request.model_spec.version.value == 1
    assert request.model_spec.signature_name == "serving_image_bytes"
    assert list(tf.make_ndarray(request.inputs["image_bytes"])) == encoded
    body = client.rest_body(encoded)
    assert base64.b64decode(body["instances"][1]["image_bytes"]["b64"]) == encoded[1]

    rows = client.offline_rest(os.path.join(exported["root"], "tiny"), body)
    top = logits.logits_model(exported["model"]).predict(images, verbose=0).argmax(-1)
    assert [r["classes"][0] for r in rows] == [CLASS_NAMES[i] for i in top]
    assert client.main(["--offline", os.path.join(exported["root"], "tiny"), *paths]) == 0
    assert CLASS_NAMES[top[0]] in capsys.readouterr().out

    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert client.main(["--offline", exported["root"], str(text)]) == 1
    assert "not a JPEG or PNG" in capsys.readouterr().err
    assert client.main(["--rest", "http://127.0.0.1:9", paths[0]]) == 1


@pytest.mark.xdist_group("saved_model_exported")
def test_predict_cli_on_saved_model(exported, tmp_path, capsys):
    from PIL import Image

    image = np.random.default_rng(4).integers(0, 256, (20, 20, 3)).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "a.bmp")  # not JPEG/PNG: re-encoded for the model
    Image.fromarray(image).save(tmp_path / "a.png")
    model_dir = os.path.join(exported["root"], "tiny")
    assert cli.predict_main([model_dir, str(tmp_path / "a.bmp"), str(tmp_path / "a.png")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    labels = [line.split(":")[1].rsplit("(", 1)[0] for line in lines]
    assert len(lines) == 2 and labels[0] == labels[1]
    assert lines[0].endswith("ms)") and lines[0].split()[1] in CLASS_NAMES

    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    assert cli.predict_main([model_dir, str(tmp_path / "bad.png")]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert cli.predict_main([str(tmp_path), str(tmp_path / "a.png")]) == 2
    assert "no SavedModel" in capsys.readouterr().err


# What a client reads for each malformed request (both loaders; TF1 = what TF Serving's C++
# session returns). Wrong dtypes fail before the graph runs, with each loader's own words.
RANK = (r"assertion failed: \[images must be a rank-4 tensor \[batch, height, width, 3\]; "
        r"got shape\]")
CHANNELS = r"assertion failed: \[images must have 3 channels \[batch, height, width, 3\]"
SIZE = r"assertion failed: \[image height and width must be >= 2 \(the patch size\)"
EMPTY = r"assertion failed: \[empty batch: send at least one image\]"
FINITE = r"assertion failed: \[images hold NaN or infinite values"
BYTES_RANK = (r"assertion failed: \[image_bytes must be a 1-D batch \[batch\] of encoded "
              r"JPEG/PNG images")
FORMAT = (r"assertion failed: \[image_bytes: every element must be an encoded JPEG or PNG image;"
          r" not JPEG/PNG at batch index\] \[{}\]")
DTYPE = r"Expects arg\[0\] to be {0} but|was expected to be a {0} tensor"
FUZZ_EXPECTED = {
    "float rank 0": RANK + r" \[\]$", "float rank 1": RANK + r" \[3\]$",
    "float rank 2": RANK + r" \[16 3\]$", "float rank 3": RANK + r" \[32 32 3\]$",
    "float rank 5": RANK, "float 0 channels": CHANNELS, "float 1 channel": CHANNELS,
    "float 2 channels": CHANNELS, "float 4 channels": CHANNELS + r"; got shape\] \[1 16 16 4\]",
    "float 0x0 image": SIZE, "float 1x1 image": SIZE, "float 16x1 image": SIZE,
    "float empty batch": EMPTY, "float empty batch, rank 3": RANK,
    "float NaN pixel": FINITE, "float +inf pixel": FINITE, "float -inf pixel": FINITE,
    "int32 into float": DTYPE.format("float"), "float64 into float": DTYPE.format("float"),
    "string into float": DTYPE.format("float"),
    "uint8 rank 0": RANK, "uint8 rank 3": RANK, "uint8 rank 5": RANK,
    "uint8 4 channels": CHANNELS, "uint8 1x1 image": SIZE, "uint8 empty batch": EMPTY,
    "float into uint8": DTYPE.format("uint8"),
    "bytes rank 0": BYTES_RANK, "bytes rank 2": BYTES_RANK + r"; got shape\] \[1 1\]",
    "bytes empty batch": EMPTY, "bytes empty string": FORMAT.format(0),
    "bytes garbage": FORMAT.format(0), "bytes truncated JPEG": r"Invalid JPEG data, size 467",
    "bytes JPEG header only": r"Invalid JPEG data", "bytes truncated PNG": r"Invalid PNG data",
    "bytes PNG signature only": r"Invalid PNG", "bytes GIF": FORMAT.format(0),
    "bytes BMP": FORMAT.format(0), "bytes good PNG + garbage": FORMAT.format(1),
    "bytes PNG header claims 65535x65535":
        r"an image is larger than 16384 pixels on a side \(height, width\):\] \[65535 65535\]",
    "float into bytes": DTYPE.format("string"),
}


@pytest.mark.xdist_group("saved_model_exported")
def test_fuzz_malformed_requests_fail_cleanly_with_onednn(exported, tmp_path):
    """Every malformed request returns INVALID_ARGUMENT with its own message through both
    loaders, in a process with oneDNN on (a rank-3 tensor used to abort it in the oneDNN
    convolution); the process survives and a good request afterwards gives the same logits."""
    out = tmp_path / "fuzz.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(TF_ENABLE_ONEDNN_OPTS="1", TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(
        [sys.executable, worker("saved_model_fuzz_worker.py"),
         exported["result"]["path"], str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]  # -6 (SIGABRT) = the oneDNN abort
    report = json.loads(out.read_text())
    results = report["results"]
    assert len(report["bad"]) >= 30 and set(report["bad"]) == set(FUZZ_EXPECTED)
    good = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3)).astype(np.uint8)
    reference = logits.logits_model(exported["model"]).predict(good, verbose=0)
    for loader in ("tf1", "tf2"):
        for label in report["bad"]:
            (got,) = results[f"{loader}/{label}"]
            assert not got["ok"], (loader, label, "was accepted")
            assert got["error"].startswith("InvalidArgumentError: "), (loader, label, got)
            assert re.search(FUZZ_EXPECTED[label], got["error"]), (loader, label, got["error"])
        for label in ("float", "uint8", "bytes"):
            before, after = results[f"{loader}/{label}"]
            assert before["ok"] and after["ok"]
            assert before["logits"] == after["logits"]  # bit-identical after the bad requests
            want = reference if label != "bytes" else reference[:1]
            np.testing.assert_allclose(before["logits"], want, atol=1e-4)
        extra = {label: results[f"{loader}/{label}"][0] for label in report["extra"]}
        assert all(r["ok"] for r in extra.values()), extra
        # 16-bit PNG: scaled to 8 bits (v * 257 -> v), not clipped: the same as the 8-bit one.
        np.testing.assert_allclose(extra["bytes 16-bit grey PNG"]["logits"],
                                   extra["bytes 8-bit grey PNG"]["logits"], atol=1e-5)
        np.testing.assert_allclose(extra["bytes palette PNG"]["logits"],
                                   extra["bytes palette as RGB PNG"]["logits"], atol=1e-5)
        mixed = np.array(extra["bytes mixed sizes"]["logits"])
        assert mixed.shape == (3, 10)
        np.testing.assert_allclose(mixed[0], before["logits"][0], atol=1e-5)


def test_serving_client_without_a_server_says_how_to_start_one(tmp_path):
    """--grpc and --rest with nothing listening: exit 1 and one line naming the address and how
    to start TF Serving, no traceback (run as a user would, in its own process)."""
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    image = tmp_path / "a.png"
    image.write_bytes(png(np.zeros((16, 16, 3), np.uint8)))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TF_CPP_MIN_LOG_LEVEL")}
    script = os.path.join(ROOT, "scripts", "serving_client.py")
    for flag, api, address in (("--grpc", "gRPC", f"127.0.0.1:{port}"),
                               ("--rest", "REST", f"http://127.0.0.1:{port}")):
        proc = subprocess.run([sys.executable, script, flag, address, "--model", "tiny",
                               str(image)], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1 and proc.stdout == ""
        assert "Traceback" not in proc.stderr
        (line,) = [l for l in proc.stderr.splitlines() if "serving_client" in l]
        assert line.startswith(f"serving_client: error: no TF Serving {api} server "
                               f"answered at {address} (")
        assert "docker run" in line and "MODEL_NAME=tiny" in line and "--offline" in line


# ---------------------------------------------------------------------------- pixel budgets

IMAGE_OVER = (r"assertion failed: \[{0}: an image has more pixels than the limit of {1} per "
              r"image set at export \(convmixer-export --max-image-pixels\); height, width:\] "
              r"\[{2} {3}\] \[pixels:\] \[{4}\]")
REQUEST_OVER = (r"assertion failed: \[{0}: the request holds more pixels than the limit of {1} "
                r"per request set at export \(convmixer-export --max-request-pixels\): send "
                r"fewer images per request; pixels:\] \[{2}\] \[images:\] \[{3}\]")
THIN = (r"assertion failed: \[image_bytes: an image is too thin: resizing its short side to 16 "
        r"gives more pixels than the limit of {0} per image set at export \(convmixer-export "
        r"--max-image-pixels\); height, width:\] \[{1} {2}\] \[resized pixels:\] \[{3}\]")
# Peak RSS over the warmed-up process: refusing takes nothing (measured +5 MB; decoding the 16k
# PNG took +3660 MB), serving a 40 MP PNG takes its uint8 pixels (measured +117 MB; +574 MB
# with the float32 copy preprocessing made before it resized uint8 directly).
PEAK_RSS_MARGIN_MB = 150
LEGAL_40MP_MARGIN_MB = 300


@pytest.mark.xdist_group("saved_model_exported")
def test_oversized_requests_refused_before_decoding_within_memory(exported, tmp_path):
    """With the default budgets (40 MP per image, 160 MP per request), a 750 KB PNG declaring
    16,000 x 16,000 pixels and 5 blank 6000 x 6000 PNGs (36 MP each, 180 MP together) are
    refused through both loaders, in a process whose peak RSS stays within PEAK_RSS_MARGIN_MB
    of its warmed-up peak (the code before the budgets decoded the 16k PNG: 690 -> 4354 MB);
    a good request before and after gives the same logits, and a legal 40 MP PNG is served
    within LEGAL_40MP_MARGIN_MB."""
    out = tmp_path / "budget.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(
        [sys.executable, worker("saved_model_budget_worker.py"),
         exported["result"]["path"], str(out), "6000", "5"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    results, peaks = report["results"], dict(report["peak_rss_mb"])
    expected = {
        "16000x16000 PNG": IMAGE_OVER.format("image_bytes", 40000000, 16000, 16000, 256000000),
        "5 x 6000x6000 PNGs": REQUEST_OVER.format("image_bytes", 160000000, 180000000, 5),
    }
    good = np.random.default_rng(0).integers(0, 256, (1, 16, 16, 3)).astype(np.uint8)
    reference = logits.logits_model(exported["model"]).predict(good, verbose=0)
    for loader in ("tf1", "tf2"):
        for label, message in expected.items():
            (got,) = results[f"{loader}/{label}"]
            assert not got["ok"] and got["error"].startswith("InvalidArgumentError: ")
            assert re.search(message, got["error"]), (loader, got["error"])
        before, after = results[f"{loader}/good"]
        assert before["ok"] and before["logits"] == after["logits"]
        np.testing.assert_allclose(before["logits"], reference, atol=1e-4)
    assert peaks["tf2/good"] - peaks["baseline"] < PEAK_RSS_MARGIN_MB, peaks  # after both
    for loader in ("tf1", "tf2"):
        assert results[f"{loader}/6324x6324 PNG"][0]["ok"]
    assert peaks["tf2/6324x6324 PNG"] - peaks["baseline"] < LEGAL_40MP_MARGIN_MB, peaks


def _progressive_jpeg(height, width, seed=0):
    """A progressive JPEG with a 30 KB EXIF segment before its SOF2 marker."""
    import io

    from PIL import Image

    image = np.random.default_rng(seed).integers(0, 256, (height, width, 3)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", progressive=True, quality=90,
                                exif=b"Exif\0\0" + bytes(30000))
    data = buf.getvalue()
    assert b"\xff\xc2" in data and data.index(b"\xff\xc2") > 30000  # SOF2 after the EXIF
    return data


@pytest.mark.xdist_group("saved_model_exported")
def test_export_cli_pixel_budgets(exported, tmp_path, capsys):
    """convmixer-export --max-image-pixels 1024 --max-request-pixels 2048: the limits are
    logged and stored in the SavedModel; every signature refuses an image over 1024 pixels
    and a request over 2048 with INVALID_ARGUMENT naming the limit and the size received
    (JPEG sizes from the header, progressive ones included), and serves one within them
    with the Keras model's logits. Budgets no image could meet are refused before export."""
    model_path, model = exported["model_path"], exported["model"]
    argv = [model_path, "--export-dir", str(tmp_path), "--tflite-modes", "none",
            "--max-image-pixels", "1024", "--max-request-pixels", "2048"]
    assert cli.export_main(argv) == 0
    assert ("serving limits: 1024 pixels per image, 2048 per request (--max-image-pixels, "
            "--max-request-pixels)") in capsys.readouterr().out
    loaded = tf.saved_model.load(str(tmp_path / "tiny" / "1"))
    assert int(loaded.max_image_pixels[0].numpy()) == 1024
    assert int(loaded.max_request_pixels[0].numpy()) == 2048

    rng = np.random.default_rng(6)
    fit, over = (rng.integers(0, 256, (3, *s, 3)).astype(np.uint8) for s in ((32, 32), (40, 40)))
    reference = logits.logits_model(model)
    F, U, B = (loaded.signatures[s] for s in ("serving_default", "serving_uint8",
                                               "serving_image_bytes"))
    np.testing.assert_allclose(F(images=tf.constant(fit[:2], tf.float32))["logits"].numpy(),
                               reference.predict(fit[:2], verbose=0), atol=1e-5)
    np.testing.assert_array_equal(U(images=tf.constant(fit[:2]))["logits"].numpy(),
                                  F(images=tf.constant(fit[:2], tf.float32))["logits"].numpy())
    served = B(image_bytes=tf.constant([png(fit[0]), _progressive_jpeg(32, 32)]))
    prepared = saved_model.preprocessing.resize_centre_crop(fit[0], (16, 16)).numpy()[None]
    np.testing.assert_allclose(served["logits"].numpy()[0],
                               reference.predict(prepared, verbose=0)[0], atol=1e-5)
    refused = [
        (F, dict(images=tf.constant(over[:1], tf.float32)),
         IMAGE_OVER.format("images", 1024, 40, 40, 1600)),
        (U, dict(images=tf.constant(over[:1])), IMAGE_OVER.format("images", 1024, 40, 40, 1600)),
        (U, dict(images=tf.constant(fit)), REQUEST_OVER.format("images", 2048, 3072, 3)),
        (B, dict(image_bytes=tf.constant([png(fit[0]), png(over[0])])),
         IMAGE_OVER.format("image_bytes", 1024, 40, 40, 1600)),
        (B, dict(image_bytes=tf.constant([_progressive_jpeg(40, 40)])),
         IMAGE_OVER.format("image_bytes", 1024, 40, 40, 1600)),
        (B, dict(image_bytes=tf.constant([png(f) for f in fit])),
         REQUEST_OVER.format("image_bytes", 2048, 3072, 3)),
        (B, dict(image_bytes=tf.constant([png(np.zeros((1, 64, 3)))])),  # 1x64 -> 16x1024
         THIN.format(1024, 1, 64, 16384)),
    ]
    for signature, kwargs, message in refused:
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            signature(**kwargs)

    for flags, code, error in (
            (["--max-image-pixels", "0"], "usage", "must be at least 1, got 0"),
            (["--max-image-pixels", "100"], "input", "is below the 256 pixels one image of the "
                                               "model's size (16, 16) takes"),
            (["--max-request-pixels", "500", "--max-image-pixels", "1000"], "input",
             "max_request_pixels=500 is below max_image_pixels=1000")):
        argv = [model_path, "--export-dir", str(tmp_path), "--tflite-modes", "none", *flags]
        if code == "usage":
            with pytest.raises(SystemExit) as exit_info:
                cli.export_main(argv)
            assert exit_info.value.code == 2
        else:
            assert cli.export_main(argv) == 2
        assert error in capsys.readouterr().err
    assert artifacts.list_versions(str(tmp_path / "tiny")) == [1]
