"""Strategies, XLA under MirroredStrategy, replica-identical weights, real multi-worker runs.

Multi-replica runs happen in subprocesses: logical CPU devices and MultiWorkerMirroredStrategy
must be set up before TF initialises, which the shared pytest process already did.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from convmixer_tf import cli
from convmixer_tf.training import distribute
from convmixer_tf.training.data import pipeline

from helpers import ROOT, subprocess_env, worker
# XLA vs no XLA after the same 12 AdamW steps (weights move by up to ~0.7): float32 only
# reorders float sums (measured 4e-7); float16 rounds every fused intermediate to 11
# significant bits (unit roundoff 4.9e-4, measured 2.3e-4): ~20x margins.
XLA_TOLERANCE = {"float32": 1e-5, "mixed_float16": 5e-3}


def test_strategy_xla_and_batch_flags_fail_clearly(monkeypatch, tiny_model):
    assert distribute.resolve_xla("off") is False and distribute.resolve_xla("on") is True
    assert distribute.resolve_xla("auto") is bool(tf.config.list_physical_devices("GPU"))
    with pytest.raises(ValueError, match="Unknown xla mode"):
        distribute.resolve_xla("yes")
    with pytest.raises(ValueError, match="Unknown strategy"):
        distribute.make_strategy("tpu")
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="TF_CONFIG is not set"):
        distribute.make_strategy("multi_worker")
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ValueError, match="not valid cluster JSON"):
        distribute.make_strategy("multi_worker")
    monkeypatch.setenv("TF_CONFIG", json.dumps(
        {"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 3}}))
    with pytest.raises(ValueError, match="is not in cluster"):
        distribute.make_strategy("multi_worker")

    class TwoReplicas:
        num_replicas_in_sync = 2

    assert distribute.global_batch_size(64, TwoReplicas()) == 64
    with pytest.raises(ValueError, match="multiple of the 2 replicas"):
        distribute.global_batch_size(63, TwoReplicas())
    model = tiny_model()
    assert distribute.make_trainer(model) is model  # one device: Keras's own fit and XLA


def test_cli_rejects_bad_strategy_and_xla():
    for argv in (["--strategy", "tpu"], ["--xla", "maybe"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.train_main(argv)
        assert exit_info.value.code == 2


def test_replica_trainer_equals_stock_fit_on_one_device(tiny_model):
    """Same steps as Keras's own train_step: loss scaling, gradients, BN statistics."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (48, 16, 16, 3)).astype("uint8")
    y = keras.utils.to_categorical(rng.integers(0, 10, 48), 10)
    results = []
    for wrap in (False, True):
        keras.utils.set_random_seed(0)
        model = tiny_model()
        trainer = distribute.ReplicaTrainer(model) if wrap else model
        trainer.compile(
            keras.optimizers.SGD(0.1), keras.losses.CategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        history = trainer.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        results.append((history.history, model.get_weights()))
    (stock_logs, stock_w), (ours_logs, ours_w) = results
    for a, b in zip(stock_w, ours_w):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stock_logs["loss"], ours_logs["loss"], rtol=1e-5)
    assert stock_logs["accuracy"] == ours_logs["accuracy"]


