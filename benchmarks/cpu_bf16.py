"""Text training steps under bf16 autocast on a CPU with AMX: how much faster, and is the model as good?

    python benchmarks/cpu_bf16.py [SEED ...]     # default: seeds 0 1 2 (~3 min a seed on 2 cores)

Fortunes (benchmarks/realsets.py), the splits of quality.py, the cpu_small space's text start point trained with
`fit` (no Ray, every CPU thread) for the same 6 epochs in fp32 (AUTOML_CPU_BF16=0) and under bf16 autocast
(AUTOML_CPU_BF16=1); seconds a step and test macro-F1 of each. Prints one line a seed (RESULTS.md's figures were
copied from its output). On a CPU without AMX the bf16 run shows what forcing it would cost there.
"""
import os
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import f1_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _textfit import BATCH, fortunes_split, run_seeds, start_config, test_proba  # noqa: E402

from automl.training.loop import fit  # noqa: E402

EPOCHS = 6


def one_seed(base, seed: int) -> str:
    data, texts, y = fortunes_split(base, seed)
    cfg = {**start_config(), "seed": seed}
    steps = EPOCHS * -(-len(data.y_train) // BATCH)
    line, probs = f"seed {seed}, {steps} steps:", []
    for flag in ("0", "1"):
        os.environ["AUTOML_CPU_BF16"] = flag
        t = time.time()
        r = fit({**cfg, "report_rows": steps * BATCH // EPOCHS}, data, epochs=EPOCHS)
        took = time.time() - t
        probs.append(test_proba(r, texts))
        f1 = f1_score(y, probs[-1].argmax(1), average="macro")
        line += f" {'bf16' if flag == '1' else 'fp32'} {f1:.4f} ({took / steps:.3f} s/step)"
    agree = float((probs[0].argmax(1) == probs[1].argmax(1)).mean())
    return line + (f"; test predictions agree on {agree:.1%}, probabilities differ by "
                   f"{np.abs(probs[0] - probs[1]).mean():.4f}")


if __name__ == "__main__":
    run_seeds(one_seed)
