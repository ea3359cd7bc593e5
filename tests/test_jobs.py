"""Batch submission against a real, token-protected Ray head started by the test (not a mock)."""
from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from automl import AutoMLError
from automl.ops import jobs
from automl.ops.cli import main as cli_main

# Every test here but the manifest check uses the token-protected Ray head and is marked slow; the manifest check
# starts nothing.


@pytest.fixture(scope="module")
def token_head(free_port_factory):
    import requests

    token = secrets.token_hex(32)
    ports = {}
    while len(set(ports.values())) < 5:  # five distinct ports, outside the ephemeral range (see conftest)
        ports = {k: free_port_factory() for k in ("gcs", "dash", "client", "agent", "metrics")}
    temp = tempfile.mkdtemp(prefix="rh-", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    # Job drivers run `python`: on a cluster node that is the environment automl is installed in.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    ray_bin = str(Path(sys.executable).parent / "ray")
    proc = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", f"--port={ports['gcs']}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={ports['dash']}", "--num-cpus=2", f"--ray-client-server-port={ports['client']}",
         f"--dashboard-agent-listen-port={ports['agent']}", f"--metrics-export-port={ports['metrics']}",
         f"--temp-dir={temp}"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    url = f"http://127.0.0.1:{ports['dash']}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            if requests.get(f"{url}/api/version", timeout=2).status_code in (200, 401, 403):
                break
        except requests.RequestException:
            time.sleep(1)
    else:
        proc.terminate()
        pytest.fail("the Ray head did not come up")
    yield url, token
    proc.terminate()  # `ray start --block` stops its processes on SIGTERM...
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    try:  # ...and whatever of the head is still up goes with its process group
        os.killpg(proc.pid, 9)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def refresh_running(token_head, tmp_path_factory, digits_df):
    """A leaderboard refresh as Ray jobs (the CLI, in its own process), started before the batch test so that the two
    submissions run on the cluster together; test_leaderboard_refresh_as_ray_jobs waits for it."""
    url, token = token_head
    root = tmp_path_factory.mktemp("refresh")
    rows = []
    for i, (arr, y) in enumerate(zip(digits_df["image"], digits_df["label"])):
        if i % 4 == 0:
            Image.fromarray((np.asarray(arr) * 16).clip(0, 255).astype(np.uint8)).save(root / f"{i}.png")
            rows.append({"image": f"{i}.png", "label": int(y)})
    pd.DataFrame(rows).to_csv(root / "d.csv", index=False)
    suite = {"defaults": {"time_budget": None, "max_trials": 1, "output_root": str(root / "out"),
                          "retrain": False, "export_formats": False, "find_label_errors": False,
                          "set": {"backbone": "timm/resnet10t:scratch", "image_size": 16, "max_epochs": 1}},
             "datasets": [{"name": "nightly", "data": str(root / "d.csv"), "label": "label"}]}  # not the batch's name
    (root / "suite.yaml").write_text(yaml.safe_dump(suite))
    db = f"sqlite:///{root / 'lb.db'}"
    env = {**os.environ, "RAY_AUTH_TOKEN": token}
    with open(root / "refresh.log", "w") as log:  # a file, not a pipe: nothing blocks the refresh while no one reads
        proc = subprocess.Popen([sys.executable, "-m", "automl", "leaderboard", "refresh", str(root / "suite.yaml"),
                                 "--address", url, "--db", db], env=env, stdout=log, stderr=subprocess.STDOUT)
    yield proc, db, root / "refresh.log"
    if proc.poll() is None:
        proc.kill()
    proc.wait(30)


@pytest.mark.slow
def test_submission_without_the_token_is_refused(token_head, monkeypatch):
    url, _ = token_head
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", "/nonexistent")
    monkeypatch.setenv("HOME", tempfile.mkdtemp())  # no ~/.ray/auth_token either
    with pytest.raises(AutoMLError, match="auth token"):
        jobs.client(url)
    with pytest.raises(AutoMLError, match="rejected"):
        jobs.client(url, token="not-the-token")


@pytest.mark.slow
def test_batch_one_bad_entry_fails_alone(token_head, refresh_running, tmp_path, monkeypatch, digits_df, capsys):
    url, token = token_head
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    rows = []
    for i, (arr, y) in enumerate(zip(digits_df["image"], digits_df["label"])):
        if i % 4:
            continue
        Image.fromarray((np.asarray(arr) * 16).clip(0, 255).astype(np.uint8)).save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "label": int(y)})
    pd.DataFrame(rows).to_csv(tmp_path / "good.csv", index=False)
    pd.DataFrame({"text": ["a", "b", "c", "d"], "label": ["x"] * 4}).to_csv(tmp_path / "bad.csv", index=False)
    manifest = {
        "defaults": {"time_budget": None, "max_trials": 1, "output_root": str(tmp_path / "out"), "retrain": False,
                     "export_formats": False, "find_label_errors": False,
                     "set": {"backbone": "timm/resnet10t:scratch", "image_size": 16, "max_epochs": 3, "lr": 3e-3}},
        "jobs": [{"name": "digits", "data": str(tmp_path / "good.csv"), "label": "label"},
                 {"name": "broken", "data": str(tmp_path / "bad.csv")}],
    }
    (tmp_path / "batch.yaml").write_text(yaml.safe_dump(manifest))
    code = cli_main(["submit", str(tmp_path / "batch.yaml"), "--address", url, "--wait", "--timeout", "600"])
    assert code == 1  # one job failed
    listed = {r["name"]: r for r in jobs.list_jobs(url) if not r["batch"].startswith("refresh-")}  # the batch's
    assert listed["digits"]["status"] == "SUCCEEDED", jobs.client(url).get_job_logs(listed["digits"]["submission_id"])
    export = tmp_path / "out" / "digits" / "model"
    assert listed["digits"]["export"].endswith(os.path.join("out", "digits", "model"))
    from automl import load

    m = load(export)  # the score the job list shows is the export's own test score
    assert listed["digits"]["score"] == pytest.approx(m.metrics[m.manifest.metric], abs=1e-4)
    assert listed["broken"]["status"] == "FAILED" and "only one class" in listed["broken"]["error"]
    out = capsys.readouterr().out
    assert "SUCCEEDED" in out and "FAILED" in out
    # README: `automl jobs list --batch ID` follows one batch (its id is printed at submission)
    batch = listed["digits"]["batch"]
    assert f"batch {batch}: submitted 2 job(s)" in out
    assert sorted(r["name"] for r in jobs.list_jobs(url, batch=batch)) == ["broken", "digits"]
    assert jobs.list_jobs(url, batch="no-such-batch") == []
    monkeypatch.setenv("COLUMNS", "400")  # rich's table on one line a job, nothing wrapped
    assert cli_main(["jobs", "list", "--batch", batch, "--address", url]) == 0
    table = capsys.readouterr().out
    for r in jobs.list_jobs(url, batch=batch):
        assert any(r["submission_id"] in line and r["status"] in line for line in table.splitlines()), table
    assert "only one class" in table
    assert cli_main(["jobs", "list", "--batch", "no-such-batch", "--address", url]) == 0
    assert "digits" not in capsys.readouterr().out
    assert cli_main(["jobs", "logs", listed["broken"]["submission_id"], "--address", url]) == 0
    assert "only one class" in capsys.readouterr().out
    assert cli_main(["jobs", "status", listed["digits"]["submission_id"], "--address", url]) == 0
    assert capsys.readouterr().out.strip().startswith(f"{listed['digits']['submission_id']}: SUCCEEDED")


