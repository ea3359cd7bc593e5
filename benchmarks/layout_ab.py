"""Does the channels-last layout change what a fine-tune learns? (issue #24; RESULTS "Channels-last batches on a CPU")

    python benchmarks/layout_ab.py --set oxygen --seeds 6 --budget 300

quality.py's `fixed` (the space's image start point trained once for a sensible length that fits the budget, no
Ray, all CPU threads) run twice per seed: as the product runs it now (channels-last batches and model) and with the
layout switched back to NCHW (`ImageModality.channels_last = False`, contiguous batches), in alternating order.
Each seed is its own split (quality.py's) and training seed, so the mean difference averages over both. Printed:
test macro-F1 per seed and layout, the walls and the mean difference. Nothing is written to RESULTS.md.
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
from quality import fixed, split  # noqa: E402


def _layout(channels_last: bool) -> None:
    """Switch the product's image layout for the runs that follow."""
    from automl.data.encoders import ImageEncoder
    from automl.modalities.image import ImageModality

    if not hasattr(ImageEncoder, "_cl_batch"):
        ImageEncoder._cl_batch = ImageEncoder.batch
    ImageModality.channels_last = channels_last
    if channels_last:
        ImageEncoder.batch = ImageEncoder._cl_batch
    else:
        ImageEncoder.batch = lambda self, *a, **k: ImageEncoder._cl_batch(self, *a, **k).contiguous()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--set", default="oxygen")
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--budget", type=float, default=300)
    args = ap.parse_args()

    df = getattr(realsets, args.set)()
    got: dict[tuple[int, str], dict] = {}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        layouts = ("channels-last", "NCHW") if seed % 2 == 0 else ("NCHW", "channels-last")
        for layout in layouts:
            _layout(layout == "channels-last")
            r = got[seed, layout] = fixed(split(df, seed), args.budget, seed)
            print(f"{args.set} seed {seed} {layout:>13}: test macro-F1 {r['f1']:.4f} ({r['wall']:.0f} s; {r['plan']})",
                  flush=True)
    seeds = sorted({s for s, _ in got})
    print("\n| seed | channels-last (wall; plan) | NCHW (wall; plan) | channels-last − NCHW |\n|---|---|---|---|")
    for s in seeds:
        c, n = got[s, "channels-last"], got[s, "NCHW"]
        print(f"| {s} | {c['f1']:.4f} ({c['wall']:.0f} s; {c['plan']}) | {n['f1']:.4f} ({n['wall']:.0f} s; "
              f"{n['plan']}) | {100 * (c['f1'] - n['f1']):+.1f} |")
    diff = [100 * (got[s, "channels-last"]["f1"] - got[s, "NCHW"]["f1"]) for s in seeds]
    print(f"| mean | {np.mean([got[s, 'channels-last']['f1'] for s in seeds]):.4f} | "
          f"{np.mean([got[s, 'NCHW']['f1'] for s in seeds]):.4f} | {np.mean(diff):+.1f} "
          f"(sd {np.std(diff, ddof=1):.1f}) |")


if __name__ == "__main__":
    main()
