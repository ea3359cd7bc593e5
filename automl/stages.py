"""The stages of `auto_finetune`, in order: prepare -> plan -> materialise -> search -> finalise -> evaluate ->
diagnose -> export. Each takes and returns small typed values; the work itself lives in the subpackages. prepare
reads the data, search, update and output options; each later stage takes only the option groups it reads, as
keyword arguments (no stage gets the whole FinetuneOptions)."""
from __future__ import annotations

import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from automl import cluster, modalities, models
from automl.budget import Budget, Costs
from automl.data.inputs import Inputs
from automl.data.intake import TaskData, plain, prepare as read_task
from automl.errors import AutoMLError, DataError, ModelLoadError, NoTrialScored
from automl.export.manifest import ExportManifest
from automl.export.predictor import FinetunedModel
from automl.metrics import CLASS_AVERAGED, CLASSIFICATION_METRICS, choose_metric, group_metrics
from automl.options import (DataOptions, DiagnosticsOptions, OutputOptions, ResourceOptions, SearchOptions,
                            UpdateOptions)
from automl.runtime import device
from automl.search.ladder import forward_passes
from automl.search.plan import MIN_TEST_ROWS, Plan, make_plan
from automl.search.probes import nominal_speed, pretrained, scratch_speeds, speed_probe
from automl.training.loop import full_config
from automl.search.space import SearchSpace, load_space

if TYPE_CHECKING:
    from automl.search.ladder import Rung0
    from automl.search.tune import SearchResult  # annotations only: Ray Tune loads with the search

# A forced retrain or cross-fit that starts with its time already spent still gets this long to pace its schedule
# into (a deadline past when training starts is ignored as stale, and the run would train its whole length).
MIN_PACED_S = 5.0
# A winner priced above the time the search left is still retrained, paced into that time (training.loop.Pace
# compresses its schedule), when that time holds at least this share of its training: at 600 s on Oxygen a run
# exported best weights at 82% of its budget with the ~100 s held for a retrain unused (a winner priced above the
# hold is the branch that does that; its reason was not recorded). (Search trials may train down to 0.3 of their
# length, search/clock.MIN_FIT; a final model is held to more.)
MIN_RETRAIN_SHARE = 0.6
PLAN_FILE = "plan.json"  # in the run's folder: what a resume starts from (written once the run has planned)


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
    metric: str
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

def prepare(dataset: Any, *, data: DataOptions, search: SearchOptions, update: UpdateOptions,
            output: OutputOptions) -> Prepared:
    """Read, check, clean and split the data; pick the metric and the space. Bad input fails here, before Ray."""
    d, s = data, search
    base = None
    if update.base_model is not None:
        path = Path(update.base_model).resolve()
        base = BaseModel(path, ExportManifest.read(path))
    task = read_task(dataset, d.label, inputs=d.inputs, seed=s.seed, drop_bad_images=d.drop_bad_images,
                     drop_rare_classes=d.drop_rare_classes, task=d.task, groups=d.groups,
                     known_classes=base.manifest.classes if base and not base.manifest.is_regression else None,
                     preprocessing=base.manifest.preprocessing if base else None)
    if base is not None and base.manifest.backbone.library == "ensemble":
        raise AutoMLError(f"base_model {str(base.path)!r} is an ensemble of {len(base.manifest.backbone.kwargs['members'])}"
                          " models; an update fine-tunes one model. Fix: update from an export of a single model "
                          "(e.g. one made with retrain=True), or start afresh.")
    if base is not None and (base.manifest.modality != task.modality
                             or base.manifest.is_regression != (task.task == "regression")):
        raise AutoMLError(f"base_model {str(base.path)!r} is a {base.manifest.modality} {base.manifest.task} model, "
                          f"but the new data is a {task.modality} {task.task} task. "
                          "Fix: update it with data of the same kind.")
    allowed = ("auto", "r2") if task.task == "regression" else ("auto", *CLASSIFICATION_METRICS)
    if s.metric not in allowed:
        raise AutoMLError(f"metric={s.metric!r} is not supported for {task.task} tasks; expected one of {allowed}.")
    metric = choose_metric(task.report.imbalance_ratio, task.task) if s.metric == "auto" else s.metric
    out = Path(output.output_dir or Path("automl_runs") / f"{task.modality}-{task.fingerprint()[:10]}").resolve()
    _space(task, search, base, metric, gpu=False)  # a bad space fails now, before Ray starts
    if s.resume and not (out / PLAN_FILE).exists() and output.progress:
        # Said, not refused (a script may always pass it): a mistyped folder spent the budget afresh in silence.
        say(f"resume=True, but {out} holds no interrupted run to resume (no {PLAN_FILE}): starting afresh")
    return Prepared(task, metric, out, base)


def warm_libraries(prepared: Prepared, search: SearchOptions) -> threading.Thread:
    """Import the libraries the space's backbones need in a thread (join it before planning): Ray's start leaves the
    driver waiting on other processes for seconds. A backbone that cannot resolve fails later, where it is used."""
    def warm():
        space = _space(prepared.task, search, prepared.base, prepared.metric, gpu=False)
        families = set()
        for name in [full_config(space.default_config())["backbone"], *space.backbones()]:
            try:
                families.add(models.family(models.resolve(name)))
            except Exception:  # noqa: BLE001 — reported by the plan, with a fix, when it matters
                continue
        for fam in families:
            try:
                fam.warm()
            except Exception:  # noqa: BLE001
                continue

    thread = threading.Thread(target=warm, name="automl-warm-libraries", daemon=True)
    thread.start()
    return thread


