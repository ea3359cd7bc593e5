"""Per-group metrics, and exports that state (and can shed) the user data they carry."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from automl import DataError, load
from automl.metrics import group_metrics
from automl.ops.cli import main as cli_main

FIXTURES = Path(__file__).parent / "fixtures"


def test_per_group_metrics_match_a_hand_computed_table():
    y = np.array([0, 0, 1, 1, 0, 1, 0, 1, 1, 0, 0, 1])
    pred = np.array([0, 0, 1, 1, 0, 1, 1, 0, 0, 1, 0, 1])
    proba = np.eye(2)[pred]
    groups = np.array(["a"] * 6 + ["b"] * 5 + ["c"])
    out = group_metrics(y, proba, groups, "accuracy", 2, "region")
    table = {r["group"]: r for r in out["table"]}
    # a: all 6 right; b: rows 6-10 -> 1 of 5 right; c: one row (listed, not compared: support < 5)
    assert table["a"]["support"] == 6 and table["a"]["accuracy"] == 1.0
    assert table["b"]["support"] == 5 and table["b"]["accuracy"] == pytest.approx(accuracy_score(y[6:11], pred[6:11]))
    assert table["b"]["f1_macro"] == pytest.approx(f1_score(y[6:11], pred[6:11], average="macro"))
    assert table["c"]["support"] == 1
    assert out["gap"] == pytest.approx(1.0 - 0.2) and out["flagged"] == ["b"] and out["column"] == "region"


def test_model_evaluate_breaks_metrics_down_by_a_group_column_it_does_not_use(digits_df):
    m = load(FIXTURES / "v1_image_export")
    df = digits_df[digits_df["label"] < 3].head(60).assign(site=lambda d: np.where(np.arange(len(d)) % 2, "x", "y"))
    res = m.evaluate(df, groups="site")
    pred = m.predict(df)
    for row in res["groups"]["table"]:
        mask = df["site"].to_numpy() == row["group"]
        assert row["support"] == mask.sum()
        assert row["accuracy"] == pytest.approx(accuracy_score(df["label"].to_numpy()[mask], pred[mask].astype(int)))
    assert res["accuracy"] == pytest.approx(accuracy_score(df["label"], pred.astype(int)))
    with pytest.raises(DataError, match="Groups column 'nope' not found"):
        m.evaluate(df, groups="nope")


def test_stripped_export_still_loads_predicts_and_says_what_it_no_longer_carries(tmp_path, digits_df, capsys):
    d = tmp_path / "exp"
    shutil.copytree(FIXTURES / "v1_image_export", d)
    before = load(d).predict_proba(digits_df.head(5))
    assert (d / "test_split.npz").exists()
    assert cli_main(["export", "strip", str(d)]) == 0
    assert "removed test_split.npz" in capsys.readouterr().out
    assert not (d / "test_split.npz").exists() and not list(tmp_path.glob(".exp*"))
    again = load(d)  # the manifest's file list was rewritten: the integrity check still passes
    np.testing.assert_allclose(again.predict_proba(digits_df.head(5)).to_numpy(), before.to_numpy(), atol=1e-6)
    assert again.manifest.test_split is None and "test_split.npz" not in again.manifest.files
    card = (d / "MODEL_CARD.md").read_text()
    assert "The test split is not stored" in card and "| test_split.npz |" not in card
    assert cli_main(["export", "strip", str(d)]) == 0
    assert "nothing" in capsys.readouterr().out


def test_the_card_lists_every_file_and_whether_it_holds_user_data(tmp_path):
    from automl.export.card import model_card

    m = load(FIXTURES / "v1_text_export").manifest
    m.files = {"model.safetensors": 9000, "test_split.jsonl": 2048, "hf/tokenizer.json": 4096, "config.json": 0}
    card = model_card(m, None)
    rows = {line.split("|")[1].strip(): line for line in card.splitlines() if line.startswith("| ") and "KB" in line}
    assert "the test split's texts and labels" in rows["test_split.jsonl"]
    assert rows["model.safetensors"].split("|")[3].strip() == "no"
    assert "{'" not in card  # a document for a person: no Python dict literals
    # The manifest as written to config.json (JSON) reads back with the same file list and gives the same card.
    from automl.export.manifest import ExportManifest

    m.write(tmp_path)
    again = ExportManifest.read(tmp_path, check_files=False)
    assert again.files == m.files and json.loads((tmp_path / "config.json").read_text())["files"] == m.files
    assert all(f"| {name} |" in model_card(again, None) for name in m.files)


def test_a_schema_1_manifest_written_back_reads_back_the_same(tmp_path):
    from automl.export.card import model_card
    from automl.export.manifest import ExportManifest

    m = load(FIXTURES / "v1_text_export").manifest
    m.write(tmp_path)
    again = ExportManifest.read(tmp_path, check_files=False)
    assert again.provenance == m.provenance and again.training == m.training
    assert model_card(again, None) == model_card(m, None)


def test_the_card_says_when_the_suspected_label_errors_are_mostly_model_confusion():
    from automl.export.card import model_card

    m = load(FIXTURES / "v1_text_export").manifest
    m.suspected_label_errors = {"count": 30, "share": 0.03, "expected_precision": 0.9}
    assert "Expected precision: 0.90" in model_card(m, None) and "model confuses" not in model_card(m, None)
    m.suspected_label_errors = {"count": 300, "share": 0.3, "expected_precision": 0.95}
    assert "That is 30% of the rows, more than label noise usually explains" in model_card(m, None)
    assert "which rows" not in model_card(m, None)
    m.suspected_label_errors = {"count": 30, "share": 0.03, "expected_precision": 0.9,
                                "ranked_with": "trial 6c2e4e3a's margins (over its training on the train rows, on "
                                               "its last validation pass for the others)"}
    assert ("How many is confident learning's; which rows, and their order, also weigh trial 6c2e4e3a's margins "
            "(over its training on the train rows") in model_card(m, None)


def test_the_card_says_when_the_retrain_was_paced_into_less_than_its_price():
    """A winner priced above the time the search left is retrained paced into it (stages.MIN_RETRAIN_SHARE): the
    card says so, with its price and what it took; an unpaced retrain's sentence is unchanged."""
    from automl.export.card import model_card

    m = load(FIXTURES / "v1_text_export").manifest
    m.training = {"how": "retrain", "epochs": 12, "time_s": 74.5, "price_s": 91.4, "paced": True}
    assert ("then retrained on train+validation for 12 epochs (paced into the time the search left: its price was "
            "~91.4 s, its retrain took 74 s)") in model_card(m, None)
    m.training = {"how": "retrain", "epochs": 12, "time_s": 74.5, "price_s": 60.0, "paced": False}
    card = model_card(m, None)
    assert "then retrained on train+validation for 12 epochs." in card and "paced" not in card
