"""Suspected label errors: confident learning finds planted flips and leaves clean rows alone."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from automl.data.images import stack_resized
from automl.data.intake import prepare
from automl.diagnostics.labelnoise import out_of_fold_proba, summary, suspects


def test_planted_label_flips_are_found(digits_df):
    df = digits_df.copy()
    rng = np.random.default_rng(0)
    flipped = rng.choice(len(df), 12, replace=False)  # 5% of 240 rows
    df.loc[flipped, "label"] = (df.loc[flipped, "label"] + 1) % 4
    t = prepare(df)
    X = stack_resized(t.images, 16)
    cfg = {"backbone": "timm/resnet10t:scratch", "image_size": 16, "lr": 3e-3, "batch_size": 16, "schedule": "cosine"}
    import torch

    torch.set_num_threads(2)
    proba = out_of_fold_proba(cfg, X, t.y, t.num_classes, modality=t.modality, epochs=5, schedule_epochs=5, folds=2,
                              use_ray=False, threads=1)
    # In-process folds (the product's choice on one CPU node) leave the caller's threads as they were.
    assert torch.get_num_threads() == 2
    found = suspects(proba, t.y, t.classes, t.row_index)
    assert {"row", "given_label", "suspected_label", "p_given_label", "margin"} <= set(found.columns)
    hits = len(set(found["row"]) & set(flipped))
    precision, recall = hits / max(1, len(found)), hits / len(flipped)
    assert precision >= 0.6 and recall >= 0.5, (precision, recall, found)
    assert found["margin"].is_monotonic_decreasing  # most likely errors first
    # Reported given labels are the (wrong) ones in the table, by original row index; for a planted flip the
    # suspected label is the truth.
    assert (found["given_label"].to_numpy() == df.loc[found["row"], "label"].to_numpy()).all()
    planted = found[found["row"].isin(flipped)]
    assert len(planted) == hits and hits > 0
    assert (planted["suspected_label"].to_numpy() == digits_df.loc[planted["row"], "label"].to_numpy()).all(), planted
    s = summary(found, len(df))
    assert s["count"] == len(found) and "on 2-fold out-of-fold" in s["method"]
    assert "on 3-fold out-of-fold" in summary(found, len(df), folds=3)["method"]  # says the folds it was given
    # The precision the card promises is the one measured on the planted flips, within what 12 rows can tell.
    assert abs(s["expected_precision"] - precision) <= 0.25, (s, precision)


def test_only_rows_whose_label_is_not_confidently_predicted_are_flagged():
    """A row is flagged when another class is confidently predicted *and* its own label is not."""
    y = np.array([0, 0, 0, 1, 1, 1])
    proba = np.array([[0.9, 0.1], [0.8, 0.2], [0.2, 0.8],    # row 2: labelled 0, confidently 1 -> flagged
                      [0.1, 0.9], [0.3, 0.7], [0.55, 0.45]])  # row 5: p(1)=0.45 < t_1, p(0)=0.55 < t_0=0.63 -> not
    found = suspects(proba, y, ["a", "b"])
    assert found["row"].tolist() == [2] and found["suspected_label"].tolist() == ["b"]
    assert found["margin"].iloc[0] == 0.8 - 0.2
    # The precision the card states: the mean probability, over flagged rows, that the given label is wrong.
    assert summary(found, len(y))["expected_precision"] == pytest.approx(1 - 0.2)
    assert isinstance(found, pd.DataFrame)


def test_a_confidently_predicted_other_class_is_flagged_only_by_a_wide_margin():
    """A weak model's thresholds are low: a row it merely leans away from is not called an error."""
    y = np.array([0, 0, 0, 0, 1, 1, 1])
    proba = np.array([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9], [0.35, 0.65],  # t_0 = 0.5375
                      [0.3, 0.7], [0.4, 0.6], [0.45, 0.55]])             # t_1 = 0.6167
    assert suspects(proba, y, ["a", "b"], min_margin=-1.0)["row"].tolist() == [2, 3]  # confident learning alone
    assert suspects(proba, y, ["a", "b"])["row"].tolist() == [2]         # row 3: margin 0.3 < 0.5


def test_a_fine_tunes_view_picks_which_rows_and_confident_learning_how_many():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    proba = np.array([[0.9, 0.1], [0.1, 0.9], [0.8, 0.2], [0.7, 0.3],   # row 1 flagged by confident learning
                      [0.2, 0.8], [0.3, 0.7], [0.6, 0.4], [0.25, 0.75]])
    assert suspects(proba, y, ["a", "b"])["row"].tolist() == [1]
    # A fine-tune strongly against row 3's label and for row 1's: one row flagged still, now row 3 (out-of-fold
    # shares against the label: row 1 15/16, row 6 13/16, row 3 10/16; with the fine-tune's: 0.52, 0.51, 0.81).
    fine = np.full(8, np.nan)
    fine[[1, 3, 6]] = [0.1, 0.99, 0.2]
    found = suspects(proba, y, ["a", "b"], fine=fine)
    assert found["row"].tolist() == [3] and found["suspected_label"].tolist() == ["b"]
    assert found["p_given_label"].tolist() == [0.7] and found["margin"].iloc[0] == pytest.approx(0.3 - 0.7)
    # No view (all NaN): confident learning's own rows.
    assert suspects(proba, y, ["a", "b"], fine=np.full(8, np.nan))["row"].tolist() == [1]