def _space(task: TaskData, search: SearchOptions, base: BaseModel | None, metric: str, gpu: bool) -> SearchSpace:
    """The user's space, or the default for the hardware (pretrained 224 px spaces with a GPU, cpu_small without).
    A start point that weighs classes (for a metric that averages over them) trains unweighted when the run is
    judged by accuracy, where rare classes count only by their share of the rows."""
    source, overrides = search.search_space, dict(search.search_overrides or {})
    if isinstance(source, dict) and "parameters" not in source:
        source, overrides = None, {**source, **overrides}  # a dict of overrides of the default space
    if source is None:
        source = "regression" if task.task == "regression" else (
            f"{task.modality}_classification" if gpu else "cpu_small")
    space = load_space(source, task.modality, overrides or None)
    if "seed" not in space.parameters:
        space = space.with_overrides({"seed": search.seed})
    if metric not in CLASS_AVERAGED:
        space.start_points = [space.fit_point({**p, "class_weighted": False}) if p.get("class_weighted") else p
                              for p in space.start_points]
    if base is not None:
        space = space.with_overrides({"backbone": f"automl:{base.path}",
                                      **modalities.get(task.modality).base_pins(base.manifest)})
    if search.start_points:
        # Warm start: earlier winners first, then the space's own sensible default.
        space.start_points = [space.fit_point(p) for p in search.start_points] + space.start_points
    return space


# ---------------------------------------------------------------------------- plan

def plan(prepared: Prepared, ray: cluster.ClusterInfo, budget: Budget, *, search: SearchOptions,
         resources: ResourceOptions, diagnostics: DiagnosticsOptions, output: OutputOptions) -> Plan:
    """Decide how the budget is spent, from the data and the start point's measured speed (search/plan.py)."""
    task = prepared.task
    cluster.check_shared_storage(ray, resources.storage_path, shared_dir(prepared.out, resources.storage_path))
    saved = prepared.out / PLAN_FILE
    if search.resume and saved.exists():
        old = Plan.load(saved, budget.elapsed(), budget.total_s)
        if old.fingerprint and old.fingerprint != task.fingerprint():
            raise DataError(f"resume=True, but the data differ from those the interrupted run in {prepared.out} "
                            f"began with (fingerprint {task.fingerprint()[:12]}, the run's {old.fingerprint[:12]}): "
                            "its trials were trained and scored on other rows. Fix: resume with the same data, or "
                            "start afresh (resume=False, or another output_dir).")
        return old
    space = _space(task, search, prepared.base, prepared.metric,
                   gpu=ray.gpus > 0 and resources.gpus_per_trial != 0)
    res = ray.trial_resources(resources.cpus_per_trial, resources.gpus_per_trial)
    # Before the start point is probed: pre-ranking drops backbones that cannot load, the start point's included.
    space, transfer = _prerank(prepared, space, search)
    dropped = []
    while True:  # without pre-ranking (rung 0 runs), a start backbone that cannot load gives way to the next
        try:
            start, spec, stats, pinned_size, max_length, speed_at, others = _start_and_speed(
                prepared, space, res, ray, search.seed,
                budget_left=None if budget.total_s is None else budget.left)
            break
        except ModelLoadError as exc:
            space = _without_backbone(space, full_config(space.default_config())["backbone"], exc)
            dropped.append(str(exc).split(". Fix:")[0])
    probed = _rung0_backbones(prepared, space, search.ladder)
    planned = make_plan(space, stats, speed_at, budget_left_s=None if budget.total_s is None else budget.left(),
                     elapsed_s=budget.elapsed(), costs=Costs.load(), resources=res,
                     concurrency=ray.max_concurrency(res),
                     retrain_cpus=ray.retrain_cpus(res, resources.retrain_workers),
                     max_trials=search.max_trials, pretrained=spec.pretrained,
                     export_formats=output.export_formats, label_errors=diagnostics.find_label_errors,
                     cv_folds=diagnostics.cv_folds, pinned_size=pinned_size, max_length=max_length,
                     node_cpus=int(ray.node_cpus), retrain=_retrain_choice(resources.storage_path, search.retrain),
                     regression=task.task == "regression",
                     rung0_backbones=len(probed), rung0_passes=forward_passes(probed), others=others)
    planned.transferability = transfer
    planned.fingerprint, planned.budget_s = task.fingerprint(), budget.total_s
    planned.reasons += [f"dropped before the search: {d}" for d in dropped]
    prepared.out.mkdir(parents=True, exist_ok=True)
    planned.save(saved)
    ray.request(planned.resources, planned.concurrency)  # an autoscaling cluster starts the nodes now
    if ray.max_nodes > ray.nodes:
        planned.reasons.append(f"capacity from {ray.source}: up to {ray.cpus:g} CPUs / {ray.gpus:g} GPUs on "
                               f"{ray.max_nodes} nodes; asked the autoscaler for {planned.concurrency} trial slots")
    return planned


