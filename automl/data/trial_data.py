"""The inputs of one trial, retrain or cross-fit fold."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class TrialData:
    """Inputs of one search or retrain: arrays only, so it ships cheaply to Ray workers."""

    modality: str
    num_classes: int
    x_train: Any              # uint8 N x 3 x S x S array, or list of text tuples
    y_train: np.ndarray
    x_val: Any = None
    y_val: np.ndarray | None = None
    class_weights: np.ndarray | None = None
    task: str = "classification"          # or "regression" (num_classes == 1 output)
    cache_dir: str | None = None          # frozen-feature cache shared by trials (None: caching off)
    target_scale: tuple[float, float] | None = None   # regression: (mean, std) the model's output is in units of




def subset(x, idx: np.ndarray):
    """Rows `idx` of a trial input: a `Rows` handle (data/inputs.py) stays a handle, an array or a list is sliced."""
    if getattr(x, "store", None) is not None:
        return x.take(idx)
    if isinstance(x, np.ndarray):
        return x[idx]
    return [x[i] for i in idx]


def input_key(x) -> str:
    """A key for the content of a trial input (the feature cache's): cheap for `Rows`, a hash otherwise."""
    import hashlib

    if getattr(x, "store", None) is not None:
        return x.key()
    h = hashlib.sha1()
    if isinstance(x, np.ndarray):
        h.update(str(x.shape).encode())
        h.update(np.ascontiguousarray(x).data)
    else:
        for row in x:
            h.update(repr(row).encode("utf-8", "replace"))
    return h.hexdigest()
