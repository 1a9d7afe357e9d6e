"""convmixer-evaluate on every artifact kind: `.keras`, a SavedModel (through the TF1 session
loader, as TF Serving runs it) and `.tflite` builds, agreeing exactly with the export gate on
the same images; results as JSON and a confusion picture; one-line errors."""

import json
import os

import keras
import numpy as np
import pytest

from convmixer_tf import artifacts, cli, evaluate
from convmixer_tf.deploy import saved_model
from convmixer_tf.training.data import pipeline, sources

CONFIG = evaluate.EvaluateConfig


def test_small_folder_evaluates_with_a_batch_larger_than_its_train_split(
        tmp_path, capsys, tiny_model, image_folder):
    """5 images per class: the train split holds fewer than --batch-size 64, which only
    training needs."""
    image_folder(tmp_path / "data", ("cat", "dog"), per_class=5, size=(20, 20))
    model = tiny_model(2, classifier_activation="softmax")
    path = str(tmp_path / "m.keras")
    artifacts.save_model(model, path)
    result = evaluate.evaluate(path, CONFIG(dataset=str(tmp_path / "data"), batch_size=64))
    assert 2 <= result["count"] < 10 and result["top5"] == 1.0
    assert sum(row["count"] for row in result["per_class"].values()) == result["count"]
    assert cli.evaluate_main([path, "--dataset", str(tmp_path / "data")]) == 0
    out = capsys.readouterr().out
    assert f"{result['count']} test images" in out and "cat" in out and "dog" in out


