"""Channels-last against contiguous (NCHW) images on this machine's CPU: a training step and a prediction of the
product's image backbones, built as the product builds them (automl.models), at the sizes its plan picks.

    python benchmarks/channels_last.py [--threads 1,2] [--repeats 3]

Each cell is the median of 10 timed steps (after 2 untimed ones) of batch 32, AdamW, cross-entropy; the two layouts
alternate `--repeats` times in one process, and the ratio is contiguous time over channels-last time. Printed only
(RESULTS.md "Channels-last batches on a CPU" quotes a run).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from automl import models

CASES = [("efficientnet-lite0", 128), ("efficientnet-lite0", 48), ("efficientnet-lite2", 96),
         ("timm/resnet10t:scratch", 48), ("timm/mobilenetv3_small_050:scratch", 48)]


def _time(name: str, size: int, channels_last: bool) -> tuple[float, float]:
    torch.manual_seed(0)
    model = models.build(models.resolve(name), 12, dropout=0.0, drop_path=0.0)
    x = torch.randn(32, 3, size, size)
    y = torch.randint(0, 12, (32,))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 1e-3)
    model.train()
    steps = []
    for i in range(12):
        t = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 2:
            steps.append(time.perf_counter() - t)
    model.eval()
    preds = []
    with torch.no_grad():
        for i in range(7):
            t = time.perf_counter()
            model(x)
            if i >= 2:
                preds.append(time.perf_counter() - t)
    return statistics.median(steps), statistics.median(preds)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print("| backbone | px | threads | train step ms: NCHW / channels-last (ratio) | prediction of 32 ms: NCHW / "
          "channels-last (ratio) |\n|---|---|---|---|---|")
    for threads in map(int, args.threads.split(",")):
        torch.set_num_threads(threads)
        for name, size in CASES:
            got = {False: [], True: []}
            for _ in range(args.repeats):
                for cl in (False, True):
                    got[cl].append(_time(name, size, cl))
            (a_s, a_p), (b_s, b_p) = ((statistics.median(v[0] for v in got[cl]),
                                       statistics.median(v[1] for v in got[cl])) for cl in (False, True))
            print(f"| {name} | {size} | {threads} | {a_s * 1e3:.0f} / {b_s * 1e3:.0f} ({a_s / b_s:.2f}x) | "
                  f"{a_p * 1e3:.0f} / {b_p * 1e3:.0f} ({a_p / b_p:.2f}x) |", flush=True)


if __name__ == "__main__":
    main()
