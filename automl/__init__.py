"""automl: fine-tune the best image or text classifier for your labelled data in one call.

    from automl import auto_finetune, load
    model = auto_finetune(df, label="label", time_budget_s=300)
    model.predict(new_df); model.export_dir
    same = load(model.export_dir)
"""
from automl import runtime as _runtime  # noqa: F401  (offline-hub defaults before any hub library loads)
from automl.api import auto_finetune
from automl.models import BackboneSpec, list_backbones, register_backbone
from automl.training.augment import register_image_policy, register_text_policy
from automl.data.intake import DataReport, prepare
from automl.errors import AutoMLError, DataError, ModelLoadError, SearchSpaceError
from automl.export.manifest import ExportManifest
from automl.export.predictor import FinetunedModel, load
from automl.options import FinetuneOptions
from automl.budget import Budget
from automl.training.schedules import register_schedule
from automl.search.space import SearchSpace, load_space

__version__ = "0.1.0"


def __getattr__(name: str):
    # Serving pulls in FastAPI and Ray Serve: loaded on first use, not with the package.
    if name in ("serve", "ServeOptions"):
        from automl.ops import serve as _serve

        return getattr(_serve, name)
    raise AttributeError(f"module 'automl' has no attribute {name!r}")



__all__ = [
    "auto_finetune", "load", "FinetunedModel", "prepare", "DataReport", "load_space", "SearchSpace",
    "BackboneSpec", "register_backbone", "register_schedule", "register_image_policy", "register_text_policy",
    "list_backbones", "serve", "ServeOptions", "FinetuneOptions", "ExportManifest", "Budget", "AutoMLError", "DataError", "ModelLoadError", "SearchSpaceError",
]
