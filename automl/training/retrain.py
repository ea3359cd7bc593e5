"""Retrain the winning config on train+validation with Ray Train (DDP across workers)."""
from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

from automl.runtime import quiet_libraries, set_threads, sigint_kept
from automl.data.trial_data import TrialData
from automl.training.loop import fit

WEIGHTS = "model.safetensors"


def _train_loop(cfg: dict) -> None:
    """Runs on every Ray Train worker: the same plain `fit`, wrapped in DDP when world size > 1."""
    import ray
    import ray.train
    from ray.train.torch import get_device, prepare_model
    from safetensors.torch import save_model

    from automl.plugins import install

    quiet_libraries()
    _quiet_train_worker()
    set_threads(cfg["threads"])
    install(cfg.get("plugins"))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    data: TrialData = ray.get(cfg["data_ref"])
    initial = ray.get(cfg["initial_ref"]) if cfg.get("initial_ref") is not None else None
    epochs = cfg["epochs"]
    holder = {}

    def report(metrics, state_fn):
        if metrics["epoch"] == epochs and world > 1:
            # Where each rank ran, and a checksum of its weights (DDP keeps them identical): collectives, so
            # every rank takes part.
            import torch.distributed as dist

            mine = (ray.get_runtime_context().get_node_id(),
                    float(sum(p.detach().double().sum() for p in holder["model"].parameters())))
            gathered = [None] * world
            dist.all_gather_object(gathered, mine)
            metrics = {**metrics, "nodes": [g[0] for g in gathered], "weight_sums": [g[1] for g in gathered]}
        if rank == 0 and metrics["epoch"] == epochs:
            with tempfile.TemporaryDirectory() as d:
                save_model(holder["model"], os.path.join(d, WEIGHTS))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            # Every worker must report each epoch; only rank 0 attaches the checkpoint.
            ray.train.report(metrics)

    def wrap(model):
        holder["model"] = model
        return prepare_model(model, move_to_device=False) if world > 1 else model

    fit(cfg["config"], data, epochs=epochs, schedule_epochs=cfg["schedule_epochs"], report=report,
        wrap_model=wrap, rank=rank, world_size=world, device=get_device(), initial_state=initial,
        deadline=cfg.get("deadline"))


def _quiet_train_worker() -> None:
    """Ray Train's worker logs every report at INFO ("Reporting training result 1: TrainingReport(...)") under a
    logger named after its file's path, outside "ray.train", where quiet_libraries and Ray Train's own
    LoggingConfig do not reach it: where the user started Ray with worker logs on, each retrain printed it."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray Train: its logs are what they are
        return
    logging.getLogger(context.__file__).setLevel(logging.ERROR)


def retrain(config: dict, data: TrialData, *, epochs: int, schedule_epochs: int, storage_path: str,
            num_workers: int = 1, use_gpu: bool = False, cpus_per_worker: int = 1,
            initial_state: dict | None = None, deadline: float | None = None):
    """Train `config` on all of `data` with TorchTrainer (each worker asks for at most one node's CPUs; DDP ranks
    get equal shards and batch_size / workers rows per step). Returns (model on CPU, spec, rank 0's last metrics:
    with several workers, `nodes` and `weight_sums` per rank). deadline: a time.time() the training paces its
    schedule to end by (loop.Pace), so a retrain slower than planned still leaves later stages their time."""
    import ray
    from ray.train import LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from safetensors.torch import load_model

    from automl import plugins
    from automl.training.loop import build_model, full_config

    # Ray Train's controller polls its workers every 2 s by default, so a finished run idled ~2-4 s
    # before returning; polling 4x as often costs nothing measurable here.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"config": config, "data_ref": ray.put(data), "epochs": int(epochs),
                           "schedule_epochs": int(schedule_epochs), "threads": int(cpus_per_worker),
                           "initial_ref": ray.put(initial_state) if initial_state else None,
                           "plugins": plugins.snapshot(), "deadline": deadline},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}),
        # A reused run name silently resumes the old run: always use a fresh one. Ray Train's controller logs the
        # worker group's start at INFO, printed wherever the user's own ray.init streams worker logs.
        run_config=RunConfig(name=f"retrain_{uuid.uuid4().hex[:8]}",
                             storage_path=storage_path if "://" in storage_path else str(Path(storage_path).resolve()),
                             logging_config=LoggingConfig(log_level="ERROR")),
    )
    result = _fit_stopping_on_ctrl_c(trainer)
    if result.error is not None:
        raise RuntimeError(f"Retraining the winning config failed: {result.error}") from result.error
    if result.checkpoint is None:
        raise RuntimeError("Retraining finished without a checkpoint from rank 0.")
    model, spec = build_model(full_config(config), data.num_classes, pretrained=False)
    with result.checkpoint.as_directory() as d:
        load_model(model, os.path.join(d, WEIGHTS))
    model.eval()
    return model, spec, dict(result.metrics or {})


def _fit_stopping_on_ctrl_c(trainer):
    """trainer.fit(), where a Ctrl-C aborts the run as Ray Train's own handler does and then raises RunInterrupted.
    Ray Train's handler exited the process once the aborted controller was gone (sys.exit: no message, code 1, a
    notebook's kernel too), and stayed installed after fit, so a Ctrl-C while evaluating or exporting did the same."""
    import signal
    import threading

    from automl.errors import RunInterrupted

    stopped = threading.Event()

    def register(controller) -> None:
        def on_ctrl_c(signum, frame):
            if stopped.is_set():
                raise KeyboardInterrupt  # a second Ctrl-C: stop waiting for the abort
            stopped.set()
            controller.abort.remote()

        signal.signal(signal.SIGINT, on_ctrl_c)

    # Ray Train installs its handler through this hook, in the main thread only; an instance attribute replaces it
    # (a Ray without the hook keeps its own, and the handler before fit is still given back).
    trainer._register_sigint_handler = register
    try:
        with sigint_kept():  # whichever handler fit installed goes with it
            result = trainer.fit()
    except Exception:
        if not stopped.is_set():
            raise
    if stopped.is_set():  # fit returned, or raised, after the abort
        raise RunInterrupted("Stopped by Ctrl-C during the retrain on train+validation; nothing was exported. Fix: "
                             "run the same call again with resume=True (CLI: --resume): the finished search is kept "
                             "and the retrain runs again.") from None
    return result

