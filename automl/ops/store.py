"""The results store behind the leaderboard: SQLAlchemy, SQLite by default (WAL on a local disk, the
rollback journal on a shared filesystem), any URL.

    Store()                                   # ./automl_leaderboard.db
    Store("postgresql+psycopg://u@host/db")   # a shared database
    Store.memory()                            # in-memory, for tests

Rows are only ever inserted, except a run's status and a model's champion flag.
At most one champion per dataset is guaranteed by a partial unique index, so two
refreshes promoting at once cannot both win; the loser retries its decision.
"""
from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from typing import Any

import pandas as pd
from sqlalchemy import (JSON, Boolean, Column, DateTime, Float, ForeignKey, Index, Integer, MetaData, String,
                        Table, Text, create_engine, event, insert, select, update)
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.pool import StaticPool

from automl.diagnostics.update import decide

SCHEMA_VERSION = 1
md = MetaData()
schema_info = Table("schema_info", md, Column("version", Integer, primary_key=True))
datasets = Table("datasets", md,
                 Column("name", String(200), primary_key=True),
                 Column("fingerprint", String(64)),
                 Column("created_at", DateTime(timezone=True)))
runs = Table("runs", md,
             Column("id", String(36), primary_key=True),
             Column("dataset", String(200), ForeignKey("datasets.name"), index=True),
             Column("refresh_id", String(64), index=True),
             Column("started_at", DateTime(timezone=True)),
             Column("finished_at", DateTime(timezone=True)),
             Column("status", String(20)),          # running | finished | failed | interrupted
             Column("code_version", String(40)),
             Column("search_space", JSON),
             Column("time_budget_s", Float),
             Column("compute_s", Float),
             Column("trial_epochs", Integer),
             Column("error", Text))
trials = Table("trials", md,
               Column("run_id", String(36), ForeignKey("runs.id"), primary_key=True),
               Column("trial_id", String(64), primary_key=True),
               Column("config", JSON),
               Column("metrics", JSON),
               Column("epochs", Integer),
               Column("status", String(20)))
models = Table("models", md,
               Column("id", String(36), primary_key=True),
               Column("run_id", String(36), ForeignKey("runs.id")),
               Column("dataset", String(200), ForeignKey("datasets.name"), index=True),
               Column("fingerprint", String(64)),
               Column("export_path", Text),
               Column("backbone", Text),
               Column("metric", String(40)),
               Column("score", Float),
               Column("test_metrics", JSON),
               Column("hyperparameters", JSON),
               Column("is_champion", Boolean, default=False),
               Column("promoted_at", DateTime(timezone=True)),
               Column("reason", Text),
               Column("created_at", DateTime(timezone=True)))
Index("one_champion_per_dataset", models.c.dataset, unique=True,
      sqlite_where=models.c.is_champion.is_(True), postgresql_where=models.c.is_champion.is_(True))


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _aware(t):
    return t.replace(tzinfo=dt.timezone.utc) if t is not None and t.tzinfo is None else t


# Filesystems that several machines share: SQLite's WAL mode needs shared memory between the processes that open
# the database, which such filesystems do not give (https://www.sqlite.org/wal.html), so a database there keeps
# SQLite's rollback journal.
NETWORK_FILESYSTEMS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "afs", "lustre", "gpfs", "ceph", "glusterfs",
                       "beegfs", "9p", "virtiofs", "wekafs", "panfs", "ocfs2", "gfs2"}
JOURNAL_ENV = "AUTOML_SQLITE_JOURNAL"  # "wal" or "delete": overrides the choice (a refresh on a cluster: delete)


def filesystem_type(path: str, mounts: str | None = None) -> str | None:
    """The type of the filesystem holding `path` (from /proc/mounts, or `mounts` in that format), or None."""
    import os

    if mounts is None:
        try:
            with open("/proc/mounts") as f:
                mounts = f.read()
        except OSError:
            return None
    path = os.path.realpath(path)
    best, kind = "", None
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, parts[2]
    return kind


def sqlite_journal_mode(db_path: str, mounts: str | None = None) -> str:
    """'wal' on a local disk (readers never block the nightly writer), 'delete' on a filesystem several machines
    share (SQLite's WAL does not work there), unless AUTOML_SQLITE_JOURNAL says."""
    import os

    forced = os.environ.get(JOURNAL_ENV, "").strip().lower()
    if forced in ("wal", "delete"):
        return forced
    kind = (filesystem_type(os.path.dirname(os.path.abspath(db_path)) or ".", mounts) or "").lower()
    shared = kind in NETWORK_FILESYSTEMS or (kind.startswith("fuse") and kind != "fuseblk")
    return "delete" if shared else "wal"


