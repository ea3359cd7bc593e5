"""What every backbone family provides, and how a model is cut into a frozen bottom and a trainable top.

A family is a small adapter object (timm style: duck-typed hooks, no deep
base class). The training loop, the feature cache, pre-ranking, updates and
export call these hooks and never branch on the library.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from automl.models.registry import BackboneSpec


@contextmanager
def eval_mode(module: nn.Module):
    """Run a block in eval mode (no dropout, fixed BN statistics), then restore each submodule's mode."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


@dataclass
class Ragged:
    """Per-example activations of different lengths (text): rows of `flat` split at `offsets`."""

    flat: torch.Tensor      # (total tokens, hidden)
    offsets: torch.Tensor   # (n + 1,)

    def __len__(self) -> int:
        return len(self.offsets) - 1


class FeatureInputs:
    """Stands in for an encoder: a batch is a slice of cached activations."""

    def batch(self, x, idx: np.ndarray, augment=None, device=None):
        from automl.data.encoders import to_device

        if isinstance(x, Ragged):
            rows = [x.flat[x.offsets[i]:x.offsets[i + 1]] for i in idx]
            h = nn.utils.rnn.pad_sequence(rows, batch_first=True)
            lengths = torch.tensor([len(r) for r in rows])
            mask = (torch.arange(h.shape[1])[None, :] < lengths[:, None]).long()
            return to_device(h, device), to_device(mask, device)
        return to_device(x[torch.as_tensor(idx)], device)


class Split:
    """A model cut in two: `features` computes the frozen bottom, `apply_top` the trainable top on its output."""

    tag = "head"

    def __init__(self, model: nn.Module):
        self.model = model

    def features(self, encoder, x, device, batch_size: int = 128):
        from automl.data.encoders import in_order, inference_batches

        batches, inverse = inference_batches(x, batch_size)
        with torch.no_grad():
            return in_order([self.bottom(encoder, x, idx, device).float().cpu() for idx in batches], inverse)

    def bottom(self, encoder, x, idx: np.ndarray, device) -> torch.Tensor:
        raise NotImplementedError

    def apply_top(self, feats, mask=None, training: bool = True) -> torch.Tensor:
        raise NotImplementedError

    def top(self) -> nn.Module:
        return _Top(self)


class _Top(nn.Module):
    """The trainable top of a model as a module (shares the model's parameters)."""

    def __init__(self, split: Split):
        super().__init__()
        self.split = split
        self.model = split.model

    def forward(self, feats: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.split.apply_top(feats, mask, self.training)


class Family:
    """The hooks of one backbone family. Subclasses fill in what their models need."""

    library = ""
    modality = ""          # "image" or "text": the inputs its models take
    input_names: tuple[str, ...] = ()
    named = False          # backbone names '<library>/<rest>' resolve through parse()
    offline_fix = "download the weights once and point at a local copy"   # what to do when a hub is unreachable

    def parse(self, rest: str) -> BackboneSpec:
        """The spec a backbone name '<library>/<rest>' stands for."""
        return BackboneSpec(self.library, rest)

    def build(self, spec: BackboneSpec, num_classes: int, *, dropout: float = 0.0, drop_path: float = 0.0,
              pretrained: bool | None = None) -> nn.Module:
        """A model with a fresh `num_classes` head (pretrained body unless `pretrained` is False)."""
        raise NotImplementedError

    def warm(self) -> None:
        """Import the library a first build needs (a thread runs this while Ray starts: timm's import is ~2 s of a
        60 s budget on 2 cores, and the driver only waits for Ray's processes then)."""

    def encoder(self, model: nn.Module, spec: BackboneSpec, config: dict):
        """The preprocessing for this model under a trial's config (image size, max length)."""
        raise NotImplementedError

    def layer_groups(self, model: nn.Module) -> list[list[str]]:
        """Parameter names grouped bottom (stem/embeddings) -> top, the head group last."""
        raise NotImplementedError

    def split(self, model: nn.Module, k: int, encoder, x, device) -> Split | None:
        """The cut below the top k trainable body groups (k=0: the pooled features), or None."""
        return None

    def pooling(self, spec: BackboneSpec) -> tuple[str, str] | None:
        """(checkpoint, pooling) when the spec's features are one pooling of a checkpoint's outputs, so that the
        features of its other poolings come from the same forward pass (pooled_features); else None."""
        return None

    def pooled_features(self, model: nn.Module, encoder, x, device, poolings: list[str]) -> dict[str, torch.Tensor]:
        """The frozen body's features for every row of x, pooled each way in `poolings`, from one forward pass."""
        raise NotImplementedError

    def head(self, model: nn.Module) -> nn.Linear:
        raise NotImplementedError

    def set_head(self, model: nn.Module, linear: nn.Linear) -> None:
        raise NotImplementedError

    def grow_head(self, model: nn.Module, num_classes: int) -> nn.Module:
        """Append outputs to the head; existing rows (classes) keep their weights."""
        old = self.head(model)
        if old.out_features == num_classes:
            return model
        new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
        with torch.no_grad():
            new.weight[:old.out_features] = old.weight
            if old.bias is not None:
                new.bias[:old.out_features] = old.bias
        self.set_head(model, new)
        return model

    def underlying(self, spec: BackboneSpec) -> BackboneSpec:
        """The architecture a spec stands for (an export's own backbone for 'automl' specs)."""
        return spec

    def save_extra(self, model: nn.Module, encoder, out_dir) -> None:
        """Files an export needs beside model.safetensors to rebuild the architecture offline."""

    def rebuild(self, export_dir, backbone: BackboneSpec, num_classes: int, hyperparameters: dict) -> nn.Module:
        """The architecture of an export (random weights; model.safetensors is loaded into it)."""
        return self.build(backbone, num_classes, dropout=float(hyperparameters.get("dropout") or 0.0), pretrained=False)

    def example_inputs(self, preprocessing: dict) -> tuple[torch.Tensor, ...]:
        """A batch of 2 for tracing (TorchScript, ONNX): batch 1 gets specialised."""
        raise NotImplementedError
