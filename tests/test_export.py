"""Export atomicity and the promotion policy of model updates (fast, no search)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from automl import ModelLoadError, load

from automl.models import registry as backbones
from automl.export.writer import write_export
from automl.diagnostics.update import decide


def _meta():
    return {"task": "multiclass", "modality": "image", "classes": ["a", "b", "c"], "num_classes": 3,
            "label_column": "label", "input_columns": ["image"], "metric": "accuracy",
            "backbone": {"library": "timm", "model": "resnet10t", "pretrained": False, "weights": None, "kwargs": {}},
            "preprocessing": {"kind": "image", "size": 16, "mean": [0.5] * 3, "std": [0.5] * 3, "storage_size": 16},
            "hyperparameters": {"dropout": 0.0}}


def _model():
    torch.manual_seed(0)
    return backbones.build(backbones.resolve("timm/resnet10t:scratch"), 3)


def test_export_round_trip_predicts_identically(tmp_path):
    m = _model().eval()
    write_export(tmp_path / "exp", m, _meta(), formats=False)
    again = load(tmp_path / "exp")
    x = torch.randn(4, 3, 16, 16)
    assert torch.allclose(m(x), again.model(x), atol=1e-6)


def test_crash_during_export_leaves_previous_export_intact(tmp_path):
    target = tmp_path / "exp"
    write_export(target, _model(), _meta(), formats=False)
    before = json.loads((target / "config.json").read_text())

    def crash(d, meta):
        raise KeyboardInterrupt("killed mid-export")

    with pytest.raises(KeyboardInterrupt):
        write_export(target, _model(), {**_meta(), "classes": ["x", "y", "z"]}, formats=False, writers=[crash])
    assert json.loads((target / "config.json").read_text()) == before
    assert load(target).classes == ["a", "b", "c"]
    assert [p for p in os.listdir(tmp_path) if p != "exp"] == []  # no temp dirs left behind


def test_half_written_export_is_refused(tmp_path):
    target = tmp_path / "exp"
    write_export(target, _model(), _meta(), formats=False)
    with open(target / "model.safetensors", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ModelLoadError, match="incomplete"):
        load(target)
    (target / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="config.json is missing"):
        load(target)


def test_export_as_backbone_keeps_old_head_rows_and_appends_classes(tmp_path):
    m = _model()
    write_export(tmp_path / "exp", m, _meta(), formats=False)
    grown = backbones.build(backbones.resolve(f"automl:{tmp_path / 'exp'}"), 5)
    old_w, new_w = m.body.get_classifier().weight, grown.body.get_classifier().weight
    assert new_w.shape[0] == 5 and torch.equal(new_w[:3], old_w)
    assert torch.equal(dict(grown.named_parameters())["body.conv1.0.weight"], dict(m.named_parameters())["body.conv1.0.weight"])


@pytest.mark.parametrize("new_new, base_new, new_old, base_old, expected", [
    (0.90, 0.80, 0.85, 0.85, "champion"),     # better on new data, no forgetting
    (0.90, 0.80, 0.70, 0.85, "challenger"),   # better on new data but forgets the old
    (0.80, 0.80, 0.90, 0.85, "challenger"),   # not better on the new data
    (0.90, 0.80, 0.845, 0.85, "champion"),    # a drop within the tolerance
])
def test_promotion_policy(new_new, base_new, new_old, base_old, expected):
    decision, reason = decide(new_new, base_new, new_old, base_old, tolerance=0.01)
    assert decision == expected and reason


def test_update_scores_count_labels_the_model_does_not_know_as_misses():
    import numpy as np

    from automl.data.encoders import ImageEncoder
    from automl.diagnostics.update import score

    class AlwaysFirst(torch.nn.Module):
        def forward(self, x):
            return torch.tensor([[5.0, 0.0]]).repeat(len(x), 1)

    x = np.zeros((4, 3, 8, 8), dtype=np.uint8)
    enc = ImageEncoder(8, [0.5] * 3, [0.5] * 3)
    labels = ["a", "a", "z", "z"]  # "z" is a class this model was never trained on
    assert score(AlwaysFirst(), enc, ["a", "b"], x, labels, "accuracy", True) == pytest.approx(0.5)
    # macro-F1 over a, b and the unknown class: a = 2/3, b = 0, unknown = 0 (never predicted)
    assert score(AlwaysFirst(), enc, ["a", "b"], x, labels, "f1_macro", True) == pytest.approx(2 / 9)
