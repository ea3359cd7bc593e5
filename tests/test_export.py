"""Export atomicity and the promotion policy of model updates (fast, no search)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from automl import ModelLoadError, load, models
from automl.data.encoders import ImageEncoder
from automl.diagnostics.update import decide
from automl.export.manifest import ExportManifest, Preprocessing
from automl.export.writer import write_export

ENC = ImageEncoder(16, [0.5] * 3, [0.5] * 3)


def _manifest(classes=("a", "b", "c")) -> ExportManifest:
    return ExportManifest(task="multiclass", modality="image", classes=list(classes), label_column="label",
                          input_columns=["image"], metric="accuracy",
                          backbone=models.BackboneSpec("timm", "resnet10t", pretrained=False),
                          preprocessing=Preprocessing("image", size=16, mean=[0.5] * 3, std=[0.5] * 3, storage_size=16),
                          hyperparameters={"dropout": 0.0})


def _model():
    torch.manual_seed(0)
    return models.build("timm/resnet10t:scratch", 3)


def test_export_round_trip_predicts_identically(tmp_path):
    m = _model().eval()
    write_export(tmp_path / "exp", m, ENC, _manifest(), formats=False)
    again = load(tmp_path / "exp")
    x = torch.randn(4, 3, 16, 16)
    assert torch.allclose(m(x), again.model(x), atol=1e-6)


def test_crash_during_export_leaves_previous_export_intact(tmp_path):
    target = tmp_path / "exp"
    write_export(target, _model(), ENC, _manifest(), formats=False)
    before = json.loads((target / "config.json").read_text())

    def crash(d, meta):
        raise KeyboardInterrupt("killed mid-export")

    with pytest.raises(KeyboardInterrupt):
        write_export(target, _model(), ENC, _manifest(["x", "y", "z"]), formats=False, writers=[crash])
    assert json.loads((target / "config.json").read_text()) == before
    assert load(target).classes == ["a", "b", "c"]
    assert [p for p in os.listdir(tmp_path) if p != "exp"] == []  # no temp dirs left behind


def test_half_written_export_is_refused(tmp_path):
    target = tmp_path / "exp"
    write_export(target, _model(), ENC, _manifest(), formats=False)
    with open(target / "model.safetensors", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ModelLoadError, match="incomplete"):
        load(target)
    (target / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="config.json is missing"):
        load(target)


@pytest.mark.parametrize("backbone, refused", [
    ({"library": "automl", "model": "SELF"}, "backbone library 'automl'"),          # itself: endless recursion
    ({"library": "timm", "model": "resnet10t", "kwargs": {"checkpoint_path": "SECRET"}}, "checkpoint_path"),
    ({"library": "ensemble", "model": "a+b", "kwargs": {"members": [
        {"backbone": {"library": "automl", "model": "SELF"}, "hyperparameters": {}, "preprocessing": {}}]}},
     "ensemble member of library 'automl'"),
])
def test_an_export_whose_config_names_other_files_is_refused_before_anything_is_read(tmp_path, backbone, refused):
    """Loading an export reads its own files only: a config.json edited to point at another export (or itself) or
    to make timm read a checkpoint is refused with the reason (before: endless recursion, or timm loading it)."""
    target = tmp_path / "exp"
    write_export(target, _model(), ENC, _manifest(), formats=False)
    secret = tmp_path / "secret.pth"
    secret.write_bytes(b"not a checkpoint")
    cfg = json.loads((target / "config.json").read_text())
    text = json.dumps(backbone).replace("SELF", str(target)).replace("SECRET", str(secret))
    cfg["backbone"] = {**cfg["backbone"], "pretrained": False, **json.loads(text)}
    (target / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="not a loadable automl export") as err:
        load(target)
    assert refused in str(err.value)


def test_export_as_backbone_keeps_old_head_rows_and_appends_classes(tmp_path):
    m = _model()
    write_export(tmp_path / "exp", m, ENC, _manifest(), formats=False)
    grown = models.build(f"automl:{tmp_path / 'exp'}", 5)
    old_w, new_w = m.body.get_classifier().weight, grown.body.get_classifier().weight
    assert new_w.shape[0] == 5 and torch.equal(new_w[:3], old_w)
    assert torch.equal(dict(grown.named_parameters())["body.conv1.0.weight"], dict(m.named_parameters())["body.conv1.0.weight"])


@pytest.mark.parametrize("new_new, base_new, new_old, base_old, expected, why", [
    (0.90, 0.80, 0.85, 0.85, "champion",      # better on new data, no forgetting
     "test score 0.9000 beats the current model's 0.8000 and stays within tolerance on the old test split"),
    (0.90, 0.80, 0.70, 0.85, "challenger",    # better on new data but forgets the old
     "forgets: score drops by 0.1500 on the base model's test split, more than the tolerance 0.01"),
    (0.80, 0.80, 0.90, 0.85, "challenger",    # not better on the new data
     "test score 0.8000 does not beat the current model's 0.8000"),
    (0.90, 0.80, 0.845, 0.85, "champion",     # a drop within the tolerance
     "test score 0.9000 beats the current model's 0.8000 and stays within tolerance on the old test split "
     "(change -0.0050, tolerance 0.01)"),
])
def test_promotion_policy(new_new, base_new, new_old, base_old, expected, why):
    decision, reason = decide(new_new, base_new, forgetting=base_old - new_old, tolerance=0.01)
    assert decision == expected and reason.startswith(why), reason


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
    assert score(AlwaysFirst(), enc, ["a", "b"], x, labels, "accuracy", "image") == pytest.approx(0.5)
    # macro-F1 over a, b and the unknown class: a = 2/3, b = 0, unknown = 0 (never predicted)
    assert score(AlwaysFirst(), enc, ["a", "b"], x, labels, "f1_macro", "image") == pytest.approx(2 / 9)


def test_schema_1_exports_still_load_and_predict_as_they_did(tmp_path):
    """Exports written before the typed manifest (schema 1, fixtures made by that code) load and predict the same."""
    from pathlib import Path

    import numpy as np
    import pandas as pd
    from sklearn.datasets import load_digits

    fixtures = Path(__file__).parent / "fixtures"
    expected = json.loads((fixtures / "v1_expected.json").read_text())
    img = load(fixtures / "v1_image_export")
    # Read into today's layout (so written back it is not converted twice), its provenance carried over.
    assert json.loads((fixtures / "v1_image_export" / "config.json").read_text()).get("schema_version", 1) == 1
    assert img.manifest.schema_version == 2 and img.manifest.provenance.fingerprint
    d = load_digits()
    got = img.predict_proba(pd.DataFrame({"image": [d.images[i] for i in expected["image_rows"]]}))
    # Recorded on an Intel CPU; an AMD EPYC's float32 kernels differ by up to 1e-5 (2026-12-04). A wrong
    # preprocessing or head moves these probabilities by far more.
    np.testing.assert_allclose(got.to_numpy(), expected["image_proba"], atol=1e-4)
    txt = load(fixtures / "v1_text_export")
    got = txt.predict_proba(pd.DataFrame({"text": expected["texts"]}))
    np.testing.assert_allclose(got.to_numpy(), expected["text_proba"], atol=1e-6)
    assert txt.classes == expected["text_classes"]


def test_an_image_ensemble_adapts_its_input_for_each_member_and_loads_back_predicting_the_same(tmp_path):
    """Members with other sizes and normalisations: the ensemble turns the first member's normalised input into each
    member's (the image adapter's ensemble_input), averages their probabilities, and loads back from its export."""
    import dataclasses

    import torch.nn.functional as F

    from automl.models.ensemble import EnsembleClassifier

    torch.manual_seed(0)
    names = ("timm/resnet10t:scratch", "timm/mobilenetv3_small_050:scratch")
    members = [models.build(n, 3).eval() for n in names]
    pre = [{"kind": "image", "size": 16, "mean": [0.5] * 3, "std": [0.5] * 3},
           {"kind": "image", "size": 24, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}]
    ens = EnsembleClassifier(members, pre).eval()
    x = torch.randn(4, 3, 16, 16)  # normalised as the first member wants it
    raw = x * 0.5 + 0.5
    second = (raw - torch.tensor(pre[1]["mean"]).view(1, 3, 1, 1)) / torch.tensor(pre[1]["std"]).view(1, 3, 1, 1)
    second = F.interpolate(second, size=(24, 24), mode="bilinear", align_corners=False)
    with torch.no_grad():
        expected = torch.log((torch.softmax(members[0](x), -1) + torch.softmax(members[1](second), -1)) / 2)
        assert torch.allclose(ens(x), expected, atol=1e-5)
    spec = models.BackboneSpec("ensemble", "+".join(names), False, kwargs={"members": [
        {"backbone": models.resolve(n).to_dict(), "hyperparameters": {}, "preprocessing": p} for n, p in zip(names, pre)]})
    write_export(tmp_path / "ens", ens, ENC, dataclasses.replace(_manifest(), backbone=spec), formats=False)
    with torch.no_grad():
        assert torch.allclose(load(tmp_path / "ens").model(x), expected, atol=1e-5)
