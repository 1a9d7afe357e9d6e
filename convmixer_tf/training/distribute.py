"""Multi-device training for `model.fit`: strategy factory, XLA switch, replica-safe trainer.

    strategy = distribute.make_strategy("mirrored")          # all GPUs (or logical CPUs)
    with strategy.scope():
        model = convmixer_tf.ConvMixer(...)                   # the plain functional model
        trainer = distribute.make_trainer(model)          # a keras.Model: compile/fit
        trainer.compile(optimizer, loss, metrics, jit_compile=True)
    trainer.fit(dataset_of_global_batches, ...)
    keras.saving.load_model(...)                              # the saved artifact is `model`

Keras's own `jit_compile=True` fails with more than one replica (keras-team/keras#19005) and
`"auto"` silently turns XLA off under any strategy. `ReplicaTrainer` makes XLA work there: each
replica runs an XLA-compiled stateless forward/backward pass; the cross-replica all-reduces
(gradients, BatchNorm moving statistics) and the optimizer update stay outside XLA.
"""

import json
import os

import keras

from convmixer_tf.training.config import STRATEGIES, XLA_MODES


def _tf():
    import tensorflow as tf

    return tf


def make_strategy(name="default"):
    """Returns the `tf.distribute` strategy `name` names.

    `default`: one device. `mirrored`: every GPU, or every logical CPU device when there is no
    GPU (tests split the CPU in two). `multi_worker`: MultiWorkerMirroredStrategy, the cluster
    read from the `TF_CONFIG` environment variable; create it before any other TF op runs.
    """
    tf = _tf()
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        if tf.config.list_logical_devices("GPU"):
            return tf.distribute.MirroredStrategy()
        cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices=cpus)
    if name == "multi_worker":
        _check_tf_config(os.environ.get("TF_CONFIG"))
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"Unknown strategy; choose one of {STRATEGIES}. Received strategy={name!r}")


def _check_tf_config(raw):
    """Clear errors for a missing or malformed TF_CONFIG (TF's own are cryptic or hangs)."""
    if not raw:
        raise ValueError(
            "strategy='multi_worker' reads the cluster from the TF_CONFIG environment variable, "
            'e.g. {"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
            '"task": {"type": "worker", "index": 0}}; TF_CONFIG is not set'
        )
    try:
        tf_config = json.loads(raw)
        workers = tf_config["cluster"]["worker"]
        index = tf_config["task"]["index"]
        kind = tf_config["task"]["type"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"TF_CONFIG is not valid cluster JSON ({error!r}): {raw!r}") from None
    if kind not in ("worker", "chief") or not 0 <= int(index) < len(workers) + (kind == "chief"):
        raise ValueError(f"TF_CONFIG task {tf_config['task']} is not in cluster {workers}")


