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


