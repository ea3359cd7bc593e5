"""Nightly leaderboard refresh: re-run the searches of a suite of datasets and keep a champion each.

suite.yaml:

    defaults: {time_budget: 1800, output_root: /shared/automl/nightly}
    datasets:
      - {name: digits, data: /shared/data/digits.csv, label: label}
      - {name: reviews, data: /shared/data/reviews.parquet, max_trials: 30}
"""
from __future__ import annotations

import base64
import datetime as dt
import html
import io
import time
import traceback
import uuid
from pathlib import Path

from automl.errors import AutoMLError, RunInterrupted
from automl.options import FinetuneOptions
from automl.ops.store import Store, now

def load_suite(path: str | Path) -> list[dict]:
    """The suite's datasets: {name, data, options}; options are any of FinetuneOptions (or their YAML aliases)."""
    from automl.ops.jobs import read_listing

    path = Path(path)
    raw = read_listing(path, "datasets", "Suite file")
    defaults = dict(raw.get("defaults") or {})
    root = defaults.pop("output_root", "automl_runs/nightly")
    out, names = [], set()
    for i, entry in enumerate(raw["datasets"]):
        d = {**defaults, **entry}
        name, data = d.pop("name", None), d.pop("data", None)
        if not name or not data:
            raise AutoMLError(f"{path}: dataset #{i + 1} needs 'name' and 'data'.")
        if name in names:
            raise AutoMLError(f"{path}: dataset name {name!r} appears twice.")
        names.add(name)
        if "output" not in d and "output_dir" not in d:
            d["output"] = str(Path(root) / name)
        out.append({"name": name, "data": data, "options": FinetuneOptions.from_entry(d, f"{path}: dataset {name!r}")})
    return out


def _code_version() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _rescore_champion(champion: dict, export_dir: Path) -> float | None:
    """The champion's score on the new model's stored test split (used when the data changed)."""
    from automl.export.writer import load_model
    from automl.diagnostics.update import load_test_split, score

    split = load_test_split(export_dir)
    if split is None or not Path(champion["export_path"]).exists():
        return None
    model, encoder, manifest = load_model(champion["export_path"])
    x, labels = split
    return score(model, encoder, manifest.classes, x, labels, champion["metric"], manifest.modality,
                 manifest.target_scale)


def refresh(suite: str | Path, store: Store, *, address: str | None = None, force: bool = False,
            since_hours: float = 20.0, progress: bool = True, only: list[str] | None = None,
            stale_after_s: float | None = None) -> list[dict]:
    """Run every dataset of the suite that has no finished run in the last `since_hours` (all with force)."""
    from automl.api import auto_finetune

    entries = load_suite(suite)
    if only:
        entries = [e for e in entries if e["name"] in only]
    # Each refresh's own output folder: two refreshes started in the same second (cron on two machines) wrote one
    # folder, the later export replacing the earlier while both rows pointed to it.
    refresh_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    # A refresh killed midway leaves 'running' rows: close them so the store tells the truth.
    if stale_after_s is None:  # a run is stale long after its own time budget would have ended it
        stale_after_s = max(3600.0, 3 * max(float(e["options"].search.time_budget_s or 600) for e in entries))
    store.mark_interrupted(dt.timedelta(seconds=stale_after_s))
    done = set() if force else store.finished_since(now() - dt.timedelta(hours=since_hours))
    results = []
    for e in entries:
        if e["name"] in done:
            results.append({"dataset": e["name"], "status": "skipped", "reason": "finished recently"})
            continue
        o = e["options"]
        run_id = store.start_run(e["name"], refresh_id=refresh_id, time_budget_s=o.search.time_budget_s,
                                 search_space=o.search.search_overrides or o.search.search_space,
                                 code_version=_code_version())
        t0 = time.monotonic()
        try:
            opts = o.replace(output_dir=str(Path(o.output.output_dir) / refresh_id), progress=progress,
                             ray_address=address or o.resources.ray_address,
                             start_points=store.best_configs(e["name"]) + list(o.search.start_points or []))
            model = auto_finetune(e["data"], options=opts)
            m = model.manifest
            store.ensure_dataset(e["name"], m.provenance.fingerprint)
            store.add_trials(run_id, model.trials, m.metric)
            model_id = store.add_model(run_id, e["name"], m.provenance.fingerprint, str(model.export_dir), m)
            champ = store.champion(e["name"])
            rescored = None
            if champ is not None and champ["fingerprint"] != m.provenance.fingerprint:
                rescored = _rescore_champion(champ, Path(model.export_dir))
            decision, reason = store.decide(model_id, rescored)
            store.finish_run(run_id, "finished", compute_s=time.monotonic() - t0,
                             trial_epochs=m.search["trial_epochs"])
            results.append({"dataset": e["name"], "status": decision, "reason": reason,
                            "score": model.metrics[m.metric], "export": str(model.export_dir)})
        except KeyboardInterrupt:
            # Ctrl-C: the run is marked now (not left "running" until a later refresh finds it stale), and the
            # advice is the refresh's own: a run's resume=True does not apply to a refresh.
            store.finish_run(run_id, "interrupted", compute_s=time.monotonic() - t0)
            raise RunInterrupted(f"Stopped by Ctrl-C while refreshing {e['name']!r}: its run is marked interrupted. "
                                 "Fix: refresh again; it runs every dataset not refreshed since, this one "
                                 "included.") from None
        except Exception as exc:  # one bad dataset must not stop the night's refresh
            store.finish_run(run_id, "failed", compute_s=time.monotonic() - t0,
                             error=f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-2000:]}")
            results.append({"dataset": e["name"], "status": "failed", "reason": f"{type(exc).__name__}: {exc}"})
    return results


