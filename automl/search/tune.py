"""The search controller: Ray Tune with Optuna proposing configs and ASHA stopping bad trials."""
from __future__ import annotations

import math
import os
import shutil
import time
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from automl.data.intake import plain
from automl.runtime import quiet_libraries, set_threads
from automl.search.space import SearchSpace
from automl.data.trial_data import TrialData
from automl.training.loop import fit

STATE_FILE = "state.pt"


# A trial checkpoints when this long has passed since its last checkpoint, and at least 20x the time the last
# one took: a crash loses at most that much of one trial, and writing checkpoints costs at most ~5% of training.
CHECKPOINT_EVERY_S = 10.0


def tune_trainable(config: dict, data: TrialData = None, max_epochs: int = 1, threads: int = 1,
                   checkpoint: bool = True, checkpoint_every_s: float = CHECKPOINT_EVERY_S) -> None:
    """Ray Tune function trainable: `fit` with a report per epoch and periodic checkpoints, resumable."""
    from ray import tune

    quiet_libraries()
    set_threads(threads)
    resume = None
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            resume = torch.load(os.path.join(d, STATE_FILE), weights_only=True)

    crash = str(config.get("_crash_once_after_epoch") or "")
    clock = {"last": time.monotonic(), "cost": 0.0}

    def report(metrics, state_fn):
        now = time.monotonic()
        due = checkpoint_every_s <= 0 or now - clock["last"] >= max(checkpoint_every_s, 20 * clock["cost"])
        # The last epoch needs none: a finished trial is not resumed.
        if not checkpoint or not due or metrics["epoch"] >= max_epochs:
            tune.report(metrics)
        else:
            with tempfile.TemporaryDirectory() as d:
                torch.save(state_fn(), os.path.join(d, STATE_FILE))
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
            clock["last"] = time.monotonic()
            clock["cost"] = clock["last"] - now
        if crash:
            # Fault injection for tests: the worker process dies once, right after this epoch's checkpoint.
            epoch, marker = crash.split(":", 1)
            if metrics["epoch"] == int(epoch) and not os.path.exists(marker):
                open(marker, "w").close()
                os._exit(1)

    fit(config, data, epochs=max_epochs, report=report, resume=resume)


class CheckpointJanitor(Callback):
    """Keeps checkpoint disk bounded and tracks the experiment directory's peak size.

    A finished trial's checkpoints are deleted (the winner is retrained from
    scratch, so only running trials need theirs), but only once Tune's
    experiment state on disk records the trial as finished: a driver killed
    before that would otherwise resume the trial with its checkpoint gone.
    """

    def __init__(self, exp_path: str):
        self.exp_path = exp_path
        self.peak_bytes = 0
        self.pending: dict[str, tuple[float, str]] = {}
        self.last_visit = 0.0

    def _measure(self) -> None:
        total = 0
        for root, _, files in os.walk(self.exp_path):
            for f in files:
                try:
                    total += os.path.getsize(os.path.join(root, f))
                except OSError:
                    pass
        self.peak_bytes = max(self.peak_bytes, total)

    @staticmethod
    def _prune_dir(path: str | Path) -> None:
        for ckpt in Path(path).glob("checkpoint_*"):
            shutil.rmtree(ckpt, ignore_errors=True)

    def _prune_recorded(self) -> None:
        states = sorted(Path(self.exp_path).glob("experiment_state-*.json"))
        if not states:
            return
        # The current session's state is the one with the latest session time in its name (after a resume,
        # Tune re-syncs the old session's file, which bumps its mtime).
        saved_at = states[-1].stat().st_mtime
        for tid, (finished_at, path) in list(self.pending.items()):
            if saved_at > finished_at + 1.0:
                self._prune_dir(path)
                del self.pending[tid]
        # Running trials: the saved state references at most the newest checkpoint written before it;
        # every older one can go. (Ray's own num_to_keep deletes before the state moves on.)
        for trial_dir in Path(self.exp_path).glob("trial_*"):
            ckpts = sorted(trial_dir.glob("checkpoint_*"))
            covered = [c for c in ckpts if c.stat().st_mtime < saved_at - 1.0]
            for old in covered[:-1]:
                shutil.rmtree(old, ignore_errors=True)

    def prune_all(self) -> None:
        """After the search every trial is finished: no checkpoint is needed any more."""
        for trial_dir in Path(self.exp_path).glob("trial_*"):
            self._prune_dir(trial_dir)

    def _visit(self) -> None:
        # Walking every trial directory on every result would cost O(trials) per result. Disk only
        # grows between visits (only this callback deletes) and each visit measures before it prunes,
        # so visiting every 2 s loses no peak; Tune's saved state, which pruning waits for, moves slower.
        now = time.monotonic()
        if now - self.last_visit < 2.0:
            return
        self.last_visit = now
        self._measure()
        self._prune_recorded()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._visit()

    def on_trial_complete(self, iteration, trials, trial, **info):
        path = getattr(trial, "local_path", None) or getattr(trial, "path", None)
        if path:
            self.pending[trial.trial_id] = (time.time(), path)
        self._visit()


