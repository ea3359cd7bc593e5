"""The stages of `auto_finetune`, in order: prepare -> plan -> materialise -> search -> finalise -> evaluate ->
diagnose -> export. Each takes and returns small typed values; the work itself lives in the subpackages."""
from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from automl import cluster, models
from automl.budget import Budget, Costs
from automl.data.inputs import Inputs
from automl.data.intake import TaskData, plain, prepare as read_task
from automl.errors import AutoMLError
from automl.export.manifest import ExportManifest, Preprocessing, Provenance
from automl.export.predictor import FinetunedModel
from automl.metrics import CLASSIFICATION_METRICS, choose_metric
from automl.options import FinetuneOptions
from automl.search.plan import Plan, make_plan
from automl.search.space import SearchSpace, load_space
from automl.search.tune import SearchResult


def say(msg: str) -> None:
    print(f"automl: {msg}", file=sys.stderr, flush=True)


@dataclass
class BaseModel:
    """An earlier export being updated."""

    path: Path
    manifest: ExportManifest


@dataclass
class Prepared:
    """The cleaned, split task and what follows from it: the metric, the space, where outputs go."""

    task: TaskData
    options: FinetuneOptions
    metric: str
    space: SearchSpace
    out: Path
    base: BaseModel | None = None

    @property
    def classes(self) -> list:
        return [plain(c) for c in self.task.classes]


@dataclass
class FinalModel:
    """The model that is evaluated and exported, and how it was obtained."""

    model: Any
    encoder: Any
    spec: models.BackboneSpec
    config: dict
    training: dict = field(default_factory=dict)


@dataclass
class Diagnostics:
    label_errors: pd.DataFrame | None = None
    label_error_summary: dict | None = None
    cross_validation: dict | None = None
    update: dict | None = None
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------- prepare

def prepare(dataset: Any, opts: FinetuneOptions) -> Prepared:
    """Read, check, clean and split the data; pick the metric and the space. Bad input fails here, before Ray."""
    d, s = opts.data, opts.search
    base = None
    if opts.update.base_model is not None:
        path = Path(opts.update.base_model).resolve()
        base = BaseModel(path, ExportManifest.read(path))
    task = read_task(dataset, d.label, inputs=d.inputs, seed=s.seed, drop_bad_images=d.drop_bad_images,
                     drop_rare_classes=d.drop_rare_classes, task=d.task,
                     known_classes=base.manifest.classes if base and not base.manifest.is_regression else None)
    if base is not None and (base.manifest.modality != task.modality
                             or base.manifest.is_regression != (task.task == "regression")):
        raise AutoMLError(f"base_model {str(base.path)!r} is a {base.manifest.modality} {base.manifest.task} model, "
                          f"but the new data is a {task.modality} {task.task} task. "
                          "Fix: update it with data of the same kind.")
    allowed = ("auto", "r2") if task.task == "regression" else ("auto", *CLASSIFICATION_METRICS)
    if s.metric not in allowed:
        raise AutoMLError(f"metric={s.metric!r} is not supported for {task.task} tasks; expected one of {allowed}.")
    metric = choose_metric(task.report.imbalance_ratio, task.task) if s.metric == "auto" else s.metric
    out = Path(opts.output.output_dir or Path("automl_runs") / f"{task.modality}-{task.fingerprint()[:10]}").resolve()
    return Prepared(task, opts, metric, _space(task, opts, base), out, base)


def _space(task: TaskData, opts: FinetuneOptions, base: BaseModel | None) -> SearchSpace:
    source, overrides = opts.search.search_space, dict(opts.search.search_overrides or {})
    if isinstance(source, dict) and "parameters" not in source:
        source, overrides = None, {**source, **overrides}  # a dict of overrides of the default space
    if source is None:
        source = "regression" if task.task == "regression" else "cpu_small"
    space = load_space(source, task.modality, overrides or None)
    if "seed" not in space.parameters:
        space = space.with_overrides({"seed": opts.search.seed})
    if base is not None:
        pins = {"backbone": f"automl:{base.path}"}
        if task.modality == "image":
            pins["image_size"] = base.manifest.preprocessing.size
        space = space.with_overrides(pins)
    if opts.search.start_points:
        # Warm start: earlier winners first, then the space's own sensible default.
        space.start_points = [space.fit_point(p) for p in opts.search.start_points] + space.start_points
    return space


# ---------------------------------------------------------------------------- plan

def plan(prepared: Prepared, ray: cluster.ClusterInfo, budget: Budget) -> Plan:
    opts = prepared.options
    res = ray.trial_resources(opts.resources.cpus_per_trial, opts.resources.gpus_per_trial)
    return make_plan(prepared.space, modality=prepared.task.modality, n_train=len(prepared.task.splits["train"]),
                     budget=budget, costs=Costs.load(), resources=res, concurrency=ray.max_concurrency(res),
                     retrain_cpus=ray.retrain_cpus(res, opts.resources.retrain_workers),
                     max_trials=opts.search.max_trials, export_formats=opts.output.export_formats)


