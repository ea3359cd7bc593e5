"""Backbone names -> specs -> families.

A backbone name is a registered alias (``@register_backbone``), ``timm/<model>``
(``:scratch`` for random init, ``@<file>`` for local weights), ``hf/<hub id or
local dir>``, ``automl:<export dir>`` (an earlier export), or a local
transformers directory. Each spec names the *family* that knows how to build,
preprocess, cut and save that kind of model (``models/timm_family.py``,
``hf_family.py``, ``export_family.py``): adding a family is one file.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable

from automl.errors import ModelLoadError
from automl.plugins import put

if TYPE_CHECKING:
    from automl.models.base import Family


@dataclass
class BackboneSpec:
    """How to build a backbone: its family, model id, and where the weights come from."""

    library: str                 # the family: "timm", "hf" or "automl" (an earlier export)
    model: str                   # timm model name, hub id / local dir, or export dir
    pretrained: bool = True
    weights: str | None = None   # timm: a local .safetensors/.pth file used as the pretrained source
    kwargs: dict = field(default_factory=dict)   # extra arguments for the family's constructor
    data_config: dict = field(default_factory=dict)   # preprocessing the weights expect (mean/std)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BackboneSpec":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


_ALIASES: dict[str, Callable[[], BackboneSpec]] = {}
_FAMILIES: dict[str, "Family"] = {}


def register_backbone(name: str):
    """Decorator: register a zero-argument function returning a BackboneSpec under `name`."""
    def deco(fn: Callable[[], BackboneSpec]):
        put(_ALIASES, name, fn, "backbone")
        return fn
    return deco


def register_family(family: "Family") -> "Family":
    """Register a backbone family (an adapter) under its `library` name."""
    put(_FAMILIES, family.library, family, "backbone family")
    return family


def list_backbones() -> list[str]:
    return sorted(_ALIASES)


def is_backbone_name(name) -> bool:
    """Whether `name` can be resolved without loading anything (for search-space validation)."""
    if isinstance(name, (dict, BackboneSpec)) or name in _ALIASES:
        return True
    text = str(name)
    lib, sep, rest = text.partition("/")
    return bool(sep and rest and _named(lib)) or text.startswith("automl:") or os.path.isdir(text)


def _named(lib: str):
    """The family that resolves backbone names '<lib>/<rest>', or None."""
    import automl.models  # noqa: F401  (registers the bundled families)

    fam = _FAMILIES.get(lib)
    return fam if fam is not None and fam.named else None


def resolve(name: str | dict | BackboneSpec) -> BackboneSpec:
    """Turn an alias, a 'timm/…' / 'hf/…' / 'automl:…' name, a directory or a dict into a BackboneSpec."""
    if isinstance(name, BackboneSpec):
        return name
    if isinstance(name, dict):
        return BackboneSpec.from_dict(name)
    if name in _ALIASES:
        return _ALIASES[name]()
    text = str(name)
    if text.startswith("automl:"):
        return BackboneSpec("automl", os.path.abspath(text[len("automl:"):]))
    lib, sep, rest = text.partition("/")
    if sep and rest and _named(lib):
        return _named(lib).parse(rest)
    if os.path.isdir(text) and os.path.exists(os.path.join(text, "config.json")):
        if os.path.exists(os.path.join(text, "model.safetensors")) and os.path.exists(os.path.join(text, "trials.csv")):
            return BackboneSpec("automl", os.path.abspath(text))
        return BackboneSpec("hf", text)
    raise ModelLoadError(
        f"Unknown backbone {name!r}; expected a registered name {list_backbones()}, 'timm/<model name>' "
        "(append ':scratch' for random init, or '@path/to/weights.safetensors' for local weights), "
        "'hf/<hub id or local dir>', 'automl:<export dir>', or a local transformers model dir. "
        "Fix: use one of these forms, e.g. 'timm/resnet18' or 'hf/path/to/bert'.")


def family(spec_or_model) -> "Family":
    """The family (adapter) of a spec, a backbone name, or a model built by one."""
    import automl.models  # noqa: F401  (registers the bundled families)

    lib = getattr(spec_or_model, "family", None)
    if not isinstance(lib, str):
        lib = resolve(spec_or_model).library
    if lib not in _FAMILIES:
        raise ModelLoadError(f"Unknown backbone family {lib!r}; registered: {sorted(_FAMILIES)}. "
                             "Fix: use 'timm', 'hf' or 'automl', or register a family with register_family().")
    return _FAMILIES[lib]


def offline_hint(spec: BackboneSpec, exc: Exception) -> ModelLoadError:
    where = family(spec).offline_fix
    return ModelLoadError(
        f"Could not load pretrained weights for {spec.library} backbone {spec.model!r}: "
        f"{type(exc).__name__}: {str(exc)[:300]}. The hub is unreachable or HF_HUB_OFFLINE=1 is set. "
        f"Fix: {where}; or set AUTOML_ONLINE=1 when a hub is reachable.")
