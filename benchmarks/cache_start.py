"""Time to the first training batch, and to a fully cached training split, on a folder of small
JPEGs (CIFAR-10 as files: 32x32, ~1 KB each; issue 24): ours with `--cache auto` (the default:
decoded once into memory, in the background while training starts) and `--cache off`
(streaming), an older checkout of ours (`--before`), and PIL in a `ProcessPoolExecutor` reading
and decoding the same files to numpy arrays (what a user would write instead of a cache).

    python -m benchmarks.cache_start make /tmp/jpeg32 --images 10000
    git archive 0a9b607 | tar -x -C /tmp/before          # the cache before the background fill
    python -m benchmarks.cache_start run /tmp/jpeg32 --rounds 3 --before /tmp/before
    python -m benchmarks.cache_start stages /tmp/jpeg32   # where the time per file goes

`run` measures each candidate in a fresh process (imports untimed: the clock starts at
`build_datasets`, or at listing the files for PIL) in rotating order, round by round, and
reports the median and range over rounds with the load average. Ours records when the cache
logs "Decoded ... once" (fully cached) and when the first batch of 32 arrives. The children run
this file as a script so that `--before`'s side imports the older checkout's convmixer_tf.
Logs: benchmarks/results/cache-start-<cpu class>.log.
"""

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time

BATCH = 32
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout


def _files(root):
    """(path, label) of root/train/<class>/*.jpg (or root/<class>/*.jpg), sorted."""
    train = os.path.join(root, "train")
    root = train if os.path.isdir(train) else root
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    return [(os.path.join(root, c, f), label) for label, c in enumerate(classes)
            for f in sorted(os.listdir(os.path.join(root, c))) if f.endswith(".jpg")]


# ---------------------------------------------------------------- the folder


