"""Each private Keras/TF/LiteRT access in `compat` still exists and still does what we use it
for, on the installed versions; a failure names the API that changed."""

import ast
import importlib
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from convmixer_tf import compat


def _resolve(owner):
    """The object an owner string in PRIVATE_APIS names."""
    owner = owner.split(" (")[0]
    parts = owner.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(owner)


def _converter(model=None):
    model = model or keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    return tf.lite.TFLiteConverter.from_keras_model(model)


def _compiled():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    return model


INSTANCES = {
    "resume_epoch": lambda: keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]),
    "backup_state": lambda: keras.callbacks.BackupAndRestore("/tmp/convmixer-compat-probe"),
    "trainer_hooks": _compiled,
    "per_tensor_dense": _converter,
    "calibrate_only": _converter,
}


@pytest.mark.parametrize("name", sorted(compat.PRIVATE_APIS))
def test_private_api_exists(name):
    owner, attrs, _ = compat.PRIVATE_APIS[name]
    if owner.startswith("ai_edge_litert"):
        pytest.importorskip("ai_edge_litert")
    # Some are instance attributes: probe an instance; the rest live on a module or class.
    probe = INSTANCES[name]() if name in INSTANCES else _resolve(owner)
    for attr in (a.strip() for a in attrs.split(",")):
        assert hasattr(probe, attr), (
            f"{owner}.{attr} is gone in this release (keras {keras.__version__}, "
            f"tensorflow {tf.__version__}): update convmixer_tf/compat.py ({name})")


def _tiny():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile("sgd", "mse")
    return model, np.ones((8, 4), "float32"), np.zeros((8, 2), "float32")


def test_keras_home_is_the_datasets_parent():
    assert isinstance(compat.keras_home(), str) and compat.keras_home()


def test_set_resume_epoch_makes_fit_start_there():
    model, x, y = _tiny()
    compat.set_resume_epoch(model, 2)
    history = model.fit(x, y, epochs=3, verbose=0)
    assert history.epoch == [2], "keras.Model._initial_epoch no longer sets fit's first epoch"


def test_checkpoint_hooks(tmp_path):
    calls = []

    class Recording(compat.ModelCheckpointBase):
        def save_checkpoint(self, epoch, batch, logs):
            path = self.checkpoint_path(epoch, batch, logs)
            calls.append((epoch, self.should_save(epoch, batch, logs, path), path))

    model, x, y = _tiny()
    cb = Recording(str(tmp_path / "m-{epoch}.keras"), monitor="loss", save_best_only=False)
    model.fit(x, y, epochs=2, verbose=0, callbacks=[cb])
    assert [(e, ok) for e, ok, _ in calls] == [(0, True), (1, True)], (
        "keras.callbacks.ModelCheckpoint._save_model/_should_save_model changed")
    assert calls[1][2].endswith("m-2.keras"), "ModelCheckpoint._get_file_path changed"


def test_backup_state_and_hook(tmp_path):
    seen = []

    class Recording(compat.BackupAndRestoreBase):
        def save_backup(self):
            seen.append((self.current_epoch, self.last_batch_seen, bool(self.metadata_path)))

    model, x, y = _tiny()
    model.fit(x, y, epochs=2, verbose=0, callbacks=[Recording(str(tmp_path))])
    assert seen == [(1, 0, True), (2, 0, True)], (
        "keras.callbacks.BackupAndRestore._save_model/_current_epoch/_last_batch_seen changed")


def test_trainer_hooks():
    built = []

    class Trainer(compat.TrainerBase):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, x):
            return self.dense(x)

        def symbolic_build(self, iterator=None, data_batch=None):
            built.append(True)
            super().symbolic_build(iterator, data_batch)

        def train_step(self, data):
            x, y = data
            with tf.GradientTape() as tape:
                y_pred = self(x, training=True)
                loss = self.compiled_loss_value(y, y_pred)
                loss = loss + self.additional_loss_value(tf.constant(0.0))
            grads = tape.gradient(loss, self.trainable_variables)
            self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
            self.train_loss_tracker.update_state(loss)
            return {"loss": self.train_loss_tracker.result()}

    trainer = Trainer()
    trainer.compile("sgd", "mse")
    _, x, y = _tiny()
    history = trainer.fit(x, y, epochs=1, verbose=0)
    assert built, "keras.Model._maybe_symbolic_build is no longer called by fit"
    assert np.isfinite(history.history["loss"][0])


def test_onednn_enabled_is_a_bool():
    assert isinstance(compat.onednn_enabled(), bool)


def _conv_model():
    inputs = keras.Input((8, 8, 3), name="images")
    x = keras.layers.Conv2D(4, 2, strides=2)(inputs)
    x = keras.layers.Activation("gelu")(x)
    outputs = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, outputs)


def test_tflite_private_converter_and_interpreter_apis():
    litert = pytest.importorskip("ai_edge_litert.interpreter")
    model = _conv_model()

    def converter():
        conv = _converter(model)
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        return conv

    assert compat.per_tensor_dense_quantization(converter()).convert()
    calibrating = compat.calibrate_only(converter())
    calibrating.representative_dataset = lambda: ([np.random.rand(1, 8, 8, 3).astype("f4")]
                                                  for _ in range(4))
    calibrated = calibrating.convert()
    quantized = compat.mlir_quantize(calibrated, tf.float32, denylisted_ops=["GELU"])
    interpreter = litert.Interpreter(model_content=quantized)
    names = {op["op_name"] for op in compat.interpreter_ops(interpreter)}
    assert "CONV_2D" in names and "GELU" in names, names
    assert issubclass(compat.converter_error(), Exception)


PRIVATE_MODULES = ("keras.src", "tensorflow.python", "tensorflow.lite.python")
PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "convmixer_tf")


def _package_sources():
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                yield path, ast.parse(open(path, encoding="utf-8").read())


def test_no_private_access_outside_compat():
    """Outside compat.py the package imports no private module and reads no `_name` of an
    object but its own (`self`/`cls`, or names the package itself defines)."""
    own = set()
    for _, tree in _package_sources():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                own.add(node.name)
            elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                  and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                own.add(node.attr)
            elif isinstance(node, ast.Name):
                own.add(node.id)
    problems = []
    for path, tree in _package_sources():
        if os.path.basename(path) == "compat.py":
            continue
        where = os.path.relpath(path, PACKAGE)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(
                    PRIVATE_MODULES):
                problems.append(f"{where}:{node.lineno} imports {node.module}")
            if isinstance(node, ast.Import):
                problems += [f"{where}:{node.lineno} imports {a.name}" for a in node.names
                             if a.name.startswith(PRIVATE_MODULES)]
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                    and not node.attr.startswith("__") and node.attr not in own):
                problems.append(f"{where}:{node.lineno} reads {ast.unparse(node)}")
    assert not problems, "private APIs outside compat.py: " + "; ".join(problems)
