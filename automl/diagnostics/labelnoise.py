"""Suspected label errors: confident learning on out-of-fold probabilities.

Confident learning (Northcutt et al., JAIR 2021): each class j has a threshold t_j, the average probability the
model gives class j on rows labelled j (its self-confidence). A row labelled y is flagged only when another class
j is *confidently* predicted (p_j >= t_j, the largest such) and its own label is not (p_y < t_y), and the model
prefers j by a wide margin (p_j - p_y >= MIN_MARGIN); flagged rows are ranked by that margin. The margin bar matters
when the model is weak and its thresholds low: confident learning alone then flags rows the model merely leans
away from (Tux Paint stamps, 69% out-of-fold accuracy, 5% planted flips: precision 0.18 without the bar, 0.41 with
it, recall 0.77 -> 0.71; digits unchanged). Where classes overlap and the model is confidently wrong (fortunes),
no bar helps: the card then says the list is mostly rows the model confuses. The probabilities are out of fold
(rung 0's frozen-feature heads, or a cross-fit of the winning config): every row is scored by a model that never saw
it. The expected precision reported is the mean, over flagged rows, of the probability that the given label is
wrong (1 - p_y), which holds only when those probabilities are calibrated.

Weak out-of-fold models rank badly (fortunes: heads on frozen MiniLM features, 55% accurate, find planted flips at
precision 0.25-0.37), so where a fine-tune kept its margins (`training/margins.py`: the area under the margin over
its training) they pick *which* rows, beside the out-of-fold margin; confident learning still says *how many*.
"""
from __future__ import annotations

import math
import time

import numpy as np
import pandas as pd

MIN_MARGIN = 0.5  # the suspected class at least this much more probable than the given label
NOISY_SHARE = 0.10  # flagged share above which the list is more model confusion than label noise


def _fold(config: dict, data, x_out, epochs: int, schedule_epochs: int, threads: int,
          plugins: dict | None = None, deadline: float | None = None) -> np.ndarray:
    import torch

    from automl.data.encoders import predict_logits
    from automl.plugins import install
    from automl.runtime import device, set_threads
    from automl.training.loop import encode_inputs, fit

    set_threads(threads)
    install(plugins)
    # On the device Ray gave this task; paced to end by the deadline when there is one.
    res = fit(config, data, epochs=epochs, schedule_epochs=schedule_epochs, deadline=deadline)
    logits = predict_logits(res.model, res.encoder, encode_inputs(res.encoder, x_out), device())
    return torch.softmax(logits, 1).numpy()


