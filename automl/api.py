"""auto_finetune: data -> search -> retrain -> test -> export, in one call."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import data as data_mod
from .errors import AutoMLError
from .images import stack_resized
from .metrics import choose_metric
from .predictor import FinetunedModel
from .space import SearchSpace, load_space
from .train import TrialData

SEARCH_FRACTION = 0.8  # share of time_budget_s given to the search; retrain + export use the rest
RETRAIN_STARTUP_S = 15.0  # Ray Train's fixed start-up cost on CPU (workers import torch, set up gloo)


def _plain(v):
    return v.item() if isinstance(v, np.generic) else v


def _storage_size(space: SearchSpace) -> int:
    spec = space.parameters.get("image_size", {"type": "fixed", "value": 32})
    values = spec.get("values") or [spec.get("value") or spec.get("high") or 32]
    return int(max(values))


def _default_space(modality: str) -> str:
    import ray

    has_gpu = ray.cluster_resources().get("GPU", 0) > 0
    return f"{modality}_classification" if has_gpu else "cpu_small"


def _experiment_name(out: Path, resume: bool) -> str:
    marker = out / "LATEST_SEARCH"
    if resume and marker.exists():
        return marker.read_text().strip()
    name = "search_" + time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(name)
    return name


def auto_finetune(dataset: Any, label: str | None = None, *, inputs: list[str] | None = None,
                  time_budget_s: float | None = 600, max_trials: int | None = None,
                  search_space: str | dict | SearchSpace | None = None, metric: str = "auto",
                  output_dir: str | Path | None = None, seed: int = 0, ray_address: str | None = None,
                  resources_per_trial: dict | None = None, retrain_workers: int = 1, resume: bool = False,
                  progress: bool = True, verbose: bool = False, drop_bad_images: bool = True,
                  drop_rare_classes: bool = False, export_formats: bool = True) -> FinetunedModel:
    """Fine-tune the best model for `dataset` within `time_budget_s` seconds and export it.

    dataset: DataFrame, CSV/TSV/Parquet/JSONL path, image folder, (X, y), or HF Dataset.
    label: label column (found automatically when named label/target/class/y).
    time_budget_s: wall time for search + retrain (the search gets 80% of it).
    max_trials: stop after this many trials (whichever of budget/trials comes first).
    search_space: name in search_spaces/ ('cpu_small', 'image_classification', …), a YAML path,
        or a dict of overrides ({"lr": {"low": 1e-5, "high": 1e-3}, "backbone": "timm/resnet18"}).
    metric: 'accuracy', 'f1_macro', 'balanced_accuracy', or 'auto' (macro-F1 for imbalanced data).
    output_dir: where the run and the export go (default ./automl_runs/<dataset fingerprint>).
    ray_address: connect to a cluster ('auto', 'ray://host:10001'); default RAY_ADDRESS or a local Ray.
    resources_per_trial: e.g. {"cpu": 2, "gpu": 0.5}; default 1 CPU (or 1 GPU when present).
    retrain_workers: Ray Train workers (DDP) for the final retrain.
    resume: continue an interrupted search in output_dir.
    """
    from . import cluster
    from .runtime import quiet_libraries

    t_start = time.monotonic()
    quiet_libraries()
    if metric not in ("auto", "accuracy", "f1_macro", "balanced_accuracy"):
        raise AutoMLError(f"metric={metric!r} is not supported; expected 'auto', 'accuracy', 'f1_macro' or "
                          "'balanced_accuracy'.")
    # All input checks happen before Ray starts: bad data costs no compute.
    task = data_mod.prepare(dataset, label, inputs=inputs, seed=seed, drop_bad_images=drop_bad_images,
                            drop_rare_classes=drop_rare_classes)
    if search_space is not None and not isinstance(search_space, (dict, SearchSpace)):
        load_space(search_space, task.modality)  # validate early
    metric = choose_metric(task.report.imbalance_ratio) if metric == "auto" else metric
    fingerprint = task.fingerprint()
    out = Path(output_dir or Path("automl_runs") / f"{task.modality}-{fingerprint[:10]}").resolve()

    cluster.ensure_ray(ray_address, verbose=verbose)
    if search_space is None or (isinstance(search_space, dict) and "parameters" not in search_space):
        space = load_space(_default_space(task.modality), task.modality,
                           search_space if isinstance(search_space, dict) else None)
    else:
        space = load_space(search_space, task.modality)
    space = space.with_overrides({"seed": seed}) if "seed" not in space.parameters else space

    tr, va, te = (task.splits[k] for k in ("train", "validation", "test"))
    if task.modality == "image":
        storage = _storage_size(space)
        X = stack_resized(task.images, storage)
        pick = lambda idx: X[idx]  # noqa: E731
    else:
        storage = None
        pick = lambda idx: [task.texts[i] for i in idx]  # noqa: E731
    weights = data_mod.class_weights(task.y[tr], task.num_classes)
    search_data = TrialData(task.modality, task.num_classes, pick(tr), task.y[tr], pick(va), task.y[va], weights)

    res = cluster.resources(**{f"{k}s_per_trial": v for k, v in (resources_per_trial or {}).items()
                               if k in ("cpu", "gpu")})
    concurrency = cluster.max_concurrency(res)
    search_budget = None if time_budget_s is None else max(10.0, SEARCH_FRACTION * time_budget_s - RETRAIN_STARTUP_S
                                                     - (time.monotonic() - t_start))
    from .search import run_search

    name = _experiment_name(out, resume)
    result = run_search(search_data, space, metric=metric, storage_path=str(out / "ray_results"), name=name,
                        time_budget_s=search_budget, max_trials=max_trials, seed=seed, resources=res,
                        concurrency=concurrency, resume=resume, progress=progress)

    # Retrain the winner on train+validation, stopping its planned schedule at its best epoch.
    from .retrain import retrain
    from .train import build_encoder, evaluate, full_config

    full_idx = np.concatenate([tr, va])
    retrain_data = TrialData(task.modality, task.num_classes, pick(full_idx), task.y[full_idx], None, None,
                             data_mod.class_weights(task.y[full_idx], task.num_classes))
    best_cfg = full_config(result.best_config)
    use_gpu = bool(res.get("gpu"))
    t_retrain = time.monotonic()
    model, spec = retrain(best_cfg, retrain_data, epochs=result.best_epoch, schedule_epochs=space.max_epochs,
                          storage_path=str(out / "ray_results"), num_workers=retrain_workers, use_gpu=use_gpu,
                          cpus_per_worker=max(1, int(res["cpu"])))
    retrain_s = time.monotonic() - t_retrain
    encoder = build_encoder(best_cfg, model, spec)
    from .train import encode_inputs
    from .runtime import device as default_device

    test_metrics = evaluate(model, encoder, encode_inputs(encoder, pick(te)), task.y[te], task.num_classes,
                            default_device() if not use_gpu else default_device(), detailed=True)
    model.cpu()

    preprocessing = encoder.to_dict()
    if storage is not None:
        preprocessing["storage_size"] = storage
    trials = result.trials
    meta = {
        "task": task.task, "modality": task.modality, "classes": [_plain(c) for c in task.classes],
        "num_classes": task.num_classes, "label_column": task.label_column, "input_columns": task.input_columns,
        "backbone": spec.to_dict(), "preprocessing": preprocessing, "metric": metric,
        "hyperparameters": {k: _plain(v) for k, v in best_cfg.items()},
        "search": {"best_score": result.best_score, "best_epoch": result.best_epoch, "n_trials": int(len(trials)),
                   "stopped_early": int((trials["status"] == "STOPPED_EARLY").sum()),
                   "errors": int((trials["status"] == "ERROR").sum()), "space": space.to_dict(),
                   "experiment_path": result.experiment_path,
                   "trial_epochs": int(trials["epochs_run"].sum())},
        "retrain": {"epochs": result.best_epoch, "schedule_epochs": space.max_epochs, "workers": retrain_workers,
                    "time_s": retrain_s, "rows": int(len(full_idx))},
        "test_metrics": test_metrics, "data_report": task.report.to_dict(), "fingerprint": fingerprint, "seed": seed,
        "wall_time_s": time.monotonic() - t_start,
    }
    from .card import model_card
    from .export import write_export

    export_dir = out / "model"
    tokenizer = getattr(encoder, "tokenizer", None)
    write_export(export_dir, model, meta, tokenizer=tokenizer, formats=export_formats,
                 tables={"trials.csv": trials, "metrics.json": test_metrics, "data_report.json": task.report.to_dict()},
                 extra_files={"MODEL_CARD.md": model_card(meta, trials)})
    meta = json.loads((export_dir / "config.json").read_text())
    return FinetunedModel(model, encoder, meta, export_dir=export_dir, trials=trials, search=result)
