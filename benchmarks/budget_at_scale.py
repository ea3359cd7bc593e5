"""Is the time budget kept on large data? The cases issue #25 measured overrunning (item 13):

    python benchmarks/budget_at_scale.py [--budget 240] [--cases images,texts]

- images: 20,000 PNG files (the Tux Paint stamps enlarged by augmentation, scale.py's), `image_size` pinned at
  128 px by the user, so the plan cannot shrink them (it ran 902 s of 240 when measured);
- texts: 100,000 fortunes varied word by word (scale.py's; it ran 383 s of 240).

One `auto_finetune` each, as a user calls it, in a fresh output folder; prints the wall time against the budget, the
stage times, the plan's regime and why, and the test score. Nothing is written to RESULTS.md (paste by hand).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import scale  # noqa: E402

CASES = {
    "images": (lambda: scale.images(20_000)[0], {"search_overrides": {"image_size": 128}}),
    "texts": (lambda: scale.texts(100_000), {}),
}


def run(name: str, budget: float) -> str:
    import torch

    from automl import auto_finetune

    make, options = CASES[name]
    t = time.monotonic()
    df = make()
    made_s = time.monotonic() - t
    with tempfile.TemporaryDirectory(prefix=f"budget-{name}-") as out:
        t0 = time.monotonic()
        m = auto_finetune(df, label="label", time_budget_s=budget, output_dir=out, progress=False, **options)
        wall = time.monotonic() - t0
        spent = {k: round(v) for k, v in (m.manifest.budget or {}).get("spent_s", {}).items()}
        plan = m.manifest.plan or {}
        lines = [f"{name}: {len(df)} rows (made in {made_s:.0f} s), budget {budget:.0f} s: wall {wall:.0f} s "
                 f"({wall / budget:.0%}); {len(m.trials)} configurations; test {m.manifest.metric} "
                 f"{m.metrics[m.manifest.metric]:.4f}",
                 f"  stages (s): {spent}; splits {(m.manifest.data_report or {}).get('split_sizes')}; test rows "
                 f"scored: {m.metrics.get('test_rows') or 'all'}; final model: {m.manifest.training.get('how')}",
                 f"  plan's speed: {plan.get('speed')}; planned search end {plan.get('search_ends_at_s')} s; "
                 f"torch threads in this process now {torch.get_num_threads()}",
                 f"  plan: {plan.get('regime')}; " + " | ".join(plan.get("reasons", []))[:3000]]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=float, default=240.0)
    ap.add_argument("--cases", default="images,texts")
    args = ap.parse_args()
    for name in args.cases.split(","):
        print(run(name, args.budget), flush=True)


if __name__ == "__main__":
    main()
