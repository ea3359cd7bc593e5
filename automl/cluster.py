"""Start an embedded local Ray, or connect to an existing cluster."""
from __future__ import annotations

import logging
import os


def worker_env() -> dict[str, str]:
    """Environment the trial workers need (offline hubs, quiet tokenizers)."""
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY", "TOKENIZERS_PARALLELISM", "AUTOML_ONLINE")
    return {k: os.environ[k] for k in keys if k in os.environ}


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None, verbose: bool = False) -> bool:
    """Make sure Ray is up. Returns True when this call started it.

    address: None -> RAY_ADDRESS if set, else a local embedded instance;
    "auto", "ray://host:10001" or "host:6379" connect to a cluster.
    """
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # Ray's own progress tables are replaced by ours (see progress.py).
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    kwargs = dict(log_to_driver=verbose, logging_level=logging.INFO if verbose else logging.ERROR)
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:
        # Inside a Ray Job the job's runtime env already carries these (automl submit sets them),
        # and Ray refuses a driver runtime env that repeats them.
        kwargs["runtime_env"] = {"env_vars": worker_env()}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
    else:
        # Local embedded Ray: no dashboard server, and nothing listens beyond localhost.
        ray.init(num_cpus=num_cpus, include_dashboard=False, dashboard_host="127.0.0.1", **kwargs)
    return True


def resources(cpus_per_trial: float | None = None, gpus_per_trial: float | None = None) -> dict:
    """Per-trial resources: 1 GPU per trial when GPUs exist, else 1 CPU (threads = CPUs)."""
    import ray

    total = ray.cluster_resources()
    n_gpu = float(total.get("GPU", 0))
    gpu = gpus_per_trial if gpus_per_trial is not None else (1.0 if n_gpu >= 1 else 0.0)
    cpu = cpus_per_trial if cpus_per_trial is not None else 1.0
    out = {"cpu": float(cpu)}
    if gpu:
        out["gpu"] = float(gpu)
    return out


def max_concurrency(res: dict) -> int:
    import ray

    total = ray.cluster_resources()
    by_cpu = int(total.get("CPU", 1) // max(res["cpu"], 1e-9))
    if res.get("gpu"):
        return max(1, min(by_cpu, int(total.get("GPU", 0) // res["gpu"])))
    return max(1, by_cpu)
