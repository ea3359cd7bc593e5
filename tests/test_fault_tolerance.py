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

from automl.search.tune import run_search
from automl.search.space import load_space

pytestmark = pytest.mark.slow


def test_trial_that_dies_resumes_from_its_last_checkpoint(ray_session, digits_trial_data, tmp_path):
    marker = tmp_path / "crashed"
    space = load_space("cpu_small", "image", {"image_size": 16, "max_epochs": 4, "backbone": "timm/resnet10t:scratch",
                                              "_crash_once_after_epoch": f"2:{marker}"})
    result = run_search(digits_trial_data, space, metric="accuracy", storage_path=str(tmp_path), name="crash",
                        time_budget_s=180, max_trials=1, resources={"cpu": 1}, concurrency=1, progress=False,
                        checkpoint_every_s=0)
    assert marker.exists()  # the worker process really died once
    row = result.trials.iloc[0]
    assert row["status"] == "COMPLETED" and row["epochs_run"] == 4
    history = next(iter(result.history.values()))
    # Continued at epoch 3 from the epoch-2 checkpoint, not from scratch. (Ray restores the trial's result
    # file from storage on restart, so lines written after its last sync may be gone: judge by time.)
    after_crash = [r["training_iteration"] for r in history if r["timestamp"] > marker.stat().st_mtime]
    assert after_crash == [3, 4]
    assert "_crash_once_after_epoch" not in result.best_config
    assert result.peak_disk_mb > 0
    trial_dir = next(Path(result.experiment_path).glob("trial_*"))
    assert not list(trial_dir.glob("checkpoint_*"))  # finished trial's checkpoints pruned


DRIVER = """
import sys
import numpy as np, pandas as pd
from sklearn.datasets import load_digits
from automl import auto_finetune
d = load_digits()
keep = np.concatenate([np.flatnonzero(d.target == c)[:60] for c in range(4)])
df = pd.DataFrame({"image": list(d.images[keep]), "label": d.target[keep]})
auto_finetune(df, time_budget_s=600, max_trials=8, output_dir=sys.argv[1], find_label_errors=False,
              export_formats=False, search_space={"backbone": "timm/resnet10t:scratch", "image_size": 16, "max_epochs": 5}, progress=False)
"""


def _terminated(exp: Path) -> dict[str, dict]:
    """trial id -> last result, for trials Tune's newest saved experiment state records as finished."""
    # Newest session by the time in the file name: a resume re-syncs (and re-stamps) the old session's file.
    states = sorted(exp.glob("experiment_state-*.json"))
    if not states:
        return {}
    out = {}
    for entry in json.loads(states[-1].read_text())["trial_data"]:
        info = json.loads(entry[0])
        if info.get("status") == "TERMINATED":
            out[info["trial_id"]] = json.loads(entry[1])["last_result"]
    return out


def test_sigkilled_driver_resumes_keeping_finished_trials(ray_session, tmp_path):
    import ray

    out = tmp_path / "run"
    # The driver joins this session's Ray cluster, so killing it kills only the driver (and its trials).
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "TUNE_GLOBAL_CHECKPOINT_S": "2"}
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    proc = subprocess.Popen([sys.executable, str(script), str(out)], env=env, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    before: dict = {}
    while time.time() < deadline and proc.poll() is None:
        marker = out / "LATEST_SEARCH"
        if marker.exists():
            before = _terminated(out / "ray_results" / marker.read_text().strip())
            if len(before) >= 2:  # Tune's saved state holds two finished trials
                break
        time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    exp = out / "ray_results" / (out / "LATEST_SEARCH").read_text().strip()
    before = _terminated(exp)
    assert 2 <= len(before) < 8, "the driver was not killed mid-search"
    assert not (out / "model").exists()

    from automl import auto_finetune
    from sklearn.datasets import load_digits
    import pandas as pd

    d = load_digits()
    keep = np.concatenate([np.flatnonzero(d.target == c)[:60] for c in range(4)])
    df = pd.DataFrame({"image": list(d.images[keep]), "label": d.target[keep]})
    model = auto_finetune(df, time_budget_s=600, max_trials=8, output_dir=out, find_label_errors=False,
                          export_formats=False, search_space={"backbone": "timm/resnet10t:scratch", "image_size": 16, "max_epochs": 5}, resume=True,
                          progress=False)
    after = _terminated(exp)
    assert len(model.trials) == 8 and len(after) == 8 and (model.trials["status"] != "ERROR").all()
    for tid, last in before.items():  # finished trials are kept, not re-run
        assert after[tid]["timestamp"] == last["timestamp"] and after[tid]["epoch"] == last["epoch"]
    assert (out / "model" / "config.json").exists()
    assert model.meta["search"]["best_score"] >= max(r["val_accuracy"] for r in before.values())
