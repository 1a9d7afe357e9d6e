"""Every private Keras / TensorFlow / LiteRT access of the package, each behind one named
function or base class, so that a release which changes one breaks here, by name.

`PRIVATE_APIS` lists them (what, where it lives, why we need it); tests/test_compat.py checks
each one against the installed versions and fails naming the API that changed. Nothing else in
the package touches a private name of another library.
"""

import keras

# name -> (owner, private attribute, why we use it). test_compat asserts every one exists.
PRIVATE_APIS = {
    "keras_home": ("keras.src.backend.config", "keras_home",
                   "where keras.datasets caches files ($KERAS_HOME); no public accessor"),
    "resume_epoch": ("keras.Model", "_initial_epoch",
                     "fit() starts from it: BackupAndRestore's own resume mechanism"),
    "backup_state": ("keras.callbacks.BackupAndRestore",
                     "_current_epoch, _last_batch_seen, _training_metadata_path, _save_model",
                     "an atomic backup replaces Keras's in-place write"),
    "checkpoint_hooks": ("keras.callbacks.ModelCheckpoint",
                         "_save_model, _get_file_path, _should_save_model",
                         "save the plain inner model atomically, Keras's file naming and "
                         "best-only logic kept"),
    "trainer_hooks": ("keras.Model (TensorFlow trainer)",
                      "_maybe_symbolic_build, _compile_loss, _aggregate_additional_loss, "
                      "_loss_tracker", "a train_step with per-replica XLA (ReplicaTrainer)"),
    "onednn_enabled": ("tensorflow.python.util._pywrap_util_port", "IsMklEnabled",
                       "TF's own oneDNN switch (env var included)"),
    "per_tensor_dense": ("tf.lite.TFLiteConverter",
                         "_experimental_disable_per_channel_quantization_for_dense_layers",
                         "a hybrid dense layer that old runtimes (2.9+) run"),
    "calibrate_only": ("tf.lite.TFLiteConverter", "_experimental_calibrate_only",
                       "calibrate once, quantize every int8 mode from it"),
    "converter_error": ("tensorflow.lite.python.convert_phase", "ConverterError",
                        "what the converter raises for a graph it cannot convert (no public "
                        "alias)"),
    "mlir_quantize": ("tensorflow.lite.python.convert", "mlir_quantize",
                      "quantize a calibrated model with a denylist (int8_float_gelu)"),
    "interpreter_ops": ("ai_edge_litert.interpreter.Interpreter", "_get_ops_details",
                        "the op list: XNNPACK delegation, the patch size of a .tflite"),
}


# === Keras ===

def keras_home():
    """Keras's home folder (`$KERAS_HOME`, default ~/.keras), unexpanded."""
    from keras.src.backend import config  # no public accessor

    return config.keras_home()


def set_resume_epoch(model, epoch):
    """Makes the next `model.fit` start at `epoch` (as BackupAndRestore does on resume)."""
    model._initial_epoch = epoch  # noqa: SLF001


class BackupAndRestoreBase(keras.callbacks.BackupAndRestore):
    """BackupAndRestore with its private state as properties and its write as `save_backup()`."""

    current_epoch = property(lambda self: self._current_epoch,
                             lambda self, value: setattr(self, "_current_epoch", value))
    last_batch_seen = property(lambda self: self._last_batch_seen,
                               lambda self, value: setattr(self, "_last_batch_seen", value))
    metadata_path = property(lambda self: self._training_metadata_path,
                             lambda self, value: setattr(self, "_training_metadata_path", value))

    def _save_model(self):  # Keras calls it at each save point
        self.save_backup()

    def save_backup(self):
        super()._save_model()


class ModelCheckpointBase(keras.callbacks.ModelCheckpoint):
    """ModelCheckpoint whose write is `save_checkpoint(epoch, batch, logs)`, with Keras's file
    naming (`checkpoint_path`) and best-only decision (`should_save`) public."""

    def _save_model(self, epoch, batch, logs):  # Keras calls it at each save point
        self.save_checkpoint(epoch, batch, logs)

    def save_checkpoint(self, epoch, batch, logs):
        super()._save_model(epoch, batch, logs)

    def checkpoint_path(self, epoch, batch, logs):
        return self._get_file_path(epoch, batch, logs)

    def should_save(self, epoch, batch, logs, filepath):
        """Keras's decision (best-only, monitor); updates `self.best` like Keras does."""
        return self._should_save_model(epoch, batch, logs, filepath)


class TrainerBase(keras.Model):
    """keras.Model with the pieces a custom `train_step` needs: the compiled loss, extra
    losses, the loss tracker, and the hook where fit() builds the model symbolically."""

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):  # called by fit/evaluate
        self.symbolic_build(iterator, data_batch)

    def symbolic_build(self, iterator=None, data_batch=None):
        super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def compiled_loss_value(self, y, y_pred, sample_weight=None):
        return self._compile_loss(y, y_pred, sample_weight)

    def additional_loss_value(self, loss):
        return self._aggregate_additional_loss(loss)

    @property
    def train_loss_tracker(self):
        return self._loss_tracker


# === TensorFlow ===

def onednn_enabled():
    """Whether TF runs its convolutions on oneDNN (x86 builds unless TF_ENABLE_ONEDNN_OPTS=0);
    False when TF no longer exposes the switch."""
    try:
        from tensorflow.python.util import _pywrap_util_port

        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):
        return False


# === TFLite converter and LiteRT ===

def per_tensor_dense_quantization(converter):
    """Dynamic-range dense layers quantized per tensor (FULLY_CONNECTED version <= 9)."""
    converter._experimental_disable_per_channel_quantization_for_dense_layers = True  # noqa: SLF001
    return converter


def calibrate_only(converter):
    """`convert()` returns the float model with recorded ranges (as QuantizationDebugger)."""
    converter._experimental_calibrate_only = True  # noqa: SLF001
    return converter


def converter_error():
    """The exception class `TFLiteConverter.convert` raises for a graph it cannot convert."""
    from tensorflow.lite.python.convert_phase import ConverterError

    return ConverterError


def mlir_quantize(calibrated, io_dtype, denylisted_ops=None):
    """Full-integer quantization of a calibrated model, `denylisted_ops` kept in float."""
    from tensorflow.lite.python import convert

    return convert.mlir_quantize(calibrated, input_data_type=io_dtype,
                                 output_data_type=io_dtype, denylisted_ops=denylisted_ops)


def interpreter_ops(interpreter):
    """The interpreter's ops: dicts with op_name, inputs, outputs."""
    return interpreter._get_ops_details()  # noqa: SLF001
