"""The training job: build a ConvMixer, fit it on a tf.data pipeline, evaluate, and write the
trained-model file set (`artifacts`: model, metadata, sample images) that deployment reads.

    convmixer-train                       # offline default: digits, ~1-2 min on 2 CPU cores

    from convmixer_tf.training.config import TrainConfig
    from convmixer_tf.training.train import train
    result = train(TrainConfig.create(preset="cifar10", epochs=5))

`train` runs these steps, top to bottom, each a public function (the config passed whole):

    preflight      checks before any work; claims the run folder (`run_folder`)
    start          the tf.distribute strategy (before any other TF op), seed, precision
    build_input    the input pipelines (`data.pipeline.build_datasets`)
    build_trainer  the ConvMixer (`--weights`: loaded, `finetune`), its fast layers, AdamW on
                   the one-cycle schedule, compiled; the backbone frozen if asked
    resume         the run folder's callbacks and the epoch a killed run resumes after
    fit            fit on the training input (local, sharded or the tf.data service), evaluate
    save           the model file set; then the resume backup goes
"""

import dataclasses
import logging
import os
import uuid
import warnings

import keras

import numpy as np

from convmixer_tf import artifacts, fast_layers, model as model_lib, presets
from convmixer_tf.errors import FinalSaveError
from convmixer_tf.training import (callbacks as callbacks_lib, data_service, distribute,
                                   finetune, run_folder, schedules)
from convmixer_tf.training.data import pipeline

logger = logging.getLogger(__name__)


def model_path(config):
    """`<output_dir>/<name>.keras`: where the trained model goes."""
    return os.path.join(config.output_dir, config.name + ".keras")


def preflight(config, is_chief=True, task_id=0):
    """Checks, before any work: every output location is writable (`--output-dir`, where the
    export goes too, and `--run-dir`), the run folder and the output model belong to this run
    (`run_folder.run_identity`; `overwrite` starts afresh). Returns this task's run folder
    (`run_folder.task_folder`), which every later step writes to."""
    run_folder.check_writable(config.output_dir, "--output-dir")
    run_folder.check_writable(config.run_dir, "--run-dir")
    identity = run_folder.run_identity(config)
    run_folder.check_output_model(model_path(config), identity, config.overwrite)
    folder = run_folder.path(config.run_dir, config.name)
    if is_chief:  # the chief owns the run folder; workers write below it
        run_folder.claim(folder, identity, dataclasses.asdict(config), overwrite=config.overwrite)
    # A worker creates nothing here: the chief may be deleting (--overwrite) or claiming the
    # run folder right now; its own folder is made once the cluster has formed (`resume`).
    return run_folder.task_folder(folder, is_chief, task_id)


def start(config):
    """(strategy, xla): the `config.strategy` strategy, made first (MultiWorkerMirroredStrategy
    must exist before any other TF op runs), whether to compile with XLA, and the seed and
    precision policy everything after it uses."""
    strategy = distribute.make_strategy(config.strategy, cluster_timeout=config.cluster_timeout)
    xla = distribute.resolve_xla(config.xla)
    distribute.global_batch_size(config.batch_size, strategy)
    keras.utils.set_random_seed(config.seed)
    keras.mixed_precision.set_global_policy(config.precision)
    return strategy, xla


def build_input(config):
    """The `data.pipeline.Datasets` of `config.dataset` (nothing decoded yet). With a data
    service, its dispatcher must answer first (seconds, before any decoding), and its workers
    read the training set: no local cache."""
    if config.data_service:
        data_service.check_reachable(config.data_service, config.dispatcher_timeout)
    return pipeline.build_datasets(
        config.dataset, image_size=config.image_size, global_batch_size=config.batch_size,
        augment=config.augment, data_dir=config.data_dir or None, seed=config.seed,
        validation_split=config.validation_split, eval_crop_pct=config.eval_crop_pct,
        cache="off" if config.data_service else config.cache,
        cache_budget_mb=config.cache_budget_mb,
        cache_dir=run_folder.cache_folder(config.run_dir, config.name),
        cache_disk_budget_gb=config.cache_disk_budget_gb, strict_images=config.strict_images,
    )


def steps_per_epoch(config, datasets):
    """Training steps per epoch: the whole split's, or `config.steps_per_epoch` if fewer."""
    return min(datasets.steps_per_epoch, config.steps_per_epoch or datasets.steps_per_epoch)


