"""auto_finetune: data -> search -> retrain -> test -> export, in one call."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from automl.models import registry as backbones
from automl.data import intake as data_mod
from automl.errors import AutoMLError
from automl.data.images import stack_resized
from automl.metrics import CLASSIFICATION_METRICS, choose_metric
from automl.export.predictor import FinetunedModel
from automl.search.space import SearchSpace, for_data_size, load_space
from automl.training.loop import TrialData

SEARCH_FRACTION = 0.75  # share of time_budget_s given to the search; retrain + export use the rest
RETRAIN_STARTUP_S = 15.0  # Ray Train's fixed start-up cost on CPU (workers import torch, set up gloo)


def _storage_size(space: SearchSpace) -> int:
    spec = space.parameters.get("image_size", {"type": "fixed", "value": 32})
    values = spec.get("values") or [spec.get("value") or spec.get("high") or 32]
    return int(max(values))


def _default_space(modality: str, task: str) -> str:
    import ray

    if task == "regression":
        return "regression"
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
                  drop_rare_classes: bool = False, export_formats: bool = True,
                  task: str | None = None, find_label_errors: bool | str = "auto",
                  base_model: str | Path | None = None, promote_tolerance: float = 0.01,
                  cv_folds: int | None = None, storage_path: str | None = None,
                  prerank: bool | str = "auto", start_points: list[dict] | None = None) -> FinetunedModel:
    """Fine-tune the best model for `dataset` within `time_budget_s` seconds and export it.

    dataset: DataFrame, CSV/TSV/Parquet/JSONL path, image folder, (X, y), or HF Dataset.
    label: label column (found automatically when named label/target/class/y).
    time_budget_s: wall time for search + retrain (the search gets 75% of it, less Ray Train's start-up).
    max_trials: stop after this many trials (whichever of budget/trials comes first).
    search_space: name in search_spaces/ ('cpu_small', 'image_classification', …), a YAML path,
        or a dict of overrides ({"lr": {"low": 1e-5, "high": 1e-3}, "backbone": "timm/resnet18"}).
    metric: 'accuracy', 'f1_macro', 'balanced_accuracy', or 'auto' (macro-F1 for imbalanced data;
        R² for regression).
    task: 'classification' or 'regression' to override the inferred task.
    base_model: an earlier export to update: the search fine-tunes from its weights (new classes are
        appended to its head), and the result is compared with it on the new and the old test split.
    promote_tolerance: an update is promoted to champion only if it beats the base on the new test
        split and loses at most this much on the base's test split (see model.meta["update"]).
    cv_folds: k-fold cross-validate the winning config on train+validation (mean ± std in the card);
        useful for small data, where one validation split is noisy.
    start_points: configs to try first (e.g. the best ones found for this dataset before: a warm start);
        values outside the space are dropped and re-sampled.
    prerank: score candidate backbones with LogME before the search, drop the poorly ranked half
        (and any whose weights cannot be loaded), and try the best first; 'auto' does it when the
        space offers two or more pretrained backbones.
    find_label_errors: cross-fit the winner to list suspected label errors
        (suspected_label_errors.csv); 'auto' does it for classification with ≤ 20,000 rows.
    output_dir: where the run and the export go (default ./automl_runs/<dataset fingerprint>).
    ray_address: connect to a cluster ('auto', 'ray://host:10001'); default RAY_ADDRESS or a local Ray.
    resources_per_trial: e.g. {"cpu": 2, "gpu": 0.5}; default 1 CPU (or 1 GPU when present).
    retrain_workers: Ray Train workers (DDP) for the final retrain.
    resume: continue an interrupted search in output_dir.
    storage_path: where Ray keeps trial results and checkpoints: default <output_dir>/ray_results; on a
        cluster a shared filesystem path or a URI such as s3://bucket/automl (any pyarrow filesystem).
    """
    from automl import cluster
    from automl.runtime import quiet_libraries

    t_start = time.monotonic()
    task_type = task
    quiet_libraries()
    base_meta = None
    if base_model is not None:
        from automl.export.writer import read_meta

        base_model = Path(base_model).resolve()
        base_meta = read_meta(base_model)
    # All input checks happen before Ray starts: bad data costs no compute.
    task = data_mod.prepare(dataset, label, inputs=inputs, seed=seed, drop_bad_images=drop_bad_images,
                            drop_rare_classes=drop_rare_classes, task=task_type,
                            known_classes=(base_meta or {}).get("classes") or None)
    if base_meta is not None and (base_meta["modality"] != task.modality or
                                  (base_meta["task"] == "regression") != (task.task == "regression")):
        raise AutoMLError(f"base_model {str(base_model)!r} is a {base_meta['modality']} {base_meta['task']} model, but the "
                          f"new data is a {task.modality} {task.task} task. Fix: update it with data of the same kind.")
    allowed = ("auto", "r2") if task.task == "regression" else ("auto", *CLASSIFICATION_METRICS)
    if metric not in allowed:
        raise AutoMLError(f"metric={metric!r} is not supported for {task.task} tasks; expected one of {allowed}.")
    if search_space is not None and not isinstance(search_space, (dict, SearchSpace)):
        load_space(search_space, task.modality)  # validate early
    metric = choose_metric(task.report.imbalance_ratio, task.task) if metric == "auto" else metric
    fingerprint = task.fingerprint()
    out = Path(output_dir or Path("automl_runs") / f"{task.modality}-{fingerprint[:10]}").resolve()

    cluster.ensure_ray(ray_address, verbose=verbose)
    if search_space is None or (isinstance(search_space, dict) and "parameters" not in search_space):
        space = load_space(_default_space(task.modality, task.task), task.modality,
                           search_space if isinstance(search_space, dict) else None)
    else:
        space = load_space(search_space, task.modality)
    space = space.with_overrides({"seed": seed}) if "seed" not in space.parameters else space
    if base_meta is not None:
        pins = {"backbone": f"automl:{base_model}"}
        if task.modality == "image":
            pins["image_size"] = base_meta["preprocessing"]["size"]
        space = space.with_overrides(pins)

    tr, va, te = (task.splits[k] for k in ("train", "validation", "test"))
    space = for_data_size(space, len(tr))
    if task.modality == "image":
        storage = _storage_size(space)
        X = stack_resized(task.images, storage)
        pick = lambda idx: X[idx]  # noqa: E731
    else:
        storage = None
        pick = lambda idx: [task.texts[i] for i in idx]  # noqa: E731
    regression = task.task == "regression"
    kind = "regression" if regression else "classification"
    full_idx = np.concatenate([tr, va])
    # Regression targets are standardised with train+validation statistics, fixed for search and retrain.
    scale = (float(task.y[full_idx].mean()), float(task.y[full_idx].std() or 1.0)) if regression else None
    weights = None if regression else data_mod.class_weights(task.y[tr], task.num_classes)
    classes = [data_mod.plain(c) for c in task.classes]
    test_x = pick(te)
    search_data = TrialData(task.modality, task.num_classes, pick(tr), task.y[tr], pick(va), task.y[va], weights,
                            task=kind, target_scale=scale, cache_dir=str(out / "feature_cache"))

    transfer = None
    if prerank and base_meta is None:
        space, transfer = _prerank(space, search_data, prerank, seed)
    if start_points:
        # Warm start: earlier winners first, then the space's own sensible default.
        space.start_points = [space.fit_point(p) for p in start_points] + space.start_points

    res = cluster.resources(**{f"{k}s_per_trial": v for k, v in (resources_per_trial or {}).items()
                               if k in ("cpu", "gpu")})
    concurrency = cluster.max_concurrency(res)
    # Reserve Ray Train's start-up and the export (tracing a transformer to ONNX/TorchScript takes ~10 s).
    export_s = (12.0 if task.modality == "text" else 3.0) if export_formats else 1.0
    search_budget = None if time_budget_s is None else max(10.0, SEARCH_FRACTION * time_budget_s - RETRAIN_STARTUP_S
                                                     - export_s - (time.monotonic() - t_start))
    from automl.search.tune import run_search

    name = _experiment_name(out, resume)
    ray_storage = storage_path or str(out / "ray_results")
    result = run_search(search_data, space, metric=metric, storage_path=ray_storage, name=name, local_dir=str(out),
                        time_budget_s=search_budget, max_trials=max_trials, seed=seed, resources=res,
                        concurrency=concurrency, resume=resume, progress=progress)
    # The frozen-feature cache only serves trials; it can be large, so it does not outlive the search.
    shutil.rmtree(search_data.cache_dir, ignore_errors=True)

    # Retrain the winner on train+validation, stopping its planned schedule at its best epoch.
    from automl.training.retrain import retrain
    from automl.training.loop import build_encoder, evaluate, full_config

    full_x = pick(full_idx)
    retrain_data = TrialData(task.modality, task.num_classes, full_x, task.y[full_idx], None, None,
                             None if regression else data_mod.class_weights(task.y[full_idx], task.num_classes),
                             task=kind, target_scale=scale)
    best_cfg = full_config(result.best_config)
    use_gpu = bool(res.get("gpu"))
    t_retrain = time.monotonic()
    say = _say if progress else (lambda *_: None)
    say(f"best trial: val {metric} {result.best_score:.4f} at epoch {result.best_epoch}; "
        f"retraining it on {len(full_idx)} rows with Ray Train ({retrain_workers} worker(s))")
    model, spec = retrain(best_cfg, retrain_data, epochs=result.best_epoch, schedule_epochs=space.max_epochs,
                          storage_path=ray_storage, num_workers=retrain_workers, use_gpu=use_gpu,
                          cpus_per_worker=_retrain_cpus(res, retrain_workers))
    retrain_s = time.monotonic() - t_retrain
    encoder = build_encoder(best_cfg, model, spec)
    from automl.training.loop import encode_inputs
    from automl.runtime import device as default_device

    test_metrics = evaluate(model, encoder, encode_inputs(encoder, test_x), task.y[te], task.num_classes,
                            default_device(), detailed=True, target_scale=scale)
    model.cpu()

    label_errors = cv = None
    want_errors = find_label_errors is True or (find_label_errors == "auto" and len(full_idx) <= 20000)
    if find_label_errors == "auto" and want_errors and time_budget_s is not None:
        # The cross-fit costs about one retrain (two half-size folds side by side); skip it rather than
        # overrun the user's budget, and say so.
        left = time_budget_s - (time.monotonic() - t_start)
        if retrain_s - RETRAIN_STARTUP_S > left:
            want_errors = False
            task.report.notes.append(f"suspected-label-error search skipped: ~{retrain_s:.0f} s needed, "
                                     f"{max(left, 0):.0f} s of the time budget left (pass find_label_errors=True to force)")
    if not regression and (want_errors or cv_folds):
        from automl.diagnostics.labelnoise import cv_summary, out_of_fold_proba, suspects

        say(f"test {metric}: {test_metrics.get(metric, float('nan')):.4f}; cross-fitting "
            f"{cv_folds or 2} folds to {'cross-validate and ' if cv_folds else ''}find suspected label errors")
        proba, fold_of = out_of_fold_proba(best_cfg, full_x, task.y[full_idx], task.num_classes,
                                           epochs=result.best_epoch, schedule_epochs=space.max_epochs, seed=seed,
                                           folds=cv_folds or 2, return_folds=True)
        if want_errors:
            label_errors = suspects(proba, task.y[full_idx], classes,
                                    task.row_index[full_idx] if task.row_index is not None else full_idx)
        if cv_folds:
            cv = cv_summary(proba, task.y[full_idx], fold_of, task.num_classes)

    update = None
    if base_meta is not None:
        update = _compare_with_base(base_model, base_meta, model, encoder, task, classes, test_x, metric,
                                    promote_tolerance)

    preprocessing = encoder.to_dict()
    if storage is not None:
        preprocessing["storage_size"] = storage
    trials = result.trials
    meta = {
        "task": task.task, "modality": task.modality, "classes": classes,
        "num_classes": task.num_classes, "label_column": task.label_column, "input_columns": task.input_columns,
        "backbone": backbones.underlying(spec).to_dict(), "base_model": str(base_model) if base_model else None,
        "update": update, "preprocessing": preprocessing, "metric": metric, "target_scale": scale,
        "hyperparameters": {k: data_mod.plain(v) for k, v in best_cfg.items()},
        "searched_hyperparameters": {k: data_mod.plain(v) for k, v in result.best_config.items()},
        "search": {"best_score": result.best_score, "best_epoch": result.best_epoch, "n_trials": int(len(trials)),
                   "stopped_early": int((trials["status"] == "STOPPED_EARLY").sum()),
                   "errors": int((trials["status"] == "ERROR").sum()), "space": space.to_dict(),
                   "experiment_path": result.experiment_path,
                   "trial_epochs": int(trials["epochs_run"].sum()), "peak_disk_mb": result.peak_disk_mb},
        "retrain": {"epochs": result.best_epoch, "schedule_epochs": space.max_epochs, "workers": retrain_workers,
                    "time_s": retrain_s, "rows": int(len(full_idx))},
        "test_metrics": test_metrics, "data_report": task.report.to_dict(),
        "suspected_label_errors": None if label_errors is None else int(len(label_errors)),
        "cross_validation": cv, "transferability": _agreement(transfer, trials, metric), "fingerprint": fingerprint, "seed": seed,
        "wall_time_s": time.monotonic() - t_start,
    }
    from automl.export.writer import write_export

    export_dir = out / "model"
    say(f"exporting to {export_dir}")
    tokenizer = getattr(encoder, "tokenizer", None)
    import sys

    from automl.export.card import write_card

    meta["command"] = " ".join(sys.argv) if sys.argv and sys.argv[0] else "python"
    from automl.diagnostics.update import save_test_split

    write_export(export_dir, model, meta, tokenizer=tokenizer, formats=export_formats,
                 writers=[lambda d, m: m.update(test_split=save_test_split(d, task.modality, test_x, task.y[te],
                                                                           classes)),
                          lambda d, m: write_card(d, m, trials, result.history)],
                 tables={"trials.csv": trials, "metrics.json": test_metrics, "data_report.json": task.report.to_dict(),
                         **({"suspected_label_errors.csv": label_errors} if label_errors is not None else {})},
                 )
    meta = json.loads((export_dir / "config.json").read_text())
    fm = FinetunedModel(model, encoder, meta, export_dir=export_dir, trials=trials, search=result)
    fm.label_errors = label_errors
    return fm


def _retrain_cpus(res: dict, workers: int) -> int:
    """After the search the retrain runs alone: give each worker its share of the cluster's CPUs."""
    import ray

    total = int(ray.cluster_resources().get("CPU", 1))
    return max(1, int(res["cpu"]), total // max(1, workers)) if not res.get("gpu") else max(1, int(res["cpu"]))


def _say(msg: str) -> None:
    import sys

    print(f"automl: {msg}", file=sys.stderr, flush=True)


def _prerank(space: SearchSpace, data: TrialData, mode, seed: int):
    """LogME pre-ranking of the space's pretrained backbones (see transfer.py)."""
    spec = space.parameters.get("backbone", {})
    values = list(spec.get("values") or [])
    pretrained = [v for v in values if backbones.resolve(v).pretrained]
    if spec.get("type") != "choice" or (len(pretrained) < 2 and mode != True):  # noqa: E712
        return space, None
    from automl.errors import ModelLoadError
    from automl.search.prerank import rank_backbones

    ranking, failed = [], []
    for v in values:
        try:
            ranking += rank_backbones([v], data, space.default_config(), seed=seed)
        except ModelLoadError as exc:  # unreachable weights: better dropped now than failing every trial
            failed.append({"backbone": v, "error": str(exc)[:300]})
    ranking.sort(key=lambda r: r["logme"], reverse=True)
    if not ranking:
        return space, {"ranking": [], "failed": failed}
    keep = [r["backbone"] for r in ranking[: max(1, -(-len(ranking) // 2))]] if len(ranking) >= 3 else \
        [r["backbone"] for r in ranking]
    new = space.with_overrides({"backbone": {"type": "choice", "values": keep}})
    new.start_points = [{**p, "backbone": keep[0]} for p in new.start_points] or new.start_points
    return new, {"ranking": ranking, "kept": keep, "failed": failed}


def _agreement(transfer: dict | None, trials, metric: str) -> dict | None:
    """How well LogME's order matched the search's (best validation score per backbone)."""
    if not transfer or not transfer.get("ranking"):
        return transfer
    from automl.search.prerank import spearman

    col = f"best_val_{metric}"
    best = trials.groupby("config/backbone")[col].max().to_dict() if "config/backbone" in trials else {}
    pairs = [(r["logme"], best[r["backbone"]]) for r in transfer["ranking"] if r["backbone"] in best]
    transfer = dict(transfer)
    transfer["search_best"] = {k: float(v) for k, v in best.items()}
    transfer["spearman_vs_search"] = spearman([a for a, _ in pairs], [b for _, b in pairs]) if len(pairs) >= 2 else None
    return transfer


def _compare_with_base(base_dir: Path, base_meta: dict, model, encoder, task, new_classes: list, test_x,
                       metric: str, tolerance: float) -> dict:
    """Score the update and its base on the new test split and on the base's own test split."""
    from automl.export.writer import load_model
    from automl.diagnostics.update import decide, l2_distance, load_test_split, score

    base, base_encoder, _ = load_model(base_dir)
    is_image = task.modality == "image"
    labels = [new_classes[i] for i in task.y[task.splits["test"]]]
    new_on_new = score(model, encoder, new_classes, test_x, labels, metric, is_image)
    base_on_new = score(base, base_encoder, base_meta["classes"], test_x, labels, metric, is_image)
    old = load_test_split(base_dir)
    if old is None:
        raise AutoMLError(f"base_model {str(base_dir)!r} has no stored test split, so forgetting cannot be measured. "
                          "Fix: re-export the base model with this version of automl.")
    old_x, old_labels = old
    new_on_old = score(model, encoder, new_classes, old_x, old_labels, metric, is_image)
    base_on_old = score(base, base_encoder, base_meta["classes"], old_x, old_labels, metric, is_image)
    decision, reason = decide(new_on_new, base_on_new, new_on_old, base_on_old, tolerance)
    return {"base_model": str(base_dir), "metric": metric, "tolerance": tolerance,
            "new_test": {"new": new_on_new, "old": base_on_new}, "old_test": {"new": new_on_old, "old": base_on_old},
            "forgetting": base_on_old - new_on_old, "l2_from_base": l2_distance(model, base),
            "decision": decision, "reason": reason}