def test_views_on_different_scales_become_shares_of_the_rows_against_each_label():
    from automl.diagnostics.labelnoise import against_label

    np.testing.assert_allclose(against_label(np.array([3.0, -1.0, np.nan, 0.5])), [1 / 6, 5 / 6, np.nan, 0.5])


def test_expected_calibration_error_against_a_hand_computed_value():
    from automl.metrics import expected_calibration_error

    proba = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6]])
    y = np.array([0, 1, 1, 1])
    # 5 bins: (0.8, 1] holds 0.9 (right): |1 - 0.9| * 1/4; (0.6, 0.8] holds 0.8 (wrong) and 0.7 (right):
    # |0.5 - 0.75| * 2/4; (0.4, 0.6] holds 0.6 (right): |1 - 0.6| * 1/4.  0.025 + 0.125 + 0.1 = 0.25
    assert expected_calibration_error(y, proba, bins=5) == pytest.approx(0.25)
    assert expected_calibration_error(np.array([0, 0]), np.array([[1.0, 0.0], [1.0, 0.0]])) == 0.0


def test_a_cross_fit_given_a_deadline_paces_every_fold_to_end_by_it(digits_df):
    """A forced cross-fit after the search must not overrun the budget: with a deadline each fold compresses its
    schedule, and folds that run one after another each get their share (a later fold must not start with the
    deadline already past, which training ignores as stale)."""
    import time

    from automl.diagnostics.labelnoise import fold_deadlines

    t = prepare(digits_df)
    X = stack_resized(t.images, 16)
    cfg = {"backbone": "timm/resnet10t:scratch", "image_size": 16, "lr": 3e-3, "batch_size": 16,
           "schedule": "cosine", "report_rows": 16 * 4}
    kw = dict(modality=t.modality, epochs=6, schedule_epochs=6, folds=2, use_ray=False)
    t0 = time.monotonic()
    out_of_fold_proba(cfg, X, t.y, t.num_classes, **kw)
    unpaced = time.monotonic() - t0
    t0 = time.monotonic()
    proba = out_of_fold_proba(cfg, X, t.y, t.num_classes, deadline=time.time() + unpaced / 3, **kw)
    paced = time.monotonic() - t0
    # A third of the time asked for; each fold's first report (a sixth of it) trains before the pace is known.
    assert paced <= 0.6 * unpaced, (paced, unpaced)
    assert proba.shape == (len(t.y), t.num_classes) and np.allclose(proba.sum(1), 1, atol=1e-4)
    now = time.time()
    ends = fold_deadlines(now + 90, 5, 2)  # rounds of 2, 2 and 1 fold(s): 30 s each
    assert np.allclose(np.array(ends) - now, [30, 30, 60, 60, 90], atol=0.5)
    assert fold_deadlines(None, 3, 2) == [None, None, None]


def test_the_fine_tunes_view_comes_from_a_kept_trial_that_validated_above_every_head(digits_df, tmp_path):
    """After the search: the kept margins of the best fine-tune over its training rows and its validation
    probabilities become its view of each row; a fine-tune no better than rung 0's best head gives none."""
    from types import SimpleNamespace

    import torch

    from automl.data.inputs import Inputs
    from automl.diagnostics.labelnoise import against_label
    from automl.search import kept
    from automl.stages import _fine_tune_view
    from automl.training.margins import Margins

    t = prepare(digits_df)
    inputs = Inputs.materialise(t, 16, tmp_path / "inputs")
    tr, va = inputs.split("train"), inputs.split("validation")
    margins = Margins(len(tr))
    margins.sum[:], margins.count[:] = np.arange(len(tr)), 2
    proba = np.random.default_rng(0).dirichlet(np.ones(t.num_classes), len(va))
    best = str(tmp_path / "best")
    kept.keep_final(best, "tune_1", {"w": torch.zeros(1)}, 0.8, 4, val=(proba, t.y[va]))
    kept.keep_margins(best, "tune_1", margins)
    plan, result = SimpleNamespace(val_rows=None), SimpleNamespace(best_dir=best)
    view, tid = _fine_tune_view(inputs, plan, result, SimpleNamespace(models=[SimpleNamespace(val_score=0.75)]))
    assert tid == "tune_1" and view.shape == (len(tr) + len(va),)
    np.testing.assert_allclose(view[:len(tr)], against_label(np.arange(len(tr)) / 2))
    rest = proba.copy()
    rest[np.arange(len(va)), t.y[va]] = -1
    np.testing.assert_allclose(view[len(tr):], against_label(proba[np.arange(len(va)), t.y[va]] - rest.max(1)))
    heads_as_good = SimpleNamespace(models=[SimpleNamespace(val_score=0.8)])
    view, tid = _fine_tune_view(inputs, plan, result, heads_as_good)
    assert view is None and tid == ""
