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
import logging
import math
import os
import signal
import socket
import threading
import time

import keras

from convmixer_tf import compat
from convmixer_tf.training.config import STRATEGIES, XLA_MODES

logger = logging.getLogger(__name__)


def _tf():
    import tensorflow as tf

    return tf


CPU_REPLICAS = 2  # `mirrored` on a machine without a GPU: the CPU split in this many devices
CLUSTER_TIMEOUT = 300.0  # seconds `multi_worker` waits for its TF_CONFIG peers


def make_strategy(name="default", cluster_timeout=CLUSTER_TIMEOUT, cpu_replicas=CPU_REPLICAS):
    """Returns the `tf.distribute` strategy `name` names, and says how many replicas it runs.

    `default`: one device. `mirrored`: every GPU; without a GPU, the CPU split into
    `cpu_replicas` logical devices (they share its cores: this exercises the distributed path,
    it does not speed training up). `multi_worker`: MultiWorkerMirroredStrategy, the cluster
    read from the `TF_CONFIG` environment variable, after every peer answered within
    `cluster_timeout` seconds (`wait_for_peers`). Call it before any other TF op runs.
    """
    tf = _tf()
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        if tf.config.list_physical_devices("GPU"):
            strategy = tf.distribute.MirroredStrategy()
            more = "make more GPUs visible (CUDA_VISIBLE_DEVICES) for more"
        else:
            strategy = tf.distribute.MirroredStrategy(devices=split_cpu(cpu_replicas))
            more = ("no GPU: logical devices sharing the CPU's cores, for testing the "
                    "distributed path, not for speed; distribute.make_strategy('mirrored', "
                    "cpu_replicas=N) before any TF op sets their number")
        devices = ", ".join(strategy.extended.worker_devices)
        logger.info(f"mirrored: {strategy.num_replicas_in_sync} replica(s) on {devices} "
                    f"({more})")
        return strategy
    if name == "multi_worker":
        cluster, task_type, task_index = parse_tf_config(os.environ.get("TF_CONFIG"))
        wait_for_peers(cluster, task_type, task_index, cluster_timeout)
        return _join_cluster(tf, cluster_timeout)
    raise ValueError(f"Unknown strategy; choose one of {STRATEGIES}. Received strategy={name!r}")


def split_cpu(replicas):
    """Names of the logical CPU devices, after splitting the CPU into `replicas` of them when
    TensorFlow has not started yet and nobody configured them (else as they are)."""
    tf = _tf()
    cpu = tf.config.list_physical_devices("CPU")[0]
    if replicas > 1 and tf.config.get_logical_device_configuration(cpu) is None:
        try:
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(replicas)]
            )
        except RuntimeError:  # TF already initialised its devices: keep them
            pass
    return [d.name for d in tf.config.list_logical_devices("CPU")]


# ---------------------------------------------------------------------------- multi-worker

CLUSTER_TASKS = ("chief", "worker")  # the task types that train (and take part in collectives)


def parse_tf_config(raw):
    """`(cluster, task_type, task_index)` of a TF_CONFIG JSON string, every value type-checked:
    `cluster` maps chief/worker to lists of "host:port" strings, the task names one of them.
    Errors name TF_CONFIG (TF's own are cryptic, or a hang)."""
    example = ('e.g. {"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
               '"task": {"type": "worker", "index": 0}}')
    if not raw:
        raise ValueError("strategy='multi_worker' reads the cluster from the TF_CONFIG "
                         f"environment variable, {example}; TF_CONFIG is not set")
    try:
        tf_config = json.loads(raw)
        cluster, task = tf_config["cluster"], tf_config["task"]
        task_type, task_index = task["type"], task["index"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"TF_CONFIG is not valid cluster JSON ({error!r}), {example}. "
                         f"Received TF_CONFIG={raw!r}") from None
    if not isinstance(cluster, dict) or not any(k in cluster for k in CLUSTER_TASKS):
        raise ValueError(f"TF_CONFIG's cluster must map 'worker' (and optionally 'chief') to "
                         f"address lists, {example}. Received cluster={cluster!r}")
    for kind, addresses in cluster.items():
        if not isinstance(addresses, list) or not addresses:
            raise ValueError(f"TF_CONFIG cluster[{kind!r}] must be a non-empty list of "
                             f'"host:port" strings. Received {addresses!r}')
        for address in addresses:
            host, _, port = address.rpartition(":") if isinstance(address, str) else ("", "", "")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f'TF_CONFIG cluster[{kind!r}] holds {address!r}: every '
                                 f'address must be a "host:port" string, e.g. "10.0.0.1:12345"')
    if len(cluster.get("chief", [])) > 1:
        raise ValueError(f"TF_CONFIG may name one chief. Received chief={cluster['chief']!r}")
    if task_type not in CLUSTER_TASKS:
        raise ValueError(f"TF_CONFIG task type must be one of {CLUSTER_TASKS} to train. "
                         f"Received task={task!r}")
    if not isinstance(task_index, int) or isinstance(task_index, bool):
        raise ValueError(f"TF_CONFIG task index must be an integer. Received task={task!r}")
    if not 0 <= task_index < len(cluster.get(task_type, [])):
        raise ValueError(f"TF_CONFIG task {task} is not in cluster {cluster} (index out of "
                         f"range, or no {task_type!r} list)")
    return cluster, task_type, task_index