def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


ASHA_LOG = "asha_stopped.txt"


class RecordingASHA(ASHAScheduler):
    """ASHA that appends the trials it stops to a file, so the trial table can tell
    "stopped by ASHA" from "cut by the time budget" (also across a resume)."""

    def __init__(self, log_path: str, **kwargs):
        super().__init__(**kwargs)
        self.log_path = log_path

    def on_trial_result(self, tune_controller, trial, result):
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision == TrialScheduler.STOP and result.get(self._time_attr, 0) < self._max_t:
            with open(self.log_path, "a") as f:
                f.write(trial.trial_id + "\n")
        return decision


def experiment_name(out: Path, resume: bool) -> str:
    """A fresh experiment name, or with resume=True the one of the last search in `out` (its LATEST_SEARCH)."""
    marker = out / "LATEST_SEARCH"
    if resume and marker.exists():
        return marker.read_text().strip()
    name = "search_" + time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(name)
    return name


@dataclass
class SearchResult:
    trials: pd.DataFrame        # one row per trial
    best_config: dict
    best_epoch: int
    best_score: float
    metric: str
    experiment_path: str
    history: dict               # trial_id -> list of per-epoch metric dicts
    peak_disk_mb: float = 0.0   # largest size of the experiment directory during the search
    transferability: dict | None = None   # LogME pre-ranking of the backbones, when it ran


def _searchable_point(space: SearchSpace, point: dict) -> dict:
    return {k: v for k, v in space.active_config(point).items() if k in space.searchable()}


def run_search(data: TrialData, space: SearchSpace, *, metric: str, storage_path: str, name: str,
               time_budget_s: float | None, max_trials: int | None, seed: int = 0, resources: dict,
               concurrency: int, resume: bool = False, progress: bool = True, checkpoint: bool = True,
               start_points: list[dict] | None = None, local_dir: str | None = None,
               sampler: str = "tpe", early_stopping: bool = True,
               checkpoint_every_s: float = CHECKPOINT_EVERY_S) -> SearchResult:
    """Run the search; returns the trial table and the winner (config + epoch of its peak).

    checkpoint_every_s: least time between a trial's checkpoints (0: after every epoch).
    """
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from automl.search.progress import SearchProgress

    if time_budget_s is None and not max_trials:
        raise ValueError("Give time_budget_s or max_trials: without either the search never ends.")
    val_metric = f"val_{metric}"
    # Persist Tune's experiment state often: it is what a resume after a killed driver starts from.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "10")
    threads = max(1, int(resources.get("cpu", 1)))
    trainable = tune.with_resources(
        tune.with_parameters(tune_trainable, data=data, max_epochs=space.max_epochs, threads=threads,
                             checkpoint=checkpoint, checkpoint_every_s=checkpoint_every_s),
        resources)
    remote = is_uri(storage_path)
    storage = storage_path.rstrip("/") if remote else str(Path(storage_path).resolve())
    exp_path = f"{storage}/{name}"
    # Driver-side bookkeeping (ASHA's decisions) stays on local disk even when results go to a URI.
    local = Path(local_dir or (exp_path if not remote else tempfile.mkdtemp()))
    local.mkdir(parents=True, exist_ok=True)
    asha_log = str(local / (ASHA_LOG if not local_dir else f"{name}_{ASHA_LOG}"))
    progress_cb = SearchProgress(metric, space.max_epochs, time_budget_s, enabled=progress)
    # Pruning walks the experiment dir, so it runs only for local/shared-filesystem storage.
    janitor = CheckpointJanitor(exp_path) if not remote else None
    try:
        if resume and tune.Tuner.can_restore(exp_path):
            tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_errored=True)
        else:
            points = [_searchable_point(space, p) for p in (start_points if start_points is not None else space.start_points)]
            from ray.tune.schedulers import FIFOScheduler

            # sampler="random" and early_stopping=False give the baselines the benchmarks compare against.
            searcher = OptunaSearch(space, metric=val_metric, mode="max", points_to_evaluate=points or None,
                                    sampler=_sampler(sampler, seed))
            scheduler = RecordingASHA(asha_log, time_attr="training_iteration", max_t=space.max_epochs,
                                      grace_period=min(space.grace_period, space.max_epochs),
                                      reduction_factor=space.reduction_factor) if early_stopping else FIFOScheduler()
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(
                    metric=val_metric, mode="max", search_alg=searcher, scheduler=scheduler,
                    num_samples=max_trials or -1, time_budget_s=time_budget_s,
                    max_concurrent_trials=concurrency, reuse_actors=True, trial_dirname_creator=trial_dirname),
                run_config=tune.RunConfig(
                    name=name, storage_path=storage, verbose=0,
                    callbacks=[progress_cb] + ([janitor] if janitor else []),
                    # Locally Ray keeps every checkpoint and CheckpointJanitor deletes them once it is safe;
                    # on remote storage Ray keeps the last two (the saved state may lag one behind).
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=None if janitor else 2),
                    failure_config=tune.FailureConfig(max_failures=1),
                    # Copy the experiment state to storage_path every few seconds: it is what a resume after
                    # a killed driver starts from (Ray's default is every 5 minutes).
                    sync_config=tune.SyncConfig(sync_period=5)),
            )
        grid = tuner.fit()
    finally:
        progress_cb.close()
    result = summarize(grid, space, metric, exp_path, asha_log)
    if janitor:
        janitor._measure()
        janitor.prune_all()
        result.peak_disk_mb = janitor.peak_bytes / 2**20
    return result


