"""Does a start point gain from a class-weighted loss on imbalanced data judged by macro-F1?

    python benchmarks/class_weighted.py [SEED ...]                  # fortunes as quality.py uses it (8 classes, 6:1)
    AUTOML_BENCH_IMBALANCE=25 python benchmarks/class_weighted.py   # 600 down to 24 a class (25:1)
    AUTOML_BENCH_SET=icons python benchmarks/class_weighted.py      # the image start point on 48 px icons

Text: fortunes (benchmarks/realsets.py), the splits of quality.py, the cpu_small space's text start point trained
with `fit` (no Ray, every CPU thread) for 8 epochs unweighted and class-weighted (sklearn's "balanced" weights),
same seed; test macro-F1 of each, and validation's (what a search would have judged them by). ~3 min a seed on 2
cores. Images: quality.py's `fixed` (the image start point, sized to fit) at 150 s, unweighted and weighted.
"""
import os
import sys
from pathlib import Path

from sklearn.metrics import f1_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
import realsets  # noqa: E402
from _textfit import BATCH, fortunes_split, run_seeds, start_config, test_proba  # noqa: E402

from automl.data.intake import class_weights  # noqa: E402
from automl.training.loop import fit  # noqa: E402

EPOCHS = 8


def one_seed(base, seed: int) -> str:
    data, texts, y = fortunes_split(base, seed)
    data.class_weights = class_weights(data.y_train, data.num_classes)  # as data/inputs.py gives them to a trial
    steps = EPOCHS * -(-len(data.y_train) // BATCH)
    line = f"seed {seed}, {steps} steps:"
    for weighted in (False, True):
        r = fit({**start_config(), "seed": seed, "class_weighted": weighted, "report_rows": steps * BATCH // EPOCHS},
                data, epochs=EPOCHS)
        val = f1_score(data.y_val, test_proba(r, data.x_val).argmax(1), average="macro")
        test = f1_score(y, test_proba(r, texts).argmax(1), average="macro")
        line += f" {'weighted' if weighted else 'unweighted'} test {test:.4f} (validation {val:.4f})"
    return line


def one_icons_seed(base, seed: int) -> str:
    import quality

    df = quality.split(base, seed)
    runs = {w: quality.fixed(df, 150, seed, class_weighted=w) for w in (False, True)}
    return f"seed {seed}, {runs[False]['plan']}: " + " ".join(
        f"{'weighted' if w else 'unweighted'} test {r['f1']:.4f} ({r['wall']:.0f} s)" for w, r in runs.items())


if __name__ == "__main__":
    if os.environ.get("AUTOML_BENCH_SET") == "icons":
        base, one = realsets.icons(), one_icons_seed
    else:
        ratio = float(os.environ.get("AUTOML_BENCH_IMBALANCE", "0"))
        base = realsets.fortunes(max_per_class=600, imbalance=ratio) if ratio else realsets.fortunes()
        one = one_seed
    print(base["label"].value_counts().to_dict(), flush=True)
    run_seeds(one, base)
