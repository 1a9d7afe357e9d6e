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
    pytest.param([], id="one-device"),  # ~40 s on the shared 2 cores (85 s under heavy load)
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