# Random proposals before TPE takes over (Optuna's default is 10): CPU budgets often allow only 10-30 trials.
TPE_STARTUP_TRIALS = 6


def _sampler(kind: str, seed: int):
    """Optuna sampler: multivariate TPE (models how parameters interact; `group` handles the conditional ones)
    with a constant liar so concurrent trials do not all get the same proposal; or random, as a baseline."""
    import warnings

    import optuna

    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=TPE_STARTUP_TRIALS, multivariate=True,
                                          group=True, constant_liar=True)


def is_uri(path: str) -> bool:
    return "://" in str(path)


def summarize(grid, space: SearchSpace, metric: str, exp_path: str, asha_log: str) -> SearchResult:
    val_metric = f"val_{metric}"
    rows, history = [], {}
    log = Path(asha_log)
    asha_stopped = set(log.read_text().split()) if log.exists() else set()
    for res in grid:
        df = res.metrics_dataframe
        trial_id = (res.metrics or {}).get("trial_id") or Path(res.path).name.replace("trial_", "")
        cfg = {k: v for k, v in space.active_config(res.config or {}).items() if not k.startswith("_")}
        row = {"trial_id": trial_id, **{f"config/{k}": v for k, v in cfg.items()}}
        if df is not None and len(df) and val_metric in df:
            best_i = int(df[val_metric].to_numpy().argmax())
            epochs = int(df["training_iteration"].max())
            row.update({f"best_{val_metric}": float(df[val_metric].iloc[best_i]),
                        "best_epoch": int(df["training_iteration"].iloc[best_i]),
                        "best_val_loss": float(df["val_loss"].iloc[best_i]) if "val_loss" in df else math.nan,
                        "epochs_run": epochs,
                        "time_s": float(df["time_total_s"].max()) if "time_total_s" in df else math.nan})
            history[trial_id] = df.filter(regex="^(training_iteration|val_|train_loss|lr|timestamp|epoch_time_s)").to_dict("records")
        else:
            row.update({f"best_{val_metric}": math.nan, "best_epoch": 0, "best_val_loss": math.nan,
                        "epochs_run": 0, "time_s": math.nan})
        if res.error is not None:
            row["status"] = "ERROR"
            row["error"] = str(res.error).strip().splitlines()[-1][:300] if str(res.error).strip() else type(res.error).__name__
        elif trial_id in asha_stopped:
            row["status"] = "STOPPED_EARLY"
        elif row["epochs_run"] == 0:
            row["status"] = "NOT_STARTED"  # the time budget ended before its first epoch
        elif row["epochs_run"] < space.max_epochs:
            row["status"] = "CUT_BY_BUDGET"
        else:
            row["status"] = "COMPLETED"
        rows.append(row)
    trials = pd.DataFrame(rows)
    ok = trials[trials[f"best_{val_metric}"].notna()] if len(trials) else trials
    if not len(ok):
        errors = "; ".join(sorted(set(trials.get("error", pd.Series(dtype=str)).dropna().astype(str))))[:1000]
        raise RuntimeError(f"No trial produced a validation score ({len(trials)} trials). Errors: {errors or 'none'}. "
                           "Fix: check the backbones can be loaded, or give the search more time.")
    # Best score first; among ties, lower validation loss, then fewer epochs (cheaper retrain).
    ranked = ok.sort_values([f"best_{val_metric}", "best_val_loss", "best_epoch"], ascending=[False, True, True])
    best = ranked.iloc[0]
    trials = trials.sort_values(f"best_{val_metric}", ascending=False, na_position="last").reset_index(drop=True)
    best_cfg = {k[len("config/"):]: plain(v) for k, v in best.items()
                if k.startswith("config/") and not (isinstance(v, float) and math.isnan(v))}
    return SearchResult(trials=trials, best_config=best_cfg, best_epoch=int(best["best_epoch"]),
                        best_score=float(best[f"best_{val_metric}"]), metric=metric,
                        experiment_path=exp_path, history=history)
