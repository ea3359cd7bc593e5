"""What planning costs and decides on a real set: prepare, connect (with the backbone libraries warmed while Ray
starts, as auto_finetune does) and plan, nothing trained.

    python benchmarks/plan_time.py SET SEED BUDGET      (e.g. fortunes 1 300; SET: digits, stamps, fortunes)

Prints the seconds connect and plan took, the plan's regime, size, reports, rows a report, its pricing of a trial
and the start point's measured speed (one_trial_timed: whether one trial's CPUs were timed), then its reasons.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from quality import SETS, split  # noqa: E402


def main() -> None:
    import tempfile

    from automl import stages
    from automl.budget import Budget
    from automl.cluster import connect
    from automl.options import FinetuneOptions

    name, seed, budget_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    df = split(SETS[name](), seed)
    opts = FinetuneOptions.from_kwargs(label="label", time_budget_s=budget_s, seed=seed, progress=False,
                                       output_dir=tempfile.mkdtemp(prefix="plan-time-"))
    budget = Budget(budget_s)
    t = time.monotonic()
    prepared = stages.prepare(df, data=opts.data, search=opts.search, update=opts.update, output=opts.output)
    warming = stages.warm_libraries(prepared, opts.search)
    ray = connect()
    warming.join()
    print(f"connect {time.monotonic() - t:.1f} s")
    t = time.monotonic()
    plan = stages.plan(prepared, ray, budget, search=opts.search, resources=opts.resources,
                       diagnostics=opts.diagnostics, output=opts.output)
    print(f"plan {time.monotonic() - t:.1f} s")
    d = plan.to_dict()
    for k in ("regime", "storage_size", "reports", "report_rows", "trial_s", "rung0_s", "search_ends_at_s", "speed"):
        print(k, d.get(k))
    print("\n".join(d["reasons"]))


if __name__ == "__main__":
    main()
