"""Batch submission: one Ray Job per dataset in a manifest, and commands to follow them.

Manifest (YAML):

    defaults:                       # optional, applied to every job
      time_budget: 600
      search_space: cpu_small
      output_root: /shared/automl   # job output = <output_root>/<name> unless `output` is given
    jobs:
      - name: digits
        data: /shared/data/digits.csv      # path or URI the cluster can read
        label: label
        max_trials: 20
        resources: {cpu: 1, gpu: 0}        # per trial
      - name: reviews
        data: s3://bucket/reviews.parquet
"""
from __future__ import annotations

import os
import re
import shlex
import time
import uuid
from pathlib import Path

import yaml

from automl.errors import AutoMLError
from automl.options import FinetuneOptions

# A job entry: its name and data, plus any option of automl.options.FinetuneOptions (or its YAML alias).
JOB_KEYS = {"name", "data"}
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def auth_token() -> str | None:
    """Ray's token, from the same places Ray looks: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    for path in (os.environ.get("RAY_AUTH_TOKEN_PATH"), str(Path.home() / ".ray" / "auth_token")):
        if path and os.path.exists(path):
            return Path(path).read_text().strip()
    return None


def client(address: str | None = None, token: str | None = None):
    """A JobSubmissionClient for `address`, sending Ray's auth token when there is one."""
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_JOBS_ADDRESS") or DEFAULT_ADDRESS
    token = token or auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as exc:  # the SDK raises ConnectionError / RuntimeError with the HTTP status inside
        msg = str(exc)
        if "401" in msg or "403" in msg or "nauthorized" in msg or "uthentication" in msg:
            raise AutoMLError(
                f"The Ray job server at {address} refused the request: it needs Ray's auth token "
                f"({'the token sent was rejected' if token else 'none was found'}). Fix: set RAY_AUTH_TOKEN, or "
                "RAY_AUTH_TOKEN_PATH, or copy the head's ~/.ray/auth_token (see `ray get-auth-token`).") from exc
        raise AutoMLError(f"Cannot reach the Ray job server at {address}: {msg[:300]}. Fix: check --address "
                          "(the dashboard URL, e.g. http://127.0.0.1:8265) and that the head is running.") from exc


def read_listing(path: str | Path, key: str, what: str) -> dict:
    """A YAML file with a non-empty `key:` list and optional `defaults:` (batch manifests, suites)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise AutoMLError(f"{what} {str(path)!r} does not exist.") from exc
    except yaml.YAMLError as exc:
        raise AutoMLError(f"{path}: invalid YAML: {exc}") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get(key), list) or not raw[key]:
        raise AutoMLError(f"{path}: expected a mapping with a non-empty '{key}:' list (and optional 'defaults:').")
    return raw


def load_manifest(path: str | Path) -> list[dict]:
    """Read and check a batch manifest; errors name the file, the job and the key."""
    path = Path(path)
    raw = read_listing(path, "jobs", "Batch manifest")
    defaults = dict(raw.get("defaults") or {})
    output_root = defaults.pop("output_root", None)
    jobs, names = [], set()
    for i, entry in enumerate(raw["jobs"]):
        if not isinstance(entry, dict):
            raise AutoMLError(f"{path}: job #{i + 1} must be a mapping, got {entry!r}.")
        job = {**defaults, **entry}
        if not job.get("data"):
            raise AutoMLError(f"{path}: job #{i + 1} has no 'data' (a path or URI of the dataset).")
        name = str(job.get("name") or Path(str(job["data"])).stem)
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise AutoMLError(f"{path}: job name {name!r} may only use letters, digits, '_', '.', '-'.")
        if name in names:
            raise AutoMLError(f"{path}: job name {name!r} appears twice; names must be unique.")
        names.add(name)
        options = {k: v for k, v in job.items() if k not in JOB_KEYS}
        if "output" not in options and "output_dir" not in options:
            options["output"] = str(Path(output_root or "automl_runs") / name)
        options.setdefault("progress", False)
        opts = FinetuneOptions.from_entry(options, f"{path}: job {name!r}")
        jobs.append({"name": name, "data": str(job["data"]), "options": opts,
                     "output": opts.output.output_dir})
    return jobs


def entrypoint(job: dict) -> str:
    """The job's command: the options travel as JSON, exactly as the manifest gave them."""
    return command(["python", "-m", "automl", "finetune", job["data"], "--options", job["options"].to_json()])