def materialise(prepared: Prepared, plan: Plan) -> Inputs:
    return Inputs.materialise(prepared.task, plan.storage_size)


# ---------------------------------------------------------------------------- search

def search(prepared: Prepared, plan: Plan, inputs: Inputs, budget: Budget) -> SearchResult:
    """Pre-rank backbones (LogME), then run the Ray Tune search of the plan."""
    from automl.search.prerank import prerank_space
    from automl.search.tune import experiment_name, run_search

    opts = prepared.options
    data = inputs.trial_data(cache_dir=str(prepared.out / "feature_cache"))
    space, transfer = plan.space, None
    if opts.search.prerank and prepared.base is None:
        space, transfer = prerank_space(space, data, opts.search.prerank, opts.search.seed)
    storage = opts.resources.storage_path or str(prepared.out / "ray_results")
    search_s = None if plan.search_ends_at_s is None else max(10.0, plan.search_ends_at_s - budget.elapsed())
    result = run_search(data, space, metric=prepared.metric, storage_path=storage,
                        name=experiment_name(prepared.out, opts.search.resume), local_dir=str(prepared.out),
                        time_budget_s=search_s, max_trials=plan.max_trials, seed=opts.search.seed,
                        resources=plan.resources, concurrency=plan.concurrency, resume=opts.search.resume,
                        progress=opts.output.progress)
    # The frozen-feature cache only serves trials; it can be large, so it does not outlive the search.
    shutil.rmtree(data.cache_dir, ignore_errors=True)
    result.transferability = transfer
    return result


# ---------------------------------------------------------------------------- finalise

def finalise(prepared: Prepared, plan: Plan, inputs: Inputs, result: SearchResult, budget: Budget) -> FinalModel:
    """Retrain the winner on train+validation with Ray Train, stopping its schedule at its best epoch."""
    from automl.training.loop import build_encoder, full_config
    from automl.training.retrain import retrain

    opts = prepared.options
    config = full_config(result.best_config)
    full = inputs.trial_data("full", None)
    if opts.output.progress:
        say(f"best trial: val {prepared.metric} {result.best_score:.4f} at epoch {result.best_epoch}; retraining it "
            f"on {len(full.y_train)} rows with Ray Train ({opts.resources.retrain_workers} worker(s))")
    t0 = time.monotonic()
    storage = opts.resources.storage_path or str(prepared.out / "ray_results")
    model, spec = retrain(config, full, epochs=result.best_epoch, schedule_epochs=plan.space.max_epochs,
                          storage_path=storage, num_workers=opts.resources.retrain_workers,
                          use_gpu=bool(plan.resources.get("gpu")),
                          cpus_per_worker=plan.retrain_cpus)
    spent = time.monotonic() - t0
    return FinalModel(model, build_encoder(config, model, spec), spec, config,
                      {"how": "retrain", "epochs": result.best_epoch, "schedule_epochs": plan.space.max_epochs,
                       "workers": opts.resources.retrain_workers, "time_s": spent, "rows": int(len(full.y_train))})


# ---------------------------------------------------------------------------- evaluate

def evaluate(prepared: Prepared, inputs: Inputs, final: FinalModel) -> dict:
    """Score the final model once on the held-out test split."""
    import torch

    from automl.training.loop import encode_inputs, evaluate as score

    te = inputs.split("test")
    final.model.cpu()
    return score(final.model, final.encoder, encode_inputs(final.encoder, inputs.pick(te)), prepared.task.y[te],
                 prepared.task.num_classes, torch.device("cpu"), detailed=True, target_scale=inputs.target_scale)


# ---------------------------------------------------------------------------- diagnose

