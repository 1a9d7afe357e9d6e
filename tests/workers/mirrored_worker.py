"""Runs in its own process (2 logical CPU devices must exist before TF starts): trains tiny
models under MirroredStrategy in each precision given (default float32) and prints one JSON
line of measurements for test_distribute.

    python tests/workers/mirrored_worker.py [PRECISION ...]
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2
)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from convmixer_tf import model as model_lib
from convmixer_tf.training import distribute  # noqa: E402

STEPS, BATCH = 6, 16


def dataset():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (STEPS * BATCH, 16, 16, 3)).astype("uint8")
    y = keras.utils.to_categorical(rng.integers(0, 10, STEPS * BATCH), 10)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH, drop_remainder=True)


def convmixer():
    return model_lib.ConvMixer(
        dim=8, depth=1, kernel_size=3, patch_size=2, input_shape=(16, 16, 3), classes=10,
        classifier_activation=None,
    )


def mlp():
    """No BatchNorm: 2 replicas must then give exactly the single-device result."""
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(16, activation="gelu")(x)
    return keras.Model(inputs, keras.layers.Dense(10)(x))


def fit(build, strategy, xla, precision, stock=False, optimizer=None):
    """Trains 2 epochs of STEPS; returns (losses, weights, max difference between replicas,
    largest weight change)."""
    keras.mixed_precision.set_global_policy(precision)
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = build()
        trainer = model if stock else distribute.ReplicaTrainer(model)
        trainer.compile(
            optimizer or keras.optimizers.AdamW(3e-3),
            keras.losses.CategoricalCrossentropy(from_logits=True),
            jit_compile=xla,
        )
    if precision == "mixed_float16":  # dynamic loss scaling is on
        assert isinstance(trainer.optimizer, keras.optimizers.LossScaleOptimizer)
    initial = model.get_weights()
    history = trainer.fit(dataset(), epochs=2, verbose=0)
    spread = 0.0
    for variable in model.variables:
        copies = [v.numpy() for v in getattr(variable.value, "values", [variable.value])]
        spread = max([spread] + [float(np.abs(c - copies[0]).max()) for c in copies])
    keras.mixed_precision.set_global_policy("float32")
    weights = [w.astype("float64") for w in model.get_weights()]
    return history.history["loss"], weights, spread, max_diff(weights, initial)


def max_diff(a, b):
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


def main(precisions):
    mirrored = distribute.make_strategy("mirrored")
    report = {"replicas": mirrored.num_replicas_in_sync}
    for precision in precisions:
        loss_off, w_off, spread_off, moved = fit(convmixer, mirrored, False, precision)
        loss_on, w_on, spread_on, _ = fit(convmixer, mirrored, True, precision)
        report[precision] = dict(
            loss_off=loss_off, loss_on=loss_on, spread_off=spread_off, spread_on=spread_on,
            xla_vs_no_xla=max_diff(w_on, w_off), moved=moved,
        )
    # Control: stock Keras under the same strategy lets BN moving statistics drift apart.
    report["stock_spread"] = fit(convmixer, mirrored, False, "float32", stock=True)[2]
    # Gradient scaling: 2 replicas == 1 device for a BN-free model (same global batch). Plain
    # SGD, since Adam would hide a gradient scaled by a constant (replica count).
    w_two = fit(mlp, mirrored, False, "float32", optimizer=keras.optimizers.SGD(0.5))[1]
    w_one = fit(mlp, tf.distribute.get_strategy(), False, "float32", stock=True,
                optimizer=keras.optimizers.SGD(0.5))[1]
    report["two_replicas_vs_one_device"] = max_diff(w_two, w_one)
    print("REPORT " + json.dumps(report))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["float32"]))
