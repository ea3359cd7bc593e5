"""Nothing is lost: a SIGKILLed driver's search resumes, keeping its finished trials. (A trial whose worker dies, and
checkpoint pruning, are checked on test_search's shared search.)"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

SPACE = {"backbone": "timm/resnet10t:scratch", "image_size": 16, "max_epochs": 3}
DRIVER = """
import json, sys
from automl import auto_finetune
auto_finetune(sys.argv[2], time_budget_s=None, max_trials=8, output_dir=sys.argv[1], find_label_errors=False,
              export_formats=False, retrain=False, search_space=json.loads(sys.argv[3]), progress=False)
"""


def _terminated(exp: Path, writer_alive: bool = False) -> dict[str, dict] | None:
    """trial id -> last result, for trials Tune's newest saved experiment state records as finished.

    Tune rewrites the file in place (not by an atomic rename), so while its driver runs a read can catch it half
    written: with `writer_alive` such a read gives None (look again later). With the driver gone the file is final
    and must parse."""
    # Newest session by the time in the file name: a resume re-syncs (and re-stamps) the old session's file.
    states = sorted(exp.glob("experiment_state-*.json"))
    if not states:
        return {}
    try:
        state = json.loads(states[-1].read_bytes())
    except (OSError, ValueError):  # caught mid-write (or mid-replace: the file briefly gone)
        if writer_alive:
            return None
        raise
    out = {}
    for entry in state["trial_data"]:
        info = json.loads(entry[0])
        if info.get("status") == "TERMINATED":
            out[info["trial_id"]] = json.loads(entry[1])["last_result"]
    return out


@pytest.mark.slow
def test_sigkilled_driver_resumes_keeping_finished_trials(ray_session, tmp_path):
    import ray

    out = tmp_path / "run"
    # The driver joins this session's Ray cluster, so killing it kills only the driver (and its trials).
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "TUNE_GLOBAL_CHECKPOINT_S": "2"}
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    rows = []
    for c in range(4):
        for i in np.flatnonzero(d.target == c)[:60]:
            Image.fromarray((d.images[i] * 16).astype(np.uint8)).save(tmp_path / f"{i}.png")
            rows.append({"image": f"{i}.png", "label": c})
    import pandas as pd

    pd.DataFrame(rows).to_csv(tmp_path / "digits.csv", index=False)
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    proc = subprocess.Popen([sys.executable, str(script), str(out), str(tmp_path / "digits.csv"), json.dumps(SPACE)],
                            env=env, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    before: dict = {}
    while time.time() < deadline and proc.poll() is None:
        marker = out / "LATEST_SEARCH"
        if marker.exists():
            before = _terminated(out / "ray_results" / marker.read_text().strip(), writer_alive=True) or {}
            if len(before) >= 2:  # Tune's saved state holds two finished trials
                break
        time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    exp = out / "ray_results" / (out / "LATEST_SEARCH").read_text().strip()
    before = _terminated(exp)
    assert 2 <= len(before) < 8, "the driver was not killed mid-search"
    assert not (out / "model").exists()

    from automl import load
    from automl.ops.cli import main as cli_main

    # The same command again with --resume, from the CLI.
    assert cli_main(["finetune", str(tmp_path / "digits.csv"), "--output", str(out), "--resume", "--time-budget", "none",
                     "--max-trials", "8", "--set", json.dumps(SPACE), "--quiet", "--retrain", "false",
                     "--no-export-formats", "--find-label-errors", "false"]) == 0
    model = load(out / "model")
    after = _terminated(exp)
    assert len(model.trials) == 8 and len(after) == 8 and (model.trials["status"] != "ERROR").all()
    for tid, last in before.items():  # finished trials are kept, not re-run
        assert after[tid]["timestamp"] == last["timestamp"] and after[tid]["epoch"] == last["epoch"]
    assert model.manifest.search["best_score"] >= max(r["val_accuracy"] for r in before.values())


def test_a_resume_whose_saved_searcher_lags_its_trials_still_starts_new_trials(tmp_path):
    """Tune saves the searcher's state and the trials' at different moments. A driver killed between the two left a
    concurrency limiter that counted two trials as live which the experiment state records as finished: restored
    finished trials report nothing, so the resumed search waited forever for a suggestion (a suite run hung in
    test_sigkilled_driver_resumes). The generator's restore takes the live trials and the count from the trials."""
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from automl.search.tune import DeadlineOptunaSearch, ResumableSearch

    def generator():
        searcher = DeadlineOptunaSearch({"x": tune.uniform(0, 1)}, metric="m", mode="max")
        return ResumableSearch(ConcurrencyLimiter(searcher, max_concurrent=2))

    saved = generator()
    for tid in ("a", "b"):  # suggested and live when the searcher's state was saved
        assert saved.searcher.suggest(tid) is not None
    saved._counter, saved._total_samples = 2, 8
    saved.save_to_dir(str(tmp_path), session_str="s")
    # The trials' state, saved later: a and b finished, c runs, d finished (one Tune line per trial).
    trials = [[json.dumps({"trial_id": t, "status": s}), "{}"]
              for t, s in (("a", "TERMINATED"), ("b", "TERMINATED"), ("c", "RUNNING"), ("d", "TERMINATED"))]
    (tmp_path / "experiment_state-2026-12-03_17-39-19.json").write_text(json.dumps({"trial_data": trials}))

    resumed = generator()
    resumed.restore_from_dir(str(tmp_path))
    assert resumed.searcher.live_trials == {"c"} and resumed.searcher.num_unfinished_live_trials == 1
    assert resumed._counter == 4 and resumed._total_samples == 8  # four of the eight trials exist
    assert isinstance(resumed.searcher.suggest("e"), dict)  # a free slot: a new trial starts
    assert resumed.searcher.suggest("f") is None  # c and e are live: the limit holds
    resumed.searcher.on_trial_complete("c", {"m": 0.5})  # a trial this searcher never suggested: no KeyError
    assert resumed.searcher.live_trials == {"e"}


def test_checkpoint_policy_at_its_production_values():
    """Every >= 10 s, and >= 20x the last checkpoint's cost (so checkpoints take <= 5% of a trial's time)."""
    from automl.search.tune import CHECKPOINT_EVERY_S, checkpoint_due

    assert CHECKPOINT_EVERY_S == 10.0
    assert not checkpoint_due(9.9, 0.1) and checkpoint_due(10.0, 0.1)
    assert not checkpoint_due(15.0, 1.0) and checkpoint_due(20.0, 1.0)  # a 1 s checkpoint: next one after 20 s
    assert checkpoint_due(0.0, 5.0, every_s=0)  # 0: every report (what test_search's crash test uses)