def diagnose(prepared: Prepared, plan: Plan, inputs: Inputs, result: SearchResult, final: FinalModel,
             budget: Budget) -> Diagnostics:
    """Suspected label errors and cross-validation (a cross-fit of the winner), and the update comparison."""
    from automl.diagnostics.labelnoise import cv_summary, out_of_fold_proba, suspects
    from automl.diagnostics.update import compare_with_base

    opts, task, out = prepared.options, prepared.task, Diagnostics()
    regression = task.task == "regression"
    full = inputs.split("full")
    want = opts.diagnostics.find_label_errors is True or (
        opts.diagnostics.find_label_errors == "auto" and not regression and len(full) <= 20000)
    needed = float(final.training.get("time_s", 0.0))
    if opts.diagnostics.find_label_errors == "auto" and want and not budget.can_afford(needed):
        want = False
        out.notes.append(f"suspected-label-error search skipped: ~{needed:.0f} s needed, "
                         f"{max(budget.available(), 0):.0f} s of the time budget left "
                         "(pass find_label_errors=True to force)")
    if not regression and (want or opts.diagnostics.cv_folds):
        folds = opts.diagnostics.cv_folds or 2
        if opts.output.progress:
            say(f"cross-fitting {folds} folds to {'cross-validate and ' if opts.diagnostics.cv_folds else ''}"
                "find suspected label errors")
        proba, fold_of = out_of_fold_proba(final.config, inputs.pick(full), task.y[full], task.num_classes,
                                           epochs=result.best_epoch, schedule_epochs=plan.space.max_epochs,
                                           seed=opts.search.seed, folds=folds, return_folds=True)
        if want:
            rows = task.row_index[full] if task.row_index is not None else full
            out.label_errors = suspects(proba, task.y[full], prepared.classes, rows)
            out.label_error_summary = {"count": int(len(out.label_errors))}
        if opts.diagnostics.cv_folds:
            out.cross_validation = cv_summary(proba, task.y[full], fold_of, task.num_classes)
    if prepared.base is not None:
        te = inputs.split("test")
        labels = [prepared.classes[i] for i in task.y[te]]
        out.update = compare_with_base(prepared.base.path, final.model, final.encoder, prepared.classes,
                                       inputs.pick(te), labels, prepared.metric, opts.update.promote_tolerance,
                                       task.modality == "image")
    return out


# ---------------------------------------------------------------------------- export

def export(prepared: Prepared, plan: Plan, inputs: Inputs, result: SearchResult, final: FinalModel,
           test_metrics: dict, diagnostics: Diagnostics, budget: Budget) -> FinetunedModel:
    """Write the export atomically (weights, manifest, ONNX/TorchScript, card, tables) and return the model."""
    from automl.diagnostics.update import save_test_split
    from automl.export.card import write_card
    from automl.export.writer import write_export
    from automl.search.prerank import agreement

    task, opts = prepared.task, prepared.options
    task.report.notes.extend(diagnostics.notes)
    trials = result.trials
    pre = Preprocessing(**{k: v for k, v in final.encoder.to_dict().items() if k in Preprocessing.__dataclass_fields__},
                        storage_size=inputs.storage_size, pooling=getattr(final.model, "pooling", None))
    manifest = ExportManifest(
        task=task.task, modality=task.modality, classes=prepared.classes if task.task != "regression" else [],
        label_column=task.label_column, input_columns=task.input_columns, preprocessing=pre,
        backbone=models.family(final.spec).underlying(final.spec), metric=prepared.metric,
        hyperparameters={k: plain(v) for k, v in final.config.items()},
        searched_hyperparameters={k: plain(v) for k, v in result.best_config.items()},
        target_scale=list(inputs.target_scale) if inputs.target_scale else None, plan=plan.to_dict(),
        search={"best_score": result.best_score, "best_epoch": result.best_epoch, "n_trials": int(len(trials)),
                "stopped_early": int((trials["status"] == "STOPPED_EARLY").sum()),
                "errors": int((trials["status"] == "ERROR").sum()), "space": plan.space.to_dict(),
                "experiment_path": result.experiment_path, "trial_epochs": int(trials["epochs_run"].sum()),
                "peak_disk_mb": result.peak_disk_mb, "max_reports": plan.space.max_epochs},
        training=final.training, test_metrics=test_metrics, data_report=task.report.to_dict(),
        cross_validation=diagnostics.cross_validation, suspected_label_errors=diagnostics.label_error_summary,
        transferability=agreement(result.transferability, trials, prepared.metric), update=diagnostics.update,
        provenance=Provenance(fingerprint=task.fingerprint(), seed=opts.search.seed,
                              command=" ".join(sys.argv) if sys.argv and sys.argv[0] else "python",
                              base_model=str(prepared.base.path) if prepared.base else None))
    te = inputs.split("test")
    writers = [lambda d, m: write_card(d, m, trials, result.history)]
    if opts.output.keep_test_split:
        writers.insert(0, lambda d, m: setattr(m, "test_split", save_test_split(
            d, task.modality, inputs.pick(te), task.y[te], manifest.classes)))
    tables = {"trials.csv": trials, "metrics.json": test_metrics, "data_report.json": task.report.to_dict()}
    if diagnostics.label_errors is not None:
        tables["suspected_label_errors.csv"] = diagnostics.label_errors
    export_dir = prepared.out / "model"
    if opts.output.progress:
        say(f"exporting to {export_dir}")
    manifest.provenance.wall_time_s = budget.elapsed()
    manifest.budget = budget.to_dict()
    write_export(export_dir, final.model, final.encoder, manifest, tables=tables, formats=opts.output.export_formats,
                 writers=writers)
    fm = FinetunedModel(final.model, final.encoder, ExportManifest.read(export_dir), export_dir=export_dir,
                        trials=trials, search=result)
    fm.label_errors = diagnostics.label_errors
    return fm
