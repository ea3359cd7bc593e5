"""Nothing is lost: a SIGKILLed driver's search resumes, keeping its finished trials; Ctrl-C during the search or the
retrain stops the run, saying how to resume, with nothing exported. (A trial whose worker dies, and checkpoint
pruning, are checked on test_search's shared search.)"""
from __future__ import annotations

import contextlib
import json
import os
import re
import select
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



def _digits_csv(folder: Path) -> Path:
    """240 digits of 4 classes as PNG files and a CSV naming them, in `folder`."""
    import pandas as pd
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    rows = []
    for c in range(4):
        for i in np.flatnonzero(d.target == c)[:60]:
            Image.fromarray((d.images[i] * 16).astype(np.uint8)).save(folder / f"{i}.png")
            rows.append({"image": f"{i}.png", "label": c})
    pd.DataFrame(rows).to_csv(folder / "digits.csv", index=False)
    return folder / "digits.csv"


def _wait_for_finished_trials(out: Path, proc: subprocess.Popen, n: int) -> None:
    """Until Tune's saved state under the run folder `out` holds `n` finished trials, or the driver has ended (a
    safety net of 300 s: the signal the caller then sends waits for this event, not for a time)."""
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        marker = out / "LATEST_SEARCH"
        if marker.exists() and len(_terminated(out / "ray_results" / marker.read_text().strip(),
                                               writer_alive=True) or {}) >= n:
            return
        time.sleep(0.3)


@contextlib.contextmanager
def _killed_if_left(proc: subprocess.Popen):
    """The driver, killed on the way out if it is still running (a failed assert must not leave it training)."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def _ctrl_c(proc: subprocess.Popen) -> tuple[str, str]:
    """Ctrl-C to the driver, then what it printed until it ended."""
    proc.send_signal(signal.SIGINT)
    return proc.communicate(timeout=120)

@pytest.mark.slow
def test_sigkilled_driver_resumes_keeping_finished_trials(ray_session, tmp_path):
    import ray

    out = tmp_path / "run"
    # The driver joins this session's Ray cluster, so killing it kills only the driver (and its trials).
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "TUNE_GLOBAL_CHECKPOINT_S": "2"}
    csv = _digits_csv(tmp_path)
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    proc = subprocess.Popen([sys.executable, str(script), str(out), str(csv), json.dumps(SPACE)],
                            env=env, stderr=subprocess.DEVNULL)
    _wait_for_finished_trials(out, proc, 2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    exp = out / "ray_results" / (out / "LATEST_SEARCH").read_text().strip()
    before = _terminated(exp)
    assert 2 <= len(before) < 8, "the driver was not killed mid-search"
    assert not (out / "model").exists()

    from automl import load
    from automl.ops.cli import main as cli_main

    # The same command again with --resume, from the CLI.
    assert cli_main(["finetune", str(csv), "--output", str(out), "--resume", "--time-budget", "none",
                     "--max-trials", "8", "--set", json.dumps(SPACE), "--quiet", "--retrain", "false",
                     "--no-export-formats", "--find-label-errors", "false"]) == 0
    model = load(out / "model")
    after = _terminated(exp)
    assert len(model.trials) == 8 and len(after) == 8 and (model.trials["status"] != "ERROR").all()
    for tid, last in before.items():  # finished trials are kept, not re-run
        assert after[tid]["timestamp"] == last["timestamp"] and after[tid]["epoch"] == last["epoch"]
    assert model.manifest.search["best_score"] >= max(r["val_accuracy"] for r in before.values())


@pytest.mark.slow
def test_ctrl_c_during_the_search_stops_the_run_with_its_state_saved_and_nothing_exported(ray_session, tmp_path):
    """Ctrl-C (SIGINT) during the search: Tune stops it and saves its state, and returned as if the search had ended;
    the run then exported a model from the cut search (0.944 for ~0.99 on digits) and said nothing. `automl
    finetune` now exits 130 saying so and how to resume, with no export, and the saved state resumable."""
    import ray
    from ray import tune

    out = tmp_path / "run"
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "TUNE_GLOBAL_CHECKPOINT_S": "2"}
    proc = subprocess.Popen([sys.executable, "-m", "automl", "finetune", str(_digits_csv(tmp_path)), "--output",
                             str(out), "--time-budget", "none", "--max-trials", "8", "--set", json.dumps(SPACE),
                             "--quiet", "--retrain", "false", "--no-export-formats", "--find-label-errors", "false"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with _killed_if_left(proc):
        _wait_for_finished_trials(out, proc, 1)
        assert proc.poll() is None, "the search ended before it could be interrupted"
        _, stderr = _ctrl_c(proc)
    exp = out / "ray_results" / (out / "LATEST_SEARCH").read_text().strip()
    assert proc.returncode == 130, stderr[-3000:]
    said = re.search(r"Stopped by Ctrl-C during the search, with (\d+) trial\(s\) scored; nothing was exported\. "
                     r"The search's state is saved in (\S+)\. Fix: run the same call again with resume=True "
                     r"\(CLI: --resume\)", stderr)
    assert said and Path(said.group(2)) == exp.resolve(), stderr[-3000:]
    finished = _terminated(exp)
    assert 1 <= len(finished) < 8 and int(said.group(1)) >= len(finished), (said.group(1), finished)
    assert not (out / "model").exists() and tune.Tuner.can_restore(str(exp))


RETRAIN_DRIVER = """
import signal, sys
import numpy as np
import ray
from automl.data.trial_data import TrialData
from automl.errors import RunInterrupted
from automl.training.retrain import retrain
set_handler = signal.signal
def spy(sig, handler):  # says when the retrain's Ctrl-C handler is in place: the signal is sent after that
    out = set_handler(sig, handler)
    if sig == signal.SIGINT and getattr(handler, "__name__", "") == "on_ctrl_c":
        print("HANDLER IN PLACE", flush=True)
    return out
