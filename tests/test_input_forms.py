"""Every input form the README lists: two run end to end, the rest through intake (where the forms differ)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from automl import auto_finetune, load, prepare

QUICK = dict(time_budget_s=None, max_trials=1, progress=False, find_label_errors=False, export_formats=False,
             retrain=False)
TINY_IMG = {"backbone": "timm/resnet10t:scratch", "image_size": 16, "max_epochs": 3, "lr": 3e-3}


def _colour_images(n=10):
    rng = np.random.default_rng(0)
    for label, colour in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
        for i in range(n):
            arr = np.clip(np.array(colour) + rng.normal(0, 30, (14 + i % 5, 12, 3)), 0, 255).astype(np.uint8)
            yield label, i, arr


@pytest.mark.slow
def test_image_folder_with_split_subfolders_end_to_end(ray_session, tmp_path):
    root = tmp_path / "imgs"
    for label, i, arr in _colour_images():
        split = "train" if i < 6 else "val" if i < 8 else "test"
        (root / split / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).convert("P").save(root / split / label / f"{i}.png")  # palette images
    m = auto_finetune(str(root), output_dir=tmp_path / "out", search_space=TINY_IMG, keep_test_split=False,
                      **QUICK)
    assert m.data_report["split_sizes"] == {"train": 12, "validation": 4, "test": 4}
    preds = load(m.export_dir).predict(str(root / "test"))
    assert (preds == np.array(["blue"] * 2 + ["red"] * 2)).all()  # red vs blue: every test image right
    # README: keep_test_split=False leaves your test images out of the export, and the card says what that costs.
    from automl.diagnostics.update import load_test_split

    assert load_test_split(m.export_dir) is None and load(m.export_dir).manifest.test_split is None
    assert "The test split is not stored" in (Path(m.export_dir) / "MODEL_CARD.md").read_text()


@pytest.mark.slow
def test_parquet_with_a_text_pair_end_to_end(ray_session, tmp_path, text_df):
    df = text_df.assign(context=["short note"] * len(text_df)).rename(columns={"text": "sentence"})
    df.to_parquet(tmp_path / "pairs.parquet")
    m = auto_finetune(str(tmp_path / "pairs.parquet"), output_dir=tmp_path / "out",
                      search_space={"max_epochs": 2, "max_length": 16, "unfreeze": 1, "lr": 3e-4}, **QUICK)
    assert m.manifest.input_columns == ["sentence", "context"] and m.manifest.modality == "text"
    same = load(m.export_dir)
    head = df.head(5)
    preds, proba = same.predict(head), same.predict_proba(head)
    # The reloaded export predicts what the trained model does, a class per row: its most probable one.
    assert list(preds) == list(m.predict(head)) and set(preds) <= {"food", "sport", "tech"}
    assert list(preds) == [proba.columns[i] for i in proba.to_numpy().argmax(1)]
    np.testing.assert_allclose(proba.to_numpy(), m.predict_proba(head).to_numpy(), atol=1e-5)
    # Each row is read as a pair, sentence first and context second (the tokenizer's own pair encoding).
    tok, n, first = same.encoder.tokenizer, same.encoder.max_length, head["sentence"].iloc[0]
    ids = same._inputs(head.iloc[:1])[0]
    assert ids == tok(first, "short note", truncation=True, max_length=n)["input_ids"]
    assert ids != tok(first, truncation=True, max_length=n)["input_ids"]


def test_image_bytes_column():
    rows = []
    for label, i, arr in _colour_images():
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        rows.append({"png": buf.getvalue(), "colour": label})
    t = prepare(pd.DataFrame(rows), label="colour")
    assert t.modality == "image" and t.input_columns == ["png"] and len(t.images) == 20
    assert t.images[0].shape == (14, 12, 3)  # decoded on demand, at the image's own size


def test_pil_image_objects():
    rows = [{"img": Image.fromarray(arr).convert("RGBA"), "label": label} for label, i, arr in _colour_images()]
    t = prepare(pd.DataFrame(rows))
    assert t.modality == "image" and t.input_columns == ["img"]
    assert t.images[0].shape[2] == 3 and t.images[0].dtype == np.uint8  # RGBA composited to RGB


def test_xy_arrays_of_flattened_square_images():
    from sklearn.datasets import load_digits

    d = load_digits()
    t = prepare((d.data[:150], d.target[:150]))
    assert t.modality == "image" and t.images[0].shape == (8, 8, 3) and sorted(set(t.classes)) == list(range(10))


# The README's list, written out: a name dropped from the code must fail here, not vanish from the test.
@pytest.mark.parametrize("name", ["label", "labels", "target", "class", "y", "category", "sentiment", "intent",
                                  "topic", "emotion"])
def test_the_label_column_is_found_by_each_documented_name(name, text_df):
    t = prepare(text_df.rename(columns={"label": name.upper() if name == "target" else name}))
    assert t.label_column.lower() == name and t.classes == ["food", "sport", "tech"]


def test_metric_auto_chooses_macro_f1_on_imbalanced_data(text_df, tmp_path):
    from automl import stages
    from automl.options import FinetuneOptions

    opts = FinetuneOptions.from_kwargs(output_dir=str(tmp_path))
    groups = {"data": opts.data, "search": opts.search, "update": opts.update, "output": opts.output}
    balanced = stages.prepare(text_df, **groups)
    imbalanced = stages.prepare(pd.concat([text_df[text_df["label"] != "tech"], text_df[text_df["label"] == "tech"]
                                           .head(8)]), **groups)
    assert balanced.metric == "accuracy" and imbalanced.task.report.imbalance_ratio >= 3
    assert imbalanced.metric == "f1_macro"


def test_hugging_face_datasets():
    import datasets  # in the test extra: a missing install fails, it is not skipped
    ds = datasets.Dataset.from_dict({"text": [f"good {i}" for i in range(6)] + [f"bad {i}" for i in range(6)],
                                     "label": [1] * 6 + [0] * 6})
    assert prepare(ds).modality == "text"
    test = datasets.Dataset.from_dict({"text": ["good day", "bad day", "good time", "bad time"], "label": [1, 0, 1, 0]})
    t = prepare(datasets.DatasetDict({"train": ds, "test": test}))
    assert len(t.splits["test"]) == 4 and len(t.splits["validation"]) > 0  # validation carved from train
    assert sorted(t.texts[i][0] for i in t.splits["test"]) == ["bad day", "bad time", "good day", "good time"]
