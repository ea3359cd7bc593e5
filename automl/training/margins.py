"""Each training row's margin over a run: the area under the margin (AUM, Pleiss et al., NeurIPS 2020).

At every step that trains on a row, its margin is the logit of its given label minus the largest other logit; a
run keeps the sum and the count per row. A row whose label is wrong keeps a low margin while the model learns its
true class from the other rows, until it is memorised late in the schedule; a hard row with a right label climbs
early. The fine-tune sees what frozen features cannot: on fortunes with 5% of labels flipped, the rows confident
learning flags on rung 0's out-of-fold heads (55% accurate) were planted flips at precision 0.29; the same number of
rows taken by those heads and the start point's margins together, 0.49 (`benchmarks/RESULTS.md`, "Suspected label
errors: which rows, also from the fine-tune's margins"). ~22 us a step: the logits are the step's own.
"""
from __future__ import annotations

import numpy as np


def area(total: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Each row's area under the margin from its sum and count; NaN for rows no step trained on."""
    out = np.full(len(total), np.nan)
    seen = count > 0
    out[seen] = total[seen] / count[seen]
    return out


class Margins:
    """Per-row sums and counts of the margin, over the steps a run has taken (restored with it on resume)."""

    def __init__(self, n_rows: int):
        self.sum = np.zeros(n_rows, dtype=np.float64)
        self.count = np.zeros(n_rows, dtype=np.int64)

    def add(self, idx: np.ndarray, logits, target) -> None:
        """Record one step's batch: rows `idx` (of the run's training rows), their logits and given labels."""
        import torch

        with torch.no_grad():
            lg = logits.detach().float()
            given = lg.gather(1, target.view(-1, 1)).squeeze(1)
            others = lg.scatter(1, target.view(-1, 1), float("-inf")).amax(1)
            margin = (given - others).cpu().numpy()
        np.add.at(self.sum, idx, margin)
        np.add.at(self.count, idx, 1)

    def mean(self) -> np.ndarray:
        """Each row's area under the margin; NaN for rows no step trained on."""
        return area(self.sum, self.count)

    def state(self) -> dict:
        import torch

        return {"sum": torch.from_numpy(self.sum.copy()), "count": torch.from_numpy(self.count.copy())}

    def load(self, state: dict | None) -> None:
        if state and len(state["sum"]) == len(self.sum):
            self.sum[:] = np.asarray(state["sum"], dtype=np.float64)
            self.count[:] = np.asarray(state["count"], dtype=np.int64)
