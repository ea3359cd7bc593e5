"""Would a lexical view of the texts add to the product's text model? (issue #24, "combine across rungs")

    python benchmarks/lexical.py --sets fortunes --seeds 3 --budget 300
    python benchmarks/lexical.py --sets fortunes --seeds 3 --probs automl_runs/lexical   # reuse saved probabilities

For each set and seed (quality.py's split), `auto_finetune(df, time_budget_s=budget)` as a user calls it, and its
validation and test probabilities (saved under --probs, and read from there when present). Beside it, linear
heads on bags of MiniLM's own WordPiece tokens (the tokenizer the text models share, so such a head could join an
ensemble with them): scikit-learn's TF-IDF (sublinear term frequency) and a class-weighted or plain logistic
regression, C chosen on validation. Printed: validation and test macro-F1 of the head alone, of the product's model
alone, and of their probabilities averaged (weights 1/2 and 1/3 for the head). Nothing is written to RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402

import realsets  # noqa: E402
from quality import split  # noqa: E402

PARTS = ("validation", "test")


def product_proba(df, budget: float, probs: Path, name: str, seed: int) -> dict[str, np.ndarray]:
    """The product's validation and test probabilities for this split (one run, saved under `probs`)."""
    files = {s: probs / f"{name}_{seed}_{s}.npy" for s in PARTS}
    if not all(f.exists() for f in files.values()):
        from automl import auto_finetune

        m = auto_finetune(df, time_budget_s=budget, progress=False, output_dir=str(probs / f"run_{name}_{seed}"))
        assert [str(c) for c in m.classes] == sorted(map(str, df["label"].unique())), m.classes
        for s, f in files.items():
            part = df[df["split"] == s].drop(columns=["label", "split"])
            np.save(f, m.predict_proba(part).to_numpy())
    return {s: np.load(f) for s, f in files.items()}


def lexical_proba(df, y: dict) -> tuple[dict[str, np.ndarray], str]:
    """A TF-IDF bag of MiniLM's WordPiece tokens and the logistic regression best on validation."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    from automl.models import minilm_dir
    from automl.models.hf_family import load_tokenizer

    tok = load_tokenizer(minilm_dir())
    vec = TfidfVectorizer(tokenizer=tok.tokenize, lowercase=False, token_pattern=None, sublinear_tf=True)
    x = {"train": vec.fit_transform(df[df["split"] == "train"]["text"])}
    x.update({s: vec.transform(df[df["split"] == s]["text"]) for s in PARTS})
    best = None
    for balanced in (False, True):
        for c in (0.3, 1, 3, 10, 30, 100):
            lr = LogisticRegression(C=c, class_weight="balanced" if balanced else None, max_iter=3000)
            lr.fit(x["train"], y["train"])
            score = f1_score(y["validation"], lr.predict(x["validation"]), average="macro")
            if best is None or score > best[0]:
                best = (score, lr, f"C={c}{', class-weighted' if balanced else ''}")
    return {s: best[1].predict_proba(x[s]) for s in PARTS}, best[2]


def main() -> None:
    from sklearn.metrics import f1_score

    ap = argparse.ArgumentParser()
    ap.add_argument("--sets", default="fortunes")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--budget", type=float, default=300)
    ap.add_argument("--probs", default="automl_runs/lexical", help="where the product's probabilities are kept")
    args = ap.parse_args()
    probs = Path(args.probs)
    probs.mkdir(parents=True, exist_ok=True)
    print("| set | seed | lexical head (val, test) | product (val, test) | average 1/2 | average 1/3 |")
    print("|---|---|---|---|---|---|")
    for name in args.sets.split(","):
        base = getattr(realsets, name)()
        for seed in range(args.seeds):
            df = split(base, seed)
            classes = sorted(map(str, df["label"].unique()))
            y = {s: df[df["split"] == s]["label"].astype(str).map(classes.index).to_numpy()
                 for s in ("train", *PARTS)}
            ours = product_proba(df, args.budget, probs, name, seed)
            lex, how = lexical_proba(df, y)

            def f1(p: dict) -> str:
                return ", ".join(f"{f1_score(y[s], p[s].argmax(1), average='macro'):.4f}" for s in PARTS)

            mix = {w: {s: (1 - w) * ours[s] + w * lex[s] for s in PARTS} for w in (1 / 2, 1 / 3)}
            print(f"| {name} | {seed} | {f1(lex)} ({how}) | {f1(ours)} | {f1(mix[1 / 2])} | {f1(mix[1 / 3])} |",
                  flush=True)


if __name__ == "__main__":
    main()
