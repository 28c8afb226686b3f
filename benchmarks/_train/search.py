"""The largest value (sequence length, pairs a step) whose step fits, found by real steps: doubling, then bisection.

``largest_fitting(measure, start, ...)`` asks ``measure(value) -> Point`` (one real step at that
value, in its own process) and never extrapolates: its answer is a value that was measured to fit,
with the smallest value measured not to fit beside it.

1. Doubling: ``start``, ``2 start``, ``4 start``, ... until a step does not fit (or ``limit``); if
   ``start`` itself does not fit, halving instead, down to ``granularity``, until one does.
2. Bisection of the bracket (largest fit ``lo``, smallest miss ``hi``) until ``hi - lo`` is at most
   ``max(granularity, tolerance * lo)``. Each split is placed on the measured peaks: where the line
   through the two largest measured fits crosses the budget (a miss stopped at the budget has no
   full peak to interpolate to), moved by half the tolerance towards the side not yet bracketed
   closely (above it after a fit, below after a miss), and kept an eighth of the bracket away from
   its ends (so that a bad guess still shrinks it); the plain midpoint where there is no budget (a
   GPU searched until out of memory) or fewer than two fits. With memory linear in the value this
   closes the bracket in two or three steps where halving would take five.

A point fits when its step ran (``ok``) and its peak is within the budget (None: no budget, only
running out of memory misses).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Point:
    """One measured step: its value, ``status`` (``ok``, ``over_budget``, ``out_of_memory``, or a failure),
    and its peak bytes (None when it did not finish; ``over_budget`` points may have a lower bound)."""

    value: int
    status: str
    peak_bytes: int | None

    def fits(self, budget: int | None) -> bool:
        return self.status == "ok" and (budget is None or (self.peak_bytes or 0) <= budget)

    @property
    def conclusive(self) -> bool:
        """Did not fit for want of memory (a failure of another kind is neither a fit nor a miss)."""
        return self.status in ("ok", "over_budget", "out_of_memory")


def _split(lo: Point, hi: Point, fits: list[Point], budget: int | None, last_fit: bool, granularity: int,
           tolerance: float) -> int:  # fmt: skip
    """The next value to measure, strictly inside (lo, hi) (see the module's docstring)."""
    guess = (lo.value + hi.value) / 2
    measured = sorted((p for p in fits if p.peak_bytes is not None), key=lambda p: p.value)[-2:]
    if budget is not None and len(measured) == 2 and measured[1].peak_bytes > measured[0].peak_bytes:
        (a, b) = measured
        slope = (b.peak_bytes - a.peak_bytes) / (b.value - a.value)
        guess = b.value + (budget - b.peak_bytes) / slope
        guess += (0.5 if last_fit else -0.5) * tolerance * lo.value
    margin = max(granularity, (hi.value - lo.value) // 8)
    value = round(min(max(guess, lo.value + margin), hi.value - margin) / granularity) * granularity
    return int(min(max(value, lo.value + granularity), hi.value - granularity))


def largest_fitting(measure: Callable[[int], Point], start: int, budget: int | None, granularity: int = 1,
                    tolerance: float = 0.0, limit: int | None = None, deadline: float | None = None,
                    known: Callable[[int], bool] = lambda value: False) -> dict:  # fmt: skip
    """Search as the module's docstring says; returns ``fits`` (the largest value that fit, or None),
    ``fails`` (the smallest that did not, or None), ``complete`` (False when the deadline, ``limit`` or a
    failed step cut it short, with ``stopped`` saying which) and ``points`` (every point measured, in order).
    Past the deadline a value whose point is ``known`` (measured before: no step to run) is still taken."""
    points: list[Point] = []

    def step(value: int) -> Point | None:
        if deadline is not None and time.time() > deadline and not known(value):
            return None
        point = measure(value)
        points.append(point)
        return point

    def outcome(stopped: str | None) -> dict:
        fitting = [p.value for p in points if p.fits(budget)]
        missing = [p.value for p in points if p.conclusive and not p.fits(budget)]
        return {"fits": max(fitting, default=None), "fails": min(missing, default=None), "complete": stopped is None,
                "stopped": stopped, "points": [vars(p) for p in points]}  # fmt: skip

    value, lo, hi = start, None, None
    while lo is None or hi is None:
        if limit is not None and value > limit:
            return outcome(f"no miss up to the limit of {limit}")
        point = step(value)
        if point is None:
            return outcome("deadline")
        if not point.conclusive:
            return outcome(f"the step at {value} failed: {point.status}")
        if point.fits(budget):
            lo, value = point, value * 2
        else:
            hi, value = point, value // 2
            if lo is None and value < granularity:
                return outcome(None)  # not even the smallest value fits
    last_fit = False
    while hi.value - lo.value > max(granularity, tolerance * lo.value):
        fits = [p for p in points if p.fits(budget)]
        point = step(_split(lo, hi, fits, budget, last_fit, granularity, tolerance))
        if point is None:
            return outcome("deadline")
        if not point.conclusive:
            return outcome(f"the step at {point.value} failed: {point.status}")
        last_fit = point.fits(budget)
        lo, hi = (point, hi) if last_fit else (lo, point)
    return outcome(None)
