"""The leaderboard store on SQLite (file, WAL), in memory, and a real PostgreSQL server."""
from __future__ import annotations

import datetime as dt
import glob
import multiprocessing as mp
import os
import shutil
import subprocess
import tempfile
import time

import pandas as pd
import pytest

from automl.export.manifest import ExportManifest, Preprocessing
from automl.models import BackboneSpec
from automl.ops.store import Store


def _manifest(score: float, lr: float = 1e-3) -> ExportManifest:
    return ExportManifest(task="multiclass", modality="image", classes=[0, 1], label_column="label",
                          input_columns=["image"], preprocessing=Preprocessing("image"), metric="accuracy",
                          backbone=BackboneSpec("timm", "resnet10t"), test_metrics={"accuracy": score},
                          hyperparameters={"lr": lr, "unfreeze": "all", "schedule": "cosine"})


def _add(store: Store, dataset: str, score: float, fingerprint: str = "fp1", lr: float = 1e-3) -> str:
    run = store.start_run(dataset, refresh_id="r", time_budget_s=60)
    trials = pd.DataFrame([{"trial_id": "t1", "config/lr": lr, "best_val_accuracy": score, "epochs_run": 3,
                            "status": "COMPLETED"}])
    store.add_trials(run, trials, "accuracy")
    mid = store.add_model(run, dataset, fingerprint, f"/exports/{dataset}/{score}", _manifest(score, lr))
    store.finish_run(run, "finished", compute_s=12.0, trial_epochs=3)
    return mid


def _exercise(store: Store) -> None:
    store.ensure_dataset("digits", "fp1")
    a = _add(store, "digits", 0.90)
    assert store.decide(a)[0] == "champion"
    b = _add(store, "digits", 0.85, lr=3e-3)
    decision, reason = store.decide(b)
    assert decision == "challenger" and "does not beat" in reason
    c = _add(store, "digits", 0.95, lr=5e-4)
    assert store.decide(c)[0] == "champion"
    assert store.champion("digits")["id"] == c
    # data changed (new fingerprint): compared with the champion re-scored on the new split
    d = _add(store, "digits", 0.80, fingerprint="fp2")
    assert store.decide(d, champion_score_on_new_split=0.70)[0] == "champion"
    board = store.leaderboard("digits")
    assert list(board["rank"]) == [1, 2, 3, 4] and board["is_champion"].sum() == 1
    assert [h[1] for h in store.champion_history("digits")] == [0.90, 0.95, 0.80]
    assert store.best_configs("digits", 2)[0]["lr"] == 5e-4
    assert len(store.table("trials")) == 4 and set(store.table("runs")["status"]) == {"finished"}
    stale = store.start_run("digits", refresh_id="killed", time_budget_s=60)
    assert store.mark_interrupted(dt.timedelta(seconds=-1)) == 1
    runs = store.table("runs").set_index("id")
    assert runs.loc[stale, "status"] == "interrupted"


def test_in_memory_store():
    _exercise(Store.memory())


def test_sqlite_file_store_uses_wal(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'lb.db'}")
    _exercise(store)
    with store.engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


RACE_TIMEOUT_S = 120


def _racer(url: str, dataset: str, scores: list[float], barrier, log: str) -> None:
    import traceback

    try:
        store = Store(url)
        ids = [_add(store, dataset, s) for s in scores]
        barrier.wait(timeout=RACE_TIMEOUT_S)  # a racer that died before it broke the barrier: no wait forever
        for mid in ids:
            store.decide(mid)
    except BaseException:
        with open(log, "a") as f:
            f.write(traceback.format_exc())
        raise


def _race(url: str) -> None:
    Store(url).ensure_dataset("race", "fp1")
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    log = tempfile.mktemp(suffix=".log")
    procs = [ctx.Process(target=_racer, args=(url, "race", [0.5 + 0.01 * i + 0.001 * k for i in range(10)], barrier, log))
             for k in range(2)]
    for p in procs:
        p.daemon = True  # never outlives pytest, even if the kill below could not reap it
        p.start()
    give_up_at = time.monotonic() + 2 * RACE_TIMEOUT_S  # one limit for both: after the barrier's own timeout
    for p in procs:
        p.join(max(0.0, give_up_at - time.monotonic()))
    hung = [p.pid for p in procs if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(10)
    errors = open(log).read() if os.path.exists(log) else "no log"
    assert not hung, f"racer processes {hung} still ran after {RACE_TIMEOUT_S * 2} s and were killed\n{errors}"
    assert all(p.exitcode == 0 for p in procs), errors
    store = Store(url)
    board = store.leaderboard("race")
    assert len(board) == 20  # no row lost
    assert board["is_champion"].sum() == 1  # never two champions
    assert board.loc[board["is_champion"], "score"].item() == board["score"].max()


def test_two_concurrent_refreshes_on_sqlite(tmp_path):
    _race(f"sqlite:///{tmp_path / 'race.db'}")


@pytest.fixture(scope="module")
def postgres_url(free_port_factory):
    """A real PostgreSQL server on 127.0.0.1, started for these tests (Debian's postgresql package)."""
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    assert bins, "PostgreSQL is not installed: tests/system_deps.sh installs Debian's postgresql package"
    bindir = bins[-1]
    data = tempfile.mkdtemp(prefix="pg-")
    port = free_port_factory()  # outside the ephemeral range: no outgoing connection takes it first
    as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_pg:
        shutil.chown(data, "postgres")
    subprocess.run([*as_pg, f"{bindir}/initdb", "-D", data, "-A", "trust", "-U", "automl"], check=True,
                   capture_output=True)
    subprocess.run([*as_pg, f"{bindir}/pg_ctl", "-D", data, "-l", f"{data}/log", "-w", "-o",
                    f"-p {port} -k {data} -c listen_addresses=127.0.0.1", "start"], check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg://automl@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_pg, f"{bindir}/pg_ctl", "-D", data, "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


@pytest.mark.slow  # starts a PostgreSQL server
def test_postgresql_store(postgres_url):
    _exercise(Store(postgres_url))


@pytest.mark.slow
def test_two_concurrent_refreshes_on_postgresql(postgres_url):
    _race(postgres_url)
