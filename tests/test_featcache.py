"""Frozen-feature caching: same weights as recomputing the frozen body, and shared through disk."""
from __future__ import annotations

import pytest
import torch

from automl.data import prepare
from automl.train import TrialData, fit


def _same_params(a, b, atol=1e-5):
    pa = dict(a.named_parameters())
    for n, p in b.named_parameters():
        assert torch.allclose(p, pa[n], atol=atol), n


@pytest.mark.parametrize("backbone", ["timm/resnet10t:scratch", "timm/mobilenetv3_small_050:scratch"])
def test_cached_and_uncached_head_training_agree(digits_trial_data, tmp_path, backbone):
    cfg = {"backbone": backbone, "image_size": 16, "unfreeze": 0, "lr": 1e-2, "batch_size": 16}
    plain = fit(cfg, digits_trial_data, epochs=2)
    data = TrialData(**{**digits_trial_data.__dict__, "cache_dir": str(tmp_path)})
    cached = fit(cfg, data, epochs=2)
    _same_params(plain.model, cached.model)
    assert plain.history[-1]["val_accuracy"] == pytest.approx(cached.history[-1]["val_accuracy"])
    assert len(list(tmp_path.glob("*.npy"))) == 2  # train and validation features, written once
    again = fit(cfg, data, epochs=2)  # a second trial reads them back
    _same_params(plain.model, again.model)


def test_not_cached_when_inputs_change_between_epochs(digits_trial_data, tmp_path):
    data = TrialData(**{**digits_trial_data.__dict__, "cache_dir": str(tmp_path)})
    for extra in ({"augment": "crop"}, {"unfreeze": 1}, {"gradual_unfreeze_every": 1}):
        fit({"backbone": "timm/resnet10t:scratch", "image_size": 16, "unfreeze": 0, **extra}, data, epochs=1)
    assert not list(tmp_path.glob("*.npy"))


def test_cached_text_head_matches_with_real_minilm(text_df, tmp_path):
    t = prepare(text_df)
    tr, va = t.splits["train"], t.splits["validation"]
    data = TrialData("text", t.num_classes, [t.texts[i] for i in tr], t.y[tr], [t.texts[i] for i in va], t.y[va])
    cfg = {"backbone": "minilm-l6", "unfreeze": 0, "max_length": 16, "lr": 1e-3, "batch_size": 16, "dropout": 0.1}
    plain = fit(cfg, data, epochs=1)
    cached = fit(cfg, TrialData(**{**data.__dict__, "cache_dir": str(tmp_path)}), epochs=1)
    _same_params(plain.model, cached.model, atol=1e-4)