@pytest.mark.parametrize("precision", [
    "float32",
    # mixed precision under mirrored + XLA also trains and exports by default in
    # test_precision.py::test_train_and_export_every_precision[mixed_bfloat16-True-mirrored-on]
    pytest.param("mixed_float16", marks=pytest.mark.large),
])
def test_mirrored_two_replicas_xla_matches_no_xla(precision):
    """2 logical CPUs, XLA on and off (workers/mirrored_worker.py)."""
    proc = subprocess.run(
        [sys.executable, worker("mirrored_worker.py"), precision],
        env=subprocess_env(), capture_output=True, text=True, timeout=400,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    report = json.loads(lines[-1][len("REPORT "):])
    assert report["replicas"] == 2
    run = report[precision]
    for losses in (run["loss_off"], run["loss_on"]):
        assert losses[-1] < losses[0], (precision, losses)
    # Every replica holds the same weights and BN moving statistics, with and without XLA.
    assert run["spread_off"] == 0.0 and run["spread_on"] == 0.0, run
    assert run["moved"] > 0.1, run  # the weights did train
    assert run["xla_vs_no_xla"] < XLA_TOLERANCE[precision], (precision, run)
    # Control: stock Keras under the same strategy lets the BN statistics drift apart, so the
    # spread check above can fail.
    assert report["stock_spread"] > 1e-4
    # The all-reduce sums per-replica gradients of loss / replicas: no double scaling.
    assert report["two_replicas_vs_one_device"] < 1e-5


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _run_workers(argvs, timeout):
    """Starts one process per (argv, TF_CONFIG) on this machine, waits for all (killing any
    left in the end) and asserts each exited 0; returns their outputs."""
    procs = [subprocess.Popen(argv, env=subprocess_env(TF_CONFIG=json.dumps(tf_config)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              cwd=ROOT) for argv, tf_config in argvs]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-3000:]
    return outputs


def test_multi_worker_two_processes_end_identical(tmp_path):
    """Two `convmixer-train --strategy multi_worker` processes on 127.0.0.1 (XLA on)."""
    workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    argvs = []
    for index in range(2):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        argv = [
            sys.executable, "-m", "convmixer_tf.cli", "--no-export", "--strategy", "multi_worker",
            "--xla", "on", "--image-size", "16", "--dim", "8", "--depth", "1",
            "--kernel-size", "3", "--epochs", "2", "--steps-per-epoch", "3",
            "--batch-size", "32", "--verbose", "0", "--output-dir", str(tmp_path / f"w{index}"),
            "--run-dir", str(tmp_path / "runs"),
        ]
        argvs.append((argv, tf_config))
    _run_workers(argvs, timeout=300)
    models = [keras.saving.load_model(tmp_path / f"w{i}" / "convmixer_digits.keras")
              for i in range(2)]
    for a, b in zip(models[0].get_weights(), models[1].get_weights()):
        np.testing.assert_array_equal(a, b)
    # They trained (moved away from a fresh model) and wrote to separate run directories.
    fresh = keras.models.clone_model(models[0])
    assert any(not np.allclose(a, b) for a, b in zip(fresh.get_weights(),
                                                      models[0].get_weights()))
    assert (tmp_path / "runs" / "convmixer_digits" / "history.csv").exists()
    assert (tmp_path / "runs" / "convmixer_digits" / "workers" / "1" / "history.csv").exists()


@pytest.mark.parametrize("tf_config, message", [
    ({"cluster": {"worker": [12345]}, "task": {"type": "worker", "index": 0}},
     r'TF_CONFIG cluster\[.worker.\] holds 12345: every address must be a "host:port"'),
    ({"cluster": {"worker": ["host-without-port"]}, "task": {"type": "worker", "index": 0}},
     "host:port"),
    ({"cluster": {"worker": "a:1,b:2"}, "task": {"type": "worker", "index": 0}},
     "TF_CONFIG cluster.*must be a non-empty list"),
    ({"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": "x"}},
     "TF_CONFIG task index must be an integer"),
    ({"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": "0"}},
     "TF_CONFIG task index must be an integer"),
    ({"cluster": {"worker": ["a:1"]}, "task": {"type": "ps", "index": 0}},
     "TF_CONFIG task type must be one of"),
    ({"cluster": {"worker": ["a:1"]}, "task": {"type": "chief", "index": 0}},
     "TF_CONFIG task .* is not in cluster"),
    ({"cluster": ["a:1"], "task": {"type": "worker", "index": 0}},
     "TF_CONFIG's cluster must map"),
])
def test_tf_config_values_are_type_checked(monkeypatch, tf_config, message):
    monkeypatch.setenv("TF_CONFIG", json.dumps(tf_config))
    with pytest.raises(ValueError, match=message):
        distribute.make_strategy("multi_worker")