def build_model(config, num_classes, input_shape):
    """The ConvMixer the config names, returning logits (the loss applies the softmax)."""
    return model_lib.ConvMixer(
        **presets.architecture(config),
        input_shape=input_shape,
        classes=num_classes,
        classifier_activation=None,
        name=config.name,
    )


def build_trainer(config, strategy, num_classes, steps, xla, model=None, class_names=None):
    """(model, trainer, fast layers applied), built under `strategy`: `model` (default: the
    ConvMixer `config` names, `build_model`, with `config.weights` loaded: `finetune`, a new
    head when `class_names` differ from the file's) with the fast layers measured faster on
    this device and precision, wrapped by `distribute.make_trainer`, compiled with AdamW on the
    one-cycle schedule over `steps` optimizer steps and the label-smoothed loss, the optimizer
    built on every weight and the backbone frozen for `--freeze-backbone[-epochs]`."""
    with strategy.scope():
        if model is None:
            model = build_model(config, num_classes, (config.image_size, config.image_size, 3))
            if config.weights:  # the head is replaced when the classes differ (logged)
                model = finetune.load_pretrained(model, config.weights, class_names=class_names)
        fast = {swap: False for swap in fast_layers.SWAPS}
        if config.fast_layers:  # only the swaps measured faster on this device and precision
            fast = fast_layers.fast_layers_for(config.precision)
            model = fast_layers.accelerate(model, **fast)
            logger.info(fast_layers.describe_fast_layers(fast, config.precision))
        warning = (fast_layers.precision_warning(config.precision)
                   if fast_layers.device_kind() == "CPU" else None)
        if warning:  # before the first step: a slow precision on this CPU is said at once
            logger.warning(warning)
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
        finetune.freeze(trainer, model, config)
    return model, trainer, fast


def resume(folder):
    """(callbacks, start epoch): the callbacks writing the task's run folder `folder`
    (backup and restore, checkpoints, history, TensorBoard; the backup is kept at the end, for
    `save` to delete), and the epoch a killed run resumes after (0 for a fresh one). The
    restore itself happens as `fit` begins."""
    callbacks = callbacks_lib.make_callbacks(folder, save_model=save_trained_model,
                                             delete_backup_at_end=False)
    return callbacks, run_folder.resume_epoch(folder)


def training_input(datasets, strategy, steps, batch_size, service=None):
    """(train input, test input, this process's training dataset or None): the one place the
    training dataset is finished. An endless epoch-keyed stream (`train_stream`) of
    `steps` batches per epoch; under several workers each reads only its share
    (`distribute_datasets_from_function`), the test split too; with `service` (dict(address,
    epochs, start_epoch, job, timeout)) the tf.data service's workers run the same stream
    (`service_stream`) and no local training dataset exists."""
    if service:
        train_ds = datasets.service_stream(
            steps, service["epochs"], service["start_epoch"],
            send=lambda ds: data_service.distribute(ds, service["address"], service["job"],
                                                   service["timeout"]))
        return train_ds, distribute.shardable(datasets.test, batch_size), None
    made = []

    def train_for(context=None):
        made.append(datasets.train_stream(context, steps))
        return made[-1]

    if distribute.worker_count(strategy) > 1:
        train_ds = strategy.distribute_datasets_from_function(train_for)
        test_ds = strategy.distribute_datasets_from_function(datasets.test_shard)
    else:
        train_ds, test_ds = train_for(), distribute.shardable(datasets.test, batch_size)
    return train_ds, test_ds, made[0].take(steps)


def data_callbacks(datasets, local_train, batch_size):
    """The input pipeline's callbacks: the epoch key (resume-exact order), the skipped-image
    line and the input-share line (timing this process's own training input, if it has one:
    not under the data service)."""
    share = [pipeline.InputShare(local_train, batch_size)] if local_train is not None else []
    return [pipeline.EpochKey(datasets), pipeline.SkippedImages(datasets)] + share


