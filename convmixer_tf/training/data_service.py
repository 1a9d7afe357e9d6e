"""tf.data service: the training input read, decoded and augmented on other machines.

When a GPU node's cores cannot keep up with its GPUs (docs/scale.md), start a dispatcher and
workers on CPU machines and point the trainer at the dispatcher:

    convmixer-data-service dispatcher --port 5050
    convmixer-data-service worker --dispatcher cpu-host:5050 --port 5051   # on each CPU host
    convmixer-train --dataset folder:/data/imagenet --data-service grpc://cpu-host:5050 ...

The trainer sends the training pipeline's graph to the dispatcher; the workers run it (file
read + decode + augment + mix) and stream finished batches back. Evaluation stays local.

Processing mode: `distributed_epoch` (`ShardingPolicy.DYNAMIC`): the dispatcher hands the
source's elements out one at a time to whichever worker asks, so every example is processed by
one worker once. `parallel_epochs` (`ShardingPolicy.OFF`) would make every worker produce a
whole epoch (N workers: each example N times per epoch). A DYNAMIC source must be splittable
(`Dataset.range`, not `Dataset.random` / `flat_map`), so the service pipeline
(`data.Datasets.service_stream`, in training/data/pipeline.py beside the local stream) is one
`Dataset.range` over the epochs' global positions: position g of epoch e is example
`index_shuffle(g % used, (seed, e))` -- the local pipeline's permutation -- augmented with the
stateless seed (seed, g), batches mixed with (seed + 1, first g). Keras `fit` reads it with
`steps_per_epoch`, keeping one iterator across epochs, so epoch boundaries are step counts;
each worker batches what it was handed, so a batch near an epoch boundary can hold examples of
both epochs (one spare epoch covers what workers drop at the end).

What the workers run must serialize (no `py_function` / `numpy_function`): the sources' own
readers do (folders: `read_file` of constant paths; digits / keras: the arrays as constants in
the graph), the decoded-image cache does not (its disk mode maps a file), so the trainer turns
the cache off and the workers decode. Unreadable files are skipped on the workers by a
graph-only filter and counted (each batch carries its count to the trainer's run log), without
names. tfds sets (no random access) are refused. A resumed run starts the stream at its first
epoch (the last finished one).
"""

import signal
import socket
import threading
import time

import tensorflow as tf

from convmixer_tf.training.config import parse_service_address

PROCESSING_MODE = tf.data.experimental.service.ShardingPolicy.DYNAMIC  # "distributed_epoch"


def check_reachable(address, timeout):
    """Raises ConnectionError (one line, naming the fix) unless a TCP connection to the
    dispatcher at `address` opens within `timeout` seconds: tf.data itself would retry for
    ever, so an unreachable dispatcher would hang the trainer or a worker."""
    host, port = parse_service_address(address)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(2.0, timeout))):
                return
        except OSError as error:
            if time.monotonic() >= deadline:
                raise ConnectionError(
                    f"Cannot reach the tf.data service dispatcher at grpc://{host}:{port} "
                    f"({error.strerror or error}) after {timeout:g} s: start it with "
                    f"`convmixer-data-service dispatcher --port {port}` on {host}, or fix "
                    f"--data-service.") from None
            time.sleep(0.25)


def distribute(dataset, address, job_name, timeout):
    """`dataset` run by the tf.data service at `address` ("grpc://HOST:PORT") in
    `distributed_epoch` mode (each element processed once, by one worker); consumers with the
    same `job_name` share the job. Checks the dispatcher is reachable first (bounded wait)."""
    check_reachable(address, timeout)
    host, port = parse_service_address(address)
    return dataset.apply(tf.data.experimental.service.distribute(
        processing_mode=PROCESSING_MODE, service=f"grpc://{host}:{port}", job_name=job_name))


# ---------------------------------------------------------------- the servers


def start_dispatcher(config):
    """A started dispatcher (`config.DispatcherConfig`) on its port; with a `work_dir` it
    journals its state there and recovers it on restart (fault-tolerant mode)."""
    return tf.data.experimental.service.DispatchServer(
        tf.data.experimental.service.DispatcherConfig(
            port=config.port, work_dir=config.work_dir or None,
            fault_tolerant_mode=bool(config.work_dir)))


def start_worker(config):
    """A started worker (`config.WorkerConfig`) on its port, registered with its dispatcher
    (HOST:PORT), advertising its `address` (HOST; default: localhost for a local dispatcher,
    else this machine's name) so the trainer can reach it."""
    host, dispatcher_port = parse_service_address(config.dispatcher)
    check_reachable(config.dispatcher, config.dispatcher_timeout)
    address = config.address
    if not address:
        address = "localhost" if host in ("localhost", "127.0.0.1", "::1") else socket.getfqdn()
    return tf.data.experimental.service.WorkerServer(tf.data.experimental.service.WorkerConfig(
        dispatcher_address=f"{host}:{dispatcher_port}", worker_address=f"{address}:%port%",
        port=config.port))


def serve(server, on_ready=None):
    """Blocks until SIGTERM or SIGINT, then stops `server` (a clean shutdown: its port is
    released, the dispatcher sees a worker leave). `on_ready()` runs once the handlers are on."""
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM,
                                                                     signal.SIGINT)}
    try:
        if on_ready:
            on_ready()
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