def fold_deadlines(deadline: float | None, folds: int, slots: int) -> list[float | None]:
    """Each fold's deadline when `folds` folds run `slots` at a time and all must end by `deadline`: the time left
    is split evenly between the rounds, so a fold of a later round does not start with the deadline already past
    (a past deadline is ignored as stale, and the fold would then run its whole length)."""
    if deadline is None:
        return [None] * folds
    at_once = max(1, min(slots, folds))
    now = time.time()
    per_round = max(0.0, deadline - now) / math.ceil(folds / at_once)
    return [now + per_round * (i // at_once + 1) for i in range(folds)]


def out_of_fold_proba(config: dict, x, y: np.ndarray, num_classes: int, *, modality: str, epochs: int,
                      schedule_epochs: int, folds: int = 2, seed: int = 0, use_ray: bool = True,
                      return_folds: bool = False, gpus: float = 0.0, deadline: float | None = None,
                      threads: int = 1):
    """Probabilities for every row from a model that never saw that row (and, optionally, each row's fold).
    use_ray: each fold in a Ray task (else one after another in this process, with `threads` torch threads;
    this process's thread count is restored after). gpus: what each fold's Ray task holds (a trial's share, where
    trials train on GPUs). deadline: a time.time() every fold paces its schedule to end by (training.loop.Pace)."""
    from sklearn.model_selection import StratifiedKFold

    from automl.data.trial_data import TrialData, subset

    n = len(y)
    proba = np.zeros((n, num_classes), dtype=np.float32)
    counts = np.bincount(y, minlength=num_classes)
    k = int(max(2, min(folds, counts[counts > 0].min())))
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    jobs = []
    for train_idx, out_idx in splitter.split(np.zeros(n), y):
        data = TrialData(modality, num_classes, subset(x, train_idx), y[train_idx])
        jobs.append((out_idx, data, subset(x, out_idx)))
    if use_ray:
        import ray

        from automl.plugins import snapshot

        free = ray.available_resources()
        slots = int(free.get("GPU", 0) / gpus) if gpus else int(free.get("CPU", 1))
        ends = fold_deadlines(deadline, len(jobs), slots)
        remote, plugins = ray.remote(num_cpus=1, num_gpus=gpus)(_fold), ray.put(snapshot())
        refs = [remote.remote(config, d, xo, epochs, schedule_epochs, 1, plugins, end)
                for (_, d, xo), end in zip(jobs, ends)]
        results = ray.get(refs)
    else:
        from automl.runtime import threads_kept

        ends = fold_deadlines(deadline, len(jobs), 1)
        with threads_kept():
            results = [_fold(config, d, xo, epochs, schedule_epochs, threads, None, end)
                       for (_, d, xo), end in zip(jobs, ends)]
    fold_of = np.zeros(n, dtype=np.int64)
    for f, ((out_idx, _, _), p) in enumerate(zip(jobs, results)):
        proba[out_idx] = p
        fold_of[out_idx] = f
    return (proba, fold_of) if return_folds else proba


def cv_summary(proba: np.ndarray, y: np.ndarray, fold_of: np.ndarray, num_classes: int) -> dict:
    """Mean ± std over folds of the held-out metrics."""
    from automl.metrics import classification_metrics

    per_fold = [classification_metrics(y[fold_of == f], proba[fold_of == f], num_classes)
                for f in np.unique(fold_of)]
    keys = ("accuracy", "f1_macro", "balanced_accuracy")
    return {"folds": len(per_fold), "per_fold": per_fold,
            "metrics": {k: {"mean": float(np.mean([m[k] for m in per_fold])),
                            "std": float(np.std([m[k] for m in per_fold]))} for k in keys}}


def label_margin(scores: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Each row's score (probability or logit) of its given label minus the largest other."""
    rows = np.arange(len(y))
    rest = np.array(scores, dtype=float)
    given = rest[rows, y].copy()
    rest[rows, y] = -np.inf
    return given - rest.max(1)


def against_label(margin: np.ndarray) -> np.ndarray:
    """How strongly a model is against each row's label, as the share in (0, 1) of the rows of `margin` whose
    margin (given label over the best other, any scale) is at least that row's: near 1 for the lowest. NaN stays
    NaN (no view of that row). Shares, not margins, so views on different scales can be put side by side."""
    from scipy.stats import rankdata

    margin = np.asarray(margin, dtype=float)
    out = np.full(len(margin), np.nan)
    seen = np.isfinite(margin)
    if seen.any():
        out[seen] = 1.0 - (rankdata(margin[seen]) - 0.5) / seen.sum()
    return out


def suspects(proba: np.ndarray, y: np.ndarray, classes: list, row_index: np.ndarray | None = None,
             min_margin: float = MIN_MARGIN, fine: np.ndarray | None = None) -> pd.DataFrame:
    """Rows whose label confident learning finds likely wrong, most likely first (see the module docstring).

    fine: a fine-tuned model's view of each row (`against_label` of its margins; NaN where it has none). Confident
    learning on `proba` still says how many rows are flagged; which rows, and their order, is then the mean of
    that view and the out-of-fold margin's (`against_label` of p_given - the best other), so a fine-tune that
    separates the classes better than the out-of-fold heads picks the rows (module docstring, RESULTS)."""
    n, c = proba.shape
    thresholds = np.array([proba[y == k, k].mean() if (y == k).any() else 1.0 for k in range(c)])
    p_given = proba[np.arange(n), y]
    confident = proba >= thresholds[None, :]
    confident[np.arange(n), y] = False                 # another class than the given one
    other = np.where(confident, proba, -1.0).argmax(1)
    margin = proba[np.arange(n), other] - p_given
    flag = confident.any(1) & (p_given < thresholds[y]) & (margin >= min_margin)
    order = np.flatnonzero(flag)[np.argsort(-margin[flag], kind="stable")]
    if fine is not None and np.isfinite(fine).any():
        rest = proba.copy()
        rest[np.arange(n), y] = -1.0
        best_other = rest.argmax(1)
        other = np.where(flag, other, best_other)      # rows only the fine-tune points at: the likeliest other
        margin = proba[np.arange(n), other] - p_given
        oof_view = against_label(p_given - proba[np.arange(n), best_other])
        both = np.where(np.isfinite(fine), (oof_view + np.nan_to_num(fine)) / 2, oof_view)
        order = np.argsort(-both, kind="stable")[:len(order)]
    rows = row_index if row_index is not None else np.arange(n)
    return pd.DataFrame({
        "row": rows[order], "given_label": [classes[i] for i in y[order]],
        "suspected_label": [classes[i] for i in other[order]], "p_suspected": proba[order, other[order]],
        "p_given_label": p_given[order], "margin": margin[order],
    })


def summary(found: pd.DataFrame, n_rows: int, folds: int = 2) -> dict:
    """Count, share of the rows and expected precision of the flagged list."""
    return {"count": int(len(found)), "share": float(len(found) / max(1, n_rows)),
            "expected_precision": float((1.0 - found["p_given_label"]).mean()) if len(found) else None,
            "method": f"confident learning (per-class thresholds, margin >= {MIN_MARGIN}) on {folds}-fold "
                      "out-of-fold probabilities"}
