"""convmixer_tf.timing: the one interleaved timer (rotation, warm-up, clocks)."""

import time

import pytest

from convmixer_tf import timing


def _recording(calls, name, value):
    def run():
        calls.append(name)
        return value
    return run


def test_rounds_rotate_after_the_warm_up_and_keep_each_rounds_time():
    calls = []
    res = timing.interleaved({n: _recording(calls, n, i) for i, n in enumerate("abc")},
                             rounds=4, warmup=2)
    assert calls[:6] == ["a", "a", "b", "b", "c", "c"]
    assert calls[6:] == list("abc" "bca" "cab" "abc")
    assert {n: r["result"] for n, r in res.items()} == {"a": 0, "b": 1, "c": 2}
    assert all(len(r["wall"]) == 4 and set(r) == {"result", "wall"} for r in res.values())


def test_cpu_clock_leaves_out_waiting_and_wall_clock_counts_it():
    def sleeper():
        time.sleep(0.05)

    res = timing.interleaved({"sleep": sleeper}, rounds=2, warmup=0, clocks=("cpu", "wall"))
    assert min(res["sleep"]["wall"]) >= 0.05
    assert max(res["sleep"]["cpu"]) < 0.02
    assert timing.median_ms([0.001, 0.003, 0.002]) == pytest.approx(2.0)
    assert timing.clock_for_threads(1) == timing.clock_for_threads(None) == "cpu"
    assert timing.clock_for_threads(4) == "wall"


def test_bad_clocks_or_rounds_are_refused_before_running():
    calls = []
    with pytest.raises(ValueError, match=r"clocks must be names from \['cpu', 'process', 'wall'\]"):
        timing.interleaved({"a": _recording(calls, "a", 1)}, 1, clocks=("gpu",))
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        timing.interleaved({"a": _recording(calls, "a", 1)}, 0)
    assert calls == []


def test_prepare_runs_untimed_before_each_call_and_hands_over_its_value():
    made = []

    def prepare():
        time.sleep(0.05)  # set-up the timer must leave out
        made.append(len(made))
        return made[-1]

    res = timing.interleaved({"a": lambda state: state * 10}, rounds=3, warmup=1,
                             prepare={"a": prepare})
    assert made == [0, 1, 2, 3]
    assert res["a"]["result"] == 30 and max(res["a"]["wall"]) < 0.04
    with pytest.raises(ValueError, match="one entry per candidate"):
        timing.interleaved({"a": len, "b": len}, 1, prepare={"a": list})