def _start_and_speed(prepared: Prepared, space: SearchSpace, res: dict, ray: cluster.ClusterInfo, seed: int,
                     budget_left=None):
    """The start point, its backbone, the data's statistics, the pinned input size or length, the start point's
    measured speed and the space's from-scratch backbones' (with a time budget, budget_left() giving the seconds
    left: they price the plan) (raises ModelLoadError when the start backbone cannot load)."""
    from automl.search.plan import DataStats, could_share

    task = prepared.task
    start = full_config(space.default_config())
    spec = models.resolve(start["backbone"])
    stats = DataStats(task.modality, *(len(task.splits[k]) for k in ("train", "validation")),
                      len(task.splits["train"]) + len(task.splits["validation"]), len(task.splits["test"]))

    def tokenizer_of():
        arch = models.family(spec).underlying(spec)
        return models.family(arch).encoder(None, arch, {"max_length": 8}).tokenizer

    pinned_size, max_length = modalities.get(task.modality).describe(stats, task, space, tokenizer_of,
                                                                     bool(res.get("gpu")), seed)
    if budget_left is None:
        return start, spec, stats, pinned_size, max_length, nominal_speed(prepared.task, start, pinned_size), {}
    costs = Costs.load()
    shares = lambda sp: could_share(sp, stats, space, budget_left(), costs, spec.pretrained,  # noqa: E731
                                    ray.max_concurrency(res))
    speed_at = speed_probe(prepared.task, start, res, max_length, int(ray.node_cpus), stats.image_side,
                           pinned_size, shares=shares, thread_speedup=costs["thread_speedup"])
    others = scratch_speeds(prepared.task, space, res, pinned_size or speed_at.largest, max_length,
                            alone_on=int(ray.node_cpus) if speed_at.alone_only else None,
                            thread_speedup=costs["thread_speedup"])
    return start, spec, stats, pinned_size, max_length, speed_at, others


def _without_backbone(space: SearchSpace, name: str, exc: Exception) -> SearchSpace:
    """The space without a backbone whose weights cannot load; its start points move to the next backbone."""
    spec = space.parameters.get("backbone", {})
    values = [v for v in (spec.get("values") or []) if v != name] if isinstance(spec, dict) else []
    if not values:
        raise exc
    return space.with_backbones(values)


def _rung0_backbones(prepared: Prepared, space: SearchSpace, ladder: bool) -> list[str]:
    """The pretrained backbones rung 0 (search/ladder.py) will fit heads on: none when it does not run (ladder
    off, regression, an update of an earlier export, or a start point trained from scratch). ladder: the ladder
    option (SearchOptions.ladder)."""
    if not ladder or prepared.task.task == "regression" or prepared.base is not None:
        return []
    start = full_config(space.default_config())["backbone"]
    return list(dict.fromkeys(v for v in [start] + space.backbones() if pretrained(v))) if pretrained(start) else []


def _prerank(prepared: Prepared, space: SearchSpace, search: SearchOptions) -> tuple[SearchSpace, dict | None]:
    """LogME pre-ranking of the space's backbones on a sample of training rows (search/prerank.py)."""
    from automl.data.trial_data import TrialData
    from automl.search.prerank import PRERANK_ROWS, prerank_space

    task = prepared.task
    if not search.prerank or prepared.base is not None or (search.prerank == "auto"
                                                           and _rung0_backbones(prepared, space, search.ladder)):
        return space, None  # rung 0 scores the backbones on validation itself (stages.probe)
    tr = np.sort(np.random.default_rng(search.seed).permutation(task.splits["train"])[:PRERANK_ROWS])
    config = full_config(space.default_config())
    x = modalities.get(task.modality).prerank_input(task, tr, config)
    data = TrialData(task.modality, task.num_classes, x, task.y[tr],
                     task="regression" if task.task == "regression" else "classification")
    return prerank_space(space, data, search.prerank, search.seed, config)


def _retrain_choice(storage: str | None, retrain: bool | str) -> bool | str:
    """The retrain option (SearchOptions.retrain), given the storage path (ResourceOptions.storage_path). With
    results on a URI the trials' best weights are not kept (they live on the trial's node): retrain."""
    if storage and "://" in str(storage):
        if retrain is False:
            raise AutoMLError(f"storage_path {storage!r} is a URI, where automl keeps no trial weights, so "
                              "retrain=False would leave nothing to export. Fix: allow the retrain, or use a "
                              "filesystem path.")
        return True
    return retrain


def shared_dir(out: Path, storage: str | None) -> Path:
    """Where run artefacts that trials on other nodes must read live: the storage path `storage`
    (ResourceOptions.storage_path) when it is a filesystem path (shared on a cluster), else the output folder."""
    return Path(storage).resolve() if storage and "://" not in str(storage) else out


def materialise(prepared: Prepared, plan: Plan, *, resources: ResourceOptions) -> Inputs:
    """Every row's model input, decoded and resized once to the planned size."""
    return Inputs.materialise(prepared.task, plan.storage_size,
                              shared_dir(prepared.out, resources.storage_path) / "inputs")


# ---------------------------------------------------------------------------- rung 0

