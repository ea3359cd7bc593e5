"""Nightly refresh end to end: CLI refresh of a 2-dataset suite, warm start, champion/challenger,
a killed refresh completed by the next one, two refresh processes at once, and the static HTML page checked in
headless Chromium."""
from __future__ import annotations

import os
import re
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
    # The space's own start point is a useless config (lr 1e-6): the first night's winner differs from it, so the
    # second night can be seen to start from that winner.
    space = {"name": "tiny", "parameters": {
        "backbone": "timm/resnet10t:scratch", "image_size": 16, "batch_size": 16,
        "lr": {"type": "float", "low": 1.0e-6, "high": 1.0e-2, "log": True}},
        "max_epochs": 2, "start_points": [{"lr": 1.0e-6}]}
    (root / "space.yaml").write_text(yaml.safe_dump(space))
    suite = {"defaults": {"time_budget": None, "max_trials": 3, "output_root": str(root / "out"), "retrain": False,
                          "search_space": str(root / "space.yaml"), "find_label_errors": False,
                          "export_formats": False},
             "datasets": entries}
    (root / "suite.yaml").write_text(yaml.safe_dump(suite))
    return root / "suite.yaml"


def test_a_killed_refresh_is_completed_by_the_next_whose_champions_warm_start_the_next_night(
        ray_session, suite, tmp_path, capsys, monkeypatch):
    """Night 1 is a refresh (the CLI, in its own process) killed mid-way and completed by the next; night 2 (two
    refresh processes at once, of the first dataset) and night 3 (the second dataset's data changed) warm-start from
    its champions; the board as a table and as HTML between them."""
    import ray

    url = f"sqlite:///{tmp_path / 'lb.db'}"
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-m", "automl", "leaderboard", "refresh", str(suite), "--db", url,
                             "--quiet"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = Store(url)
    deadline = time.time() + 600  # a safety net: the kill waits for the event below, not for a time
    while time.time() < deadline and proc.poll() is None:
        runs = store.table("runs")
        # The first dataset is finished and the second one running: kill now, mid-refresh.
        if len(runs) == 2 and sorted(runs["status"]) == ["finished", "running"]:
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the refresh ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    runs = store.table("runs")
    assert (runs["status"] == "finished").sum() == 1, runs
    assert len(store.leaderboard()) == 1  # consistent: one finished run, one model
    results = leaderboard.refresh(suite, store, progress=False, stale_after_s=0)
    assert sorted(r["status"] for r in results) == ["champion", "skipped"], results
    runs = store.table("runs")
    assert set(runs["status"]) <= {"finished", "interrupted"} and (runs["status"] == "finished").sum() == 2
    first = store.leaderboard()
    assert sorted(first["dataset"]) == ["evens", "odds"] and first["is_champion"].all()
    winners = first.set_index("dataset")["hyperparameters"]
    assert all(w["lr"] != pytest.approx(1e-6) for w in winners)  # the night's winner is not the start point
    # Second night, one trial, the first dataset refreshed by two processes at once: each must train last night's
    # winner (the warm start), not the space's start point; no row is lost and each dataset keeps one champion, its
    # best model. (The second dataset's warm start is night 3's.)
    patched = yaml.safe_load(suite.read_text())
    patched["defaults"]["max_trials"] = 1
    patched["datasets"] = patched["datasets"][:1]
    night2 = tmp_path / "suite2.yaml"
    night2.write_text(yaml.safe_dump(patched))
    logs = [tmp_path / f"night2-{i}.log" for i in range(2)]  # files, not pipes: a full pipe would stall a refresh
    twice = []
    try:
        for log in logs:
            with open(log, "w") as f:
                twice.append(subprocess.Popen([sys.executable, "-m", "automl", "leaderboard", "refresh", str(night2),
                                               "--db", url, "--force", "--quiet"], env=env, stdout=f,
                                              stderr=subprocess.STDOUT))
        for p, log in zip(twice, logs):
            assert p.wait(600) == 0, log.read_text()[-3000:]
    finally:
        for p in twice:
            if p.poll() is None:
                p.kill()
                p.wait(30)
    board = store.leaderboard()
    assert len(board) == 4, board  # night 1's two models and each refresh's one
    # Each row's export is its own (two refreshes started in the same second once wrote to one folder): it loads and
    # scores what its row says.
    from automl import load

    assert board["export_path"].nunique() == 4, board["export_path"]
    for _, r in board.iterrows():
        assert load(r["export_path"]).metrics[r["metric"]] == pytest.approx(r["score"], abs=1e-6), r["export_path"]
    held = re.compile(r"test (\S+) ([\d.]+) (beats|does not beat) the current model's ([\d.]+) \(champion (\w{8})\)")
    for name, rows in board.sort_values("created_at").groupby("dataset"):
        assert rows["is_champion"].sum() == 1 and rows.loc[rows["is_champion"], "score"].item() == rows["score"].max()
        assert rows.iloc[0]["reason"] == "first model for this dataset", rows.iloc[0]["reason"]
        for _, r in rows.iloc[1:].iterrows():
            # Each later model was held to the champion of its moment: the reason names it, its score and the verdict.
            m = held.fullmatch(r["reason"])
            assert m, (name, r["reason"])
            (champ,) = [c for _, c in rows.iterrows() if c["id"].startswith(m.group(5)) and c["id"] != r["id"]]
            assert m.group(2) == f"{r['score']:.4f}" and m.group(4) == f"{champ['score']:.4f}", (name, r["reason"])
            assert (m.group(3) == "beats") == (r["score"] > champ["score"]), (name, r["reason"])
    def trained_lr(run_id: str) -> float:
        """The learning rate of the run's one trial."""
        trials = store.table("trials")
        (cfg,) = trials[trials["run_id"] == run_id]["config"]
        return cfg["lr"]

    runs = store.table("runs").sort_values("started_at")
    for run_id in runs[runs["dataset"] == "evens"]["id"].iloc[-2:]:  # the two processes' runs
        assert trained_lr(run_id) == pytest.approx(winners["evens"]["lr"])
    # Third run the same night: nothing left to do.
    assert {r["status"] for r in leaderboard.refresh(suite, store, progress=False)} == {"skipped"}

    monkeypatch.setenv("COLUMNS", "250")  # rich sizes its table to the terminal: wide enough for every cell
    capsys.readouterr()
    assert cli_main(["leaderboard", "show", "--db", url]) == 0
    shown = capsys.readouterr().out
    board = store.leaderboard()
    assert shown.count("★") == 2, shown  # one champion per dataset
    cells = [[c.strip() for c in re.split("[│|┃]", line)[1:-1]] for line in shown.splitlines()]
    rows = {(c[0], c[1]): c for c in cells if len(c) == 8}  # (dataset, rank) -> the row's cells
    for _, r in board.iterrows():  # every model's row: its test score, and the star on the champion only
        row = rows[(r["dataset"], str(r["rank"]))]
        assert row[4] == f"{r['metric']} {r['score']:.4f}" and (row[7] == "★") == bool(r["is_champion"]), row
    assert cli_main(["leaderboard", "html", str(tmp_path / "html"), "--db", url]) == 0
    page = tmp_path / "html" / "index.html"
    chrome = ["/usr/bin/chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              f"--user-data-dir={tmp_path / 'chrome'}"]
    dom = subprocess.run([*chrome, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert dom.count("<table class=\"leaderboard\"") == 2, dom[:2000]
    assert "★ champion" in dom and "data:image/png;base64" in dom and "MODEL_CARD.html" in dom
    for name, models in (("evens", 3), ("odds", 1)):  # each dataset's table lists its models, the champion marked
        section = dom.split(f"data-dataset=\"{name}\"")[1].split("</table>")[0]
        assert section.count("<tr class=") == models and section.count("class=\"champion\"") == 1, section
    if os.environ.get("AUTOML_KEEP_SCREENSHOT"):
        subprocess.run([*chrome, f"--screenshot={os.environ['AUTOML_KEEP_SCREENSHOT']}", "--window-size=1200,1400",
                        page.as_uri()], capture_output=True, timeout=120)

    # The second dataset's data changed: its champion is re-scored on the new test split before the new model is
    # compared, and the new model's one trial is that champion's config (the warm start).
    odds = yaml.safe_load(suite.read_text())["datasets"][1]
    csv = Path(odds["data"])
    pd.read_csv(csv).iloc[::2].to_csv(csv.with_name("odds_half.csv"), index=False)
    patched["datasets"] = [{**odds, "data": str(csv.with_name("odds_half.csv"))}]
    night3 = tmp_path / "suite3.yaml"
    night3.write_text(yaml.safe_dump(patched))
    champion = store.champion("odds")
    (res,) = leaderboard.refresh(night3, store, force=True, progress=False)
    last = store.table("runs").sort_values("started_at")["id"].iloc[-1]
    assert trained_lr(last) == pytest.approx(winners["odds"]["lr"])
    # The champion's score on the new test split, as the public API computes it, is what the new model was held to.
    from automl.diagnostics.update import load_test_split

    x, labels = load_test_split(res["export"])
    rescored = float(np.mean(load(champion["export_path"]).predict(list(x)) == np.array(labels)))
    assert f"re-scored on the new test split: {rescored:.4f}" in res["reason"], (res, rescored)
