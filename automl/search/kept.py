"""The weights a trial keeps: its best few reports (by validation score), for the winner, soups and ensembles.

<dir>/<trial_id>.json lists them ({"score", "report", "snapshots": [{"report", "score", "file"}]}, best first);
each snapshot is <trial_id>.r<report>.safetensors. The JSON is written last, atomically: it only ever names
files that are complete.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

SNAPSHOTS = 3   # reports kept per trial (AutoGluon MultiModal soups its top 3 checkpoints)


def read(directory: str, trial_id: str) -> dict | None:
    try:
        return json.loads((Path(directory) / f"{trial_id}.json").read_text())
    except (OSError, ValueError):
        return None


def keep(directory: str, trial_id: str, weights: dict, score: float, report: int, k: int = SNAPSHOTS) -> bool:
    """Keep `weights` if they are among the trial's `k` best reports (ties: the later report wins)."""
    from safetensors.torch import save_file

    entry = read(directory, trial_id) or {"snapshots": []}
    snaps = entry["snapshots"]
    if len(snaps) >= k and score < min(s["score"] for s in snaps):
        return False
    os.makedirs(directory, exist_ok=True)
    name = f"{trial_id}.r{report}.safetensors"
    tmp = Path(directory) / f"{name}.tmp"
    save_file({key: v.contiguous() for key, v in weights.items()}, str(tmp))
    os.replace(tmp, Path(directory) / name)
    snaps = sorted([s for s in snaps if s["report"] != report] + [{"report": report, "score": score, "file": name}],
                   key=lambda s: (s["score"], s["report"]), reverse=True)
    for gone in snaps[k:]:
        (Path(directory) / gone["file"]).unlink(missing_ok=True)
    snaps = snaps[:k]
    entry = {"score": snaps[0]["score"], "report": snaps[0]["report"], "snapshots": snaps}
    tmp = Path(directory) / f"{trial_id}.json.tmp"
    tmp.write_text(json.dumps(entry))
    os.replace(tmp, Path(directory) / f"{trial_id}.json")
    return True


def best_file(directory: str | None, trial_id: str) -> str | None:
    entry = read(directory, trial_id) if directory else None
    if not entry:
        return None
    path = Path(directory) / entry["snapshots"][0]["file"]
    return str(path) if path.exists() else None


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
