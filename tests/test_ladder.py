"""Rung 0 of the search ladder (search/ladder.py): heads on frozen features, LP-FT starts, the promoted backbone."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from automl.data.images import stack_resized
from automl.search import ladder
from automl.training.featcache import body_features
from automl.training.loop import build_encoder, build_model, encode_inputs, evaluate, fit, full_config, load_best

SIZE = 48


@pytest.fixture(autouse=True)
def _on_the_cpu(monkeypatch):
    """The references here (scikit-learn fits, a backbone's forward pass) are computed on the CPU, so the ladder runs
    there too: on a GPU its features come from bf16 autocast and differ from them by rounding (seen on an H200:
    probabilities 0.02 apart, one validation row flipped), which is not what these tests are about."""
    monkeypatch.setenv("AUTOML_DEVICE", "cpu")


@pytest.fixture(scope="module")
def digits48(digits_df):
    """digits_df prepared and split, at the pretrained backbones' smallest size."""
    from automl.data.intake import prepare

    t = prepare(digits_df)
    x = stack_resized(t.images, SIZE)
    tr, va = t.splits["train"], t.splits["validation"]
    return x[tr], t.y[tr], x[va], t.y[va], t.num_classes


def _config(backbone: str = "efficientnet-lite0") -> dict:
    return full_config({"backbone": backbone, "image_size": SIZE, "unfreeze": 0, "batch_size": 32, "seed": 0})


def _features(backbone, x, num_classes):
    cfg = _config(backbone)
    model, spec = build_model(cfg, num_classes)
    enc = build_encoder(cfg, model, spec)
    return body_features(model.eval(), enc, encode_inputs(enc, x), torch.device("cpu")).numpy()


def test_rung0_heads_equal_a_scikit_learn_fit_on_the_same_features_and_the_kept_model_predicts_them(
        digits48, tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    xt, yt, xv, yv, k = digits48
    r = ladder.probe(["efficientnet-lite0"], _config(), xt, yt, xv, yv, num_classes=k, metric="accuracy",
                     allowance_s=None, out_dir=tmp_path)
    p = r.best
    ft, fv = _features("efficientnet-lite0", xt, k), _features("efficientnet-lite0", xv, k)
    scaler = StandardScaler().fit(ft)
    sk = LogisticRegression(C=p.C, max_iter=300).fit(scaler.transform(ft), yt)
    want = sk.predict_proba(scaler.transform(fv))
    np.testing.assert_allclose(p.val_proba, want, atol=2e-3)
    # The head kept for export and LP-FT is the same function: the backbone with it predicts sklearn's probabilities.
    model, spec = load_best(_config(), k, p.head_file)
    enc = build_encoder(_config(), model, spec)
    got = evaluate(model, enc, xv, yv, k, torch.device("cpu"), keep_scores=True)["scores"]
    np.testing.assert_allclose(got, want, atol=2e-3)
    # One row per head fitted, each with the backbone, its rung and its validation score.
    assert len(r.rows) == len(ladder.C_GRID) and {row["rung"] for row in r.rows} == {0}
    assert max(row["best_val_accuracy"] for row in r.rows) == pytest.approx(p.val_score)


def test_a_fine_tune_started_from_its_probe_starts_at_the_probe_score(digits48, tmp_path):
    from automl.data.trial_data import TrialData
    from safetensors.torch import load_file

    xt, yt, xv, yv, k = digits48
    r = ladder.probe(["efficientnet-lite0"], _config(), xt, yt, xv, yv, num_classes=k, metric="accuracy",
                     allowance_s=None, out_dir=tmp_path)
    data = TrialData("image", k, xt, yt, xv, yv)
    # lr 0: one report changes no weight, so the report scores the starting model itself.
    cfg = {**_config(), "lr": 0.0, "report_rows": 32, "dropout": 0.0}
    scores = {}
    for start in ("probe", "zero head"):
        init = load_file(r.best.head_file) if start == "probe" else None
        out = fit(cfg, data, epochs=1, initial_state=init)
        scores[start] = out.history[0]["val_accuracy"]
    assert scores["probe"] == pytest.approx(r.best.val_score, abs=1e-9)
    assert scores["zero head"] < scores["probe"] - 0.3  # a zero head predicts one class


def test_the_ladder_promotes_the_backbone_whose_features_separate_the_classes(digits48, tmp_path):
    """Planted: a copy of EfficientNet-Lite0 whose last conv is zeroed (constant features) is the space's start
    backbone; rung 0 scores it at chance, promotes the real one and moves the start point to it."""
    from safetensors.torch import load_file, save_file

    from automl.models import efficientnet_lite, register_backbone
    from automl.models.registry import BackboneSpec, _ALIASES
    from automl.training.combine import ALPHA

    state = load_file(efficientnet_lite.weights_file(0))
    state = {n: (torch.zeros_like(v) if n.startswith("conv_head") else v) for n, v in state.items()}
    blind = tmp_path / "blind.safetensors"
    save_file(state, str(blind))
    register_backbone("planted-blind")(lambda: BackboneSpec("timm", "tf_efficientnet_lite0", weights=str(blind),
                                                              data_config={"mean": [0.5] * 3, "std": [0.5] * 3}))
    try:
        xt, yt, xv, yv, k = digits48
        r = ladder.probe(["planted-blind", "efficientnet-lite0"], _config(), xt, yt, xv, yv, num_classes=k,
                         metric="accuracy", allowance_s=None, out_dir=tmp_path)
        scores = {p.backbone: p.val_score for p in r.probes}
        assert scores["planted-blind"] <= 1.5 / k and scores["efficientnet-lite0"] >= 0.8
        chosen, why = ladder.choose_start(r, "planted-blind", yv, "accuracy", k, ALPHA)
        assert chosen == "efficientnet-lite0" and "beat planted-blind" in why
        assert ladder.promoted(r, chosen, k=1) == ["efficientnet-lite0"]
    finally:
        _ALIASES.pop("planted-blind", None)


def test_the_start_point_is_priced_by_counted_flops_not_by_a_timing_of_a_few_rows(digits48, tmp_path):
    """A probe that wins beyond noise is taken as the start backbone when its counted FLOPs are within
    MAX_COST_RATIO of the reference's, however slow a busy machine timed its rows; a dearer one is not taken."""
    import dataclasses

    from automl.training.combine import ALPHA

    xt, yt, xv, yv, k = digits48
    r = ladder.probe(["efficientnet-lite0", "efficientnet-lite2"], _config(), xt, yt, xv, yv, num_classes=k,
                     metric="accuracy", allowance_s=None, out_dir=tmp_path)
    by = {p.backbone: p for p in r.probes}
    lite0, lite2 = by["efficientnet-lite0"], by["efficientnet-lite2"]
    assert lite2.row_flops > 1.2 * lite0.row_flops > 0  # lite2 is deeper and wider at the same input size
    chance = np.full_like(lite0.val_proba, 1.0 / k)
    ref = dataclasses.replace(lite0, backbone="ref", val_score=1.0 / k, val_proba=chance)
    timed_slow = dataclasses.replace(lite0, row_s=10 * lite0.row_s)  # same network, timed 10x slower
    chosen, why = ladder.choose_start(ladder.Rung0([timed_slow, ref]), "ref", yv, "accuracy", k, ALPHA)
    assert chosen == "efficientnet-lite0" and "beat ref" in why
    cheap_ref = dataclasses.replace(ref, row_flops=lite2.row_flops / (ladder.MAX_COST_RATIO + 0.5))
    chosen, _ = ladder.choose_start(ladder.Rung0([lite2, cheap_ref]), "ref", yv, "accuracy", k, ALPHA)
    assert chosen == "ref"


def test_a_probe_is_cross_validated_on_every_row_it_saw_and_left_out_below_the_fine_tuned_start_point(
        digits48, tmp_path):
    """cv_score is the probe's head config refitted per fold over train+validation (5-fold, the same folds as
    scikit-learn's StratifiedKFold), scored out of fold; a probe whose cv_score is below the start point's
    validation score is left out of the final choice, whatever its validation score."""
    import dataclasses

    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from automl.metrics import classification_metrics

    xt, yt, xv, yv, k = digits48
    r = ladder.probe(["efficientnet-lite0"], _config(), xt, yt, xv, yv, num_classes=k, metric="accuracy",
                     allowance_s=None, out_dir=tmp_path)
    y_seen = np.concatenate([yt, yv])
    ladder.cross_validate(r, y_seen, k, "accuracy", seed=0)
    p = r.best
    sk = make_pipeline(StandardScaler(), LogisticRegression(C=p.C, max_iter=300, random_state=0))
    oof = cross_val_predict(sk, p.full_features, y_seen, cv=StratifiedKFold(5, shuffle=True, random_state=0),
                            method="predict_proba")
    assert p.cv_score == pytest.approx(classification_metrics(y_seen, oof, k)["accuracy"], abs=0.02)
    lucky = dataclasses.replace(p, val_score=1.0)
    r.probes = [lucky]
    assert list(ladder.doubtful(r, p.cv_score + 0.01).values()) == [lucky]   # the start point scored above it
    assert ladder.doubtful(r, p.cv_score - 0.01) == {}
    assert ladder.doubtful(None, 0.5) == {}


def test_rung0_skips_what_its_allowance_cannot_pay_for_and_says_so_but_always_probes_its_first_backbone(
        digits48, tmp_path):
    """No time left: the first backbone is still probed, on a floor of training rows a class (a model is promised,
    and this is the cheapest), and the next is skipped with the reason."""
    xt, yt, xv, yv, k = digits48
    r = ladder.probe(["efficientnet-lite0", "efficientnet-lite1"], _config(), xt, yt, xv, yv, num_classes=k,
                     metric="accuracy", allowance_s=0.0, out_dir=tmp_path)
    assert [p.backbone for p in r.probes] == ["efficientnet-lite0"]
    assert r.probes[0].rows == min(len(yt), ladder.FLOOR_ROWS_PER_CLASS * k) < len(yt)
    assert r.probes[0].val_score > 0.8  # 4 digit classes: chance is 0.25
    assert len(r.skipped) == 1 and r.skipped[0].startswith("efficientnet-lite1") and "spent" in r.skipped[0]


def test_out_of_fold_probabilities_come_from_the_probe_head_refitted_per_fold(digits48, tmp_path):
    xt, yt, xv, yv, k = digits48
    r = ladder.probe(["efficientnet-lite0"], _config(), xt, yt, xv, yv, num_classes=k, metric="accuracy",
                     allowance_s=None, out_dir=tmp_path)
    y = np.concatenate([yt, yv])
    proba, folds = ladder.out_of_fold(r.best, y, k)
    assert folds == 5 and proba.shape == (len(y), k)
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-6)
    # Out of fold: each row scored by a head that never saw it, so accuracy is below the in-sample fit's.
    assert (proba.argmax(1) == y).mean() > 0.8
    w, b = ladder.standardised_fit(r.best.full_features, y, k, r.best.C, r.best.balanced)
    assert (ladder.proba(r.best.full_features, w, b).argmax(1) == y).mean() >= (proba.argmax(1) == y).mean()


def test_label_errors_come_from_the_mean_of_every_probes_out_of_fold_heads(digits48, tmp_path):
    """Suspected label errors are scored on the mean of every backbone's out-of-fold head, not the best one's
    alone (5% planted flips: precision 0.31 -> 0.50 on stamps, 0.76 -> 0.98 on digits, at the same recall)."""
    xt, yt, xv, yv, k = digits48
    r = ladder.probe(["efficientnet-lite0", "efficientnet-lite1"], _config(), xt, yt, xv, yv, num_classes=k,
                     metric="accuracy", allowance_s=None, out_dir=tmp_path)
    y = np.concatenate([yt, yv])
    ladder.cross_validate(r, y, k, "accuracy", keep_oof=True)
    assert len(r.probes) == 2 and r.oof_proba is not None
    each = [ladder.out_of_fold(p, y, k)[0] for p in r.probes]
    np.testing.assert_allclose(r.oof_proba, (each[0] + each[1]) / 2, atol=1e-9)
    assert not np.allclose(each[0], each[1], atol=1e-3)  # two backbones, two opinions: the mean is neither
    assert sorted(r.oof_backbones) == ["efficientnet-lite0", "efficientnet-lite1"] and r.oof_folds == 5


def test_when_no_fine_tune_reports_in_time_rung0s_best_head_is_the_model(digits48, tmp_path):
    """Issue 25.12: a short budget whose search ends before any trial reports still exports a model: rung 0's
    best head, listed in the trial table and kept where the final choice loads trials from."""
    from automl.search import kept
    from automl.training.combine import top_trials

    xt, yt, xv, yv, k = digits48
    r = ladder.probe(["efficientnet-lite0"], _config(), xt, yt, xv, yv, num_classes=k, metric="accuracy",
                     allowance_s=None, out_dir=tmp_path / "rung0")
    result = ladder.with_rung0(None, r, "accuracy", str(tmp_path / "search"))
    assert result.best_trial_id == "r0_0" and result.best_score == pytest.approx(r.best.val_score)
    assert list(result.trials["rung"].unique()) == [0] and len(result.trials) == len(r.rows)
    top = top_trials(result.trials, result.best_dir, "accuracy", k=1)
    assert top[0][0] == "r0_0" and top[0][1]["backbone"] == "efficientnet-lite0" and top[0][1]["unfreeze"] == 0
    model, spec = load_best(top[0][1], k, kept.model_file(result.best_dir, "r0_0"))
    enc = build_encoder(full_config(top[0][1]), model, spec)
    got = evaluate(model, enc, xv, yv, k, torch.device("cpu"), keep_scores=True)["scores"]
    np.testing.assert_allclose(got, r.best.val_proba, atol=2e-3)


def test_rung0_probes_at_a_larger_side_only_where_its_features_cross_validate_better_and_keeps_it_as_a_model(
        digits48, tmp_path):
    """Frozen ImageNet features of tiny images are better upscaled (48 px icons: +8 points at 96 px) but not
    always (8 px digits: worse at 96 than 48), so rung 0 judges the larger side on the training rows. Digits
    trained at 16 px (the features collapse) take 48 px; at 64 px they do not take 128. An upscaled probe is a
    model built at its own side from its table row, and never a fine-tune's starting head."""
    from automl.search import kept
    from automl.training.combine import top_trials

    xt, yt, xv, yv, k = digits48
    small = {**_config(), "image_size": 16}
    r = ladder.probe(["efficientnet-lite0"], small, xt, yt, xv, yv, num_classes=k, metric="accuracy",
                     allowance_s=None, out_dir=tmp_path / "up", upscale=SIZE)
    assert [p.image_size for p in r.upscaled] == [SIZE] and "48 px taken" in r.upscale_note
    up = r.upscaled[0]
    assert up.val_score > r.probes[0].val_score
    assert r.head_files() == {"efficientnet-lite0": r.probes[0].head_file}
    result = ladder.with_rung0(None, r, "accuracy", str(tmp_path / "search"))
    row = result.trials[result.trials["trial_id"] == up.trial_id].iloc[0]
    assert row["config/image_size"] == SIZE and r.probes[0].trial_id in set(result.trials["trial_id"])
    cfg = next(c for tid, c, _ in top_trials(result.trials, result.best_dir, "accuracy", k=10) if tid == up.trial_id)
    model, spec = load_best(cfg, k, kept.model_file(result.best_dir, up.trial_id))
    got = evaluate(model, build_encoder(full_config(cfg), model, spec), xv, yv, k, torch.device("cpu"),
                   keep_scores=True)["scores"]
    np.testing.assert_allclose(got, up.val_proba, atol=2e-3)

    kept_side = ladder.probe(["efficientnet-lite0"], {**_config(), "image_size": 64}, xt, yt, xv, yv, num_classes=k,
                             metric="accuracy", allowance_s=None, out_dir=tmp_path / "same", upscale=128)
    assert kept_side.upscaled == [] and "128 px not taken" in kept_side.upscale_note
    # With no time left after its first backbone, rung 0 skips the judgement and says so.
    rushed = ladder.probe(["efficientnet-lite0"], small, xt, yt, xv, yv, num_classes=k, metric="accuracy",
                          allowance_s=0.0, out_dir=tmp_path / "rushed", upscale=SIZE)
    assert len(rushed.probes) == 1 and rushed.upscaled == [] and rushed.upscale_note == ""
    assert any("no time left to judge" in why for why in rushed.skipped)


def test_registries_warn_when_a_name_is_registered_again_with_something_else():
    from automl.training.schedules import _SCHEDULES, register_schedule

    def mine(optimizer, total_steps, warmup_steps, config):  # pragma: no cover (never trained with)
        raise AssertionError

    original = _SCHEDULES["cosine"]
    try:
        with pytest.warns(UserWarning, match="schedule 'cosine' was already registered"):
            register_schedule("cosine")(mine)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            register_schedule("cosine")(mine)  # the same function again (a plugin re-installed): no warning
    finally:
        _SCHEDULES["cosine"] = original


def test_the_poolings_of_one_checkpoint_share_one_forward_pass_and_equal_their_own(text_df, monkeypatch, tmp_path):
    """Rung 0 on text: MiniLM mean- and first-token-pooled features come from one pass over the rows, and each
    equals the features of its own model (so each pooling's heads are what a separate pass would have fitted)."""
    from automl.data.trial_data import subset
    from automl.models.hf_family import HFFamily

    x = [(t,) for t in text_df["text"]]
    y = pd.factorize(text_df["label"])[0]
    k = int(y.max()) + 1
    tr, va = np.arange(0, len(x), 2), np.arange(1, len(x), 2)
    cfg = full_config({"backbone": "minilm-l6", "max_length": 32, "unfreeze": 0, "seed": 0})
    passes = []
    real = HFFamily.pooled_features
    monkeypatch.setattr(HFFamily, "pooled_features", lambda self, *a, **kw: passes.append(a[-1]) or real(self, *a, **kw))
    r = ladder.probe(["minilm-l6", "minilm-l6-cls"], cfg, subset(x, tr), y[tr], subset(x, va), y[va],
                     num_classes=k, metric="accuracy", allowance_s=None, out_dir=tmp_path)
    assert passes == [["mean", "cls"], ["mean", "cls"]]  # validation rows once, training rows once
    assert {p.backbone for p in r.probes} == {"minilm-l6", "minilm-l6-cls"}
    for name in ("minilm-l6", "minilm-l6-cls"):
        c = full_config({**cfg, "backbone": name})
        model, spec = build_model(c, k)
        enc = build_encoder(c, model, spec)
        own = body_features(model.eval(), enc, encode_inputs(enc, subset(x, va)), torch.device("cpu")).numpy()
        probe_ = next(p for p in r.probes if p.backbone == name)
        np.testing.assert_allclose(probe_.full_features[len(tr):], own, atol=1e-5)


@pytest.mark.parametrize("n", [3, 30, 38, 39, 40])
def test_rung0s_row_sample_keeps_every_class_in_proportion_whatever_rows_it_can_pay_for(n):
    # Fortunes, 300 s: rung 0 could pay for all but two of 40 training rows over 8 classes, and the stratified
    # split it used then needed a left-over part holding all 8 classes (ValueError, the run ended in rung 0).
    from automl.data.inputs import sample_rows

    y = np.repeat(np.arange(8), [12, 8, 5, 5, 4, 2, 2, 2])
    pick = sample_rows(np.arange(len(y)), y, n, seed=1)
    assert len(set(pick)) == len(pick) and set(np.unique(y[pick])) == set(range(8))
    counts = np.bincount(y[pick], minlength=8)
    assert np.all(counts >= np.maximum(1, np.floor(n / len(y) * np.bincount(y)) - 1))
    assert abs(len(pick) - max(n, 8)) <= 4
