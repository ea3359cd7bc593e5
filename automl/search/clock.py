"""The search's clock: when trials may start, and how long a late one trains (no Ray here: the plan uses it)."""
from __future__ import annotations

import json
import math
import time
from statistics import median
from dataclasses import dataclass
from pathlib import Path

# A trial that starts too late for its full length trains a shorter schedule that ends with the search (a trial
# cut mid-schedule, its LR still high, is a poor model to pick, soup or ensemble), but not shorter than this share
# of the full length; its planned time is scaled by FIT_MARGIN to leave room for estimation error. (At 0.5 the
# search's last ~17% went unused on 48 px icons at 300 s and ~15% on stamps at 900 s: no kind could still start.)
MIN_FIT, FIT_MARGIN = 0.3, 0.85
MAX_STRETCH = 2.0  # a search's last trial may grow to this many times its rows a report to train the search's end
# How far the machine's measured speed may re-price what the plan priced (Paces.drift): a probe of a few steps read
# a busy machine (a CPU-bound job beside it while it planned, then gone) 3.5x slow on the README demo, and the
# scratch nets priced from it could not start in the last 32 s the start point left (the run ended at 87%).
MAX_DRIFT = 4.0
# The searcher notes the drift for the progress view and the card when it moves by more than this factor (a start
# point often runs 10-25% off its probe on a quiet machine: not worth a line).
NOTE_DRIFT = 1.25


def write_deadlines(path: str, *, last_start_s: float | None, ends_in_s: float | None,
                    trial_s: float | None, stretch_rows: int = 0, kinds: dict | None = None,
                    first_ends_in_s: float | None = None) -> None:
    """The search's clock for the searcher, as wall-clock times in a file (the pickled searcher of a resumed
    search reads fresh ones): no trial starts after `last_start`; the search ends at `ends_at`; a full-length
    trial takes `trial_s`; a start point may grow to `stretch_rows` rows a report when it runs ahead; `kinds`:
    backbones priced as themselves ({"report_rows", "trial_s"}, search/plan.price_kinds); the first start point
    ends its schedule `first_ends_in_s` from now (a priced start point runs after it)."""
    now = time.time()
    Path(path).write_text(json.dumps({"last_start": None if last_start_s is None else now + last_start_s,
                                      "ends_at": None if ends_in_s is None else now + ends_in_s,
                                      "trial_s": trial_s, "stretch_rows": stretch_rows, "kinds": kinds or {},
                                      "first_ends_at": None if first_ends_in_s is None else now + first_ends_in_s}))


def repriced_path(deadline_file: str) -> str:
    """Where the searcher notes the drift it re-prices the plan by (Paces.drift), beside its clock file."""
    return str(Path(deadline_file).with_suffix("")) + "_repriced.json"


def read_drift(path: str | None) -> float:
    """The drift the searcher last noted at `path` (repriced_path); 1.0 where it noted none."""
    try:
        return float(json.loads(Path(path).read_text())["drift"]) if path else 1.0
    except (OSError, ValueError, KeyError, TypeError):
        return 1.0


def drift_line(drift: float) -> str | None:
    """The drift in words for the progress view and the card; None where it is too small to mention."""
    if abs(math.log(drift)) <= math.log(NOTE_DRIFT):
        return None
    return (f"the start point took {drift:.2f}x the time the speed probes priced (the machine ran "
            f"{'slower' if drift > 1 else 'faster'} than while it planned): every candidate not yet timed, and the "
            "last start, were re-priced by the same factor")


@dataclass(frozen=True)
class SearchLimits:
    """When the search ends and what its trials may train: the plan's figures (search/plan.py), in seconds from
    the search's start.

    time_budget_s / max_trials: the search ends at whichever comes first (one of them is needed). last_start_s: no
    trial starts later. trial_s: a full-length trial's planned time; a trial that starts when it no longer fits
    trains a schedule shortened to end in time. stretch_rows: rows a report of a start point alone may grow to when
    it runs ahead of its plan. kinds: backbones with their own length and price (plan.price_kinds). first_ends_s:
    the first start point ends its schedule then."""

    time_budget_s: float | None = None
    max_trials: int | None = None
    last_start_s: float | None = None
    trial_s: float | None = None
    first_ends_s: float | None = None
    stretch_rows: int = 0
    kinds: dict | None = None

    def __post_init__(self) -> None:
        if self.time_budget_s is None and not self.max_trials:
            raise ValueError("Give time_budget_s or max_trials: without either the search never ends.")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise ValueError(f"time_budget_s must be > 0 seconds; got {self.time_budget_s!r}.")

    def write(self, path: str) -> None:
        """These limits as the searcher's clock file (write_deadlines)."""
        write_deadlines(path, last_start_s=self.last_start_s, ends_in_s=self.time_budget_s, trial_s=self.trial_s,
                        stretch_rows=self.stretch_rows, kinds=self.kinds, first_ends_in_s=self.first_ends_s)


