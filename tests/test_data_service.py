"""tf.data service: the stream's epochs, the servers' command, the trainer's --data-service.

Every server here is bounded: subprocesses get timeouts and are killed in `finally`."""

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from convmixer_tf import cli
from convmixer_tf.training import data_service
from convmixer_tf.training.config import (AugmentConfig, DispatcherConfig, TrainConfig,
                                          WorkerConfig)
from convmixer_tf.training.data import pipeline, sources

from helpers import subprocess_env
ENV = subprocess_env()


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _command(function, *args):
    """argv running `cli.<function>(args)` in a fresh Python: the console entry point's code."""
    code = f"import sys; from convmixer_tf import cli; sys.exit(cli.{function}(sys.argv[1:]))"
    return [sys.executable, "-c", code, *map(str, args)]


def _start(function, *args):
    return subprocess.Popen(_command(function, *args), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for_line(proc, pattern, timeout=90):
    """The first stdout line of `proc` matching `pattern` (fails on exit or timeout)."""
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if re.search(pattern, line):
            return line
    raise AssertionError(f"no line matching {pattern!r} in:\n{''.join(seen)}")


def _stop(proc, timeout=20):
    """SIGTERM, then kill after `timeout`; (exit code, rest of stdout)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return proc.returncode, out


def _stop_cleanly(procs):
    """SIGTERM to the servers, workers first: each exits 0 saying it stopped."""
    for proc in procs[::-1]:
        code, out = _stop(proc)
        assert code == 0 and "stopped" in out, out[-2000:]


def _kill(procs):
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("address", ["localhost:5050", "grpc://", "grpc://host", "http://h:1",
                                     "grpc://h:1/path"])
def test_bad_addresses_are_refused_before_any_work(address):
    with pytest.raises(ValueError, match="grpc://HOST:PORT"):
        TrainConfig(data_service=address)


def test_multi_worker_with_a_data_service_is_refused():
    with pytest.raises(ValueError, match="not supported"):
        TrainConfig(data_service="grpc://localhost:5050", strategy="multi_worker")


def test_unreachable_dispatcher_is_one_line_and_bounded(tmp_path, capsys):
    """Through the command: no dispatcher on the port -> exit 2 and one line after
    --dispatcher-timeout seconds (tf.data alone would retry for ever)."""
    port = _free_port()
    start = time.monotonic()
    code = cli.train_main(["--data-service", f"grpc://localhost:{port}", "--epochs", "1",
                           "--output-dir", str(tmp_path / "out"), "--run-dir",
                           str(tmp_path / "runs"), "--no-export", "--dispatcher-timeout", "1.5"])
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("convmixer-train: error: Cannot reach the tf.data service "
                             f"dispatcher at grpc://localhost:{port}"), err
    assert "convmixer-data-service dispatcher" in err[0]
    assert "after 1.5 s" in err[0]
    assert 1.5 <= elapsed < 1.5 + 20
    assert TrainConfig().dispatcher_timeout == WorkerConfig(dispatcher="h:1").dispatcher_timeout == 10
    for make in (lambda t: TrainConfig(dispatcher_timeout=t),
                 lambda t: WorkerConfig(dispatcher="h:1", dispatcher_timeout=t)):
        with pytest.raises(ValueError, match="dispatcher_timeout must be > 0 seconds"):
            make(0)


def test_worker_without_dispatcher_is_one_line(capsys):
    port = _free_port()
    assert cli.data_service_main(["worker", "--dispatcher", f"localhost:{port}",
                                  "--dispatcher-timeout", "0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Cannot reach the tf.data service dispatcher" in err[0], err


def _index_pipeline(size=12, batch=3, seed=5):
    """Datasets over `size` 1x1 images whose pixel is their index (image_size 1, no
    augmentation): what a stream yields names the examples it read."""
    split = sources.Split(size=size, examples=None, read=lambda i: (
        tf.fill([1, 1, 3], tf.cast(i, tf.uint8)), tf.cast(i % 2, tf.int32)))
    source = sources.Source(train=split, test=split, class_names=("even", "odd"))
    return pipeline.Datasets(
        pipeline._Pipeline(source, 1, batch, AugmentConfig(), seed, 1.0, "off", 0, 0, None),
        num_classes=2, class_names=source.class_names, train_size=size, test_size=size,
        steps_per_epoch=size // batch, image_size=1)


def _indices(ds):
    return np.concatenate([x.numpy()[:, 0, 0, 0] for x, _ in ds]).astype(int)


def test_service_stream_is_the_local_stream_and_reads_each_example_once_across_two_workers():
    """The service's stream (no service in between) yields the local stream's batches: the
    same (seed, epoch)-keyed permutations, one spare epoch; a resumed run's starts at its
    epoch. Through a dispatcher and 2 workers (distributed_epoch) nothing is read twice."""
    size, epochs, batch = 12, 3, 3
    ds = _index_pipeline(size, batch)
    steps = size // batch
    local = _indices(ds.service_stream(steps, epochs, 0, send=lambda d: d))
    streamed = _indices(ds.train_stream().take((epochs + 1) * steps))
    np.testing.assert_array_equal(local, streamed)
    epochs_read = local.reshape(epochs + 1, size)
    for e in epochs_read:
        assert sorted(e) == list(range(size))
    assert len({tuple(e) for e in epochs_read}) == epochs + 1  # a new order each epoch
    resumed = _indices(ds.service_stream(steps, epochs, 2, send=lambda d: d))
    np.testing.assert_array_equal(resumed, local[2 * size:])
    # Fewer steps per epoch: each epoch reads the first steps x batch of its permutation.
    short = _indices(ds.service_stream(2, epochs, 0, send=lambda d: d))
    np.testing.assert_array_equal(short, _indices(ds.train_stream(steps_per_epoch=2).take(
        (epochs + 1) * 2)))

    dispatcher = data_service.start_dispatcher(DispatcherConfig(port=_free_port()))
    address = f"localhost:{dispatcher.target.rsplit(':', 1)[1]}"
    workers = [data_service.start_worker(WorkerConfig(dispatcher=address)) for _ in range(2)]
    try:
        served = ds.service_stream(steps, epochs, 0, send=lambda d: data_service.distribute(
            d, "grpc://" + address, job_name="test-once", timeout=10))
        got = _indices(served)
        counts = np.bincount(got, minlength=size)
        assert counts.max() <= epochs + 1, counts  # no example more often than its epochs
        # Each worker drops at most its last partial batch; everything else came once.
        assert len(got) >= (epochs + 1) * size - 2 * (batch - 1), sorted(got)
    finally:
        for w in workers:
            w.stop()
        dispatcher.stop()


def test_service_stream_skips_unreadable_files_graph_only_and_counts_them(tmp_path, caplog):
    """A folder with a broken JPEG under the ImageNet-style crop (each JPEG decodes only its
    crop window): the stream serializes (graph ops only), drops the broken file, and the
    trainer's side counts it (unnamed) for the epoch's log line."""
    for split, count in (("train", 4), ("val", 1)):
        for name in ("cat", "dog"):
            os.makedirs(tmp_path / split / name)
            for i in range(count):
                Image.fromarray(np.full((20, 24, 3), 40 * i, np.uint8)).save(
                    tmp_path / split / name / f"{i}.jpg")
    (tmp_path / "train" / "dog" / "bad.jpg").write_bytes(b"this is not a jpeg")
    ds = pipeline.build_datasets(f"folder:{tmp_path}", image_size=8, global_batch_size=3,
                                 cache="off", augment=AugmentConfig(crop_scale=0.5, hflip=0.5))
    assert (ds.train_size, ds.steps_per_epoch) == (9, 3)  # every file read each epoch
    sent = []

    def send(stream):  # what the dispatcher receives: it must serialize without py_function
        graph = stream._as_serialized_graph().numpy()
        assert b"PyFunc" not in graph, "the service's workers cannot run py_function"
        sent.append(stream)
        return stream

    served = ds.service_stream(ds.steps_per_epoch, 1, 0, send)
    images = np.concatenate([x.numpy() for x, _ in served])
    # 2 epochs (one spare) of 8 readable files = 16, in full batches of 3.
    assert sent and images.shape == (15, 8, 8, 3)
    caplog.set_level(logging.INFO, logger="convmixer_tf")
    pipeline.SkippedImages(ds).on_epoch_end(0)
    line = caplog.text  # the last epoch's may sit after its last kept image
    assert re.search(r"skipped [12] unreadable image\(s\)", line) and "names unknown" in line, line


def test_a_tfds_stream_is_refused_with_one_line():
    split = sources.Split(size=10, examples=None, read=None, encoded=True)
    ds = pipeline.Datasets(pipeline._Pipeline(
        sources.Source(train=split, test=split, class_names=("a", "b")), 8, 2, AugmentConfig(),
        0, 1.0, "off", 0, 0, None), num_classes=2, class_names=("a", "b"), train_size=10,
        test_size=10, steps_per_epoch=5, image_size=8)
    with pytest.raises(ValueError, match="--data-service needs a source with random access"):
        ds.service_stream(5, 1, 0, send=lambda d: d)


def _write_patterns(root, per_class=40, size=32):
    """3 classes a small model tells apart: horizontal stripes, vertical stripes, blobs; random
    phase, colour and noise per image."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    for name in ("horizontal", "vertical", "blobs"):
        os.makedirs(root / name)
        for i in range(per_class):
            phase, period = rng.uniform(0, 2 * np.pi), rng.uniform(4, 8)
            wave = {"horizontal": np.sin(2 * np.pi * yy / period + phase),
                    "vertical": np.sin(2 * np.pi * xx / period + phase),
                    "blobs": np.sin(2 * np.pi * xx / period + phase)
                    * np.sin(2 * np.pi * yy / period)}[name]
            colour = rng.uniform(60, 255, 3)
            pixels = 128 + wave[..., None] * colour / 2 + rng.normal(0, 12, (size, size, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
                root / name / f"{i}.jpg", quality=90)
    return root


TRAIN_FLAGS = ("--image-size", 32, "--dim", 32, "--depth", 2, "--kernel-size", 5,
               "--patch-size", 4, "--epochs", 6, "--batch-size", 16, "--max-lr", 0.01,
               "--crop-scale", 0.6, "--hflip", 0.5, "--mixup", 0.1, "--seed", 1, "--verbose", 2,
               "--no-export")


def _accuracy(output):
    return float(re.search(r"held-out accuracy: ([\d.]+)%", output).group(1)) / 100


@pytest.mark.large
def test_dispatcher_two_workers_and_trainer_match_the_local_pipeline(tmp_path):
    """The real commands on localhost: a dispatcher, 2 workers, `convmixer-train
    --data-service` on a 3-class folder; the held-out accuracy is that of the same run on the
    local pipeline. The servers stop cleanly on SIGTERM."""
    folder = _write_patterns(tmp_path / "patterns")
    port = _free_port()
    procs = []
    try:
        dispatcher = _start("data_service_main", "dispatcher", "--port", port)
        procs.append(dispatcher)
        _wait_for_line(dispatcher, "dispatcher running")
        for _ in range(2):
            procs.append(_start("data_service_main", "worker", "--dispatcher",
                                f"localhost:{port}"))
            _wait_for_line(procs[-1], "worker running")
        served = subprocess.run(
            _command("train_main", "--dataset", f"folder:{folder}", "--data-service",
                     f"grpc://localhost:{port}", "--name", "served", "--output-dir",
                     tmp_path / "out", "--run-dir", tmp_path / "runs", *TRAIN_FLAGS),
            env=ENV, capture_output=True, text=True, timeout=400)
        assert served.returncode == 0, served.stdout[-3000:] + served.stderr[-3000:]
        assert "Training input from the tf.data service" in served.stdout
        assert "Decoded" not in served.stdout  # no local decode pass of the training set
        _stop_cleanly(procs)
    finally:
        _kill(procs)
    local = subprocess.run(
        _command("train_main", "--dataset", f"folder:{folder}", "--name", "local",
                 "--output-dir", tmp_path / "out", "--run-dir", tmp_path / "runs",
                 *TRAIN_FLAGS),
        env=ENV, capture_output=True, text=True, timeout=400)
    assert local.returncode == 0, local.stdout[-3000:] + local.stderr[-3000:]
    served_acc, local_acc = _accuracy(served.stdout), _accuracy(local.stdout)
    print(f"held-out accuracy: data service {served_acc:.2%}, local {local_acc:.2%}")
    assert local_acc >= 0.9, local.stdout[-2000:]
    assert abs(served_acc - local_acc) <= 0.1, (served_acc, local_acc)


def test_train_reads_its_batches_from_the_service(tmp_path, caplog):
    """train() with data_service set: fit takes steps_per_epoch batches per epoch from the
    service's workers (the digits arrays travel in the graph), evaluation stays local."""
    from convmixer_tf.training.train import train

    dispatcher = data_service.start_dispatcher(DispatcherConfig(port=_free_port()))
    address = f"localhost:{dispatcher.target.rsplit(':', 1)[1]}"
    worker = data_service.start_worker(WorkerConfig(dispatcher=address))
    caplog.set_level(logging.INFO, logger="convmixer_tf")
    try:
        result = train(TrainConfig(
            data_service="grpc://" + address, dim=32, depth=2, epochs=3, batch_size=32,
            steps_per_epoch=20, max_lr=0.01, augment=AugmentConfig(mixup=0.2), verbose=0,
            output_dir=str(tmp_path / "out"), run_dir=str(tmp_path / "runs")))
    finally:
        worker.stop()
        dispatcher.stop()
    out = caplog.text
    assert "Training input from the tf.data service at grpc://localhost:" in out
    assert ": 20 steps per epoch" in out and "Input pipeline:" not in out
    assert len(result["history"].history["loss"]) == 3
    # Learning from the served batches (chance: 0.1; this config on the local pipeline: 0.84,
    # through the service 0.82 when written).
    assert result["test_accuracy"] > 0.5


def test_data_service_command_usage_errors(capsys):
    for argv, message in ((["dispatcher", "--port", "0"], "--port must be in 1-65535"),
                          (["worker"], "--dispatcher"), ([], "role")):
        with pytest.raises(SystemExit) as exit_info:
            cli.data_service_main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.data_service_main(["worker", "--help"])
    text = capsys.readouterr().out
    assert "--address" in text and "the host name trainers reach this worker by" in text


def test_dispatcher_with_work_dir_and_a_worker_stop_cleanly_on_sigterm(tmp_path):
    """The real command: a fault-tolerant dispatcher journals into --work-dir; a worker on a
    chosen --port and --address registers; SIGTERM stops both with exit 0."""
    port, worker_port = _free_port(), _free_port()
    procs = []
    try:
        procs.append(_start("data_service_main", "dispatcher", "--port", port, "--work-dir",
                            tmp_path / "journal"))
        _wait_for_line(procs[0], "dispatcher running")
        procs.append(_start("data_service_main", "worker", "--dispatcher", f"localhost:{port}",
                            "--port", worker_port, "--address", "127.0.0.1"))
        _wait_for_line(procs[1], "worker running")
        with socket.create_connection(("localhost", worker_port), timeout=5):
            pass  # the worker listens where it was told
        assert os.listdir(tmp_path / "journal")  # the dispatcher's state, for a restart
        _stop_cleanly(procs)
    finally:
        _kill(procs)