def submit_refresh(suite: str | Path, db_url: str, address: str, *, force: bool = False, wait: bool = True,
                   only: list[str] | None = None, timeout_s: float = 24 * 3600) -> list[dict]:
    """Refresh on a cluster: one Ray Job per dataset, each writing to the shared database `db_url`.

    The suite file, the data and the database must be reachable from the cluster (shared
    filesystem, URIs, or a database server).
    """
    from automl.ops import jobs

    if db_url == "sqlite://" or (db_url.startswith("sqlite") and ":memory:" in db_url):
        raise AutoMLError("A refresh on a cluster needs a database the jobs can reach: a SQLite file on a shared "
                          "filesystem or a database server URL, not an in-memory SQLite.")
    if db_url.startswith("sqlite"):
        import warnings

        from sqlalchemy.engine import make_url

        from automl.ops.store import sqlite_journal_mode

        path = make_url(db_url).database or ""
        local_address = any(h in address for h in ("//127.0.0.1", "//localhost", "//[::1]"))
        if sqlite_journal_mode(path) == "wal" and not local_address:  # "wal": not on a shared filesystem
            warnings.warn(f"The leaderboard database {path} is on this machine's own disk: jobs that run on other "
                          "machines of the cluster cannot reach it. Pass --db a SQLite file on a filesystem the "
                          "cluster shares, or a database server URL.")
    entries = [e for e in load_suite(suite) if not only or e["name"] in only]
    c = jobs.client(address)
    batch = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"  # job ids: two submissions in one second
    submitted = []
    for e in entries:
        entrypoint, env = refresh_job(suite, db_url, e["name"], force=force)
        sid = f"automl-refresh-{batch}-{e['name']}"
        c.submit_job(entrypoint=entrypoint, submission_id=sid, runtime_env=env, entrypoint_num_cpus=0,
                     metadata={"automl_batch": f"refresh-{batch}", "name": e["name"],
                               "output": e["options"].output.output_dir})
        submitted.append({"dataset": e["name"], "submission_id": sid})
    if wait:
        status = jobs.wait([s["submission_id"] for s in submitted], address, timeout_s=timeout_s)
        for s_ in submitted:
            s_["status"] = status.get(s_["submission_id"], "UNKNOWN")
    return submitted


def refresh_job(suite: str | Path, db_url: str, name: str, *, force: bool = False,
                ship_package: bool = True) -> tuple[str, dict]:
    """(entrypoint, runtime_env) of the Ray Job that refreshes one dataset of the suite.

    The database URL, which may hold a password, is not in the entrypoint (a command line: shown by `ps` on the
    node, in `ray job list` and on the dashboard) but in the job's environment (AUTOML_LEADERBOARD_DB, read by
    `automl leaderboard`). Ray still shows a job's runtime_env to whoever can reach the dashboard or the job API:
    on a cluster others use, prefer a URL without a password and give the password on the cluster (e.g.
    PostgreSQL's ~/.pgpass or PGPASSWORD in the nodes' environment). A SQLite file shared by the jobs keeps the
    rollback journal (AUTOML_SQLITE_JOURNAL=delete): SQLite's WAL mode does not work on a network filesystem."""
    from automl.ops import jobs

    args = ["python", "-m", "automl", "leaderboard", "refresh", str(Path(suite).resolve()),
            "--only", name, "--quiet"] + (["--force"] if force else [])
    env = jobs.runtime_env(ship_package)
    env_vars = {**env.get("env_vars", {}), "AUTOML_LEADERBOARD_DB": db_url}
    if db_url.startswith("sqlite"):
        env_vars["AUTOML_SQLITE_JOURNAL"] = "delete"
    env["env_vars"] = env_vars
    return jobs.command(args), env


