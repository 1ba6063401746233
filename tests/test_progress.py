"""Progress: ETAs from the measured rate (none before a few units), nested jobs move the outer bar."""
from __future__ import annotations

import pytest

from uadlab.progress import MIN_UNITS, Progress, Rate, Stages, within


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_eta_from_the_rate_after_the_first_report():
    clock = Clock()
    rate = Rate(clock)
    clock.t = 30.0  # a slow start (a projection, a backbone loading) is not the count's rate
    assert rate.eta(Progress(1, 10_000, "points")) is None
    clock.t = 31.0
    assert rate.eta(Progress(1 + MIN_UNITS - 1, 10_000, "points")) is None  # too few units yet
    clock.t = 32.0
    eta = rate.eta(Progress(2001, 10_000, "points"))  # 2000 points in 2 s: 1000 / s
    assert eta == pytest.approx(7.999, rel=1e-3)
    # another count (the index after the coreset) is measured anew
    assert rate.eta(Progress(1, 50, "vectors")) is None


def test_nested_job_moves_the_outer_bar_through_its_stages():
    events: list[Progress] = []
    outer = Stages(within(events.append, 0.85, 0.99), [1]).stage("evaluating")
    inner = Stages(outer, [1, 1])  # an evaluation: extraction, then scoring
    ex = inner.stage("extracting features")
    ex(Progress(10, 10, "images"))
    sc = inner.stage("scoring")
    seen = []
    for i in range(1, 6):
        sc(Progress(i, 5, "images"))
        seen.append(events[-1].overall)
    assert all(b > a for a, b in zip(seen, seen[1:])), seen  # the bar moves during scoring
    assert seen[0] < 0.97 and seen[-1] == pytest.approx(0.99)
    assert events[-1].stage == "evaluating: scoring" and "5/5 images" in events[-1].text


def test_live_status_moves_between_events_but_never_past_the_stage():
    from uadlab.ui.common import LiveStatus

    clock = Clock()
    events: list[Progress] = []
    stages = Stages(events.append, [1, 1])
    stages.stage("extracting")(Progress(4, 4, "images"))
    live = LiveStatus("starting", clock=clock)
    assert live.shown() == 0.0 and "starting" in live.html()
    stages.stage("fitting")  # a stage that reports nothing for a while
    live(events[-1])
    assert events[-1].stage_end == 1.0 and events[-1].overall == 0.5
    seen = []
    for t in (0.0, 1.0, 5.0, 30.0, 3600.0):
        clock.t = t
        seen.append(live.shown())
    assert seen[0] == 0.5 and all(b > a for a, b in zip(seen, seen[1:])) and seen[-1] < 1.0, seen
    html = live.html()
    assert "50%" in html and "fitting" in html and "1 h 00 min so far" in html
