"""Frozen-feature caching: compute the frozen bottom of a model once, train only the top.

When the inputs are not augmented and no gradual unfreezing is planned, the
frozen part's output for an input is the same every epoch and in every trial
with the same (backbone, depth, preprocessing, seed for random-init bodies).
It is computed once, kept on disk under a content fingerprint (so concurrent
Ray trials share it), and the trainable top trains on it through the usual loop.

Two cuts:
- head only (unfreeze=0): pooled body features, the classifier trains on them;
- frozen prefix (unfreeze=k>0): the activations entering the first trainable
  block. timm: forward_features must be a plain chain of child modules;
  transformers: the hidden states entering the first trainable encoder layer.
  A split is used only after it reproduced the full model's output on a probe
  batch, so an architecture it does not fit falls back to recomputing.
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

from automl.data.encoders import forward
from automl.data.trial_data import input_key, subset
from automl.models.base import FeatureInputs, Ragged, Split, eval_mode
from automl.models.registry import family

# Cached activations larger than this are not worth the memory (AUTOML_FEATCACHE_MAX_MB overrides).
MAX_MB = 1024


def body_features(model, encoder, x, device, batch_size: int = 128) -> torch.Tensor:
    """Pooled body features (the input of the classifier) for every row of x, as the family pools them."""
    split = family(model).split(model, 0, encoder, x, device)
    with eval_mode(model):
        return split.features(encoder, x, device, batch_size)


def _fits(split: Split, encoder, x, device) -> bool:
    """The cached activations for all of x stay under the memory cap (measured on one row)."""
    limit = float(os.environ.get("AUTOML_FEATCACHE_MAX_MB", MAX_MB))
    one = subset(x, np.arange(1))
    with eval_mode(split.model):
        f = split.features(encoder, one, device)
    per_row = (f.flat.numel() if isinstance(f, Ragged) else f.numel()) * 4
    return len(x) * per_row <= limit * 2**20


def _verified(split: Split, encoder, x, device) -> bool:
    """The split reproduces the model's own output on a few real rows (eval mode)."""
    model = split.model
    idx = np.arange(min(4, len(x)))
    part = subset(x, idx)
    try:
        with eval_mode(model), torch.no_grad():
            want = forward(model, encoder, part, idx, device).float().cpu()
            top = split.top().eval()  # a fresh module is in train mode: its dropout would differ from the model's
            got = forward(top, FeatureInputs(), split.features(encoder, part, device), idx, device).float().cpu()
        return got.shape == want.shape and torch.allclose(got, want, rtol=1e-3, atol=1e-4)
    except Exception:
        return False


def plan(config: dict, model, encoder, k: int, x, device) -> Split | None:
    """The cut for a trial training the top k body groups, or None when its inputs can change.

    Call after the model's trainable parameters are set for k.
    """
    augmented = (config.get("augment", "none") != "none" or config.get("mix", "none") != "none"
                 or config.get("text_augment", "none") != "none")
    if augmented or int(config.get("gradual_unfreeze_every") or 0) > 0:
        return None
    split = family(model).split(model, k, encoder, x, device)
    if split is None or not _fits(split, encoder, x, device):
        return None
    return split if _verified(split, encoder, x, device) else None


def cache_key(config: dict, spec, x, split: Split) -> str:
    parts = [repr(spec.to_dict()), str(config.get("image_size")), str(config.get("max_length")), split.tag,
             str(config.get("seed")) if not spec.pretrained or spec.library == "automl" else "",
             input_key(x)]
    if spec.library == "automl":
        parts.append(str(os.path.getmtime(os.path.join(spec.model, "model.safetensors"))))
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:24]


def _save(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{uuid.uuid4().hex[:6]}.tmp.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)  # atomic: concurrent trials never read half a file


# Reads served from disk / computed, in this process: trials report them, so a cache that silently stopped
# working (and recomputed every time) shows up in the trial table and in tests.
STATS = {"hits": 0, "misses": 0, "from": ""}


def _node() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    except ImportError:  # pragma: no cover
        return "local"


def cached_features(split: Split, encoder, x, device, cache_dir: str | None, key: str):
    """The frozen part's output for x, from the disk cache when another trial already computed it."""
    path = Path(cache_dir) / f"{key}.npy" if cache_dir else None
    offsets_path = Path(cache_dir) / f"{key}.offsets.npy" if cache_dir else None
    if path is not None and path.exists():
        try:
            flat = torch.from_numpy(np.load(path, allow_pickle=False))
            STATS["hits"] += 1
            STATS["from"] = (Path(cache_dir) / f"{key}.node").read_text() if (Path(cache_dir) / f"{key}.node").exists() else ""
            if offsets_path.exists():
                return Ragged(flat, torch.from_numpy(np.load(offsets_path, allow_pickle=False)))
            return flat
        except (OSError, ValueError):
            pass  # a torn or foreign file: recompute
    STATS["misses"] += 1
    with eval_mode(split.model):
        feats = split.features(encoder, x, device)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        (Path(cache_dir) / f"{key}.node").write_text(_node())  # who computed it (trials on other nodes read it)
        if isinstance(feats, Ragged):
            _save(offsets_path, feats.offsets.numpy())  # before the data file, whose presence means "complete"
            _save(path, feats.flat.numpy())
        else:
            _save(path, feats.numpy())
    return feats
