"""Model inputs of a task, materialised once: images decoded and resized to the planned size, or texts."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from automl.data.images import stack_resized
from automl.data.intake import TaskData, class_weights
from automl.data.trial_data import TrialData


@dataclass
class Inputs:
    """Every row's input: a uint8 N x 3 x S x S array (images) or a list of text tuples."""

    task: TaskData
    x: Any
    storage_size: int | None = None
    target_scale: tuple[float, float] | None = None   # regression: (mean, std) of train+validation targets

    @classmethod
    def materialise(cls, task: TaskData, storage_size: int | None) -> "Inputs":
        x = stack_resized(task.images, storage_size) if task.modality == "image" else task.texts
        scale = None
        if task.task == "regression":
            # Standardised with train+validation statistics, fixed for search and retrain alike.
            y = task.y[np.concatenate([task.splits["train"], task.splits["validation"]])]
            scale = (float(y.mean()), float(y.std() or 1.0))
        return cls(task, x, storage_size, scale)

    def pick(self, idx: np.ndarray):
        return self.x[idx] if isinstance(self.x, np.ndarray) else [self.x[i] for i in idx]

    def split(self, name: str) -> np.ndarray:
        if name == "full":
            return np.concatenate([self.task.splits["train"], self.task.splits["validation"]])
        return self.task.splits[name]

    def trial_data(self, train: str = "train", validation: str | None = "validation",
                   cache_dir: str | None = None) -> TrialData:
        """What a trial (train on `train`, score on `validation`) or a retrain (`full`, no validation) needs."""
        t = self.task
        tr = self.split(train)
        va = self.split(validation) if validation else None
        regression = t.task == "regression"
        return TrialData(t.modality, t.num_classes, self.pick(tr), t.y[tr],
                         self.pick(va) if va is not None else None, t.y[va] if va is not None else None,
                         None if regression else class_weights(t.y[tr], t.num_classes),
                         task="regression" if regression else "classification", cache_dir=cache_dir,
                         target_scale=self.target_scale)
