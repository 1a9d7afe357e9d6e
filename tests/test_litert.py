"""`deploy.litert`: the LiteRT runner (fixed and dynamic inputs, malformed input refused
without crashing), the flatbuffer's ops, XNNPACK delegation, and the one resize of the TFLite
checks (`fit_size`)."""

import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from convmixer_tf.deploy import litert, logits, tflite
from convmixer_tf.model import ConvMixer


@pytest.fixture(scope="module")
def tiny():
    """An untrained 16x16 ConvMixer returning logits (the runner's checks need no training)."""
    keras.utils.set_random_seed(0)
    return ConvMixer(dim=16, depth=1, kernel_size=3, patch_size=2, input_shape=(16, 16, 3),
                     classes=10, classifier_activation=None, name="tiny")


def test_float32_fixed_and_dynamic_sizes(tiny):
    x_test = np.random.default_rng(2).integers(0, 256, (4, 16, 16, 3)).astype(np.uint8)
    reference = logits.logits_model(tiny)
    fixed = litert.LiteRTModel(tflite.convert(tiny, "float32", input_shape=(1, 16, 16)))
    assert fixed.signature == (1, 16, 16, 3) and fixed.image_size == (16, 16)
    np.testing.assert_allclose(fixed.predict(x_test[:4]),  # batch 4 runs as 4 x 1
                               reference.predict(x_test[:4], verbose=0), atol=1e-4)

    dynamic = litert.LiteRTModel(tflite.convert(tiny, "float32", input_shape=(None,) * 3))
    assert dynamic.signature == (-1, -1, -1, 3) and dynamic.image_size is None
    for shape in ((1, 16, 16, 3), (3, 24, 20, 3), (2, 16, 16, 3)):  # resize before allocate
        x = np.random.default_rng(0).integers(0, 256, shape).astype(np.uint8)
        np.testing.assert_allclose(dynamic.predict(x), reference.predict(x, verbose=0),
                                   atol=1e-4)

    for runner, bad, message in (
        (fixed, np.zeros((1, 24, 24, 3)), "takes 16x16 images, got 24x24"),
        (fixed, np.zeros((0, 16, 16, 3)), "empty batch"),
        (dynamic, np.zeros((0, 16, 16, 3)), "empty batch"),
        (dynamic, np.zeros((2, 16, 16, 4)), r"\[batch, height, width, 3\]"),
        (dynamic, np.zeros((16, 16, 3)), r"\[batch, height, width, 3\]"),
    ):
        with pytest.raises(ValueError, match=message):
            runner.predict(bad)


def test_xnnpack_delegation_table(tiny):
    flat = tflite.convert(tiny, "float32", input_shape=(1, 16, 16))
    rows = litert.LiteRTModel(flat).delegation()
    ops = litert.op_counts(flat)
    assert {name: total for name, _, _, total in rows} == ops
    assert all(done == total for _, _, done, total in rows)  # float32: all on XNNPACK
    assert "GELU" in ops and "FLEX" not in str(ops)  # exact GELU lowers to the builtin op
    off = litert.LiteRTModel(flat, xnnpack=False).delegation()
    assert all(done == 0 for _, _, done, _ in off)
    table = litert.delegation_table(off)
    assert "not delegated" in table and "CONV_2D" in table


