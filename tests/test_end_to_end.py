"""auto_finetune end to end: search -> Ray Train retrain -> test -> export -> load, and the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from automl import auto_finetune, load
from automl.ops.cli import main as cli_main

pytestmark = pytest.mark.slow
TINY = {"backbone": "timm/resnet10t:scratch", "image_size": 16, "max_epochs": 3}  # one pass per epoch: tiny data on purpose


@pytest.fixture(scope="module")
def image_model(ray_session, digits_df, tmp_path_factory):
    out = tmp_path_factory.mktemp("img")
    return auto_finetune(digits_df, label="label", time_budget_s=150, max_trials=4, search_space=TINY,
                         output_dir=out, progress=False, cv_folds=2)


def test_image_model_is_exported_and_reloads_identically(image_model, digits_df):
    m = image_model
    files = set(os.listdir(m.export_dir))
    assert {"model.safetensors", "config.json", "trials.csv", "metrics.json", "data_report.json", "MODEL_CARD.md",
            "model.onnx", "model.pt"} <= files
    meta = json.loads(open(os.path.join(m.export_dir, "config.json")).read())
    assert meta["classes"] == [0, 1, 2, 3] and meta["preprocessing"]["kind"] == "image"
    assert meta["test_metrics"]["accuracy"] > 0.5  # chance is 0.25
    same = load(m.export_dir)
    a, b = m.predict_proba(digits_df.head(25)), same.predict_proba(digits_df.head(25))
    assert list(a.columns) == [0, 1, 2, 3]
    np.testing.assert_allclose(a.to_numpy(), b.to_numpy(), atol=1e-6)
    assert (m.predict(digits_df.head(25)) == same.predict(digits_df.head(25))).all()
    ev = same.evaluate(digits_df)
    assert set(ev) >= {"accuracy", "f1_macro"} and ev["accuracy"] > 0.5
    assert len(m.trials) == 4 and {"status", "epochs_run", "best_val_accuracy"} <= set(m.trials.columns)
    cv = m.meta["cross_validation"]
    assert cv["folds"] == 2 and 0.0 <= cv["metrics"]["accuracy"]["mean"] <= 1.0
    assert {"MODEL_CARD.html", "learning_curves.png", "confusion_matrix.png", "test_split.npz"} <= files
    assert "Cross-validation" in open(os.path.join(m.export_dir, "MODEL_CARD.md")).read()
    assert not os.path.exists(os.path.join(os.path.dirname(m.export_dir), "feature_cache"))  # the cache is gone


def test_onnx_and_torchscript_match_pytorch(image_model, digits_df):
    import onnxruntime as ort
    import torch

    m = image_model
    x = m.encoder.batch(m._inputs(digits_df.head(6)), np.arange(6))
    ref = m.model(x).detach().numpy()
    sess = ort.InferenceSession(os.path.join(m.export_dir, "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"pixel_values": x.numpy()})[0], ref, atol=1e-4)
    ts = torch.jit.load(os.path.join(m.export_dir, "model.pt"))
    np.testing.assert_allclose(ts(x).detach().numpy(), ref, atol=1e-4)


def test_cli_predict_and_evaluate_on_an_export(image_model, digits_df, tmp_path):
    df = digits_df.head(30).copy()
    df["image"] = [np.asarray(a) for a in df["image"]]
    paths = []
    for i, arr in enumerate(df["image"]):
        p = tmp_path / f"{i}.png"
        Image.fromarray((arr * 16).clip(0, 255).astype(np.uint8)).save(p)
        paths.append(p.name)
    pd.DataFrame({"image": paths, "label": df["label"]}).to_csv(tmp_path / "new.csv", index=False)
    run = lambda *a: subprocess.run([sys.executable, "-m", "automl", *a], capture_output=True, text=True, timeout=300)  # noqa: E731
    r = run("predict", image_model.export_dir, str(tmp_path / "new.csv"), "--output", str(tmp_path / "p.csv"))
    assert r.returncode == 0, r.stderr
    preds = pd.read_csv(tmp_path / "p.csv")
    assert len(preds) == 30 and {"prediction", "proba_0", "proba_3"} <= set(preds.columns)
    r = run("evaluate", image_model.export_dir, str(tmp_path / "new.csv"))
    assert r.returncode == 0, r.stderr
    assert 0.0 <= json.loads(r.stdout)["accuracy"] <= 1.0


def test_text_classification_with_real_minilm(ray_session, text_df, tmp_path):
    m = auto_finetune(text_df, time_budget_s=200, max_trials=2, output_dir=tmp_path, progress=False,
                      search_space={"max_epochs": 2, "max_length": 16, "unfreeze": 2, "lr": {"low": 1e-4, "high": 5e-4}})
    assert m.meta["modality"] == "text" and m.meta["backbone"]["library"] == "hf"
    assert m.metrics["accuracy"] > 0.5  # 3 topics: chance is 1/3
    same = load(m.export_dir)
    texts = ["the coach said the team played a great match", "my laptop runs new software"]
    np.testing.assert_allclose(m.predict_proba(texts).to_numpy(), same.predict_proba(texts).to_numpy(), atol=1e-5)
    assert set(same.predict(texts)) <= {"sport", "food", "tech"}
    assert os.path.exists(os.path.join(m.export_dir, "hf", "tokenizer_config.json"))


def test_cli_finetune_end_to_end_on_rgba_files(ray_session, tmp_path, capsys):
    rng = np.random.default_rng(0)
    rows = []
    for label, colour in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
        for i in range(12):
            arr = np.zeros((20, 20, 4), np.uint8)
            arr[..., :3] = np.clip(np.array(colour) + rng.normal(0, 25, (20, 20, 3)), 0, 255)
            arr[..., 3] = 255 if i % 2 else 128  # some translucent icons
            Image.fromarray(arr, "RGBA").save(tmp_path / f"{label}{i}.png")
            rows.append({"path": f"{label}{i}.png", "colour": label})
    pd.DataFrame(rows).to_csv(tmp_path / "icons.csv", index=False)
    code = cli_main(["finetune", str(tmp_path / "icons.csv"), "--label", "colour", "--time-budget", "120",
                     "--max-trials", "2", "--output", str(tmp_path / "out"), "--quiet",
                     "--set", json.dumps(TINY)])
    out = capsys.readouterr().out
    assert code == 0 and "export:" in out and "test accuracy" in out
    assert load(tmp_path / "out" / "model").predict(str(tmp_path / "icons.csv")).tolist()[:1][0] in ("red", "blue")


def test_cli_bad_input_exits_2_with_a_clear_message(tmp_path):
    pd.DataFrame({"text": ["a", "b", "c"], "label": ["x", "x", "x"]}).to_csv(tmp_path / "one.csv", index=False)
    r = subprocess.run([sys.executable, "-m", "automl", "finetune", str(tmp_path / "one.csv")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "only one class" in r.stderr and "Fix:" in r.stderr


def test_retrain_with_two_ray_train_workers(ray_session, digits_df, tmp_path):
    from automl.data.intake import prepare
    from automl.data.images import stack_resized
    from automl.training.retrain import retrain
    from automl.data.trial_data import TrialData
    from automl.training.loop import build_encoder, evaluate, full_config

    t = prepare(digits_df)
    X = stack_resized(t.images, 16)
    tr, te = np.concatenate([t.splits["train"], t.splits["validation"]]), t.splits["test"]
    cfg = full_config({"backbone": "timm/resnet10t:scratch", "image_size": 16, "lr": 3e-3, "batch_size": 16})
    model, spec, _ = retrain(cfg, TrialData("image", 4, X[tr], t.y[tr]), epochs=3, schedule_epochs=3,
                          storage_path=str(tmp_path), num_workers=2)
    enc = build_encoder(cfg, model, spec)
    import torch

    assert evaluate(model, enc, X[te], t.y[te], 4, torch.device("cpu"))["accuracy"] > 0.5


def test_image_regression_end_to_end(ray_session, digits_df, tmp_path):
    rng = np.random.default_rng(0)
    df = digits_df.assign(value=digits_df["label"].astype(float) * 2.5 + rng.normal(0, 0.1, len(digits_df)))
    df = df.drop(columns=["label"])
    m = auto_finetune(df, label="value", time_budget_s=150, max_trials=2, output_dir=tmp_path, progress=False,
                      search_space={"backbone": "timm/resnet10t:scratch", "image_size": 16, "max_epochs": 4,
                                    "lr": {"low": 1e-3, "high": 5e-3}})
    assert m.meta["task"] == "regression" and m.meta["metric"] == "r2"
    assert m.metrics["r2"] > 0.3 and "rmse" in m.metrics
    preds = load(m.export_dir).predict(df.head(10))
    assert preds.dtype.kind == "f" and np.allclose(preds, m.predict(df.head(10)), atol=1e-5)
    with pytest.raises(Exception, match="regression"):
        m.predict_proba(df.head(2))


def test_model_updates_promote_improvements_and_refuse_forgetting(ray_session, digits_df, tmp_path):
    from sklearn.datasets import load_digits

    common = dict(time_budget_s=120, max_trials=1, progress=False, find_label_errors=False, export_formats=False)
    small = digits_df.groupby("label").head(12).reset_index(drop=True)
    base = auto_finetune(small, output_dir=tmp_path / "base", **common,
                         search_space={"backbone": "timm/resnet10t:scratch", "image_size": 16, "max_epochs": 1, "lr": 2e-4,
                                       "schedule": "constant", "augment": "none"})
    strong = {"backbone": "timm/resnet10t:scratch", "image_size": 16, "max_epochs": 4, "lr": 3e-3, "schedule": "cosine", "augment": "none"}
    better = auto_finetune(digits_df, base_model=base.export_dir, output_dir=tmp_path / "better", **common,
                           search_space=strong)
    upd = better.meta["update"]
    assert upd["decision"] == "champion", upd
    assert upd["new_test"]["new"] > upd["new_test"]["old"] and upd["l2_from_base"] > 0
    assert "Update of an earlier model" in open(os.path.join(better.export_dir, "MODEL_CARD.md")).read()

    # New data that reuses the labels for other digits (4-7 labelled 0-3) overwrites the old meaning.
    d = load_digits()
    keep = np.concatenate([np.flatnonzero(d.target == c)[:40] for c in range(4, 8)])
    relabelled = pd.DataFrame({"image": list(d.images[keep]), "label": d.target[keep] - 4})
    forgets = auto_finetune(relabelled, base_model=base.export_dir, output_dir=tmp_path / "forgets", **common,
                            search_space=strong)
    upd = forgets.meta["update"]
    assert upd["decision"] == "challenger" and "forgets" in upd["reason"], upd
    assert upd["forgetting"] > 0.01 and not forgets.promoted


def test_update_adds_new_classes_to_the_head(ray_session, digits_df, tmp_path):
    from sklearn.datasets import load_digits

    common = dict(time_budget_s=120, max_trials=1, progress=False, find_label_errors=False, export_formats=False,
                  search_space={"backbone": "timm/resnet10t:scratch", "image_size": 16, "max_epochs": 2, "lr": 3e-3})
    base = auto_finetune(digits_df, output_dir=tmp_path / "base", **common)
    d = load_digits()
    keep = np.concatenate([np.flatnonzero(d.target == c)[:30] for c in range(2, 6)])
    new = pd.DataFrame({"image": list(d.images[keep]), "label": d.target[keep]})
    upd = auto_finetune(new, base_model=base.export_dir, output_dir=tmp_path / "upd", **common)
    assert upd.classes == [0, 1, 2, 3, 4, 5]  # old classes keep their positions, new ones appended
    assert load(upd.export_dir).predict_proba(new.head(3)).shape == (3, 6)