def fits(trial_s: float | None, left_s: float) -> bool:
    """Whether a trial of this full length can still train its shortest fitted schedule in `left_s`."""
    return not trial_s or left_s >= trial_s * MIN_FIT / FIT_MARGIN


def fitted_rows(report_rows: int, trial_s: float | None, left_s: float) -> int:
    """Rows per report for a trial with `left_s` seconds left: its full length when that fits, else a schedule
    shortened to fit (the same number of reports, so ASHA's rungs stay where they are)."""
    if not trial_s or not report_rows or left_s >= trial_s / FIT_MARGIN:
        return report_rows
    return max(1, int(report_rows * max(MIN_FIT, FIT_MARGIN * left_s / trial_s)))


def cheapest_trial_s(trial_s: float | None, kinds: dict) -> float | None:
    """The shortest full-length trial of the search: the start point's kind (`trial_s`) or a priced kind's
    (search/plan.price_kinds); None when none is priced. Its shortest fitted schedule is the last thing that can
    still start."""
    return min((t for t in [trial_s] + [k["trial_s"] for k in kinds.values()] if t is not None), default=None)


def fitted_length(report_rows: int, trial_s: float | None, left_s: float, cheapest_s: float | None) -> tuple[int, int]:
    """(rows per report, rows a report may grow to; 0: it may not grow) for a trial of this full length starting
    with `left_s` seconds left, where the cheapest kind's full length is `cheapest_s`.

    A trial shortened to the time left may grow back to its full length when it runs faster than priced. A trial
    after whose planned end no trial could start (the cheapest kind's shortest schedule would not fit in what is
    left) may grow past its length, up to MAX_STRETCH: it trains the end of the search instead of leaving it unused
    (loop.Pace grows a run only when its measured pace has the time)."""
    rows = fitted_rows(report_rows, trial_s, left_s)
    grow = report_rows if rows < report_rows else 0
    if rows and trial_s and cheapest_s:
        planned_s = trial_s * rows / report_rows
        if not fits(cheapest_s, left_s - planned_s):
            grow = max(grow, int(rows * min(MAX_STRETCH, FIT_MARGIN * left_s / planned_s)))
    return rows, grow if grow > rows else 0