# Malformed inputs through LiteRTModel.predict in a fresh process (a crash in the interpreter
# would kill it, not pytest): each must raise ValueError; good inputs give the same logits
# before and after.
LITERT_FUZZ = r"""
import json, sys
import numpy as np
from convmixer_tf.deploy.litert import LiteRTModel

dynamic, fixed = LiteRTModel(sys.argv[1]), LiteRTModel(sys.argv[2])
good = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3)).astype(np.uint8)
nan = np.full((1, 16, 16, 3), 7.0, np.float32)
nan[0, 1, 2, 0] = np.nan
BAD = {
    "rank 0": np.float32(1.0), "rank 1": np.zeros(3), "rank 2": np.zeros((16, 3)),
    "rank 3": np.zeros((16, 16, 3)), "rank 5": np.zeros((1, 1, 16, 16, 3)),
    "0 channels": np.zeros((1, 16, 16, 0)), "1 channel": np.zeros((1, 16, 16, 1)),
    "2 channels": np.zeros((1, 16, 16, 2)), "4 channels": np.zeros((1, 16, 16, 4)),
    "0x0 image": np.zeros((1, 0, 0, 3)), "1x1 image": np.zeros((1, 1, 1, 3)),
    "16x1 image": np.zeros((1, 16, 1, 3)), "empty batch": np.zeros((0, 16, 16, 3)),
    "NaN pixel": nan, "+inf pixels": np.full((1, 16, 16, 3), np.inf),
    "-inf pixels": np.full((2, 16, 16, 3), -np.inf, np.float16),
    "strings": np.full((1, 16, 16, 3), "a"), "objects": np.zeros((1, 16, 16, 3), object),
    "bool": np.zeros((1, 16, 16, 3), bool), "complex": np.zeros((1, 16, 16, 3), complex),
}
results = {"good before": [r.predict(good).tolist() for r in (dynamic, fixed)]}
for label, x in BAD.items():
    for name, runner in (("dynamic", dynamic), ("fixed", fixed)):
        try:
            runner.predict(x)
            results[f"{name}/{label}"] = "accepted"
        except Exception as error:  # noqa: BLE001
            results[f"{name}/{label}"] = f"{type(error).__name__}: {error}"
try:
    fixed.predict(np.zeros((1, 24, 24, 3), np.uint8))
except ValueError as error:
    results["fixed/24x24 image"] = f"ValueError: {error}"
results["good after"] = [r.predict(good).tolist() for r in (dynamic, fixed)]
print(json.dumps(results))
"""

LITERT_EXPECTED = {
    "rank": r"expected images of shape \[batch, height, width, 3\], got",
    "channel": r"expected images of shape \[batch, height, width, 3\], got \[1, 16, 16, \d\]",
    "image": r"must be >= 2 \(the patch size\), got|takes 16x16 images, got",
    "empty batch": r"empty batch: pass at least one image",
    "inf": r"images hold NaN or infinite values", "NaN": r"images hold NaN or infinite values",
    "strings": r"must be uint8 or float pixels, got dtype <U1",
    "objects": r"got dtype object", "bool": r"got dtype bool", "complex": r"got dtype complex",
}


def test_litert_runner_rejects_malformed_input_without_crashing(tiny, tmp_path):
    paths = [tflite.save(tflite.convert(tiny, "float32", input_shape=shape),
                         str(tmp_path / f"{name}.tflite"))
             for name, shape in (("dynamic", (None,) * 3), ("fixed", (1, 16, 16)))]
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(__file__)),
               TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-c", LITERT_FUZZ, *paths], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    bad = {k: v for k, v in results.items() if not k.startswith("good")}
    assert len(bad) >= 30
    for label, got in bad.items():
        pattern = next(v for k, v in LITERT_EXPECTED.items() if k in label.split("/")[1])
        assert got.startswith("ValueError: "), (label, got)
        assert re.search(pattern, got), (label, got)
    assert results["fixed/24x24 image"].endswith("takes 16x16 images, got 24x24 (resize first, "
                                                 "or export with a dynamic input size)")
    assert results["good before"] == results["good after"]
    reference = logits.logits_model(tiny).predict(
        np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3)).astype(np.uint8), verbose=0)
    for got in results["good before"]:
        np.testing.assert_allclose(got, reference, atol=1e-4)


def test_fit_size_is_the_one_resize_of_the_tflite_checks():
    images = np.random.default_rng(0).integers(0, 256, (3, 20, 24, 3)).astype(np.uint8)
    assert np.array_equal(litert.fit_size(images, (20, 24)), images)  # already that size
    assert np.array_equal(litert.fit_size(images, None), images)  # a dynamic file
    assert np.array_equal(litert.fit_size(images, (None, None)), images)
    resized = litert.fit_size(images, (16, 16))
    assert resized.shape == (3, 16, 16, 3) and resized.dtype == np.float32
    np.testing.assert_array_equal(resized, np.round(resized))  # whole pixels
    np.testing.assert_allclose(resized, tf.image.resize(images.astype(np.float32), (16, 16)),
                               atol=0.5)  # bilinear, then rounded