def test_tf_config_names_the_chief():
    two = {"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}}
    assert distribute.chief_from_tf_config(json.dumps(two)) == (False, 1)
    two["task"]["index"] = 0
    assert distribute.chief_from_tf_config(json.dumps(two)) == (True, 0)
    two["cluster"]["chief"] = ["c:3"]
    assert distribute.chief_from_tf_config(json.dumps(two)) == (False, 0)


def _worker_argv(tmp_path, tag, timeout):
    return [sys.executable, "-m", "convmixer_tf.cli", "--no-export", "--strategy",
            "multi_worker", "--cluster-timeout", str(timeout), "--verbose", "0",
            "--output-dir", str(tmp_path / tag), "--run-dir", str(tmp_path / f"runs_{tag}")]


def test_absent_peer_ends_the_wait_in_time_and_sigterm_ends_it_at_once(tmp_path):
    """Two clusters of two workers on 127.0.0.1 where worker 1 never starts: one worker gives
    up after --cluster-timeout naming the absent worker, the other stops on SIGTERM."""
    ports = _free_ports(4)
    procs, logs = {}, {}
    for tag, cluster_ports, timeout in (("timeout", ports[:2], 3), ("sigterm", ports[2:], 300)):
        workers = [f"127.0.0.1:{port}" for port in cluster_ports]
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": 0}}
        logs[tag] = open(tmp_path / f"{tag}.log", "w+")
        procs[tag] = subprocess.Popen(
            _worker_argv(tmp_path, tag, timeout),
            env=subprocess_env(TF_CONFIG=json.dumps(tf_config)),
            stdout=logs[tag], stderr=subprocess.STDOUT, text=True, cwd=ROOT,
        )
    try:
        deadline = time.monotonic() + 120
        while "waiting up to" not in (tmp_path / "sigterm.log").read_text():
            assert procs["sigterm"].poll() is None, (tmp_path / "sigterm.log").read_text()
            assert time.monotonic() < deadline, "no waiting message"
            time.sleep(0.2)
        sent = time.monotonic()
        procs["sigterm"].send_signal(signal.SIGTERM)
        assert procs["sigterm"].wait(timeout=10) == -signal.SIGTERM
        assert time.monotonic() - sent < 10
        assert procs["timeout"].wait(timeout=120) == 2
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    output = (tmp_path / "timeout.log").read_text()
    assert f"no answer within 3 s (--cluster-timeout) from worker 1 (127.0.0.1:{ports[1]})" \
        in output, output[-2000:]
    assert "Traceback" not in output


@pytest.mark.skipif(bool(tf.config.list_physical_devices("GPU")), reason="CPU-only behaviour")
def test_mirrored_on_a_cpu_runs_two_replicas_and_says_so():
    script = ("import logging, sys\n"
              "logging.basicConfig(level=logging.INFO, stream=sys.stdout)  # the library logs\n"
              "from convmixer_tf.training import distribute\n"
              "print('REPLICAS', distribute.make_strategy('mirrored').num_replicas_in_sync)")
    proc = subprocess.run([sys.executable, "-c", script], env=subprocess_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "REPLICAS 2" in proc.stdout
    assert "mirrored: 2 replica(s) on /job:localhost/replica:0/task:0/device:CPU:0" in proc.stdout
    assert "cpu_replicas=N" in proc.stdout


@pytest.mark.large  # two TF processes under strace: ~65 s on 2 loaded cores
@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (apt-get install strace)")
def test_multi_worker_each_worker_reads_only_its_share(tmp_path):
    """Two multi-worker processes on a 64-image folder (--cache off, one epoch), each under
    `strace -e trace=openat`: each opens only its half of the training files (disjoint, union
    = all: every file read once per epoch across the cluster) and evaluates its share."""
    from PIL import Image

    root = tmp_path / "images"
    for split, count in (("train", 32), ("val", 8)):
        for label in ("a", "b"):
            os.makedirs(root / split / label)
            for i in range(count):
                colour = (40 * i % 256, 90, 200 if label == "b" else 0)
                Image.new("RGB", (12, 12), colour).save(root / split / label / f"{i}.jpg")
    workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    argvs = []
    for index in range(2):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        argv = [
            "strace", "-f", "-e", "trace=openat,write", "-s", "200",
            "-o", str(tmp_path / f"trace{index}.txt"),
            sys.executable, "-m", "convmixer_tf.cli", "--no-export", "--strategy", "multi_worker",
            "--dataset", str(root), "--cache", "off", "--image-size", "8", "--dim", "8",
            "--depth", "1", "--kernel-size", "3", "--epochs", "1", "--batch-size", "8",
            "--verbose", "0", "--output-dir", str(tmp_path / f"w{index}"),
            "--run-dir", str(tmp_path / "runs"), "--name", "shards",
        ]
        argvs.append((argv, tf_config))
    _run_workers(argvs, timeout=400)

    def trained_on(index):
        """Training files worker `index` opened while training: after its "Input cache
        (test)" log line (both splits' header samples are before it), before validation's
        first file."""
        opened, training = set(), False
        for line in (tmp_path / f"trace{index}.txt").read_text().splitlines():
            if "write(" in line and "Input cache (test)" in line:
                training = True
            elif training and "openat(" in line and ".jpg" in line and "= -1" not in line:
                path = line.split('"')[1]
                if "/val/" in path:
                    return opened
                opened.add(path)
        return opened

    # What each worker should read: its slice of every global batch of epoch 0 (and, read
    # ahead by the prefetch, of the next epochs), from the (seed, epoch)-keyed permutation.
    paths = pipeline.build_datasets(str(root), global_batch_size=8, cache="off").\
        _pipeline.source.train.paths
    n = len(paths)
    positions = np.arange(6 * n)
    order = [int(pipeline.epoch_permutation(tf.constant(g, tf.int64), n, 0, n)) for g in positions]
    share = {w: {paths[i] for g, i in zip(positions, order) if (g % 8) // 4 == w}
             for w in range(2)}
    epoch0 = {w: {paths[i] for g, i in zip(positions[:n], order[:n]) if (g % 8) // 4 == w}
              for w in range(2)}
    read = [trained_on(i) for i in range(2)]
    print(f"training files opened per worker in epoch 0: "
          f"{[len(r & epoch0[w]) for w, r in enumerate(read)]} of {n}")
    for w in range(2):
        assert epoch0[w] <= read[w]  # all of its share ...
        assert read[w] <= share[w]  # ... and nothing of the other worker's
    assert epoch0[0] | epoch0[1] == set(paths) and not epoch0[0] & epoch0[1]
    models = [keras.saving.load_model(tmp_path / f"w{i}" / "shards.keras") for i in range(2)]
    for a, b in zip(models[0].get_weights(), models[1].get_weights()):
        np.testing.assert_array_equal(a, b)
