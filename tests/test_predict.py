"""convmixer-predict on the export's own layout (<name>/<version>/ and
<name>_tflite/<version>/*.tflite with metadata.json beside it): 16-bit and palette images decode
like their 8-bit RGB equivalents on both model kinds; unreadable files exit 2 with one line."""

import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from convmixer_tf import cli
from convmixer_tf.deploy import predict
from convmixer_tf.deploy.config import PredictConfig
from convmixer_tf.training.data import sources



@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Pairs of files that must give the same pixels: (16-bit, 8-bit) and (palette, RGB)."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (20, 18, 3)).astype(np.uint8)
    grey = rgb[..., 0]
    paths = {}

    def save(name, write):
        paths[name] = str(folder / name)
        write(paths[name])

    def write_bytes(data):
        return lambda path: open(path, "wb").write(data)

    # 16-bit: v * 257 is exactly v in 8 bits; PIL's convert("RGB") would saturate it to 255.
    save("rgb16.png", write_bytes(tf.io.encode_png(rgb.astype(np.uint16) * 257).numpy()))
    save("rgb8.png", write_bytes(tf.io.encode_png(rgb).numpy()))
    save("grey16.png", lambda p: Image.fromarray(grey.astype(np.uint16) * 257).save(p))
    save("grey16.tif", lambda p: Image.fromarray(grey.astype(np.uint16) * 257).save(p))
    save("grey8.png", lambda p: Image.fromarray(grey).save(p))
    palette = Image.fromarray(rgb).convert("P")
    save("palette.png", palette.save)
    save("palette.gif", palette.save)
    save("palette_rgb.png", lambda p: palette.convert("RGB").save(p))
    return paths


@pytest.mark.xdist_group("digits_export")
def test_high_bit_depth_and_palette_images_decode_correctly(digits_export, images):
    assert Image.open(images["grey16.png"]).mode.startswith("I")  # really 16-bit
    for model in (digits_export["tflite"], digits_export["saved"]):
        rows = predict.predict_files(model, list(images.values()), PredictConfig(top_k=2))
        logits = {os.path.basename(r["path"]): np.asarray(r["logits"]) for r in rows}
        for a, b in (("rgb16.png", "rgb8.png"), ("grey16.png", "grey8.png"),
                     ("grey16.tif", "grey8.png"), ("palette.png", "palette_rgb.png"),
                     ("palette.gif", "palette_rgb.png")):
            np.testing.assert_allclose(logits[a], logits[b], atol=1e-5, err_msg=(model, a, b))
        assert not np.allclose(logits["grey8.png"], logits["rgb8.png"], atol=1e-3)


@pytest.mark.xdist_group("digits_export")
def test_predict_cli_finds_metadata_in_the_versioned_layout(digits_export, images, capsys):
    tflite_path = digits_export["tflite"]
    assert tflite_path.endswith(os.path.join("tiny_tflite", "1", "tiny_float32.tflite"))
    assert cli.predict_main([tflite_path, images["rgb16.png"], images["rgb8.png"]]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].split()[1] in sources.DIGITS_CLASS_NAMES  # labels from metadata.json
    assert lines[0].split(":")[1].split("(")[0] == lines[1].split(":")[1].split("(")[0]

    tflite_dir = os.path.dirname(os.path.dirname(tflite_path))
    assert cli.predict_main([tflite_dir, images["rgb8.png"]]) == 2
    err = capsys.readouterr().err
    assert "is a TFLite folder: pass one of its .tflite files, e.g." in err
    assert tflite_path in err


@pytest.mark.xdist_group("digits_export")
def test_unreadable_files_exit_2_with_one_line(digits_export, tmp_path, capsys):
    png = tf.io.encode_png(np.zeros((16, 16, 3), np.uint8)).numpy()
    jpeg = tf.io.encode_jpeg(np.zeros((16, 16, 3), np.uint8)).numpy()
    bad = {"notes.png": b"this is text", "empty.jpg": b"", "cut.png": png[:30],
           "cut.jpg": jpeg[:40], "random.bmp": b"BM" + bytes(range(200)),
           "random.webp": bytes(np.random.default_rng(0).integers(0, 256, 300, np.uint8))}
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
    for model in (digits_export["tflite"], digits_export["saved"]):
        for name in bad:
            assert cli.predict_main([model, str(tmp_path / name)]) == 2, (model, name)
            captured = capsys.readouterr()
            assert captured.out == ""
            lines = captured.err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("convmixer-predict: error: "), lines
            assert f"cannot read {tmp_path / name} as an image" in lines[0], lines
