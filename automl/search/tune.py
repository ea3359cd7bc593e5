"""The search controller: Ray Tune with Optuna proposing configs and ASHA stopping bad trials."""
from __future__ import annotations

import math
import os
import shutil
import signal
import threading
import time
import tempfile
import uuid
from dataclasses import dataclass
from typing import Any
from pathlib import Path

import pandas as pd
import torch
from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search import ConcurrencyLimiter, SearchGenerator
from ray.tune.search.optuna import OptunaSearch

from automl.data.intake import plain
from automl.errors import NoTrialScored, RunInterrupted
from automl.plugins import snapshot
from automl.runtime import quiet_libraries, set_threads, sigint_kept
from automl.search import kept
from automl.search.clock import (NOTE_DRIFT, Paces, SearchLimits, cheapest_trial_s, fits, fitted_length, read_drift,
                                 repriced_path)
from automl.search.space import SearchSpace
from automl.data.trial_data import TrialData
from automl.training.loop import fit

STATE_FILE = "state.pt"


# A trial checkpoints when this long has passed since its last checkpoint, and at least 20x the time the last
# one took: a crash loses at most that much of one trial, and writing checkpoints costs at most ~5% of training.
CHECKPOINT_EVERY_S = 10.0


def checkpoint_due(since_last_s: float, last_cost_s: float, every_s: float = CHECKPOINT_EVERY_S) -> bool:
    """Checkpoint when `every_s` have passed since the last one and at least 20x the time it took: a crash loses
    at most that much of a trial, and writing checkpoints takes at most ~5% of its time (every_s=0: always)."""
    return every_s <= 0 or since_last_s >= max(every_s, 20 * last_cost_s)


def node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def sync_period_s() -> float:
    """How often Tune's experiment state reaches storage (AUTOML_SYNC_PERIOD_S; 5 s by default). A finished
    trial's checkpoints are pruned only after that, so a shorter period frees disk sooner."""
    return float(os.environ.get("AUTOML_SYNC_PERIOD_S", "5"))


def tune_trainable(config: dict, data: TrialData = None, max_epochs: int = 1, threads: int = 1,
                   checkpoint: bool = True, checkpoint_every_s: float = CHECKPOINT_EVERY_S,
                   metric: str | None = None, best_dir: str | None = None, plugins: dict | None = None,
                   init_heads: dict | None = None, search_end: float | None = None) -> None:
    """Ray Tune function trainable: `fit` with a report per epoch and periodic checkpoints, resumable.

    With `best_dir`, the weights of the trial's best report so far (by `metric`) are kept there, so the
    winner can be exported (or souped) without training it again. init_heads: backbone -> its rung-0 head
    (search/ladder.py), which a fresh trial of that backbone starts from (LP-FT).
    """
    from ray import tune

    from safetensors.torch import load_file

    from automl.plugins import install

    quiet_libraries()
    set_threads(threads)
    install(plugins)
    resume = None
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            resume = torch.load(os.path.join(d, STATE_FILE), weights_only=True)

    crash = str(config.get("_crash_once_after_epoch") or "")
    clock = {"last": time.monotonic(), "cost": 0.0}
    trial_id = tune.get_context().get_trial_id()
    node = node_id()

    def report(metrics, state_fn):
        metrics["node_id"] = node
        score = metrics.get(metric) if metric else None
        entry = kept.read(best_dir, trial_id) if best_dir else None
        snaps = (entry or {}).get("snapshots", [])
        # Among the trial's best few reports (of equal scores the later one: trained longer)?
        among_best = len(snaps) < kept.SNAPSHOTS or (score is not None and score >= min(s["score"] for s in snaps))
        last = metrics["epoch"] >= max_epochs  # the end of its schedule: its model
        if best_dir and score is not None and (among_best or last):
            st = state_fn(weights_only=True)  # the weights and the validation pass that scored them, taken once
            if among_best:
                kept.keep(best_dir, trial_id, st["model"], score, int(metrics["epoch"]), val=st.get("val"))
            if last:
                kept.keep_final(best_dir, trial_id, st["model"], score, int(metrics["epoch"]), val=st.get("val"))
            kept.keep_margins(best_dir, trial_id, st.get("margins"))  # its training so far (label errors rank by it)
        now = time.monotonic()
        due = checkpoint_due(now - clock["last"], clock["cost"], checkpoint_every_s)
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
            # Fault injection for tests: the first trial of the search to finish this epoch dies once, right after its
            # checkpoint, and names itself in the marker (created exclusively: one crash, however many trials run).
            epoch, marker = crash.split(":", 1)
            if metrics["epoch"] == int(epoch):
                try:
                    with open(marker, "x") as f:
                        f.write(trial_id)
                except FileExistsError:
                    return
                os._exit(1)

    # The search's end (set by the searcher): a trial running late compresses the rest of its schedule to end by it.
    # LP-FT where the config asks for it (`init: probe`): a searched choice, not the start point's (measured at
    # 300 s, start points fine-tuned from their probe lost 2-8 points against the same config from a zero head).
    head = (init_heads or {}).get(config.get("backbone")) if resume is None and config.get("init") == "probe" else None
    # This search's end, not the one in the config: a trial restored from an interrupted search carries that
    # search's end (too early, or past), and would squeeze or drop its schedule's end.
    deadline = search_end if search_end is not None else config.get("_deadline")
    fit(config, data, epochs=max_epochs, report=report, resume=resume, deadline=deadline,
        initial_state=load_file(head) if head else None, max_report_rows=config.get("_stretch_rows"))


