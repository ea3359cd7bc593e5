"""Classification metrics from sklearn, plus calibration error."""
from __future__ import annotations

import numpy as np


def classification_metrics(y_true: np.ndarray, proba: np.ndarray, num_classes: int, detailed: bool = False) -> dict:
    from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score, log_loss,
                                 precision_recall_fscore_support)

    y_pred = proba.argmax(1)
    labels = list(range(num_classes))
    out = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "f1_macro": float(f1_score(y_true, y_pred, average="macro", labels=labels, zero_division=0)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "log_loss": float(log_loss(y_true, np.clip(proba, 1e-7, 1.0), labels=labels)),
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
REGRESSION_METRICS = ("r2", "neg_rmse", "neg_mae")


def choose_metric(imbalance_ratio: float, task: str = "multiclass") -> str:
    """R² for regression; macro-F1 when classes are imbalanced (accuracy would reward ignoring rare classes)."""
    if task == "regression":
        return "r2"
    return "f1_macro" if imbalance_ratio >= 3.0 else "accuracy"
