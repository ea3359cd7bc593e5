"""A concise live view of the search: trials done, best so far, time left."""
from __future__ import annotations

import sys
import time

from ray.tune import Callback
from rich.console import Console

from automl.search.clock import drift_line, read_drift


# Where no live line can be redrawn (a log file, a Ray job's log, a pipe), a trial's report prints the status line
# at most this often: the start point alone can run for minutes between two trials' ends.
PRINT_EVERY_S = 30.0


class SearchProgress(Callback):
    """Ray Tune callback that prints one status line per event instead of Ray's tables."""

    def __init__(self, metric: str, max_epochs: int, time_budget_s: float | None, enabled: bool = True,
                 plan_lines: list[str] | None = None, repriced_file: str | None = None):
        self.metric = metric
        self.max_epochs = max_epochs
        self.budget = time_budget_s
        self.enabled = enabled
        self.start = self.printed_at = time.monotonic()
        self.best: float | None = None
        self.best_trial = ""
        self.best_report = 0  # the report that scored best: mid-schedule, a trial may end below it
        self.done = self.stopped = self.errors = 0
        self.epochs: dict[str, int] = {}
        self.console = Console(file=sys.stderr, highlight=False, markup=False, soft_wrap=True)
        self.live = None
        self.repriced_file, self.drift_shown = repriced_file, 1.0
        if enabled:
            for line in plan_lines or []:  # the plan, and why, before the first trial
                self.console.print(f"automl: plan: {line}")
        if enabled and self.console.is_terminal:
            from rich.live import Live

            self.live = Live(console=self.console, refresh_per_second=2, transient=False)
            self.live.start()

    def _line(self, running: int) -> str:
        elapsed = time.monotonic() - self.start
        left = f"{max(0.0, self.budget - elapsed):5.0f}s left" if self.budget else f"{elapsed:5.0f}s elapsed"
        # Any report's score, so say which: the search judges a trial by its end-of-schedule weights.
        best = (f"{self.best:.4f} ({self.best_trial}, report {self.best_report}/{self.max_epochs})"
                if self.best is not None else "-")
        failed = f", {self.errors} failed" if self.errors else ""
        return (f"automl: {self.done} trials done ({self.stopped} stopped early{failed}), {running} running"
                f" | best report's {self.metric} {best} | {left}")

    def _show_drift(self) -> None:
        """The searcher's re-pricing (search/clock.drift_line), once each time it moves."""
        drift = read_drift(self.repriced_file)
        if drift != self.drift_shown:
            self.drift_shown = drift
            line = drift_line(drift)
            if line:
                self.console.print(f"automl: plan: {line}")

    def _show(self, trials, force_print: bool = False) -> None:
        if not self.enabled:
            return
        running = sum(1 for t in trials if t.status == "RUNNING")
        line = self._line(running)
        if self.live is not None:
            self.live.update(line)
        elif force_print or time.monotonic() - self.printed_at >= PRINT_EVERY_S:
            self.console.print(line)
            self.printed_at = time.monotonic()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.epochs[trial.trial_id] = int(result.get("training_iteration", 0))
        value = result.get(f"val_{self.metric}")
        if value is not None and (self.best is None or value > self.best):
            self.best, self.best_trial = float(value), trial.trial_id
            self.best_report = self.epochs[trial.trial_id]
        self._show(trials)

    def on_trial_start(self, iteration, trials, trial, **info):
        if self.enabled:
            self._show_drift()  # the searcher notes a re-pricing only as it suggests a trial: read then, not a report

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done += 1
        if self.epochs.get(trial.trial_id, 0) < self.max_epochs:
            self.stopped += 1
        self._show(trials, force_print=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.done += 1
        self.errors += 1
        self._show(trials, force_print=True)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None

    def __getstate__(self):
        # Tuner state is pickled for resume; terminal handles are not picklable.
        state = dict(self.__dict__)
        state["live"] = None
        state["console"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update({"repriced_file": None, "drift_shown": 1.0, **state})  # pickled before these existed
        self.console = Console(file=sys.stderr, highlight=False, markup=False, soft_wrap=True)