def probe(prepared: Prepared, plan: Plan, inputs: Inputs, budget: Budget, *, search: SearchOptions,
          resources: ResourceOptions, output: OutputOptions) -> Rung0 | None:
    """Rung 0 of the ladder (search/ladder.py): linear heads on every pretrained backbone's frozen features. The
    search then fine-tunes the backbones it promotes, each from its best head, and the start point fine-tunes
    the probe validation favours (plan.space is updated in place)."""
    from automl.search import ladder
    from automl.training.combine import ALPHA

    task, space = prepared.task, plan.space
    candidates = _rung0_backbones(prepared, space, search.ladder)  # the start backbone first, as the plan priced
    if not candidates or (budget.total_s is not None and not plan.rung0_s):
        return None
    start = full_config(space.default_config())
    data = inputs.trial_data(max_val=plan.val_rows)
    allowance = None if budget.total_s is None else plan.rung0_s
    rung0 = ladder.probe(candidates, start, data.x_train, data.y_train, data.x_val, data.y_val,
                         num_classes=task.num_classes, metric=prepared.metric, allowance_s=allowance,
                         out_dir=shared_dir(prepared.out, resources.storage_path) / "rung0", seed=search.seed,
                         progress=say if output.progress else None,
                         upscale=plan.rung0_upscale)
    if not rung0.probes:
        plan.reasons.append(rung0.summary())
        return rung0
    chosen, why = ladder.choose_start(rung0, start["backbone"], data.y_val, prepared.metric, task.num_classes, ALPHA)
    keep = ladder.promoted(rung0, chosen) + [v for v in space.backbones() if not pretrained(v)]
    plan.space = space.with_overrides({"backbone": {"type": "choice", "values": keep}})
    plan.space.start_points = [plan.space.fit_point({**p, "backbone": chosen} if p.get("backbone") == start["backbone"]
                                                    else p) for p in space.start_points
                               if p.get("backbone") in keep or p.get("backbone") == start["backbone"]]
    # With every validation row scored, train+validation is every row: the folds' probabilities list label errors.
    ladder.cross_validate(rung0, np.concatenate([data.y_train, data.y_val]), task.num_classes, prepared.metric,
                          seed=search.seed, keep_oof=len(data.y_val) == len(inputs.split("validation")))
    # Said with the rest of the plan when the search starts (tune.SearchProgress), not twice.
    plan.reasons.append(f"{rung0.summary()}; the fine-tuning rungs search {', '.join(keep)}; {why}")
    return rung0


# ---------------------------------------------------------------------------- search

def search(prepared: Prepared, plan: Plan, inputs: Inputs, budget: Budget, rung0: Rung0 | None = None, *,
           search: SearchOptions, resources: ResourceOptions, output: OutputOptions) -> SearchResult:
    """Run the Ray Tune search of the plan (fine-tunes start from their backbone's rung-0 head); the trial table
    lists rung 0's heads too."""
    from automl.search.ladder import with_rung0
    from automl.search.tune import SearchConfig, SearchStorage, experiment_name, run_search

    shared = shared_dir(prepared.out, resources.storage_path)
    cache = shared / "feature_cache"
    # Beside other runs' caches on shared storage; inside the run's own folder otherwise.
    data = inputs.trial_data(cache_dir=str(cache / prepared.out.name if shared != prepared.out else cache),
                             max_val=plan.val_rows)
    storage = SearchStorage(resources.storage_path or str(prepared.out / "ray_results"),
                            experiment_name(prepared.out, search.resume), local_dir=str(prepared.out),
                            resume=search.resume)
    config = SearchConfig(prepared.metric, storage, plan.search_limits(budget.elapsed()), plan.resources,
                          plan.concurrency, seed=search.seed, progress=output.progress,
                          plan_lines=tuple(plan.reasons))
    result = None
    try:
        result = run_search(data, plan.space, config, init_heads=rung0.head_files() if rung0 else None)
    except NoTrialScored:
        if not rung0 or not rung0.probes:
            raise
        # No fine-tune reported in time: rung 0's best head is the model (better than no model at all).
    finally:
        # The frozen-feature cache only serves trials; it can be large, so it does not outlive the search.
        shutil.rmtree(data.cache_dir, ignore_errors=True)
    if rung0 and rung0.probes:
        result = with_rung0(result, rung0, prepared.metric, f"{storage.path}/{storage.name}")
    result.transferability = plan.transferability
    return result


# ---------------------------------------------------------------------------- finalise

def _scaled(config: dict, rows: int, n_train: int) -> dict:
    """The config with rows per report scaled to a training set of `rows`: the same epochs, the same schedule."""
    if not config.get("report_rows"):
        return config
    return {**config, "report_rows": max(1, round(int(config["report_rows"]) * rows / max(1, n_train)))}


def _rung0_errors(prepared: Prepared, result: SearchResult, diagnostics: DiagnosticsOptions) -> Rung0 | None:
    """Rung 0, when suspected label errors come from its out-of-fold heads (classification, asked for or auto)."""
    rung0 = getattr(result, "rung0", None)
    if prepared.task.task == "regression" or rung0 is None or rung0.oof_proba is None \
            or diagnostics.find_label_errors is False:
        return None
    return rung0


