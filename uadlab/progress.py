"""One progress type for every long job: feature extraction, fitting, scoring, evaluating.

Producers (a backbone's extraction loop, a method's training loop, a coreset) report plain counts::

    progress(Progress(done=step, total=steps, unit="steps", loss=loss))

The job that runs them (``Run.fit``, the app's training) splits itself into ``Stages``: each stage
names the counts, places them in the whole job (``overall``) and adds an ETA. Consumers (the CLI's
progress bar, the app's progress bar) only read ``Progress.overall`` and ``Progress.text``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable, Sequence


@dataclass(frozen=True)
class Progress:
    """``done`` of ``total`` units of one stage of a job.

    Attributes:
        done, total: counts of the stage (images, steps, points).
        unit: what is counted ("images", "steps").
        stage: what runs ("extracting features: normal images", "fitting patchcore").
        loss: the training loss at this step, if any.
        overall: fraction of the whole job in [0, 1], when the job knows its stages.
        eta_s: estimated seconds left in this stage, from its measured rate (None until a few units are done).
        stage_end: where the running stage ends in the whole job (``overall`` reaches it when the stage is done):
            a display may move its bar toward it while a step computes without reporting.
    """

    done: int
    total: int
    unit: str = ""
    stage: str = ""
    loss: float | None = None
    overall: float | None = None
    eta_s: float | None = None
    stage_end: float | None = None

    @property
    def fraction(self) -> float:
        return min(max(self.done / self.total, 0.0), 1.0) if self.total > 0 else 0.0

    @property
    def text(self) -> str:
        """e.g. ``fitting patchcore: 120/400 steps, loss 0.0123, about 35 s left``."""
        parts = [f"{self.done}/{self.total} {self.unit}".strip()] if self.total else \
            [f"{self.done} {self.unit}".strip()] if self.done else []  # a count without a known total
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4g}")
        if self.eta_s is not None and self.done < self.total:
            parts.append(f"about {format_seconds(max(self.eta_s, 1.0))} left")
        body = ", ".join(parts)
        return f"{self.stage}: {body}" if self.stage and body else self.stage or body


ProgressFn = Callable[[Progress], None]


def format_seconds(s: float) -> str:
    s = max(int(round(s)), 0)
    return f"{s} s" if s < 90 else f"{s // 60} min {s % 60:02d} s" if s < 3600 else f"{s // 3600} h {s % 3600 // 60:02d} min"


def quiet(_: Progress) -> None:
    """A ProgressFn that reports nothing."""


MIN_UNITS = 3  # units counted since a count's first report before its rate gives an ETA
MIN_SECONDS = 0.5  # and that long: a rate over a few milliseconds says nothing


class Rate:
    """The ETA of one count from its measured rate: from the count's FIRST report on (the time before it, a
    backbone loading or a projection, is not the count's rate), and only once a few units are done.

    A count is (stage, unit, total): when another one starts (the coreset, then the index) it is measured anew.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock, self.key, self.t0, self.done0 = clock, None, 0.0, 0

    def eta(self, p: Progress) -> float | None:
        now, key = self.clock(), (p.stage, p.unit, p.total)
        if key != self.key or p.done < self.done0:
            self.key, self.t0, self.done0 = key, now, p.done
            return None
        units, elapsed = p.done - self.done0, now - self.t0
        if p.total <= 0 or units < MIN_UNITS or elapsed < MIN_SECONDS:
            return None
        return elapsed / units * max(p.total - p.done, 0)


class Stages:
    """Split a job into weighted stages; every event of a stage is re-emitted with its stage name, its place
    in the whole job (``overall``) and an ETA from the measured rate of its current count (``Rate``).

    Args:
        report: where events go (None: nowhere).
        weights: relative cost of each stage, in the order they run.
    """

    def __init__(self, report: ProgressFn | None, weights: Sequence[float]) -> None:
        total = float(sum(weights)) or 1.0
        self.report = report or quiet
        self.bounds, acc = [], 0.0
        for w in weights:
            self.bounds.append((acc / total, (acc + w) / total))
            acc += w
        self.index, self.overall = 0, 0.0

    def stage(self, name: str, unit: str = "") -> ProgressFn:
        """The callback for the next stage (announced at once with 0 done).

        An event carrying its own ``overall`` (a nested job: an evaluation's extraction, then scoring) moves
        the bar by that share, else by its counts; the ETA comes from the measured rate of the current count.
        """
        a, b = self.bounds[min(self.index, len(self.bounds) - 1)]
        self.index += 1
        rate = Rate()

        def emit(p: Progress) -> None:
            frac = p.fraction if p.overall is None else min(max(p.overall, 0.0), 1.0)
            # a stage may count several things in turn (a coreset, then an index): the bar never goes back
            self.overall = max(self.overall, a + (b - a) * frac)
            end = b if p.stage_end is None else a + (b - a) * p.stage_end  # a nested job's stage, placed in ours
            self.report(replace(p, stage=f"{name}: {p.stage}" if p.stage else name, unit=p.unit or unit,
                                overall=self.overall, eta_s=rate.eta(p), stage_end=max(end, self.overall)))

        self.overall = max(self.overall, a)
        self.report(Progress(0, 0, unit, name, overall=self.overall, stage_end=b))
        return emit

    def finish(self, name: str = "done") -> None:
        self.report(Progress(1, 1, "", name, overall=self.bounds[-1][1] if self.bounds else 1.0))


def within(report: ProgressFn | None, lo: float, hi: float) -> ProgressFn:
    """Map a job's ``overall`` into [lo, hi] of an outer job (a fit inside the app's training)."""
    out = report or quiet
    inner = lambda v: None if v is None else lo + (hi - lo) * v  # noqa: E731
    return lambda p: out(replace(p, overall=inner(p.overall), stage_end=inner(p.stage_end)))
