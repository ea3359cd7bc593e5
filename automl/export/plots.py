"""PNG figures for the model card (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def learning_curves(history: dict, trials, metric: str, max_epochs: int, out: Path) -> str:
    """Validation metric per epoch for every trial; an x marks where ASHA stopped a trial."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    status = dict(zip(trials["trial_id"].astype(str), trials["status"])) if len(trials) else {}
    best_id = str(trials.iloc[0]["trial_id"]) if len(trials) else None
    key = f"val_{metric}"
    for tid, rows in history.items():
        xs = [r["training_iteration"] for r in rows if key in r]
        ys = [r[key] for r in rows if key in r]
        if not xs:
            continue
        is_best = str(tid) == best_id
        ax.plot(xs, ys, color="tab:blue" if is_best else "0.6", lw=2.5 if is_best else 1.0, alpha=1 if is_best else 0.7,
                marker="o", ms=4 if is_best else 2.5, zorder=3 if is_best else 1, label="winner" if is_best else None)
        st = status.get(str(tid))
        if st == "STOPPED_EARLY":
            ax.scatter([xs[-1]], [ys[-1]], marker="x", color="tab:red", zorder=4, s=36)
        elif st == "CUT_BY_BUDGET":
            ax.scatter([xs[-1]], [ys[-1]], marker="|", color="tab:orange", zorder=4, s=80)
    ax.scatter([], [], marker="x", color="tab:red", label="stopped early by ASHA")
    if "CUT_BY_BUDGET" in set(status.values()):
        ax.scatter([], [], marker="|", color="tab:orange", s=80, label="cut by the time budget")
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"validation {metric}")
    ax.set_xlim(0.8, max_epochs + 0.2)
    ax.set_title(f"Learning curves of {len(history)} trials")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8, framealpha=0.85)
    fig.tight_layout()
    fig.savefig(out / "learning_curves.png")
    plt.close(fig)
    return "learning_curves.png"


def confusion(cm: list[list[int]], classes: list, out: Path) -> str:
    plt = _plt()
    cm_arr = np.asarray(cm)
    n = len(classes)
    size = min(10, 2.5 + 0.45 * n)
    fig, ax = plt.subplots(figsize=(size, size * 0.9), dpi=110)
    im = ax.imshow(cm_arr, cmap="Blues")
    labels = [str(c)[:14] for c in classes]
    ax.set_xticks(range(n), labels, rotation=45 if n > 6 else 0, ha="right" if n > 6 else "center")
    ax.set_yticks(range(n), labels)
    if n <= 25:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, int(cm_arr[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if cm_arr[i, j] > cm_arr.max() / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix (test split)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(out / "confusion_matrix.png")
    plt.close(fig)
    return "confusion_matrix.png"
