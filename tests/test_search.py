"""The Ray Tune controller: OptunaSearch proposes, ASHA stops, the trial table tells the story."""
from __future__ import annotations

import pytest

from automl.search.tune import SearchConfig, SearchLimits, SearchStorage, run_search
from automl.search.space import load_space


@pytest.mark.slow  # starts Ray and runs an 8-trial search
def test_search_runs_trials_and_asha_stops_some_early(ray_session, digits_trial_data, tmp_path):
    space = load_space("cpu_small", "image", {"image_size": 16, "max_epochs": 4, "reduction_factor": 2})
    result = run_search(digits_trial_data, space, SearchConfig(
        "accuracy", SearchStorage(str(tmp_path), "s"), SearchLimits(max_trials=8), {"cpu": 1}, concurrency=2,
        progress=False))
    t = result.trials
    assert len(t) == 8
    assert set(t["status"]) <= {"COMPLETED", "STOPPED_EARLY"}  # no time limit: nothing cut
    assert (t["status"] == "STOPPED_EARLY").sum() >= 1, t[["status", "epochs_run"]]  # stopped by ASHA, not the budget
    assert (t["epochs_run"] <= 4).all() and (t["status"] != "ERROR").all()
    assert {"config/backbone", "config/lr", "config/schedule", "best_val_accuracy", "epochs_run"} <= set(t.columns)
    assert t["config/lr"].nunique() == 8  # Optuna proposes distinct configs
    # The winner's score and report are those of the weights its trial kept (written by the trial itself, not read
    # back from the table), and those weights, evaluated here on the validation rows, score exactly that.
    import torch

    from automl.search import kept
    from automl.training.loop import build_encoder, encode_inputs, evaluate, full_config, load_best

    snap = kept.read(result.best_dir, result.best_trial_id)["snapshots"][0]  # its best report (ties: the later)
    assert snap["report"] == result.best_epoch and snap["score"] == pytest.approx(result.best_score)
    assert result.best_score == t["best_val_accuracy"].max()
    d = digits_trial_data
    model, spec = load_best(result.best_config, d.num_classes, kept.best_file(result.best_dir, result.best_trial_id))
    enc = build_encoder(full_config(result.best_config), model, spec)
    val = evaluate(model, enc, encode_inputs(enc, d.x_val), d.y_val, d.num_classes, torch.device("cpu"))
    assert val["accuracy"] == pytest.approx(result.best_score), (val, result.best_score)
    # The trial saved that report's validation probabilities beside its model: the final choice reads them instead
    # of a pass over the validation rows. They are the model's own, and read only for the rows they were scored on.
    from automl.training.combine import _member

    model_file = kept.model_file(result.best_dir, result.best_trial_id)
    m, _ = load_best(result.best_config, d.num_classes, model_file)
    own = evaluate(m, enc, encode_inputs(enc, d.x_val), d.y_val, d.num_classes, torch.device("cpu"),
                   keep_scores=True)["scores"]
    saved = kept.model_val_proba(result.best_dir, result.best_trial_id, d.y_val)
    assert saved is not None and saved.shape == own.shape and abs(saved - own).max() < 1e-4
    assert kept.model_val_proba(result.best_dir, result.best_trial_id, d.y_val[::-1]) is None
    member = _member(result.best_trial_id, result.best_config, result.best_score, result.best_dir, d.num_classes,
                     lambda _: None, d.y_val)  # no inputs: a pass over them would fail
    assert (member.proba == saved).all()
    assert result.best_config["image_size"] == 16
    # The space's start point (a sensible fixed config) is tried, and ASHA never stops it.
    start = t[(t["config/lr"] == 1e-3) & (t["config/backbone"] == "efficientnet-lite0")]
    assert len(start) == 1 and start.iloc[0]["status"] == "COMPLETED" and start.iloc[0]["epochs_run"] == 4
