"""Issue 25: data that must not be lost or leak between splits, checks that must be enforced, and exports that
must load where they are promised to (fast: tiny data, no search)."""
from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from automl import DataError, prepare


def _split_of(t) -> dict:
    """{text: split name} of a prepared text task; asserts that every kept row is in exactly one split."""
    where: dict = {}
    for name, idx in t.splits.items():
        for i in idx:
            key = t.texts[i][0]
            assert key not in where, f"row {key!r} is in both {where[key]} and {name}"
            where[key] = name
    assert len(where) == len(t.y) == t.report.rows_used == sum(t.report.split_sizes.values())
    return where


# ---------------------------------------------------------------------------- 1. a split column missing a split

def test_split_column_without_test_carves_only_a_test_part_and_loses_no_row():
    df = pd.DataFrame({"text": [f"row {i}" for i in range(130)], "label": ["a", "b"] * 65,
                       "split": ["train"] * 100 + ["validation"] * 30})
    t = prepare(df)
    where = _split_of(t)
    assert len(where) == len(df)  # every input row is in exactly one split: none lost
    given_val = {f"row {i}" for i in range(100, 130)}
    assert {k for k, s in where.items() if s == "validation"} == given_val  # validation as the user gave it
    n_test = len(t.splits["test"])
    assert 0 < n_test < 40 and len(t.splits["train"]) == 100 - n_test
    assert set(t.y[t.splits["test"]]) == {0, 1}
    assert t.report.split_sizes == {"train": 100 - n_test, "validation": 30, "test": n_test}
    assert any(f"{n_test} test rows were carved out of the {100} train rows" in n for n in t.report.notes)


def test_split_column_without_validation_never_empties_a_small_class_from_train():
    rows = [{"text": f"a{i}", "label": "a", "split": "train"} for i in range(40)]
    rows += [{"text": f"b{i}", "label": "b", "split": "train"} for i in range(2)]   # 2 training rows
    rows += [{"text": f"c{i}", "label": "c", "split": "train"} for i in range(1)]   # 1 training row
    rows += [{"text": f"t{i}", "label": "abc"[i % 3], "split": "test"} for i in range(9)]
    df = pd.DataFrame(rows)
    t = prepare(df)
    where = _split_of(t)
    assert len(where) == len(df)
    assert {k for k, s in where.items() if s == "test"} == {f"t{i}" for i in range(9)}  # test as the user gave it
    train_classes = {t.classes[c] for c in t.y[t.splits["train"]]}
    assert train_classes == {"a", "b", "c"}  # no class vanished from train
    assert "c0" in where and where["c0"] == "train"
    n_val = len(t.splits["validation"])
    assert n_val > 0 and t.report.split_sizes == {"train": 43 - n_val, "validation": n_val, "test": 9}
    assert any("validation rows were carved out of the 43 train rows" in n for n in t.report.notes)
    assert any("'c'" in n and "no validation row" in n for n in t.report.notes)


# ---------------------------------------------------------------------------- 2. splits stable as data grows