def _fine_tune_view(inputs: Inputs, plan: Plan, result: SearchResult, rung0: Rung0) -> tuple[np.ndarray | None, str]:
    """The best-scoring fine-tune's view of each train+validation row (`labelnoise.against_label`): its margins
    over its training (`training/margins.py`) on the train rows, those of its last validation pass on the scored
    validation rows, NaN elsewhere; and its trial id. (None, "") where no trial kept its margins, or where the best
    that did validated no better than rung 0's best head: a weaker model's view would dilute the heads' (a 4-report
    fine-tune of 8 px digits halved the planted flips found)."""
    from automl.diagnostics.labelnoise import against_label, label_margin
    from automl.search import kept

    best_dir, task = result.best_dir, inputs.task
    tr, va_all = inputs.split("train"), inputs.split("validation")
    heads = max((p.val_score for p in rung0.models), default=-np.inf)
    scores = {t: kept.model_score(best_dir, t) for t in (kept.scores(best_dir) if best_dir else {})}
    for tid in sorted(scores, key=lambda t: -(scores[t] or 0)):
        train = kept.margins(best_dir, tid, len(tr))
        if train is None:
            continue
        if (scores[tid] or -np.inf) <= heads:
            break
        val = np.full(len(va_all), np.nan)
        va = inputs.scored("validation", plan.val_rows)
        proba = kept.model_val_proba(best_dir, tid, task.y[va])
        if proba is not None:
            at = {r: i for i, r in enumerate(va_all)}
            val[[at[r] for r in va]] = label_margin(proba, task.y[va])
        return np.concatenate([against_label(train), against_label(val)]), tid
    return None, ""


def _wants_fitted_errors(prepared: Prepared, plan: Plan, result: SearchResult,
                         diagnostics: DiagnosticsOptions) -> bool:
    """Whether label errors need a cross-fit of the winner: rung 0 gave none, and they are forced or planned in."""
    return prepared.task.task != "regression" and _rung0_errors(prepared, result, diagnostics) is None and (
        diagnostics.find_label_errors is True or plan.label_errors)


def _cross_fits(prepared: Prepared, plan: Plan, result: SearchResult, diagnostics: DiagnosticsOptions) -> bool:
    """Whether diagnose will cross-fit the winner: for cross-validation, or for label errors rung 0 did not give
    (when forced, or when the plan made room for them; an "auto" one may still be skipped for time)."""
    return prepared.task.task != "regression" and (bool(diagnostics.cv_folds)
                                                   or _wants_fitted_errors(prepared, plan, result, diagnostics))


def _cross_fit_price(prepared: Prepared, plan: Plan, result: SearchResult, folds: int) -> float:
    n_train = len(prepared.task.splits["train"])
    return plan.cross_fit_price(result.trials, result.best_trial_id, n_train,
                                n_train + len(prepared.task.splits.get("validation", ())), folds)


def finalise(prepared: Prepared, plan: Plan, inputs: Inputs, result: SearchResult, budget: Budget, *,
             search: SearchOptions, resources: ResourceOptions, diagnostics: DiagnosticsOptions,
             output: OutputOptions) -> FinalModel:
    """The winner, as validated: retrained on train+validation for its full planned length with its own schedule
    (Ray Train), or, when the plan has no time for that, the winner's own best weights."""
    from automl.training.loop import build_encoder
    from automl.training.retrain import retrain

    n_train = len(prepared.task.splits["train"])
    # Evaluating and exporting come after: their time is held back from the retrain and the cross-fit (each stage
    # releases its own reserve when it starts).
    costs = Costs.load()
    budget.reserve("evaluate", costs["evaluate_s"])
    budget.reserve("diagnose", _cross_fit_price(prepared, plan, result, diagnostics.cv_folds or 2)
                   if _cross_fits(prepared, plan, result, diagnostics) else 0.0)
    budget.reserve("export", _export_reserve(prepared.task, output))
    # The plan's own price is the least a retrain can cost (Plan.retrain_price): where even that does not fit, no
    # kept trial is loaded to choose which config to retrain.
    why = no_retrain_reason(plan.retrain, search.retrain, plan.retrain_share(plan.retrain_s, budget.available()))
    if not why:
        config, decision, trial = _config_to_retrain(prepared, inputs, result, plan.val_rows)
        # Priced at the speed of the config it retrains (a costlier winner that does not beat the start point
        # beyond noise is not the one retrained), where that was slower than the start point the plan priced.
        retrain_s = plan.retrain_price(result.trials, trial, len(inputs.split("full")) / max(1, n_train))
        share = plan.retrain_share(retrain_s, budget.available())
        why = no_retrain_reason(plan.retrain, search.retrain, share)
    if why:
        return _best_weights(prepared, inputs, result, why, plan.val_rows, progress=output.progress,
                             deadline=budget.deadline())
    full = inputs.trial_data("full", None)
    config = _scaled(config, len(full.y_train), n_train)
    paced = (f" paced into the {budget.available():.0f} s the search left (~{share:.0%} of its ~{retrain_s:.0f} s "
             "price: its schedule compressed)" if share < 1 else "")
    if output.progress:
        say(f"best trial: val {prepared.metric} {result.best_score:.4f}" + (f"; {decision}" if decision else "")
            + f"; retraining the chosen config for its full {plan.reports} reports on {len(full.y_train)} rows with "
              f"Ray Train ({resources.retrain_workers} worker(s)){paced}")
    t0 = time.monotonic()
    storage = resources.storage_path or str(prepared.out / "ray_results")
    # Paced to end where the later stages' reserves begin (a retrain slower than its price shortens its schedule
    # instead of overrunning the budget; Ray Train's start-up is spent before the pace is first measured).
    model, spec, metrics = retrain(config, full, epochs=plan.reports, schedule_epochs=plan.reports,
                                   storage_path=storage, num_workers=resources.retrain_workers,
                                   use_gpu=bool(plan.resources.get("gpu")), cpus_per_worker=plan.retrain_cpus,
                                   deadline=budget.deadline(floor_s=MIN_PACED_S))
    # What the retrain took beyond its priced training is Ray Train's fixed cost on this machine: learn it (not from
    # a nominal speed's price, nor from a retrain paced into less than its price: neither measures it).
    if (plan.speed or {}).get("measured", True) and not paced:
        costs = Costs.load()
        costs.observe("ray_train_startup_s", max(1.0, time.monotonic() - t0 - (retrain_s - plan.retrain_fixed_s)))
    return FinalModel(model, build_encoder(config, model, spec), spec, config,
                      {"how": "retrain", "epochs": plan.reports, "schedule_epochs": plan.reports,
                       "workers": resources.retrain_workers, "time_s": time.monotonic() - t0,
                       "rows": int(len(full.y_train)), "nodes": metrics.get("nodes"),
                       "weight_sums": metrics.get("weight_sums"), "decision": decision, "trials": [trial],
                       "price_s": round(retrain_s, 1), "paced": bool(paced)})


