"""One preprocessing everywhere: the same JPEG through the evaluation pipeline + Keras model,
the SavedModel's `serving_image_bytes` signature (TF Serving's TF1 session loader and
`tf.saved_model.load`) and `convmixer-predict` on the float32 .tflite gives the same logits."""

import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from convmixer_tf import artifacts, preprocessing
from convmixer_tf.deploy import predict, saved_model, tflite
from convmixer_tf.training.data import pipeline

SIZE, CROP = 16, 0.875


def test_resize_centre_crop_matches_timm_geometry():
    image = np.arange(30 * 40 * 3, dtype=np.uint8).reshape(30, 40, 3)
    out = preprocessing.resize_centre_crop(image, SIZE, CROP).numpy()
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.float32
    assert np.all(out == np.round(out)) and out.min() >= 0 and out.max() <= 255
    # short side 30 -> int(16 / 0.875) = 18, long side 40 -> 24; centre crop 16x16
    full = tf.image.resize(image.astype(np.float32), (18, 24), "bicubic", antialias=True)
    expected = np.clip(np.round(full.numpy()[1:17, 4:20]), 0, 255)
    np.testing.assert_array_equal(out, expected)
    same = np.zeros((SIZE, SIZE, 3), np.uint8)
    kept = preprocessing.resize_centre_crop(same, SIZE, 1.0)  # untouched, still uint8
    assert kept.dtype == tf.uint8 and np.array_equal(kept, same)
    dynamic = tf.function(lambda x: preprocessing.resize_centre_crop(x, SIZE, 1.0),
                          input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)])
    np.testing.assert_array_equal(dynamic(image[:SIZE, :SIZE]), image[:SIZE, :SIZE])
    with pytest.raises(ValueError, match="crop_pct"):
        preprocessing.resize_centre_crop(image, SIZE, 1.5)


def test_read_image_file_16_bit_and_palette(tmp_path):
    grey = (np.arange(20 * 20, dtype=np.uint16).reshape(20, 20) * 150)
    Image.fromarray(grey).save(tmp_path / "grey16.png")
    pixels = preprocessing.read_image_file(str(tmp_path / "grey16.png"))
    np.testing.assert_allclose(pixels[..., 0], grey / 257.0, atol=1)  # scaled, not clipped
    palette = Image.fromarray(np.full((8, 8, 3), (200, 10, 30), np.uint8)).convert("P", palette=Image.Palette.ADAPTIVE)
    palette.save(tmp_path / "palette.png")
    assert tuple(preprocessing.read_image_file(str(tmp_path / "palette.png"))[3, 3]) == (200, 10,
                                                                                       30)
    Image.fromarray(grey).save(tmp_path / "grey16.tiff")  # a Pillow-only format
    pixels = preprocessing.read_image_file(str(tmp_path / "grey16.tiff"))
    np.testing.assert_allclose(pixels[..., 0], grey / 257.0, atol=1)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="cannot read"):
        preprocessing.read_image_file(str(tmp_path / "notes.txt"))


def test_same_jpeg_same_logits_in_eval_serving_and_predict(tmp_path, tiny_model):
    rng = np.random.default_rng(1)
    folder = tmp_path / "images"
    for split in ("train", "test"):
        for label in ("a", "b"):
            os.makedirs(folder / split / label)
            for i in range(2):
                # Non-square, larger than the model: the crop and the resize both matter.
                image = rng.integers(0, 256, (30 + 7 * i, 41, 3), dtype=np.uint8)
                Image.fromarray(image).save(folder / split / label / f"{i}.jpg", quality=90)
    jpeg = str(folder / "test" / "b" / "1.jpg")

    # Evaluation: the training pipeline's test split (only that JPEG's row is compared).
    datasets = pipeline.build_datasets(f"folder:{folder}", image_size=SIZE, global_batch_size=2,
                                       eval_crop_pct=CROP)
    test_images = np.concatenate([x.numpy() for x, _ in datasets.test])
    model = tiny_model(2, size=SIZE, bn_stats=True)
    eval_logits = model.predict(test_images, verbose=0)[-1]  # sorted: b/1.jpg is last

    model_path = str(tmp_path / "tiny.keras")
    artifacts.save_model(model, model_path)
    artifacts.write_metadata(model_path, artifacts.Metadata(["a", "b"], (SIZE, SIZE), CROP))
    export = saved_model.export_saved_model(model_path, str(tmp_path), "tiny")
    with open(jpeg, "rb") as f:
        encoded = f.read()
    served = {}
    with tf.Graph().as_default(), tf.compat.v1.Session() as sess:  # TF Serving's path
        meta = tf.compat.v1.saved_model.loader.load(sess, ["serve"], export["path"])
        sig = meta.signature_def[saved_model.SIGNATURE_BYTES]
        served["tf1"] = sess.run(sig.outputs["logits"].name,
                                 {sig.inputs["image_bytes"].name: [encoded]})[0]
    loaded = tf.saved_model.load(export["path"]).signatures[saved_model.SIGNATURE_BYTES]
    served["tf2"] = loaded(image_bytes=tf.constant([encoded]))["logits"].numpy()[0]

    tflite_dir = tmp_path / "tiny_tflite"
    path = tflite.save(tflite.convert(model, "float32", input_shape=(1, SIZE, SIZE)),
                       str(tflite_dir / "tiny_float32.tflite"))
    artifacts.write_json(str(tflite_dir / "metadata.json"),
                         dict(class_names=["a", "b"], image_size=[SIZE, SIZE], crop_pct=CROP))
    served["predict"] = predict.predict_files(path, [jpeg])[0]["logits"]

    scale = np.abs(eval_logits).max()
    for where, logits in served.items():
        np.testing.assert_allclose(logits, eval_logits, rtol=1e-4, atol=1e-4 * scale,
                                   err_msg=where)


def test_uint8_resized_directly_and_resized_shape():
    """uint8 pixels are resized without a float32 copy (serving holds 3 bytes per decoded
    pixel, not 15) with the same output bit for bit; `resized_shape` of a batch of sizes, in
    float64 (serving's pre-decode check), is each size's own resize."""
    image = np.random.default_rng(0).integers(0, 256, (37, 53, 3)).astype(np.uint8)
    for size, crop_pct in (((16, 16), 1.0), ((24, 20), 0.875), ((64, 64), 0.96)):
        np.testing.assert_array_equal(
            preprocessing.resize_centre_crop(image, size, crop_pct).numpy(),
            preprocessing.resize_centre_crop(image.astype(np.float32), size, crop_pct).numpy())
    sizes = np.array([[37, 53], [1, 64], [16000, 16000], [16, 16]])
    batched = preprocessing.resized_shape(sizes, (16, 16), 0.875, tf.float64).numpy()
    singles = [preprocessing.resized_shape(s, (16, 16), 0.875).numpy() for s in sizes]
    np.testing.assert_array_equal(batched, np.array(singles, np.float64))
    np.testing.assert_array_equal(batched[1], [18, 1152])  # 1x64: the short side -> int(16/0.875)
