"""Smoke run of an installed convmixer_tf (run by tests/test_packaging.py with a fresh venv's
python, cwd a temp dir): every variant builds, a tiny fit on digits, its SavedModel export and
validation, TFLite conversion and LiteRT validation, predict, and a tiny prepared tfds data set.
Prints "smoke ok" last; any failure raises."""

import os
import subprocess
import sys

import numpy as np

import convmixer_tf

SCRIPTS = os.path.dirname(sys.executable)


def run(*command):
    print("$", " ".join(command), flush=True)
    result = subprocess.run([os.path.join(SCRIPTS, command[0]), *command[1:]],
                            capture_output=True, text=True)
    print(result.stdout[-3000:], result.stderr[-3000:], sep="\n", flush=True)
    assert result.returncode == 0, f"{command[0]} exited {result.returncode}"
    return result.stdout


def build_variants():
    assert "site-packages" in convmixer_tf.__file__, convmixer_tf.__file__  # the install
    for name in ("ConvMixer256_8", "ConvMixer768_32", "ConvMixer1024_20", "ConvMixer1536_20"):
        model = getattr(convmixer_tf, name)(input_shape=(56, 56, 3), classes=7)
        out = model.predict(np.zeros((2, 56, 56, 3), np.uint8), verbose=0)
        assert out.shape == (2, 7) and np.allclose(out.sum(1), 1, atol=1e-4), (name, out)
        print(name, model.count_params(), "ok", flush=True)


def tiny_job():
    import importlib.util

    assert importlib.util.find_spec("tensorflow_serving") is None  # the export needs none
    out = run("convmixer-train", "--dim", "32", "--depth", "2", "--epochs", "1",
              "--steps-per-epoch", "6", "--output-dir", "saved_models", "--run-dir", "runs")
    assert "held-out accuracy" in out
    assert os.path.isfile("saved_models/convmixer_digits/1/saved_model.pb")
    assert os.path.isfile("saved_models/convmixer_digits/1/assets.extra/tf_serving_warmup_requests")
    assert os.path.isfile("saved_models/models.config")
    tflite_dir = "saved_models/convmixer_digits_tflite/1"  # the first version of the set
    names = sorted(os.listdir(tflite_dir))
    for mode in ("float32", "float16", "dynamic_int8", "int8"):
        assert any(mode in n and n.endswith(".tflite") for n in names), (mode, names)
    from PIL import Image

    from convmixer_tf.training.data import sources

    (_, _), (x_test, _) = sources.load_digits(image_size=32)
    Image.fromarray(np.asarray(x_test[0], np.uint8)).save("digit.png")
    int8 = [n for n in names if n.endswith("int8.tflite") and "dynamic" not in n][0]
    out = run("convmixer-predict", os.path.join(tflite_dir, int8), "digit.png")
    assert out.strip().startswith("digit.png"), out


def tiny_tfds():
    import tensorflow_datasets as tfds

    from convmixer_tf.training.data import pipeline

    class ConvmixerSmokeShapes(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(names=["dark", "light"])}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(8), "test": self._generate_examples(4)}

        def _generate_examples(self, n):
            for i in range(n):
                yield i, {"image": np.full((9 + i, 10, 3), 40 + 170 * (i % 2), np.uint8),
                          "label": i % 2}

    ConvmixerSmokeShapes(data_dir="tfds").download_and_prepare()
    ds = pipeline.build_datasets("tfds:convmixer_smoke_shapes", image_size=8, global_batch_size=4,
                                 data_dir="tfds")
    assert ds.class_names == ("dark", "light") and (ds.train_size, ds.test_size) == (8, 4)
    x, y = next(iter(ds.train))
    assert tuple(x.shape) == (4, 8, 8, 3) and tuple(y.shape) == (4, 2)


if __name__ == "__main__":
    build_variants()
    tiny_job()
    tiny_tfds()
    print("smoke ok")
