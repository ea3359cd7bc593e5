"""The time budget: how long the run may take, what is reserved for later stages, and what each stage spent.

Every stage asks the budget before spending (`can_afford`, `available`), so
the run ends within `time_budget_s`. Reserves come from measurements: the plan
times the start point's training (search/plan.py) and the fixed costs of Ray
Train's start-up and of exporting are learned from earlier runs on this
machine (`Costs`, kept in ~/.cache/automl/costs.json or $AUTOML_COSTS_FILE: each
retrain and export updates them), with defaults measured by benchmarks/run.py on
a 2-core CPU.
"""
from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from automl.runtime import cache_dir

# Measured on a 2-core CPU (benchmarks/RESULTS.md): used until this machine has measured its own.
DEFAULT_COSTS = {"ray_train_startup_s": 15.0, "export_image_s": 4.0, "export_text_s": 12.0,
                 "ray_start_s": 5.0, "evaluate_s": 1.0,
                 # each of 2 trials running side by side on 2 cores trains this much slower than one alone,
                 # and one trial alone on 2 cores (2 threads) this much faster than on 1
                 "concurrency_slowdown": 1.3, "thread_speedup": 1.5}


@dataclass
class Costs:
    """Fixed costs of this machine, learned run by run (exponential average), in seconds."""

    values: dict = field(default_factory=lambda: dict(DEFAULT_COSTS))

    @staticmethod
    def path() -> Path:
        if os.environ.get("AUTOML_COSTS_FILE"):
            return Path(os.environ["AUTOML_COSTS_FILE"])
        return cache_dir() / "costs.json"

    @classmethod
    def load(cls) -> "Costs":
        try:
            saved = json.loads(cls.path().read_text())
        except (OSError, ValueError):
            saved = {}
        return cls({**DEFAULT_COSTS, **{k: float(v) for k, v in saved.items() if k in DEFAULT_COSTS}})

    def __getitem__(self, key: str) -> float:
        return float(self.values[key])

    def observe(self, key: str, seconds: float) -> None:
        """Blend a new measurement in (weight 1/2) and save; a failed save only loses the learning."""
        self.values[key] = 0.5 * self.values.get(key, seconds) + 0.5 * float(seconds)
        try:
            p = self.path()
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.values, indent=1))
            os.replace(tmp, p)
        except OSError:
            pass


@dataclass
class Budget:
    """Wall time for a run (None: no limit). Stages reserve time for the stages after them."""

    total_s: float | None
    start: float = field(default_factory=time.monotonic)
    reserved: dict[str, float] = field(default_factory=dict)
    spent: dict[str, float] = field(default_factory=dict)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        """Seconds left of the whole budget (inf without a limit)."""
        return math.inf if self.total_s is None else self.total_s - self.elapsed()

    def reserve(self, name: str, seconds: float) -> None:
        """Set aside time for a later stage (replaces an earlier reserve of the same name)."""
        self.reserved[name] = max(0.0, float(seconds))

    def release(self, name: str) -> None:
        self.reserved.pop(name, None)

    def available(self) -> float:
        """What the current stage may spend: the time left less what later stages have reserved."""
        return self.left() - sum(self.reserved.values())

    def can_afford(self, seconds: float) -> bool:
        return seconds <= self.available()

    def deadline(self, floor_s: float = 0.0) -> float | None:
        """The wall-clock time (time.time()) the current stage must end by to leave later stages their reserves
        (None without a limit): training paces its schedule to it (training.loop.Pace). floor_s: at least this far
        ahead, since a deadline already past when training starts is ignored as stale."""
        return None if self.total_s is None else time.time() + max(floor_s, self.available())

    @contextmanager
    def stage(self, name: str):
        """Time a stage; its reserve (if any) is released when it starts."""
        self.release(name)
        t0 = time.monotonic()
        try:
            yield self
        finally:
            self.spent[name] = self.spent.get(name, 0.0) + time.monotonic() - t0

    def to_dict(self) -> dict:
        return {"total_s": self.total_s, "elapsed_s": round(self.elapsed(), 2),
                "spent_s": {k: round(v, 2) for k, v in self.spent.items()}}
