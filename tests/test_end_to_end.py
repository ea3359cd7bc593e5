"""auto_finetune end to end. One image run and one text run (module fixtures) serve most checks: what the README
promises of an export, the plan and its budget, the search, the feature cache, LogME, soups, label errors,
per-group metrics, ONNX/TorchScript and the CLI on an export. The other tests each need a run of their own."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from automl import DataError, auto_finetune, load
from automl.ops.cli import main as cli_main

# Every test here but the bad-input one runs (or shares) a fine-tune and is marked slow one by one; bad input
# fails in intake, before Ray or any search starts.
QUICK = dict(progress=False, find_label_errors=False, export_formats=False, retrain=False)
BUDGET = 60  # the image run's whole time budget: it must also produce a model in a minute


@pytest.fixture(scope="module")
def image_run(ray_session, digits_df, tmp_path_factory):
    """Digits with a group column; a space with two pretrained backbones (LogME ranks them: asked for, since rung 0
    of the ladder, which probes both, turns the default pre-ranking off) and head-only trials of EfficientNet-Lite0
    on un-augmented inputs (the feature cache serves them). The second "pretrained" backbone is a random-init
    ResNet saved as a weights file: LogME must rank the ImageNet one above it."""
    from safetensors.torch import save_file

    from automl import models

    out = tmp_path_factory.mktemp("img")
    torch.manual_seed(1)
    weights = out / "resnet10t.safetensors"  # a second "pretrained" backbone, from a local weights file
    save_file(models.build("timm/resnet10t:scratch", 1000).body.state_dict(), str(weights))
    df = digits_df.assign(site=np.where(np.arange(len(digits_df)) % 3 == 0, "clinic", "home"))
    # Eight training rows (3%) get another digit's label: the label-error search must find them.
    from automl.data.intake import prepare

    train_rows = prepare(digits_df, seed=0).splits["train"]
    flipped = [int(train_rows[i]) for i in range(0, 80, 10)]
    df.loc[flipped, "label"] = (df.loc[flipped, "label"] + 1) % 4
    df.attrs["flipped"] = flipped
    space = {"backbone": {"type": "choice", "values": ["efficientnet-lite0", f"timm/resnet10t@{weights}"]},
             "image_size": 32, "unfreeze": {"type": "choice", "values": [0, "all"]}, "augment": "none", "mix": "none",
             "gradual_unfreeze_every": 0, "max_epochs": 4}
    # Three head-only trials of EfficientNet-Lite0 tried first: the third reads the features the first computed.
    head_only = [{"backbone": "efficientnet-lite0", "unfreeze": 0, "lr": lr, "optimizer": "adamw"}
                 for lr in (0.01, 0.003, 0.02)]
    from automl.budget import Costs

    df.attrs["costs_before"] = dict(Costs.load().values)  # the session's $AUTOML_COSTS_FILE (conftest)
    t0 = time.monotonic()
    m = auto_finetune(df, time_budget_s=BUDGET, search_space=space, output_dir=out, progress=False, cv_folds=2,
                      find_label_errors=True, groups="site", retrain=False, start_points=head_only, prerank=True)
    return m, time.monotonic() - t0, df


@pytest.fixture(scope="module")
def text_run(ray_session, text_df, tmp_path_factory):
    out = tmp_path_factory.mktemp("txt")
    # The space lists both MiniLM-L6 poolings and MiniLM-L3, so rung 0 probes each; label errors on, as they come
    # from rung 0's out-of-fold heads in seconds.
    return auto_finetune(text_df, time_budget_s=None, max_trials=2, output_dir=out, progress=False,
                         search_space="text_classification",
                         search_overrides={"max_epochs": 2, "unfreeze": 2},
                         find_label_errors=True, retrain=False)


# ---------------------------------------------------------------------------------------------- the image run

@pytest.mark.slow
def test_a_minute_gives_an_exported_model_within_the_budget(image_run):
    m, wall, df = image_run
    spent = m.manifest.budget["spent_s"]
    # Search, finalising, evaluation, cross-fits and export: the budget +10%
    assert wall <= BUDGET * 1.10, (wall, spent, m.manifest.plan["search_ends_at_s"], m.backbone)
    assert m.metrics["accuracy"] > 0.6  # 4 digit classes: chance is 0.25
    assert {"prepare", "plan", "search", "finalise", "evaluate", "diagnose"} <= set(spent)
    # Each stage took time, and together they are the run: the budget's clock (read while the export was written,
    # so the export's own time is not in it) and this test's wall clock, within a generous tolerance.
    assert all(spent[k] > 0 for k in ("prepare", "plan", "search", "finalise", "evaluate", "diagnose")), spent
    elapsed = m.manifest.budget["elapsed_s"]
    assert sum(spent.values()) <= elapsed + 0.01 * len(spent) and elapsed <= wall, (spent, elapsed, wall)
    # The rest is the export (an ensemble of three exported ONNX and TorchScript members took 13 s of 53 on a busy
    # machine), which the run taught the costs file a member's share of (half weight: the next test).
    learned = json.loads(Path(os.environ["AUTOML_COSTS_FILE"]).read_text())["export_image_s"]
    export_s = (2 * learned - df.attrs["costs_before"]["export_image_s"]) * len(m.manifest.backbone.model.split("+"))
    assert sum(spent.values()) + export_s >= 0.85 * wall, (spent, export_s, wall)
    assert any("full-length trial" in r for r in m.manifest.plan["reasons"])


@pytest.mark.slow
def test_the_run_teaches_the_costs_file_what_exporting_took(image_run):
    """README: each run updates $AUTOML_COSTS_FILE with what its fixed costs took, for the next plan's reserves.
    Exporting took some time x > 0 a member here; the file blends it in at half weight."""
    import json

    from automl.budget import DEFAULT_COSTS

    m, wall, df = image_run
    before = df.attrs["costs_before"]["export_image_s"]
    saved = json.loads(Path(os.environ["AUTOML_COSTS_FILE"]).read_text())
    x = 2 * saved["export_image_s"] - before  # what this run measured, a member's share
    assert saved["export_image_s"] != before and 0 < x < wall, (saved, before)
    assert set(saved) <= set(DEFAULT_COSTS)


@pytest.mark.slow
def test_the_export_reloads_from_files_alone_and_predicts_identically(image_run):
    m, _, df = image_run
    files = set(os.listdir(m.export_dir))
    assert {"model.safetensors", "config.json", "trials.csv", "metrics.json", "MODEL_CARD.md", "MODEL_CARD.html",
            "model.onnx", "model.pt", "test_split.npz", "suspected_label_errors.csv"} <= files
    same = load(m.export_dir)
    np.testing.assert_allclose(m.predict_proba(df.head(20)).to_numpy(), same.predict_proba(df.head(20)).to_numpy(),
                               atol=1e-6)
    assert same.manifest.schema_version == 2 and same.classes == [0, 1, 2, 3]


@pytest.mark.slow
def test_onnx_and_torchscript_match_pytorch_for_images(image_run):
    import onnxruntime as ort

    m, _, df = image_run
    x = m.encoder.batch(m._inputs(df.head(6)), np.arange(6))
    ref = m.model.cpu()(x).detach().numpy()
    tol = 1e-3 * max(1.0, float(np.abs(ref).max()))  # the export's own parity bound (ORT fuses conv + BN)
    sess = ort.InferenceSession(os.path.join(m.export_dir, "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"pixel_values": x.numpy()})[0], ref, atol=tol, rtol=0)
    ts = torch.jit.load(os.path.join(m.export_dir, "model.pt"))
    np.testing.assert_allclose(ts(x).detach().numpy(), ref, atol=1e-4)


@pytest.mark.slow
def test_the_start_point_is_never_stopped_and_never_beaten_on_validation(image_run):
    from automl.data.intake import prepare

    m, _, df = image_run
    t = m.trials
    start = t[t["start_point"]]  # the user's three warm-start configs and the space's own
    assert len(start) == 4 and (start["status"] == "COMPLETED").all(), t[["start_point", "status", "epochs_run"]]
    task = prepare(df.drop(columns=["site"]), seed=0)
    val = df.iloc[task.row_index[task.splits["validation"]]]
    exported = load(m.export_dir).evaluate(val, label="label")[m.manifest.metric]
    # The reference is the best start point's model: its weights at the end of its schedule (its last report).
    ref = start.sort_values(f"best_val_{m.manifest.metric}", ascending=False).iloc[0]["trial_id"]
    assert exported >= m.search.history[ref][-1][f"val_{m.manifest.metric}"] - 1e-9
    decision = m.manifest.training["decision"]  # kept, or replaced by what and how surely: said in the card too
    how = "single" if m.manifest.training["how"] == "checkpoint" else m.manifest.training["how"]
    assert decision.startswith(("start point kept", f"{how} chosen over the start point",
                                f"{how} chosen over the soup with the start point",
                                f"{how} chosen over the ensemble with the start point")), decision
    assert decision in open(os.path.join(m.export_dir, "MODEL_CARD.md")).read()


@pytest.mark.slow
def test_head_only_trials_are_served_by_the_feature_cache(image_run):
    m, _, _ = image_run
    hits = m.trials["feature_cache"].astype(str)
    assert (hits == "head:hit").any(), m.trials[["config/unfreeze", "feature_cache"]]
    assert not (Path(m.export_dir).parent / "feature_cache").exists()  # removed once the search is over


@pytest.mark.slow
def test_logme_ranks_the_pretrained_backbones_before_the_search(image_run, classifier_inputs):
    """The ImageNet EfficientNet-Lite0 ranks above a random-init ResNet, and each score is LogME of that backbone's
    frozen features (taken here from the input of its classifier) on the training rows it was ranked on."""
    from automl.data.images import stack_resized
    from automl.data.intake import prepare
    from automl.search.prerank import logme

    m, _, df = image_run
    tr = m.manifest.transferability
    assert [r["backbone"] for r in tr["ranking"]][0] == "efficientnet-lite0" and len(tr["ranking"]) == 2, tr
    assert tr["kept"] == [r["backbone"] for r in tr["ranking"]] and not tr["failed"]
    task = prepare(df.drop(columns=["site"]), seed=0)
    rows = np.sort(task.splits["train"])  # fewer than the 1,000 LogME samples: every training row, in order
    x = stack_resized([task.images[i] for i in rows], 32)
    for r in tr["ranking"]:
        feats = classifier_inputs(r["backbone"], 32, x, 4)
        assert r["logme"] == pytest.approx(logme(feats, task.y[rows]), rel=1e-3, abs=1e-3), r


@pytest.mark.slow
def test_suspected_label_errors_are_listed_in_the_csv_and_on_the_model(image_run):
    from automl.data.intake import prepare

    m, _, df = image_run
    csv = pd.read_csv(os.path.join(m.export_dir, "suspected_label_errors.csv"))
    assert len(csv) == len(m.label_errors) == m.manifest.suspected_label_errors["count"]
    assert list(csv.columns) == ["row", "given_label", "suspected_label", "p_suspected", "p_given_label", "margin"]
    assert load(m.export_dir).label_errors.equals(csv)
    # The file holds the model's own list: the same rows, labels and probabilities, in the same order.
    pd.testing.assert_frame_equal(csv, m.label_errors.reset_index(drop=True), check_dtype=False, rtol=1e-9)
    assert m.manifest.suspected_label_errors.get("model", "").startswith("rung 0:"), m.manifest.suspected_label_errors
    # Rows are the user's own row numbers, with the label the user gave them.
    assert (csv["given_label"].to_numpy() == df.loc[csv["row"], "label"].to_numpy()).all()
    task = prepare(df.drop(columns=["site"]), seed=0)
    searched = set(task.row_index[np.concatenate([task.splits["train"], task.splits["validation"]])])
    planted = [r for r in df.attrs["flipped"] if r in searched]  # the others fell in the test split
    assert len(planted) >= 4
    found = set(csv["row"]) & set(planted)
    assert len(found) >= len(planted) / 2, (planted, csv.head(10))
    assert len(csv) <= 0.1 * len(searched)  # mostly the planted errors, not the model's own mistakes


@pytest.mark.slow
def test_cross_validation_and_per_group_metrics_reach_the_card(image_run):
    m, _, df = image_run
    cv = m.manifest.cross_validation
    assert cv["folds"] == 2 and len(cv["per_fold"]) == 2
    g = m.manifest.group_metrics
    assert g["column"] == "site" and {r["group"] for r in g["table"]} == {"clinic", "home"}
    assert sum(r["support"] for r in g["table"]) == m.data_report["split_sizes"]["test"]
    card = open(os.path.join(m.export_dir, "MODEL_CARD.md")).read()
    for section in ("Cross-validation", "Per-group test metrics", "Suspected label errors", "How the budget was spent",
                    "Files in this export", "Peak disk used"):
        assert section in card, section
    assert "site" not in m.manifest.input_columns  # the group column is not an input
    peak = m.manifest.search["peak_disk_mb"]
    assert peak > 0 and f"Peak disk used by the search's checkpoints: {peak:.1f} MB" in card


@pytest.mark.slow
def test_cli_predict_batches_through_a_file_and_evaluate_reports_all_metrics(image_run, tmp_path, capsys):
    m, _, df = image_run
    paths = []
    for i, arr in enumerate(df["image"].head(25)):
        Image.fromarray((np.asarray(arr) * 16).clip(0, 255).astype(np.uint8)).save(tmp_path / f"{i}.png")
        paths.append(f"{i}.png")
    pd.DataFrame({"image": paths, "label": df["label"].head(25)}).to_csv(tmp_path / "new.csv", index=False)
    assert cli_main(["predict", m.export_dir, str(tmp_path / "new.csv"), "--output", str(tmp_path / "p.csv"),
                     "--batch-size", "10"]) == 0  # 25 rows: three batches
    preds = pd.read_csv(tmp_path / "p.csv")
    want = load(m.export_dir).predict(str(tmp_path / "new.csv"))
    assert len(preds) == 25 and preds["prediction"].tolist() == [int(v) for v in want]
    capsys.readouterr()
    assert cli_main(["evaluate", m.export_dir, str(tmp_path / "new.csv")]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics == pytest.approx(load(m.export_dir).evaluate(str(tmp_path / "new.csv")))


@pytest.mark.slow
def test_evaluate_returns_log_loss_and_calibration_error_as_defined(image_run):
    from sklearn.metrics import log_loss

    from automl.metrics import expected_calibration_error

    m, _, df = image_run
    res = m.evaluate(df.head(60))
    proba = m.predict_proba(df.head(60)).to_numpy()
    y = df["label"].head(60).to_numpy()
    assert res["log_loss"] == pytest.approx(log_loss(y, np.clip(proba, 1e-7, 1), labels=[0, 1, 2, 3]), rel=1e-6)
    assert res["ece"] == pytest.approx(expected_calibration_error(y, proba))


# ---------------------------------------------------------------------------------------------- the text run

@pytest.mark.slow
def test_text_run_on_the_text_classification_space_exports_parity_checked_onnx_and_torchscript(text_run, text_df):
    import onnxruntime as ort

    m = text_run
    same = load(m.export_dir)
    assert m.manifest.modality == "text"
    # One MiniLM, or (where a frozen-feature head beat the fine-tuned start point: training/combine._joined) the
    # two averaged in one exported model. MiniLM is a mean-pooling sentence-transformers model; minilm-l6-cls pools
    # the first token: each model pools as its backbone says.
    if m.manifest.backbone.library == "ensemble":
        chosen = [mem["hyperparameters"]["backbone"] for mem in m.manifest.backbone.kwargs["members"]]
        loaded = list(same.model.members)
        assert [mem["backbone"]["library"] for mem in m.manifest.backbone.kwargs["members"]] == ["hf", "hf"]
    else:
        assert m.manifest.backbone.library == "hf"
        chosen, loaded = [m.manifest.hyperparameters["backbone"]], [same.model]
        assert m.manifest.preprocessing.pooling == ("cls" if chosen[0] == "minilm-l6-cls" else "mean"), chosen
    assert [x.pooling for x in loaded] == ["cls" if c == "minilm-l6-cls" else "mean" for c in chosen], chosen
    assert m.metrics["accuracy"] > 0.6  # 3 topics: chance is 1/3
    texts = ["the coach said the team played a great match", "my laptop runs new software"]
    np.testing.assert_allclose(m.predict_proba(texts).to_numpy(), same.predict_proba(texts).to_numpy(), atol=1e-5)
    ids, mask = same.encoder.batch(same.encoder.encode([[t] for t in texts]), np.arange(2))
    ref = same.model(ids, mask).detach().numpy()
    sess = ort.InferenceSession(os.path.join(m.export_dir, "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    np.testing.assert_allclose(got, ref, atol=1e-3)
    ts = torch.jit.load(os.path.join(m.export_dir, "model.pt"))
    np.testing.assert_allclose(ts(ids, mask).detach().numpy(), ref, atol=1e-4)


@pytest.mark.slow
def test_text_run_probes_every_text_encoder_at_rung_0_and_lists_label_errors_from_it(text_run):
    """Rung 0 fits linear heads on the frozen features of mean- and first-token-pooled MiniLM-L6 and of
    paraphrase-MiniLM-L3: they are rows of the trial table, with validation scores, and the suspected label errors
    come from its out-of-fold heads."""
    m = text_run
    t = m.trials
    rung0 = t[t["rung"] == 0]
    encoders = ["minilm-l6", "minilm-l6-cls", "paraphrase-minilm-l3"]
    for backbone in encoders:
        rows = rung0[rung0["config/backbone"] == backbone]
        assert len(rows) >= 1 and rows["head"].str.startswith("logistic C=").all(), rung0
        assert np.isfinite(rows["best_val_accuracy"].astype(float)).all(), rows
        assert (rows["config/unfreeze"] == 0).all() and (rows["epochs_run"] == 0).all()
    assert (t[t["rung"] != 0]["epochs_run"] > 0).all()  # the fine-tunes (max_trials=2) are the other rows
    assert (t["rung"] != 0).sum() == 2
    summary = m.manifest.suspected_label_errors
    assert summary is not None and summary.get("model", "").startswith("rung 0: "), summary
    averaged = summary["model"].rsplit("(", 1)[-1].rstrip(")").split(", ")
    assert sorted(averaged) == encoders, summary  # every encoder's heads, averaged
    assert m.label_errors is not None and len(m.label_errors) == summary["count"]


# ---------------------------------------------------------------------------------------------- runs of their own

@pytest.mark.slow
def test_cli_finetune_on_rgba_files_with_the_image_classification_space(ray_session, tmp_path, capsys):
    """Hub backbones cannot load offline: the start point's gives way to the next before its speed is probed,
    rung 0 skips the rest with their reasons, and the search runs on the offline portfolio the space also lists."""
    rng = np.random.default_rng(0)
    rows = []
    for label, colour in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
        for i in range(20):
            arr = np.zeros((20, 20, 4), np.uint8)
            arr[..., :3] = np.clip(np.array(colour) + rng.normal(0, 25, (20, 20, 3)), 0, 255)
            arr[..., 3] = 255 if i % 2 else 128  # some translucent icons
            Image.fromarray(arr, "RGBA").save(tmp_path / f"{label}{i}.png")
            rows.append({"path": f"{label}{i}.png", "colour": label})
    pd.DataFrame(rows).to_csv(tmp_path / "icons.csv", index=False)
    code = cli_main(["finetune", str(tmp_path / "icons.csv"), "--label", "colour", "--max-trials", "2",
                     "--time-budget", "none", "--search-space", "image_classification", "--output",
                     str(tmp_path / "out"), "--quiet", "--retrain", "false", "--no-export-formats",
                     # 22 training rows, 24 steps: the start point's 3e-4 learns too little in that (loss 0.69 -> 0.57)
                     "--set", json.dumps({"max_epochs": 8, "batch_size": 8, "lr": 2e-3})])
    out, err = capsys.readouterr()
    assert code == 0 and "export:" in out and "test accuracy" in out, err
    m = load(tmp_path / "out" / "model")
    assert m.manifest.preprocessing.alpha_background == "contrast"  # prediction reads images as training did
    offline = {f"tf_efficientnet_lite{i}" for i in range(3)} | {"resnet10t", "mobilenetv3_small_050"}
    assert m.manifest.backbone.model in offline, m.manifest.backbone.model
    reasons = " ".join(m.manifest.plan["reasons"])
    hub = ["resnet50.a1_in1k", "convnext_tiny.fb_in22k_ft_in1k", "efficientnet_b0.ra_in1k", "resnet18.a1_in1k"]
    assert all(name in reasons for name in hub), reasons  # each unloadable hub backbone named, with its reason
    assert "dropped before the search: Could not load pretrained weights for timm backbone 'resnet50" in reasons
    # What the offline portfolio leaves: rung 0 heads on the three EfficientNet-Lites, the scratch start point, no hub
    tried = set(m.trials["config/backbone"])
    assert {"efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2", "timm/resnet10t:scratch"} <= tried, tried
    assert not any(name.startswith("timm/") and not name.endswith(":scratch") for name in tried), tried
    assert (m.predict(str(tmp_path / "icons.csv")) == pd.read_csv(tmp_path / "icons.csv")["colour"]).mean() > 0.8


def test_cli_bad_input_exits_2_with_a_clear_message(tmp_path, capsys):
    pd.DataFrame({"text": ["a", "b", "c"], "label": ["x", "x", "x"]}).to_csv(tmp_path / "one.csv", index=False)
    assert cli_main(["finetune", str(tmp_path / "one.csv")]) == 2
    err = capsys.readouterr().err
    assert "only one class" in err and "Fix:" in err
    # `automl predict` on a CSV that is not there, and a batch size of 0: pandas' tracebacks before
    export = str(Path(__file__).parent / "fixtures" / "v1_image_export")
    assert cli_main(["predict", export, str(tmp_path / "none.csv")]) == 2
    assert (f"error: Dataset path {str(tmp_path / 'none.csv')!r} does not exist. Fix: pass an existing file or "
            "folder.") in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        cli_main(["predict", export, str(tmp_path / "one.csv"), "--batch-size", "0"])
    assert exited.value.code == 2
    assert "argument --batch-size: must be an integer >= 1; got 0" in capsys.readouterr().err
    # A table with no rows: the header a pipeline expects, in place of what was there, and the reason said
    pd.DataFrame({"image": []}).to_csv(tmp_path / "empty.csv", index=False)
    (tmp_path / "p.csv").write_text("yesterday's predictions\n")
    assert cli_main(["predict", export, str(tmp_path / "empty.csv"), "--output", str(tmp_path / "p.csv")]) == 0
    assert f"wrote 0 predictions to {tmp_path / 'p.csv'} ({tmp_path / 'empty.csv'} has no rows)" in capsys.readouterr().out
    assert (tmp_path / "p.csv").read_text().split() == [",prediction,proba_0,proba_1,proba_2"]


@pytest.mark.slow
def test_registered_schedule_policy_and_backbone_are_used_end_to_end_in_a_regression(ray_session, digits_df,
                                                                                      tmp_path):
    import torchvision.transforms.v2 as T

    from automl import BackboneSpec, register_backbone, register_image_policy, register_schedule

    ran = tmp_path / "ran"  # each registered function leaves a mark where it runs (the trials' Ray workers)
    ran.mkdir()

    @register_schedule("halving")
    def halving(optimizer, total_steps, warmup_steps, config):
        (ran / "schedule").touch()
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, total_steps // 2), gamma=0.5)

    @register_image_policy("tiny_shift")
    def tiny_shift(size):
        (ran / "policy").touch()
        return T.RandomAffine(degrees=0, translate=(0.05, 0.05))

    @register_backbone("my-resnet")
    def my_resnet():
        (ran / "backbone").touch()
        return BackboneSpec("timm", "resnet10t", pretrained=False)

    rng = np.random.default_rng(0)
    df = digits_df.assign(value=digits_df["label"].astype(float) * 2.5 + rng.normal(0, 0.1, len(digits_df)))
    df = df.drop(columns=["label"])
    m = auto_finetune(df, label="value", time_budget_s=None, max_trials=1, output_dir=tmp_path, **QUICK,
                      search_space={"backbone": "my-resnet", "schedule": "halving", "augment": "tiny_shift",
                                    "image_size": 16, "max_epochs": 4, "lr": 3e-3})
    hp = m.manifest.hyperparameters
    assert (hp["backbone"], hp["schedule"], hp["augment"]) == ("my-resnet", "halving", "tiny_shift")
    assert sorted(p.name for p in ran.iterdir()) == ["backbone", "policy", "schedule"]
    assert m.manifest.task == "regression" and m.manifest.metric == "r2" and m.metrics["r2"] > 0.3
    preds = load(m.export_dir).predict(df.head(10))
    assert preds.dtype.kind == "f" and np.allclose(preds, m.predict(df.head(10)), atol=1e-5)
    with pytest.raises(DataError, match="predicts numbers \\(regression\\)"):
        m.predict_proba(df.head(2))


# ---------------------------------------------------------------------------------------------- model updates

@pytest.fixture(scope="module")
def base_model(ray_session, digits_df, tmp_path_factory):
    small = digits_df.groupby("label").head(12).reset_index(drop=True)
    return auto_finetune(small, output_dir=tmp_path_factory.mktemp("base"), time_budget_s=None, max_trials=1,
                         **QUICK, search_space={"backbone": "timm/resnet10t:scratch", "image_size": 16,
                                                "max_epochs": 1, "lr": 2e-4, "schedule": "constant"})


STRONG = {"backbone": "timm/resnet10t:scratch", "image_size": 16, "max_epochs": 4, "lr": 3e-3, "schedule": "cosine"}


@pytest.mark.slow
def test_an_update_that_improves_without_forgetting_is_promoted(base_model, digits_df, tmp_path):
    better = auto_finetune(digits_df, base_model=base_model.export_dir, output_dir=tmp_path, time_budget_s=None,
                           max_trials=1, **QUICK, search_space=STRONG)
    upd = better.manifest.update
    assert upd["decision"] == "champion" and better.promoted, upd
    assert upd["new_test"]["new"] > upd["new_test"]["old"] and upd["l2_from_base"] > 0
    assert "Update of an earlier model" in open(os.path.join(better.export_dir, "MODEL_CARD.md")).read()


@pytest.mark.slow
def test_an_update_that_forgets_the_old_data_is_refused(base_model, tmp_path):
    from sklearn.datasets import load_digits

    d = load_digits()  # new data reusing labels 0-3 for the digits 4-7: it overwrites the old meaning
    keep = np.concatenate([np.flatnonzero(d.target == c)[:40] for c in range(4, 8)])
    relabelled = pd.DataFrame({"image": list(d.images[keep]), "label": d.target[keep] - 4})
    forgets = auto_finetune(relabelled, base_model=base_model.export_dir, output_dir=tmp_path, time_budget_s=None,
                            max_trials=1, **QUICK, search_space=STRONG)
    upd = forgets.manifest.update
    assert upd["decision"] == "challenger" and "forgets" in upd["reason"] and upd["forgetting"] > 0.01, upd
    assert not forgets.promoted


@pytest.mark.slow
def test_an_update_of_a_stripped_base_adds_classes_and_says_forgetting_was_not_checked(base_model, tmp_path):
    import shutil

    from sklearn.datasets import load_digits

    stripped = tmp_path / "base"
    shutil.copytree(base_model.export_dir, stripped)
    assert cli_main(["export", "strip", str(stripped)]) == 0
    # As an export made before transparent pixels could go over black says: its update keeps that fill.
    config = json.loads((stripped / "config.json").read_text())
    config["preprocessing"]["alpha_background"] = "white"
    (stripped / "config.json").write_text(json.dumps(config))
    d = load_digits()
    keep = np.concatenate([np.flatnonzero(d.target == c)[:30] for c in range(2, 6)])
    new = pd.DataFrame({"image": list(d.images[keep]), "label": d.target[keep]})
    upd = auto_finetune(new, base_model=stripped, output_dir=tmp_path / "upd", time_budget_s=None, max_trials=1,
                        **QUICK, search_space=STRONG)
    assert upd.classes == [0, 1, 2, 3, 4, 5]  # old classes keep their positions, new ones are appended
    assert load(upd.export_dir).predict_proba(new.head(3)).shape == (3, 6)
    u = upd.manifest.update
    assert u["forgetting_checked"] is False and u["forgetting"] is None and "NOT checked" in u["reason"]
    assert "Forgetting was not measured" in open(os.path.join(upd.export_dir, "MODEL_CARD.md")).read()
    assert upd.manifest.preprocessing.alpha_background == "white"
