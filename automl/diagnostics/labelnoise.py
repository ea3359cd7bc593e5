"""Suspected label errors: rows whose given label the model finds least likely.

Confident learning (Northcutt et al.): out-of-fold probabilities from a
cross-fit of the winning config; a row is suspect when its predicted class
differs from its label and the probability of its label is below that
class's average self-confidence. Ranked by that probability, lowest first.
"""
from __future__ import annotations

import numpy as np
import pandas as pd


def _fold(config: dict, data, x_out, epochs: int, schedule_epochs: int, threads: int) -> np.ndarray:
    import torch

    from automl.data.encoders import predict_logits
    from automl.runtime import set_threads
    from automl.training.loop import encode_inputs, fit

    set_threads(threads)
    res = fit(config, data, epochs=epochs, schedule_epochs=schedule_epochs, device=torch.device("cpu"))
    logits = predict_logits(res.model, res.encoder, encode_inputs(res.encoder, x_out), torch.device("cpu"))
    return torch.softmax(logits, 1).numpy()


def out_of_fold_proba(config: dict, x, y: np.ndarray, num_classes: int, *, epochs: int, schedule_epochs: int,
                      folds: int = 2, seed: int = 0, use_ray: bool = True, return_folds: bool = False):
    """Probabilities for every row from a model that never saw that row (and, optionally, each row's fold)."""
    from sklearn.model_selection import StratifiedKFold

    from automl.data.trial_data import TrialData

    n = len(y)
    proba = np.zeros((n, num_classes), dtype=np.float32)
    counts = np.bincount(y, minlength=num_classes)
    k = int(max(2, min(folds, counts[counts > 0].min())))
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    pick = (lambda idx: x[idx]) if isinstance(x, np.ndarray) else (lambda idx: [x[i] for i in idx])
    jobs = []
    for train_idx, out_idx in splitter.split(np.zeros(n), y):
        data = TrialData("image" if isinstance(x, np.ndarray) else "text", num_classes, pick(train_idx), y[train_idx])
        jobs.append((out_idx, data, pick(out_idx)))
    if use_ray:
        import ray

        remote = ray.remote(num_cpus=1)(_fold)
        refs = [remote.remote(config, d, xo, epochs, schedule_epochs, 1) for _, d, xo in jobs]
        results = ray.get(refs)
    else:
        results = [_fold(config, d, xo, epochs, schedule_epochs, 1) for _, d, xo in jobs]
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


def suspects(proba: np.ndarray, y: np.ndarray, classes: list, row_index: np.ndarray | None = None) -> pd.DataFrame:
    """Rank likely mislabelled rows (confident-learning thresholds)."""
    n, c = proba.shape
    p_given = proba[np.arange(n), y]
    thresholds = np.array([proba[y == k, k].mean() if (y == k).any() else 1.0 for k in range(c)])
    pred = proba.argmax(1)
    flag = (pred != y) & (p_given < thresholds[y])
    order = np.flatnonzero(flag)[np.argsort(p_given[flag])]
    rows = row_index if row_index is not None else np.arange(n)
    return pd.DataFrame({
        "row": rows[order], "given_label": [classes[i] for i in y[order]],
        "predicted_label": [classes[i] for i in pred[order]], "confidence": proba[order, pred[order]],
        "p_given_label": p_given[order],
    })
