"""Pace: a run's steps per report and how far each step moves its LR schedule, given a deadline."""
from __future__ import annotations

import time

import pytest

from automl.training.loop import Pace, fit


def _run(pace: Pace, reports: int) -> int:
    """Advance through the reports left; returns the schedule position reached."""
    for _ in range(reports):
        for _ in range(pace.per_report):
            pace.advance()
    return pace.position


def test_a_run_ahead_of_plan_stretches_to_its_cap_and_still_ends_its_schedule_at_the_last_report():
    pace = Pace(10, 4, 0, deadline=time.time() + 1000, max_per_report=30)
    assert _run(pace, 1) == 10
    pace.observe(step_s=1.0, eval_s=0.0, reports_done=1)  # 3 reports left, ~950 s: room for 30 steps a report
    assert pace.per_report == 30 and pace.stretched == 1 and pace.compressed == 0
    assert _run(pace, 3) == 40  # 90 more steps, the schedule's 30 remaining steps spread over them
    # Without a cap (the default) a run never grows; with one, it grows only by what the time allows.
    fixed = Pace(10, 4, 0, deadline=time.time() + 1000)
    fixed.observe(1.0, 0.0, 1)
    assert fixed.per_report == 10 and fixed.stretched == 0
    tight = Pace(10, 4, 0, deadline=time.time() + 63, max_per_report=30)
    tight.observe(1.0, 0.0, 1)  # ~59.8 s for 3 reports: 19 steps each
    assert tight.per_report == 19


def test_a_run_that_may_grow_trains_more_steps_and_ends_its_schedule_where_the_planned_one_does(
        digits_trial_data):
    cfg = {"backbone": "timm/resnet10t:scratch", "image_size": 16, "batch_size": 16, "report_rows": 16 * 4,
           "schedule": "cosine", "warmup_frac": 0.1, "lr": 1e-2}
    planned = fit(cfg, digits_trial_data, epochs=3).history
    grown = fit(cfg, digits_trial_data, epochs=3, deadline=time.time() + 600, max_report_rows=16 * 12).history
    assert [h["steps"] for h in planned] == [4, 8, 12]
    assert [h["steps"] for h in grown] == [4, 16, 28] and grown[-1]["schedule_stretched"] == 1
    assert grown[-1]["lr"] == pytest.approx(planned[-1]["lr"], rel=1e-6, abs=1e-9)  # the schedule's end, both
