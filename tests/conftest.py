"""Shared test setup: quiet TF logs, float32 policy restored after every test, the `--large`
flag, and the fixtures many test files receive (`tiny_model`, `image_folder`,
`digits_export`). Plain helpers (ROOT, subprocess_env, worker paths) are in helpers.py."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _float32_policy():
    yield
    keras.mixed_precision.set_global_policy("float32")


def pytest_addoption(parser):
    parser.addoption("--large", action="store_true", help="also run tests marked large")


@pytest.hookimpl(trylast=True)  # after xdist's own hook, whose group suffix pytest 9 drops
def pytest_collection_modifyitems(config, items):
    _xdist_groups(config, items)
    if config.getoption("--large"):
        return
    skip = pytest.mark.skip(reason="large: run with --large")
    for item in items:
        if "large" in item.keywords:
            item.add_marker(skip)


def _xdist_groups(config, items):
    """`--dist loadgroup` schedules by node id: xdist 3.8 appends "@<group>" through
    `item._nodeid`, which pytest 9 no longer reads (it keeps `item._id`), so every
    `xdist_group` mark was ignored and a shared module fixture was built on both workers.
    The same suffix, where pytest 9 keeps it (drop this once xdist sets it itself:
    pytest-dev/pytest-xdist#1386, fix proposed in #1388)."""
    if not getattr(config.option, "loadgroup", False):  # set on xdist workers only
        return
    from _pytest.nodeid import coerce_node_id

    for item in items:
        names = sorted({str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
                        for mark in item.iter_markers("xdist_group")})
        if names and "@" not in item.nodeid:
            item._id = coerce_node_id(f"{item.nodeid}@{'_'.join(names)}")


def _tiny_convmixer(classes=10, *, seed=0, size=16, bn_stats=False, **kwargs):
    """A seeded random-weight ConvMixer-8/1 (k3, p2) on size x size images returning logits
    (override any ConvMixer argument); `bn_stats=True` gives its BatchNorms non-trivial
    statistics, so a wrong normalisation shows in the logits."""
    from convmixer_tf import model as model_lib

    keras.utils.set_random_seed(seed)
    args = dict(dim=8, depth=1, kernel_size=3, patch_size=2, input_shape=(size, size, 3),
                classes=classes, classifier_activation=None, name="tiny")
    model = model_lib.ConvMixer(**{**args, **kwargs})
    if bn_stats:
        rng = np.random.default_rng(seed)
        for layer in model.layers:
            if layer.name.endswith("_bn"):
                gamma, beta, mean, var = layer.get_weights()
                layer.set_weights([gamma * rng.uniform(0.5, 2, gamma.shape),
                                   beta + rng.normal(0, 0.3, beta.shape),
                                   mean + rng.normal(0, 0.3, mean.shape),
                                   var * rng.uniform(0.5, 2, var.shape)])
    return model


@pytest.fixture(scope="session")
def tiny_model():
    """Factory: `tiny_model(classes=10, seed=0, size=16, bn_stats=False, **ConvMixer args)`."""
    return _tiny_convmixer


def _image_folder(root, classes=("cat", "dog"), per_class=5, size=(20, 20), seed=0):
    """Writes root/<class>/<i>.png random RGB images (an image-folder data set); returns root."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name in classes:
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(root, name, f"{i}.png"))
    return str(root)


@pytest.fixture(scope="session")
def image_folder():
    """Factory: `image_folder(root, classes=("cat", "dog"), per_class=5, size=(20, 20))`."""
    return _image_folder


@pytest.fixture(scope="session")
def digits_export(tmp_path_factory):
    """A tiny 10-class model exported (SavedModel, float32 and full-int8 with uint8 I/O) with
    digits' test split (at 16 px) as the gate's held-out images, and its .keras + metadata;
    shared by the tests marked `xdist_group("digits_export")` (built once, on one worker)."""
    import convmixer_tf
    from convmixer_tf import artifacts
    from convmixer_tf.training.data import sources

    root = tmp_path_factory.mktemp("export")
    model = _tiny_convmixer(bn_stats=True)
    (x_train, _), (x_test, y_test) = sources.load_digits(16)
    result = convmixer_tf.export(model, str(root), name="tiny",
                                 class_names=sources.DIGITS_CLASS_NAMES,
                                 calibration_images=x_train[:64], held_out=(x_test, y_test),
                                 tflite_modes=["float32", "full_int8"], max_accuracy_drop=100,
                                 int8_io="uint8")
    model_path = str(root / "tiny.keras")
    artifacts.save_model(model, model_path)
    artifacts.write_metadata(model_path, artifacts.Metadata(sources.DIGITS_CLASS_NAMES, (16, 16)))
    report = result["tflite"]
    return dict(root=root, result=result, model_path=model_path, labels=y_test,
                saved=str(root / "tiny"),
                tflite=os.path.join(report["path"], report["builds"]["float32"]["files"][0]))
