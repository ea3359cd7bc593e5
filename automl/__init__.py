"""automl: fine-tune the best image or text classifier for your labelled data in one call.

    from automl import auto_finetune, load
    model = auto_finetune(df, label="label", time_budget_s=300)
    model.predict(new_df); model.export_dir
    same = load(model.export_dir)
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from automl import runtime as _runtime  # noqa: F401  (offline-hub defaults before any hub library loads)
from automl.budget import Budget
from automl.errors import AutoMLError, DataError, ModelLoadError, RunInterrupted, SearchSpaceError
from automl.options import FinetuneOptions

if TYPE_CHECKING:
    from automl.api import auto_finetune
    from automl.data.intake import DataReport, prepare
    from automl.export.manifest import ExportManifest
    from automl.export.predictor import FinetunedModel, load
    from automl.models import BackboneSpec, list_backbones, register_backbone
    from automl.ops.serve import ServeOptions, serve
    from automl.search.space import SearchSpace, load_space
    from automl.training.augment import register_image_policy, register_text_policy
    from automl.training.schedules import register_schedule

__version__ = "0.1.0"

# The heavy names load on first use (PEP 562), so `import automl`, `automl.load(dir).predict(...)` and
# `automl --help` do not pull in torch, Ray Tune or Optuna before they are needed. Serving pulls in FastAPI
# and Ray Serve.
_LAZY = {
    "auto_finetune": "automl.api",
    "load": "automl.export.predictor", "FinetunedModel": "automl.export.predictor",
    "prepare": "automl.data.intake", "DataReport": "automl.data.intake",
    "load_space": "automl.search.space", "SearchSpace": "automl.search.space",
    "BackboneSpec": "automl.models", "register_backbone": "automl.models", "list_backbones": "automl.models",
    "register_schedule": "automl.training.schedules",
    "register_image_policy": "automl.training.augment", "register_text_policy": "automl.training.augment",
    "ExportManifest": "automl.export.manifest",
    "serve": "automl.ops.serve", "ServeOptions": "automl.ops.serve",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'automl' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "auto_finetune", "load", "FinetunedModel", "prepare", "DataReport", "load_space", "SearchSpace",
    "BackboneSpec", "register_backbone", "register_schedule", "register_image_policy", "register_text_policy",
    "list_backbones", "serve", "ServeOptions", "FinetuneOptions", "ExportManifest", "Budget", "AutoMLError", "DataError", "ModelLoadError", "SearchSpaceError",
    "RunInterrupted",
]