KEY_HPS = ("unfreeze", "lr", "schedule", "augment", "text_augment")


def _hps(h: dict) -> str:
    parts = []
    for k in KEY_HPS:
        if k in (h or {}) and not (k.endswith("augment") and h[k] == "none"):
            v = h[k]
            parts.append(f"{k}={v:.2g}" if isinstance(v, float) else f"{k}={v}")
    return ", ".join(parts)


def show(store: Store, dataset: str | None = None):
    from rich.table import Table

    df = store.leaderboard(dataset)
    t = Table(title="automl leaderboard" + (f": {dataset}" if dataset else ""))
    for col in ("dataset", "rank", "backbone", "key hyperparameters", "test score", "compute", "date", "champion"):
        t.add_column(col)
    for _, r in df.iterrows():
        t.add_row(r["dataset"], str(r["rank"]), str(r["backbone"]).split("/")[-1][:40], _hps(r["hyperparameters"]),
                  f"{r['metric']} {r['score']:.4f}", f"{(r['compute_s'] or 0):.0f} s",
                  str(r["created_at"])[:16], "★" if r["is_champion"] else "")
    return t


def _history_png(store: Store, dataset: str) -> str | None:
    hist = store.champion_history(dataset)
    if not hist:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 2.6), dpi=100)
    ax.step([h[0] for h in hist] + [now()], [h[1] for h in hist] + [hist[-1][1]], where="post", color="tab:blue")
    ax.plot([h[0] for h in hist], [h[1] for h in hist], "o", color="tab:blue")
    ax.set_ylabel("champion's test score")
    ax.grid(alpha=0.3)
    fig.autofmt_xdate()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def write_html(store: Store, out_dir: str | Path) -> Path:
    """A static page (no server): per-dataset tables, the champion's history, links to model cards."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df = store.leaderboard()
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>automl leaderboard</title><style>",
             "body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:.5em 0 1.5em}"
             "th,td{border:1px solid #ccc;padding:4px 10px;text-align:left}th{background:#f2f2f2}"
             "tr.champion{background:#fff6d6;font-weight:600}h2{margin-top:1.5em}",
             "</style></head><body><h1>automl leaderboard</h1>",
             f"<p>Updated {now():%Y-%m-%d %H:%M} UTC · {df['dataset'].nunique() if len(df) else 0} datasets · "
             f"{len(df)} models</p>"]
    for name, g in (df.groupby("dataset") if len(df) else []):
        parts.append(f"<h2 id='{html.escape(name)}'>{html.escape(name)}</h2>")
        png = _history_png(store, name)
        if png:
            parts.append(f"<img alt='champion score over time for {html.escape(name)}' src='data:image/png;base64,{png}'>")
        parts.append("<table class='leaderboard' data-dataset='" + html.escape(name) + "'><tr><th>rank</th><th>backbone</th>"
                     "<th>key hyperparameters</th><th>test score</th><th>compute</th><th>date</th><th>champion</th>"
                     "<th>model card</th></tr>")
        for _, r in g.iterrows():
            card = Path(str(r["export_path"])) / "MODEL_CARD.html"
            link = f"<a href='{card.resolve().as_uri()}'>card</a>" if card.exists() else ""
            parts.append(f"<tr class='{'champion' if r['is_champion'] else 'challenger'}'><td>{r['rank']}</td>"
                         f"<td>{html.escape(str(r['backbone']).split('/')[-1])}</td><td>{html.escape(_hps(r['hyperparameters']))}</td>"
                         f"<td>{html.escape(str(r['metric']))} {r['score']:.4f}</td><td>{(r['compute_s'] or 0):.0f} s</td>"
                         f"<td>{str(r['created_at'])[:16]}</td><td>{'★ champion' if r['is_champion'] else ''}</td>"
                         f"<td>{link}</td></tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    page = out / "index.html"
    page.write_text("\n".join(parts))
    return page