class CheckpointJanitor(Callback):
    """Keeps checkpoint disk bounded and tracks the experiment directory's peak size.

    A finished trial's checkpoints are deleted (the winner is retrained from
    scratch, so only running trials need theirs), but only once Tune's
    experiment state on disk records the trial as finished: a driver killed
    before that would otherwise resume the trial with its checkpoint gone.
    """

    def __init__(self, exp_path: str, keep_best: int = 5, start_file: str | None = None):
        self.exp_path = exp_path
        self.keep_best = keep_best
        self.start_file = start_file  # the start points' trial ids: their weights are the reference, always kept
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

    def _prune_best(self, trials) -> None:
        """Kept weights of finished trials outside the top `keep_best` are not needed (the start points, the winner,
        a soup or an ensemble of the top trials is all that is built from them)."""
        best = str(Path(self.exp_path) / "best")
        running = {t.trial_id for t in trials if t.status in ("RUNNING", "PENDING", "PAUSED")}
        starts = set(Path(self.start_file).read_text().split()) if self.start_file and Path(self.start_file).exists() \
            else set()
        ranked = sorted(kept.scores(best).items(), key=lambda kv: kv[1], reverse=True)
        for tid, _ in ranked[self.keep_best:]:
            if tid not in running and tid not in starts:
                kept.drop(best, tid)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._prune_best(trials)
        # The trial's folder in storage (local_path is the driver's staging copy, not where checkpoints live).
        path = getattr(trial, "path", None) or getattr(trial, "local_path", None)
        if path:
            self.pending[trial.trial_id] = (time.time(), path)
        self._visit()


def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


ASHA_LOG = "asha_stopped.txt"


