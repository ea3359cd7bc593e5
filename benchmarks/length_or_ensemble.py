"""Where a text fine-tune has time to spare: one fine-tune of 8 epochs, or two of 4 (two seeds) averaged?

    python benchmarks/length_or_ensemble.py [SEED ...]     # default: seeds 0 1 2 (~7 min a seed on 2 cores)

Fortunes (benchmarks/realsets.py), the splits of quality.py, the cpu_small space's text start point trained with
`fit` (no Ray, every CPU thread), grouped batches; test macro-F1 of each. Prints one line a seed (not written to
RESULTS.md: the figures there were copied from its output).
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



def one_seed(base, seed: int) -> str:
    df = quality.split(base, seed)
    classes = sorted(df.label.unique())
    y = df.label.map({c: i for i, c in enumerate(classes)}).values
    tr, va, te = (np.flatnonzero(df.split == s) for s in ("train", "validation", "test"))
    texts = [[t] for t in df.text]
    data = TrialData("text", len(classes), [texts[i] for i in tr], y[tr], [texts[i] for i in va], y[va],
                     task="classification")
    cfg = full_config({**load_space("cpu_small", "text").default_config(), "max_length": 128})

    def run(steps: int, s: int):
        t = time.time()
        r = fit({**cfg, "seed": s, "report_rows": steps * 32 // 4}, data, epochs=4)
        x = encode_inputs(r.encoder, [texts[i] for i in te])
        return torch.softmax(predict_logits(r.model, r.encoder, x, "cpu"), 1).numpy(), time.time() - t

    n = 4 * -(-len(tr) // 32)  # 4 epochs
    p_long, t_long = run(2 * n, seed)
    (p_a, t_a), (p_b, t_b) = run(n, seed), run(n, seed + 100)
    f1 = lambda p: f1_score(y[te], p.argmax(1), average="macro")  # noqa: E731
    return (f"seed {seed}: one of {2 * n} steps {f1(p_long):.4f} ({t_long:.0f}s) | {n} steps: a {f1(p_a):.4f} "
            f"b {f1(p_b):.4f} ensemble {f1((p_a + p_b) / 2):.4f} ({t_a + t_b:.0f}s)")


def main() -> None:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    torch.set_num_threads(cpus)
    base = realsets.fortunes()
    for seed in [int(a) for a in sys.argv[1:]] or [0, 1, 2]:
        print(one_seed(base, seed), flush=True)


if __name__ == "__main__":
    main()
