"""Data shapes none of the quality sets has: does every run end within its budget, with a model better than a
classic baseline on the same rows?

    python benchmarks/shapes.py                       # every shape, seed 0
    python benchmarks/shapes.py --sets long_texts --no-write

Each shape is cut from the real sets of benchmarks/realsets.py (nothing generated): tiny (16 px) and larger (64 px)
RGBA icons, 31 fine-grained classes from 6 to 97 images each, one-token texts (package names), a few-shot text set
(12 rows a class), long texts (400-4,000 characters) and texts at 50:1. quality.py's stratified 70/15/15 split;
`auto_finetune(df, time_budget_s=budget)` as a user calls it (nothing wrapped: the wall time is the product's), and a
class-weighted logistic regression on TF-IDF word 1-2-grams (text) or on 16x16 RGB pixels over black (images)
fitted on train+validation. Test macro-F1 and wall time go to RESULTS.md (section "shapes").
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

import quality  # noqa: E402
import realsets  # noqa: E402
from _results import write_section  # noqa: E402


def stamps_fine() -> pd.DataFrame:
    """The stamps labelled by their second folder level (animals/birds, food/fruit ...): every class with ≥ 6 images."""
    df = realsets.stamps(min_per_class=1)
    df["label"] = ["/".join(Path(p).relative_to(realsets.STAMPS_DIR).parts[:2]) for p in df["image"]]
    counts = df["label"].value_counts()
    return df[df["label"].isin(counts[counts >= 6].index)].reset_index(drop=True)


def package_names() -> pd.DataFrame:
    """Debian package names (one token, e.g. "xfonts-base") labelled with their section: six sections at 8:1."""
    out = subprocess.run(["apt-cache", "dumpavail"], capture_output=True, check=False).stdout
    rows = []
    for record in out.decode("utf-8", "replace").split("\n\n"):
        section, name = re.search(r"^Section: (.+)$", record, re.M), re.search(r"^Package: (.+)$", record, re.M)
        if section and name:
            rows.append((name.group(1).strip(), section.group(1).strip().split("/")[-1]))
    df = pd.DataFrame(rows, columns=["text", "label"]).drop_duplicates("text")
    return realsets._geometric_caps(df, ["utils", "net", "science", "admin", "games", "sound"], 200, 8.0, 0)


def long_texts() -> pd.DataFrame:
    """Fortunes of 400 to 4,000 characters, the five categories with most of them, 150 down to 38 a class."""
    rows = [(entry, path.name) for path in sorted(realsets.FORTUNES_DIR.glob("*"))
            if path.is_file() and not path.is_symlink() and not path.suffix
            for entry in realsets._read_fortune_file(path) if 400 < len(entry) <= 4000]
    df = pd.DataFrame(rows, columns=["text", "label"]).drop_duplicates("text")
    df = df[~df.duplicated("text", keep=False)]
    return realsets._geometric_caps(df, list(df["label"].value_counts().index[:5]), 150, 4.0, 0)


# name: (the rows, the budget in seconds)
SHAPES = {
    "oxygen16": (lambda: realsets.oxygen(side=16), 90),
    "oxygen64": (lambda: realsets.oxygen(side=64, max_per_class=150), 120),
    "stamps_fine": (stamps_fine, 120),
    "package_names": (package_names, 90),
    "fewshot_text": (lambda: realsets.fortunes(max_per_class=12, imbalance=1.0), 60),
    "long_texts": (long_texts, 120),
    "packages_50to1": (lambda: realsets.packages(imbalance=50.0), 120),
}


def classic(df: pd.DataFrame) -> float:
    """Test macro-F1 of a class-weighted logistic regression on TF-IDF 1-2-grams or 16x16 pixels (train+validation)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    fit, test = df[df["split"] != "test"], df[df["split"] == "test"]
    if "text" in df:
        from sklearn.feature_extraction.text import TfidfVectorizer

        vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
        x, x_test = vec.fit_transform(fit["text"]), vec.transform(test["text"])
    else:
        from PIL import Image

        def pixels(path: str) -> np.ndarray:
            with Image.open(path) as im:
                a = np.asarray(im.convert("RGBA").resize((16, 16)), dtype=np.float32) / 255
            return (a[..., :3] * a[..., 3:]).ravel()

        x, x_test = np.stack([pixels(p) for p in fit["image"]]), np.stack([pixels(p) for p in test["image"]])
    clf = LogisticRegression(max_iter=3000, C=10.0, class_weight="balanced").fit(x, fit["label"])
    return float(f1_score(test["label"], clf.predict(x_test), average="macro"))


def ours(df: pd.DataFrame, budget: float, seed: int, out: Path) -> dict:
    from automl import auto_finetune

    t0 = time.monotonic()
    m = auto_finetune(df, label="label", time_budget_s=budget, seed=seed, output_dir=out, progress=False)
    wall = time.monotonic() - t0
    p = m.manifest.plan
    return {"f1": quality.macro_f1(m, df), "wall": wall, "regime": p["regime"],
            "size": p.get("storage_size"), "trial_s": p["trial_s"], "ladder": quality.ladder(m),
            "exported": m.manifest.training.get("how"), "spent": (m.manifest.budget or {}).get("spent_s")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sets", default=",".join(SHAPES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget", type=float, default=None, help="one budget for every shape (default: each its own)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md as it is")
    args = ap.parse_args()
    lines = ["| shape | rows, classes, largest:smallest | budget | ours: test macro-F1 (wall, % of budget) | "
             "classic | plan; ladder; exported |", "|---|---|---|---|---|---|"]
    for name in args.sets.split(","):
        build, budget = SHAPES[name]
        budget = args.budget or budget
        df = quality.split(build().reset_index(drop=True), args.seed)
        counts = df["label"].value_counts()
        shape = f"{len(df)}, {len(counts)}, {counts.max()}:{counts.min()}"
        base = classic(df)
        try:
            r = ours(df, budget, args.seed, Path(tempfile.mkdtemp(prefix=f"shapes-{name}-")) / "run")
            cell = f"**{r['f1']:.4f}** ({r['wall']:.0f} s, {100 * r['wall'] / budget:.0f}%)" \
                if r["f1"] > base else f"{r['f1']:.4f} ({r['wall']:.0f} s, {100 * r['wall'] / budget:.0f}%)"
            size = f", {r['size']} px" if r["size"] else ""
            how = f"{r['regime']}{size}, trial ~{r['trial_s']:.0f} s; {r['ladder']}; {r['exported']}"
        except Exception:  # a crash is this benchmark's finding: say it and go on with the next shape
            r, cell, how = {}, "**failed**", traceback.format_exc().strip().splitlines()[-1][:200]
        lines.append(f"| {name} | {shape} | {budget:.0f} s | {cell} | {base:.4f} | {how} |")
        print(f"{name}: {r} classic {base:.4f}", flush=True)
    print("\n".join(lines))
    if not args.no_write:
        write_section("shapes" if args.budget is None else f"shapes-{args.budget:.0f}s",
                      f"Data shapes none of the quality sets has (seed {args.seed}"
                      f"{'' if args.budget is None else f', {args.budget:.0f} s each'}): budget kept, better than a "
                      "classic baseline", lines)


if __name__ == "__main__":
    main()