class RecordingASHA(ASHAScheduler):
    """ASHA that never stops the first `protected` trials (the space's start points: the search must not lose
    its own sensible default), and appends the trials it stops to a file, so the trial table can tell
    "stopped by ASHA" from "cut by the time budget" (also across a resume)."""

    def __init__(self, log_path: str, protected: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.log_path = log_path
        self.protected = protected
        self.protected_ids: set[str] = set()
        self.added = 0

    def on_trial_add(self, tune_controller, trial):
        super().on_trial_add(tune_controller, trial)
        if self.added < self.protected:  # start points are suggested first
            self.protected_ids.add(trial.trial_id)
            with open(self.log_path + ".start", "a") as f:
                f.write(trial.trial_id + "\n")
        self.added += 1

    def on_trial_result(self, tune_controller, trial, result):
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision == TrialScheduler.STOP and trial.trial_id in self.protected_ids \
                and result.get(self._time_attr, 0) < self._max_t:
            return TrialScheduler.CONTINUE  # the start point always trains to full length
        if decision == TrialScheduler.STOP and result.get(self._time_attr, 0) < self._max_t:
            with open(self.log_path, "a") as f:
                f.write(trial.trial_id + "\n")
        return decision


def _price(clock: dict, config: dict) -> float | None:
    """A full-length trial of the config's kind as `clock` (write_deadlines) prices it: its backbone's own price
    where the plan priced it as itself (search/plan.price_kinds), else the start point's."""
    kind = (clock.get("kinds") or {}).get(str(config.get("backbone")))
    return kind["trial_s"] if kind else clock.get("trial_s")


class DeadlineOptunaSearch(OptunaSearch):
    """Optuna's proposals, but no trial starts after the last start time in `deadline_file` (a trial started then
    could not train a useful schedule before the budget ends), and a trial started when its full length no longer
    fits trains a shortened schedule that does (`fitted_rows`). The times live in a file, not in this (pickled)
    searcher, so a resumed search gets fresh ones. A config of a class its trials have timed (a backbone training so
    many layers) is priced at their measured pace, not the plan's (clock.Paces)."""

    def __init__(self, space=None, *args, deadline_file: str | None = None, **kwargs):
        super().__init__(space, *args, **kwargs)
        self.deadline_file = deadline_file
        self.starts = len(kwargs.get("points_to_evaluate") or [])
        self.suggested = 0
        # Timed classes are priced at a full-length trial of the planned space (its reports).
        self.paces = Paces(getattr(space, "max_epochs", None))
        self.noted_drift = 1.0

    def _clock(self) -> dict:
        import json

        try:
            return json.loads(Path(self.deadline_file).read_text()) if self.deadline_file else {}
        except (OSError, ValueError):
            return {}

    def suggest(self, trial_id):
        from ray.tune.search import Searcher

        # The start points always run (a search without its sensible default would have nothing to stand on).
        first = self.suggested == 0
        start_point = self.suggested < max(1, self.starts)
        planned = self._clock()
        clock = self.paces.repriced(planned)  # the plan's prices, as fast as the machine has run since
        self._note_drift()
        stop_at = clock.get("last_start") or math.inf
        kinds = clock.get("kinds") or {}
        late = time.time() > stop_at and not start_point
        left = clock["ends_at"] - time.time() if clock.get("ends_at") else math.inf
        searching = not start_point and self._ot_study is not None
        cheap = [b for b, k in sorted(kinds.items(), key=lambda kv: kv[1]["trial_s"]) if fits(k["trial_s"], left)] \
            if searching else []
        too_late = searching and (late or not fits(clock.get("trial_s"), left))
        # Configs of a class the search has timed (a backbone training so many layers) that still fit, priced at
        # their measured pace: a partial fine-tune can start where the plan's price, a full one's, no longer fits.
        measured = self.paces.affordable(left) if too_late and not cheap else []
        if late and not cheap and not measured:
            return Searcher.FINISHED
        if cheap and too_late:
            # Too late for the start point's kind (its last start is past, or its shortest schedule no longer fits),
            # not for a cheaper one: that starts, fitted to the time left; Optuna samples the rest of the config.
            # (On 48 px icons the search ended ~45 s early with 2-second scratch reports still affordable.)
            self._ot_study.enqueue_trial({"backbone": cheap[0]})
        elif measured:
            self._ot_study.enqueue_trial(measured[0])  # the best-scoring class that fits; Optuna samples the rest
        self.suggested += 1
        config = super().suggest(trial_id)
        if isinstance(config, dict) and clock.get("ends_at"):
            kind = kinds.get(str(config.get("backbone")))
            trial_s = _price(clock, config)
            if kind and config.get("report_rows"):
                config["report_rows"] = kind["report_rows"]  # priced as itself (search/plan.price_kinds)
            if config.get("report_rows"):
                # A start point is what the plan timed: its pace against the plan's price is the machine's drift.
                self.paces.start(trial_id, config, int(config["report_rows"]),
                                 _price(planned, config) if start_point else None)
                trial_s = self.paces.trial_s(config) or trial_s  # re-priced as measured
            ends = clock.get("first_ends_at") if first and clock.get("first_ends_at") else clock["ends_at"]
            config = {**config, "_deadline": ends}  # the trial ends its schedule by then (loop.Pace)
            if first and clock.get("stretch_rows"):
                config["_stretch_rows"] = clock["stretch_rows"]  # alone all search long: may grow (loop.Pace)
            if start_point and not first and kind and not fits(trial_s, left) and time.time() > stop_at:
                return Searcher.FINISHED  # a priced start point with no time left for it (nor for anything else)
            if (not start_point or (kind and not first)) and config.get("report_rows"):
                # A priced start point after the first runs in the time left (its own full length when that fits).
                cheapest = [t for t in (cheapest_trial_s(clock.get("trial_s"), kinds),
                                        self.paces.cheapest_s()) if t is not None]
                config["report_rows"], grow = fitted_length(int(config["report_rows"]), trial_s, left,
                                                            min(cheapest, default=None))
                if grow:
                    config["_stretch_rows"] = grow  # may grow into time it would leave unused (loop.Pace)
        return config


    def on_trial_result(self, trial_id, result):
        self.paces.observe(trial_id, result, result.get(self._metric))
        if trial_id in self._ot_trials:  # a trial this (restored) searcher never suggested: nothing to tell Optuna
            super().on_trial_result(trial_id, result)

    def _note_drift(self) -> None:
        """Notes the drift the plan is re-priced by, beside the clock file, where it moved (the progress view shows
        it as the trial it priced starts, the card states it). At a suggestion, not a report: a start point's first
        reports move it by tens of percent."""
        import json

        d, noted = self.paces.drift(), getattr(self, "noted_drift", 1.0)  # a searcher pickled before it had none
        if self.deadline_file and abs(math.log(d / noted)) > math.log(NOTE_DRIFT):
            Path(repriced_path(self.deadline_file)).write_text(json.dumps({"drift": d}))
            self.noted_drift = d

    def on_trial_complete(self, trial_id, result=None, error=False):
        if trial_id in self._ot_trials:
            super().on_trial_complete(trial_id, result=result, error=error)


UNFINISHED = ("PENDING", "RUNNING", "PAUSED")


def _trial_statuses(dirpath: str) -> dict[str, str] | None:
    """trial id -> status in the newest experiment state in `dirpath` (None when there is none to read)."""
    import json

    states = sorted(Path(dirpath).glob("experiment_state-*.json"))
    if not states:
        return None
    try:
        data = json.loads(states[-1].read_text())["trial_data"]
        return {s["trial_id"]: s["status"] for s in (json.loads(entry[0]) for entry in data)}
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


class ResumableSearch(SearchGenerator):
    """Tune's search generator, whose restore agrees with the trials it resumes.

    Tune saves the searcher's state and the trials' state at different moments, so after a killed driver the
    saved concurrency limiter can still count as live two trials the experiment state records as finished (or
    never recorded at all). Restored finished trials report nothing, the limiter never frees their slots, and the
    resumed search waits forever for a suggestion (seen: a resume hung ten minutes). On restore, the live trials
    become those the experiment state leaves unfinished, and the trial count starts from the trials it holds."""

    def restore_from_dir(self, dirpath: str):
        super().restore_from_dir(dirpath)
        statuses = _trial_statuses(dirpath)
        if statuses is None:
            return
        self._counter = max(self._counter, len(statuses))
        limiter = self.searcher
        if isinstance(limiter, ConcurrencyLimiter):
            limiter.live_trials = {t for t, s in statuses.items() if s in UNFINISHED}
            limiter.num_unfinished_live_trials = len(limiter.live_trials)


def experiment_name(out: Path, resume: bool) -> str:
    """A fresh experiment name, or with resume=True the one of the last search in `out` (its LATEST_SEARCH)."""
    marker = out / "LATEST_SEARCH"
    if resume and marker.exists():
        return marker.read_text().strip()
    # Unique beyond the second: runs sharing a storage_path may start in the same second.
    name = f"search_{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
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
    best_trial_id: str = ""
    best_dir: str | None = None  # the top trials' best weights: <trial_id>.safetensors (+ .json: score, report)
    rung0: Any = None            # the ladder's rung 0 (search/ladder.py: Rung0), when it ran
    drift: float = 1.0           # the last re-pricing the searcher noted (clock.NOTE_DRIFT; 1.0: none worth a line)

    @property
    def best_weights(self) -> str | None:
        """The winner's model (its last report's weights, or its best report's when it did not finish), when the
        search kept them."""
        return kept.model_file(self.best_dir, self.best_trial_id)


def _searchable_point(space: SearchSpace, point: dict) -> dict:
    return space.sampling_point(point)


@dataclass(frozen=True)
class SearchStorage:
    """Where a search keeps its experiment and how its trials checkpoint.

    path: a local folder or a URI (s3://, gs://, ...); name: the experiment's folder in it. local_dir: the driver's
    own bookkeeping (ASHA's decisions, the deadlines; default: the experiment folder when it is local). resume:
    continue the experiment when it exists. checkpoint_every_s: least time between a trial's checkpoints (0: after
    every report). keep_best: the weights of this many top trials are kept (in <experiment>/best)."""

    path: str
    name: str
    local_dir: str | None = None
    resume: bool = False
    checkpoint: bool = True
    checkpoint_every_s: float = CHECKPOINT_EVERY_S
    keep_best: int = 5

    def __post_init__(self) -> None:
        if not str(self.path) or not str(self.name):
            raise ValueError(f"SearchStorage needs a path and an experiment name; got path={self.path!r}, "
                             f"name={self.name!r}.")
        if self.checkpoint_every_s < 0 or self.keep_best < 1:
            raise ValueError(f"SearchStorage: checkpoint_every_s must be >= 0 and keep_best >= 1; got "
                             f"{self.checkpoint_every_s!r} and {self.keep_best!r}.")


@dataclass(frozen=True)
class SearchConfig:
    """What one search needs: the metric it maximises, where it is stored, its limits, and the trial slots (each
    slot gets `resources`; `concurrency` slots run at once). plan_lines: the plan's reasons, for the progress
    view."""

    metric: str
    storage: SearchStorage
    limits: SearchLimits
    resources: dict
    concurrency: int = 1
    seed: int = 0
    progress: bool = True
    plan_lines: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1 trial at a time; got {self.concurrency!r}.")
        if not (self.resources.get("cpu", 0) > 0 or self.resources.get("gpu", 0) > 0):
            raise ValueError(f"A trial slot needs CPUs or a GPU; got resources={self.resources!r}.")


def asha_tpe(space: SearchSpace, *, metric: str, points: list[dict], deadline_file: str, seed: int,
             asha_log: str) -> tuple[Any, TrialScheduler]:
    """The product's engine: Optuna's TPE proposes configs within the plan's deadlines (DeadlineOptunaSearch) and
    ASHA stops bad trials, never the start points. An engine is any function of these arguments that returns
    (a Tune searcher, a Tune scheduler): the benchmarks build their baselines (random sampling, no early stopping)
    with their own."""
    searcher = DeadlineOptunaSearch(space, metric=metric, mode="max", points_to_evaluate=points or None,
                                    sampler=tpe_sampler(seed), deadline_file=deadline_file)
    scheduler = RecordingASHA(asha_log, protected=len(points), time_attr="training_iteration",
                              max_t=space.max_epochs, grace_period=min(space.grace_period or 1, space.max_epochs),
                              reduction_factor=space.reduction_factor or 3)
    return searcher, scheduler


def _resumable(searcher, concurrency: int):
    """The engine's searcher as Tune would wrap it for `max_concurrent_trials`, in a generator that resumes
    consistently (ResumableSearch); a search algorithm that is not a Searcher is used as it is."""
    from ray.tune.search import Searcher

    if not isinstance(searcher, Searcher):
        return searcher
    if not isinstance(searcher, ConcurrencyLimiter):
        searcher = ConcurrencyLimiter(searcher, max_concurrent=concurrency)
    return ResumableSearch(searcher)


def run_search(data: TrialData, space: SearchSpace, config: SearchConfig, *, start_points: list[dict] | None = None,
               init_heads: dict | None = None, callbacks: list | None = None, engine=asha_tpe) -> SearchResult:
    """Run the search; returns the trial table and the winner (config + report of its peak).

    start_points: configs tried first (default: the space's). init_heads: rung 0's head files a fine-tune may
    start from (LP-FT). engine: what proposes and stops trials (`asha_tpe`)."""
    from ray import tune

    from automl.search.progress import SearchProgress

    if not space.max_epochs:
        raise ValueError("The space has no trial length (max_epochs): plan it (search/plan.py) or pin it.")
    st, lim, val_metric = config.storage, config.limits, f"val_{config.metric}"
    # Persist Tune's experiment state often: it is what a resume after a killed driver starts from.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "10")
    # Our progress view replaces Tune's (search/progress.py). Set here, not only where we start Ray: with Ray
    # started by the user (a notebook, a cluster), Tune's new output printed its configuration table and a
    # TensorBoard hint even at verbose=0.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    remote = is_uri(st.path)
    storage = st.path.rstrip("/") if remote else str(Path(st.path).resolve())
    exp_path = f"{storage}/{st.name}"
    # Driver-side bookkeeping (ASHA's decisions, the deadline) stays on local disk even when results go to a URI.
    local = Path(st.local_dir or (exp_path if not remote else tempfile.mkdtemp()))
    local.mkdir(parents=True, exist_ok=True)
    asha_log = str(local / (ASHA_LOG if not st.local_dir else f"{st.name}_{ASHA_LOG}"))
    deadline_file = str(local / f"{st.name}_deadlines.json")
    repriced_file = repriced_path(deadline_file)  # the searcher's notes of how it re-priced the plan
    lim.write(deadline_file)
    best_dir = None if remote else f"{exp_path}/best"
    trainable = tune.with_resources(
        tune.with_parameters(tune_trainable, data=data, max_epochs=space.max_epochs,
                             threads=max(1, int(config.resources.get("cpu", 1))), checkpoint=st.checkpoint,
                             checkpoint_every_s=st.checkpoint_every_s, metric=val_metric, best_dir=best_dir,
                             plugins=snapshot(), init_heads=init_heads,
                             search_end=None if lim.time_budget_s is None else time.time() + lim.time_budget_s),
        config.resources)
    progress_cb = SearchProgress(config.metric, space.max_epochs, lim.time_budget_s, enabled=config.progress,
                                 plan_lines=list(config.plan_lines), repriced_file=repriced_file)
    # Pruning walks the experiment dir, so it runs only for local/shared-filesystem storage.
    janitor = CheckpointJanitor(exp_path, keep_best=st.keep_best, start_file=asha_log + ".start") if not remote else None
    _CTRL_C.clear()
    try:
        if st.resume and tune.Tuner.can_restore(exp_path):
            tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_errored=True)
        else:
            points = [_searchable_point(space, p) for p in (start_points if start_points is not None else space.start_points)]
            searcher, scheduler = engine(space, metric=val_metric, points=points, deadline_file=deadline_file,
                                         seed=config.seed, asha_log=asha_log)
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(
                    metric=val_metric, mode="max", search_alg=_resumable(searcher, config.concurrency),
                    scheduler=scheduler, num_samples=lim.max_trials or -1, time_budget_s=lim.time_budget_s,
                    reuse_actors=True, trial_dirname_creator=trial_dirname),
                run_config=tune.RunConfig(
                    name=st.name, storage_path=storage, verbose=0,
                    callbacks=[progress_cb, NoteCtrlC()] + ([janitor] if janitor else []) + list(callbacks or []),
                    # Locally Ray keeps every checkpoint and CheckpointJanitor deletes them once it is safe;
                    # on remote storage Ray keeps the last two (the saved state may lag one behind).
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=None if janitor else 2),
                    failure_config=tune.FailureConfig(max_failures=1),
                    # Copy the experiment state to storage_path every few seconds: it is what a resume after
                    # a killed driver starts from (Ray's default is every 5 minutes).
                    sync_config=tune.SyncConfig(sync_period=sync_period_s())),
            )
        with sigint_kept():  # Tune's handler, left in place, made a Ctrl-C while finalising only set a flag
            grid = tuner.fit()
    finally:
        progress_cb.close()
    if _CTRL_C.is_set():
        scored = sum(1 for r in grid if r.metrics_dataframe is not None and val_metric in r.metrics_dataframe)
        raise RunInterrupted(
            f"Stopped by Ctrl-C during the search, with {scored} trial(s) scored; nothing was exported. The "
            f"search's state is saved in {exp_path}. Fix: run the same call again with resume=True (CLI: "
            "--resume): it goes on from there.")
    result = summarize(grid, space, config.metric, exp_path, asha_log)
    result.drift = read_drift(repriced_file)
    if janitor:
        janitor._measure()
        janitor.prune_all()
        result.peak_disk_mb = janitor.peak_bytes / 2**20
    return result


