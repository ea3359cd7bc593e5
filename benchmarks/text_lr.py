"""Is the text start point's learning rate (1e-4) right for a short fine-tune of MiniLM-L6?

    python benchmarks/text_lr.py [SEED ...]     # fortunes and packages, quality.py's splits, seeds 0 1 2 by default

The cpu_small space's text start point as the product trains it (class-weighted, its schedule and warmup), with
`fit` alone (no Ray, every CPU thread) for 200 steps (what `fixed` and the start point train in 300 s on 2 cores:
186-230 on fortunes), once per learning rate on the same seed; test macro-F1 of each and validation's.
"""
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import f1_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
import realsets  # noqa: E402
from _textfit import BATCH, fortunes_split, run_seeds, start_config, test_proba  # noqa: E402

from automl.data.intake import class_weights  # noqa: E402
from automl.training.loop import fit  # noqa: E402

RATES = (1e-4, 3e-4)
REPORTS = 12
STEPS = 200


def one_seed(base, seed: int) -> str:
    out = []
    for name, df in base.items():
        data, texts, y = fortunes_split(df, seed)
        data.class_weights = class_weights(data.y_train, data.num_classes)
        line = f"{name} seed {seed}, {STEPS} steps:"
        for lr in RATES:
            r = fit({**start_config(), "seed": seed, "class_weighted": True, "lr": lr,
                     "report_rows": int(np.ceil(STEPS * BATCH / REPORTS))}, data, epochs=REPORTS)
            val = f1_score(data.y_val, test_proba(r, data.x_val).argmax(1), average="macro")
            test = f1_score(y, test_proba(r, texts).argmax(1), average="macro")
            line += f" lr {lr:g} test {test:.4f} (validation {val:.4f})"
        out.append(line)
    return "\n".join(out)


if __name__ == "__main__":
    run_seeds(one_seed, {"fortunes": realsets.fortunes(), "packages": realsets.packages()})
