"""The training job: build a ConvMixer, fit it on a tf.data pipeline, evaluate, save.

    convmixer-train                       # offline default: digits, ~1-2 min on 2 CPU cores
    python -m convmixer_tf.train --help

    from convmixer_tf.train import TrainConfig, train
    result = train(TrainConfig(epochs=5))
"""

import dataclasses
import os

import keras

from convmixer_tf import augment, data, distribute, model as model_lib, presets, saving, schedules
from convmixer_tf import callbacks as callbacks_lib, performance


@dataclasses.dataclass
class TrainConfig:
    """Every knob of a run; each default says why it is what it is."""

    dataset: str = "digits"  # ships inside scikit-learn: runs offline, learns in a minute
    # ... or a prepared tfds name (cifar10, tfds:imagenette, ...) or an image folder path.
    data_dir: str = ""  # where tfds data sets are prepared; "" = tfds default
    preset: str = ""  # a presets.TRAIN_PRESETS recipe (cifar10, imagenet); given flags win
    validation_split: float = 0.1  # held out when a folder / tfds set has no test split
    eval_crop_pct: float = 1.0  # test: short side to size / crop_pct, centre crop (timm)
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
    clip_norm: float = 1.0  # paper's CIFAR script clips gradient norm at 1; 0 = no clipping
    adam_epsilon: float = 1e-7  # Keras default; the ImageNet recipe uses 1e-3 (timm --opt-eps)
    decay_all_weights: bool = True  # False: no weight decay on 1-D weights (BN, bias), as timm
    # Augmentation (convmixer_tf.augment, in tf.data); all off by default: digits need none.
    crop_scale: float = 0.0  # random resized crop of area [crop_scale, 1]; 0 = off
    crop_ratio: float = 4 / 3  # its aspect ratio range [1 / crop_ratio, crop_ratio]
    hflip: float = 0.0  # horizontal flip probability
    randaug_n: int = 0  # RandAugment ops per image; 0 = off
    randaug_m: float = 9.0  # RandAugment magnitude, timm's 0-10 scale
    randaug_mstd: float = 0.5  # magnitude noise std (timm mstd)
    randaug_prob: float = 0.5  # probability each drawn op is applied
    color_jitter: float = 0.0  # brightness/contrast/saturation jitter strength
    erase_prob: float = 0.0  # random erasing probability
    erase_mode: str = "pixel"  # pixel (noise, timm) or mean (mean colour, torchvision)
    mixup: float = 0.0  # mixup Beta alpha; 0 = off
    cutmix: float = 0.0  # cutmix Beta alpha; 0 = off
    mix_prob: float = 1.0  # probability a batch is mixed
    mix_switch_prob: float = 0.5  # cutmix instead of mixup, when both are on
    precision: str = "float32"  # or mixed_float16 / mixed_bfloat16
    fast_layers: bool = True  # performance.accelerate: same function, ~1.9x faster CPU training
    seed: int = 0
    output_dir: str = "saved_models"  # <output_dir>/<name>.keras
    name: str = "convmixer_digits"
    verbose: str = "auto"  # Keras progress bar
    # Distribution and fault tolerance (docs/distributed.md). batch_size is the GLOBAL batch.
    strategy: str = "default"  # or mirrored (all local GPUs) / multi_worker (TF_CONFIG)
    xla: str = "auto"  # on / off; auto = on when a GPU is visible (slow on CPU)
    run_dir: str = "runs"  # <run_dir>/<name>/: backup/, checkpoints/, logs/, history.csv
    steps_per_epoch: int = 0  # 0 = the whole training split each epoch


def augment_config(config):
    """The `augment.AugmentConfig` of a TrainConfig (raises ValueError on bad values)."""
    if config.crop_ratio < 1.0:
        raise ValueError(f"crop_ratio must be >= 1. Received crop_ratio={config.crop_ratio!r}")
    if not 0.0 <= config.crop_scale <= 1.0:
        raise ValueError(f"crop_scale must be in [0, 1]. Received {config.crop_scale!r}")
    return augment.AugmentConfig(
        crop_scale=(config.crop_scale, 1.0) if config.crop_scale else None,
        crop_ratio=(1.0 / config.crop_ratio, config.crop_ratio),
        **{f.name: getattr(config, f.name) for f in dataclasses.fields(augment.AugmentConfig)
           if f.name not in ("crop_scale", "crop_ratio")},
    )


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
    """Saves an uncompiled copy of `model` with stock Keras layers only (see
    `performance.standardize`) to `path` atomically, so a crash mid-save never replaces a good
    model with half a file, and the file loads anywhere without this package."""
    # Stock layers; from_config drops the compile state (optimizer, custom LR schedule).
    clean = keras.Model.from_config(performance.standardize(model).get_config())
    clean.set_weights(model.get_weights())
    return saving.save_atomic(clean, path, overwrite=True)


def train(config):
    """Runs `config`; returns dict(model, history, test_accuracy, model_path, class_names,
    is_chief).

    Rerunning the same config after a crash resumes from `<run_dir>/<name>/backup/`."""
    config = presets.apply_train_preset(config)
    # First: MultiWorkerMirroredStrategy must exist before any other TF op runs.
    strategy = distribute.make_strategy(config.strategy)
    xla = distribute.resolve_xla(config.xla)
    distribute.global_batch_size(config.batch_size, strategy)
    keras.utils.set_random_seed(config.seed)
    keras.mixed_precision.set_global_policy(config.precision)
    datasets = data.build_datasets(
        config.dataset, image_size=config.image_size, global_batch_size=config.batch_size,
        augment=augment_config(config), data_dir=config.data_dir or None, seed=config.seed,
        validation_split=config.validation_split, eval_crop_pct=config.eval_crop_pct,
    )
    train_ds, test_ds = datasets.train, datasets.test

    steps_per_epoch = datasets.steps_per_epoch
    if config.steps_per_epoch:  # a fresh shuffle's first batches, every epoch
        steps_per_epoch = min(steps_per_epoch, config.steps_per_epoch)
        train_ds = train_ds.take(steps_per_epoch)
    steps = config.epochs * steps_per_epoch
    test_ds = distribute.shardable(test_ds, config.batch_size)
    with strategy.scope():
        model = build_model(
            config, datasets.num_classes, (config.image_size, config.image_size, 3)
        )
        if config.fast_layers:
            model = performance.accelerate(model)
        trainer = distribute.make_trainer(model)
        optimizer = keras.optimizers.AdamW(
            schedules.OneCycle(config.max_lr, steps),
            weight_decay=config.weight_decay,
            epsilon=config.adam_epsilon,
            global_clipnorm=config.clip_norm,
        )
        if not config.decay_all_weights:
            optimizer.exclude_from_weight_decay(
                var_list=[v for v in model.trainable_variables if len(v.shape) <= 1]
            )
        trainer.compile(
            optimizer=optimizer,
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
    return dict(
        model=model,
        history=history,
        test_accuracy=test_accuracy,
        model_path=model_path,
        class_names=datasets.class_names,
        is_chief=is_chief,
    )
