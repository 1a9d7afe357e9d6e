"""Runs in its own process (2 logical CPUs must exist before TF starts): a user's own `model.fit`
script in miniature, as the README shows it: ConvMixer under MirroredStrategy, a global
mixed-precision policy, `distribute.make_trainer` (with `--jit-compile`: `jit_compile=True`),
then `model.save`; then, given export flags, `convmixer-export OUT.keras FLAGS...` in the same
process (as examples/train_and_export.py does), exiting with its status.

    python tests/workers/precision_worker.py [--jit-compile] OUT.keras [POLICY [EXPORT FLAGS...]]
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import convmixer_tf  # noqa: E402
from convmixer_tf.training import distribute  # noqa: E402


def main(path, policy="mixed_bfloat16", *export_flags, jit_compile=False):
    strategy = distribute.make_strategy("mirrored", cpu_replicas=2)
    keras.mixed_precision.set_global_policy(policy)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (64, 16, 16, 3)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, 10, 64), 10)
    with strategy.scope():
        model = convmixer_tf.ConvMixer(dim=16, depth=2, kernel_size=3, patch_size=2,
                                       input_shape=(16, 16, 3), classes=10)
        trainer = distribute.make_trainer(model)
        trainer.compile(keras.optimizers.AdamW(1e-3), "categorical_crossentropy",
                        metrics=["accuracy"], jit_compile=jit_compile)
    trainer.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert type(trainer).__name__ == "ReplicaTrainer", type(trainer)
    model.save(path)
    print(f"saved {path} ({strategy.num_replicas_in_sync} replicas, {policy})")
    if export_flags:
        from convmixer_tf import cli

        sys.exit(cli.export_main([path, *export_flags]))


if __name__ == "__main__":
    args = sys.argv[1:]
    jit = "--jit-compile" in args[:1]
    main(*args[jit:], jit_compile=jit)
