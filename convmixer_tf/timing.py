"""Interleaved timing: the one timer of the export's edge-build choice and the benchmarks.

Each round runs every candidate once, in rotating order, after a warm-up, so load changes on a
shared machine hit every candidate alike; callers take medians over the rounds.
"""

import statistics
import time

CLOCKS = {
    "wall": time.perf_counter,  # elapsed time: what a caller waits, other jobs included
    # The calling thread's CPU time: with one compute thread (LiteRT, torch at 1 thread) what
    # the work costs, which other jobs on the machine do not inflate.
    "cpu": time.thread_time,
    "process": time.process_time,  # CPU time of every thread (tf.data's pools included)
}


def clock_for_threads(num_threads):
    """"cpu" for one thread (the work runs in the calling thread), else "wall"."""
    return "cpu" if (num_threads or 1) == 1 else "wall"


def interleaved(candidates, rounds, warmup=1, clocks=("wall",), prepare=None):
    """Runs each `candidates[name]()` `warmup` times, then `rounds` rounds of every candidate
    in rotating order. Returns {name: {"result": its last return value, clock: [seconds of
    each round] for each of `clocks` (names in CLOCKS)}}. With `prepare` ({name: callable}),
    `prepare[name]()` runs untimed before each call and the call receives what it returns (a
    fresh, warmed-up iterator: set-up left out, nothing left running between calls)."""
    unknown = sorted(set(clocks) - set(CLOCKS))
    if unknown or not clocks:
        raise ValueError(f"clocks must be names from {sorted(CLOCKS)}; got {list(clocks)}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1; got {rounds}")
    if prepare is not None and set(prepare) != set(candidates):
        raise ValueError("prepare must have one entry per candidate")
    names = list(candidates)
    for name in names:
        for _ in range(warmup):
            candidates[name](*([prepare[name]()] if prepare else []))
    timers = [CLOCKS[c] for c in clocks]
    out = {name: {c: [] for c in clocks} for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            args = [prepare[name]()] if prepare else []
            start = [timer() for timer in timers]
            result = candidates[name](*args)
            end = [timer() for timer in timers]
            del args  # a prepared iterator is released before the next candidate runs
            for c, s, e in zip(clocks, start, end):
                out[name][c].append(e - s)
            out[name]["result"] = result
    return out


def median_ms(seconds):
    """The median of a list of seconds, in milliseconds."""
    return 1000 * statistics.median(seconds)
