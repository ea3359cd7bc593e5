"""Input forms run end to end through auto_finetune (issue: data intake)."""
from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from automl import auto_finetune, load, prepare

pytestmark = pytest.mark.slow
FAST = dict(time_budget_s=120, max_trials=1, progress=False, find_label_errors=False, export_formats=False)
TINY_IMG = {"backbone": "timm/resnet10t:scratch", "image_size": 16, "max_epochs": 1, "lr": 3e-3}


def _colour_images(n=10):
    rng = np.random.default_rng(0)
    for label, colour in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
        for i in range(n):
            arr = np.clip(np.array(colour) + rng.normal(0, 30, (14 + i % 5, 12, 3)), 0, 255).astype(np.uint8)
            yield label, i, arr


def test_image_folder_with_split_subfolders(ray_session, tmp_path):
    root = tmp_path / "imgs"
    for label, i, arr in _colour_images():
        split = "train" if i < 6 else "val" if i < 8 else "test"
        (root / split / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).convert("P").save(root / split / label / f"{i}.png")  # palette images
    m = auto_finetune(str(root), output_dir=tmp_path / "out", search_space=TINY_IMG, **FAST)
    assert m.meta["data_report"]["split_sizes"] == {"train": 12, "validation": 4, "test": 4}
    assert set(load(m.export_dir).predict(str(root / "test"))) <= {"red", "blue"}


def test_image_bytes_column(ray_session, tmp_path):
    rows = []
    for label, i, arr in _colour_images():
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        rows.append({"png": buf.getvalue(), "colour": label})
    m = auto_finetune(pd.DataFrame(rows), label="colour", output_dir=tmp_path, search_space=TINY_IMG, **FAST)
    assert m.meta["input_columns"] == ["png"] and m.metrics["accuracy"] >= 0.5


def test_parquet_with_a_text_pair(ray_session, tmp_path, text_df):
    df = text_df.assign(context=["short note"] * len(text_df)).rename(columns={"text": "sentence"})
    df.to_parquet(tmp_path / "pairs.parquet")
    m = auto_finetune(str(tmp_path / "pairs.parquet"), output_dir=tmp_path / "out",
                      search_space={"max_epochs": 1, "max_length": 16, "unfreeze": 1, "lr": 3e-4}, **FAST)
    assert m.meta["input_columns"] == ["sentence", "context"] and m.meta["modality"] == "text"
    assert load(m.export_dir).predict(df.head(3)).shape == (3,)


def test_xy_arrays(ray_session, tmp_path):
    from sklearn.datasets import load_digits

    d = load_digits()
    keep = d.target < 3
    m = auto_finetune((d.data[keep][:150], d.target[keep][:150]), output_dir=tmp_path, search_space=TINY_IMG, **FAST)
    assert m.classes == [0, 1, 2] and m.metrics["accuracy"] > 0.4


def test_hugging_face_datasets():
    import datasets  # in the test extra: a missing install fails, it is not skipped
    ds = datasets.Dataset.from_dict({"text": [f"good {i}" for i in range(6)] + [f"bad {i}" for i in range(6)],
                                     "label": [1] * 6 + [0] * 6})
    assert prepare(ds).modality == "text"
    test = datasets.Dataset.from_dict({"text": ["good day", "bad day", "good time", "bad time"], "label": [1, 0, 1, 0]})
    t = prepare(datasets.DatasetDict({"train": ds, "test": test}))
    assert len(t.splits["test"]) == 4 and len(t.splits["validation"]) > 0  # validation carved from train
    assert sorted(t.texts[i][0] for i in t.splits["test"]) == ["bad day", "bad time", "good day", "good time"]
