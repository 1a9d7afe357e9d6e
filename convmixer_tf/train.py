"""The training job: build a ConvMixer, fit it on a tf.data pipeline, evaluate, save.

    convmixer-train                       # offline default: digits, ~1-2 min on 2 CPU cores
    python -m convmixer_tf.train --help

    from convmixer_tf.train import TrainConfig, train
    result = train(TrainConfig(epochs=5))
"""

import dataclasses
import os

import keras

from convmixer_tf import data, model as model_lib, presets, saving, schedules


@dataclasses.dataclass
class TrainConfig:
    """Every knob of a run; each default says why it is what it is."""

    dataset: str = "digits"  # ships inside scikit-learn: runs offline, learns in a minute
    image_size: int = 32  # digits are 8x8; 32 gives patch_size 2 a 16x16 token grid
    variant: str = ""  # a MODEL_CONFIGS name; empty = the small model below
    dim: int = 128  # small enough for 2 CPU cores, wide enough for >97% on digits
    depth: int = 4
    kernel_size: int = 5  # the paper's CIFAR setting for small images
    patch_size: int = 2
    activation: str = "gelu"
    epochs: int = 12
    batch_size: int = 64
    max_lr: float = 0.005  # one-cycle peak, AdamW
    weight_decay: float = 0.01
    label_smoothing: float = 0.1  # paper recipe
    clip_norm: float = 1.0  # paper's CIFAR script clips gradient norm at 1
    precision: str = "float32"  # or mixed_float16 / mixed_bfloat16
    seed: int = 0
    output_dir: str = "saved_models"  # <output_dir>/<name>.keras
    name: str = "convmixer_digits"
    verbose: str = "auto"  # Keras progress bar


def build_model(config, num_classes, input_shape):
    """The ConvMixer the config names, returning logits (the loss applies the softmax)."""
    arch = dict(
        dim=config.dim,
        depth=config.depth,
        kernel_size=config.kernel_size,
        patch_size=config.patch_size,
        activation=config.activation,
    )
    if config.variant:
        if config.variant not in presets.MODEL_CONFIGS:
            raise ValueError(
                f"Unknown variant; choose one of {sorted(presets.MODEL_CONFIGS)}. "
                f"Received variant={config.variant!r}"
            )
        arch = presets.MODEL_CONFIGS[config.variant]
    return model_lib.ConvMixer(
        **arch,
        input_shape=input_shape,
        classes=num_classes,
        classifier_activation=None,
        name=config.name,
    )


def save_model(model, path):
    """Saves an uncompiled copy of `model` to `path` atomically (tmp file + rename), so a crash
    mid-save never replaces a good model with half a file."""
    clean = keras.models.clone_model(model)
    clean.set_weights(model.get_weights())
    return saving.save_atomic(clean, path, overwrite=True)


def train(config):
    """Runs `config`; returns dict(model, history, test_accuracy, model_path)."""
    keras.utils.set_random_seed(config.seed)
    keras.mixed_precision.set_global_policy(config.precision)
    if config.dataset != "digits":
        raise ValueError(f"Unknown dataset. Received dataset={config.dataset!r}")
    (x_train, y_train), (x_test, y_test) = data.load_digits(config.image_size, seed=config.seed)
    num_classes = len(data.DIGITS_CLASS_NAMES)
    train_ds = data.make_dataset(x_train, y_train, config.batch_size, True, num_classes, config.seed)
    test_ds = data.make_dataset(x_test, y_test, config.batch_size, False, num_classes)

    model = build_model(config, num_classes, x_train.shape[1:])
    steps = config.epochs * (len(y_train) // config.batch_size)
    model.compile(
        optimizer=keras.optimizers.AdamW(
            schedules.OneCycle(config.max_lr, steps),
            weight_decay=config.weight_decay,
            global_clipnorm=config.clip_norm,
        ),
        loss=keras.losses.CategoricalCrossentropy(
            from_logits=True, label_smoothing=config.label_smoothing
        ),
        metrics=["accuracy"],
    )
    history = model.fit(
        train_ds,
        epochs=config.epochs,
        validation_data=test_ds,
        shuffle=False,  # the tf.data pipeline shuffles
        verbose=config.verbose,
    )
    _, test_accuracy = model.evaluate(test_ds, verbose=0)
    model_path = save_model(model, os.path.join(config.output_dir, config.name + ".keras"))
    return dict(model=model, history=history, test_accuracy=test_accuracy, model_path=model_path)