signal.signal = spy
ray.init(address=sys.argv[1], log_to_driver=False)
rng = np.random.default_rng(0)
data = TrialData("image", 2, rng.integers(0, 255, (64, 3, 16, 16), dtype=np.uint8), np.arange(64) % 2)
before = signal.getsignal(signal.SIGINT)
try:
    retrain({"backbone": "timm/resnet10t:scratch", "image_size": 16, "batch_size": 16}, data, epochs=2000,
            schedule_epochs=2000, storage_path=sys.argv[2])
    print("RETURNED", flush=True)
except RunInterrupted as exc:
    print("INTERRUPTED", exc, flush=True)
print("HANDLER GIVEN BACK", signal.getsignal(signal.SIGINT) is before, flush=True)
"""


@pytest.mark.slow
def test_ctrl_c_during_the_retrain_aborts_it_and_says_so(ray_session, tmp_path):
    """Ray Train's own Ctrl-C handler exited the process once it had aborted the run (no message, code 1; a notebook's
    kernel too) and stayed installed after training. The retrain now aborts the run, raises RunInterrupted with how
    to resume, and gives the handler back."""
    import ray

    proc = subprocess.Popen([sys.executable, "-c", RETRAIN_DRIVER, ray.get_runtime_context().gcs_address,
                             str(tmp_path / "train")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with _killed_if_left(proc):
        ready, _, _ = select.select([proc.stdout], [], [], 180)  # a safety net: the line is the event waited for
        seen = proc.stdout.readline() if ready else ""
        assert seen.strip() == "HANDLER IN PLACE", (seen, proc.stderr.read()[-3000:] if proc.poll() is not None else "")
        stdout, stderr = _ctrl_c(proc)
    assert ("INTERRUPTED Stopped by Ctrl-C during the retrain on train+validation; nothing was exported. Fix: run the "
            "same call again with resume=True") in stdout, (stdout, stderr[-3000:])
    assert "RETURNED" not in stdout and "HANDLER GIVEN BACK True" in stdout, (stdout, stderr[-3000:])


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
