"""The Ray Tune controller: OptunaSearch proposes, ASHA stops, the trial table tells the story."""
from __future__ import annotations

import pytest

from automl.search.tune import run_search
from automl.search.space import load_space


@pytest.mark.slow  # starts Ray and runs an 8-trial search
def test_search_runs_trials_and_asha_stops_some_early(ray_session, digits_trial_data, tmp_path):
    space = load_space("cpu_small", "image", {"image_size": 16, "max_epochs": 4, "reduction_factor": 2})
    result = run_search(digits_trial_data, space, metric="accuracy", storage_path=str(tmp_path), name="s",
                        time_budget_s=None, max_trials=8, seed=0, resources={"cpu": 1}, concurrency=2,
                        progress=False)
    t = result.trials
    assert len(t) == 8
    assert set(t["status"]) <= {"COMPLETED", "STOPPED_EARLY"}  # no time limit: nothing cut
    assert (t["status"] == "STOPPED_EARLY").sum() >= 1, t[["status", "epochs_run"]]  # stopped by ASHA, not the budget
    assert (t["epochs_run"] <= 4).all() and (t["status"] != "ERROR").all()
    assert {"config/backbone", "config/lr", "config/schedule", "best_val_accuracy", "epochs_run"} <= set(t.columns)
    assert t["config/lr"].nunique() == 8  # Optuna proposes distinct configs
    assert result.best_score == pytest.approx(t["best_val_accuracy"].max())
    best = result.history[result.best_trial_id]  # the report of the winner's peak (of equal scores, the later)
    scores = [r["val_accuracy"] for r in best]
    assert result.best_epoch == max(r["training_iteration"] for r in best if r["val_accuracy"] == max(scores))
    assert result.best_config["image_size"] == 16
    # The space's start point (a sensible fixed config) is tried, and ASHA never stops it.
    start = t[(t["config/lr"] == 1e-3) & (t["config/backbone"] == "efficientnet-lite0")]
    assert len(start) == 1 and start.iloc[0]["status"] == "COMPLETED" and start.iloc[0]["epochs_run"] == 4