def _write(job):
    import numpy as np
    from PIL import Image

    path, seed = job
    rng = np.random.default_rng(seed)
    # A CIFAR-like 32x32 picture: smooth colour blobs plus fine noise (~1 KB at quality 90).
    small = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    base = np.asarray(small.resize((32, 32), Image.BICUBIC), np.float32)
    pixels = np.clip(base + rng.normal(0, 12, (32, 32, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return os.path.getsize(path)


def make(args):
    """root/train/class_<k>/<i>.jpg (args.images, 10 classes) and root/val/ (10 per class)."""
    from concurrent.futures import ProcessPoolExecutor

    jobs = []
    for split, count in (("train", args.images), ("val", 100)):
        for i in range(count):
            folder = os.path.join(args.folder, split, f"class_{i % 10}")
            os.makedirs(folder, exist_ok=True)
            jobs.append((os.path.join(folder, f"{i:06d}.jpg"), (split == "val") * 10**7 + i))
    with ProcessPoolExecutor() as pool:
        sizes = list(pool.map(_write, jobs, chunksize=256))
    print(f"Wrote {len(sizes):,} JPEGs of 32x32 ({sum(sizes) / len(sizes):,.0f} bytes each) "
          f"under {args.folder}")


# ---------------------------------------------------------------- one measurement (children)


class _Stamped(logging.Handler):
    """Remembers when each library log line was written."""

    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append((time.perf_counter(), record.getMessage()))


def _ours(args, cache):
    import tensorflow as tf

    import convmixer_tf
    from convmixer_tf.training.data import pipeline

    tf.zeros(1)  # TensorFlow's own start-up, untimed
    stamped, logger = _Stamped(), logging.getLogger("convmixer_tf")
    logger.addHandler(stamped)
    logger.setLevel(logging.INFO)
    cpu, start = time.process_time(), time.perf_counter()
    ds = pipeline.build_datasets(args.folder, image_size=32, global_batch_size=BATCH, cache=cache)
    images, _ = next(iter(ds.train))
    first, cpu = time.perf_counter(), time.process_time() - cpu
    assert images.shape[0] == BATCH
    # The fill goes on in the background after the first batch (`--before`: it ended first).
    getattr(ds, "wait_for_cache", lambda: None)()
    cached = [t for t, line in stamped.lines if line.startswith("Decoded ") and " train " in line]
    return dict(first_s=first - start, cached_s=cached[0] - start if cached else None,
                cpu_s=cpu, files=ds.train_size, library=os.path.dirname(convmixer_tf.__file__),
                log=[line for _, line in stamped.lines])


def _pil_load(path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _pil(args):
    """Lists the files, then reads + decodes them to numpy in a process pool (one worker per
    core), keeping every array: the first batch is the first 32 in order."""
    import resource
    from concurrent.futures import ProcessPoolExecutor

    def cpu():  # this process and its reaped children (the pool's workers, after shutdown)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.process_time() + children.ru_utime + children.ru_stime

    cpu_start, start = cpu(), time.perf_counter()
    files = _files(args.folder)
    cached, first = [], None
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        for image in pool.map(_pil_load, [p for p, _ in files], chunksize=args.chunksize):
            cached.append(image)
            if len(cached) == BATCH:
                first = time.perf_counter()
    done = time.perf_counter()
    assert cached[0].shape == (32, 32, 3)
    return dict(first_s=first - start, cached_s=done - start, cpu_s=cpu() - cpu_start,
                files=len(cached))


def child(args):
    result = _pil(args) if args.side == "pil" else _ours(args, args.side)
    print(json.dumps(result), flush=True)


# ---------------------------------------------------------------- the interleaved run


def _spawn(args, side, pythonpath=None):
    pythonpath = pythonpath or HERE
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=pythonpath)
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "child", args.folder, "--side", side,
         "--chunksize", str(args.chunksize)],
        cwd=pythonpath, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"the {side} side failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cpu():
    from convmixer_tf import fast_layers

    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next(line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return fast_layers.cpu_class(), model


def run(args):
    cpu_class, model = _cpu()
    files = _files(args.folder)
    size = statistics.mean(os.path.getsize(p) for p, _ in files)
    print(f"# python -m benchmarks.cache_start {' '.join(sys.argv[1:])}")
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; CPU class {cpu_class} "
          f"({model}, {os.cpu_count()} cores); load average {os.getloadavg()}")
    print(f"# {len(files):,} training JPEGs under {args.folder} ({size:,.0f} bytes each); "
          f"first batch = {BATCH} images; {args.rounds} rounds, each candidate in a fresh "
          f"process, rotating order; PIL pool chunksize {args.chunksize}", flush=True)
    sides = {"ours, --cache auto": ("auto", None), "ours, --cache off": ("off", None),
             "PIL in a process pool": ("pil", None)}
    if args.before:
        sides["ours before, --cache auto"] = ("auto", args.before)
    results = {name: [] for name in sides}
    names = list(sides)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            result = _spawn(args, *sides[name])
            result["loadavg"] = os.getloadavg()[0]
            results[name].append(result)
            print(f"round {r + 1} {name}: first batch {result['first_s']:.2f} s, cached "
                  + (f"{result['cached_s']:.2f} s" if result["cached_s"] is not None else "-")
                  + f", CPU {result['cpu_s']:.2f} s, loadavg {result['loadavg']:.1f}"
                  + (f", library {result['library']}" if "library" in result else ""),
                  flush=True)
            for line in result.get("log", []) if r == 0 else []:
                print(f"    | {line}")

    def cell(values, count):
        if not values:
            return "-"
        per = [v * 10_000 / count for v in values]
        return f"{statistics.median(per):.2f} ({min(per):.2f}-{max(per):.2f})"

    print("\n| per 10,000 files, seconds: median (range) | first batch | fully cached "
          "| CPU seconds, all processes (to the first batch; PIL: to fully cached) |")
    print("|---|---|---|---|")
    medians = {}
    for name, rounds in results.items():
        count = rounds[0]["files"]
        first = [r["first_s"] for r in rounds]
        cached = [r["cached_s"] for r in rounds if r["cached_s"] is not None]
        medians[name] = (statistics.median(first),
                         statistics.median(cached) if cached else None)
        print(f"| {name} | {cell(first, count)} | {cell(cached, count)} "
              f"| {cell([r['cpu_s'] for r in rounds], count)} |")
    ours, pil = medians["ours, --cache auto"], medians["PIL in a process pool"]
    print(f"\nratios of medians: ours auto / PIL: first batch {ours[0] / pil[0]:.2f}x, fully "
          f"cached {ours[1] / pil[1]:.2f}x; ours auto / ours off, first batch "
          f"{ours[0] / medians['ours, --cache off'][0]:.2f}x")
    if args.before:
        before = medians["ours before, --cache auto"]
        print(f"ours before / ours after (auto): first batch {before[0] / ours[0]:.1f}x, fully "
              f"cached {before[1] / ours[1]:.1f}x")
    print(f"# load average at the end {os.getloadavg()}")


# ---------------------------------------------------------------- where the time goes


def stages(args):
    """Per-file cost of each step the cache takes, in this process (this checkout)."""
    import tensorflow as tf

    from convmixer_tf.training.data import cache, sources

    tf.zeros(1)
    split = sources.load_source(args.folder, image_size=32, seed=0, validation_split=0.1,
                                data_dir=None).train
    n = split.size

    def indexed():
        return split.examples().enumerate().map(lambda i, xy: (xy[0], (i, xy[1])))

    def decoded(i):
        encoded, label = split.read(i)
        from convmixer_tf import preprocessing

        return preprocessing.decode_image(encoded), label

    steps = {
        "Python loop over Dataset.range (per element)":
            lambda: sum(1 for _ in tf.data.Dataset.range(n).as_numpy_iterator()),
        "header of every file (sources.header_shapes, PIL, 16 threads)":
            lambda: len(sources.header_shapes(split.paths)),
        "read_file, parallel map, Python loop per file":
            lambda: sum(1 for _ in split.examples().as_numpy_iterator()),
        "read + decode, parallel map, Python loop per file":
            lambda: sum(1 for _ in tf.data.Dataset.range(n).map(
                decoded, num_parallel_calls=tf.data.AUTOTUNE).as_numpy_iterator()),
        "read + decode_flagged (a dataset per file), Python loop per file":
            lambda: sum(1 for _ in cache.decode_flagged(indexed()).as_numpy_iterator()),
        f"read + decode, parallel map, chunks of {cache.CHUNK} (cache.decode_chunks)":
            lambda: sum(len(c[2]) for c in cache.decode_chunks(split).as_numpy_iterator()),
        "cache.decode_once (memory)":
            lambda: cache.decode_once(split, cache.Decision("memory", 0, ""), None,
                                      "train").size,
    }
    print(f"# python -m benchmarks.cache_start {' '.join(sys.argv[1:])}")
    print(f"# {n:,} files under {args.folder}; load average {os.getloadavg()}")
    print("| step | wall ms per file (median of 3) | range | CPU ms per file (median) |")
    print("|---|---|---|---|")
    for name, step in steps.items():
        if args.only and not any(word in name for word in args.only.split(",")):
            continue
        times, cpu = [], []
        for _ in range(3):
            start, cpu_start = time.perf_counter(), time.process_time()
            count = step()
            times.append((time.perf_counter() - start) / count * 1000)
            cpu.append((time.process_time() - cpu_start) / count * 1000)
        print(f"| {name} | {statistics.median(times):.3f} | {min(times):.3f}-{max(times):.3f} "
              f"| {statistics.median(cpu):.3f} |", flush=True)
    print(f"# load average at the end {os.getloadavg()}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("make", "run", "stages", "child"))
    parser.add_argument("folder")
    parser.add_argument("--images", type=int, default=10_000, help="make: training JPEGs")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", default="", help="an older checkout of convmixer_tf")
    parser.add_argument("--chunksize", type=int, default=64, help="PIL pool: files per task")
    parser.add_argument("--only", default="", help="stages: steps whose name has one of "
                        "these comma-separated words")
    parser.add_argument("--side", choices=("auto", "off", "pil"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    return dict(make=make, run=run, stages=stages, child=child)[args.what](args)


if __name__ == "__main__":
    sys.exit(main())
