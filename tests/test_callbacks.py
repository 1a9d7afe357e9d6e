"""Run directory: atomic writes, SIGKILL + restart resumes, NaN never overwrites a backup."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from convmixer_tf import cli, model as model_lib
from convmixer_tf.training import callbacks, train

from helpers import subprocess_env, worker


def test_atomic_write_keeps_old_file_when_writer_fails_or_is_killed(tmp_path):
    target = tmp_path / "state.json"
    target.write_text("old")

    def failing(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        callbacks.atomic_write(str(target), failing)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["state.json"]

    # SIGKILL in the middle of a write: the target still holds the old, complete content.
    marker = tmp_path / "writing"
    script = (
        "import time, sys\n"
        "from convmixer_tf.artifacts import atomic_write\n"
        "def write(tmp):\n"
        "    open(tmp, 'w').write('ha')\n"
        f"    open({str(marker)!r}, 'w').close()\n"
        "    time.sleep(600)\n"
        f"atomic_write({str(target)!r}, write)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], env=subprocess_env())
    try:
        _wait_for(marker, proc, 60)
    finally:
        proc.kill()
        proc.wait()
    assert target.read_text() == "old"


def _wait_for(path, proc, timeout):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, "the process ended before reaching the kill point"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.2)


def _history_epochs(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0][0] == "epoch" and "val_accuracy" in rows[0]
    return [int(r[0]) for r in rows[1:]]


def test_sigkill_mid_epoch_then_same_command_resumes(tmp_path):
    run = tmp_path / "runs" / "job"
    argv = [
        sys.executable, worker("resume_worker.py"),
        "--name", "job", "--no-export", "--image-size", "16", "--dim", "8", "--depth", "1",
        "--kernel-size", "3", "--epochs", "3", "--steps-per-epoch", "3", "--batch-size", "16",
        "--xla", "off", "--verbose", "0", "--output-dir", str(tmp_path / "models"),
        "--run-dir", str(tmp_path / "runs"),
    ]
    marker = tmp_path / "paused"
    first = subprocess.Popen(
        argv, env=subprocess_env(PAUSE_AT="1,1", PAUSE_MARKER=str(marker)), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )
    try:
        _wait_for(marker, first, 240)  # epoch 0 done, 2 batches of epoch 1 done
        first.send_signal(signal.SIGKILL)
        output = first.communicate(timeout=60)[0]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == -signal.SIGKILL
    assert "EPOCH_DONE 0" in output and "EPOCH_DONE 1" not in output
    metadata = json.loads((run / "backup" / "training_metadata.json").read_text())
    assert metadata["epoch"] == 1
    assert (run / "backup" / metadata["weights"]).exists()
    assert _history_epochs(run / "history.csv") == [0]
    keras.saving.load_model(run / "checkpoints" / "last.keras")  # complete, plain model

    second = subprocess.run(argv, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    done = [int(line.split()[1]) for line in second.stdout.splitlines()
            if line.startswith("EPOCH_DONE")]
    assert done == [1, 2]  # epoch 0 not redone; same final epoch count as one clean run
    assert _history_epochs(run / "history.csv") == [0, 1, 2]
    assert not (run / "backup").exists()  # finished normally: backup removed, as Keras does
    assert os.listdir(run / "logs" / "train") and os.listdir(run / "logs" / "validation")
    best = json.loads((run / "checkpoints" / "best.json").read_text())
    assert best["monitor"] == "val_accuracy" and 1 <= best["epoch"] <= 3
    assert not [f for f in os.listdir(run / "checkpoints") if f.startswith(".tmp-")]
    saved = keras.saving.load_model(tmp_path / "models" / "job.keras")
    assert saved.name == "job"
    # The resumed run read the same data (order keyed by (seed, epoch), augmentation by
    # position) as an uninterrupted one: bit-identical weights on CPU.
    clean = [a if not a.startswith(str(tmp_path)) else a.replace(str(tmp_path),
                                                                   str(tmp_path / "clean"))
             for a in argv]
    third = subprocess.run(clean, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    uninterrupted = keras.saving.load_model(tmp_path / "clean" / "models" / "job.keras")
    diff = max(float(np.max(np.abs(a - b))) for a, b in
               zip(saved.get_weights(), uninterrupted.get_weights()))
    print(f"resume max-abs weight diff: {diff}")
    assert diff == 0.0


def test_nan_stops_training_without_touching_backup_or_checkpoints(tmp_path, tiny_model):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (32, 16, 16, 3)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, 10, 32), 10)
    model = tiny_model(name="convmixer")
    model.compile(keras.optimizers.SGD(0.01),
                  keras.losses.CategoricalCrossentropy(from_logits=True), metrics=["accuracy"])

    class PoisonAtEpoch1(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                for v in self.model.trainable_variables:
                    v.assign(np.full(v.shape, np.nan, v.dtype))

    run_cbs = callbacks.make_callbacks(str(tmp_path), train.save_trained_model, monitor="val_loss",
                                       tensorboard=False)
    history = model.fit(x, y, batch_size=16, epochs=4, validation_data=(x, y), verbose=0,
                        callbacks=[PoisonAtEpoch1()] + run_cbs)
    assert history.epoch == [0, 1]  # TerminateOnNaN stopped in epoch 1
    backup = callbacks.AtomicBackupAndRestore(str(tmp_path / "backup"))
    assert backup.read_metadata()["epoch"] == 1  # kept, still the finite epoch-0 state
    last = keras.saving.load_model(tmp_path / "checkpoints" / "last.keras")
    assert all(np.isfinite(w).all() for w in last.get_weights())
    assert _history_epochs(tmp_path / "history.csv") == [0, 1]

    # Rerunning resumes from the finite backup, not from the NaN weights.
    fresh = tiny_model(name="convmixer", seed=1)
    fresh.compile(keras.optimizers.SGD(0.01),
                  keras.losses.CategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    history = fresh.fit(x, y, batch_size=16, epochs=3, validation_data=(x, y), verbose=0,
                        callbacks=callbacks.make_callbacks(
                            str(tmp_path), train.save_trained_model, monitor="val_loss",
                            tensorboard=False))
    assert history.epoch == [1, 2] and np.isfinite(history.history["loss"]).all()
    assert _history_epochs(tmp_path / "history.csv") == [0, 1, 2]


def test_backup_from_another_model_is_a_clear_error(tmp_path):
    x = np.zeros((8, 16, 16, 3), "float32")
    y = keras.utils.to_categorical(np.zeros(8), 10)
    for depth, expect_error in ((1, False), (2, True)):
        model = model_lib.ConvMixer(dim=8, depth=depth, kernel_size=3, patch_size=2,
                                    input_shape=(16, 16, 3), classes=10)
        model.compile("sgd", "categorical_crossentropy")
        cbs = [callbacks.AtomicBackupAndRestore(str(tmp_path / "backup"))]
        if not expect_error:
            # Stop after epoch 0 as if killed: the backup stays.
            cbs[0]._finished = False
            cbs[0].on_train_end = lambda logs=None: None
            model.fit(x, y, epochs=1, verbose=0, callbacks=cbs)
        else:
            with pytest.raises(ValueError, match="different model"):
                model.fit(x, y, epochs=2, verbose=0, callbacks=cbs)

