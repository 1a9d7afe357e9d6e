"""The training job: build a ConvMixer, fit it on a tf.data pipeline, evaluate, and write the
trained-model file set (`artifacts`: model, metadata, sample images) that deployment reads.

    convmixer-train                       # offline default: digits, ~1-2 min on 2 CPU cores

    from convmixer_tf.training.config import TrainConfig
    from convmixer_tf.training.train import train
    result = train(TrainConfig.create(preset="cifar10", epochs=5))
"""

import dataclasses
import json
import logging
import os
import uuid

import keras

import numpy as np

from convmixer_tf import artifacts, fast_layers, model as model_lib, presets
from convmixer_tf.training import (callbacks as callbacks_lib, data, data_service, distribute,
                                   schedules)


class FinalSaveError(OSError):
    """Training finished but writing the model file set failed (the message says where the
    trained weights are)."""


def architecture(config):
    """The ConvMixer shape a config (or a config dict from metadata) names: its variant's, else
    its own dim/depth/kernel_size/patch_size/activation."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    if get("variant"):
        return dict(presets.MODEL_CONFIGS[get("variant")])
    return {k: get(k) for k in ("dim", "depth", "kernel_size", "patch_size", "activation")}


def run_identity(config):
    """What makes two runs the same run: architecture, data set, image size, held-out split.
    A rerun with the same identity resumes; another one is refused (or `overwrite`)."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    return dict(architecture(config), dataset=get("dataset"), image_size=get("image_size"),
                validation_split=get("validation_split"))


def preflight(config, is_chief=True, task_id=0):
    """Checks, before any work: every output location is writable (`--output-dir`, where the
    export goes too, and `--run-dir`), the run folder and the output model belong to this run
    (`run_identity`; `overwrite` starts afresh). Returns this task's run folder."""
    callbacks_lib.check_writable(config.output_dir, "--output-dir")
    callbacks_lib.check_writable(config.run_dir, "--run-dir")
    identity = run_identity(config)
    model_path = os.path.join(config.output_dir, config.name + ".keras")
    if os.path.isdir(model_path):
        raise ValueError(f"{model_path!r} is a folder where the model file goes: remove it or "
                         "pass another --name / --output-dir.")
    if os.path.exists(model_path) and not config.overwrite:
        meta_path = artifacts.metadata_path(model_path)
        previous = None
        if os.path.exists(meta_path):
            with open(meta_path) as f:
                previous = json.load(f).get("config")
        if previous is None or run_identity(previous) != identity:
            what = ("has no training metadata (not written by convmixer-train)" if previous is None
                    else "is the model of another run: "
                    + callbacks_lib.describe_differences(run_identity(previous), identity))
            raise ValueError(f"{model_path} {what}. Pass --overwrite to replace it, or choose "
                             "another --name or --output-dir.")
    run_dir = os.path.join(config.run_dir, config.name)
    if is_chief:  # the chief owns the run folder; workers write below it
        callbacks_lib.claim_run_dir(run_dir, identity, dataclasses.asdict(config),
                                    overwrite=config.overwrite)
    # A worker creates nothing here: the chief may be deleting (--overwrite) or claiming the
    # run folder right now; its own folder is made once the cluster has formed.
    return callbacks_lib.worker_run_dir(run_dir, is_chief, task_id)


def build_model(config, num_classes, input_shape):
    """The ConvMixer the config names, returning logits (the loss applies the softmax)."""
    return model_lib.ConvMixer(
        **architecture(config),
        input_shape=input_shape,
        classes=num_classes,
        classifier_activation=None,
        name=config.name,
    )


def save_trained_model(model, path):
    """Saves `model` with stock Keras layers only, in float32 whatever the training policy
    (`fast_layers.standardize(float32=True)`; the metadata records the policy), uncompiled and
    atomically, so the file loads and serves anywhere without this package."""
    return artifacts.save_model(fast_layers.standardize(model, float32=True), path, overwrite=True)


