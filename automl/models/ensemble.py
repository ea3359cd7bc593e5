"""A probability ensemble of fine-tuned models as one module: what load(), ONNX and TorchScript serve.

Members may differ in architecture and in image preprocessing: the ensemble takes the input of its first
member (images normalised with its mean/std at its size, or token ids) and adapts it for each of the others
(re-normalise, resize). Text members share one tokenizer. The output is log(mean of the members'
probabilities), so softmax gives the averaged probabilities.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from automl.models.base import Family
from automl.models.registry import BackboneSpec, family, register_family


class EnsembleClassifier(nn.Module):
    family = "ensemble"

    def __init__(self, members: list[nn.Module], preprocessing: list[dict]):
        super().__init__()
        self.members = nn.ModuleList(members)
        first = preprocessing[0]
        # Per member: (scale, shift) turning the first member's normalised input into this member's, and its size.
        scales, shifts, sizes = [], [], []
        from automl import modalities

        for p in preprocessing:
            mapped = modalities.get(p["kind"]).ensemble_input(first, p)  # None: the members share the input
            if mapped is not None:
                scales.append(mapped[0])
                shifts.append(mapped[1])
                sizes.append(mapped[2])
        self.sizes = sizes
        for i, (a, b) in enumerate(zip(scales, shifts)):
            self.register_buffer(f"scale{i}", a, persistent=False)
            self.register_buffer(f"shift{i}", b, persistent=False)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        probs = []
        for i, m in enumerate(self.members):
            if attention_mask is not None:
                out = m(x, attention_mask)
            else:
                xi = x * getattr(self, f"scale{i}") + getattr(self, f"shift{i}")
                if xi.shape[-1] != self.sizes[i]:
                    xi = F.interpolate(xi, size=(self.sizes[i], self.sizes[i]), mode="bilinear", align_corners=False)
                out = m(xi)
            probs.append(torch.softmax(out.float(), dim=-1))
        return torch.log(torch.stack(probs).mean(0).clamp_min(1e-12))


def ensemble_spec(members) -> BackboneSpec:
    """The exported backbone entry of an ensemble: each member's own backbone, hyperparameters and preprocessing,
    from which `EnsembleFamily.rebuild` builds it again (members: training/combine.py's Member)."""
    return BackboneSpec("ensemble", "+".join(str(m.config["backbone"]) for m in members), False,
                        kwargs={"members": [{"backbone": family(m.spec).underlying(m.spec).to_dict(),
                                             "hyperparameters": m.config, "preprocessing": m.encoder.to_dict()}
                                            for m in members]})


class EnsembleFamily(Family):
    """Rebuilds an exported ensemble from the members' specs kept in its manifest's backbone entry."""

    library = "ensemble"

    def rebuild(self, export_dir, backbone: BackboneSpec, num_classes: int, hyperparameters: dict) -> nn.Module:
        members = []
        for m in backbone.kwargs["members"]:
            spec = BackboneSpec.from_dict(m["backbone"])
            members.append(family(spec).rebuild(export_dir, spec, num_classes, m["hyperparameters"]))
        return EnsembleClassifier(members, [m["preprocessing"] for m in backbone.kwargs["members"]])

    def save_extra(self, model, encoder, out_dir) -> None:
        first = model.members[0]
        family(first).save_extra(first, encoder, out_dir)

    def example_inputs(self, preprocessing: dict):
        from automl import modalities

        return family(BackboneSpec(modalities.get(preprocessing["kind"]).library, "")).example_inputs(preprocessing)


register_family(EnsembleFamily())
