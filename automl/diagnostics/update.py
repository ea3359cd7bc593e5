"""Model updates: compare a fine-tuned update with its base, and decide whether to promote it.

The base export stores its test split (test_split.npz / test_split.jsonl), so an
update can be scored on the old data as well as the new: forgetting is the drop
on the old test split.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from automl.runtime import device

MAX_STORED = 5000  # rows of the test split kept in an export for later forgetting checks


def save_test_split(out: Path, modality: str, x, y: np.ndarray, classes: list) -> str:
    """Write (a capped sample of) the test split into an export being written, as the modality stores it."""
    from automl import modalities

    n = len(y)
    keep = np.arange(n) if n <= MAX_STORED else np.random.default_rng(0).choice(n, MAX_STORED, replace=False)
    labels = [classes[i] for i in y[keep]] if classes else [float(v) for v in y[keep]]
    return modalities.get(modality).save_test_split(Path(out), x, keep, labels)


def load_test_split(export_dir: str | Path):
    """(inputs, label values) of an export's stored test split, or None."""
    from automl import modalities

    for name in modalities.names():
        found = modalities.get(name).load_test_split(Path(export_dir))
        if found is not None:
            return found
    return None


def score(model, encoder, classes: list, x, labels: list, metric: str, modality: str,
          target_scale: list | tuple | None = None) -> float:
    """`metric` of a model on stored inputs (as the modality stores them: decoded images, raw text tuples).

    Regression (classes == []): the model's output is a standardised target, turned back into numbers with
    `target_scale` (mean, std; the export's manifest.target_scale) and scored with R² ("r2"), or "neg_rmse" /
    "neg_mae" (higher is better for all three, as the promotion rule expects)."""
    from automl.metrics import classification_metrics, regression_metrics
    from automl.data.encoders import predict_logits

    from automl import modalities

    inputs = modalities.get(modality).stored_inputs(x, encoder)
    out = predict_logits(model, encoder, inputs, device())
    if not classes:
        if target_scale is None:
            raise ValueError("scoring a regression model needs its target_scale (mean, std of the target)")
        mean, std = target_scale
        pred = out[:, 0].numpy() * std + mean
        m = regression_metrics(np.asarray(labels, dtype=np.float64), pred)
        m.update(neg_rmse=-m["rmse"], neg_mae=-m["mae"])
        return float(m[metric])
    proba = torch.softmax(out, 1).numpy()
    index = {str(c): i for i, c in enumerate(classes)}
    n = len(classes)
    # A label the model does not know becomes an extra class the model never predicts: a miss for every metric.
    y = np.array([index.get(str(v), n) for v in labels])
    full = np.zeros((len(y), n + 1), dtype=np.float32)
    full[:, :n] = proba
    return float(classification_metrics(y, full, n + 1)[metric])


def l2_distance(new_model, base_model) -> float:
    """L2 distance between weights (the shared rows of a grown head included)."""
    base = dict(base_model.named_parameters())
    total = 0.0
    for name, p in new_model.named_parameters():
        q = base.get(name)
        if q is None:
            continue
        if p.shape != q.shape:
            p = p[: q.shape[0]]
            if p.shape != q.shape:
                continue
        total += float(((p.detach().cpu() - q.detach().cpu()) ** 2).sum())
    return total ** 0.5


def decide(new: float, current: float, *, forgetting: float | None = None, tolerance: float = 0.0,
           metric: str = "score") -> tuple[str, str]:
    """The promotion rule, for updates and the leaderboard alike: "champion" only if `new` beats `current`
    (both on the same test split) and, when `forgetting` is measured, loses at most `tolerance` on the old data."""
    if new <= current:
        return "challenger", f"test {metric} {new:.4f} does not beat the current model's {current:.4f}"
    if forgetting is not None and forgetting > tolerance:
        return "challenger", (f"forgets: {metric} drops by {forgetting:.4f} on the base model's test split, "
                              f"more than the tolerance {tolerance}")
    return "champion", (f"test {metric} {new:.4f} beats the current model's {current:.4f}"
                        + (f" and stays within tolerance on the old test split (change {-forgetting:+.4f}, "
                           f"tolerance {tolerance})" if forgetting is not None else ""))


def compare_with_base(base_dir: Path, model, encoder, classes: list, test_x, test_labels: list, metric: str,
                      tolerance: float, modality: str, target_scale: list | tuple | None = None) -> dict:
    """Score an update and its base on the new test split and on the base's own stored test split.

    Regression: classes == [], labels are numbers, and target_scale is the update's (mean, std) of the target
    (the base's is read from its manifest)."""
    from automl.export.writer import load_model

    base, base_encoder, base_manifest = load_model(base_dir)
    base_scale = base_manifest.target_scale
    new_on_new = score(model, encoder, classes, test_x, test_labels, metric, modality, target_scale)
    base_on_new = score(base, base_encoder, base_manifest.classes, test_x, test_labels, metric, modality, base_scale)
    old = load_test_split(base_dir)
    new_on_old = base_on_old = forgetting = None
    if old is not None:
        old_x, old_labels = old
        new_on_old = score(model, encoder, classes, old_x, old_labels, metric, modality, target_scale)
        base_on_old = score(base, base_encoder, base_manifest.classes, old_x, old_labels, metric, modality,
                            base_scale)
        forgetting = base_on_old - new_on_old
    decision, reason = decide(new_on_new, base_on_new, forgetting=forgetting, tolerance=tolerance, metric=metric)
    if old is None:
        reason += ("; forgetting was NOT checked: the base export carries no test split (exported with "
                   "keep_test_split=False or stripped), so how the update does on the old data is unknown")
    return {"base_model": str(base_dir), "metric": metric, "tolerance": tolerance,
            "new_test": {"new": new_on_new, "old": base_on_new},
            "old_test": None if old is None else {"new": new_on_old, "old": base_on_old},
            "forgetting": forgetting, "forgetting_checked": old is not None, "l2_from_base": l2_distance(model, base),
            "decision": decision, "reason": reason}
