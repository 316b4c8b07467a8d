"""The time-budget clocks and schedule sizing (densekit.train.budget); the Trainer side is in test_trainer.py."""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest

from densekit.train.budget import Budget, Replan, StepTimer, children_cpu_seconds, clock_fn, cpu_seconds, seconds_per_step


def _burn_then_wait(seconds: float, done, release) -> None:  # noqa: ANN001 - multiprocessing events
    t0 = time.process_time()
    x = 0
    while time.process_time() - t0 < seconds:
        x += 1
    done.set()
    release.wait(30)


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/stat"), reason="live children need /proc")
def test_cpu_clock_counts_a_live_child_process() -> None:
    ctx = mp.get_context("fork")
    done, release = ctx.Event(), ctx.Event()
    before_all, before_main = cpu_seconds(), time.process_time()
    child = ctx.Process(target=_burn_then_wait, args=(0.4, done, release))
    child.start()
    try:
        assert done.wait(30)
        # the child is alive (waiting), its 0.4 CPU-s are counted already; this process was mostly idle
        assert cpu_seconds() - before_all >= 0.3
        assert time.process_time() - before_main < 0.3
    finally:
        release.set()
        child.join(30)
    # once it has exited and been waited for, it is counted through os.times (not twice)
    assert 0.3 <= children_cpu_seconds() - (before_all - before_main) <= 0.4 + 0.3


def test_seconds_per_step_leaves_out_the_first_step() -> None:
    assert seconds_per_step([0.0, 5.0, 6.0, 7.0, 8.5]) == pytest.approx(1.0)
    assert seconds_per_step([0.0, 2.0]) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        seconds_per_step([1.0])


def test_budget_spent_and_schedule_length() -> None:
    b = Budget(0.2, "wall")
    assert not b.spent()
    assert b.schedule_length(0.01, cap=1000) in range(15, 21)
    assert b.schedule_length(0.01, cap=7) == 7
    assert b.schedule_length(10.0, cap=7) == 1
    time.sleep(0.25)
    assert b.spent() and b.elapsed() >= 0.25
    assert Budget(5.0, "wall", used=5.0).spent()  # time spent before a resume counts
    assert not Budget(0.0, "wall").spent()  # no budget


def test_clock_names() -> None:
    assert clock_fn("wall") is time.perf_counter and clock_fn("cpu") is cpu_seconds
    with pytest.raises(ValueError):
        clock_fn("gpu")
    timer = StepTimer("cpu")
    for _ in range(3):
        sum(range(20000))
        timer.tick()
    assert timer.seconds_per_step() > 0


def test_replan_resizes_from_the_loops_rate_at_its_points() -> None:
    b = Budget(100.0, "wall")
    b.elapsed = lambda: now  # type: ignore[method-assign]  # a clock the test moves
    now = 0.0
    r = Replan(b, cap=1000, at=(0.1, 0.5), min_steps=4)
    r.start(0)
    now = 20.0
    assert r.due(3) is None  # too few steps to measure a rate
    now = 5.0
    assert r.due(5) is None  # before the first point
    now = 10.0
    assert r.due(10) == (100, 1.0)  # 1 s/step, 90 s left
    now = 30.0
    assert r.due(20) is None  # between the points
    now = 50.0
    assert r.due(30) == (55, 2.0)  # slower since the last re-plan: 2 s/step, 25 more steps
    now = 90.0
    assert r.due(40) is None  # no points left
    r, now = Replan(b, cap=1000, at=(0.1, 0.5), min_steps=4), 0.0
    r.start(0)
    now = 40.0
    assert r.due(10) == (25, 4.0)  # a slow start: 4 s/step
    now = 50.0
    assert r.due(20) == (70, 1.0)  # the machine got faster: the rate since the last re-plan, not since the start
    r, now = Replan(b, cap=12), 0.0
    r.start(0)
    now = 60.0
    assert r.due(10) == (12, 6.0)  # both points passed at once (6 more steps fit), never over the cap
    r, now = Replan(b, cap=1000), 0.0
    r.start(0)
    now = 99.0
    assert r.due(10) == (11, 9.9)  # nothing fits in the last second: one more step, the budget then stops it