# Set by NoteCtrlC's handler. Module-level: a resumed Tuner runs the callbacks it pickled, not this run's objects.
_CTRL_C = threading.Event()


class NoteCtrlC(Callback):
    """Notes a Ctrl-C (SIGINT) during the search. Tune stops a search on it, saves its state and returns as if the
    search had ended: the run then finalised and exported a model from a search cut short, and said nothing."""

    def setup(self, **info) -> None:
        # Tune installed its own handler before this (in the main thread only): wrap it.
        if threading.current_thread() is not threading.main_thread():
            return
        tune_handler = signal.getsignal(signal.SIGINT)

        def noted(sig, frame):
            _CTRL_C.set()
            (tune_handler if callable(tune_handler) else signal.default_int_handler)(sig, frame)

        signal.signal(signal.SIGINT, noted)


# Random proposals before TPE takes over (Optuna's default is 10): CPU budgets often allow only 10-30 trials.
TPE_STARTUP_TRIALS = 6


def tpe_sampler(seed: int):
    """Optuna sampler: multivariate TPE (models how parameters interact; `group` handles the conditional ones)
    with a constant liar so concurrent trials do not all get the same proposal."""
    import warnings

    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=TPE_STARTUP_TRIALS, multivariate=True,
                                          group=True, constant_liar=True)


