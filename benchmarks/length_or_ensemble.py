"""Where a text fine-tune has time to spare: one fine-tune of 8 epochs, or two of 4 (two seeds) averaged?

    python benchmarks/length_or_ensemble.py [SEED ...]     # default: seeds 0 1 2 (~7 min a seed on 2 cores)
    python benchmarks/length_or_ensemble.py --cap [SEED ...]

--cap: the choice a start point alone faces once it reaches its sensible length with time to spare: grow to its
stretch cap (search/plan.py's SINGLE_STRETCH times the sensible length), or stop there and spend the rest on a
second fine-tune (another seed) to average with.

Fortunes (benchmarks/realsets.py), the splits of quality.py, the cpu_small space's text start point trained with
`fit` (no Ray, every CPU thread), grouped batches; test macro-F1 of each. Prints one line a seed (not written to
RESULTS.md: the figures there were copied from its output).
"""
import sys
import time
from pathlib import Path

from sklearn.metrics import f1_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _textfit import BATCH, fortunes_split, run_seeds, start_config, test_proba  # noqa: E402

from automl.search.plan import SINGLE_STRETCH, sensible_steps  # noqa: E402
from automl.training.loop import fit  # noqa: E402


def one_seed(base, seed: int, cap: bool = False) -> str:
    data, texts, y = fortunes_split(base, seed)
    cfg = start_config()
    per_pass = -(-len(data.y_train) // BATCH)
    if cap:
        sensible = sensible_steps(True, per_pass)
        long, a, b = int(SINGLE_STRETCH * sensible), sensible, int(SINGLE_STRETCH * sensible) - sensible
    else:
        long, a, b = 8 * per_pass, 4 * per_pass, 4 * per_pass  # 8 epochs, or two of 4

    def run(steps: int, s: int):
        t = time.time()
        r = fit({**cfg, "seed": s, "report_rows": steps * BATCH // 4}, data, epochs=4)
        return test_proba(r, texts), time.time() - t

    p_long, t_long = run(long, seed)
    (p_a, t_a), (p_b, t_b) = run(a, seed), run(b, seed + 100)
    f1 = lambda p: f1_score(y, p.argmax(1), average="macro")  # noqa: E731
    return (f"seed {seed}: one of {long} steps {f1(p_long):.4f} ({t_long:.0f}s) | {a} and {b} steps: a "
            f"{f1(p_a):.4f} b {f1(p_b):.4f} ensemble {f1((p_a + p_b) / 2):.4f} ({t_a + t_b:.0f}s)")


if __name__ == "__main__":
    at_cap = "--cap" in sys.argv
    sys.argv = [a for a in sys.argv if a != "--cap"]
    run_seeds(lambda base, seed: one_seed(base, seed, at_cap))
