"""The weights a trial keeps: its best few reports (by validation score), for soups, and its last report when it
trained its whole schedule: the trial's model.

<dir>/<trial_id>.json lists them ({"score", "report", "snapshots": [{"report", "score", "file", "val"}], "final":
{"report", "score", "file", "val"}}, snapshots best first); each snapshot is <trial_id>.r<report>.safetensors, the
final weights <trial_id>.final.safetensors (and <trial_id>.margins.npz: each training row's margins over the run
so far, `training/margins.py`, rewritten with each kept report), and beside each, where the trial gave them, its
validation probabilities and the labels they were scored against (<name>.val.npz): the final choice reads them
instead of running the model over the validation rows again (a pass each: ~3 s a MiniLM member on 174 rows, 2
cores). The JSON is written last, atomically: it only ever names files that are complete.

Why the last report and not the best: at the end of its schedule (the learning rate annealed) a run is at its
best in expectation; the report that scores best on a small validation set is often a mid-schedule one picked by
noise (Tux Paint stamps, 106 validation rows: report 6 of 12 scored 0.67 macro-F1 on validation, the last 0.62;
on test the mid-schedule weights were the worse).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

SNAPSHOTS = 3   # reports kept per trial (AutoGluon MultiModal soups its top 3 checkpoints)


def not_failed(trials):
    """The trial table without trials that errored (a NaN loss after good early reports: their config, retrained,
    would fail again), unless nothing else is left."""
    if "status" in trials and (trials["status"] != "ERROR").any():
        return trials[trials["status"] != "ERROR"]
    return trials


def read(directory: str, trial_id: str) -> dict | None:
    try:
        return json.loads((Path(directory) / f"{trial_id}.json").read_text())
    except (OSError, ValueError):
        return None


def _save(directory: str, name: str, weights: dict) -> None:
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    tmp = Path(directory) / f"{name}.tmp"
    save_file({key: v.contiguous() for key, v in weights.items()}, str(tmp))
    os.replace(tmp, Path(directory) / name)


def _save_val(directory: str, name: str, val: tuple | None) -> str | None:
    """Save (probabilities, labels) of a kept model's validation pass as <name>.val.npz; its file name."""
    if val is None:
        return None
    proba, y = val
    out = f"{name.removesuffix('.safetensors')}.val.npz"
    tmp = Path(directory) / f"{out}.tmp.npz"
    np.savez(tmp, proba=np.asarray(proba, dtype=np.float32), y=np.asarray(y))
    os.replace(tmp, Path(directory) / out)
    return out


def _write(directory: str, trial_id: str, entry: dict) -> None:
    tmp = Path(directory) / f"{trial_id}.json.tmp"
    tmp.write_text(json.dumps(entry))
    os.replace(tmp, Path(directory) / f"{trial_id}.json")


def keep_final(directory: str, trial_id: str, weights: dict, score: float, report: int,
               val: tuple | None = None) -> None:
    """Keep the weights of the trial's last report (the end of its schedule); val: (validation probabilities,
    labels) of that report."""
    name = f"{trial_id}.final.safetensors"
    _save(directory, name, weights)
    entry = read(directory, trial_id) or {"snapshots": [], "score": score, "report": report}
    entry["final"] = {"report": report, "score": score, "file": name, "val": _save_val(directory, name, val)}
    _write(directory, trial_id, entry)


def keep(directory: str, trial_id: str, weights: dict, score: float, report: int, k: int = SNAPSHOTS,
         val: tuple | None = None) -> bool:
    """Keep `weights` if they are among the trial's `k` best reports (ties: the later report wins); val:
    (validation probabilities, labels) of that report."""
    entry = read(directory, trial_id) or {"snapshots": []}
    snaps = entry["snapshots"]
    if len(snaps) >= k and score < min(s["score"] for s in snaps):
        return False
    name = f"{trial_id}.r{report}.safetensors"
    _save(directory, name, weights)
    snap = {"report": report, "score": score, "file": name, "val": _save_val(directory, name, val)}
    snaps = sorted([s for s in snaps if s["report"] != report] + [snap],
                   key=lambda s: (s["score"], s["report"]), reverse=True)
    for gone in snaps[k:]:
        for f in (gone["file"], gone.get("val")):
            if f:
                (Path(directory) / f).unlink(missing_ok=True)
    snaps = snaps[:k]
    _write(directory, trial_id, {**entry, "score": snaps[0]["score"], "report": snaps[0]["report"], "snapshots": snaps})
    return True


