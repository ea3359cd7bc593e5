"""Suspected label errors: planted flips are found by the out-of-fold confident-learning ranking."""
from __future__ import annotations

import numpy as np

from automl.data.intake import prepare
from automl.data.images import stack_resized
from automl.diagnostics.labelnoise import out_of_fold_proba, suspects


def test_planted_label_flips_are_found(digits_df):
    df = digits_df.copy()
    rng = np.random.default_rng(0)
    flipped = rng.choice(len(df), 12, replace=False)
    df.loc[flipped, "label"] = (df.loc[flipped, "label"] + 1) % 4
    t = prepare(df)
    X = stack_resized(t.images, 16)
    cfg = {"backbone": "timm/resnet10t:scratch", "image_size": 16, "lr": 3e-3, "batch_size": 16, "schedule": "cosine"}
    proba = out_of_fold_proba(cfg, X, t.y, t.num_classes, epochs=5, schedule_epochs=5, folds=2, use_ray=False)
    found = suspects(proba, t.y, t.classes, t.row_index)
    assert {"row", "given_label", "predicted_label", "confidence"} <= set(found.columns)
    top = set(found["row"].head(2 * len(flipped)))
    hits = len(top & set(flipped))
    assert hits >= 0.6 * len(flipped), (hits, found.head(20))
    # Reported given labels are the (wrong) ones in the table, by original row index.
    first = found.iloc[0]
    assert df.loc[first["row"], "label"] == first["given_label"]
