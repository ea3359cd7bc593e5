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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# Cached activations larger than this are not worth the memory (AUTOML_FEATCACHE_MAX_MB overrides).
MAX_MB = 1024


def _hf_parts(body):
    base = getattr(body, "base_model", None)
    pooler = getattr(base, "pooler", None)
    clf, drop = getattr(body, "classifier", None), getattr(body, "dropout", None)
    if pooler is None or not isinstance(clf, nn.Linear) or drop is None:
        return None
    return base, pooler, drop, clf


@contextmanager
def _eval_mode(module: nn.Module):
    """Run a block in eval mode (no dropout, fixed BN statistics), then restore each submodule's mode."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


def _hf_layers(base) -> nn.ModuleList | None:
    lists = [m for m in base.modules() if isinstance(m, nn.ModuleList)]
    return max(lists, key=len) if lists else None


def _timm_chain(body: nn.Module, probe: torch.Tensor) -> list[nn.Module] | None:
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


@dataclass
class Ragged:
    """Per-example activations of different lengths (text): rows of `flat` split at `offsets`."""

    flat: torch.Tensor      # (total tokens, hidden)
    offsets: torch.Tensor   # (n + 1,)

    def __len__(self) -> int:
        return len(self.offsets) - 1


class FeatureInputs:
    """Stands in for an encoder: a batch is a slice of the cached activations."""

    def batch(self, x, idx: np.ndarray, augment=None):
        if isinstance(x, Ragged):
            rows = [x.flat[x.offsets[i]:x.offsets[i + 1]] for i in idx]
            h = nn.utils.rnn.pad_sequence(rows, batch_first=True)
            lengths = torch.tensor([len(r) for r in rows])
            mask = (torch.arange(h.shape[1])[None, :] < lengths[:, None]).long()
            return h, mask
        return x[torch.as_tensor(idx)]


class Split:
    """Where a model is cut: `features` computes the frozen part, `top` trains on its output."""

    tag = "head"

    def __init__(self, model):
        self.model = model

    def features(self, encoder, x, device, batch_size: int = 128):
        return _batched(lambda b: self._prefix(encoder, x, b, device), len(x), batch_size)

    def top(self) -> nn.Module:
        return _Top(self)

    def _prefix(self, encoder, x, idx, device) -> torch.Tensor:
        body = self.model.body
        if self.model.library == "timm":
            return body.forward_head(body.forward_features(encoder.batch(x, idx).to(device)), pre_logits=True)
        ids, mask = encoder.batch(x, idx)
        base = _hf_parts(body)[0]
        return base(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state[:, 0]

    def apply_top(self, feats: torch.Tensor, mask=None, training: bool = True) -> torch.Tensor:
        body = self.model.body
        if self.model.library == "timm":
            if body.drop_rate:
                feats = F.dropout(feats, p=float(body.drop_rate), training=training)
            return body.get_classifier()(feats)
        _, pooler, drop, clf = _hf_parts(body)
        return clf(drop(pooler(feats.unsqueeze(1))))


class TimmPrefix(Split):
    """Cut a timm model whose forward_features is a chain, before its first trainable block."""

    def __init__(self, model, chain: list[nn.Module], cut: int):
        super().__init__(model)
        self.chain, self.cut, self.tag = chain, cut, f"timm{cut}"

    def _prefix(self, encoder, x, idx, device) -> torch.Tensor:
        h = encoder.batch(x, idx).to(device)
        for m in self.chain[:self.cut]:
            h = m(h)
        return h

    def apply_top(self, feats, mask=None, training: bool = True):
        for m in self.chain[self.cut:]:
            feats = m(feats)
        return self.model.body.forward_head(feats)


class _Stop(Exception):
    pass


class HFPrefix(Split):
    """Cut a transformers encoder before its first trainable layer; cache the hidden states there."""

    def __init__(self, model, layers: nn.ModuleList, cut: int):
        super().__init__(model)
        self.layers, self.cut, self.tag = layers, cut, f"hf{cut}"

    def features(self, encoder, x, device, batch_size: int = 128) -> Ragged:
        rows = []

        def grab(_module, args, kwargs):
            rows.append(args[0] if args else kwargs["hidden_states"])
            raise _Stop  # the layers above are not needed

        base = _hf_parts(self.model.body)[0]
        handle = self.layers[self.cut].register_forward_pre_hook(grab, with_kwargs=True)
        flat, lengths = [], []
        try:
            with torch.no_grad():
                for s in range(0, len(x), batch_size):
                    ids, mask = encoder.batch(x, np.arange(s, min(s + batch_size, len(x))))
                    try:
                        base(input_ids=ids.to(device), attention_mask=mask.to(device))
                    except _Stop:
                        pass
                    h = rows.pop().float().cpu()
                    for i, n in enumerate(mask.sum(1).tolist()):
                        flat.append(h[i, :n])
                        lengths.append(n)
        finally:
            handle.remove()
        offsets = torch.as_tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.long)
        return Ragged(torch.cat(flat), offsets)

    def apply_top(self, feats, mask=None, training: bool = True):
        from transformers.masking_utils import create_bidirectional_mask

        base, pooler, drop, clf = _hf_parts(self.model.body)
        mask4 = create_bidirectional_mask(config=base.config, inputs_embeds=feats, attention_mask=mask)
        for layer in self.layers[self.cut:]:
            feats = layer(feats, mask4)
        return clf(drop(pooler(feats)))


class _Top(nn.Module):
    """The trainable top of a model as a module (shares the model's parameters)."""

    def __init__(self, split: Split):
        super().__init__()
        self.split = split
        self.model = split.model

    def forward(self, feats: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.split.apply_top(feats, mask, self.training)


def _batched(fn, n: int, batch_size: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(np.arange(s, min(s + batch_size, n))).float().cpu() for s in range(0, n, batch_size)])


def body_features(model, encoder, x, device, batch_size: int = 128) -> torch.Tensor:
    """Pooled body features (the input of the classifier) for every row of x."""
    with _eval_mode(model):
        return Split(model).features(encoder, x, device, batch_size)


def _fits(n_rows: int, per_row: int) -> bool:
    limit = float(os.environ.get("AUTOML_FEATCACHE_MAX_MB", MAX_MB))
    return n_rows * per_row * 4 <= limit * 2**20


def _verified(split: Split, encoder, x, device) -> bool:
    """The split reproduces the model's own output on a few real rows (eval mode)."""
    from automl.data.encoders import forward

    model = split.model
    idx = np.arange(min(4, len(x)))
    part = x[idx] if isinstance(x, np.ndarray) else [x[i] for i in idx]
    try:
        with _eval_mode(model), torch.no_grad():
            want = forward(model, encoder, part, idx, device).float().cpu()
            got = forward(split.top(), FeatureInputs(), split.features(encoder, part, device), idx, device).float().cpu()
        return got.shape == want.shape and torch.allclose(got, want, rtol=1e-3, atol=1e-4)
    except Exception:
        return False


def plan(config: dict, model, encoder, modality: str, k: int, x, device) -> Split | None:
    """The cut for a trial training the top k body groups, or None when its inputs can change.

    Call after the model's trainable parameters are set for k.
    """
    if int(config.get("gradual_unfreeze_every") or 0) > 0:
        return None
    if modality == "image":
        if config["augment"] != "none" or config["mix"] != "none" or model.library != "timm":
            return None
    elif config["text_augment"] != "none" or model.library != "hf" or _hf_parts(model.body) is None:
        return None
    if k == 0:
        return Split(model)
    if modality == "image":
        probe = encoder.batch(x, np.arange(min(2, len(x)))).to(device)
        with _eval_mode(model.body) as body:
            chain = _timm_chain(body, probe)
        if chain is None:
            return None
        cut = next((i for i, m in enumerate(chain) if any(p.requires_grad for p in m.parameters())), len(chain))
        if cut == 0:
            return None
        split = TimmPrefix(model, chain, cut)
        with _eval_mode(model), torch.no_grad():
            per_row = int(np.prod(split._prefix(encoder, x, np.arange(1), device).shape[1:]))
        if not _fits(len(x), per_row):
            return None
    else:
        base = _hf_parts(model.body)[0]
        layers = _hf_layers(base)
        if layers is None:
            return None
        cut = next((i for i, m in enumerate(layers) if any(p.requires_grad for p in m.parameters())), len(layers))
        if cut in (0, len(layers)) or not _fits(len(x) * int(encoder.max_length), base.config.hidden_size):
            return None
        split = HFPrefix(model, layers, cut)
    return split if _verified(split, encoder, x, device) else None


def _content_hash(x) -> str:
    h = hashlib.sha1()
    if isinstance(x, np.ndarray):
        h.update(str(x.shape).encode())
        h.update(np.ascontiguousarray(x).data)
    else:
        for row in x:
            h.update(repr(row).encode("utf-8", "replace"))
    return h.hexdigest()


def cache_key(config: dict, spec, x, split: Split) -> str:
    parts = [repr(spec.to_dict()), str(config.get("image_size")), str(config.get("max_length")), split.tag,
             str(config.get("seed")) if not spec.pretrained or spec.library == "automl" else "",
             _content_hash(x)]
    if spec.library == "automl":
        parts.append(str(os.path.getmtime(os.path.join(spec.model, "model.safetensors"))))
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:24]


def _save(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{uuid.uuid4().hex[:6]}.tmp.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)  # atomic: concurrent trials never read half a file


def cached_features(split: Split, encoder, x, device, cache_dir: str | None, key: str):
    """The frozen part's output for x, from the disk cache when another trial already computed it."""
    path = Path(cache_dir) / f"{key}.npy" if cache_dir else None
    offsets_path = Path(cache_dir) / f"{key}.offsets.npy" if cache_dir else None
    if path is not None and path.exists():
        try:
            flat = torch.from_numpy(np.load(path, allow_pickle=False))
            if isinstance(split, HFPrefix):
                return Ragged(flat, torch.from_numpy(np.load(offsets_path, allow_pickle=False)))
            return flat
        except (OSError, ValueError):
            pass  # a torn or foreign file: recompute
    with _eval_mode(split.model):
        feats = split.features(encoder, x, device)
    if path is not None:
        if isinstance(feats, Ragged):
            _save(offsets_path, feats.offsets.numpy())  # before the data file, whose presence means "complete"
            _save(path, feats.flat.numpy())
        else:
            _save(path, feats.numpy())
    return feats