def no_retrain_reason(planned: bool, option: bool | str, share: float) -> str | None:
    """Why the winner is not retrained on train+validation (None: it is). planned: the plan held time for a
    retrain; option: SearchOptions.retrain (True forces it, paced into what is left); share: the share of its
    training the time left holds (Plan.retrain_share)."""
    if option is False:
        return "retrain=False"
    if not planned:
        return "the plan had no time for a retrain"
    if option == "auto" and share < MIN_RETRAIN_SHARE:
        return (f"the search left no time for a retrain (room for {share:.0%} of its training; a retrain is paced "
                f"down to {MIN_RETRAIN_SHARE:.0%} at most)")
    return None


def _config_to_retrain(prepared: Prepared, inputs: Inputs, result: SearchResult,
                       val_rows: int | None = None) -> tuple[dict, str, str]:
    """The winner's config, unless it does not beat the start point by more than validation noise: then the
    start point's (training/combine.py). Returns (config, why, the trial id whose config it is)."""
    from automl.training.combine import combine, start_reference, top_trials

    task, metric = prepared.task, prepared.metric
    tuned = result.trials[result.trials.get("rung", 2) != 0] if "rung" in result.trials else result.trials
    ref = start_reference(tuned, result.best_dir, metric) if task.task != "regression" else None
    top = top_trials(tuned, result.best_dir, metric, k=1)
    if ref is None or not top or top[0][0] == ref[0]:
        return full_config(result.best_config), "", str(result.best_trial_id)
    va = inputs.scored("validation", val_rows)
    x_val = inputs.rows(va)
    c = combine(top, result.best_dir, task.num_classes, task.y[va], metric, lambda cfg: x_val, reference=ref,
                kinds=("single",))
    return full_config(c.config), c.decision, c.trial_ids[0]


def _best_weights(prepared: Prepared, inputs: Inputs, result: SearchResult, why: str,
                  val_rows: int | None = None, *, progress: bool, deadline: float | None = None) -> FinalModel:
    """The winner's own best weights, or a soup or an ensemble of the top trials when that scores better on
    validation (training/combine.py). progress: the progress option (OutputOptions.progress); deadline: what
    the soup's validation passes must end by (time.time())."""
    from automl.models.ensemble import ensemble_spec
    from automl.training.combine import combine, start_reference, top_trials
    from automl.training.loop import build_encoder, load_best

    from automl.search.ladder import doubtful

    task, metric = prepared.task, prepared.metric
    regression = task.task == "regression"
    ref = start_reference(result.trials, result.best_dir, metric) if not regression else None
    rung0 = getattr(result, "rung0", None)
    left_out = doubtful(rung0, ref[2]) if ref is not None else {}
    trials = result.trials[~result.trials["trial_id"].astype(str).isin(left_out)]
    top = top_trials(trials, result.best_dir, metric) if not regression else []
    if top:
        va = inputs.scored("validation", val_rows)  # the rows the trials scored on (plan.val_rows)
        x_val = inputs.rows(va)
        c = combine(top, result.best_dir, task.num_classes, task.y[va], metric, lambda cfg: x_val, reference=ref,
                    pool=rung0.pool(task.y[va]) if rung0 is not None else None, deadline=deadline)
        if left_out:
            c.decision += ("; rung-0 heads left out (cross-validated on train+validation below the start point's "
                           f"validation {metric} {ref[2]:.4f}): " + ", ".join(
                               f"{p.backbone} {p.cv_score:.4f} (val {p.val_score:.4f})" for p in left_out.values()))
        spec = ensemble_spec(c.members) if c.kind == "ensemble" else c.spec
        training = {"how": "checkpoint" if c.kind in ("single", "start point") else c.kind, "reason": why,
                    "trials": c.trial_ids, "val_scores": c.scores, "decision": c.decision}
        if progress:
            say(f"final model: {c.kind} of {len(c.trial_ids)} trial(s), val {metric} {c.val_score:.4f} "
                f"(options scored: {', '.join(f'{k} {v:.4f}' for k, v in c.scores.items())}); {why}"
                + (f"; {c.decision}" if c.decision else ""))
        return FinalModel(c.model, c.encoder, spec, c.config, training)
    config = full_config(result.best_config)
    model, spec = load_best(config, task.num_classes, result.best_weights)
    if progress:
        say(f"best trial: val {metric} {result.best_score:.4f} at report {result.best_epoch}; exporting its own "
            f"weights ({why})")
    return FinalModel(model, build_encoder(config, model, spec), spec, config,
                      {"how": "checkpoint", "report": result.best_epoch, "reason": why,
                       "trials": [result.best_trial_id]})


