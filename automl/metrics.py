"""Classification metrics from sklearn, plus calibration error."""
from __future__ import annotations

import numpy as np


def classification_metrics(y_true: np.ndarray, proba: np.ndarray, num_classes: int, detailed: bool = False) -> dict:
    from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score, log_loss,
                                 precision_recall_fscore_support)

    y_pred = proba.argmax(1)
    labels = list(range(num_classes))
    # Clipped (log 0) and renormalised in float64: float32 rows sum to 1 only within ~1e-6, which sklearn warns of.
    clipped = np.clip(np.asarray(proba, dtype=np.float64), 1e-7, 1.0)
    clipped /= clipped.sum(1, keepdims=True)
    out = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "f1_macro": float(f1_score(y_true, y_pred, average="macro", labels=labels, zero_division=0)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "log_loss": float(log_loss(y_true, clipped, labels=labels)),
        "ece": expected_calibration_error(y_true, proba),
    }
    if detailed:
        p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
        out["per_class"] = {"precision": p.tolist(), "recall": r.tolist(), "f1": f.tolist(), "support": s.tolist()}
        out["confusion_matrix"] = confusion_matrix(y_true, y_pred, labels=labels).tolist()
    return out


def expected_calibration_error(y_true: np.ndarray, proba: np.ndarray, bins: int = 15) -> float:
    conf = proba.max(1)
    correct = (proba.argmax(1) == y_true).astype(float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def regression_metrics(y_true: np.ndarray, pred: np.ndarray) -> dict:
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    mse = float(mean_squared_error(y_true, pred))
    return {"r2": float(r2_score(y_true, pred)), "rmse": mse ** 0.5, "mse": mse,
            "mae": float(mean_absolute_error(y_true, pred))}


CLASSIFICATION_METRICS = ("accuracy", "f1_macro", "balanced_accuracy")
CLASS_AVERAGED = ("f1_macro", "balanced_accuracy")  # every class counts the same, however rare
REGRESSION_METRICS = ("r2", "neg_rmse", "neg_mae")


def choose_metric(imbalance_ratio: float, task: str = "multiclass") -> str:
    """R² for regression; macro-F1 when classes are imbalanced (accuracy would reward ignoring rare classes)."""
    if task == "regression":
        return "r2"
    return "f1_macro" if imbalance_ratio >= 3.0 else "accuracy"


MIN_GROUP = 5        # groups with fewer test rows are listed but not compared (their score is mostly noise)
FAR_BELOW = 0.10     # a group is flagged when it scores this far below the median of the others


def group_metrics(y: np.ndarray, scores: np.ndarray, groups: np.ndarray, metric: str, num_classes: int,
                  column: str, regression: bool = False) -> dict:
    """`metric` (and the other headline metrics) per group value, with support counts, the largest gap between
    groups, and the groups far below the rest. scores: class probabilities, or predictions for regression."""
    rows = []
    for g in sorted(set(groups.tolist()), key=str):
        m = groups == g
        if regression:
            vals = regression_metrics(y[m], scores[m]) if m.sum() > 1 else {}
            keep = {k: vals.get(k, float("nan")) for k in ("r2", "rmse", "mae")}
        else:
            vals = classification_metrics(y[m], scores[m], num_classes)
            keep = {k: vals[k] for k in CLASSIFICATION_METRICS}
        rows.append({"group": str(g), "support": int(m.sum()), **keep})
    compared = [r for r in rows if r["support"] >= MIN_GROUP and not np.isnan(r[metric])]
    gap = (max(r[metric] for r in compared) - min(r[metric] for r in compared)) if len(compared) > 1 else 0.0
    flagged = []
    for r in compared:
        others = [o[metric] for o in compared if o is not r]
        if others and r[metric] < float(np.median(others)) - FAR_BELOW:
            flagged.append(r["group"])
    return {"column": column, "metric": metric, "table": rows, "gap": float(gap), "flagged": flagged,
            "min_support": MIN_GROUP}