def test_keras_top1_top5_match_the_model_and_bad_files_fail_clearly(tmp_path, capsys,
                                                                    tiny_model):
    keras.utils.set_random_seed(0)
    model = tiny_model(name="convmixer")
    path = tmp_path / "m.keras"
    model.save(path)
    result = evaluate.evaluate(str(path))
    _, (x_test, y_test) = sources.load_digits(16)
    logits = model.predict(x_test, verbose=0)
    assert result["count"] == len(y_test) and result["kind"] == "keras"
    assert result["top1"] == pytest.approx(np.mean(logits.argmax(-1) == y_test))
    top5 = np.argsort(-logits, axis=-1)[:, :5]
    assert result["top5"] == pytest.approx(np.mean((top5 == y_test[:, None]).any(-1)))
    confusion = np.array(result["confusion"])
    assert confusion.sum() == len(y_test)
    assert np.trace(confusion) == round(result["top1"] * len(y_test))
    for i, row in enumerate(result["per_class"].values()):
        assert row["count"] == np.sum(y_test == i)

    assert cli.evaluate_main([str(path)]) == 0
    assert "top-1" in capsys.readouterr().out
    (tmp_path / "bad.keras").write_bytes(b"not a zip")
    truncated = tmp_path / "truncated.keras"
    truncated.write_bytes(path.read_bytes()[:2000])
    (tmp_path / "model.txt").write_text("no model")
    (tmp_path / "two.keras").write_bytes(b"")
    artifacts.save_model(tiny_model(2), str(tmp_path / "two.keras"), overwrite=True)
    for bad, message in ((tmp_path / "missing.keras", "no such artifact"),
                         (tmp_path / "bad.keras", "not a .keras model file"),
                         (truncated, "not a .keras model file|cannot load"),
                         (tmp_path / "model.txt", "not a .keras file, a SavedModel folder"),
                         (tmp_path / "two.keras", "has 2 classes but digits has 10")):
        assert cli.evaluate_main([str(bad)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("convmixer-evaluate: error:"), err
        assert any(m in err[0] for m in message.split("|")), err


def test_bad_flags_and_missing_metadata_are_one_line_before_any_data(tmp_path, capsys,
                                                                     monkeypatch):
    def no_data(*args, **kwargs):
        raise AssertionError("data was loaded")

    monkeypatch.setattr(pipeline, "build_datasets", no_data)
    lone = tmp_path / "lone.tflite"
    lone.write_bytes(b"TFL3")
    assert cli.evaluate_main([str(lone)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no metadata for" in err[0] and "--metadata" in err[0], err
    with pytest.raises(SystemExit):
        cli.evaluate_main([str(lone), "--confusion", "out.jpg"])
    assert "ending in .png" in capsys.readouterr().err
    assert evaluate.SIGNATURE_NAMES == tuple(saved_model.SIGNATURES)
    assert evaluate.BYTES_SIGNATURE == saved_model.SIGNATURE_BYTES


@pytest.mark.xdist_group("digits_export")
def test_tflite_accuracy_equals_the_export_gates_on_the_same_images(digits_export):
    """The gate (deploy/gate.py accuracy_report, as tflite_set runs it) measured every build on
    digits' test split; evaluate on --dataset digits gets the same top-1, build by build."""
    from convmixer_tf.deploy import litert

    report = digits_export["result"]["tflite"]
    assert not report["refused"] and not report["failed"]
    int8 = litert.LiteRTModel(os.path.join(report["path"], "tiny_full_int8.tflite"))
    assert int8.input["dtype"] == np.uint8  # quantized I/O: the runner (de)quantizes
    for label, entry in report["builds"].items():
        path = os.path.join(report["path"], entry["files"][0])
        result = evaluate.evaluate(path, CONFIG(dataset="digits"))
        assert result["kind"] == "tflite" and result["count"] == len(digits_export["labels"])
        assert result["top1"] == entry["accuracy"], label


@pytest.mark.xdist_group("digits_export")
def test_saved_model_through_its_signatures_agrees_with_keras(digits_export, capsys):
    """Base folder (its latest version) and version folder, every signature (the bytes one
    gets the test images PNG-encoded and preprocesses them itself): the SavedModel's metadata
    comes from the trained model's <name>.json beside the base folder."""
    keras_result = evaluate.evaluate(digits_export["model_path"])
    base = str(digits_export["root"] / "tiny")
    for path, signature in ((base, "serving_default"), (os.path.join(base, "1"), "serving_uint8"),
                            (base, "serving_image_bytes")):
        result = evaluate.evaluate(path, CONFIG(signature=signature))
        assert result["kind"] == "saved_model" and result["signature"] == signature
        assert result["count"] == keras_result["count"]
        assert abs(result["top1"] - keras_result["top1"]) <= 1 / result["count"]
    with pytest.raises(SystemExit):  # argparse: a usage error
        cli.evaluate_main([base, "--signature", "serving_float"])
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.xdist_group("digits_export")
def test_json_and_confusion_picture(digits_export, tmp_path, capsys):
    from PIL import Image

    report = digits_export["result"]["tflite"]
    path = os.path.join(report["path"], "tiny_full_int8.tflite")
    out_json, out_png = tmp_path / "r.json", tmp_path / "c.png"
    assert cli.evaluate_main([path, "--json", str(out_json), "--confusion", str(out_png)]) == 0
    assert "images/s" in capsys.readouterr().out
    written = json.loads(out_json.read_text())
    assert written["artifact"] == path and written["kind"] == "tflite"
    assert written["dataset"] == "digits" and written["count"] == len(digits_export["labels"])
    assert written["images_per_second"] > 0 and len(written["per_class"]) == 10
    assert np.array(written["confusion"]).shape == (10, 10)
    assert written["top1"] == report["builds"]["full_int8"]["accuracy"]
    with Image.open(out_png) as picture:
        assert picture.format == "PNG" and min(picture.size) > 10 * 12


def test_the_bytes_signature_gets_a_folders_own_files(tmp_path, image_folder):
    """What a TF Serving client sends for an image folder: each PNG file's bytes as they are."""
    root = image_folder(tmp_path / "data", ("cat", "dog"), per_class=3)
    meta = artifacts.Metadata(["cat", "dog"], (16, 16))
    batches, names = evaluate._encoded_test_data(CONFIG(dataset=root), meta, (16, 16))
    encoded, labels = next(iter(batches))
    assert tuple(names) == ("cat", "dog") and len(encoded) == len(labels) == 2
    files = {open(os.path.join(root, c, f), "rb").read() for c in names
             for f in os.listdir(os.path.join(root, c))}
    assert set(encoded.numpy()) <= files