def chief_from_tf_config(raw):
    """`(is_chief, task_index)` read from TF_CONFIG, before any strategy exists."""
    cluster, task_type, task_index = parse_tf_config(raw)
    has_chief = "chief" in cluster
    return task_type == "chief" or (not has_chief and task_index == 0), task_index


def _split_address(address):
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _answers(address, timeout=1.0):
    try:
        socket.create_connection(_split_address(address), timeout=timeout).close()
    except OSError:
        return False
    return True


def wait_for_peers(cluster, task_type, task_index, timeout, poll=0.25):
    """Returns once every other chief/worker of `cluster` accepts a TCP connection; raises
    TimeoutError naming those that did not after `timeout` seconds.

    Meanwhile this task listens on its own port, so that peers waiting likewise see it (TF's
    server takes the port over right after). This wait is plain Python: SIGTERM ends it at
    once, unlike TF's cluster setup, which ignores SIGTERM while it waits."""
    own = cluster[task_type][task_index]
    peers = [(kind, i, address) for kind in CLUSTER_TASKS
             for i, address in enumerate(cluster.get(kind, []))
             if (kind, i) != (task_type, task_index)]
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(("", _split_address(own)[1]))
        listener.listen(len(peers) + 8)
    except OSError as error:
        listener.close()
        raise OSError(f"TF_CONFIG gives this task ({task_type} {task_index}) the address "
                      f"{own}, but its port cannot be opened here ({error}): free the port "
                      "or change TF_CONFIG") from None
    deadline = time.monotonic() + timeout
    try:
        missing = [p for p in peers if not _answers(p[2])]
        if missing:
            logger.info(f"multi_worker: waiting up to {timeout:g} s (--cluster-timeout) for "
                        f"{_names(missing)}")
        while missing:
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"multi_worker: no answer within {timeout:g} s (--cluster-timeout) from "
                    f"{_names(missing)} of the TF_CONFIG cluster. Start the same command "
                    "there (with its own TF_CONFIG task), check the host names, ports and "
                    "firewall, or raise --cluster-timeout."
                )
            time.sleep(poll)
            missing = [p for p in missing if not _answers(p[2])]
    finally:
        listener.close()


def _names(peers):
    return ", ".join(f"{kind} {i} ({address})" for kind, i, address in peers)


def _join_cluster(tf, timeout):
    """MultiWorkerMirroredStrategy, once the peers answered. TF's setup then blocks holding
    the GIL and swallows SIGTERM (its preemption notifier), so an alarm (a kernel timer, no
    Python needed) bounds it; afterwards SIGTERM ends the job again, as by default."""
    main = threading.current_thread() is threading.main_thread()
    previous_term = signal.getsignal(signal.SIGTERM) if main else None
    alarm = main and signal.getsignal(signal.SIGALRM) == signal.SIG_DFL
    if alarm:
        signal.alarm(max(1, int(math.ceil(timeout))))
    try:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    finally:
        if alarm:
            signal.alarm(0)
    if main and previous_term is not None:
        signal.signal(signal.SIGTERM, previous_term)
    return strategy


def worker_count(strategy):
    """How many processes (workers, chief) share the input: 1 unless multi-worker."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return 1
    spec = resolver.cluster_spec().as_dict()
    return sum(len(spec.get(kind, ())) for kind in ("chief", "worker"))


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


class ReplicaTrainer(compat.TrainerBase):
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

    def symbolic_build(self, iterator=None, data_batch=None):
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
        super().symbolic_build(data_batch=data_batch)

    def _forward_backward(self, trainable, non_trainable, x, y, sample_weight, loss_scale):
        tf = _tf()
        with tf.GradientTape() as tape:
            tape.watch(trainable)
            y_pred, new_non_trainable, losses = self.model.stateless_call(
                trainable, non_trainable, x, training=True, return_losses=True
            )
            # Keras's loss divides by the replica count, so summed gradients are global means.
            loss = self.compiled_loss_value(y, y_pred, sample_weight)
            for extra in losses:  # regularizers, add_loss
                loss = loss + self.additional_loss_value(extra)
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
        self.train_loss_tracker.update_state(loss * tf.cast(replicas, loss.dtype), sample_weight=batch)
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
