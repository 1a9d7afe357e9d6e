"""The run folder's callbacks for `model.fit` (its layout and rules: `run_folder`): resumable
backups, checkpoints, history, TensorBoard logs.

Killing a run at any moment and rerunning the same command resumes after the last finished
epoch: every file is written to a temporary name and renamed (`os.replace` is atomic), and the
backup's metadata names its weights file, so a kill between two writes leaves the old pair.
"""

import csv
import glob
import hashlib
import json
import logging
import math
import os

import keras

from convmixer_tf import compat
from convmixer_tf.artifacts import atomic_write, write_json
from convmixer_tf.training import distribute, run_folder

logger = logging.getLogger(__name__)


def _finite(logs):
    return all(
        math.isfinite(v) for k, v in (logs or {}).items() if "loss" in k and _is_number(v)
    )


def _is_number(value):
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


class AtomicBackupAndRestore(compat.BackupAndRestoreBase):
    """`keras.callbacks.BackupAndRestore` whose backup survives a kill at any instant.

    Keras's writes `latest.weights.h5` in place, then the epoch: a kill mid-write corrupts the
    weights, and a kill between the two resumes the wrong epoch. Here each save writes
    `epoch-<n>.weights.h5` atomically, then the metadata (which names it) atomically, then
    removes older weight files. Non-finite losses are never backed up, and the backup is only
    deleted when training finished normally (not when TerminateOnNaN stopped it).
    """

    def __init__(self, backup_dir, save_freq="epoch", delete_checkpoint=True):
        super().__init__(backup_dir, save_freq=save_freq, delete_checkpoint=delete_checkpoint)
        self.metadata_path = os.path.join(backup_dir, run_folder.BACKUP_METADATA)
        self._finished = False

    def read_metadata(self):
        """The last backup's `{"epoch", "batch", "weights"}`, or `None` when there is none."""
        if not os.path.exists(self.metadata_path):
            return None
        with open(self.metadata_path) as f:
            return json.load(f)

    def on_train_begin(self, logs=None):
        self._finished = False
        for stale in glob.glob(os.path.join(self.backup_dir, ".tmp-*")):  # from a killed save
            os.remove(stale)
        metadata = self.read_metadata()
        if metadata is None:
            return
        if not self.model.built:
            raise ValueError("BackupAndRestore needs a built model before fit()")
        weights = os.path.join(self.backup_dir, metadata["weights"])
        if metadata.get("signature", self._signature()) != self._signature():
            raise ValueError(
                f"Cannot resume from the backup in {self.backup_dir}: it was written by a "
                "different model (other layers or shapes). Delete it, or use another run name."
            )
        if self.model.optimizer is not None and not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)
        try:
            self.model.load_weights(weights)
        except (ValueError, OSError, KeyError) as error:
            raise ValueError(
                f"Cannot resume from the backup in {self.backup_dir} ({error}). It was written "
                "by a different model or is damaged: delete it, or use another run name."
            ) from error
        compat.set_resume_epoch(self.model, metadata["epoch"])
        self.current_epoch = metadata["epoch"]

    def on_epoch_end(self, epoch, logs=None):
        self.current_epoch = epoch + 1
        self.last_batch_seen = 0
        if not _finite(logs):
            return
        self._finished = self.current_epoch >= self.params.get("epochs", math.inf)
        if self.save_freq == "epoch":
            self.save_backup()

    def on_train_batch_end(self, batch, logs=None):
        if _finite(logs):
            super().on_train_batch_end(batch, logs)

    def save_backup(self):
        name = f"epoch-{self.current_epoch:05d}-batch-{self.last_batch_seen:07d}.weights.h5"
        atomic_write(
            os.path.join(self.backup_dir, name),
            lambda tmp: self.model.save_weights(tmp, overwrite=True),
        )
        write_json(
            self.metadata_path,
            {"epoch": self.current_epoch, "batch": self.last_batch_seen, "weights": name,
             "signature": self._signature()},
        )
        for old in glob.glob(os.path.join(self.backup_dir, "*.weights.h5")):
            if os.path.basename(old) != name:
                os.remove(old)

    def _signature(self):
        """Fingerprint of the model's variables (paths and shapes): Keras's load_weights
        skips mismatched sublayers with a mere warning."""
        shapes = [(v.path, list(v.shape)) for v in self.model.weights]
        return hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16]

    def on_train_end(self, logs=None):
        if self._finished:
            super().on_train_end(logs)


