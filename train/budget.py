"""A training time budget: the clocks it can be counted on and the sizing of the schedule to fit it.

:class:`densekit.train.trainer.Trainer` uses this when ``budget_s > 0`` (config keys ``budget_s`` and
``clock``): it times :data:`CALIBRATION_STEPS` steps, sets the schedule length with
:meth:`Budget.schedule_length` so that the warm-up + cosine schedule ends when the budget does, and stops
after the first step that finds :meth:`Budget.spent`.

Clocks:

* ``wall``: ``time.perf_counter()``.
* ``cpu``: CPU seconds of this process (all its threads, ``time.process_time()``) plus those of its child
  processes. DataLoader workers are child processes: finished ones are counted through ``os.times()``
  (children's user + system time once they have been waited for), live ones by reading
  ``/proc/<pid>/stat`` of :func:`multiprocessing.active_children`. Where ``/proc`` does not exist (not
  Linux) live workers' CPU is not counted until they exit, so a CPU budget there should use
  ``data.num_workers=0``. The CPU clock is the fair one on a shared machine: other processes' load does
  not eat into the budget; with N busy threads it runs N times faster than the wall clock, and intra-op
  threads that spin while they wait for work count too (give torch no more threads than the cores you own).
"""

from __future__ import annotations

import math
import multiprocessing
import os
import time
from typing import Callable

CLOCKS = ("wall", "cpu")

#: steps timed before the schedule length is set; the first carries start-up costs (worker start, first
#: batches) and is left out of the estimate
CALIBRATION_STEPS = 4

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _live_child_cpu(pid: int) -> float:
    """utime + stime of a live process from ``/proc/<pid>/stat`` (0 when unreadable)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            text = fh.read()
    except OSError:
        return 0.0
    fields = text.rsplit(")", 1)[-1].split()  # after "pid (comm)": fields[11], [12] are utime, stime
    try:
        return (int(fields[11]) + int(fields[12])) / _TICKS
    except (IndexError, ValueError):
        return 0.0


def children_cpu_seconds() -> float:
    """CPU seconds of this process's children: finished (waited for) ones and, on Linux, live ones."""
    t = os.times()
    live = sum(_live_child_cpu(p.pid) for p in multiprocessing.active_children() if p.pid is not None)
    return t.children_user + t.children_system + live


def cpu_seconds() -> float:
    """CPU seconds of this process and its children (finished and, on Linux, live); see the module docstring."""
    return time.process_time() + children_cpu_seconds()


def clock_fn(clock: str) -> Callable[[], float]:
    """The time source of a clock name (``wall`` or ``cpu``)."""
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {', '.join(CLOCKS)}, got {clock!r}")
    return time.perf_counter if clock == "wall" else cpu_seconds


class Budget:
    """Seconds spent on one clock since construction, plus ``used`` from earlier runs (resume).

    Args:
        seconds: the budget; 0 means none (:meth:`spent` is then never true), the clock still runs.
        clock: ``wall`` or ``cpu``.
        used: seconds already spent by the run being resumed.
    """

    def __init__(self, seconds: float, clock: str = "wall", used: float = 0.0) -> None:
        self.seconds, self.clock, self.used = float(seconds), clock, float(used)
        self._now = clock_fn(clock)
        self._t0 = self._now()

    def elapsed(self) -> float:
        """Seconds on this clock, this run and the earlier ones."""
        return self.used + self._now() - self._t0

    def spent(self) -> bool:
        return self.seconds > 0 and self.elapsed() >= self.seconds

    def schedule_length(self, seconds_per_step: float, cap: int) -> int:
        """Steps that fit in what is left of the budget at ``seconds_per_step``, at least 1, at most ``cap``."""
        left = self.seconds - self.elapsed()
        fit = math.floor(left / max(seconds_per_step, 1e-9))
        return int(min(cap, max(1, fit)))


def seconds_per_step(times: list[float]) -> float:
    """Median step interval of clock readings ``[before step 1, after step 1, after step 2, ...]``, the first
    interval left out when there are others (it carries the start-up costs)."""
    intervals = sorted(b - a for a, b in zip(times, times[1:]))
    if len(intervals) > 1:
        intervals = sorted(b - a for a, b in zip(times[1:], times[2:]))
    if not intervals:
        raise ValueError("need at least two clock readings")
    n = len(intervals)
    mid = intervals[n // 2] if n % 2 else (intervals[n // 2 - 1] + intervals[n // 2]) / 2
    return max(mid, 1e-6)


class Replan:
    """Re-sizes a budget run's schedule from the training loop's own rate, once at each of ``at`` (fractions of
    the budget).

    The calibration times a few steps at the start of a fresh process (one-off allocations, a machine whose load
    changes later); measured here on 2 shared cores it was off by up to 7x. The loop's own rate (data loading,
    logging and evaluation hooks included) corrects that: at 10 %, 50 % and 80 % of the budget the schedule
    becomes ``step + (budget left) / rate`` steps, so the cosine ends with the budget instead of well before it
    (budget unused) or after it (the learning rate still high when the budget stops the run). The rate is the
    one since the previous re-plan (since the loop began, for the first): on a machine whose load falls, the
    rate since the start overstated the steps' cost and a 3-minute demo run ended its schedule at 82 % of
    the budget.

    Args:
        budget: the run's :class:`Budget`. cap: the largest schedule (``max_steps`` of the config).
        at: fractions of the budget at which to re-plan. min_steps: steps the loop must have run first.
    """

    def __init__(self, budget: Budget, cap: int, at: tuple[float, ...] = (0.1, 0.5, 0.8), min_steps: int = 4) -> None:
        self.budget, self.cap, self.min_steps = budget, int(cap), int(min_steps)
        self.points = sorted(at)
        self._start: tuple[int, float] | None = None

    def start(self, step: int) -> None:
        """The loop begins at ``step`` (now)."""
        self._start = (int(step), self.budget.elapsed())

    def due(self, step: int) -> tuple[int, float] | None:
        """After step ``step``: (new schedule length, seconds per step) when a re-plan point has been passed."""
        if self._start is None or not self.points or step - self._start[0] < self.min_steps:
            return None
        elapsed = self.budget.elapsed()
        if elapsed < self.points[0] * self.budget.seconds:
            return None
        while self.points and elapsed >= self.points[0] * self.budget.seconds:
            self.points.pop(0)
        rate = (elapsed - self._start[1]) / (step - self._start[0])
        self._start = (int(step), elapsed)  # the next re-plan measures from here
        left = math.floor((self.budget.seconds - elapsed) / max(rate, 1e-9))
        return int(min(self.cap, step + max(1, left))), rate


class StepTimer:
    """Seconds per step on a clock, from a few timed steps (:meth:`tick` after each).

    The main process's steps are timed one by one (:func:`seconds_per_step`: median, the first left out). On the
    ``cpu`` clock the children's CPU (DataLoader workers) is added as its total over the timed steps divided by
    their number: workers run ahead of the steps, so per-step readings would miss it. Read
    :meth:`seconds_per_step` after the workers have exited.
    """

    def __init__(self, clock: str) -> None:
        clock_fn(clock)  # checks the name
        self.clock = clock
        self._now = time.perf_counter if clock == "wall" else time.process_time
        self._children0 = children_cpu_seconds() if clock == "cpu" else 0.0
        self.times = [self._now()]

    def tick(self) -> None:
        self.times.append(self._now())

    def seconds_per_step(self) -> float:
        est = seconds_per_step(self.times)
        if self.clock == "cpu":
            est += (children_cpu_seconds() - self._children0) / max(1, len(self.times) - 1)
        return est