def _grown(n_old: int, n_new: int, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    labels = np.array(["x", "y", "z"])[rng.integers(0, 3, n_old + n_new)]
    labels[:3] = ["x", "y", "z"]
    df = pd.DataFrame({"text": [f"sample number {i}" for i in range(n_old + n_new)], "label": labels})
    old = df.iloc[:n_old]
    new = df.sample(frac=1.0, random_state=1).reset_index(drop=True)  # grown by 10%, rows in another order
    return old, new


def test_a_row_keeps_its_split_when_the_data_grows():
    old_df, new_df = _grown(1000, 100)
    before, after = _split_of(prepare(old_df)), _split_of(prepare(new_df))
    moved = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    into_test = [k for k, (b, a) in moved.items() if a == "test"]
    out_of_test = [k for k, (b, a) in moved.items() if b == "test"]
    assert not into_test, f"{len(into_test)} rows that a model trained on are now test rows"
    assert not out_of_test, f"{len(out_of_test)} old test rows are now trained on"
    assert not moved  # the same fractions: every old row keeps its split
    t = prepare(new_df)
    for c in range(3):  # the fractions stay about right in every class
        n_c = (t.y == c).sum()
        for name, frac in (("test", 0.15), ("validation", 0.15)):
            share = (t.y[t.splits[name]] == c).sum() / n_c
            assert abs(share - frac) < 0.07, (c, name, share)


def test_splits_keep_their_stratification_seed_and_dedup():
    old_df, _ = _grown(300, 0)
    a, b = prepare(old_df, seed=0), prepare(old_df.sample(frac=1.0, random_state=3), seed=0)
    assert _split_of(a) == _split_of(b)  # a row's split depends on the row, not on its position
    assert _split_of(prepare(old_df, seed=1)) != _split_of(a)
    dup = pd.concat([old_df, old_df.head(10)], ignore_index=True)
    t = prepare(dup)
    assert t.report.dropped_duplicates == 10 and _split_of(t) == _split_of(a)
    small = pd.DataFrame({"text": [f"s{i}" for i in range(9)], "label": [0, 1, 2] * 3})
    t = prepare(small)
    for idx in t.splits.values():  # every class in every split, even with 3 rows a class
        assert set(t.y[idx]) == {0, 1, 2}
    _split_of(t)


def test_texts_that_differ_only_in_case_or_spacing_land_in_one_split_and_other_rows_keep_theirs(monkeypatch):
    """Near-duplicates are kept (they are not the same input) but never straddle train and test."""
    from automl.modalities.text import TextModality

    old_df, _ = _grown(300, 0)
    twins = old_df.head(60).copy()
    twins["text"] = twins["text"].str.upper()
    spaced = old_df.head(60).copy()
    spaced["text"] = "  " + spaced["text"].str.replace(" ", "   ") + " "
    df = pd.concat([old_df, twins, spaced], ignore_index=True)
    t = prepare(df)
    assert t.report.dropped_duplicates == 0 and len(t.y) == 300 + 60 + 60  # none is an exact copy
    where = _split_of(t)
    for text in old_df["text"].head(60):
        spread = {where[text], where[text.upper()], where[text.replace(" ", "   ")]}
        assert len(spread) == 1, (text, spread)
    # A text with no such twin keeps the split it had when rows were split by their exact text.
    monkeypatch.setattr(TextModality, "split_keys", lambda self, keys, rows, report: keys)
    exact = _split_of(prepare(df))
    assert all(where[k] == exact[k] for k in old_df["text"].iloc[60:])


def test_a_picture_saved_again_resized_or_as_a_jpeg_lands_in_the_split_of_its_original(tmp_path, monkeypatch):
    """Copies of one picture in another size or format are not byte-identical, but a model tested on one of them
    after training on the other is scored on what it trained on: a perceptual key keeps them in one split."""
    from automl.modalities.image import ImageModality

    rng = np.random.default_rng(0)
    rows = []
    for i in range(90):  # smooth, distinct pictures: random 6x6 colour fields blown up to 64 px
        img = Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)).resize((64, 64), Image.BICUBIC)
        img.save(tmp_path / f"p{i}.png")
        rows.append({"file": str(tmp_path / f"p{i}.png"), "label": "abc"[i % 3]})
        if i < 30:
            img.resize((40, 40), Image.LANCZOS).save(tmp_path / f"p{i}_small.jpg", quality=85)
            rows.append({"file": str(tmp_path / f"p{i}_small.jpg"), "label": "abc"[i % 3]})
    df = pd.DataFrame(rows)

    def split_of(t) -> dict:
        out = {}
        for name, idx in t.splits.items():
            for i in idx:
                out[Path(df["file"][t.row_index[i]]).name] = name
        assert len(out) == len(df)  # no copy dropped as a duplicate, none lost
        return out

    t = prepare(df)
    where = split_of(t)
    assert all(where[f"p{i}.png"] == where[f"p{i}_small.jpg"] for i in range(30)), where
    # A picture with no copy keeps the split it had when rows were split by their exact bytes.
    monkeypatch.setattr(ImageModality, "split_keys", lambda self, keys, rows, report: keys)
    exact = split_of(prepare(df))
    assert all(where[f"p{i}.png"] == exact[f"p{i}.png"] for i in range(30, 90))
    assert any(exact[f"p{i}.png"] != exact[f"p{i}_small.jpg"] for i in range(30))  # what the key prevents


# ---------------------------------------------------------------------------- 8. a truncated JPEG

def _jpegs(tmp_path, n=4):
    rng = np.random.default_rng(0)
    rows = []
    for c in ("cat", "dog"):
        for i in range(n):
            p = tmp_path / f"{c}_{i}.jpg"
            Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(p, quality=90)
            rows.append({"file": p.name, "label": c})
    return rows


