"""timm image models: any `timm.create_model` name, pretrained from the hub or a local weights file."""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from automl.data.encoders import ImageEncoder
from automl.errors import ModelLoadError
from automl.models.base import Family, Split, eval_mode
from automl.models.registry import BackboneSpec, offline_hint, register_family


class ImageClassifier(nn.Module):
    """A timm model: images (N x 3 x S x S, normalised) -> logits."""

    family = "timm"

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class _Head(Split):
    """Pooled features of the frozen body; the classifier (with the model's dropout) trains on them."""

    def bottom(self, encoder, x, idx, device):
        body = self.model.body
        return body.forward_head(body.forward_features(encoder.batch(x, idx).to(device)), pre_logits=True)

    def apply_top(self, feats, mask=None, training: bool = True):
        body = self.model.body
        if getattr(body, "drop_rate", 0.0):
            feats = F.dropout(feats, p=float(body.drop_rate), training=training)
        return body.get_classifier()(feats)


class _Prefix(Split):
    """forward_features as a chain of modules, cut before its first trainable one."""

    def __init__(self, model, chain: list[nn.Module], cut: int):
        super().__init__(model)
        self.chain, self.cut, self.tag = chain, cut, f"timm{cut}"

    def bottom(self, encoder, x, idx, device):
        h = encoder.batch(x, idx).to(device)
        for m in self.chain[:self.cut]:
            h = m(h)
        return h

    def apply_top(self, feats, mask=None, training: bool = True):
        for m in self.chain[self.cut:]:
            feats = m(feats)
        return self.model.body.forward_head(feats)


def _chain(body: nn.Module, probe: torch.Tensor) -> list[nn.Module] | None:
    """forward_features as modules applied one after another, or None when it is not such a chain.

    Children are taken in registration order (Sequential containers opened up
    so a cut can fall between blocks) and accepted only if they reproduce
    forward_features on the probe.
    """
    def opened(m: nn.Module):
        if isinstance(m, nn.Sequential):
            for c in m.children():
                yield from opened(c)
        else:
            yield m

    with torch.no_grad():
        try:
            target = body.forward_features(probe)
        except Exception:
            return None
        h, chain = probe, []
        for child in body.children():
            parts = list(opened(child))
            try:
                for m in parts:
                    h = m(h)
            except Exception:
                return None
            chain.extend(parts)
            if h.shape == target.shape and torch.allclose(h, target, rtol=1e-4, atol=1e-5):
                return chain
    return None


class TimmFamily(Family):
    library = "timm"
    named = True
    offline_fix = "pass weights='path/to/model.safetensors' (BackboneSpec) or 'timm/<model>@<file>'"

    def parse(self, rest):
        if rest.endswith(":scratch"):
            return BackboneSpec(self.library, rest[: -len(":scratch")], pretrained=False)
        if "@" in rest:  # timm/<model>@<local weights file>: YAML-friendly local weights
            model, weights = rest.split("@", 1)
            return BackboneSpec(self.library, model, weights=weights)
        return BackboneSpec(self.library, rest)
    modality = "image"
    input_names = ("pixel_values",)

    def warm(self):
        import timm  # noqa: F401

    def build(self, spec, num_classes, *, dropout=0.0, drop_path=0.0, pretrained=None):
        import timm

        use_pretrained = spec.pretrained if pretrained is None else pretrained
        kwargs = dict(spec.kwargs)
        if dropout:
            kwargs["drop_rate"] = dropout
        if drop_path:
            kwargs["drop_path_rate"] = drop_path
        overlay = {k: tuple(v) for k, v in spec.data_config.items() if k in ("mean", "std")}
        if use_pretrained and spec.weights:
            if not os.path.exists(spec.weights):
                raise ModelLoadError(f"Weights file {spec.weights!r} for timm model {spec.model!r} does not exist. "
                                     "Fix: pass an existing .safetensors or .pth file.")
            overlay["file"] = os.path.abspath(spec.weights)
        if overlay:
            kwargs["pretrained_cfg_overlay"] = overlay
        try:
            body = timm.create_model(spec.model, pretrained=use_pretrained, num_classes=num_classes, **kwargs)
        except RuntimeError as exc:
            if "Unknown model" in str(exc):
                raise ModelLoadError(f"timm has no model named {spec.model!r}. "
                                     "Fix: pick one from timm.list_models().") from exc
            raise
        except Exception as exc:  # hub errors have many types (LocalEntryNotFoundError, OSError, HTTPError)
            if use_pretrained:
                raise offline_hint(spec, exc) from exc
            raise
        if use_pretrained and num_classes != body.pretrained_cfg.get("num_classes", 1000):
            # A new head starts at zero (as in BiT): timm's EfficientNet init draws it from U(+-1/sqrt(classes)),
            # which for 2 classes gives logits in the tens on pretrained features, and a head-only trial
            # spends its steps undoing that instead of learning (2-class loss ~3-9 instead of ln 2).
            with torch.no_grad():
                for p in body.get_classifier().parameters():
                    p.zero_()
        return ImageClassifier(body)

    def encoder(self, model, spec, config):
        from timm.data import resolve_data_config

        size = int(config["image_size"])
        cfg = {**resolve_data_config({"input_size": (3, size, size)}, model=model.body), **spec.data_config}
        return ImageEncoder(size, list(cfg["mean"]), list(cfg["std"]))

    def layer_groups(self, model):
        from timm.models import group_parameters

        body = model.body
        names = [n for n, _ in model.named_parameters()]
        groups = group_parameters(body, body.group_matcher(coarse=True))
        ordered = [["body." + n for n in groups[k]] for k in sorted(groups)]
        head = {"body." + n for n in _head_names(body)}
        # Some models lump the head with the last block; split it out so k=0 means "head only".
        if head and set(ordered[-1]) != head:
            ordered[-1] = [n for n in ordered[-1] if n not in head]
            ordered.append([n for n in names if n in head])
            ordered = [g for g in ordered if g]
        return ordered

    def split(self, model, k, encoder, x, device):
        if k == 0:
            return _Head(model)
        probe = encoder.batch(x, np.arange(min(2, len(x)))).to(device)
        with eval_mode(model.body) as body:
            chain = _chain(body, probe)
        if chain is None:
            return None
        cut = next((i for i, m in enumerate(chain) if any(p.requires_grad for p in m.parameters())), len(chain))
        return _Prefix(model, chain, cut) if cut > 0 else None

    def head(self, model):
        return model.body.get_classifier()

    def grow_head(self, model, num_classes):
        old = self.head(model)
        if old.out_features == num_classes:
            return model
        w, b = old.weight.detach().clone(), (old.bias.detach().clone() if old.bias is not None else None)
        model.body.reset_classifier(num_classes)  # timm knows where each model keeps its classifier
        new = self.head(model)
        with torch.no_grad():
            new.weight[:len(w)] = w
            if b is not None and new.bias is not None:
                new.bias[:len(b)] = b
        return model

    def example_inputs(self, preprocessing):
        return (torch.randn(2, 3, preprocessing["size"], preprocessing["size"]),)


def _head_names(body: nn.Module) -> list[str]:
    clf = body.get_classifier()
    ids = {id(p) for p in clf.parameters()} if isinstance(clf, nn.Module) else set()
    return [n for n, p in body.named_parameters() if id(p) in ids]


register_family(TimmFamily())

