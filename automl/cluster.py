"""Start an embedded local Ray, or connect to an existing cluster."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path


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
    """What the Ray cluster can offer: totals and the largest single node (no request may exceed one node).

    On an autoscaling cluster the current nodes say little (the shipped cluster.yaml starts with a CPU-less head
    and no workers), so capacity comes from the autoscaler's node types (`from_config`) when known.
    """

    cpus: float
    gpus: float
    node_cpus: float          # CPUs of the largest node
    node_gpus: float
    nodes: int = 1            # nodes that exist now
    max_nodes: int = 1        # nodes the cluster may grow to
    source: str = "the running cluster"

    @classmethod
    def current(cls) -> "ClusterInfo":
        import ray

        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        total = ray.cluster_resources()
        return cls(float(total.get("CPU", 1)), float(total.get("GPU", 0)),
                   max((float(r.get("CPU", 0)) for r in nodes), default=1.0),
                   max((float(r.get("GPU", 0)) for r in nodes), default=0.0), len(nodes), len(nodes))

    @classmethod
    def from_config(cls, path: str | Path) -> "ClusterInfo":
        """Capacity from an autoscaler config (cluster.yaml): each node type's resources and max_workers, within
        the global max_workers. Node types must state their resources ({CPU: 16, GPU: 1})."""
        import yaml

        from automl.errors import AutoMLError

        cfg = yaml.safe_load(Path(path).expanduser().read_text())
        types, head = cfg.get("available_node_types") or {}, cfg.get("head_node_type")
        missing = [n for n, nt in types.items() if n != head and "CPU" not in (nt.get("resources") or {})]
        if missing:
            raise AutoMLError(f"{path}: node types {missing} do not state their resources, so automl cannot plan for "
                              "them. Fix: add e.g. `resources: {CPU: 16, GPU: 1}` to each worker type.")
        head_res = (types.get(head) or {}).get("resources") or {}
        budget, cpus, gpus, n = int(cfg.get("max_workers", 0)), float(head_res.get("CPU", 0)), \
            float(head_res.get("GPU", 0)), 1
        workers = sorted(((nt.get("resources"), int(nt.get("max_workers", 0))) for name, nt in types.items()
                          if name != head), key=lambda w: -float(w[0].get("CPU", 0)))
        for res, count in workers:
            take = min(count, budget)
            cpus, gpus, n, budget = cpus + take * float(res["CPU"]), gpus + take * float(res.get("GPU", 0)), \
                n + take, budget - take
        return cls(cpus, gpus, max([float(head_res.get("CPU", 0))] + [float(r["CPU"]) for r, _ in workers]),
                   max([float(head_res.get("GPU", 0))] + [float(r.get("GPU", 0)) for r, _ in workers]),
                   1, n, f"the autoscaler config {path}")

    def trial_resources(self, cpus: float | None = None, gpus: float | None = None) -> dict:
        """Per trial: 1 GPU when GPUs exist, else 1 CPU (threads = CPUs); never more than one node has."""
        from automl.errors import AutoMLError

        gpu = gpus if gpus is not None else (1.0 if self.gpus >= 1 else 0.0)
        out = {"cpu": float(cpus if cpus is not None else 1.0)}
        if out["cpu"] > self.node_cpus or (gpu and gpu > max(self.node_gpus, 1.0 if self.node_gpus else 0.0)):
            raise AutoMLError(f"A trial asks for {out['cpu']:g} CPU(s) and {gpu:g} GPU(s), but the largest node of "
                              f"{self.source} has {self.node_cpus:g} CPU(s) and {self.node_gpus:g} GPU(s): it "
                              f"would never start. Fix: cpus_per_trial <= {self.node_cpus:g}.")
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

    def request(self, res: dict, concurrency: int) -> None:
        """Ask the autoscaler for the nodes `concurrency` trials need (a no-op without an autoscaler)."""
        if self.max_nodes <= self.nodes:
            return
        from ray.autoscaler.sdk import request_resources

        global _REQUESTED
        bundle = {"CPU": res["cpu"], **({"GPU": res["gpu"]} if res.get("gpu") else {})}
        request_resources(bundles=[bundle] * concurrency)
        _REQUESTED = True


_REQUESTED = False


def release() -> None:
    """Withdraw the autoscaler request once the compute is done, so idle worker nodes can scale down (a request
    stays in force until replaced)."""
    global _REQUESTED
    if _REQUESTED:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[])
        _REQUESTED = False


def connect(address: str | None = None, *, cluster_config: str | None = None, verbose: bool = False) -> ClusterInfo:
    """Start or join Ray, and describe what the cluster can offer (from its autoscaler config when there is one:
    the one given, or the one Ray's head keeps at ~/ray_bootstrap_config.yaml)."""
    ensure_ray(address, verbose=verbose)
    now = ClusterInfo.current()
    # On a cluster (an address given, or RAY_ADDRESS as inside a Ray Job) the head's autoscaler config says what
    # the cluster can grow to; the instantaneous snapshot of an autoscaling cluster may be nothing at all.
    joined = address or os.environ.get("RAY_ADDRESS")
    config = cluster_config or (os.path.expanduser(BOOTSTRAP_CONFIG) if joined and
                                os.path.exists(os.path.expanduser(BOOTSTRAP_CONFIG)) else None)
    if config is None:
        return now
    planned = ClusterInfo.from_config(config)
    planned.nodes = now.nodes
    return planned


BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"


def check_shared_storage(info: ClusterInfo, storage: str | None, shared: Path) -> None:
    """On a multi-node cluster, trials on every node read the run's inputs and write their results under
    `shared`: refuse, before any compute, a path the other nodes cannot see."""
    from automl.errors import AutoMLError

    if info.max_nodes <= 1:
        return
    if storage is None or "://" in str(storage):
        raise AutoMLError(
            f"This Ray cluster has (or may grow to) {info.max_nodes} nodes, so trials run on other machines and must "
            f"read the run's inputs and feature cache from a filesystem every node mounts; storage_path is "
            f"{storage!r}. Fix: pass storage_path='/shared/automl' (an NFS/EFS/Lustre path mounted on every node).")
    import ray

    marker = shared / f".automl-shared-{os.getpid()}"
    shared.mkdir(parents=True, exist_ok=True)
    marker.write_text("ok")
    try:
        me = ray.get_runtime_context().get_node_id()
        others = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and n["NodeID"] != me]
        if not others:
            return
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        seen = ray.get([ray.remote(num_cpus=0)(os.path.exists).options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(str(marker)) for n in others])
        blind = [n[:8] for n, ok in zip(others, seen) if not ok]
        if blind:
            raise AutoMLError(f"storage_path {str(storage)!r} is not visible from node(s) {blind}: trials there could "
                              "not read the run's inputs. Fix: use a path every node mounts (NFS/EFS/Lustre).")
    finally:
        marker.unlink(missing_ok=True)