@pytest.mark.slow
def test_a_running_job_can_be_stopped(token_head, tmp_path, monkeypatch, capsys):
    url, token = token_head
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    c = jobs.client(url)
    sid = c.submit_job(entrypoint="python -c 'import time; time.sleep(600)'", metadata={"automl_batch": "t"})
    deadline = time.time() + 120  # a safety net: wait for the job to be running
    while str(c.get_job_status(sid)).split(".")[-1] != "RUNNING" and time.time() < deadline:
        time.sleep(0.2)
    assert cli_main(["jobs", "stop", sid, "--address", url]) == 0
    assert capsys.readouterr().out.strip() == f"{sid}: stopping"
    assert jobs.wait([sid], url, timeout_s=120)[sid] == "STOPPED"


def test_manifest_errors_name_the_job_and_key(tmp_path):
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({"jobs": [{"name": "a", "data": "x.csv", "colour": 1}]}))
    with pytest.raises(AutoMLError, match=r"m.yaml: job .a.: Unknown option\(s\) .colour."):
        jobs.load_manifest(tmp_path / "m.yaml")
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({"jobs": [{"data": "x.csv"}, {"data": "x.csv"}]}))
    with pytest.raises(AutoMLError, match="appears twice"):
        jobs.load_manifest(tmp_path / "m.yaml")


@pytest.mark.slow
def test_leaderboard_refresh_as_ray_jobs(refresh_running):
    from automl.ops.store import Store

    proc, db, log = refresh_running
    assert proc.wait(900) == 0, log.read_text()[-3000:]
    board = Store(db).leaderboard()
    assert list(board["dataset"]) == ["nightly"] and board["is_champion"].all()