def fit(config, strategy, trainer, datasets, callbacks, start_epoch=0):
    """(history, held-out accuracy): `trainer` fit for `config.epochs` on the training input
    (local, one share per worker, or the tf.data service's, whose stream begins at
    `start_epoch`, where a resumed run goes on), then evaluated on the test split."""
    steps = steps_per_epoch(config, datasets)
    service = None
    if config.data_service:  # one stream over every epoch from the last finished one
        service = dict(address=config.data_service, epochs=config.epochs,
                       start_epoch=start_epoch, timeout=config.dispatcher_timeout,
                       job=f"{config.name}-{uuid.uuid4().hex[:8]}")  # never a stale job
        logger.info(
            f"Training input from the tf.data service at {config.data_service} "
            f"(distributed_epoch, job {service['job']}, from epoch {start_epoch + 1}): {steps} "
            f"steps per epoch; the first step waits for workers (convmixer-data-service worker "
            f"--dispatcher HOST:PORT); unreadable images are skipped there and counted without "
            f"names")
    train_ds, test_ds, local_train = training_input(
        datasets, strategy, steps, config.batch_size, service)
    with warnings.catch_warnings():
        # Image files pass a validity filter, so the test split has no length tf.data knows,
        # and Keras says "Your input ran out of data" after every validation pass. The
        # training stream is endless (`pipeline`): the message can only mean the test split.
        warnings.filterwarnings("ignore", message="Your input ran out of data",
                                category=UserWarning)
        history = trainer.fit(
            train_ds,
            epochs=config.epochs,
            steps_per_epoch=steps,
            validation_data=test_ds,
            shuffle=False,  # the tf.data pipeline shuffles
            verbose=int(config.verbose) if str(config.verbose).isdigit() else config.verbose,
            callbacks=callbacks + data_callbacks(datasets, local_train, config.batch_size),
        )
        _, test_accuracy = trainer.evaluate(test_ds, verbose=0)
    return history, test_accuracy


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


def save(config, model, datasets, test_accuracy, fast, folder):
    """Writes the model file set (`<output_dir>/<name>.keras`, its metadata `.json`, its export
    samples `.samples.npz`), then deletes the resume backup in the task's run folder `folder`;
    returns the model's path. A failed write keeps the backup and names where the trained
    weights are (`FinalSaveError`)."""
    path = model_path(config)
    try:
        save_trained_model(model, path)
        artifacts.write_metadata(path, artifacts.Metadata(
            datasets.class_names, (config.image_size, config.image_size),
            crop_pct=config.eval_crop_pct, dataset=config.dataset,
            test_accuracy=float(test_accuracy), config=dataclasses.asdict(config),
            training_precision=config.precision, serving_precision="float32",
            fast_layers_applied=[swap for swap, on in fast.items() if on],
            source_weights=finetune.source_record(config),
        ))
        artifacts.write_samples(path, *export_samples(datasets))
    except OSError as error:
        raise FinalSaveError(
            f"Training finished, but saving {path} failed ({error}). The trained model is in "
            f"{os.path.join(folder, run_folder.CHECKPOINTS, 'last.keras')} and the resume "
            f"backup in {os.path.join(folder, run_folder.BACKUP)} is kept: fix the problem "
            "and rerun the same command, which resumes after the last epoch and saves again."
        ) from error
    run_folder.delete_backup(folder)
    return path


def train(config):
    """Runs `config` (a `config.TrainConfig`); returns dict(model, history, test_accuracy,
    model_path, class_names, is_chief).

    Writes `<output_dir>/<name>.keras`, its metadata `.json` and `.samples.npz`. Rerunning the
    same config after a crash resumes from `<run_dir>/<name>/backup/`, which is deleted only
    once that file set is saved."""
    is_chief, task_id = True, 0  # decided once: from TF_CONFIG, before any TF op
    if config.strategy == "multi_worker":
        is_chief, task_id = distribute.chief_from_tf_config(os.environ.get("TF_CONFIG"))
    config = finetune.resolve(config)  # --weights: the file's architecture and sha256
    folder = preflight(config, is_chief, task_id)  # plain Python: no TF op yet
    strategy, xla = start(config)
    datasets = build_input(config)
    model, trainer, fast = build_trainer(
        config, strategy, datasets.num_classes,
        config.epochs * steps_per_epoch(config, datasets), xla, class_names=datasets.class_names)
    callbacks, start_epoch = resume(folder)
    callbacks = finetune.callbacks(model, config) + callbacks  # head first, then everything
    history, test_accuracy = fit(config, strategy, trainer, datasets, callbacks, start_epoch)
    # Every worker writes (atomically, the same values); the chief alone exports.
    path = save(config, model, datasets, test_accuracy, fast, folder)
    return dict(model=model, history=history, test_accuracy=test_accuracy, model_path=path,
                class_names=datasets.class_names, is_chief=is_chief)
