"""The training job: build a ConvMixer, fit it on a tf.data pipeline, evaluate, save.

    convmixer-train                       # offline default: digits, ~1-2 min on 2 CPU cores
    python -m convmixer_tf.train --help

    from convmixer_tf.train import TrainConfig, train
    result = train(TrainConfig(epochs=5))
"""

import dataclasses
import os
import tempfile

import keras

from convmixer_tf import callbacks as callbacks_lib, data, distribute, model as model_lib, presets, schedules


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
    # Distribution and fault tolerance (docs/distributed.md). batch_size is the GLOBAL batch.
    strategy: str = "default"  # or mirrored (all local GPUs) / multi_worker (TF_CONFIG)
    xla: str = "auto"  # on / off; auto = on when a GPU is visible (slow on CPU)
    run_dir: str = "runs"  # <run_dir>/<name>/: backup/, checkpoints/, logs/, history.csv
    steps_per_epoch: int = 0  # 0 = the whole training split each epoch


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
    clean = keras.Model.from_config(model.get_config())  # clone_model would keep compile()
    clean.set_weights(model.get_weights())
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".keras", dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        clean.save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def train(config):
    """Runs `config`; returns dict(model, history, test_accuracy, model_path).

    Rerunning the same config after a crash resumes from `<run_dir>/<name>/backup/`."""
    # First: MultiWorkerMirroredStrategy must exist before any other TF op runs.
    strategy = distribute.make_strategy(config.strategy)
    xla = distribute.resolve_xla(config.xla)
    distribute.global_batch_size(config.batch_size, strategy)
    keras.utils.set_random_seed(config.seed)
    keras.mixed_precision.set_global_policy(config.precision)
    if config.dataset != "digits":
        raise ValueError(f"Unknown dataset. Received dataset={config.dataset!r}")
    (x_train, y_train), (x_test, y_test) = data.load_digits(config.image_size, seed=config.seed)
    num_classes = len(data.DIGITS_CLASS_NAMES)
    train_ds = data.make_dataset(x_train, y_train, config.batch_size, True, num_classes, config.seed)
    test_ds = data.make_dataset(x_test, y_test, config.batch_size, False, num_classes)

    steps_per_epoch = len(y_train) // config.batch_size
    if config.steps_per_epoch:  # a fresh shuffle's first batches, every epoch
        steps_per_epoch = min(steps_per_epoch, config.steps_per_epoch)
        train_ds = train_ds.take(steps_per_epoch)
    steps = config.epochs * steps_per_epoch
    test_ds = distribute.shardable(test_ds, config.batch_size)
    with strategy.scope():
        model = build_model(config, num_classes, x_train.shape[1:])
        trainer = distribute.make_trainer(model)
        trainer.compile(
            optimizer=keras.optimizers.AdamW(
                schedules.OneCycle(config.max_lr, steps),
                weight_decay=config.weight_decay,
                global_clipnorm=config.clip_norm,
            ),
            loss=keras.losses.CategoricalCrossentropy(
                from_logits=True, label_smoothing=config.label_smoothing
            ),
            metrics=["accuracy"],
            jit_compile=xla,
        )
    is_chief, task_id = distribute.task_info(strategy)
    history = trainer.fit(
        train_ds,
        epochs=config.epochs,
        validation_data=test_ds,
        shuffle=False,  # the tf.data pipeline shuffles
        verbose=int(config.verbose) if str(config.verbose).isdigit() else config.verbose,
        callbacks=callbacks_lib.make_callbacks(
            os.path.join(config.run_dir, config.name), is_chief=is_chief, task_id=task_id
        ),
    )
    _, test_accuracy = trainer.evaluate(test_ds, verbose=0)
    model_path = save_model(model, os.path.join(config.output_dir, config.name + ".keras"))
    return dict(model=model, history=history, test_accuracy=test_accuracy, model_path=model_path)
