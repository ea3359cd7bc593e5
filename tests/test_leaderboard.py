"""Nightly refresh end to end: CLI refresh of a 2-dataset suite, warm start, champion/challenger,
a killed refresh completed by the next one, and the static HTML page checked in headless Chromium."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from automl.ops import leaderboard
from automl.ops.cli import main as cli_main
from automl.ops.store import Store

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def suite(tmp_path_factory, digits_df):
    root = tmp_path_factory.mktemp("suite")
    entries = []
    for name, classes in (("evens", (0, 2)), ("odds", (1, 3))):
        rows = []
        for i, (arr, y) in enumerate(zip(digits_df["image"], digits_df["label"])):
            if y in classes:
                Image.fromarray((np.asarray(arr) * 16).clip(0, 255).astype(np.uint8)).save(root / f"{name}{i}.png")
                rows.append({"image": f"{name}{i}.png", "label": int(y)})
        pd.DataFrame(rows).to_csv(root / f"{name}.csv", index=False)
        entries.append({"name": name, "data": str(root / f"{name}.csv"), "label": "label"})
    suite = {"defaults": {"time_budget": 90, "max_trials": 1, "output_root": str(root / "out"),
                          "set": {"backbone": "timm/resnet10t:scratch", "image_size": 16, "max_epochs": 1}},
             "datasets": entries}
    (root / "suite.yaml").write_text(yaml.safe_dump(suite))
    return root / "suite.yaml"


def test_refresh_warm_start_champions_and_html(ray_session, suite, tmp_path):
    url = f"sqlite:///{tmp_path / 'lb.db'}"
    assert cli_main(["leaderboard", "refresh", str(suite), "--db", url, "--quiet"]) == 0
    store = Store(url)
    first = store.leaderboard()
    assert sorted(first["dataset"]) == ["evens", "odds"] and first["is_champion"].all()
    # Second night: the search starts from last night's winner (warm start) and competes with it.
    assert cli_main(["leaderboard", "refresh", str(suite), "--db", url, "--force", "--quiet"]) == 0
    board = store.leaderboard()
    assert len(board) == 4 and board.groupby("dataset")["is_champion"].sum().tolist() == [1, 1]
    assert board["reason"].str.len().gt(0).all()
    runs = store.table("runs").sort_values("started_at")
    trials = store.table("trials")
    for name in ("evens", "odds"):
        prev = first.set_index("dataset").loc[name, "hyperparameters"]
        latest = runs[runs["dataset"] == name].iloc[-1]["id"]
        cfg = trials[trials["run_id"] == latest].iloc[0]["config"]
        assert cfg["lr"] == pytest.approx(prev["lr"]) and cfg["schedule"] == prev["schedule"]
    # Third run the same night: nothing left to do.
    assert {r["status"] for r in leaderboard.refresh(suite, store, progress=False)} == {"skipped"}

    assert cli_main(["leaderboard", "show", "--db", url]) == 0
    assert cli_main(["leaderboard", "html", str(tmp_path / "html"), "--db", url]) == 0
    page = tmp_path / "html" / "index.html"
    chrome = ["/usr/bin/chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              f"--user-data-dir={tmp_path / 'chrome'}"]
    dom = subprocess.run([*chrome, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert dom.count("<table class=\"leaderboard\"") == 2, dom[:2000]
    assert "★ champion" in dom and "data:image/png;base64" in dom and "MODEL_CARD.html" in dom
    subprocess.run([*chrome, f"--screenshot={tmp_path / 'leaderboard.png'}", "--window-size=1200,1400", page.as_uri()],
                   capture_output=True, timeout=120)
    assert (tmp_path / "leaderboard.png").stat().st_size > 10_000
    if os.environ.get("AUTOML_KEEP_SCREENSHOT"):
        Path(os.environ["AUTOML_KEEP_SCREENSHOT"]).write_bytes((tmp_path / "leaderboard.png").read_bytes())


def test_killed_refresh_is_completed_by_the_next(ray_session, suite, tmp_path):
    import ray

    url = f"sqlite:///{tmp_path / 'lb.db'}"
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-m", "automl", "leaderboard", "refresh", str(suite), "--db", url,
                             "--quiet"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = Store(url)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        runs = store.table("runs")
        if len(runs) and (runs["status"] == "finished").sum() >= 1:
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    runs = store.table("runs")
    assert (runs["status"] == "finished").sum() == 1, runs
    assert len(store.leaderboard()) == 1  # consistent: one finished run, one model
    results = leaderboard.refresh(suite, store, progress=False, stale_after_s=0)
    assert sorted(r["status"] for r in results)[0] in ("champion",) and any(r["status"] == "skipped" for r in results)
    runs = store.table("runs")
    assert set(runs["status"]) <= {"finished", "interrupted"} and (runs["status"] == "finished").sum() == 2
    assert store.leaderboard()["is_champion"].sum() == 2
