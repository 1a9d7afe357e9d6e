"""The scripts in examples/ run as a user runs them (a subprocess, small settings by flags), and
what they export agrees with the model they trained."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from convmixer_tf.deploy import litert
from convmixer_tf.deploy.logits import logits_model
from convmixer_tf.training.data import sources

from helpers import ROOT
SMALL = ["--epochs", "1", "--steps", "5", "--dim", "16", "--depth", "1",
         "--tflite-modes", "float32"]


@pytest.mark.parametrize("extra", [
    # ~46 s on 2 AVX2 cores: large, as the same path runs by default in
    # test_export.py::test_export_api_writes_the_set_from_a_model_in_memory (convmixer_tf.export
    # of a fitted model) and test_precision.py's user-script cell (a user's fit under
    # MirroredStrategy + mixed precision, exported in the same process).
    pytest.param([], id="one-device", marks=pytest.mark.large),
    # The user script: MirroredStrategy (2 logical CPUs here) and mixed_bfloat16.
    pytest.param(["--mirrored", "--precision", "mixed_bfloat16"], id="mirrored-bfloat16",
                 marks=pytest.mark.large),  # ~75 s
])
def test_train_and_export_example(tmp_path, extra):
    out = tmp_path / "saved_models"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "train_and_export.py"), "--out",
         str(out), *SMALL, *extra],
        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"TF Serving: {out / 'digits' / '1'}" in proc.stdout
    if "--mirrored" in extra:
        assert "mirrored: 2 replica(s)" in proc.stdout
    for noise in ("error: loc(", "fully_quantize", "Ignored output_format"):  # the export's
        assert noise not in proc.stderr
    assert (out / "digits.export.log").is_file() and (out / "models.config").is_file()

    model = keras.saving.load_model(out / "digits.keras", compile=False)
    _, (x_test, _) = sources.load_digits(32)
    images = x_test[:8]
    # The exports compute in float32 whatever the training policy: so does the reference.
    logits = logits_model(model).predict(images.astype(np.float32), verbose=0)
    serving = tf.saved_model.load(str(out / "digits" / "1")).signatures["serving_uint8"]
    served = serving(images=tf.constant(images))
    np.testing.assert_allclose(served["logits"].numpy(), logits, atol=1e-4)
    assert [c.decode() for c in served["classes"].numpy()[:, 0]] == \
        [str(i) for i in logits.argmax(-1)]
    version = out / "digits_tflite" / "1"
    for file in ("digits_float32.tflite", "digits_float32_dynamic.tflite"):
        got = litert.LiteRTModel(str(version / file)).predict(images)
        np.testing.assert_allclose(got, logits, atol=1e-4)
    meta = json.loads((version / "metadata.json").read_text())
    assert meta["class_names"] == [str(i) for i in range(10)] and meta["image_size"] == [32, 32]


@pytest.mark.large  # 259 s on the 2 shared cores at load ~10: the int8 export, evaluation
def test_finetune_example_from_an_official_checkpoint(tmp_path):
    """examples/finetune.py from a PyTorch checkpoint in the official layout (7 classes) to
    digits (10): a new head, the int8 edge build exported and evaluated on the test split."""
    torch = pytest.importorskip("torch")
    from benchmarks import reference_torch as rt

    torch.manual_seed(0)
    official = rt.randomize_batchnorm(rt.ConvMixer(16, 1, kernel_size=5, patch_size=2,
                                                   num_classes=7))
    weights = tmp_path / "convmixer_16_1_ks5_p2.pth"
    torch.save(official.state_dict(), weights)
    out = tmp_path / "saved_models"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "finetune.py"), "--weights",
         str(weights), "--epochs", "2", "--steps", "3", "--out", str(out), "--tflite-modes",
         "int8"],
        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "7 classes, this run 10" in proc.stderr  # the head replaced, and said so
    assert "the backbone trains from now on" in proc.stderr
    assert "int8 edge build: 359 test images" in proc.stdout
    meta = json.loads((out / "finetuned.json").read_text())
    assert meta["source_weights"]["path"] == str(weights)
    tuned = keras.saving.load_model(out / "finetuned.keras", compile=False)
    assert tuned.output_shape == (None, 10)
    assert tuned.get_layer("stem_conv").kernel.shape == (2, 2, 3, 16)