# ---------------------------------------------------------------------------- evaluate

def evaluate(prepared: Prepared, inputs: Inputs, final: FinalModel, budget: Budget | None = None, *,
             output: OutputOptions | None = None) -> dict:
    """Score the final model once on the held-out test split (on this process's device, model and inputs alike).

    budget: where scoring the whole split would end past the time left before the later stages' reserves (an
    ensemble scores each member; a large split), a stratified sample of it that fits is scored instead, never
    fewer than MIN_TEST_ROWS rows; the metrics then say so under "test_rows"."""
    from automl.training.loop import encode_inputs, evaluate as score

    task = prepared.task
    if output is not None and budget is not None:
        # Now known, before the test and the cross-fit take their time: an ensemble's every member is exported.
        budget.reserve("export", _export_reserve(task, output, final.model))
    te, sampled = _test_rows_that_fit(final, inputs, budget)
    metrics = score(final.model, final.encoder, encode_inputs(final.encoder, inputs.rows(te)), task.y[te],
                    task.num_classes, device(), detailed=True, target_scale=inputs.target_scale,
                    keep_scores=task.groups is not None)
    if sampled:
        metrics["test_rows"] = sampled
    if task.groups is not None:
        metrics["groups"] = group_metrics(task.y[te], metrics.pop("scores"), task.groups[te], prepared.metric,
                                          task.num_classes, task.groups_column, task.task == "regression")
    return metrics


# A sample of the split's rows prices a row of the final model (search/plan.py's TEST_SHARE and MIN_TEST_ROWS: a
# test sample below that says too little, a macro-F1 on a few rows of a rare class, so it is scored past the budget).
TIMED_TEST_ROWS = 64


def _test_rows_that_fit(final: FinalModel, inputs: Inputs, budget: Budget | None) -> tuple[np.ndarray, dict | None]:
    """The test rows to score: all of them, or a stratified sample that ends within the budget (and why)."""
    from automl.data.encoders import predict_logits
    from automl.training.loop import encode_inputs

    te = inputs.split("test")
    if budget is None or budget.total_s is None or len(te) <= MIN_TEST_ROWS:
        return te, None
    timed = inputs.scored("test", TIMED_TEST_ROWS)
    t0 = time.monotonic()
    predict_logits(final.model, final.encoder, encode_inputs(final.encoder, inputs.rows(timed)), device())
    per_row = (time.monotonic() - t0) / max(1, len(timed))
    fits = int(budget.available() / max(per_row, 1e-9))
    if fits >= len(te):
        return te, None
    rows = inputs.scored("test", max(MIN_TEST_ROWS, fits))
    return rows, {"scored": int(len(rows)), "of": int(len(te)),
                  "why": f"scoring all {len(te)} would have taken ~{per_row * len(te):.0f} s "
                         f"({per_row * 1000:.1f} ms a row), past the time budget"}


# ---------------------------------------------------------------------------- diagnose

