"""The plain training function, without Ray: unfreezing, schedules, augmentations, weights."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from automl import models

from automl.training import schedules
from automl.training import augment as aug
from automl.data.intake import prepare
from automl.data.trial_data import TrialData
from automl.training.loop import fit, full_config, make_optimizer, n_trainable_groups, set_trainable


def test_fit_runs_without_ray_and_learns(digits_trial_data):
    seen = []
    cfg = {"backbone": "timm/resnet10t:scratch", "image_size": 16, "lr": 3e-3, "schedule": "cosine", "augment": "crop"}
    res = fit(cfg, digits_trial_data, epochs=4, report=lambda m, state: seen.append((m, state())))
    assert [m["epoch"] for m, _ in seen] == [1, 2, 3, 4]
    assert seen[-1][0]["val_accuracy"] > 0.5  # 4 balanced classes: chance is 0.25
    assert seen[-1][0]["train_loss"] < seen[0][0]["train_loss"]
    assert set(seen[-1][1]) >= {"model", "optimizer", "scheduler", "epoch"}
    assert not res.model.training


def test_resume_from_state_continues_identically(digits_trial_data):
    cfg = {"backbone": "timm/mobilenetv3_small_050:scratch", "image_size": 16, "lr": 1e-2, "batch_size": 64}
    states = []
    full = fit(cfg, digits_trial_data, epochs=2, report=lambda m, s: states.append(s()))
    resumed = fit(cfg, digits_trial_data, epochs=2, resume=states[0])
    a = dict(full.model.named_parameters())
    for n, p in resumed.model.named_parameters():
        assert torch.allclose(p, a[n], atol=1e-5), n


@pytest.mark.parametrize("name", ["timm/resnet10t:scratch", "timm/mobilenetv3_small_050:scratch"])
def test_unfreeze_k_trains_head_plus_top_k_groups(name):
    model = models.build(name, 3)
    groups = models.family(model).layer_groups(model)
    head = set(groups[-1])
    assert head == {n for n, _ in model.named_parameters() if "fc" in n or "classifier" in n}
    for k in range(len(groups)):
        set_trainable(model, groups, k)
        expected = sum(len(g) for g in groups[len(groups) - 1 - k:])
        assert sum(p.requires_grad for p in model.parameters()) == expected


def test_text_groups_are_embeddings_layers_then_head(minilm_dir):
    model = models.build(models.BackboneSpec("hf", minilm_dir), 2)
    groups = models.family(model).layer_groups(model)
    assert len(groups) == 8  # embeddings, 6 encoder layers, the head
    assert all("embeddings" in n for n in groups[0]) and groups[-1] == ["head.weight", "head.bias"]
    set_trainable(model, groups, 0)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(groups[-1])


def test_gradual_unfreezing_adds_a_group_every_n_epochs():
    cfg = full_config({"unfreeze": 1, "gradual_unfreeze_every": 2})
    assert [n_trainable_groups(cfg, 5, e) for e in range(8)] == [1, 1, 2, 2, 3, 3, 4, 4]
    assert n_trainable_groups(full_config({"unfreeze": "all"}), 5, 0) == 5


def test_layer_decay_lowers_lr_towards_the_input():
    model = models.build("timm/resnet10t:scratch", 3)
    groups = models.family(model).layer_groups(model)
    opt = make_optimizer(model, groups, full_config({"lr": 1.0, "layer_decay": 0.5}))
    lrs = sorted({g["lr"] for g in opt.param_groups})
    assert lrs == [0.5 ** i for i in range(len(groups) - 1, -1, -1)]
    assert all(g["weight_decay"] == 0.0 for g in opt.param_groups if all(p.ndim <= 1 for p in g["params"]))


@pytest.mark.parametrize("name", schedules.list_schedules())
def test_each_schedule_has_its_shape(name):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = schedules.create(name, opt, 100, 0.1, {})
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    peak = int(np.argmax(lrs))
    if name == "constant":
        assert lrs[0] < lrs[5] < lrs[10] == lrs[-1] == 1.0
    else:
        assert lrs[0] < lrs[peak] and lrs[-1] < lrs[peak] * 0.5 and 3 <= peak <= 15
    if name == "step":
        assert len(set(np.round(lrs[20:], 6))) == 3  # three flat steps after warmup
    if name == "cosine_restarts":
        assert any(lrs[i + 1] > lrs[i] * 2 for i in range(20, 99))  # a restart jumps back up


@pytest.mark.parametrize("name", [p for p in aug.list_image_policies() if p != "none"])
def test_image_policies_change_images_and_keep_shape(name):
    torch.manual_seed(0)
    x = torch.randint(0, 255, (3, 24, 24), dtype=torch.uint8)
    t = aug.image_transform(name, 16)
    outs = [t(x) for _ in range(4)]
    assert all(o.shape == (3, 16, 16) and o.dtype == torch.uint8 for o in outs)
    plain = torch.nn.functional.interpolate(x[None].float(), size=(16, 16), mode="bilinear", antialias=True)[0]
    assert any((o.float() - plain).abs().mean() > 1.0 for o in outs)
    assert aug.image_transform("none", 16) is None


@pytest.mark.parametrize("name", [p for p in aug.list_text_policies() if p != "none"])
def test_text_policies_change_tokens_but_keep_special_tokens(name):
    import random

    random.seed(0)
    ids = [101] + list(range(1000, 1030)) + [102]
    t = aug.text_transform(name, 0.3, 103)
    out = t(ids)
    assert out != ids and out[0] == 101 and out[-1] == 102


def test_text_trial_with_real_minilm(text_df):
    t = prepare(text_df)
    tr, va = t.splits["train"], t.splits["validation"]
    data = TrialData("text", t.num_classes, [t.texts[i] for i in tr], t.y[tr], [t.texts[i] for i in va], t.y[va])
    cfg = {"backbone": "minilm-l6", "lr": 2e-4, "unfreeze": 2, "max_length": 16, "batch_size": 16,
           "schedule": "constant", "text_augment": "mask", "text_aug_rate": 0.1}
    hist = fit(cfg, data, epochs=3).history
    assert hist[-1]["val_accuracy"] > 0.6 and hist[-1]["trainable_groups"] == 2


def test_local_weight_file_is_used_as_pretrained_source(tmp_path):
    """The pretrained path: body weights come from the file, the head is re-initialised for the new labels."""
    from safetensors.torch import save_file

    import timm

    src = timm.create_model("resnet10t", pretrained=False, num_classes=7)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    spec = models.BackboneSpec("timm", "resnet10t", pretrained=True, weights=str(tmp_path / "w.safetensors"))
    model = models.build(spec, 3)
    body = model.body.state_dict()
    assert torch.equal(body["conv1.0.weight"], src.state_dict()["conv1.0.weight"])
    assert body["fc.weight"].shape == (3, 512)
    same = models.build(f"timm/resnet10t@{tmp_path / 'w.safetensors'}", 3)  # the YAML form
    assert torch.equal(same.body.state_dict()["conv1.0.weight"], src.state_dict()["conv1.0.weight"])


def test_unreachable_hub_fails_fast_with_a_fix():
    import time

    from automl.errors import ModelLoadError

    t0 = time.time()
    with pytest.raises(ModelLoadError, match="weights="):
        models.build("timm/resnet18.a1_in1k", 3)
    with pytest.raises(ModelLoadError, match="local dir"):
        models.build("hf/some-org/not-downloaded-model", 3)
    assert time.time() - t0 < 30
    with pytest.raises(ModelLoadError, match="Unknown backbone"):
        models.resolve("resnet18")


@pytest.mark.parametrize("name", schedules.list_schedules())
@pytest.mark.parametrize("warmup_frac", [0.0, 0.2])
def test_every_schedule_survives_a_handful_of_steps(name, warmup_frac):
    # Few-shot data: 50 images at batch 64 is one step per epoch, so a 6-epoch trial has 6 steps in all.
    for total in range(1, 9):
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=1.0)
        sched = schedules.create(name, opt, total, warmup_frac, {})
        lrs = []
        for _ in range(total):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        assert all(np.isfinite(lrs)) and max(lrs) > 0, (name, total, lrs)


def test_a_report_is_a_fixed_number_of_rows_not_a_pass(digits_trial_data):
    cfg = {"backbone": "timm/resnet10t:scratch", "image_size": 16, "batch_size": 32, "unfreeze": 0}
    n = len(digits_trial_data.y_train)
    one = fit(cfg, digits_trial_data, epochs=2).history  # no report_rows: one pass per report
    three = fit({**cfg, "report_rows": 3 * n}, digits_trial_data, epochs=2).history
    half = fit({**cfg, "report_rows": 64}, digits_trial_data, epochs=2).history  # below a pass
    assert [h["steps"] for h in one] == [math.ceil(n / 32), 2 * math.ceil(n / 32)]
    assert [h["steps"] for h in three] == [math.ceil(3 * n / 32), 2 * math.ceil(3 * n / 32)]
    assert [h["steps"] for h in half] == [2, 4] and half[-1]["epochs_seen"] == pytest.approx(128 / n)


def test_batches_stream_through_shuffled_passes_and_ranks_get_equal_shards():
    from automl.training.loop import Batches, shard_of

    b = Batches(np.arange(10), 4, seed=0)
    first_pass = np.concatenate([b(0), b(1)])[:10] if False else np.concatenate([b(0), b(1), b(2)])[:10]
    assert sorted(first_pass.tolist()) == list(range(10))  # every row once per pass
    assert np.array_equal(Batches(np.arange(10), 4, seed=0)(5), b(5))  # a resumed run draws the same batch
    shards = [shard_of(11, r, 3) for r in range(3)]
    assert {len(s) for s in shards} == {4} and set(np.concatenate(shards)) == set(range(11))
