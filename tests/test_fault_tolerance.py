"""Nothing is lost: a crashed trial resumes from its checkpoint; a SIGKILLed driver's search resumes."""
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

from automl.search.tune import SearchConfig, SearchLimits, SearchStorage, run_search
from automl.search.space import load_space


def _du(path) -> int:
    """Bytes of the files under `path` now."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _peak_lower_bound(result) -> int:
    """What the experiment directory held at the search's end, before the finished trials' checkpoints were pruned:
    what it holds now, plus the last trial's newest checkpoint (model and optimizer state: at least as large as its
    weights file in best/)."""
    weights = max(f.stat().st_size for f in Path(result.experiment_path, "best").glob("*.final.safetensors"))
    return _du(result.experiment_path) + weights


@pytest.mark.slow
def test_trial_that_dies_resumes_from_its_last_checkpoint(ray_session, digits_trial_data, tmp_path):
    marker = tmp_path / "crashed"
    space = load_space("cpu_small", "image", {"image_size": 16, "max_epochs": 4, "backbone": "timm/resnet10t:scratch",
                                              "_crash_once_after_epoch": f"2:{marker}"})
    result = run_search(digits_trial_data, space, SearchConfig(
        "accuracy", SearchStorage(str(tmp_path), "crash", checkpoint_every_s=0), SearchLimits(max_trials=1),
        {"cpu": 1}, progress=False))
    assert marker.exists()  # the worker process really died once
    row = result.trials.iloc[0]
    assert row["status"] == "COMPLETED" and row["epochs_run"] == 4
    history = next(iter(result.history.values()))
    # Continued at epoch 3 from the epoch-2 checkpoint, not from scratch. (Ray restores the trial's result
    # file from storage on restart, so lines written after its last sync may be gone: judge by time.)
    after_crash = [r["training_iteration"] for r in history if r["timestamp"] > marker.stat().st_mtime]
    assert after_crash == [3, 4]
    assert "_crash_once_after_epoch" not in result.best_config
    assert result.peak_disk_mb * 2**20 >= _peak_lower_bound(result)
    trial_dir = next(Path(result.experiment_path).glob("trial_*"))
    assert not list(trial_dir.glob("checkpoint_*"))  # finished trial's checkpoints pruned


SPACE = {"backbone": "timm/resnet10t:scratch", "image_size": 16, "max_epochs": 5}
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
    assert checkpoint_due(0.0, 5.0, every_s=0)  # 0: every report (what the crash test uses)


@pytest.mark.slow
def test_finished_trials_checkpoints_are_pruned_while_the_search_still_runs(ray_session, digits_trial_data, tmp_path,
                                                                           monkeypatch):
    from ray.tune import Callback

    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "1")  # Tune saves its state often: pruning may follow soon
    monkeypatch.setenv("AUTOML_SYNC_PERIOD_S", "1")

    class Watch(Callback):
        """Looks, as results come in, for a finished trial whose checkpoints are gone while others still run."""

        def __init__(self, exp: Path):
            self.exp, self.finished, self.checkpointed, self.pruned_mid_search = exp, set(), set(), False

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.finished.add(trial.trial_id)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            for d in self.exp.glob("trial_*/checkpoint_*"):
                self.checkpointed.add(d.parent.name[len("trial_"):])
            running = any(t.status == "RUNNING" and t.trial_id not in self.finished for t in trials)
            for tid in self.finished & self.checkpointed:
                if running and not list((self.exp / f"trial_{tid}").glob("checkpoint_*")):
                    self.pruned_mid_search = True

    watch = Watch(tmp_path / "prune")
    # Trials of several seconds (8 reports of two passes), longer than the 1 s in which Tune's state reaches storage.
    space = load_space("cpu_small", "image", {"image_size": 16, "max_epochs": 8, "backbone": "timm/resnet10t:scratch",
                                              "grace_period": 8,  # ASHA's only rung is the end: no trial cut short
                                              "report_rows": 2 * len(digits_trial_data.y_train)})
    result = run_search(digits_trial_data, space, SearchConfig(
        "accuracy", SearchStorage(str(tmp_path), "prune", checkpoint_every_s=0), SearchLimits(max_trials=4),
        {"cpu": 1}, concurrency=2, progress=False), callbacks=[watch])
    assert watch.checkpointed and watch.pruned_mid_search
    assert not list((tmp_path / "prune").glob("trial_*/checkpoint_*"))
    assert result.peak_disk_mb * 2**20 >= _peak_lower_bound(result)