class Paces:
    """What running trials measured, by class of config (its backbone and how many layers it trains): seconds a
    training row, a validation pass and the set-up. The plan prices every config as a full fine-tune of its kind,
    but a partial or head-only one trains faster (MiniLM on one-line texts, 300 s: 330 ms a step for all layers,
    100-140 for the top two, 43 for the head), so a config the search has seen is priced at what it took."""

    def __init__(self, reports: int | None) -> None:
        self.reports = reports  # a full-length trial's reports (None: unknown, and nothing is priced)
        # class -> {"params": its backbone and unfreeze, "rows": full-length rows a report, the measured "row_s",
        # "eval_s" and "setup_s", "best": its best validation score}
        self.seen: dict[str, dict] = {}
        self._steps: dict[str, tuple[str, int, int]] = {}  # trial id -> (class, batch size, steps so far)
        self.planned: dict[str, float] = {}  # class -> the plan's price of its full length (the configs it timed)

    def __setstate__(self, state: dict) -> None:
        # A search saved by a version that kept no plan prices resumes with none (no drift) instead of failing.
        self.__dict__.update({"planned": {}, **state})

    @staticmethod
    def key(config: dict) -> str:
        return f"{config.get('backbone')}|{config.get('unfreeze')}"

    def start(self, trial_id: str, config: dict, full_rows: int, planned_s: float | None = None) -> None:
        """A trial of `config` starts (its reports are measured from now); a full-length trial of its kind trains
        `full_rows` rows a report. planned_s: the plan's price of that full length, where the plan timed this very
        config (a start point), so its measured pace says how fast the machine runs against its probes."""
        if not config.get("batch_size") or not full_rows:
            return
        cls = self.key(config)
        if planned_s:
            self.planned.setdefault(cls, float(planned_s))
        self._steps[trial_id] = (cls, int(config["batch_size"]), 0)
        s = self.seen.setdefault(cls, {"row_s": [], "eval_s": [], "setup_s": [], "best": -math.inf})
        s["params"] = {k: config[k] for k in ("backbone", "unfreeze") if config.get(k) is not None}
        s["rows"] = int(full_rows)

    def observe(self, trial_id: str, result: dict, score: float | None = None) -> None:
        """A report of a started trial (loop.fit's metrics: `steps`, `epoch_time_s`, `report_time_s`)."""
        if trial_id not in self._steps or not {"steps", "epoch_time_s", "report_time_s"} <= set(result):
            return
        cls, bs, before = self._steps[trial_id]
        steps = int(result["steps"]) - before
        self._steps[trial_id] = (cls, bs, int(result["steps"]))
        if steps <= 0:
            return
        s = self.seen[cls]
        s["row_s"].append(float(result["epoch_time_s"]) / (steps * bs))
        s["eval_s"].append(max(0.0, float(result["report_time_s"]) - float(result["epoch_time_s"])))
        if before == 0 and "time_total_s" in result:  # Tune's clock includes the build and any feature pass
            s["setup_s"].append(max(0.0, float(result["time_total_s"]) - float(result["report_time_s"])))
        if score is not None and math.isfinite(score):
            s["best"] = max(s["best"], float(score))

    def trial_s(self, config_or_class: dict | str) -> float | None:
        """A full-length trial of this class (its reports of its full rows) at its measured pace; None
        when no trial of the class has reported yet (or the length is unknown)."""
        cls = config_or_class if isinstance(config_or_class, str) else self.key(config_or_class)
        s = self.seen.get(cls)
        if not s or not s["row_s"] or not self.reports:
            return None
        setup = median(s["setup_s"]) if s["setup_s"] else 0.0
        return setup + self.reports * (s["rows"] * median(s["row_s"]) + median(s["eval_s"]))

    def drift(self) -> float:
        """How much longer trials take than the plan priced them (measured / planned, the median over the start
        points that have reported; 1.0 before any has), within [1 / MAX_DRIFT, MAX_DRIFT]. The plan's probes
        timed every kind in the same few seconds, so what misled one misled all: the prices of kinds and configs
        not yet measured are scaled by it (`repriced`)."""
        ratios = [t / p for c, p in self.planned.items() if (t := self.trial_s(c)) is not None and p > 0]
        return min(MAX_DRIFT, max(1.0 / MAX_DRIFT, median(ratios))) if ratios else 1.0

    def repriced(self, clock: dict) -> dict:
        """The searcher's clock (write_deadlines) with the plan's prices scaled by `drift`: the start point's kind,
        each priced kind, and the last start (the cheapest kind's shortest schedule before the end)."""
        d = self.drift()
        if d == 1.0:
            return clock
        out = {**clock, "kinds": {b: {**k, "trial_s": k["trial_s"] * d} for b, k in (clock.get("kinds") or {}).items()}}
        if clock.get("trial_s"):
            out["trial_s"] = clock["trial_s"] * d
        if clock.get("last_start") is not None and clock.get("ends_at") is not None:
            out["last_start"] = clock["ends_at"] - (clock["ends_at"] - clock["last_start"]) * d
        return out

    def cheapest_s(self) -> float | None:
        """The shortest measured full-length trial (None when none has reported)."""
        return min((t for t in map(self.trial_s, self.seen) if t is not None), default=None)

    def affordable(self, left_s: float) -> list[dict]:
        """The measured classes whose shortest fitted schedule still fits in `left_s`, the best validation score
        first, as the params that make a config of the class ({"backbone", "unfreeze"})."""
        ok = [(s["best"], c) for c, s in self.seen.items() if fits(self.trial_s(c) or math.inf, left_s)]
        return [dict(self.seen[c]["params"]) for _, c in sorted(ok, key=lambda bc: bc[0], reverse=True)]
