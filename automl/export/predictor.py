"""The fine-tuned model a user gets back: predict, predict_proba, evaluate."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from automl import modalities
from automl.data.intake import read_inputs
from automl.export.manifest import ExportManifest
from automl.errors import DataError
from automl.metrics import classification_metrics
from automl.data.encoders import predict_logits


class FinetunedModel:
    """A fine-tuned classifier with its preprocessing and label map.

    Attributes: manifest (the export's ExportManifest), export_dir, classes, trials (DataFrame, after a
    search), data_report (dict), metrics (test metrics), promoted, label_errors (DataFrame or None).
    """

    def __init__(self, model, encoder, manifest: ExportManifest, export_dir: str | Path | None = None,
                 trials: pd.DataFrame | None = None, search=None):
        self.model = model
        self.encoder = encoder
        self.manifest = manifest
        self.export_dir = str(export_dir) if export_dir else None
        self.trials = trials
        self.search = search
        self.classes = list(manifest.classes)
        self.data_report = manifest.data_report
        self.metrics = manifest.test_metrics
        self._device = torch.device("cpu")
        self.label_errors: pd.DataFrame | None = None
        self.promoted = (manifest.update or {}).get("decision", "champion") == "champion"

    @property
    def meta(self) -> dict:
        """The manifest as a plain dict (config.json's contents)."""
        return self.manifest.to_dict()

    def __repr__(self) -> str:
        m = self.manifest
        return (f"FinetunedModel(backbone={m.backbone.model!r}, classes={len(self.classes)}, "
                f"test_{m.metric}={self.metrics.get(m.metric)}, export_dir={self.export_dir!r})")

    # ------------------------------------------------------------------ inputs
    def _inputs(self, data: Any, base_dir: str | None = None):
        m = self.manifest
        adapter = modalities.get(m.modality)
        if isinstance(data, (list, np.ndarray)) and not isinstance(data, tuple):
            data = adapter.frame(data, m.input_columns[0])
        return adapter.model_inputs(read_inputs(data, m.modality, m.input_columns, base_dir, m.preprocessing),
                                    m.preprocessing, self.encoder)

    @property
    def is_regression(self) -> bool:
        return self.manifest.is_regression

    def _outputs(self, data: Any, base_dir: str | None = None) -> torch.Tensor:
        x = self._inputs(data, base_dir)
        if len(x) == 0:
            return torch.zeros((0, max(1, len(self.classes))))
        return predict_logits(self.model, self.encoder, x, self._device)

    def _proba(self, data: Any, base_dir: str | None = None) -> np.ndarray:
        if self.is_regression:
            raise DataError("This model predicts numbers (regression), so there are no class probabilities. "
                            "Fix: use predict().")
        return torch.softmax(self._outputs(data, base_dir), 1).numpy()

    def _numbers(self, data: Any, base_dir: str | None = None) -> np.ndarray:
        mean, std = self.manifest.target_scale
        return self._outputs(data, base_dir)[:, 0].numpy() * std + mean

    # ------------------------------------------------------------------ API
    def predict_proba(self, data: Any) -> pd.DataFrame:
        """Class probabilities: one row per input, one column per label value."""
        return pd.DataFrame(self._proba(data), columns=self.classes)

    def predict(self, data: Any) -> np.ndarray:
        """Predicted labels, as the original label values (numbers, for regression)."""
        if self.is_regression:
            return self._numbers(data)
        proba = self._proba(data)
        return np.asarray(self.classes, dtype=object)[proba.argmax(1)] if len(proba) else np.asarray([], dtype=object)

    def evaluate(self, data: Any, label: str | None = None, groups: str | None = None) -> dict:
        """Accuracy, macro-F1, balanced accuracy, log loss, ECE on labelled data (R², RMSE, MAE for regression).

        groups: a column whose values get their own metrics, under "groups" (support counts, the largest gap
        between groups, and the groups far below the rest); the column is not used as an input."""
        from automl.data.intake import find_label_column, to_dataframe
        from automl.metrics import group_metrics, regression_metrics

        # A CSV's relative image paths are read from beside the CSV.
        df, base_dir = to_dataframe(data) if not isinstance(data, pd.DataFrame) else (data, None)
        own = self.manifest.label_column
        label_col = find_label_column(df, label or (own if own in df.columns else None))
        if groups is not None and groups not in df.columns:
            raise DataError(f"Groups column {groups!r} not found; the columns are {list(map(str, df.columns))}. "
                            "Fix: pass groups= one of these columns.")
        if self.is_regression:
            y, scores = df[label_col].astype(float).to_numpy(), self._numbers(df, base_dir)
            out = regression_metrics(y, scores)
        else:
            known = {str(c): i for i, c in enumerate(self.classes)}
            y = df[label_col].map(lambda v: known.get(str(v), -1)).to_numpy()
            if (y < 0).any():
                unknown = sorted({str(v) for v, k in zip(df[label_col], y) if k < 0})[:10]
                raise DataError(f"Labels {unknown} in column {label_col!r} were not seen in training; the model "
                                f"knows {self.classes}. Fix: evaluate on data with known labels.")
            scores = self._proba(df, base_dir)
            out = classification_metrics(y, scores, len(self.classes))
        if groups is not None:
            out["groups"] = group_metrics(y, scores, df[groups].astype(str).to_numpy(), self.manifest.metric,
                                          len(self.classes), groups, self.is_regression)
        return out

    def to(self, device: str | torch.device) -> "FinetunedModel":
        self._device = torch.device(device)
        self.model.to(self._device)
        return self


def load(path: str | Path) -> FinetunedModel:
    """Load an exported model from its directory (safetensors + JSON; no pickle)."""
    from automl.export.writer import load_model

    model, encoder, manifest = load_model(path)
    trials = pd.read_csv(Path(path) / "trials.csv") if (Path(path) / "trials.csv").exists() else None
    fm = FinetunedModel(model, encoder, manifest, export_dir=Path(path).resolve(), trials=trials)
    if (Path(path) / "suspected_label_errors.csv").exists():
        fm.label_errors = pd.read_csv(Path(path) / "suspected_label_errors.csv")
    return fm
