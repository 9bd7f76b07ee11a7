"""Guidance-scale schedules: a multiplier in [0, 1] as a function of where the sampler is in its run.

A schedule sees a :class:`Step`: the fraction of the run done (0 at the first step, 1 at the last) and the
noise level sigma. Where it returns 0, the guidance branch is not computed at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    """Where a model call sits in a sampling run."""

    fraction: float | None = None  # 0 at the first step, 1 at the last
    sigma: float | None = None  # noise level, sqrt((1 - alpha_bar) / alpha_bar) for VP models
    index: int | None = None  # 0-based step number


@dataclass(frozen=True)
class Schedule:
    """``constant``, ``interval`` (on in [start, end]), ``linear`` or ``cosine`` decay from 1 to 0.

    ``unit`` says whether ``start``/``end`` are fractions of the run (``fraction``) or noise levels (``sigma``;
    then ``start`` is the high sigma where guidance begins and ``end`` the low one where it ends).
    """

    kind: str = "constant"
    start: float = 0.0
    end: float = 1.0
    unit: str = "fraction"

    def __post_init__(self) -> None:
        if self.kind not in ("constant", "interval", "linear", "cosine"):
            raise ValueError(f"unknown schedule {self.kind!r}: use constant, interval, linear or cosine")
        if self.unit not in ("fraction", "sigma"):
            raise ValueError(f"unknown schedule unit {self.unit!r}: use 'fraction' or 'sigma'")
        if not (math.isfinite(self.start) and math.isfinite(self.end)):
            raise ValueError("schedule bounds must be finite")
        if self.unit == "sigma" and not self.start >= self.end > 0:
            raise ValueError(
                f"a schedule in sigma runs from a high sigma to a low one, both positive: got start={self.start}, "
                f"end={self.end} (e.g. interval-sigma:10:0.5)"
            )
        if self.unit == "fraction" and self.start > self.end:
            raise ValueError(f"schedule start {self.start} is after its end {self.end} (fractions run from 0 to 1)")

    @property
    def needs_position(self) -> bool:
        return self.kind != "constant"

    def _progress(self, step: Step) -> float:
        """Progress through [start, end] in [0, 1] (may fall outside when the step is outside)."""
        if self.unit == "fraction":
            if step.fraction is None:
                raise ValueError(
                    "this schedule needs the fraction of the run: pass the scheduler (scheduler=...) or use a pipeline"
                )
            pos, a, b = step.fraction, self.start, self.end
        else:
            if step.sigma is None:
                raise ValueError("this schedule needs sigma: pass the scheduler (scheduler=...) or use a pipeline")
            # sigma decreases over the run: work in -log sigma so progress increases
            pos = -math.log(step.sigma) if step.sigma > 0 else math.inf
            a, b = -math.log(self.start), -math.log(self.end)
        if b == a:
            return 0.0 if pos == a else (-1.0 if pos < a else 2.0)
        return (pos - a) / (b - a)

    def __call__(self, step: Step) -> float:
        if self.kind == "constant":
            return 1.0
        p = self._progress(step)
        eps = 1e-9
        if p < -eps or p > 1 + eps:
            return 0.0
        p = min(max(p, 0.0), 1.0)
        if self.kind == "interval":
            return 1.0
        if self.kind == "linear":
            return 1.0 - p
        return 0.5 * (1.0 + math.cos(math.pi * p))


CONSTANT = Schedule()


def parse_schedule(spec: str | Schedule | None) -> Schedule:
    """Parse ``constant``, ``interval:0:0.5``, ``interval-sigma:10:0.5``, ``linear``, ``cosine:0:0.8``."""
    if spec is None:
        return CONSTANT
    if isinstance(spec, Schedule):
        return spec
    name, *args = spec.split(":")
    unit = "fraction"
    if name.endswith("-sigma"):
        name, unit = name[: -len("-sigma")], "sigma"
    try:
        bounds = [float(a) for a in args]
    except ValueError as e:
        raise ValueError(f"bad schedule {spec!r}: bounds must be numbers, e.g. interval:0:0.5") from e
    if len(bounds) not in (0, 2):
        raise ValueError(f"bad schedule {spec!r}: give both bounds (start:end) or none")
    if unit == "sigma" and not bounds:
        raise ValueError(f"schedule {spec!r} in sigma needs bounds, e.g. interval-sigma:10:0.5")
    start, end = bounds if bounds else (0.0, 1.0)
    return Schedule(name, start, end, unit)