class Store:
    """Datasets, runs, trials and models, with champion/challenger bookkeeping."""

    def __init__(self, url: str = "sqlite:///automl_leaderboard.db", **engine_kwargs):
        self.url = url
        if url.startswith("sqlite"):
            engine_kwargs.setdefault("connect_args", {"timeout": 60, "check_same_thread": False})
        self.engine = create_engine(url, future=True, **engine_kwargs)
        if url.startswith("sqlite"):
            db_path = self.engine.url.database
            journal = sqlite_journal_mode(db_path) if db_path and db_path != ":memory:" else None

            @event.listens_for(self.engine, "connect")
            def _pragmas(dbapi_conn, _):
                import sqlite3

                cur = dbapi_conn.cursor()
                if journal is not None:
                    try:
                        cur.execute(f"PRAGMA journal_mode={journal.upper()}")
                    except sqlite3.OperationalError:
                        pass  # leaving WAL needs the only connection: the next connection that is alone switches
                cur.execute("PRAGMA busy_timeout=60000")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.close()
        self._create_tables()
        with self.engine.begin() as c:
            version = c.execute(select(schema_info.c.version)).scalar()
            if version is None:
                try:
                    c.execute(insert(schema_info).values(version=SCHEMA_VERSION))
                except IntegrityError:
                    pass
            elif version > SCHEMA_VERSION:
                raise RuntimeError(f"The leaderboard database {url} has schema version {version}, newer than this "
                                   f"automl's {SCHEMA_VERSION}. Fix: upgrade automl.")

    def _create_tables(self) -> None:
        """The tables, created once however many processes open a fresh database at the same time: on PostgreSQL
        under a transaction-scoped advisory lock (two concurrent CREATE TABLEs collide on pg_type); elsewhere a
        loser of the race sees the tables on a second look."""
        from sqlalchemy import text
        from sqlalchemy.exc import DatabaseError

        if self.engine.dialect.name == "postgresql":
            with self.engine.begin() as c:
                c.execute(text("SELECT pg_advisory_xact_lock(726101)"))
                md.create_all(c)
            return
        for attempt in range(3):
            try:
                md.create_all(self.engine)
                return
            except DatabaseError:
                if attempt == 2:
                    raise
                time.sleep(0.2 * (attempt + 1))

    @classmethod
    def memory(cls) -> "Store":
        return cls("sqlite://", poolclass=StaticPool)

    # ------------------------------------------------------------------ writes
    def ensure_dataset(self, name: str, fingerprint: str | None) -> None:
        with self.engine.begin() as c:
            row = c.execute(select(datasets).where(datasets.c.name == name)).first()
            if row is None:
                try:
                    c.execute(insert(datasets).values(name=name, fingerprint=fingerprint, created_at=now()))
                except IntegrityError:
                    pass  # another refresh registered it first
            elif fingerprint and row.fingerprint != fingerprint:
                c.execute(update(datasets).where(datasets.c.name == name).values(fingerprint=fingerprint))

    def start_run(self, dataset: str, *, refresh_id: str, time_budget_s: float | None, search_space: Any = None,
                  code_version: str = "") -> str:
        self.ensure_dataset(dataset, None)
        run_id = str(uuid.uuid4())
        with self.engine.begin() as c:
            c.execute(insert(runs).values(id=run_id, dataset=dataset, refresh_id=refresh_id, started_at=now(),
                                          status="running", code_version=code_version, search_space=search_space,
                                          time_budget_s=time_budget_s))
        return run_id

    def finish_run(self, run_id: str, status: str, *, compute_s: float | None = None, trial_epochs: int | None = None,
                   error: str | None = None) -> None:
        with self.engine.begin() as c:
            c.execute(update(runs).where(runs.c.id == run_id).values(
                status=status, finished_at=now(), compute_s=compute_s, trial_epochs=trial_epochs, error=error))

    def mark_interrupted(self, older_than: dt.timedelta) -> int:
        """Runs still 'running' long after they should have ended belong to a killed refresh."""
        with self.engine.begin() as c:
            res = c.execute(update(runs).where(runs.c.status == "running", runs.c.started_at < now() - older_than)
                            .values(status="interrupted", finished_at=now()))
            return res.rowcount or 0

    def add_trials(self, run_id: str, table: pd.DataFrame, metric: str) -> None:
        rows = []
        for _, r in table.iterrows():
            cfg = {k[7:]: _jsonable(v) for k, v in r.items() if k.startswith("config/") and v == v}
            met = {k: _jsonable(v) for k, v in r.items() if k.startswith("best_") and v == v}
            rows.append({"run_id": run_id, "trial_id": str(r["trial_id"]), "config": cfg, "metrics": met,
                         "epochs": int(r.get("epochs_run", 0) or 0), "status": str(r.get("status", ""))})
        if rows:
            with self.engine.begin() as c:
                c.execute(insert(trials), rows)

    def add_model(self, run_id: str, dataset: str, fingerprint: str, export_path: str, manifest) -> str:
        model_id = str(uuid.uuid4())
        metric = manifest.metric
        with self.engine.begin() as c:
            c.execute(insert(models).values(
                id=model_id, run_id=run_id, dataset=dataset, fingerprint=fingerprint, export_path=export_path,
                backbone=manifest.backbone.model, metric=metric, score=float(manifest.test_metrics[metric]),
                test_metrics=_jsonable(manifest.test_metrics), hyperparameters=_jsonable(manifest.hyperparameters),
                is_champion=False, created_at=now()))
        return model_id

    def decide(self, model_id: str, champion_score_on_new_split: float | None = None, retries: int = 30) -> tuple[str, str]:
        """Champion/challenger: promote `model_id` only if it beats the current champion on the same test split.

        champion_score_on_new_split: the champion re-scored on this model's test split, when the
        dataset changed (its fingerprint differs) since the champion was trained.
        """
        for attempt in range(retries):
            try:
                with self.engine.begin() as c:
                    new = c.execute(select(models).where(models.c.id == model_id)).one()
                    # One decision per dataset at a time (a row lock on PostgreSQL; SQLite has one writer anyway).
                    c.execute(select(datasets.c.name).where(datasets.c.name == new.dataset).with_for_update())
                    champ = c.execute(select(models).where(models.c.dataset == new.dataset,
                                                           models.c.is_champion.is_(True))
                                      .with_for_update()).first()
                    if champ is None:
                        decision, reason = "champion", "first model for this dataset"
                    else:
                        same_split = champ.fingerprint == new.fingerprint
                        base = champ.score if same_split else champion_score_on_new_split
                        if base is None:
                            decision, reason = "challenger", ("the champion was trained on different data and was not "
                                                              "re-scored on this test split")
                        else:
                            decision, reason = decide(new.score, base, metric=new.metric)
                            reason += f" (champion {champ.id[:8]}" + ("" if same_split else ", re-scored on the new "
                                                                     f"test split: {base:.4f}") + ")"
                    if decision == "champion":
                        if champ is not None:
                            c.execute(update(models).where(models.c.id == champ.id).values(is_champion=False))
                        c.execute(update(models).where(models.c.id == model_id).values(
                            is_champion=True, promoted_at=now(), reason=reason))
                    else:
                        c.execute(update(models).where(models.c.id == model_id).values(reason=reason))
                return decision, reason
            except (IntegrityError, OperationalError):
                # Another refresh promoted at the same moment: re-read the champion and decide again.
                if attempt == retries - 1:
                    raise
                time.sleep(0.05 * (1 + attempt % 5))
        raise RuntimeError("unreachable")

    # ------------------------------------------------------------------ reads
    def champion(self, dataset: str) -> dict | None:
        with self.engine.connect() as c:
            row = c.execute(select(models).where(models.c.dataset == dataset, models.c.is_champion.is_(True))).first()
        return dict(row._mapping) if row else None

    def best_configs(self, dataset: str, k: int = 3) -> list[dict]:
        """Hyperparameters of the dataset's best models so far: the warm start of the next search."""
        with self.engine.connect() as c:
            rows = c.execute(select(models.c.hyperparameters).where(models.c.dataset == dataset)
                             .order_by(models.c.score.desc()).limit(k)).all()
        return [dict(r.hyperparameters) for r in rows if r.hyperparameters]

    def finished_since(self, since: dt.datetime) -> set[str]:
        with self.engine.connect() as c:
            rows = c.execute(select(runs.c.dataset).where(runs.c.status == "finished", runs.c.finished_at >= since)).all()
        return {r.dataset for r in rows}

    def table(self, name: str) -> pd.DataFrame:
        tbl = md.tables[name]
        with self.engine.connect() as c:
            return pd.DataFrame([dict(r._mapping) for r in c.execute(select(tbl)).all()])

    def leaderboard(self, dataset: str | None = None) -> pd.DataFrame:
        q = select(models, runs.c.compute_s, runs.c.finished_at).join(runs, runs.c.id == models.c.run_id)
        if dataset:
            q = q.where(models.c.dataset == dataset)
        with self.engine.connect() as c:
            df = pd.DataFrame([dict(r._mapping) for r in c.execute(q).all()])
        if df.empty:
            return df
        df = df.sort_values(["dataset", "score"], ascending=[True, False])
        df["rank"] = df.groupby("dataset").cumcount() + 1
        return df.reset_index(drop=True)

    def champion_history(self, dataset: str) -> list[tuple[dt.datetime, float]]:
        """(promoted_at, score) of every model that was champion at some point, oldest first."""
        with self.engine.connect() as c:
            rows = c.execute(select(models.c.promoted_at, models.c.score).where(
                models.c.dataset == dataset, models.c.promoted_at.is_not(None)).order_by(models.c.promoted_at)).all()
        return [(_aware(r.promoted_at), float(r.score)) for r in rows]


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if hasattr(v, "item"):
        return v.item()
    if isinstance(v, float) and v != v:
        return None
    return json.loads(json.dumps(v, default=str))
