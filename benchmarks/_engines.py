"""Search engines the benchmarks compare the product's (`automl.search.tune.asha_tpe`) with: the same searcher
inside the plan's deadlines, but random proposals and/or no early stopping. An engine returns (a Tune searcher, a
Tune scheduler); `run_search(..., engine=...)` takes it."""
from __future__ import annotations

import optuna
from ray.tune.schedulers import FIFOScheduler

from automl.search.tune import DeadlineOptunaSearch, tpe_sampler


def _deadline_searcher(space, sampler, metric: str, points: list[dict], deadline_file: str) -> DeadlineOptunaSearch:
    return DeadlineOptunaSearch(space, metric=metric, mode="max", points_to_evaluate=points or None, sampler=sampler,
                                deadline_file=deadline_file)


def random_no_stopping(space, *, metric: str, points: list[dict], deadline_file: str, seed: int, asha_log: str):
    """Random search: Optuna's random sampler, every trial trains its whole length (no ASHA)."""
    return _deadline_searcher(space, optuna.samplers.RandomSampler(seed=seed), metric, points, deadline_file), \
        FIFOScheduler()


def tpe_no_stopping(space, *, metric: str, points: list[dict], deadline_file: str, seed: int, asha_log: str):
    """The product's proposals without early stopping (fixed configs train their whole length)."""
    return _deadline_searcher(space, tpe_sampler(seed), metric, points, deadline_file), FIFOScheduler()
