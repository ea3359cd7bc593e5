"""LogME transferability scores rank informative features above uninformative ones."""
from __future__ import annotations

import numpy as np
import pytest

from automl.search.prerank import logme, rank_backbones, spearman


def test_logme_prefers_features_that_separate_the_labels(global_random_seed):
    rng = np.random.default_rng(global_random_seed)
    y = rng.integers(0, 3, 300)
    noise = rng.normal(0, 1, (300, 20))
    good = np.hstack([np.eye(3)[y] * 3 + rng.normal(0, 1, (300, 3)), noise])
    weak = np.hstack([np.eye(3)[y] * 0.5 + rng.normal(0, 1, (300, 3)), noise])
    bad = rng.normal(0, 1, (300, 23))
    scores = [logme(f, y) for f in (good, weak, bad)]
    assert scores[0] > scores[1] > scores[2]
    assert spearman(scores, [3, 2, 1]) == 1.0
    t = y.astype(float) + rng.normal(0, 0.1, 300)  # regression targets work too
    assert logme(good, t) > logme(bad, t)


def test_rank_backbones_scores_each_backbones_features_with_logme(digits_df, classifier_inputs):
    """Each score is LogME of that backbone's frozen features on the training rows, and ImageNet weights rank
    above the same kind of body trained from nothing."""
    from automl.data.intake import prepare
    from automl.data.images import stack_resized
    from automl.data.trial_data import TrialData
    from automl.training.loop import full_config

    t = prepare(digits_df)
    X = stack_resized(t.images, 32)
    x, y = X[t.splits["train"]], t.y[t.splits["train"]]  # fewer than PRERANK_ROWS: every row is scored
    data = TrialData("image", t.num_classes, x, y)
    names = ["timm/resnet10t:scratch", "timm/mobilenetv3_small_050:scratch", "efficientnet-lite0"]
    ranking = rank_backbones(names, data, full_config({"image_size": 32}))
    assert sorted(r["backbone"] for r in ranking) == sorted(names)
    for r in ranking:
        want = logme(classifier_inputs(r["backbone"], 32, x, t.num_classes), y)
        assert r["logme"] == pytest.approx(want, rel=1e-3, abs=1e-3), r
    assert ranking[0]["backbone"] == "efficientnet-lite0", ranking


def test_a_pretrained_backbone_gets_a_zero_head_and_a_2_class_task_starts_at_chance():
    """timm's EfficientNet init of a 2-class head gave logits in the tens on pretrained features."""
    import torch

    from automl import models

    torch.manual_seed(0)
    m = models.build("efficientnet-lite0", 2).eval()
    logits = m(torch.rand(4, 3, 48, 48) * 2 - 1)
    assert torch.equal(logits, torch.zeros(4, 2))
    scratch = models.build("timm/resnet10t:scratch", 2).eval()  # from scratch: timm's own init, untouched
    assert scratch(torch.rand(4, 3, 32, 32)).abs().sum() > 0
    full = models.build("efficientnet-lite0", 1000).eval()  # ImageNet's own head is kept when the classes match
    assert full.body.get_classifier().weight.abs().sum() > 0
