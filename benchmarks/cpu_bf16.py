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
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402
import realsets  # noqa: E402
from sklearn.metrics import f1_score  # noqa: E402

from automl.data.encoders import predict_logits  # noqa: E402
from automl.data.trial_data import TrialData  # noqa: E402
from automl.search.space import load_space  # noqa: E402
from automl.training.loop import encode_inputs, fit, full_config  # noqa: E402

EPOCHS = 6


def one_seed(base, seed: int) -> str:
    df = quality.split(base, seed)
    classes = sorted(df.label.unique())
    y = df.label.map({c: i for i, c in enumerate(classes)}).values
    tr, va, te = (np.flatnonzero(df.split == s) for s in ("train", "validation", "test"))
    texts = [[t] for t in df.text]
    data = TrialData("text", len(classes), [texts[i] for i in tr], y[tr], [texts[i] for i in va], y[va],
                     task="classification")
    cfg = full_config({**load_space("cpu_small", "text").default_config(), "max_length": 128, "seed": seed})
    steps = EPOCHS * -(-len(tr) // 32)
    line, probs = f"seed {seed}, {steps} steps:", []
    for flag in ("0", "1"):
        os.environ["AUTOML_CPU_BF16"] = flag
        t = time.time()
        r = fit({**cfg, "report_rows": steps * 32 // EPOCHS}, data, epochs=EPOCHS)
        took = time.time() - t
        x = encode_inputs(r.encoder, [texts[i] for i in te])
        probs.append(torch.softmax(predict_logits(r.model, r.encoder, x, "cpu"), 1).numpy())
        f1 = f1_score(y[te], probs[-1].argmax(1), average="macro")
        line += f" {'bf16' if flag == '1' else 'fp32'} {f1:.4f} ({took / steps:.3f} s/step)"
    agree = float((probs[0].argmax(1) == probs[1].argmax(1)).mean())
    return line + f"; test predictions agree on {agree:.1%}, probabilities differ by {np.abs(probs[0] - probs[1]).mean():.4f}"


def main() -> None:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    torch.set_num_threads(cpus)
    base = realsets.fortunes()
    for seed in [int(a) for a in sys.argv[1:]] or [0, 1, 2]:
        print(one_seed(base, seed), flush=True)


if __name__ == "__main__":
    main()