class AtomicModelCheckpoint(compat.ModelCheckpointBase):
    """`keras.callbacks.ModelCheckpoint` that writes the plain functional model (the trainer's
    inner model) with `save_model(model, path)` (atomic, stock layers), never a non-finite one,
    and, with `save_best_only`, remembers the best value across restarts in `<path>.json`."""

    def __init__(self, filepath, save_model, **kwargs):
        super().__init__(filepath, **kwargs)
        self._save = save_model

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        state_path = os.path.splitext(self.filepath)[0] + ".json"
        if self.save_best_only and os.path.exists(state_path):
            with open(state_path) as f:
                state = json.load(f)
            if state.get("monitor") == self.monitor:
                self.best = state["best"]

    def save_checkpoint(self, epoch, batch, logs):
        if not _finite(logs):
            return
        filepath = self.checkpoint_path(epoch, batch, logs)
        if not self.should_save(epoch, batch, logs, filepath):
            return
        self._save(distribute.inner_model(self.model), filepath)
        if self.save_best_only:
            write_json(
                os.path.splitext(filepath)[0] + ".json",
                {"monitor": self.monitor, "best": float(self.best), "epoch": epoch + 1},
            )
        if self.verbose > 0:
            logger.info(f"Epoch {epoch + 1}: saved {filepath}")


class ResumableCSVLogger(keras.callbacks.CSVLogger):
    """CSVLogger appending on resume: rows of epochs the backup will redo are dropped first,
    so `history.csv` has each finished epoch exactly once; a fresh run starts a fresh file."""

    def __init__(self, filename, backup=None, separator=","):
        super().__init__(filename, separator=separator, append=True)
        self.backup = backup

    def on_train_begin(self, logs=None):
        metadata = self.backup.read_metadata() if self.backup is not None else None
        resume_epoch = metadata["epoch"] if metadata else 0
        rows = []
        if resume_epoch and os.path.exists(self.filename):
            with open(self.filename, newline="") as f:
                rows = list(csv.reader(f, delimiter=self.sep))
        kept = rows[:1] + [r for r in rows[1:] if r and int(r[0]) < resume_epoch]

        def write(tmp):
            with open(tmp, "w", newline="") as f:
                csv.writer(f, delimiter=self.sep).writerows(kept)

        atomic_write(self.filename, write)
        # Keras writes the header only to an empty file; keep ours (same keys) otherwise.
        super().on_train_begin(logs)
        if kept:
            self.keys = kept[0][1:]
            self.append_header = False


def make_callbacks(folder, save_model, monitor="val_accuracy", tensorboard=True,
                   delete_backup_at_end=True):
    """The callbacks writing this task's run folder `folder` (`run_folder.task_folder`), in
    the order their `on_epoch_end` must run: the backup last, so a kill before it only makes
    the restart redo (and re-log) that epoch. `delete_backup_at_end=False` keeps the backup
    after the last epoch (the training job deletes it only once its final save succeeded:
    `run_folder.delete_backup`)."""
    os.makedirs(folder, exist_ok=True)
    backup = AtomicBackupAndRestore(os.path.join(folder, run_folder.BACKUP),
                                    delete_checkpoint=delete_backup_at_end)
    checkpoints = os.path.join(folder, run_folder.CHECKPOINTS)
    callbacks = [
        keras.callbacks.TerminateOnNaN(),
        ResumableCSVLogger(os.path.join(folder, run_folder.HISTORY), backup=backup),
    ]
    if tensorboard:
        callbacks.append(keras.callbacks.TensorBoard(os.path.join(folder, run_folder.LOGS)))
    callbacks += [
        AtomicModelCheckpoint(os.path.join(checkpoints, "last.keras"), save_model),
        AtomicModelCheckpoint(
            os.path.join(checkpoints, "best.keras"),
            save_model,
            monitor=monitor,
            mode="max" if "acc" in monitor else "min",
            save_best_only=True,
        ),
        backup,
    ]
    return callbacks