def export_samples(datasets, calibration_count=256, held_out_count=1000, budget_mb=48):
    """(calibration images, held-out images, held-out labels) as uint8 arrays: what the export
    needs for int8 calibration and its accuracy checks, capped at `budget_mb` in all."""
    size = datasets.image_size
    per_image = size * size * 3
    held_out_count = max(64, min(held_out_count, budget_mb * 2**20 * 3 // 4 // per_image))
    calibration_count = max(16, min(calibration_count, budget_mb * 2**20 // 4 // per_image))

    def take(ds, n):
        images, labels = [], []
        for x, y in ds:
            images.append(np.asarray(x))
            labels.append(np.argmax(np.asarray(y), axis=-1))
            if sum(len(i) for i in images) >= n:
                break
        images = np.clip(np.round(np.concatenate(images)[:n]), 0, 255).astype(np.uint8)
        return images, np.concatenate(labels)[:n].astype(np.int32)

    calibration, _ = take(datasets.calibration, calibration_count)
    held_out, labels = take(datasets.test, held_out_count)
    return calibration, held_out, labels


def training_input(datasets, strategy, steps_per_epoch, batch_size, service=None):
    """(train input, test input, fit's steps_per_epoch, this process's training dataset): the
    one place the training dataset is finished. Our `data.Datasets`: an endless epoch-keyed
    stream (`train_stream`) of `steps_per_epoch` batches per epoch; under several workers each
    reads only its share (`distribute_datasets_from_function`), the test split too; with
    `service` (dict(address, epochs, start_epoch, job)) the tf.data service's workers run the
    same stream (`service_stream`) and no local training dataset exists. Any other
    `datasets` (benchmarks/parity.py) is used as given, one pass per epoch."""
    if service:
        if not getattr(datasets, "streams", False):
            raise ValueError("--data-service needs the pipelines convmixer-train builds "
                             "(data.build_datasets), not fixed batches.")
        train_ds = datasets.service_stream(
            steps_per_epoch, service["epochs"], service["start_epoch"],
            send=lambda ds: data_service.distribute(ds, service["address"], service["job"]))
        return train_ds, distribute.shardable(datasets.test, batch_size), steps_per_epoch, None
    if not getattr(datasets, "streams", False):
        train_ds = datasets.train
        if steps_per_epoch < datasets.steps_per_epoch:
            train_ds = train_ds.take(steps_per_epoch)
        return train_ds, distribute.shardable(datasets.test, batch_size), None, train_ds
    made = []

    def train_for(context=None):
        made.append(datasets.train_stream(context, steps_per_epoch))
        return made[-1]

    if distribute.worker_count(strategy) > 1:
        train_ds = strategy.distribute_datasets_from_function(train_for)
        test_ds = strategy.distribute_datasets_from_function(datasets.test_shard)
    else:
        train_ds, test_ds = train_for(), distribute.shardable(datasets.test, batch_size)
    return train_ds, test_ds, steps_per_epoch, made[0].take(steps_per_epoch)


def data_callbacks(datasets, local_train, batch_size):
    """The input pipeline's callbacks: the epoch key (resume-exact order), the skipped-image
    line and the input-share line (timing this process's own training input, if it has one:
    not under the data service)."""
    share = [data.InputShare(local_train, batch_size)] if local_train is not None else []
    if not getattr(datasets, "streams", False):
        return share
    return [data.EpochKey(datasets), data.SkippedImages(datasets)] + share


def train(config, datasets=None):
    """Runs `config`; returns dict(model, history, test_accuracy, model_path, class_names,
    is_chief).

    `datasets` (a `data.Datasets`) replaces the pipelines `config.dataset` names, e.g. with
    batches in a fixed order (benchmarks/parity.py); its `train` may be anything `fit` takes.

    Writes `<output_dir>/<name>.keras`, its metadata `.json` and `.samples.npz`. Rerunning the
    same config after a crash resumes from `<run_dir>/<name>/backup/`, which is deleted only
    once that file set is saved."""
    is_chief, task_id = True, 0
    if config.strategy == "multi_worker":
        is_chief, task_id = distribute.chief_from_tf_config(os.environ.get("TF_CONFIG"))
    run_dir = preflight(config, is_chief, task_id)  # plain Python: no TF op yet
    # MultiWorkerMirroredStrategy must exist before any other TF op runs.
    strategy = distribute.make_strategy(config.strategy, cluster_timeout=config.cluster_timeout)
    xla = distribute.resolve_xla(config.xla)
    distribute.global_batch_size(config.batch_size, strategy)
    keras.utils.set_random_seed(config.seed)
    keras.mixed_precision.set_global_policy(config.precision)
    if config.data_service:  # fail in seconds, before any decoding, if nobody is there
        data_service.check_reachable(config.data_service)
    if datasets is None:
        datasets = data.build_datasets(
            config.dataset, image_size=config.image_size, global_batch_size=config.batch_size,
            augment=config.augment, data_dir=config.data_dir or None, seed=config.seed,
            validation_split=config.validation_split, eval_crop_pct=config.eval_crop_pct,
            # With a data service the workers read the training set: no local decode pass.
            cache="off" if config.data_service else config.cache,
            cache_budget_mb=config.cache_budget_mb,
            cache_dir=os.path.join(config.run_dir, config.name, "cache"),
            cache_disk_budget_gb=config.cache_disk_budget_gb, strict_images=config.strict_images,
        )
    steps_per_epoch = datasets.steps_per_epoch
    if config.steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, config.steps_per_epoch)
    service = None
    if config.data_service:  # one stream over every epoch from the last finished one
        backup = callbacks_lib.AtomicBackupAndRestore(os.path.join(run_dir, "backup"))
        service = dict(address=config.data_service, epochs=config.epochs,
                       start_epoch=(backup.read_metadata() or {}).get("epoch", 0),
                       job=f"{config.name}-{uuid.uuid4().hex[:8]}")  # never a stale job
    train_ds, test_ds, fit_steps, local_train = training_input(
        datasets, strategy, steps_per_epoch, config.batch_size, service)
    if service:
        print(f"Training input from the tf.data service at {config.data_service} "
              f"(distributed_epoch, job {service['job']}, from epoch {service['start_epoch'] + 1})"
              f": {steps_per_epoch} steps per epoch; the first step waits for workers "
              f"(convmixer-data-service worker --dispatcher HOST:PORT); unreadable images are "
              f"skipped there and counted without names", flush=True)
    steps = config.epochs * steps_per_epoch
    with strategy.scope():
        model = build_model(
            config, datasets.num_classes, (config.image_size, config.image_size, 3)
        )
        fast = {swap: False for swap in fast_layers.SWAPS}
        if config.fast_layers:  # only the swaps measured faster on this device and precision
            fast = fast_layers.fast_layers_for(config.precision)
            model = fast_layers.accelerate(model, **fast)
            print(fast_layers.describe_fast_layers(fast, config.precision), flush=True)
        warning = (fast_layers.precision_warning(config.precision)
                   if fast_layers.device_kind() == "CPU" else None)
        if warning:  # before the first step: a slow precision on this CPU is said at once
            logging.getLogger(__name__).warning(warning)
        trainer = distribute.make_trainer(model)
        optimizer = keras.optimizers.AdamW(
            schedules.OneCycle(config.max_lr, steps),
            weight_decay=config.weight_decay,
            epsilon=config.adam_epsilon,
            global_clipnorm=config.clip_norm or None,
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
        steps_per_epoch=fit_steps,
        validation_data=test_ds,
        shuffle=False,  # the tf.data pipeline shuffles
        verbose=int(config.verbose) if str(config.verbose).isdigit() else config.verbose,
        callbacks=callbacks_lib.make_callbacks(
            os.path.join(config.run_dir, config.name), save_model=save_trained_model,
            is_chief=is_chief, task_id=task_id, delete_backup_at_end=False,
        ) + data_callbacks(datasets, local_train, config.batch_size),
    )
    _, test_accuracy = trainer.evaluate(test_ds, verbose=0)
    # Every worker writes (atomically, the same values); the chief alone exports.
    model_path = os.path.join(config.output_dir, config.name + ".keras")
    try:
        save_trained_model(model, model_path)
        artifacts.write_metadata(model_path, artifacts.Metadata(
            datasets.class_names, (config.image_size, config.image_size),
            crop_pct=config.eval_crop_pct, dataset=config.dataset,
            test_accuracy=float(test_accuracy), config=dataclasses.asdict(config),
            training_precision=config.precision, serving_precision="float32",
            fast_layers_applied=[swap for swap, on in fast.items() if on],
        ))
        artifacts.write_samples(model_path, *export_samples(datasets))
    except OSError as error:
        raise FinalSaveError(
            f"Training finished, but saving {model_path} failed ({error}). The trained model "
            f"is in {os.path.join(run_dir, 'checkpoints', 'last.keras')} and the resume backup "
            f"in {os.path.join(run_dir, 'backup')} is kept: fix the problem and rerun the same "
            "command, which resumes after the last epoch and saves again."
        ) from error
    callbacks_lib.delete_backup(run_dir)
    return dict(
        model=model,
        history=history,
        test_accuracy=test_accuracy,
        model_path=model_path,
        class_names=datasets.class_names,
        is_chief=is_chief,
    )
