"""Frozen-feature caching: same weights as recomputing the frozen body, and shared through disk."""
from __future__ import annotations

import pytest
import torch

from automl.data.intake import prepare
from automl.data.trial_data import TrialData
from automl.training.loop import build_model, fit, full_config


def _same_params(a, b, atol=1e-5):
    pa = dict(a.named_parameters())
    for n, p in b.named_parameters():
        assert torch.allclose(p, pa[n], atol=atol), n


@pytest.mark.parametrize("backbone", ["timm/resnet10t:scratch", "timm/mobilenetv3_small_050:scratch"])
def test_cached_and_uncached_head_training_agree(digits_trial_data, tmp_path, backbone):
    # Dropout in the head: the cut is checked in eval mode, and training on the cache uses the same dropout.
    cfg = {"backbone": backbone, "image_size": 16, "unfreeze": 0, "lr": 1e-2, "batch_size": 16, "dropout": 0.1}
    plain = fit(cfg, digits_trial_data, epochs=2)
    data = TrialData(**{**digits_trial_data.__dict__, "cache_dir": str(tmp_path)})
    cached = fit(cfg, data, epochs=2)
    _same_params(plain.model, cached.model)
    assert plain.history[-1]["val_accuracy"] == pytest.approx(cached.history[-1]["val_accuracy"])
    assert len(list(tmp_path.glob("*.npy"))) == 2  # train and validation features, written once
    again = fit(cfg, data, epochs=2)  # a second trial reads them back
    _same_params(plain.model, again.model)
    assert [h["feature_cache"] for h in (plain.history[-1], cached.history[-1], again.history[-1])] == \
        ["off", "head:computed", "head:hit"]


@pytest.mark.parametrize("backbone,k,size", [("timm/resnet10t:scratch", 1, 16),
                                             ("timm/mobilenetv3_small_050:scratch", 2, 16),
                                             ("timm/test_convnext:scratch", 2, 32)])
def test_frozen_prefix_cached_and_uncached_agree(digits_trial_data, tmp_path, backbone, k, size):
    # The trainable top holds BatchNorm/LayerNorm and drop-path: precise-BN and train mode must match too.
    cfg = {"backbone": backbone, "image_size": size, "unfreeze": k, "lr": 1e-2, "batch_size": 16, "drop_path": 0.1}
    plain = fit(cfg, digits_trial_data, epochs=2)
    cached = fit(cfg, TrialData(**{**digits_trial_data.__dict__, "cache_dir": str(tmp_path)}), epochs=2)
    _same_params(plain.model, cached.model, atol=1e-4)
    assert plain.history[-1]["val_accuracy"] == pytest.approx(cached.history[-1]["val_accuracy"])
    assert len(list(tmp_path.glob("*.npy"))) == 2
    assert cached.history[-1]["feature_cache"].startswith("timm") and cached.history[-1]["feature_cache"] != "timm0"


def _cache_counts() -> tuple[int, int]:
    from automl.training import featcache

    return featcache.STATS["hits"], featcache.STATS["misses"]


def test_not_cached_when_inputs_change_between_epochs(digits_trial_data, tmp_path):
    data = TrialData(**{**digits_trial_data.__dict__, "cache_dir": str(tmp_path)})
    base = {"backbone": "timm/resnet10t:scratch", "image_size": 16, "unfreeze": 0}
    before = _cache_counts()
    for extra in ({"augment": "crop"}, {"mix": "mixup"}, {"gradual_unfreeze_every": 1}, {"unfreeze": "all"}):
        r = fit({**base, **extra}, data, epochs=1)
        assert r.history[-1]["feature_cache"] == "off", extra  # trained on the images themselves
    assert _cache_counts() == before and not list(tmp_path.glob("*.npy"))  # never read nor computed a cache
    # The same trial on un-augmented inputs does use it: what the four above were refused is real.
    assert fit(base, data, epochs=1).history[-1]["feature_cache"] == "head:computed"
    assert _cache_counts() == (before[0], before[1] + 2) and len(list(tmp_path.glob("*.npy"))) == 2


def test_no_cut_where_forward_features_is_not_a_chain(digits_trial_data, tmp_path):
    # A ViT adds position embeddings between its children: the probe check must refuse the cut.
    cfg = {"backbone": "timm/test_vit:scratch", "image_size": 16, "unfreeze": 1, "batch_size": 16}
    data = TrialData(**{**digits_trial_data.__dict__, "cache_dir": str(tmp_path)})
    before = _cache_counts()
    r = fit(cfg, data, epochs=1)
    assert r.history[-1]["feature_cache"] == "off" and _cache_counts() == before
    assert not list(tmp_path.glob("*.npy"))
    # Refused, it trains as without a cache: the same weights as a run given none.
    _same_params(fit(cfg, digits_trial_data, epochs=1).model, r.model, atol=0)


def test_cached_text_head_matches_with_real_minilm(text_df, tmp_path, monkeypatch):
    # fp32 steps: on a CPU with AMX the plain path's frozen layers would run in bf16 (runtime.cpu_bf16) while the
    # cache holds their fp32 activations, and the two heads would differ by bf16 rounding, not by the cache.
    monkeypatch.setenv("AUTOML_CPU_BF16", "0")
    t = prepare(text_df)
    tr, va = t.splits["train"], t.splits["validation"]
    data = TrialData("text", t.num_classes, [t.texts[i] for i in tr], t.y[tr], [t.texts[i] for i in va], t.y[va])
    cfg = {"backbone": "minilm-l6", "unfreeze": 0, "max_length": 16, "lr": 1e-3, "batch_size": 16, "dropout": 0.1}
    plain = fit(cfg, data, epochs=1)
    cached = fit(cfg, TrialData(**{**data.__dict__, "cache_dir": str(tmp_path)}), epochs=1)
    _same_params(plain.model, cached.model, atol=1e-4)
    assert cached.history[-1]["feature_cache"] == "head:computed"
    # Frozen prefix: the top two encoder layers train on cached hidden states of the first four. With SGD, whose
    # update is proportional to the gradient: Adam's normalised steps blow float noise in near-zero gradients up to
    # ~1e-4 (seen with transformers 5.24), while SGD keeps the two paths ~1e-7 apart and training moves these
    # weights ~1e-2, so a wrong cut cannot hide under the tolerance.
    cfg2 = {**cfg, "unfreeze": 2, "optimizer": "sgd", "lr": 3e-2}
    plain2 = fit(cfg2, data, epochs=1)
    cache2 = tmp_path / "prefix"
    cached2 = fit(cfg2, TrialData(**{**data.__dict__, "cache_dir": str(cache2)}), epochs=1)
    _same_params(plain2.model, cached2.model, atol=1e-6)
    start = dict(build_model(full_config(cfg2), t.num_classes)[0].named_parameters())
    moved = max((p - start[n]).abs().max().item() for n, p in plain2.model.named_parameters() if ".layer.4." in n)
    assert moved > 1e-3, moved
    assert plain2.history[-1]["val_accuracy"] == pytest.approx(cached2.history[-1]["val_accuracy"])
    assert len(list(cache2.glob("*.offsets.npy"))) == 2
    assert cached2.history[-1]["feature_cache"] == "hf4:computed"
