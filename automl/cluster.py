"""Start an embedded local Ray, or connect to an existing cluster."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass


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


@dataclass
class ClusterInfo:
    """What the Ray cluster offers: totals and the largest single node (no request may exceed one node)."""

    cpus: float
    gpus: float
    node_cpus: float          # CPUs of the largest node
    node_gpus: float

    @classmethod
    def current(cls) -> "ClusterInfo":
        import ray

        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        total = ray.cluster_resources()
        return cls(float(total.get("CPU", 1)), float(total.get("GPU", 0)),
                   max((float(r.get("CPU", 0)) for r in nodes), default=1.0),
                   max((float(r.get("GPU", 0)) for r in nodes), default=0.0))

    def trial_resources(self, cpus: float | None = None, gpus: float | None = None) -> dict:
        """Per trial: 1 GPU when GPUs exist, else 1 CPU (threads = CPUs)."""
        gpu = gpus if gpus is not None else (1.0 if self.gpus >= 1 else 0.0)
        out = {"cpu": float(cpus if cpus is not None else 1.0)}
        if gpu:
            out["gpu"] = float(gpu)
        return out

    def max_concurrency(self, res: dict) -> int:
        by_cpu = int(self.cpus // max(res["cpu"], 1e-9))
        if res.get("gpu"):
            return max(1, min(by_cpu, int(self.gpus // res["gpu"])))
        return max(1, by_cpu)

    def retrain_cpus(self, res: dict, workers: int) -> int:
        """After the search the retrain runs alone: each worker gets its share of one node's CPUs."""
        if res.get("gpu"):
            return max(1, int(res["cpu"]))
        return max(1, int(res["cpu"]), int(self.node_cpus // max(1, workers)))


def connect(address: str | None = None, *, verbose: bool = False) -> ClusterInfo:
    """Start or join Ray, and describe the cluster."""
    ensure_ray(address, verbose=verbose)
    return ClusterInfo.current()
