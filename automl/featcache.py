"""Frozen-feature caching: when only the head trains, compute the frozen body once.

With unfreeze=0, no augmentation and no gradual unfreezing, the body's output
for an input is the same every epoch and in every trial with the same
(backbone, preprocessing, seed for random-init bodies). The features are
computed once, kept on disk under a content fingerprint (so concurrent Ray
trials share them), and the head trains on them through the usual loop.
Frozen modules run in eval mode in both paths, so cached and uncached
training give the same weights.
"""
from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _hf_parts(body):
    base = getattr(body, "base_model", None)
    pooler = getattr(base, "pooler", None)
    clf, drop = getattr(body, "classifier", None), getattr(body, "dropout", None)
    if pooler is None or not isinstance(clf, nn.Linear) or drop is None:
        return None
    return base, pooler, drop, clf


def eligible(config: dict, model, modality: str, k: int) -> bool:
    """True when the inputs to the trainable part cannot change between epochs."""
    if k != 0 or int(config.get("gradual_unfreeze_every") or 0) > 0:
        return False
    if modality == "image":
        return config["augment"] == "none" and config["mix"] == "none" and model.library == "timm"
    return config["text_augment"] == "none" and model.library == "hf" and _hf_parts(model.body) is not None


class CachedHead(nn.Module):
    """The trainable top of a model, applied to cached body features (shares the model's modules)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, feats: torch.Tensor, attention_mask=None) -> torch.Tensor:
        body = self.model.body
        if self.model.library == "timm":
            if body.drop_rate:
                feats = F.dropout(feats, p=float(body.drop_rate), training=self.training)
            return body.get_classifier()(feats)
        _, pooler, drop, clf = _hf_parts(body)
        return clf(drop(pooler(feats.unsqueeze(1))))


class FeatureInputs:
    """Stands in for an encoder: a batch is a slice of the cached feature matrix."""

    def batch(self, x: torch.Tensor, idx: np.ndarray, augment=None) -> torch.Tensor:
        return x[torch.as_tensor(idx)]


@torch.no_grad()
def body_features(model, encoder, x, device, batch_size: int = 128) -> torch.Tensor:
    was = model.training
    model.eval()
    out = []
    for s in range(0, len(x), batch_size):
        idx = np.arange(s, min(s + batch_size, len(x)))
        if model.library == "timm":
            body = model.body
            f = body.forward_head(body.forward_features(encoder.batch(x, idx).to(device)), pre_logits=True)
        else:
            ids, mask = encoder.batch(x, idx)
            base = _hf_parts(model.body)[0]
            f = base(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state[:, 0]
        out.append(f.float().cpu())
    model.train(was)
    return torch.cat(out)


def _content_hash(x) -> str:
    h = hashlib.sha1()
    if isinstance(x, np.ndarray):
        h.update(str(x.shape).encode())
        h.update(np.ascontiguousarray(x).data)
    else:
        for row in x:
            h.update(repr(row).encode("utf-8", "replace"))
    return h.hexdigest()


def cache_key(config: dict, spec, x) -> str:
    parts = [repr(spec.to_dict()), str(config.get("image_size")), str(config.get("max_length")),
             str(config.get("seed")) if not spec.pretrained or spec.library == "automl" else "",
             _content_hash(x)]
    if spec.library == "automl":
        parts.append(str(os.path.getmtime(os.path.join(spec.model, "model.safetensors"))))
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:24]


def cached_features(model, encoder, x, device, cache_dir: str | None, key: str) -> torch.Tensor:
    """Body features for x, from the disk cache when another trial already computed them."""
    path = Path(cache_dir) / f"{key}.npy" if cache_dir else None
    if path is not None and path.exists():
        try:
            return torch.from_numpy(np.load(path, allow_pickle=False))
        except (OSError, ValueError):
            pass  # a torn or foreign file: recompute
    feats = body_features(model, encoder, x, device)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{uuid.uuid4().hex[:6]}.tmp.npy")
        np.save(tmp, feats.numpy())
        os.replace(tmp, path)  # atomic: concurrent trials never read half a file
    return feats