def test_a_truncated_jpeg_is_refused_or_dropped_not_trained_on_as_a_blank_image(tmp_path):
    rows = _jpegs(tmp_path)
    raw = (tmp_path / "cat_0.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(raw[: len(raw) // 2])  # a download that stopped half way
    with Image.open(tmp_path / "cut.jpg") as img:
        img.verify()  # what intake checked before: passes
    rows.append({"file": "cut.jpg", "label": "dog"})
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(DataError, match=r"cut\.jpg") as err:
        prepare(str(tmp_path / "d.csv"), drop_bad_images=False)
    assert "row 8" in str(err.value) and "truncated" in str(err.value)
    t = prepare(str(tmp_path / "d.csv"))  # drop_bad_images=True: dropped and reported
    assert [d["file"] for d in t.report.dropped_unreadable_images] == ["cut.jpg"]
    assert len(t.y) == 8 and all(not v.endswith("cut.jpg") for v in t.images.values)
    as_bytes = pd.DataFrame({"img": [(tmp_path / r["file"]).read_bytes() for r in rows],
                             "label": [r["label"] for r in rows]})
    with pytest.raises(DataError, match="row 8"):
        prepare(as_bytes, drop_bad_images=False)


# ---------------------------------------------------------------------------- 7. TorchScript parity enforced

def _image_export_parts(classes=("a", "b", "c")):
    import torch

    from automl import models
    from automl.data.encoders import ImageEncoder
    from automl.export.manifest import ExportManifest, Preprocessing

    torch.manual_seed(0)
    model = models.build("timm/resnet10t:scratch", len(classes)).eval()
    manifest = ExportManifest(task="multiclass", modality="image", classes=list(classes), label_column="label",
                              input_columns=["image"], metric="accuracy",
                              backbone=models.BackboneSpec("timm", "resnet10t", pretrained=False),
                              preprocessing=Preprocessing("image", size=16, mean=[0.5] * 3, std=[0.5] * 3,
                                                          storage_size=16),
                              hyperparameters={"dropout": 0.0})
    return model, ImageEncoder(16, [0.5] * 3, [0.5] * 3), manifest


def test_a_torchscript_copy_that_disagrees_with_pytorch_is_not_kept(tmp_path):
    import json

    from automl import load
    from automl.export.writer import write_export

    model, enc, manifest = _image_export_parts()
    good = write_export(tmp_path / "good", model, enc, manifest, formats=True)
    assert (good / "model.pt").exists()
    assert json.loads((good / "config.json").read_text())["exports"]["torchscript"]["max_abs_diff"] < 1e-3

    class Drifting(type(model)):
        """Python-side state that tracing freezes: the traced copy computes something else than the model."""

        def forward(self, x):
            self.calls = getattr(self, "calls", 0) + 1
            return super().forward(x) + self.calls

    model, enc, manifest = _image_export_parts()
    model.__class__ = Drifting
    with pytest.warns(UserWarning, match="TorchScript"):
        bad = write_export(tmp_path / "bad", model, enc, manifest, formats=True)
    cfg = json.loads((bad / "config.json").read_text())
    assert not (bad / "model.pt").exists() and "model.pt" not in cfg["files"]
    assert "differs from PyTorch" in cfg["exports"]["torchscript"]["error"]
    assert load(bad).classes == ["a", "b", "c"]  # the safetensors export still stands


# ---------------------------------------------------------------------------- 3. regression updates and re-scores

def _regression_export(path, seed: int, x: np.ndarray, y: np.ndarray, scale=(10.0, 2.0)):
    """A real (untrained) one-output image model exported as a regression model, with its test split stored."""
    import torch

    from automl import models
    from automl.data.encoders import ImageEncoder
    from automl.diagnostics.update import save_test_split
    from automl.export.manifest import ExportManifest, Preprocessing
    from automl.export.writer import write_export

    torch.manual_seed(seed)
    model = models.build("timm/resnet10t:scratch", 1).eval()
    manifest = ExportManifest(task="regression", modality="image", classes=[], label_column="price",
                              input_columns=["image"], metric="r2", target_scale=list(scale),
                              backbone=models.BackboneSpec("timm", "resnet10t", pretrained=False),
                              preprocessing=Preprocessing("image", size=16, mean=[0.5] * 3, std=[0.5] * 3,
                                                          storage_size=16),
                              hyperparameters={"dropout": 0.0})
    store = [lambda d, m: setattr(m, "test_split", save_test_split(d, "image", x, y, []))]
    return write_export(path, model, ImageEncoder(16, [0.5] * 3, [0.5] * 3), manifest, formats=False,
                        writers=store)


def _regression_images(n: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    hwc = rng.integers(0, 255, (n, 16, 16, 3), dtype=np.uint8)
    return hwc, np.ascontiguousarray(hwc.transpose(0, 3, 1, 2))


def test_a_regression_champion_is_rescored_with_r2(tmp_path):
    from sklearn.metrics import r2_score

    from automl import load
    from automl.ops.leaderboard import _rescore_champion

    hwc, x = _regression_images()
    champ_dir = _regression_export(tmp_path / "champ", 0, x, np.zeros(len(x), np.float32))
    pred = load(champ_dir).predict(list(hwc))  # what a user gets from the champion on these images
    y = (pred + np.linspace(-0.05, 0.05, len(pred))).astype(np.float32)
    new_dir = _regression_export(tmp_path / "new", 1, x, y)  # the new model's stored test split
    got = _rescore_champion({"export_path": str(champ_dir), "metric": "r2"}, new_dir)
    assert got == pytest.approx(r2_score(y.astype(np.float64), pred), abs=1e-4)
    neg = _rescore_champion({"export_path": str(champ_dir), "metric": "neg_rmse"}, new_dir)
    assert neg == pytest.approx(-np.sqrt(np.mean((y.astype(np.float64) - pred) ** 2)), abs=1e-4)


def test_a_regression_update_is_compared_with_its_base_with_r2(tmp_path):
    from automl import load
    from automl.diagnostics.update import compare_with_base

    hwc, x = _regression_images()
    base_dir = _regression_export(tmp_path / "base", 0, x, np.zeros(len(x), np.float32))
    base_pred = load(base_dir).predict(list(hwc))
    y_old = base_pred.astype(np.float32)  # the base is perfect on its own test split
    base_dir = _regression_export(tmp_path / "base", 0, x, y_old)
    new = load(_regression_export(tmp_path / "new", 1, x, y_old, scale=(10.0, 3.0)))
    p = new.predict(list(hwc))
    y_new = (p + 0.05 * p.std() * np.linspace(-1, 1, len(x))).astype(np.float32)
    out = compare_with_base(base_dir, new.model, new.encoder, [], x, [float(v) for v in y_new], "r2", 0.05, "image",
                            target_scale=[10.0, 3.0])
    assert out["old_test"]["old"] == pytest.approx(1.0, abs=1e-5)  # the base on its own stored test split
    assert out["new_test"]["new"] > 0.99 > out["new_test"]["old"]
    assert out["forgetting"] == pytest.approx(1.0 - out["old_test"]["new"])
    assert out["decision"] == ("champion" if out["forgetting"] <= 0.05 else "challenger")


def test_diagnose_of_a_regression_update_does_not_crash(tmp_path):
    import pandas as pd

    from automl import load, stages
    from automl.budget import Budget
    from automl.data.inputs import Inputs
    from automl.options import FinetuneOptions

    hwc, x = _regression_images(40, seed=3)
    base_dir = _regression_export(tmp_path / "base", 0, x[:6], np.linspace(8, 12, 6).astype(np.float32))
    df = pd.DataFrame({"image": list(hwc), "label": np.linspace(5.0, 15.0, len(hwc)) + 0.123})
    opts = FinetuneOptions.from_kwargs(output_dir=str(tmp_path / "out"), base_model=str(base_dir),
                                       task="regression", find_label_errors=False)
    prepared = stages.prepare(df, data=opts.data, search=opts.search, update=opts.update, output=opts.output)
    inputs = Inputs.materialise(prepared.task, 16, tmp_path / "cache")
    update = load(base_dir)
    final = stages.FinalModel(update.model, update.encoder, update.manifest.backbone, {})
    diag = stages.diagnose(prepared, None, inputs, None, final, Budget(None), search=opts.search,
                           diagnostics=opts.diagnostics, update=opts.update, output=opts.output)
    assert diag.update["metric"] == "r2" and diag.update["forgetting_checked"]


# ---------------------------------------------------------------------------- 11. a text export in plain transformers

TEXTS = [["good match today"], ["a spicy pizza recipe"], ["my new laptop and phone"], ["the coach of the team"]]


def _text_export(tmp_path, minilm_dir, pooling: str, classes=("food", "sport", "tech")):
    """A MiniLM classifier with moved ('fine-tuned') encoder weights, exported."""
    import torch
    from transformers import AutoModel

    from automl import models
    from automl.data.encoders import TextEncoder
    from automl.export.manifest import ExportManifest, Preprocessing
    from automl.export.writer import write_export
    from automl.models.hf_family import TextClassifier, load_tokenizer

    torch.manual_seed(0)
    encoder = AutoModel.from_pretrained(minilm_dir)
    encoder.pooler = None
    model = TextClassifier(encoder, len(classes), pooling).eval()
    with torch.no_grad():
        for p in model.encoder.encoder.layer[-1].parameters():  # weights the original checkpoint does not have
            p.add_(torch.randn_like(p) * 0.05)
        model.head.weight.normal_(0, 0.5)
    manifest = ExportManifest(task="multiclass", modality="text", classes=list(classes), label_column="label",
                              input_columns=["text"], metric="accuracy",
                              backbone=models.BackboneSpec("hf", minilm_dir, pretrained=False),
                              preprocessing=Preprocessing("text", max_length=32, pooling=pooling),
                              hyperparameters={"dropout": 0.0})
    enc = TextEncoder(load_tokenizer(minilm_dir), 32)
    return write_export(tmp_path / f"text-{pooling}", model, enc, manifest, formats=False), model


def test_a_first_token_text_export_loads_in_transformers_with_the_same_probabilities(tmp_path, minilm_dir):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from automl import load

    export, _ = _text_export(tmp_path, minilm_dir, "cls")
    hf = AutoModelForSequenceClassification.from_pretrained(str(export / "hf")).eval()
    tok = AutoTokenizer.from_pretrained(str(export / "hf"))
    assert hf.config.id2label == {0: "food", 1: "sport", 2: "tech"} and hf.config.num_labels == 3
    batch = tok([t[0] for t in TEXTS], padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        theirs = torch.softmax(hf(**batch).logits, 1).numpy()
    ours = load(export).predict_proba(pd.DataFrame({"text": [t[0] for t in TEXTS]}))
    assert list(ours.columns) == ["food", "sport", "tech"]
    np.testing.assert_allclose(theirs, ours.to_numpy(), atol=1e-4)
    assert load(export).manifest.exports["transformers"]["loads_with"] == "AutoModelForSequenceClassification"


def test_a_mean_pooled_text_export_holds_the_fine_tuned_encoder_and_says_how_to_use_it(tmp_path, minilm_dir):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from automl import load

    export, model = _text_export(tmp_path, minilm_dir, "mean")
    info = load(export).manifest.exports["transformers"]
    assert info["loads_with"] == "AutoModel" and "mean pooling" in info["why_not_sequence_classification"]
    cfg = AutoConfig.from_pretrained(str(export / "hf"))
    assert cfg.num_labels == 3 and cfg.id2label == {0: "food", 1: "sport", 2: "tech"}
    readme = (export / "hf" / "README.md").read_text()
    assert "mean pooling" in readme and "head.weight" in readme
    # What the README promises, done as it says: the fine-tuned encoder, mean pooling, the head from the export.
    encoder = AutoModel.from_pretrained(str(export / "hf")).eval()
    tok = AutoTokenizer.from_pretrained(str(export / "hf"))
    w = load_file(str(export / "model.safetensors"))
    batch = tok([t[0] for t in TEXTS], padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    logits = ((hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)) @ w["head.weight"].T + w["head.bias"]
    ours = load(export).predict_proba(pd.DataFrame({"text": [t[0] for t in TEXTS]})).to_numpy()
    np.testing.assert_allclose(torch.softmax(logits, 1).numpy(), ours, atol=1e-4)
    original = AutoModel.from_pretrained(minilm_dir).eval()
    with torch.no_grad():  # the weights in hf/ are the fine-tuned ones, not the checkpoint's
        assert (original(**batch).last_hidden_state - hidden).abs().max() > 1e-2


# ---------------------------------------------------------------------------- 10. the leaderboard on a cluster

def test_a_cluster_refresh_keeps_the_database_password_out_of_the_job_command(tmp_path):
    from automl.ops.leaderboard import refresh_job

    url = "postgresql+psycopg://nightly:s3cret-pw@db.internal/automl"
    entrypoint, env = refresh_job(tmp_path / "suite.yaml", url, "digits", force=True)
    assert "s3cret-pw" not in entrypoint and "--db" not in entrypoint
    assert "--only digits" in entrypoint and "--force" in entrypoint
    assert env["env_vars"]["AUTOML_LEADERBOARD_DB"] == url and "AUTOML_SQLITE_JOURNAL" not in env["env_vars"]
    _, env = refresh_job(tmp_path / "suite.yaml", f"sqlite:///{tmp_path}/lb.db", "digits")
    assert env["env_vars"]["AUTOML_SQLITE_JOURNAL"] == "delete"  # a SQLite file the jobs share: no WAL


def test_the_leaderboard_cli_reads_its_database_from_the_environment(tmp_path):
    import os
    import subprocess
    import sys

    db = tmp_path / "from-env.db"
    env = {**os.environ, "AUTOML_LEADERBOARD_DB": f"sqlite:///{db}"}
    out = subprocess.run([sys.executable, "-m", "automl", "leaderboard", "show"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert db.exists() and not (tmp_path / "automl_leaderboard.db").exists()


def _ctrl_c_pressed(*args, **kwargs):
    """What a function stopped by Ctrl-C does: raise KeyboardInterrupt."""
    raise KeyboardInterrupt


def test_ctrl_c_during_a_refresh_marks_its_run_interrupted_and_the_next_refresh_runs_it(tmp_path, monkeypatch):
    """Ctrl-C during a refresh left its run "running" (until a later refresh found it stale) and printed a run's
    advice (resume=True), which a refresh does not take. The run is marked interrupted at once, the refresh stops
    with its own advice, and the next refresh runs that dataset. (The pipeline is replaced: this is the refresh's
    bookkeeping; Ctrl-C inside a real search is test_fault_tolerance's.)"""
    import yaml

    from automl import api
    from automl.errors import RunInterrupted
    from automl.ops import leaderboard
    from automl.ops.store import Store

    (tmp_path / "suite.yaml").write_text(yaml.safe_dump({
        "defaults": {"time_budget": None, "max_trials": 1, "output_root": str(tmp_path / "out")},
        "datasets": [{"name": "digits", "data": str(tmp_path / "d.csv"), "label": "label"}]}))
    store = Store(f"sqlite:///{tmp_path}/lb.db")

    monkeypatch.setattr(api, "auto_finetune", _ctrl_c_pressed)
    # Caught as any KeyboardInterrupt: a bare one escaping the refresh would otherwise stop pytest itself.
    with pytest.raises(KeyboardInterrupt) as stopped:
        leaderboard.refresh(tmp_path / "suite.yaml", store, progress=False)
    assert isinstance(stopped.value, RunInterrupted), repr(stopped.value)
    assert re.search("Stopped by Ctrl-C while refreshing 'digits'.*Fix: refresh again", str(stopped.value))
    runs = store.table("runs")
    assert list(runs["status"]) == ["interrupted"] and runs["finished_at"].notna().all(), runs

    def failed(*args, **kwargs):
        raise RuntimeError("the next refresh ran it")

    monkeypatch.setattr(api, "auto_finetune", failed)
    (result,) = leaderboard.refresh(tmp_path / "suite.yaml", store, progress=False)
    assert result["status"] == "failed" and "the next refresh ran it" in result["reason"], result


def test_cli_predict_that_fails_mid_file_leaves_the_previous_output_and_names_the_files_row(tmp_path, capsys):
    """`automl predict --output` wrote chunk by chunk into the output: an unreadable image in a later chunk left a
    partial file that looked whole, in place of the one before, and the error named the row's place in its chunk
    (3) instead of in the file (7). The output is now written beside and renamed over at the end."""
    import pandas as pd
    from PIL import Image

    from automl import load
    from automl.ops.cli import main as cli_main

    export = Path(__file__).parent / "fixtures" / "v1_image_export"
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    table = pd.DataFrame({"image": [f"{i}.png" for i in range(10)]})
    table.assign(image=lambda d: d["image"].where(d.index != 7, "missing.png")).to_csv(tmp_path / "bad.csv", index=False)
    table.to_csv(tmp_path / "good.csv", index=False)
    preds = tmp_path / "preds.csv"
    preds.write_text("yesterday's predictions\n")
    capsys.readouterr()
    argv = ["predict", str(export), str(tmp_path / "bad.csv"), "--output", str(preds), "--batch-size", "4"]
    assert cli_main(argv) == 2
    assert "Row 7 of column 'image': file does not exist" in capsys.readouterr().err
    assert preds.read_text() == "yesterday's predictions\n"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".png")) == \
        ["bad.csv", "good.csv", "preds.csv"]  # no partial file left beside it
    argv[2] = str(tmp_path / "good.csv")
    assert cli_main(argv) == 0
    got = pd.read_csv(preds, index_col=0)
    want = load(export).predict_proba(table.assign(image=[str(tmp_path / f) for f in table["image"]]))
    assert len(got) == 10 and np.allclose(got[[f"proba_{c}" for c in want.columns]].to_numpy(), want.to_numpy(),
                                          atol=1e-5)


def test_ctrl_c_while_submit_waits_says_the_jobs_keep_running_and_how_to_follow_them(monkeypatch, capsys):
    """`automl submit --wait`, stopped with Ctrl-C, printed a traceback from the polling loop; the jobs run on in the
    cluster, which the user needs to know, with the commands to follow or stop them. (Submitting and waiting are
    replaced: the CLI's answer is what is checked; real jobs are test_jobs'.)"""
    from automl.ops import jobs
    from automl.ops.cli import main as cli_main

    monkeypatch.setattr(jobs, "submit_batch", lambda manifest, address, ship_package: (
        "b123", [{"name": "digits", "submission_id": "raysubmit_1", "output": "/runs/digits"}]))

    monkeypatch.setattr(jobs, "wait", _ctrl_c_pressed)
    monkeypatch.setenv("COLUMNS", "300")  # rich's lines unwrapped
    try:
        code = cli_main(["submit", "batch.yaml", "--address", "http://127.0.0.1:8265", "--wait"])
    except KeyboardInterrupt:  # caught here: escaping, it would stop pytest itself
        pytest.fail("Ctrl-C escaped `automl submit --wait` as a traceback")
    assert code == 130
    out = capsys.readouterr().out
    assert ("stopped waiting; the jobs keep running. Follow with: automl jobs list --batch b123 --address "
            "http://127.0.0.1:8265; stop one with: automl jobs stop SUBMISSION_ID") in out, out


def test_resume_in_a_folder_with_no_run_says_it_starts_afresh(tmp_path, capsys, text_df):
    """resume=True where no run was interrupted (a mistyped output_dir) started a fresh run without a word, spending
    the budget the user meant for a resume. It is said before anything runs; a folder with a run says nothing."""
    from automl import stages
    from automl.options import FinetuneOptions

    def prepared(out):
        opts = FinetuneOptions.from_kwargs(output_dir=str(out), resume=True, time_budget_s=60)
        stages.prepare(text_df, data=opts.data, search=opts.search, update=opts.update, output=opts.output)
        return capsys.readouterr().err

    said = prepared(tmp_path / "typo")
    assert f"automl: resume=True, but {tmp_path / 'typo'} holds no interrupted run to resume (no plan.json): " \
           "starting afresh" in said, said
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "plan.json").write_text("{}")  # what a run writes once it has planned
    assert "resume=True" not in prepared(tmp_path / "run")


def test_sqlite_on_a_shared_filesystem_keeps_the_rollback_journal(tmp_path, monkeypatch):
    from automl.ops.store import Store, sqlite_journal_mode

    mounts = "/dev/sda1 / ext4 rw 0 0\nnas:/export/automl /shared nfs4 rw 0 0\nfs /mnt/x fuse.sshfs rw 0 0\n"
    assert sqlite_journal_mode("/shared/lb/automl_leaderboard.db", mounts) == "delete"
    assert sqlite_journal_mode("/mnt/x/lb.db", mounts) == "delete"
    assert sqlite_journal_mode("/home/me/lb.db", mounts) == "wal"
    assert sqlite_journal_mode("/sharedness/lb.db", mounts) == "wal"  # a prefix of the name is not the mount

    def mode(store):
        with store.engine.connect() as c:
            return c.exec_driver_sql("PRAGMA journal_mode").scalar()

    monkeypatch.delenv("AUTOML_SQLITE_JOURNAL", raising=False)
    local = Store(f"sqlite:///{tmp_path}/local.db")
    assert mode(local) == "wal"  # tmp_path is on a local disk here
    local.engine.dispose()
    monkeypatch.setenv("AUTOML_SQLITE_JOURNAL", "delete")
    assert mode(Store(f"sqlite:///{tmp_path}/local.db")) == "delete"  # and an old WAL database is switched back


def test_input_size_and_length_with_when_variants_leave_the_choice_to_the_plan():
    """Issue 25.9: `image_size` / `max_length` given as `when` variants crashed after Ray started (`.get` on a
    list); a variant is not a pin, and the planned size covers every variant's values."""
    from automl.search.plan import planned_size
    from automl.search.space import SearchSpace, load_space

    def with_variants(modality, name, variants):
        d = load_space("cpu_small", modality).to_dict()
        d["parameters"][name] = variants
        return SearchSpace.from_dict(d)

    image = with_variants("image", "image_size", [
        {"type": "choice", "values": [64, 96], "when": {"backbone": ["efficientnet-lite0"]}},
        {"type": "fixed", "value": 32}])
    text = with_variants("text", "max_length", [
        {"type": "fixed", "value": 128, "when": {"backbone": ["minilm-l6"]}}, {"type": "fixed", "value": 64}])
    assert image.pinned("image_size") is None and text.pinned("max_length") is None
    assert planned_size(image) == 96
    assert load_space("cpu_small", "image", {"image_size": 40}).pinned("image_size") == 40


def test_a_later_stages_reserve_holds_until_that_stage_starts():
    """Issue 25.6: finalise holds back evaluate's and export's time (Budget.reserve) before it asks whether a
    retrain or a cross-fit is affordable; each stage releases its own reserve when it starts."""
    from automl.budget import Budget

    b = Budget(100.0)
    b.reserve("evaluate", 5.0)
    b.reserve("export", 30.0)
    assert not b.can_afford(70.0) and b.can_afford(60.0)
    with b.stage("evaluate"):
        assert b.can_afford(66.0) and not b.can_afford(70.0)
    with b.stage("export"):
        assert b.can_afford(90.0)


def test_the_retrain_and_the_cross_fit_are_priced_at_the_winners_own_speed_not_the_start_points():
    """Issue 25.6: a head-only start point priced the plan's retrain and cross-fit; a winner that fine-tunes
    every layer is ten times slower a report. The reserve finalise holds for the cross-fit is the winner's."""
    from automl.search.plan import Plan
    from automl.search.space import load_space

    plan = Plan(space=load_space("image_classification", "image"), storage_size=32, resources={"cpu": 1},
                concurrency=2, retrain_cpus=2, search_ends_at_s=40, last_start_at_s=38, max_trials=None, reports=4,
                trial_s=3.0, retrain_s=18.0, retrain_fixed_s=15.0, cross_fit_s=9.0)
    trials = pd.DataFrame({"trial_id": ["head", "all"], "time_s": [3.0, 20.0], "epochs_run": [4, 2]})
    # 10 s a report x 4 reports x (1.2 x the training rows) = 48 s; the start point's plan said 3 s.
    assert plan.winner_price(trials, "all", rows_ratio=1.2) == pytest.approx(48.0)
    # Two folds side by side in the two trial slots, each on 0.5 x (train + validation) rows.
    assert plan.cross_fit_price(trials, "all", 100, 120, folds=2) == pytest.approx(5.0 + 10 * 4 * 0.6)
    assert plan.cross_fit_price(trials, "all", 100, 120, folds=4) == pytest.approx(5.0 + 10 * 4 * 0.9 * 2)
    # The start point winning: the plan's own price stands.
    assert plan.cross_fit_price(trials, "head", 100, 120, folds=2) == pytest.approx(9.0)


def test_a_winner_priced_a_little_above_the_time_left_is_still_retrained_paced_into_it():
    """Oxygen at 600 s: a run exported best weights at 82% of its budget with the ~100 s held for a retrain unused
    (a winner priced above the hold is what takes that branch). Now the retrain is paced into the hold when it holds
    at least MIN_RETRAIN_SHARE of the winner's training; far less than that still exports best weights."""
    from automl.search.plan import Plan
    from automl.search.space import load_space
    from automl.stages import MIN_RETRAIN_SHARE, no_retrain_reason

    plan = Plan(space=load_space("image_classification", "image"), storage_size=48, resources={"cpu": 1},
                concurrency=2, retrain_cpus=2, search_ends_at_s=485, last_start_at_s=400, max_trials=None,
                reports=8, trial_s=80.0, retrain_s=100.0, retrain_fixed_s=15.0)
    # The winner: 15 s a report x 8 reports x 1.25 (train+validation) = 150 s of training, 165 s in all.
    trials = pd.DataFrame({"trial_id": ["start", "lite2"], "time_s": [64.0, 120.0], "epochs_run": [8, 8]})
    price = plan.retrain_price(trials, "lite2", rows_ratio=1.25)
    assert price == pytest.approx(165.0)
    assert plan.retrain_price(trials, "start", rows_ratio=1.25) == pytest.approx(100.0)  # the plan's own price
    share = plan.retrain_share(price, 100.0)
    assert share == pytest.approx(85 / 150) and share < MIN_RETRAIN_SHARE
    assert plan.retrain_share(price, 120.0) == pytest.approx(105 / 150) and 105 / 150 >= MIN_RETRAIN_SHARE
    assert no_retrain_reason(True, "auto", plan.retrain_share(price, 120.0)) is None
    why = no_retrain_reason(True, "auto", share)
    assert why.startswith("the search left no time for a retrain") and "57%" in why
    assert no_retrain_reason(True, True, share) is None  # forced: paced into what is left
    assert no_retrain_reason(True, False, 2.0) == "retrain=False"
    assert no_retrain_reason(False, "auto", 2.0) == "the plan had no time for a retrain"
    # The winner's search-time speed was measured beside another trial on one CPU: the retrain runs alone with the
    # node's CPUs, and the plan says how much faster (Plan.retrain_speedup).
    assert replace(plan, retrain_speedup=1.5).retrain_price(trials, "lite2", rows_ratio=1.25) == pytest.approx(115.0)


def test_a_request_whose_images_decode_to_too_many_pixels_is_refused_before_decoding():
    """A PNG of a few KB can decode to 36 MP; a request of such images is refused (413) from the headers alone, and
    decode_image refuses an image over MAX_PIXELS before decoding it."""
    import base64
    import io

    from PIL import Image

    from automl.data.images import MAX_PIXELS, ImageDecodeError, decode_image
    from automl.ops.serve import MAX_REQUEST_PIXELS, RequestError, parse_inputs

    def png(side: int) -> bytes:
        buf = io.BytesIO()
        Image.new("L", (side, side)).save(buf, format="PNG", optimize=True)
        return buf.getvalue()

    big = png(6000)
    assert len(big) < 200_000 and 6000 * 6000 < MAX_PIXELS < 2 * 6000 * 6000
    one = parse_inputs({"inputs": [base64.b64encode(big).decode()]}, "image", 1, 8)
    assert one == [big]
    with pytest.raises(RequestError) as err:
        parse_inputs({"inputs": [base64.b64encode(big).decode()] * 2}, "image", 1, 8)
    assert err.value.status == 413 and f"at most {MAX_REQUEST_PIXELS:,}" in str(err.value)
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(png(7000))


def test_a_regression_export_reports_rmse_and_mae_of_its_own_predictions(tmp_path):
    """README: regression is scored with R², RMSE and MAE: evaluate() gives sklearn's values for what predict()
    returns on the same rows."""
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    from automl import load

    hwc, x = _regression_images()
    m = load(_regression_export(tmp_path / "reg", 0, x, np.zeros(len(x), np.float32), scale=(10.0, 4.0)))
    pred = m.predict(list(hwc))
    y = np.linspace(0.0, 20.0, len(pred))
    got = m.evaluate(pd.DataFrame({"image": list(hwc), "price": y}), label="price")
    assert got["rmse"] == pytest.approx(mean_squared_error(y, pred) ** 0.5, rel=1e-6)
    assert got["mae"] == pytest.approx(mean_absolute_error(y, pred), rel=1e-6)
    assert got["r2"] == pytest.approx(r2_score(y, pred), rel=1e-6)
    assert np.ptp(pred) > 0 and abs(np.mean(pred) - 10.0) < 8.0  # numbers on the target's scale, not standardised


def test_an_export_stores_at_most_5000_test_rows_each_with_its_own_label(tmp_path):
    """README: up to 5,000 test rows are kept in the export for later forgetting checks; a larger test split is
    sampled, never cut at the front, and every stored input keeps its label."""
    from automl.diagnostics.update import MAX_STORED, load_test_split, save_test_split

    n = MAX_STORED + 37
    texts = [(f"row {i}",) for i in range(n)]
    y = np.arange(n) % 3
    assert save_test_split(tmp_path, "text", texts, y, ["a", "b", "c"]) == "test_split.jsonl"
    inputs, labels = load_test_split(tmp_path)
    rows = [int(t[0].split()[1]) for t in inputs]
    assert MAX_STORED == 5000 and len(rows) == 5000 and len(set(rows)) == 5000
    assert max(rows) >= 5000  # a sample of the whole split, not its first 5,000 rows
    assert labels == [["a", "b", "c"][r % 3] for r in rows]


def test_the_test_split_is_sampled_to_the_time_left_and_the_card_says_so(monkeypatch, digits_df, tmp_path):
    """Measured: 20,000 images at a pinned 128 px, 240 s, ran 271 s: the final model was an ensemble of two backbones,
    so scoring the 1,946 test rows took 46 s where the plan had priced one model's 19. Where the whole split no longer
    fits the time left, a stratified sample of it is scored (never below the floor, here lowered to fit this tiny
    split); with time enough, or no budget, every row is. The card says how many rows it was tested on."""
    import time

    import torch
    from sklearn.metrics import accuracy_score

    from automl import models, stages
    from automl.budget import Budget
    from automl.data.encoders import ImageEncoder
    from automl.data.inputs import Inputs, sample_rows
    from automl.data.intake import prepare
    from automl.export.card import _tested

    task = prepare(digits_df)
    prepared = stages.Prepared(task, "accuracy", tmp_path)
    inputs = Inputs.materialise(task, 16, tmp_path / "inputs")
    torch.manual_seed(0)
    final = stages.FinalModel(models.build("timm/resnet10t:scratch", 4).eval(), ImageEncoder(16, [0.5] * 3, [0.5] * 3),
                              models.resolve("timm/resnet10t:scratch"), {"image_size": 16})
    monkeypatch.setattr(stages, "MIN_TEST_ROWS", 10)
    te = inputs.split("test")
    everything = stages.evaluate(prepared, inputs, final, Budget(3600.0))
    assert "test_rows" not in everything and everything == stages.evaluate(prepared, inputs, final)

    spent = Budget(60.0, start=time.monotonic() - 61.0)  # nothing left: the floor's sample
    got = stages.evaluate(prepared, inputs, final, spent)
    rows = sample_rows(te, task.y[te], 10)
    assert got["test_rows"]["scored"] == len(rows) < got["test_rows"]["of"] == len(te), got["test_rows"]
    with torch.no_grad():
        proba = final.model(final.encoder.batch(inputs.pick(rows), np.arange(len(rows)))).numpy()
    assert got["accuracy"] == pytest.approx(accuracy_score(task.y[rows], proba.argmax(1)))
    said = _tested(got, {"split_sizes": {"test": len(te)}})
    assert said.startswith(f"a stratified {len(rows)} of the {len(te)} (scoring all {len(te)} would have taken ~")
    assert said.endswith("past the time budget)") and _tested(everything, {"split_sizes": {"test": len(te)}}) == str(len(te))


QUIET_RETRAIN_DRIVER = """
import sys
import numpy as np
import ray
from automl.data.trial_data import TrialData
from automl.training.retrain import retrain
ray.init(address=sys.argv[1], log_to_driver=True)  # as a user's own ray.init: worker logs stream to this process
rng = np.random.default_rng(0)
data = TrialData("image", 2, rng.integers(0, 255, (64, 3, 16, 16), dtype=np.uint8), np.arange(64) % 2)
retrain({"backbone": "timm/resnet10t:scratch", "image_size": 16, "batch_size": 16}, data, epochs=2,
        schedule_epochs=2, storage_path=sys.argv[2])
ray.get(ray.remote(lambda: print("WORKER LOGS REACH THIS DRIVER", flush=True)).remote())
"""


@pytest.mark.slow
def test_a_retrain_where_the_user_started_ray_with_worker_logs_prints_none_of_ray_trains_info(ray_session, tmp_path):
    """Where the user's own ray.init streams worker logs, a retrain printed Ray Train's INFO lines: the controller's
    ("Requesting resources", "Started training worker group"), the worker's process group and one line a report
    ("Reporting training result 1: TrainingReport(...)"). The driver reads its stderr until a task's print after the
    retrain has arrived, so the lines before it had time to arrive too."""
    import select
    import subprocess
    import sys

    import ray

    proc = subprocess.Popen([sys.executable, "-c", QUIET_RETRAIN_DRIVER, ray.get_runtime_context().gcs_address,
                             str(tmp_path / "train")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        while True:
            ready, _, _ = select.select([proc.stdout], [], [], 180)  # a safety net: the marker is the event
            line = proc.stdout.readline() if ready else ""
            if not line:
                break
            lines.append(line)
            if "WORKER LOGS REACH THIS DRIVER" in line:
                break
    finally:
        proc.kill()
        proc.wait(30)
    out = "".join(lines)
    assert "WORKER LOGS REACH THIS DRIVER" in out, out[-3000:]
    train_info = [ln for ln in lines if re.search(r"\((TrainController|RayTrainWorker) pid=\d+\)", ln)
                  and "core_worker.cc" not in ln]  # Ray's C++ log of its PreemptionWatcher is not Ray Train's INFO
    assert train_info == [], "".join(train_info)
