"""Schema-1 text exports: a transformers sequence classifier saved whole under hf/ (before pooled heads)."""
from __future__ import annotations

import os

import torch
from torch import nn


class LegacySequenceClassifier(nn.Module):
    """(input_ids, attention_mask) -> logits of a transformers *ForSequenceClassification model."""

    family = "hf-legacy"

    def __init__(self, hf_dir: str):
        super().__init__()
        from transformers import AutoConfig, AutoModelForSequenceClassification

        self.body = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(hf_dir))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.body(input_ids=input_ids, attention_mask=attention_mask).logits


def rebuild(export_dir) -> LegacySequenceClassifier:
    return LegacySequenceClassifier(os.path.join(str(export_dir), "hf"))
