"""`convmixer-train` in a process test_callbacks can SIGKILL: with PAUSE_AT=epoch,batch it
writes PAUSE_MARKER at that batch and sleeps (the test kills it there); it prints the epochs
this process ran."""

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

from convmixer_tf import cli
from convmixer_tf.training import callbacks  # noqa: E402


class PauseAt(keras.callbacks.Callback):
    def __init__(self, epoch, batch, marker):
        super().__init__()
        self.at, self.marker, self.epoch = (epoch, batch), marker, None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            with open(self.marker, "w") as f:
                f.write(f"{self.epoch},{batch}")
            time.sleep(600)


class RecordEpochs(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        print(f"EPOCH_DONE {epoch}", flush=True)


def main():
    make = callbacks.make_callbacks

    def make_with_hooks(*args, **kwargs):
        hooks = [RecordEpochs()]
        if os.environ.get("PAUSE_AT"):
            epoch, batch = map(int, os.environ["PAUSE_AT"].split(","))
            hooks.append(PauseAt(epoch, batch, os.environ["PAUSE_MARKER"]))
        return hooks + make(*args, **kwargs)

    callbacks.make_callbacks = make_with_hooks
    return cli.train_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