def task_info(strategy):
    """`(is_chief, task_id)` of this process: `(True, 0)` unless `strategy` is multi-worker."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True, 0
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    kind, index = resolver.task_type, int(resolver.task_id)
    return kind == "chief" or (not has_chief and kind == "worker" and index == 0), index


def resolve_xla(mode):
    """`"on"`/`"off"` -> bool; `"auto"` -> on when a GPU is visible (XLA's DepthwiseConv2D is
    10-100x slower than TF's kernel on CPU, so never by default there)."""
    if mode not in XLA_MODES:
        raise ValueError(f"Unknown xla mode; choose one of {XLA_MODES}. Received xla={mode!r}")
    if mode == "auto":
        if keras.backend.backend() == "jax":
            import jax

            return jax.default_backend() == "gpu"
        return bool(_tf().config.list_physical_devices("GPU"))
    return mode == "on"


def global_batch_size(batch_size, strategy):
    """Checks that the global `batch_size` splits evenly over the strategy's replicas."""
    replicas = strategy.num_replicas_in_sync
    if batch_size % replicas:
        raise ValueError(
            f"batch_size is the global batch and must be a multiple of the {replicas} replicas "
            f"(each replica gets batch_size / {replicas}). Received batch_size={batch_size}"
        )
    return batch_size


def shardable(dataset, batch_size):
    """`dataset` with only full batches when a `keras.distribution` (JAX DataParallel) is set:
    its batches must split evenly over the devices, so the last partial one is dropped."""
    if keras.distribution.distribution() is None:
        return dataset
    return dataset.unbatch().batch(batch_size, drop_remainder=True)


class ReplicaTrainer(keras.Model):
    """Trains a (functional) `model` under any `tf.distribute` strategy, with or without XLA.

    Its weights are `model`'s; `compile`/`fit`/`evaluate`/`predict` work as usual; save `model`
    (the plain functional network), not the trainer. Per step and replica: an XLA-compiled
    (when `xla`) `model.stateless_call` + gradient returns the loss, predictions, gradients and
    new BatchNorm moving statistics; outside XLA the moving statistics are all-reduced (mean)
    so every replica keeps identical ones, and the optimizer all-reduces (sums) the gradients of
    the per-replica loss (already divided by the replica count, as in Keras) and applies them.
    The same code runs with `xla=False`, so XLA on and off train the same algorithm.
    """

    def __init__(self, model, xla=False, **kwargs):
        kwargs.setdefault("name", f"{model.name}_trainer")
        super().__init__(**kwargs)
        self.model = model
        self.xla = bool(xla)
        self._forward_backward_fn = None
        self.built = model.built

    def call(self, inputs, training=None):
        return self.model(inputs, training=training)

    def compile(self, *args, jit_compile="auto", **kwargs):
        """Like `Model.compile`; `jit_compile=True/False` sets `xla` (XLA then covers the
        per-replica forward/backward only: Keras's would wrap the all-reduce too, which fails
        with several replicas); `"auto"` keeps it."""
        if jit_compile != "auto":
            self.xla = bool(jit_compile)
            self._forward_backward_fn = None
        super().compile(*args, jit_compile=False, **kwargs)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras all-reduces (MEAN) a real input batch across replicas only to learn its shapes;
        # under MultiWorkerMirroredStrategy that collective fails. A local replica's batch has
        # the same structure and dtypes, which is all the symbolic build needs.
        if iterator is not None:
            for _, _, it in iterator:
                batch = next(it)
                data_batch = keras.tree.map_structure(
                    lambda v: self.distribute_strategy.experimental_local_results(v)[0], batch
                )
                break
        super()._maybe_symbolic_build(data_batch=data_batch)

    def _forward_backward(self, trainable, non_trainable, x, y, sample_weight, loss_scale):
        tf = _tf()
        with tf.GradientTape() as tape:
            tape.watch(trainable)
            y_pred, new_non_trainable, losses = self.model.stateless_call(
                trainable, non_trainable, x, training=True, return_losses=True
            )
            # Keras's loss divides by the replica count, so summed gradients are global means.
            loss = self._compile_loss(y, y_pred, sample_weight)
            for extra in losses:  # regularizers, add_loss
                loss = loss + self._aggregate_additional_loss(extra)
            scaled = loss * tf.cast(loss_scale, loss.dtype)
        grads = tape.gradient(scaled, trainable)
        return loss, y_pred, grads, new_non_trainable

    def train_step(self, data):
        tf = _tf()
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if self._forward_backward_fn is None:
            self._forward_backward_fn = tf.function(
                self._forward_backward, jit_compile=self.xla, reduce_retracing=True
            )
        trainable = self.model.trainable_variables
        non_trainable = self.model.non_trainable_variables
        # 1 for plain optimizers; the current dynamic loss scale for a LossScaleOptimizer.
        loss_scale = self.optimizer.scale_loss(tf.constant(1.0, "float32"))
        loss, y_pred, grads, new_non_trainable = self._forward_backward_fn(
            [tf.convert_to_tensor(v.value) for v in trainable],
            [tf.convert_to_tensor(v.value) for v in non_trainable],
            x, y, sample_weight, loss_scale,
        )
        self._sync_non_trainable(non_trainable, new_non_trainable)
        # LossScaleOptimizer unscales and skips non-finite steps; all-reduce happens in here.
        self.optimizer.apply_gradients(zip(grads, trainable))
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        batch = tf.shape(tf.nest.flatten(x)[0])[0]
        self._loss_tracker.update_state(loss * tf.cast(replicas, loss.dtype), sample_weight=batch)
        return self._multi_worker_safe(self.compute_metrics(x, y, y_pred, sample_weight))

    def test_step(self, data):
        return self._multi_worker_safe(super().test_step(data))

    def _multi_worker_safe(self, logs):
        # Under MultiWorkerMirroredStrategy Keras reduces every log with
        # strategy.reduce("MEAN", v, axis=0), which fails on scalars (tensorflow#72388):
        # give them a leading axis of 1; the reduced result is the scalar again.
        tf = _tf()
        if not isinstance(self.distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy):
            return logs
        return keras.tree.map_structure(lambda v: tf.reshape(v, [1]) if v.shape.rank == 0 else v, logs)

    @staticmethod
    def _sync_non_trainable(variables, values):
        """Assigns the new non-trainable state, floats averaged over replicas (BN moving stats)."""
        tf = _tf()
        context = tf.distribute.get_replica_context()
        values = list(values)
        if context is not None and context.num_replicas_in_sync > 1:
            floats = [i for i, v in enumerate(values) if v.dtype.is_floating]
            if floats:
                reduced = context.all_reduce("MEAN", [values[i] for i in floats])
                for i, value in zip(floats, reduced):
                    values[i] = value
        for variable, value in zip(variables, values):
            variable.assign(value)


def make_trainer(model):
    """What to call `compile(..., jit_compile=xla)`/`fit` on: `model` itself on one device or
    on the JAX backend (Keras's own XLA), a `ReplicaTrainer` under a `tf.distribute` strategy."""
    if keras.backend.backend() == "tensorflow" and _tf().distribute.has_strategy():
        return ReplicaTrainer(model)
    return model


def inner_model(trainer):
    """The functional model a trainer wraps (the one to save)."""
    return trainer.model if isinstance(trainer, ReplicaTrainer) else trainer