def diagnose(prepared: Prepared, plan: Plan, inputs: Inputs, result: SearchResult, final: FinalModel,
             budget: Budget, *, search: SearchOptions, diagnostics: DiagnosticsOptions, update: UpdateOptions,
             output: OutputOptions) -> Diagnostics:
    """Suspected label errors and cross-validation (a cross-fit of the winner), and the update comparison."""
    from automl.diagnostics.labelnoise import cv_summary, out_of_fold_proba, summary, suspects
    from automl.diagnostics.update import compare_with_base

    task, out = prepared.task, Diagnostics()
    regression = task.task == "regression"
    full = inputs.split("full")
    oof = _rung0_errors(prepared, result, diagnostics)
    if oof is not None:
        # Rung 0's heads, refitted on 5 folds of train+validation: out-of-fold probabilities for seconds.
        rows = task.row_index[full] if task.row_index is not None else full
        fine, fine_trial = _fine_tune_view(inputs, plan, result, oof)
        out.label_errors = suspects(oof.oof_proba, task.y[full], prepared.classes, rows, fine=fine)
        out.label_error_summary = summary(out.label_errors, len(full), oof.oof_folds)
        out.label_error_summary["model"] = (f"rung 0: the mean of {len(oof.oof_backbones)} logistic regression "
                                            f"head(s) on frozen features ({', '.join(oof.oof_backbones)})")
        if fine_trial:
            out.label_error_summary["ranked_with"] = (f"trial {fine_trial}'s margins (over its training on the "
                                                      "train rows, on its last validation pass for the others)")
    want = _wants_fitted_errors(prepared, plan, result, diagnostics)
    folds = diagnostics.cv_folds or 2
    price = _cross_fit_price(prepared, plan, result, folds) if _cross_fits(prepared, plan, result, diagnostics) \
        else 0.0
    if diagnostics.find_label_errors == "auto" and want and not budget.can_afford(price):
        want = False
        out.notes.append(f"suspected-label-error search skipped: ~{price:.0f} s needed, "
                         f"{max(budget.available(), 0):.0f} s of the time budget left "
                         "(pass find_label_errors=True to force)")
    elif diagnostics.find_label_errors == "auto" and not plan.label_errors and not regression \
            and out.label_errors is None:
        out.notes.append("suspected-label-error search skipped: the plan gave its time to the search "
                         "(pass find_label_errors=True to force)")
    if not regression and (want or diagnostics.cv_folds):
        if output.progress:
            say(f"cross-fitting {folds} folds to {'cross-validate and ' if diagnostics.cv_folds else ''}"
                "find suspected label errors")
        fold_rows = len(full) * (folds - 1) // folds
        config = _scaled(full_config(result.best_config), fold_rows, len(task.splits["train"]))
        # On one CPU node the folds train here, one after another on all its cores: a Ray task per fold would
        # start a worker process and import torch first (3-8 s of a 60 s budget on 2 loaded cores).
        here = cluster.ClusterInfo.current()
        local = here.nodes == here.max_nodes == 1 and not plan.resources.get("gpu")
        proba, fold_of = out_of_fold_proba(config, inputs.rows(full), task.y[full], task.num_classes,
                                           epochs=plan.reports, schedule_epochs=plan.reports, modality=task.modality,
                                           seed=search.seed, folds=folds, return_folds=True,
                                           gpus=float(plan.resources.get("gpu") or 0), use_ray=not local,
                                           threads=int(here.node_cpus),
                                           deadline=budget.deadline(floor_s=MIN_PACED_S))  # forced ones too: paced to the export
        if want:
            rows = task.row_index[full] if task.row_index is not None else full
            out.label_errors = suspects(proba, task.y[full], prepared.classes, rows)
            # The folds actually used: fewer where a class has fewer rows than the folds asked for.
            out.label_error_summary = summary(out.label_errors, len(full), len(np.unique(fold_of)))
        if diagnostics.cv_folds:
            out.cross_validation = cv_summary(proba, task.y[full], fold_of, task.num_classes)
    if prepared.base is not None:
        te = inputs.split("test")
        labels = [float(v) for v in task.y[te]] if regression else [prepared.classes[i] for i in task.y[te]]
        out.update = compare_with_base(prepared.base.path, final.model, final.encoder, prepared.classes,
                                       inputs.pick(te), labels, prepared.metric, update.promote_tolerance,
                                       task.modality, target_scale=inputs.target_scale)
    return out


# ---------------------------------------------------------------------------- export

def _members(model) -> int:
    """How many models an export holds (an ensemble's members are each exported and checked)."""
    return len(getattr(model, "members", None) or [model])


def _export_reserve(task: TaskData, output: OutputOptions, model=None) -> float:
    """The time held back for the export: this machine's learned cost of exporting one model, times the members of
    `model` where it is an ensemble (each is exported and parity-checked); nothing without export formats."""
    if not output.export_formats:
        return 0.0
    return Costs.load()[f"export_{task.modality}_s"] * (_members(model) if model is not None else 1)


def export(prepared: Prepared, plan: Plan, inputs: Inputs, result: SearchResult, final: FinalModel,
           test_metrics: dict, diagnostics: Diagnostics, budget: Budget, *, search: SearchOptions,
           output: OutputOptions) -> FinetunedModel:
    """Write the export atomically (weights, manifest, ONNX/TorchScript, card, tables) and return the model."""
    from automl.diagnostics.update import save_test_split
    from automl.export.assemble import manifest_for
    from automl.export.card import write_card
    from automl.export.writer import write_export

    cluster.release()  # no compute is left to do: the cluster may scale down
    task = prepared.task
    task.report.notes.extend(diagnostics.notes)
    trials = result.trials
    manifest = manifest_for(task, final, result, plan, classes=prepared.classes, metric=prepared.metric,
                            storage_size=inputs.storage_size, target_scale=inputs.target_scale,
                            test_metrics=test_metrics, diagnostics=diagnostics, seed=search.seed,
                            base_model=prepared.base.path if prepared.base else None)
    te = inputs.split("test")
    writers = [lambda d, m: write_card(d, m, trials, result.history)]
    if output.keep_test_split:
        writers.insert(0, lambda d, m: setattr(m, "test_split", save_test_split(
            d, task.modality, inputs.pick(te), task.y[te], manifest.classes)))
    tables = {"trials.csv": trials, "metrics.json": manifest.test_metrics, "data_report.json": task.report.to_dict()}
    if diagnostics.label_errors is not None:
        tables["suspected_label_errors.csv"] = diagnostics.label_errors
    export_dir = prepared.out / "model"
    if output.progress:
        say(f"exporting to {export_dir}")
    manifest.provenance.wall_time_s = budget.elapsed()
    manifest.budget = budget.to_dict()
    t0 = time.monotonic()
    write_export(export_dir, final.model, final.encoder, manifest, tables=tables, formats=output.export_formats,
                 writers=writers)
    if output.export_formats:  # the next plan reserves what exporting took here (a member's share)
        Costs.load().observe(f"export_{task.modality}_s", (time.monotonic() - t0) / _members(final.model))
    fm = FinetunedModel(final.model, final.encoder, ExportManifest.read(export_dir), export_dir=export_dir,
                        trials=trials, search=result)
    fm.label_errors = diagnostics.label_errors
    return fm