def command(args: list[str]) -> str:
    """A shell-safe job entrypoint."""
    return " ".join(shlex.quote(a) for a in args)


def runtime_env(ship_package: bool = True) -> dict:
    """What every job needs: the workers' environment and, unless the cluster has it, this package."""
    from automl.cluster import worker_env

    env: dict = {"env_vars": worker_env()}
    if ship_package:
        # Ship this automl package to the cluster; its dependencies come from the cluster's setup.
        env["py_modules"] = [str(Path(__file__).resolve().parents[1])]  # the automl package
    return env


def submit_batch(manifest: str | Path, address: str | None = None, token: str | None = None,
                 ship_package: bool = True) -> tuple[str, list[dict]]:
    """Submit one Ray Job per manifest entry. Returns (batch id, [{name, submission_id, output}])."""
    jobs = load_manifest(manifest)
    c = client(address, token)
    batch = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:4]
    env = runtime_env(ship_package)
    submitted = []
    for job in jobs:
        sid = f"automl-{batch}-{job['name']}"
        c.submit_job(entrypoint=entrypoint(job), submission_id=sid, runtime_env=env,
                     metadata={"automl_batch": batch, "name": job["name"], "output": str(job["output"])},
                     entrypoint_num_cpus=0)
        submitted.append({"name": job["name"], "submission_id": sid, "output": str(job["output"])})
    return batch, submitted


def _parse_logs(logs: str) -> dict:
    out = {}
    m = re.search(r"^export: (.+)$", logs, re.M)
    if m:
        out["export"] = m.group(1).strip()
    m = re.search(r"^test (\w+): ([0-9.eE+-]+)", logs, re.M)
    if m:
        out["metric"], out["score"] = m.group(1), float(m.group(2))
    err = [ln for ln in logs.splitlines() if ln.startswith("error:") or "Error:" in ln]
    if err:
        out["error"] = err[-1][:300]
    return out


def list_jobs(address: str | None = None, batch: str | None = None, token: str | None = None) -> list[dict]:
    """automl jobs on the cluster (newest first), with status, score and export path when done."""
    c = client(address, token)
    rows = []
    for info in c.list_jobs():
        meta = info.metadata or {}
        if "automl_batch" not in meta or (batch and meta["automl_batch"] != batch):
            continue
        row = {"batch": meta["automl_batch"], "name": meta.get("name"), "submission_id": info.submission_id,
               "status": str(info.status).split(".")[-1], "output": meta.get("output"),
               "start_time": info.start_time}
        if row["status"] in TERMINAL:
            row.update(_parse_logs(c.get_job_logs(info.submission_id)))
        rows.append(row)
    return sorted(rows, key=lambda r: r.get("start_time") or 0, reverse=True)


def wait(submission_ids: list[str], address: str | None = None, token: str | None = None,
         timeout_s: float = 3600, poll_s: float = 2.0) -> dict[str, str]:
    c = client(address, token)
    deadline = time.time() + timeout_s
    status: dict[str, str] = {}
    while time.time() < deadline:
        status = {sid: str(c.get_job_status(sid)).split(".")[-1] for sid in submission_ids}
        if all(s in TERMINAL for s in status.values()):
            break
        time.sleep(poll_s)
    return status


def summary_table(rows: list[dict]):
    from rich.table import Table

    t = Table(title="automl jobs")
    for col in ("name", "status", "score", "export / error", "submission id"):
        t.add_column(col)
    for r in rows:
        score = f"{r['metric']} {r['score']:.4f}" if "score" in r else ""
        t.add_row(str(r.get("name")), r["status"], score, r.get("export") or r.get("error") or "", r["submission_id"])
    return t