def is_uri(path: str) -> bool:
    return "://" in str(path)


def summarize(grid, space: SearchSpace, metric: str, exp_path: str, asha_log: str) -> SearchResult:
    val_metric = f"val_{metric}"
    rows, history = [], {}
    log, starts = Path(asha_log), Path(asha_log + ".start")
    asha_stopped = set(log.read_text().split()) if log.exists() else set()
    start_ids = set(starts.read_text().split()) if starts.exists() else set()
    for res in grid:
        df = res.metrics_dataframe
        trial_id = (res.metrics or {}).get("trial_id") or Path(res.path).name.replace("trial_", "")
        cfg = {k: v for k, v in space.active_config(res.config or {}).items() if not k.startswith("_")}
        # The ladder's rung: partial fine-tunes (top blocks, or the head on the cached body) are rung 1, full ones 2.
        rung = 2 if str(cfg.get("unfreeze", "all")) in ("all", "-1") else 1
        row = {"trial_id": trial_id, "rung": rung, "start_point": trial_id in start_ids,
               **{f"config/{k}": v for k, v in cfg.items()}}
        if df is not None and len(df) and val_metric in df:
            scores = df[val_metric].to_numpy()
            best_i = len(scores) - 1 - int(scores[::-1].argmax())  # of equal scores the later report, as kept
            epochs = int(df["training_iteration"].max())
            row.update({f"best_{val_metric}": float(df[val_metric].iloc[best_i]),
                        "best_epoch": int(df["training_iteration"].iloc[best_i]),
                        "best_val_loss": float(df["val_loss"].iloc[best_i]) if "val_loss" in df else math.nan,
                        "epochs_run": epochs,
                        "time_s": float(df["time_total_s"].max()) if "time_total_s" in df else math.nan,
                        "node": str(df["node_id"].iloc[-1]) if "node_id" in df else "",
                        "feature_cache": str(df["feature_cache"].iloc[-1]) if "feature_cache" in df else ""})
            history[trial_id] = df.filter(regex="^(training_iteration|epoch$|val_|train_loss|lr|timestamp|epoch_time_s|"
                                                "node_id|feature_cache)").to_dict("records")
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
    ok = kept.not_failed(trials[trials[f"best_{val_metric}"].notna()]) if len(trials) else trials
    if not len(ok):
        errors = "; ".join(sorted(set(trials.get("error", pd.Series(dtype=str)).dropna().astype(str))))[:1000]
        raise NoTrialScored(f"No trial produced a validation score ({len(trials)} trials). Errors: {errors or 'none'}. "
                           "Fix: check the backbones can be loaded, or give the search more time.")
    # Best score first; among ties, lower validation loss.
    ranked = ok.sort_values([f"best_{val_metric}", "best_val_loss"], ascending=[False, True])
    best = ranked.iloc[0]
    trials = trials.sort_values(f"best_{val_metric}", ascending=False, na_position="last").reset_index(drop=True)
    best_cfg = {k[len("config/"):]: plain(v) for k, v in best.items()
                if k.startswith("config/") and not (isinstance(v, float) and math.isnan(v))}
    return SearchResult(trials=trials, best_config=best_cfg, best_epoch=int(best["best_epoch"]),
                        best_score=float(best[f"best_{val_metric}"]), metric=metric,
                        experiment_path=exp_path, history=history, best_trial_id=str(best["trial_id"]),
                        best_dir=f"{exp_path}/best" if not is_uri(exp_path) else None)