def keep_margins(directory: str, trial_id: str, margins) -> None:
    """Keep a trial's per-row training margins (`training.margins.Margins`) as <trial_id>.margins.npz: suspected
    label errors are ranked by them after the search."""
    if margins is None:
        return
    os.makedirs(directory, exist_ok=True)
    tmp = Path(directory) / f"{trial_id}.margins.tmp.npz"
    np.savez(tmp, sum=margins.sum, count=margins.count)
    os.replace(tmp, Path(directory) / f"{trial_id}.margins.npz")


def margins(directory: str | None, trial_id: str, n_rows: int) -> np.ndarray | None:
    """A trial's area under the margin for each of its `n_rows` training rows (NaN where no step trained on one),
    or None where it kept none for that many rows."""
    if not directory:
        return None
    try:
        with np.load(Path(directory) / f"{trial_id}.margins.npz", allow_pickle=False) as z:
            total, count = z["sum"], z["count"]
    except (OSError, ValueError, KeyError):
        return None
    if total.shape != (n_rows,) or count.shape != (n_rows,):
        return None
    from automl.training.margins import area

    return area(total, count)


def best_file(directory: str | None, trial_id: str) -> str | None:
    entry = read(directory, trial_id) if directory else None
    if not entry:
        return None
    path = Path(directory) / entry["snapshots"][0]["file"]
    return str(path) if path.exists() else None


def _model_entry(directory: str | None, trial_id: str) -> dict | None:
    """The kept entry of the trial's model: its last report when it trained its whole schedule, else its best
    report (None when neither file is there)."""
    entry = read(directory, trial_id) if directory else None
    if not entry:
        return None
    final = entry.get("final")
    if final and (Path(directory) / final["file"]).exists():
        return final
    best = (entry["snapshots"] or [None])[0]
    return best if best and (Path(directory) / best["file"]).exists() else None


def model_file(directory: str | None, trial_id: str) -> str | None:
    """The trial's model: its last report's weights when it trained its whole schedule, else its best report's."""
    use = _model_entry(directory, trial_id)
    return str(Path(directory) / use["file"]) if use else None


def model_val_proba(directory: str | None, trial_id: str, y_val: np.ndarray) -> np.ndarray | None:
    """The validation probabilities of `model_file` as its trial computed them, if they were scored on `y_val`'s
    rows (the same labels in the same order); else None (the caller runs the model)."""
    use = _model_entry(directory, trial_id)
    if not use or not use.get("val"):
        return None
    try:
        with np.load(Path(directory) / use["val"], allow_pickle=False) as z:
            proba, y = z["proba"], z["y"]
    except (OSError, ValueError, KeyError):
        return None
    if proba.ndim != 2 or len(proba) != len(y_val) or not np.array_equal(y, np.asarray(y_val)):
        return None
    return proba


def model_score(directory: str | None, trial_id: str) -> float | None:
    """The validation score of `model_file`."""
    entry = read(directory, trial_id) if directory else None
    if not entry:
        return None
    return float((entry.get("final") or entry)["score"])


def snapshot_files(directory: str, trial_id: str) -> list[str]:
    entry = read(directory, trial_id) or {"snapshots": []}
    return [str(Path(directory) / s["file"]) for s in entry["snapshots"] if (Path(directory) / s["file"]).exists()]


def scores(directory: str) -> dict[str, float]:
    """trial id -> best kept score, for every trial with kept weights."""
    out = {}
    for f in Path(directory).glob("*.json"):
        entry = read(directory, f.stem)
        if entry:
            out[f.stem] = entry["score"]
    return out


def drop(directory: str, trial_id: str) -> None:
    for f in Path(directory).glob(f"{trial_id}.*"):
        f.unlink(missing_ok=True)
