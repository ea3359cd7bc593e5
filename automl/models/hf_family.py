"""Hugging Face transformers text encoders with our own pooled classification head.

The pooling is read from the checkpoint: a sentence-transformers model
(`1_Pooling/config.json`, e.g. all-MiniLM-L6-v2) was trained with mean
pooling, so mean pooling it is; any other checkpoint uses the first token.
The same pooling serves training, head-only feature caching, LogME and export.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from automl.data.encoders import TextEncoder
from automl.models.base import Family, Ragged, Split
from automl.models.registry import BackboneSpec, offline_hint, register_family

POOLING_FILE = "automl_pooling.json"


def read_pooling(model_dir: str) -> str:
    """'mean' for sentence-transformers checkpoints trained with mean pooling, else 'cls'."""
    d = Path(model_dir)
    for f in (d / POOLING_FILE, d / "1_Pooling" / "config.json"):
        if f.exists():
            cfg = json.loads(f.read_text())
            if "pooling" in cfg:
                return cfg["pooling"]
            return "mean" if cfg.get("pooling_mode_mean_tokens") else "cls"
    return "cls"


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    if how == "mean":  # sentence-transformers' definition: average of the unmasked token embeddings
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return hidden[:, 0]


class TextClassifier(nn.Module):
    """(input_ids, attention_mask) -> logits: a transformers encoder, pooling, dropout, a linear head."""

    family = "hf"

    def __init__(self, encoder: nn.Module, num_classes: int, pooling: str = "cls", dropout: float = 0.1):
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return pool(hidden, attention_mask, self.pooling)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.pooled(input_ids, attention_mask)))


def _layers(encoder: nn.Module) -> nn.ModuleList | None:
    lists = [m for m in encoder.modules() if isinstance(m, nn.ModuleList)]
    return max(lists, key=len) if lists else None


class _Head(Split):
    """Pooled output of the frozen encoder; dropout + head train on it."""

    def bottom(self, encoder, x, idx, device):
        ids, mask = encoder.batch(x, idx)
        return self.model.pooled(ids.to(device), mask.to(device))

    def apply_top(self, feats, mask=None, training: bool = True):
        return self.model.head(self.model.dropout(feats))


class _Stop(Exception):
    pass


class _Prefix(Split):
    """The hidden states entering the first trainable encoder layer (ragged: one row per token)."""

    def __init__(self, model: TextClassifier, layers: nn.ModuleList, cut: int):
        super().__init__(model)
        self.layers, self.cut, self.tag = layers, cut, f"hf{cut}"

    def features(self, encoder, x, device, batch_size: int = 128) -> Ragged:
        caught = []

        def grab(_module, args, kwargs):
            caught.append(args[0] if args else kwargs["hidden_states"])
            raise _Stop  # the layers above are not needed

        handle = self.layers[self.cut].register_forward_pre_hook(grab, with_kwargs=True)
        flat, lengths = [], []
        try:
            with torch.no_grad():
                for s in range(0, len(x), batch_size):
                    ids, mask = encoder.batch(x, np.arange(s, min(s + batch_size, len(x))))
                    try:
                        self.model.encoder(input_ids=ids.to(device), attention_mask=mask.to(device))
                    except _Stop:
                        pass
                    h = caught.pop().float().cpu()
                    for i, n in enumerate(mask.sum(1).tolist()):
                        flat.append(h[i, :n])
                        lengths.append(n)
        finally:
            handle.remove()
        offsets = torch.as_tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.long)
        return Ragged(torch.cat(flat), offsets)

    def apply_top(self, feats, mask=None, training: bool = True):
        from transformers.masking_utils import create_bidirectional_mask

        model = self.model
        mask4 = create_bidirectional_mask(config=model.encoder.config, inputs_embeds=feats, attention_mask=mask)
        for layer in self.layers[self.cut:]:
            out = layer(feats, mask4)
            feats = out[0] if isinstance(out, tuple) else out
        return model.head(model.dropout(pool(feats, mask, model.pooling)))


_TOKENIZERS: dict[str, object] = {}


def load_tokenizer(model_dir: str):
    """A tokenizer, loaded once per process (reused Ray actors run many trials)."""
    if model_dir not in _TOKENIZERS:
        from transformers import AutoTokenizer

        try:
            _TOKENIZERS[model_dir] = AutoTokenizer.from_pretrained(model_dir)
        except OSError as exc:
            raise offline_hint(BackboneSpec("hf", model_dir), exc) from exc
    return _TOKENIZERS[model_dir]


class HFFamily(Family):
    library = "hf"
    modality = "text"
    input_names = ("input_ids", "attention_mask")

    def build(self, spec, num_classes, *, dropout=0.0, drop_path=0.0, pretrained=None):
        from transformers import AutoConfig, AutoModel

        use_pretrained = spec.pretrained if pretrained is None else pretrained
        try:
            cfg = AutoConfig.from_pretrained(spec.model, **spec.kwargs)
            # The searched dropout applies inside the encoder too, so 0.0 really is no dropout.
            for attr in ("hidden_dropout_prob", "dropout"):
                if hasattr(cfg, attr) and isinstance(getattr(cfg, attr), float):
                    setattr(cfg, attr, float(dropout))
            if use_pretrained:
                encoder = AutoModel.from_pretrained(spec.model, config=cfg)
            else:
                encoder = AutoModel.from_config(cfg)
        except OSError as exc:
            raise offline_hint(spec, exc) from exc
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None  # we pool ourselves; an unused pooler would only carry dead weights
        return TextClassifier(encoder, num_classes, read_pooling(spec.model), float(dropout))

    def encoder(self, model, spec, config):
        return TextEncoder(load_tokenizer(spec.model), int(config["max_length"]))

    def layer_groups(self, model):
        layers = _layers(model.encoder)
        prefix = next(f"encoder.{n}." for n, m in model.encoder.named_modules() if m is layers)
        emb, per_layer, head = [], [[] for _ in range(len(layers))], []
        for n, _ in model.named_parameters():
            if n.startswith(prefix):
                per_layer[int(n[len(prefix):].split(".")[0])].append(n)
            elif n.startswith("encoder.") and "embed" in n:
                emb.append(n)
            else:
                head.append(n)
        return [g for g in [emb, *per_layer, head] if g]

    def split(self, model, k, encoder, x, device):
        if k == 0:
            return _Head(model)
        layers = _layers(model.encoder)
        cut = next((i for i, m in enumerate(layers) if any(p.requires_grad for p in m.parameters())), len(layers))
        return _Prefix(model, layers, cut) if 0 < cut < len(layers) else None

    def head(self, model):
        return model.head

    def set_head(self, model, linear):
        model.head = linear

    def save_extra(self, model, encoder, out_dir):
        # The architecture (config) and tokenizer, so the export rebuilds offline without the original checkpoint.
        hf = Path(out_dir) / "hf"
        hf.mkdir(exist_ok=True)
        model.encoder.config.save_pretrained(str(hf))
        encoder.tokenizer.save_pretrained(str(hf))
        (hf / POOLING_FILE).write_text(json.dumps({"pooling": model.pooling}))

    def rebuild(self, export_dir, backbone, num_classes, hyperparameters):
        spec = BackboneSpec("hf", os.path.join(str(export_dir), "hf"), pretrained=False)
        return self.build(spec, num_classes, dropout=float(hyperparameters.get("dropout") or 0.0), pretrained=False)

    def example_inputs(self, preprocessing):
        ids = torch.randint(5, 100, (2, 16), dtype=torch.long)  # ids every vocabulary has
        return ids, torch.ones_like(ids)


register_family(HFFamily())
