"""The plan: how a run spends its time budget, decided from the data and a measured step of the start point.

Training the right config long enough, judged when its score means something, beats many short trials. So:

1. Inputs from the data: images at their native size (the median of their longer side, at least 32 px) and
   text cut at the 95th percentile of its token lengths, unless the space pins them.
2. The start point's training step is timed on real rows (`measure_speed`), at two image sizes for images.
3. A full-length trial trains a sensible number of optimizer steps for its kind of backbone (pretrained:
   ~400 steps, 3-20 epochs; from scratch: ~1500 steps, 10-60 epochs) and may take at most a third of the
   search budget; when it cannot, the search narrows to the start point beside others, then to the start point
   alone (shortened to three quarters of its length at most); images shrink only when even that does not fit.
4. A trial reports 4-12 times (fewer when validating costs more than a fifth of its time); ASHA's first rung is
   at a quarter of the full length, so no trial is judged before its score means something, and the start
   point (tried first) is never stopped.
5. After the search either the winner is retrained on train+validation (when that fits and still leaves the
   search three full-length trials), or the winner's own best weights are exported. Suspected-label-error
   cross-fits and cross-validation get their time reserved, or are skipped with a note.
6. Every candidate is priced as itself: the space's from-scratch backbones are timed too, and train their own
   sensible length at their own cost a step (`price_kinds`); a from-scratch start point runs after the start point
   where that is affordable (as rung 0 is: never the start point's size nor more than a tenth of its steps).
7. What is left decides how many configs are tried: a trial that starts when its full length no longer fits
   trains a schedule shortened to end in time (search/clock.py), and none starts after that would be under half.

`make_plan` is a pure function of the data's statistics, the measured speed and the budget (tested without Ray).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from automl.budget import Costs
from automl.search.space import SearchSpace
from automl.search.clock import FIT_MARGIN, MIN_FIT, SearchLimits, cheapest_trial_s

# A full-length trial may take this share of a slot's search time (the start point runs at full length first);
# narrow: one full-length trial per slot; single: the start point alone.
FULL_TRIAL_SHARE, NARROW_SHARE, SINGLE_SHARE = 0.33, 0.9, 0.95
# ...and, alone and ahead of its plan, the start point may train up to this multiple of its sensible length; up to
# SINGLE_STRETCH_SOLE where no from-scratch backbone is priced beside it to use the time it leaves (text: every
# other config is a fine-tune as dear as it, too long for the few tens of seconds left). Fortunes at 300 s (Intel, 2 cores): runs
# ended at 82-89% of the budget with the start point at 1.5x its length, at 95-98% with 2x, scoring the same.
SINGLE_STRETCH, SINGLE_STRETCH_SOLE = 1.5, 2.0
NARROW_STRETCH = 1.5  # the same, for a start point in its own slot beside a search in the other slots
# Alone, the start point keeps an image size only where at least this share of its sensible length fits; else the
# images shrink (at the smallest size it trains as long as the time allows). Half the length at 128 px lost to the
# full length at 64-88 px on every stamps seed (300 s, AMD, 2 cores: 0.45/0.44 vs 0.56/0.53 macro-F1), and 70% of
# it at 72 px to the full length at 64 px (0.61 vs 0.66).
SINGLE_MIN_LENGTH = 0.75
VAL_ROWS = 2000              # trials validate on at most this many rows (stratified)
# ...and on fewer where validating would take more than EVAL_SHARE of the budget (20,000 images at 128 px on a
# CPU: 2,000 rows cost 60 s a validation), but never fewer than MIN_VAL_ROWS.
EVAL_SHARE, MIN_VAL_ROWS = 0.15, 200
# The final model's test takes at most this share of the budget: beyond it a stratified sample of the test split is
# scored (stages.evaluate), never fewer than MIN_TEST_ROWS rows. 100,000 short texts at 240 s scored 5,000 test rows
# in 81 s where the fine-tune had 111 s (2026-12-06): the time buys more from training than from test precision.
TEST_SHARE, MIN_TEST_ROWS = 0.1, 500
# Retrain only if the search keeps room for this many full-length trials afterwards.
MIN_FULL_TRIALS = 3.0
REPORTS = (4, 12)            # fewest and most reports per full-length trial
EVAL_SHARE = 0.2             # most of a trial's time validation may take
FIRST_RUNG = 0.25            # ASHA's first rung, as a share of the full length
REDUCTION_FACTOR = 3
TOP_TRIALS = 5               # trials whose best weights are kept for the winner, a soup or an ensemble
SOUP_PASSES = 4              # validation passes held for a soup's ingredients (the winner's two other kept reports,
                             # two trials of its architecture; more are tried only while time is left)
# Rung 0 (search/ladder.py) takes at most this share of the budget; per backbone, a build and the heads' fits,
# and its rows at this multiple of the start point's validation cost a row (a larger backbone, data loading).
RUNG0_SHARE, RUNG0_SETUP_S, RUNG0_ROW_FACTOR = 0.3, 3.0, 1.2
# ...and costs the start point at most this share of its steps. Where the budget does not fit the start point's
# sensible length, every second of rung 0 is a step less of the fine-tune that usually wins: measured at 300 s,
# rung 0 taking 40 s (314 -> 239 steps) lost 2-6 points of macro-F1 on stamps and fortunes against `fixed`.
RUNG0_MAX_STEP_LOSS = 0.1
MIN_IMAGE, MAX_IMAGE, MAX_IMAGE_CPU = 32, 224, 128  # on a CPU larger images cost more than they give
# Where the data's own size does not fit, the images shrink by this ratio (at least 8 px) a size until one does. A
# quarter at once (128 -> 96 px) turned a probe's noise into a large step: ten fresh `benchmarks/plan_time.py
# stamps 1 300` on one quiet machine priced the 128 px step at 0.65-0.97 s, and at the slow end the run trained at
# 96 px where 112 px fitted. EfficientNet-Lite0 on stamps at equal training time: 112 px as good as 128 (test +5.2,
# -4.0, +2.3 points, size_vs_length.py), 96 px 9 points under 128 at equal steps (one run).
SIZE_STEP = 0.875
# ImageNet backbones downsample 32x: at 32 px their last map is 1x1 and the features nearly collapse (EfficientNet-
# Lite0 on digits: linear-probe accuracy 0.67 at 32 px, 0.76-0.81 at 40-48 px), so small images are upscaled.
MIN_IMAGE_PRETRAINED = 48
# Rung 0 also judges frozen features at up to this multiple of the trial's side (search/ladder.py: it pays on 48 px
# icons, +8 to +9 points of macro-F1 at 96 px for every EfficientNet-Lite; not on 8 px digits): features are
# computed once, so a side that a fine-tune could not afford is cheap for them.
PROBE_UPSCALE = 2


def min_image(pretrained: bool) -> int:
    """The smallest side a backbone is trained at."""
    return MIN_IMAGE_PRETRAINED if pretrained else MIN_IMAGE


def probe_upscale(size: int | None, gpu: bool = False) -> int | None:
    """The larger side rung 0 judges frozen features at, for images trained at `size` (None: none is larger)."""
    if not size:
        return None
    up = min(MAX_IMAGE if gpu else MAX_IMAGE_CPU, _round8(PROBE_UPSCALE * size))
    return up if up > size else None


@dataclass
class DataStats:
    """What the plan needs to know about the data."""

    modality: str
    n_train: int
    n_val: int
    n_full: int                       # train + validation
    n_test: int = 0
    image_side: int | None = None     # median of the images' longer side
    token_p95: int | None = None      # 95th percentile of token counts (start point's tokenizer)

    @property
    def sized(self) -> bool:
        """The plan chooses the inputs' size (images); else their length in tokens (modalities/)."""
        from automl import modalities

        return modalities.get(self.modality).sized


@dataclass
class Speed:
    """Measured on the start point: set-up, one optimizer step, one validation row (seconds)."""

    setup_s: float
    step_s: float                     # with one trial's CPUs
    eval_row_s: float
    batch_size: int
    size: int | None = None           # image side it was measured at
    step_s_alone: float | None = None  # with every CPU of a node (a trial running alone)
    build_s: float | None = None       # the model's build alone (part of setup_s): what loading a kept trial costs
    warmup_s: float = 0.0              # paid once by a trial process's first model (its one-off costs)
    measured: bool = True              # False: a nominal speed for a run without a time budget (probes.nominal_speed)
    one_trial_timed: bool = True       # False: only step_s_alone was timed; step_s and eval_row_s are estimates
                                       # (the plan could not run trials side by side: probes.speed_probe)


@dataclass
class Plan:
    """Decisions made before the search, with the reasons shown in the progress view and the model card."""

    space: SearchSpace                 # the space as searched (input sizes, lengths and rungs pinned)
    storage_size: int | None           # images: side they are stored at
    resources: dict                    # per trial: {"cpu": .., "gpu": ..}
    concurrency: int
    retrain_cpus: int                  # CPUs per Ray Train worker
    search_ends_at_s: float | None     # the search stops this many seconds after the run started
    last_start_at_s: float | None      # no trial starts after this (seconds after the run started)
    max_trials: int | None
    reports: int = 0                   # reports in a full-length trial (ASHA's max_t)
    report_rows: int = 0               # training rows between two reports
    grace_period: int = 1
    reduction_factor: int = REDUCTION_FACTOR
    trial_s: float = 0.0               # estimated time of a full-length trial
    retrain: bool = True               # refit the winner on train+validation (else export its own best weights)
    retrain_s: float = 0.0
    label_errors: bool = False         # the suspected-label-error cross-fit is planned in
    cross_fit_s: float = 0.0
    reasons: list[str] = field(default_factory=list)
    regime: str = "search"             # "search", "narrow" or "single" (see _Frame.choose)
    val_rows: int | None = None        # trials score on a stratified sample of this many validation rows
    speed: dict = field(default_factory=dict)
    planned_at_s: float = 0.0          # seconds after the run started when the plan was made
    transferability: dict | None = None  # LogME pre-ranking of the space's backbones, when it ran
    retrain_fixed_s: float = 0.0       # the part of retrain_s that is Ray Train's start-up (Costs)
    retrain_speedup: float = 1.0       # a search trial's price over the same training alone with the node's CPUs,
                                       # as the retrain runs (a winner's search-time speed is re-priced by it)
    rung0_s: float = 0.0               # reserved for the ladder's rung 0 (frozen features + linear heads)
    rung0_upscale: int | None = None   # ...which also judges frozen features at this larger image side
    fingerprint: str = ""              # the data it was made for (a resume with other data is refused)
    budget_s: float | None = None      # the time budget it was made for
    stretch_rows: int = 0              # the start point, running all search long, may grow to this (its sensible length)
    kinds: dict = field(default_factory=dict)  # backbone -> {"report_rows", "trial_s"}: a cheaper net's own
                                       # length and price (from-scratch nets at the data's size), see price_kinds
    first_ends_at_s: float | None = None  # the start point ends its schedule by then (a priced start point follows)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["space"] = self.space.name
        return d

    def search_limits(self, elapsed_s: float) -> SearchLimits:
        """The search's limits when it starts `elapsed_s` into the run: the plan's deadlines (seconds after the run
        started) as seconds from the search's start, the one place they are converted."""
        def left(at: float | None) -> float | None:
            return None if at is None else max(5.0, at - elapsed_s)

        return SearchLimits(time_budget_s=left(self.search_ends_at_s), max_trials=self.max_trials,
                            last_start_s=None if self.last_start_at_s is None else self.last_start_at_s - elapsed_s,
                            trial_s=self.trial_s or None, first_ends_s=left(self.first_ends_at_s),
                            stretch_rows=self.stretch_rows, kinds=self.kinds)

    def winner_price(self, trials, best_trial_id: str, rows_ratio: float, runs: int = 1) -> float:
        """Seconds to train the search's winner (`best_trial_id`, a row of the trial table) for the full length on
        `rows_ratio` times its training rows, `runs` at a time in the trial slots, from its own measured time a
        report (0.0 when unknown). A winner trained on cached features is timed without its feature pass, so this
        is a floor, never the price alone."""
        if not {"trial_id", "time_s", "epochs_run"} <= set(getattr(trials, "columns", ())):
            return 0.0
        row = trials[trials["trial_id"].astype(str) == str(best_trial_id)]
        if row.empty:
            return 0.0
        per_report = float(row["time_s"].iloc[0]) / max(1, int(row["epochs_run"].iloc[0]))
        return per_report * self.reports * rows_ratio * math.ceil(runs / max(1, self.concurrency))

    def retrain_price(self, trials, best_trial_id: str, rows_ratio: float) -> float:
        """Seconds to retrain the winner on `rows_ratio` times its training rows: the plan's price (the start
        point's) or the winner's own measured one (as the search ran it, re-priced to the retrain's CPUs), whichever
        is more."""
        return max(self.retrain_s, self.retrain_fixed_s + self.winner_price(trials, best_trial_id, rows_ratio)
                   / max(1.0, self.retrain_speedup))

    def retrain_share(self, price_s: float, available_s: float) -> float:
        """The share of a retrain priced `price_s` whose training fits in `available_s` seconds (Ray Train's
        start-up, `retrain_fixed_s`, is not shortened by pacing: it is paid first)."""
        training = price_s - self.retrain_fixed_s
        return math.inf if training <= 0 else max(0.0, available_s - self.retrain_fixed_s) / training

    def cross_fit_price(self, trials, best_trial_id: str, n_train: int, n_full: int, folds: int = 2) -> float:
        """The cross-fit's price (`folds` folds of train+validation, `n_full` rows; trials trained on `n_train`):
        the plan's own (from the start point's speed) or the winner's, whichever is more."""
        rows_ratio = n_full * (folds - 1) / folds / max(1, n_train)
        return max(self.cross_fit_s, 5.0 + self.winner_price(trials, best_trial_id, rows_ratio, folds))

    def save(self, path) -> None:
        """The plan as JSON beside the search, so a resumed search keeps the trial length and sizes it began with."""
        import json

        d = asdict(self)
        d["space"] = self.space.to_dict()
        Path(path).write_text(json.dumps(d, default=str))

    @classmethod
    def load(cls, path, elapsed_s: float, budget_s: float | None = None) -> "Plan":
        """A saved plan, its deadlines moved to this run's clock (the time still left when it was interrupted
        is not known: the search gets its planned length again), but no later than this run's budget `budget_s`
        allows: the search ends as long before the budget's end as the saved plan had it."""
        import json

        d = json.loads(Path(path).read_text())
        d["space"] = SearchSpace.from_dict(d["space"], where=str(path))
        shift = elapsed_s - d.pop("planned_at_s", elapsed_s)
        ends, was = d.get("search_ends_at_s"), d.get("budget_s")
        latest = budget_s - (was - ends) if None not in (ends, was, budget_s) else None
        for key in ("search_ends_at_s", "last_start_at_s", "first_ends_at_s"):
            if d.get(key) is not None:
                d[key] += shift
        d["reasons"] = [*d["reasons"], "resumed with the plan the interrupted search began with"]
        if latest is not None and d["search_ends_at_s"] > latest:
            cut = d["search_ends_at_s"] - latest
            d["search_ends_at_s"] = latest
            for key in ("last_start_at_s", "first_ends_at_s"):
                d[key] = d[key] - cut if d.get(key) is not None else None
            d["reasons"].append(f"the search ends {cut:.0f} s earlier than the saved plan said: this run's time "
                                f"budget ({budget_s:.0f} s) leaves less than the interrupted run's ({was:.0f} s)")
        d["budget_s"] = budget_s
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


# ---------------------------------------------------------------------------- inputs from the data

def image_side(images) -> int:
    """The median of the images' longer side (read from their headers, for an ImageSource)."""
    sides = images.longer_sides() if hasattr(images, "longer_sides") else [max(a.shape[:2]) for a in images]
    return int(np.median(sides)) if len(sides) else MIN_IMAGE


def token_p95(tokenizer, texts: list[list[str]], sample: int = 2000, seed: int = 0) -> int:
    """The 95th percentile of token counts (special tokens included) over a sample of rows."""
    from automl.data.encoders import TextEncoder

    rng = np.random.default_rng(seed)
    rows = [texts[i] for i in rng.permutation(len(texts))[:sample]]
    ids = TextEncoder(tokenizer, 100000).encode(rows)
    return int(np.percentile([len(r) for r in ids], 95)) if ids else 16


def _round8(v: float) -> int:
    return int(math.ceil(v / 8.0) * 8)


def sensible_steps(pretrained: bool, steps_per_pass: int) -> int:
    """Optimizer steps a full-length trial trains: ~400 to fine-tune (3-20 epochs), ~1500 from scratch (10-60)."""
    target, lo, hi = (400, 3, 20) if pretrained else (1500, 10, 60)
    epochs = min(hi, max(lo, target / max(1, steps_per_pass)))
    return int(math.ceil(epochs * steps_per_pass))


def shortest_steps(pretrained: bool, steps_per_pass: int) -> int:
    """The shortest a trial is shortened to: half its sensible length, never under 3 epochs to fine-tune, 10 from
    scratch."""
    sensible = sensible_steps(pretrained, steps_per_pass)
    return max(int(sensible * 0.5), min(sensible, math.ceil((3 if pretrained else 10) * steps_per_pass)))


def could_share(sp: Speed, stats: DataStats, space: SearchSpace, budget_left_s: float | None, costs: Costs,
                pretrained: bool, concurrency: int) -> bool:
    """Whether the plan could run trials side by side ("search" or "narrow") at the size `sp` was timed at, judged
    from the start point timed there with every CPU of the node: a step on one trial's CPUs beside another is
    never cheaper than that, so where the start point's full length at that price takes more than NARROW_SHARE
    of the budget, the plan runs it alone at that size whatever one trial's CPUs would time (probes.speed_probe
    then times only that)."""
    if concurrency < 2 or budget_left_s is None or not sp.step_s_alone:
        return True
    spp = max(1, math.ceil(stats.n_train / sp.batch_size))
    steps = space.max_epochs * spp if space.max_epochs else sensible_steps(pretrained, spp)
    need = sp.setup_s + steps * sp.step_s_alone * costs["concurrency_slowdown"]
    return need <= NARROW_SHARE * (budget_left_s - costs["ray_start_s"])


def trial_seconds(sp: Speed, steps: int, c: int, more_cpus: bool, costs: Costs, vrows: int,
                  reports: int | None = None) -> tuple[float, float]:
    """A trial's time (set-up, `steps` steps, its validations over `vrows` rows) and one step's, from a measured
    speed, with c trials side by side (c=1 and more_cpus: it runs alone with every CPU of the node). reports: how
    many validations it runs; by default as many as the plan gives a trial of that length (_reports_for_eval:
    validation within EVAL_SHARE of the training, 4-12 reports). Charging 12 whatever the length over-priced a
    MiniLM trial of 5 reports on fortunes by ~20 s of 300, which the start point then did not train."""
    if c > 1:
        per_step = sp.step_s * costs["concurrency_slowdown"]
    elif more_cpus:
        per_step = sp.step_s_alone or sp.step_s / costs["thread_speedup"]
    else:
        per_step = sp.step_s
    one = vrows * sp.eval_row_s * (per_step / sp.step_s)  # a validation pass, as this trial runs it
    evals = reports * one if reports is not None else \
        min(REPORTS[1] * one, max(REPORTS[0] * one, EVAL_SHARE * steps * per_step))
    return sp.setup_s + steps * per_step + evals, per_step


# ---------------------------------------------------------------------------- the plan

@dataclass
class Choice:
    size: int | None
    steps: int
    trial_s: float                    # one full-length trial, at `concurrency` trials side by side
    step_s: float
    concurrency: int
    regime: str                       # "search", "narrow" (the start point takes a slot all search long) or "single"


def make_plan(space: SearchSpace, stats: DataStats, speed_at: Callable[[int | None], Speed], *,
              budget_left_s: float | None, elapsed_s: float, costs: Costs, resources: dict, concurrency: int,
              retrain_cpus: int, max_trials: int | None, pretrained: bool, export_formats: bool,
              label_errors: bool | str, cv_folds: int | None, pinned_size: int | None = None,
              max_length: int | None = None, node_cpus: int = 1, retrain: bool | str = "auto",
              regression: bool = False, rung0_backbones: int = 0, rung0_passes: int | None = None,
              others: dict[str, Speed] | None = None) -> Plan:
    """Decide the plan. speed_at(size) gives the start point's measured speed (one trial's CPUs) at an image
    size (None for text); node_cpus is what one trial running alone may use. rung0_backbones: pretrained
    backbones rung 0 fits heads on (search/ladder.py): its time is reserved first, and suspected label errors
    come from it instead of a cross-fit; rung0_passes: the forward passes their features take (poolings of one
    checkpoint share one; default: one a backbone). others: from-scratch backbones of the space, each with its own
    measured speed (at the largest candidate size): they are priced as themselves (price_kinds), not at the
    start point's cost, and one that is a start point of the space gets its own run where it is affordable."""
    reasons: list[str] = []
    f = _frame(space, stats, speed_at, budget_left_s, costs, resources, concurrency, pretrained, export_formats,
               pinned_size, node_cpus)
    ratio = stats.n_full / max(1, stats.n_train)
    if regression:  # label errors and cross-validation are for classification: nothing to reserve
        label_errors, cv_folds, rung0_backbones = False, None, 0
    # Where the user pinned the images' side, every model keeps it; else rung 0 may judge a larger one.
    upscale = (lambda size: probe_upscale(size, f.gpu) if stats.sized and not pinned_size else None)  # noqa: E731
    # Where rung 0 runs, its out-of-fold heads list label errors for seconds: no cross-fit to plan.
    with_rung0_errors = False if rung0_backbones and label_errors == "auto" else label_errors
    rest = dict(space=space, others=others, retrain=retrain, cv_folds=cv_folds, ratio=ratio)
    rung0_s = f.rung0_s = _reserve_rung0(
        f, budget_left_s, rung0_backbones, upscale(f.sizes[0]), passes=rung0_passes,
        slots=lambda r: _slots(f, r, budget_left_s, label_errors=with_rung0_errors, **rest))
    rung0_at = len(reasons)  # its reason names the side it judges, known once the trials' size is chosen
    if rung0_s:
        budget_left_s -= rung0_s
    if rung0_s or budget_left_s is None:
        label_errors = with_rung0_errors
    scratch_s, r = _after_rung0(f, budget_left_s, label_errors=label_errors, reasons=reasons, **rest)
    if budget_left_s is not None:
        budget_left_s -= scratch_s
    choice = r.choice
    rung0_upscale = upscale(choice.size) if rung0_backbones else None
    if rung0_s:
        reasons.insert(rung0_at, f"rung 0: ~{rung0_s:.0f} s for linear heads on the frozen features of "
                       f"{rung0_backbones} pretrained backbone(s)"
                       + (f" (and at {rung0_upscale} px, where that pays)" if rung0_upscale else "")
                       + ", before any fine-tune (the fine-tunes start from the best heads)")
    resources = _regime_resources(choice, resources, node_cpus, reasons)
    p = _pin(f, space, choice, pinned_size, max_length, sole=not others)
    reasons[:0] = _length_reasons(f, choice, p, max_length)
    if stats.sized and stats.image_side:
        reasons.append(_image_reason(f, choice, p.space, pinned_size, pretrained))
    kinds = price_kinds(others or {}, stats, choice, p.reports, speed_at, costs, f.more_cpus, f.vrows,
                        r.search_s if budget_left_s is not None else math.inf)
    for b, k in kinds.items():
        reasons.append(f"{b} priced as itself: {p.reports} reports of {k['report_rows']} rows (~{k['epochs']:.0f} "
                       f"epochs from scratch, ~{k['trial_s']:.0f} s at its measured {k['step_s'] * 1000:.0f} ms/step"
                       f" against the start point's {choice.step_s * 1000:.0f})")
    ends_at = last_start = first_ends = None
    if budget_left_s is not None:
        ends_at, last_start, first_ends = _deadlines(f, elapsed_s, rung0_s, r.search_s, scratch_s, choice, kinds,
                                                     reasons)
    val_rows = f.vrows if stats.n_val > f.vrows else None
    if val_rows:
        reasons.append(f"trials and the final choice score on a stratified {val_rows} of the {stats.n_val} validation "
                       "rows (enough to rank configs, and validating often stays cheap)"
                       + ("; the final model is tested on the whole test split" if f.test_rows >= stats.n_test else ""))
    if f.test_rows < stats.n_test:
        reasons.append(f"the final model is tested on a stratified ~{f.test_rows} of the {stats.n_test} test rows "
                       f"(scoring all would take ~{stats.n_test * f.test_row_s:.0f} s, more than "
                       f"{TEST_SHARE:.0%} of the budget); the card says how many")
    msg = _overrun(budget_left_s, r.total, choice, pinned_size) if budget_left_s is not None else None
    if msg:
        reasons.append(msg)
        warnings.warn(msg, stacklevel=2)
    return Plan(p.space, planned_size(p.space) if stats.sized else None, resources, choice.concurrency,
                retrain_cpus, ends_at, last_start, max_trials, p.reports, p.report_rows, p.pins["grace_period"], p.rf,
                choice.trial_s, r.retrain, r.retrain_s, bool(r.want_errors), r.cross_fit_s, reasons, choice.regime,
                val_rows, speed=asdict(speed_at(choice.size if stats.sized else None)),
                planned_at_s=elapsed_s, retrain_fixed_s=costs["ray_train_startup_s"] if r.retrain_s else 0.0,
                rung0_s=rung0_s, stretch_rows=p.stretch_rows, kinds=kinds, first_ends_at_s=first_ends,
                rung0_upscale=rung0_upscale, retrain_speedup=_retrain_speedup(f, choice))


# ---------------------------------------------------------------------------- the plan's steps

@dataclass
class _Frame:
    """What every step of make_plan derives from the data, the start point's speed and the budget."""

    stats: DataStats
    speed_at: Callable[[int | None], Speed]
    costs: Costs
    concurrency: int                  # trials side by side, as asked (a choice may run fewer)
    fixed_reports: int | None         # the user pinned the trial length in reports
    bs: int                           # the start point's batch size
    steps_per_pass: int
    sensible: int                     # steps of a full-length trial
    shortest: int                     # ...and the fewest it may be shortened to
    sizes: list[int | None]           # candidate image sizes, largest first ([None] for text)
    after: float                      # the fixed costs after the search: export (or evaluation) and finalising
    vrows: int                        # validation rows trials and finalising score on
    more_cpus: bool                   # a trial running alone gets more CPUs than one beside others
    rung0_s: float = 0.0              # rung 0's reserve, once made (choose judges sizes on the time before it)
    gpu: bool = False                 # trials train on a GPU
    test_rows: int = 0                # test rows the final model is scored on (a sample where all cost too much)
    test_row_s: float = 0.0           # ...and what one costs

    def total(self, budget_left_s: float) -> float:
        """The time left for training: the budget less what follows the search and Ray's start."""
        return budget_left_s - self.after - self.costs["ray_start_s"] - self.speed_at(self.sizes[0]).warmup_s

    def seconds(self, size: int | None, steps: int, c: int) -> tuple[float, float]:
        """The start point's full-length trial time and one step's at `size` (trial_seconds)."""
        return trial_seconds(self.speed_at(size), steps, c, self.more_cpus, self.costs, self.vrows)

    def most_steps(self, size: int | None, c: int, seconds: float) -> int:
        """The most steps a trial at `size` fits in `seconds` (its set-up and validations included)."""
        lo, hi = 0, int(seconds / max(self.seconds(size, 0, c)[1], 1e-9)) + 1
        while lo < hi:  # the time grows with the steps
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.seconds(size, mid, c)[0] <= seconds else (lo, mid - 1)
        return lo

    def choose(self, search_s: float, rung0_s: float | None = None) -> Choice:
        """The first that fits, size by size from the largest (the data's own) down: a search (a full-length trial
        takes at most a third of a slot's time); a search with the start point in a slot of its own all along
        ("narrow"); the start point alone with every CPU ("single"), as long as the time allows up to its
        sensible length and not under SINGLE_MIN_LENGTH of it. Only then smaller images; at the smallest, trained
        as long as the time allows. Inputs and length come first: on Tux Paint stamps EfficientNet-Lite0 scored
        0.78 macro-F1 at 128 px and 0.69 at 96 px for the same 320 steps, 0.61 at 96 px and 160 steps; a search of
        shorter trials on smaller images does not win that back.

        A size is judged on the time before rung 0 took its reserve (rung0_s; default: the frame's), which costs
        the start point at most RUNG0_MAX_STEP_LOSS of its steps: at the three-quarter boundary any reserve would
        otherwise shrink the images, so rung 0 got nothing and the run tried one config (stamps, 300 s)."""
        rung0_s = self.rung0_s if rung0_s is None else rung0_s
        sensible, shortest, concurrency = self.sensible, self.shortest, self.concurrency
        lengths = [sensible] if self.fixed_reports else sorted(
            {sensible, max(shortest, int(sensible * 0.75)), shortest}, reverse=True)
        tries = [("search", concurrency, FULL_TRIAL_SHARE, lengths[:1]),
                 ("narrow", concurrency, NARROW_SHARE, lengths[:1]), ("single", 1, SINGLE_SHARE, lengths)]
        for size in self.sizes:
            for regime, c, share, candidates in tries:
                if regime == "narrow" and concurrency == 1:
                    continue
                # Narrow keeps the start point's full length: a shortened trial beside another does worse than
                # the full-length one alone (stamps, 300 s: 240 steps beside a rival 0.70 macro-F1, 320 alone 0.74).
                if regime == "single" and not self.fixed_reports:
                    # Alone, the start point trains as long as the time allows, up to its sensible length.
                    n = min(sensible, self.most_steps(size, 1, share * search_s))
                    before_rung0 = min(sensible, self.most_steps(size, 1, share * (search_s + rung0_s))) \
                        if rung0_s else n
                    candidates = [n] if n >= shortest and before_rung0 >= SINGLE_MIN_LENGTH * sensible else []
                for n in candidates:
                    t, step_s = self.seconds(size, n, c)
                    if t <= share * search_s:
                        return Choice(size, n, t, step_s, c, regime)
        size = self.sizes[-1]
        step_s = self.seconds(size, 0, 1)[1]
        n = max(4, int(self.most_steps(size, 1, SINGLE_SHARE * search_s) / 1.1))
        return Choice(size, n, self.seconds(size, n, 1)[0], step_s, 1, "single")


def _frame(space: SearchSpace, stats: DataStats, speed_at: Callable[[int | None], Speed],
           budget_left_s: float | None, costs: Costs, resources: dict, concurrency: int, pretrained: bool,
           export_formats: bool, pinned_size: int | None, node_cpus: int) -> _Frame:
    """The start point's lengths in steps, the candidate sizes, the validation rows and the costs after the search."""
    bs = speed_at(pinned_size if stats.sized else None).batch_size
    steps_per_pass = max(1, math.ceil(stats.n_train / bs))
    fixed_reports = space.max_epochs  # the user pinned the trial length in reports
    sensible = fixed_reports * steps_per_pass if fixed_reports else sensible_steps(pretrained, steps_per_pass)
    # Trials may be shortened to half their sensible length (never below 3 epochs to fine-tune, 10 from scratch).
    shortest = sensible if fixed_reports else shortest_steps(pretrained, steps_per_pass)
    sizes = _candidate_sizes(stats, pinned_size, gpu=bool(resources.get("gpu")), smallest=min_image(pretrained))
    after = costs[f"export_{stats.modality}_s"] if export_formats else costs["evaluate_s"]
    sp = speed_at(sizes[0])
    # The validation rows trials and finalising score on: every report of a trial and every candidate of the final
    # choice is a pass over them.
    vrows = min(stats.n_val, VAL_ROWS)
    if budget_left_s is not None:
        passes = REPORTS[1] + 2 * TOP_TRIALS
        vrows = min(vrows, max(MIN_VAL_ROWS, int(EVAL_SHARE * budget_left_s / (passes * sp.eval_row_s))))
    more_cpus = node_cpus > resources.get("cpu", 1) and not resources.get("gpu")
    # Finalising loads the top trials (a model build each, not a trial's whole set-up; their validation
    # probabilities are read from what the trials saved) and scores a soup's ingredients on validation, in the
    # driver with every CPU of the node; the soup stops at its deadline. Priced at a trial's set-up and one
    # thread's rows, it reserved 76 s on 300 s of fortunes where finalising, evaluating and exporting took 20
    # (the start point, alone, then trained 3.2 epochs where `fixed` trains 8); at two passes a kept trial it
    # reserved ~27 s where finalising took 11 (three soup passes, 2026-12-04).
    eval_row = sp.eval_row_s / (costs["thread_speedup"] if more_cpus else 1.0)
    load = sp.build_s if sp.build_s is not None else 0.5 * sp.setup_s
    test_rows = stats.n_test
    if budget_left_s is not None:
        test_rows = min(test_rows, max(MIN_TEST_ROWS, int(TEST_SHARE * budget_left_s / max(eval_row, 1e-9))))
    after += costs["evaluate_s"] + test_rows * eval_row + 2.0 + TOP_TRIALS * load + SOUP_PASSES * vrows * eval_row
    return _Frame(stats, speed_at, costs, concurrency, fixed_reports, bs, steps_per_pass, sensible, shortest, sizes,
                  after, vrows, more_cpus, gpu=bool(resources.get("gpu")), test_rows=test_rows,
                  test_row_s=eval_row)


def _reserve_rung0(f: _Frame, budget_left_s: float | None, rung0_backbones: int, upscale: int | None = None,
                   slots: Callable[[float], tuple] | None = None, passes: int | None = None) -> float:
    """The time reserved for rung 0 before the search (0.0 when none is). upscale: a larger image side rung 0 may
    probe at too (probe_upscale); slots(r): the plan's regime and trial slots with `r` reserved (_slots); passes:
    rung0_cost's."""
    if not (rung0_backbones and budget_left_s is not None):
        return 0.0
    total = f.total(budget_left_s)
    want = min(RUNG0_SHARE * total, rung0_cost(rung0_backbones, f.stats, f.speed_at(f.sizes[0]), passes=passes))
    # Rung 0 never costs the data its input size (resolution is worth more than a search, see choose()), the
    # start point more than RUNG0_MAX_STEP_LOSS of its steps, nor the search its regime: it gets what it needs,
    # or the most of it that leaves those (down to an eighth; it then probes fewer rows or backbones), or nothing.
    alone = f.choose(total, rung0_s=0.0)
    if alone.trial_s > max(total, 0.0) or alone.steps < f.steps_per_pass:
        # Not even the start point's shortest run fits (the plan warns of an overrun), or what fits is less than
        # one pass over the training rows from a zero head (30 s on digits: 9 steps, exported at 0.21): rung 0 is
        # what this budget can pay for, a head fitted on every row it can afford, and it gives a model however
        # little is left (its first backbone is always probed). Over a pass (60 s on digits) it costs the start
        # point steps that were worth more (measured 2026-12-04: 0.950 against 0.977 over 3 seeds). Its whole share,
        # not the largest that keeps the start point's 4 steps inside the budget: trials are paced to the deadline,
        # and that smaller share cost a digits seed at 30 s 8 points (0.889 against 0.967) for 7 s left unused.
        return max(min(want, max(total, 0.0)), 1.0)

    def choice(r: float) -> Choice:
        return f.choose(total - r, rung0_s=r)

    def affordable(r: float, keep_regime: bool = False) -> bool:
        c = choice(r)
        return c.size == alone.size and c.steps >= (1 - RUNG0_MAX_STEP_LOSS) * alone.steps \
            and not (keep_regime and slots(r) != regime)

    def most(keep_regime: bool) -> float:
        """The first of want, a half, a quarter, an eighth that is affordable, then the most up to the next."""
        got = next((r for r in (want, want / 2, want / 4, want / 8) if affordable(r, keep_regime)), 0.0)
        if 0 < got < want:  # at half of what it wanted, a fortunes run (300 s) probed two text encoders of three
            lo, hi = got, min(want, 2 * got)
            for _ in range(8):
                lo, hi = ((lo + hi) / 2, hi) if affordable((lo + hi) / 2, keep_regime) else (lo, (lo + hi) / 2)
            got = lo
        return got

    # Nor, where any share of it can do without, the search its trials side by side: priced at two to four times
    # what it takes (packages at 300 s: 24-26 s reserved, 6 s used), a reserve that turned "narrow" into the start
    # point alone left a run of short texts one fine-tune where it had tried 10-17.
    regime = slots(0.0) if slots else None
    got = (slots and most(keep_regime=True)) or most(keep_regime=False)
    if not (got and upscale and slots):
        return got
    # The larger side's probes (rung 0's judgement of it, then every backbone there) are a bet on the data, and
    # the search's breadth is not staked on it: their time is added only where it leaves the plan's regime and
    # trial slots as they were (priced unconditionally, digits at 300 s reserved ~82 s where ~30 s would have
    # been, and used 25 s: the larger side did not pay there).
    more = min(RUNG0_SHARE * total, rung0_cost(rung0_backbones, f.stats, f.speed_at(f.sizes[0]), upscale, passes))
    ref = slots(got)
    return next((r for r in (more, (more + got) / 2) if r > got and affordable(r) and slots(r) == ref), got)


def _after_rung0(f: _Frame, budget_left_s: float | None, *, space: SearchSpace, others: dict[str, Speed] | None,
                 retrain: bool | str, label_errors: bool | str, cv_folds: int | None, ratio: float,
                 reasons: list[str]) -> tuple[float, _Reserves]:
    """What follows rung 0's reserve in `budget_left_s` (None: no time limit): the from-scratch start points'
    reserve, then the trial, the search and what is reserved after it."""
    scratch_s = _reserve_scratch(f, space, others, budget_left_s, reasons)
    if budget_left_s is None:  # no time limit: the sensible length; a trial count decides how many
        return scratch_s, _reserves_unlimited(f, retrain, label_errors, ratio)
    r = _reserves_budgeted(f, budget_left_s - scratch_s, retrain, label_errors, cv_folds, ratio, reasons)
    r.search_s += scratch_s  # the priced from-scratch start point runs after the start point, in the search
    return scratch_s, r


def _slots(f: _Frame, rung0_s: float, budget_left_s: float, **rest) -> tuple[str, int]:
    """The plan's regime and trial slots were rung 0 reserved `rung0_s` (_after_rung0, nothing recorded)."""
    was, f.rung0_s = f.rung0_s, rung0_s
    try:
        c = _after_rung0(f, budget_left_s - rung0_s, reasons=[], **rest)[1].choice
        return c.regime, c.concurrency
    finally:
        f.rung0_s = was


def _reserve_scratch(f: _Frame, space: SearchSpace, others: dict[str, Speed] | None, budget_left_s: float | None,
                     reasons: list[str]) -> float:
    """The time reserved for the space's from-scratch start points after the start point (a reason names those
    that get none)."""
    # A from-scratch start point where the start point runs alone: it gets time reserved after it when that costs
    # the start point neither its size nor more than RUNG0_MAX_STEP_LOSS of its steps. Otherwise it reserves
    # nothing and runs in what the start point leaves, if anything (a speed probe of a few steps is often 15-40%
    # pessimistic: on 48 px icons the start point planned at 135 s ran 88 s), its schedule fitted to that time.
    scratch_s, unreserved = 0.0, []
    scratch_starts = [b for b in (others or {}) if any(p.get("backbone") == b for p in space.start_points[1:])]
    if scratch_starts and budget_left_s is not None:
        total = f.total(budget_left_s)
        alone = f.choose(total)
        for b in scratch_starts:
            if alone.regime != "single":
                continue  # it runs in a slot of its own beside the start point
            t_b = _kind_time(others[b], f.stats, alone.size, f.speed_at, f.costs, f.more_cpus, 1, f.vrows,
                             FULL_TRIAL_SHARE * total)[1]
            c = f.choose(total - scratch_s - t_b)
            if c.size == alone.size and c.steps >= (1 - RUNG0_MAX_STEP_LOSS) * alone.steps \
                    and t_b <= FULL_TRIAL_SHARE * total:
                scratch_s += t_b
            else:
                unreserved.append(b)
    if unreserved:
        reasons.append(f"no time reserved for {', '.join(unreserved)}: at its own measured price it would cost the "
                       f"start point more than {RUNG0_MAX_STEP_LOSS:.0%} of its steps or its image size; it runs "
                       "after the start point in the time that leaves, if any")
    return scratch_s


def _alone_s(f: _Frame, choice: Choice) -> float:
    """The chosen trial's training alone with the node's CPUs, as the retrain runs it after the search: priced at
    the search's side-by-side pace (one CPU each, Costs' concurrency_slowdown), a retrain on 48 px icons at 600 s
    was held 141 s and took 77 (its training half its price), and the run ended at 89% of its budget."""
    return f.seconds(choice.size, choice.steps, 1)[0]


def _retrain_speedup(f: _Frame, choice: Choice) -> float:
    return max(1.0, choice.trial_s / max(1e-9, _alone_s(f, choice)))


@dataclass
class _Reserves:
    """The full-length trial chosen, the search's time and what is reserved after it."""

    choice: Choice
    search_s: float
    total: float | None               # the time left for training (None without a time limit)
    retrain: bool
    retrain_s: float
    cross_fit_s: float
    want_errors: bool                 # the suspected-label-error cross-fit is planned in


def _reserves_unlimited(f: _Frame, wanted: bool | str, label_errors: bool | str, ratio: float) -> _Reserves:
    """Without a time limit: the sensible length, and a retrain unless refused."""
    choice, search_s, retrain, cross_fit_s = f.choose(math.inf), 0.0, wanted is not False, 0.0
    # Not a reserve (nothing to fit into) but the retrain's planned training: what a retrain takes beyond it
    # is learned as Ray Train's start-up (stages.finalise), which budgeted runs then reserve.
    retrain_s = f.costs["ray_train_startup_s"] + _alone_s(f, choice) * ratio if retrain else 0.0
    want_errors = label_errors is True or (label_errors == "auto" and f.stats.n_full <= 20000)
    return _Reserves(choice, search_s, None, retrain, retrain_s, cross_fit_s, want_errors)


def _reserves_budgeted(f: _Frame, budget_left_s: float, wanted: bool | str, label_errors: bool | str,
                       cv_folds: int | None, ratio: float, reasons: list[str]) -> _Reserves:
    """The trial and the search's time once the retrain and the cross-fit that fit are reserved (a reason says
    what is skipped)."""
    total = f.total(budget_left_s)
    choice = f.choose(total)
    for _ in range(2):  # reserves depend on the trial length, and the length on what the reserves leave
        retrain_s = f.costs["ray_train_startup_s"] + _alone_s(f, choice) * ratio
        retrain = wanted is True or (wanted == "auto" and choice.regime == "search"
                                     and total - retrain_s >= MIN_FULL_TRIALS * choice.trial_s)
        # The cross-fit trains its folds side by side, each on part of train+validation.
        cross_fit_s = 5.0 + choice.trial_s * ratio * (cv_folds or 2) / max(2, f.concurrency)
        want_errors = label_errors is True or (
            label_errors == "auto" and f.stats.n_full <= 20000 and choice.regime == "search"
            and total - (retrain_s if retrain else 0.0) - cross_fit_s >= MIN_FULL_TRIALS * choice.trial_s)
        reserve = (retrain_s if retrain else 0.0) + (cross_fit_s if want_errors or cv_folds else 0.0)
        # The search never ends past the budget for a reserve: what does not fit is not reserved (finalise
        # skips a retrain or a cross-fit the time left cannot pay for).
        search_s = max(total - reserve, min(choice.trial_s, max(total, 0.0)))
        again = f.choose(search_s)
        if again == choice:
            break
        choice = again
    if not retrain and wanted is False:
        reasons.append("no retrain on train+validation (retrain=False): the best trial's own weights, or a soup "
                       "or an ensemble of the top trials, are exported")
        retrain_s = 0.0
    elif not retrain:
        reasons.append(f"no retrain on train+validation (~{retrain_s:.0f} s would leave the search less than "
                       f"{MIN_FULL_TRIALS:.0f} full-length trials): the winner's own best weights are exported")
        retrain_s = 0.0
    if label_errors == "auto" and not want_errors:
        reasons.append(f"suspected-label-error cross-fit skipped: the ~{cross_fit_s:.0f} s it takes are better "
                       "spent on the search (pass find_label_errors=True to force it)")
    return _Reserves(choice, search_s, total, retrain, retrain_s, cross_fit_s, want_errors)


def _regime_resources(choice: Choice, resources: dict, node_cpus: int, reasons: list[str]) -> dict:
    """A trial's resources in the chosen regime (every CPU of the node for the start point alone), with its reason."""
    if choice.regime == "single":
        resources = {**resources, "cpu": float(max(resources.get("cpu", 1), node_cpus))}
        # Time the start point leaves goes to other configs, one at a time, each started only while it can
        # still reach ASHA's first rung (last_start_at_s), and exported only if it beats it on validation.
        reasons.append("the budget fits one sensible-length run, not a search: the start point trains first, alone "
                       f"with all {node_cpus} CPU(s) (a search of shorter trials would do worse); other configs "
                       "follow one at a time while the time left lets them reach a rung")
    elif choice.regime == "narrow":
        reasons.append("the start point trains at full length in one slot for most of the search; the other "
                       f"slot{'s' if choice.concurrency > 2 else ''} try other configs of the same length")
    return resources


@dataclass
class _Pins:
    """The trial length in reports and rows, ASHA's rungs and the space with them (and the inputs' size) pinned."""

    space: SearchSpace
    reports: int
    report_rows: int
    stretch_rows: int
    pins: dict
    rf: int                           # ASHA's reduction factor


def _pin(f: _Frame, space: SearchSpace, choice: Choice, pinned_size: int | None, max_length: int | None,
         sole: bool = False) -> _Pins:
    """The full-length trial as reports of rows, ASHA's first rung, and the space as searched. sole: no
    from-scratch backbone is priced beside the start point (price_kinds)."""
    reports = f.fixed_reports or int(min(REPORTS[1], max(
        REPORTS[0], _reports_for_eval(choice, f.vrows, f.speed_at))))
    report_rows = 0 if f.fixed_reports else max(1, math.ceil(choice.steps * f.bs / reports))
    # Shortened to fit, the start point may still grow back towards its sensible length when it runs ahead of the
    # plan (a speed probe of a few steps is often 15-40% off; loop.Pace), instead of leaving that time unused.
    # Alone ("single"), it may grow past it (SINGLE_STRETCH, SINGLE_STRETCH_SOLE): at its full sensible length it
    # otherwise ended early and left the time unused (digits, 300 s: runs ended at 237 and 241 s, the start point
    # at 3.7 epochs).
    # In its own slot all search long ("narrow"), it may grow too (NARROW_STRETCH): at its sensible length it ran
    # ahead and ended ~25 s before its deadline on the README demo (240 s), where nothing else could start after it
    # (the run: ~200 s of 240; with the stretch, 236 and 239 s).
    stretch = {"single": SINGLE_STRETCH_SOLE if sole else SINGLE_STRETCH, "narrow": NARROW_STRETCH}
    cap = f.sensible * stretch.get(choice.regime, 1.0)
    stretch_rows = math.ceil(cap * f.bs / reports) if report_rows and choice.regime != "search" else 0
    stretch_rows = stretch_rows if stretch_rows > report_rows else 0
    grace = space.grace_period or max(1, math.ceil(FIRST_RUNG * reports))
    rf = space.reduction_factor or REDUCTION_FACTOR
    pins = {"max_epochs": reports, "grace_period": min(grace, reports), "reduction_factor": rf}
    if report_rows and "report_rows" not in space.parameters:
        pins["report_rows"] = report_rows
    if f.stats.sized and choice.size and not pinned_size:
        pins["image_size"] = choice.size
    if not f.stats.sized and max_length:
        pins["max_length"] = max_length
    return _Pins(space.with_overrides(pins), reports, report_rows, stretch_rows, pins, rf)


def _length_reasons(f: _Frame, choice: Choice, p: _Pins, max_length: int | None) -> list[str]:
    """The full-length trial and ASHA's first judgement, in words (the first of the plan's reasons)."""
    epochs = choice.steps / f.steps_per_pass
    measured = f.speed_at(choice.size).measured
    timing = (f"~{choice.trial_s:.0f} s at {choice.step_s * 1000:.0f} ms/step, from the start point's measured speed"
              if measured else "not timed: no time budget")
    return [
        f"a full-length trial: {p.reports} reports of {p.report_rows or 'one pass of'} "
        f"{'rows' if p.report_rows else 'the data'}"
        f" = {choice.steps} steps of batch {f.bs} (~{epochs:.1f} epochs, {timing}"
        + (f", {choice.size} px images" if f.stats.sized else "")
        + (f", {max_length} tokens" if max_length else "") + ")",
        f"ASHA judges trials first after {p.pins['grace_period']} of {p.reports} reports (reduction factor {p.rf}); "
        "the start point runs first and is never stopped",
    ]


def _image_reason(f: _Frame, choice: Choice, planned: SearchSpace, pinned_size: int | None, pretrained: bool) -> str:
    """The images' size and the size they are trained at, and why they differ."""
    side = f.stats.image_side
    if pinned_size:
        why = " (pinned)"
    elif pretrained and side < MIN_IMAGE_PRETRAINED and choice.size == MIN_IMAGE_PRETRAINED:
        why = f" (upscaled: a pretrained backbone sees too little below {MIN_IMAGE_PRETRAINED} px)"
    elif choice.size and choice.size >= min(_round8(side), f.sizes[0]):
        why = ""
    else:
        why = " to fit the budget"
    return f"images are {side} px (median longer side); trained at {planned_size(planned)} px" + why


def _deadlines(f: _Frame, elapsed_s: float, rung0_s: float, search_s: float, scratch_s: float, choice: Choice,
               kinds: dict, reasons: list[str]) -> tuple[float, float, float | None]:
    """When the search ends, when the last trial may start and when the start point ends (with the reason)."""
    ends_at = elapsed_s + rung0_s + f.costs["ray_start_s"] + search_s
    first_ends = ends_at - scratch_s if scratch_s else None
    # A trial started later could not train even its shortest fitted schedule (search/clock.py) before the end
    # (the cheapest kind's: a cheap net may still start where the start point's kind could not).
    last_start = ends_at - cheapest_trial_s(choice.trial_s, kinds) * MIN_FIT / FIT_MARGIN
    capacity = search_s * choice.concurrency / max(choice.trial_s, 1e-9)
    reasons.append(f"search: ~{search_s:.0f} s on {choice.concurrency} trial slot(s), room for ~{capacity:.1f} "
                   "full-length trials" + (" (ASHA stops most trials far sooner, so more configs are tried)"
                                           if choice.regime == "search" else "")
                   + f"; a trial that starts when its full length no longer fits trains a schedule shortened "
                     f"to end in time (down to {MIN_FIT:.0%} of the length), none starts later than that")
    return ends_at, last_start, first_ends


def _overrun(budget_left_s: float, total: float, choice: Choice, pinned_size: int | None) -> str | None:
    """The warning when the time left cannot pay even for the shortest run (else None)."""
    if choice.trial_s > max(total, 0.0):
        return (f"the time budget cannot pay for the shortest run: {max(total, 0.0):.0f} s are left for training "
                f"after this machine's fixed costs (start-up, evaluation, export), and {choice.steps} steps"
                f"{f' at {choice.size} px' if choice.size else ''} take ~{choice.trial_s:.0f} s; expect the run "
                f"to overrun. Fix: a budget of at least ~{budget_left_s + choice.trial_s - max(total, 0.0) + 30:.0f} s"
                + (", or a smaller image_size" if pinned_size else ""))
    return None


def _kind_time(sp: Speed, stats: DataStats, size: int | None, speed_at, costs: Costs, more_cpus: bool, c: int,
               vrows: int, fit_s: float, reports: int = REPORTS[1]) -> tuple[int, float, float, float]:
    """A from-scratch backbone's full-length run at `size` with c trials side by side: its steps (its sensible
    length, shortened to fit `fit_s` down to shortest_steps), its time, its time a step and its epochs. `sp` was
    measured at the largest candidate size; other sizes cost what they cost the start point, in proportion."""
    if size and sp.size and size != sp.size:
        scale = speed_at(size).step_s / max(speed_at(sp.size).step_s, 1e-9)
        sp = replace(sp, step_s=sp.step_s * scale, eval_row_s=sp.eval_row_s * scale, size=size,
                     step_s_alone=sp.step_s_alone * scale if sp.step_s_alone else None)
    fixed_s, step = trial_seconds(sp, 0, c, more_cpus, costs, vrows, reports)
    spp = max(1, math.ceil(stats.n_train / sp.batch_size))
    sensible = sensible_steps(False, spp)
    steps = max(shortest_steps(False, spp), min(sensible, int((fit_s - fixed_s) / max(step, 1e-9)))) \
        if math.isfinite(fit_s) else sensible
    return steps, fixed_s + steps * step, step, steps / spp


def price_kinds(others: dict[str, Speed], stats: DataStats, choice: "Choice", reports: int, speed_at,
                costs: Costs, more_cpus: bool, vrows: int, search_s: float) -> dict:
    """Each from-scratch backbone's own full-length trial: its sensible length (~1500 steps, 10-60 epochs),
    shortened to take at most a full-length trial's share of a slot (FULL_TRIAL_SHARE) but never under 10 epochs,
    priced at its own measured step (a resnet10t at 48 px costs a fraction of an EfficientNet-Lite0 step). The
    searcher gives a trial of that backbone these rows a report and starts one while its own length still fits."""
    kinds = {}
    for b, sp in others.items():
        steps, t, step, epochs = _kind_time(sp, stats, choice.size, speed_at, costs, more_cpus, choice.concurrency,
                                            vrows, FULL_TRIAL_SHARE * search_s, reports)
        kinds[b] = {"report_rows": max(1, math.ceil(steps * sp.batch_size / reports)), "trial_s": round(t, 2),
                    "step_s": step, "epochs": epochs}
    return kinds


def rung0_cost(backbones: int, stats: DataStats, sp: Speed, upscale: int | None = None,
               passes: int | None = None) -> float:
    """Rung 0's time: each backbone's build and heads, and the features for the training (at most
    ladder.MAX_ROWS) and validation rows at about the start point's cost a row (dearer backbones cost more:
    RUNG0_ROW_FACTOR), once per forward pass (`passes`, default one a backbone: MiniLM's two poolings share
    one); with `upscale` (a side larger than sp's), the judgement of that side and every backbone probed at it
    too, a row there costing about the square of the sides' ratio more."""
    from automl.search.ladder import MAX_ROWS, UPSCALE_ROWS

    rows = min(stats.n_train, MAX_ROWS) + min(stats.n_val, VAL_ROWS)
    # A forward pass costs about a third of a training step (forward + backward); the validation timing of a
    # few rows alone runs warm and under-prices it.
    row_s = max(sp.eval_row_s, sp.step_s / (3.0 * max(1, sp.batch_size)))
    passes = backbones if passes is None else min(passes, backbones)
    at_size = backbones * RUNG0_SETUP_S + passes * RUNG0_ROW_FACTOR * rows * row_s
    if not (upscale and sp.size and upscale > sp.size):
        return at_size
    ratio = (upscale / sp.size) ** 2
    judge = RUNG0_ROW_FACTOR * min(stats.n_train, UPSCALE_ROWS) * row_s * (1 + ratio)
    return at_size + judge + backbones * RUNG0_SETUP_S + passes * RUNG0_ROW_FACTOR * rows * row_s * ratio


def _reports_for_eval(choice: Choice, vrows: int, speed_at) -> float:
    """As many reports as keep validation within EVAL_SHARE of the trial's training time (a validation pass over
    the `vrows` rows trials score on, at the trial's CPUs as a step is: trial_seconds charges the same)."""
    sp = speed_at(choice.size)
    eval_s = vrows * sp.eval_row_s * (choice.step_s / max(sp.step_s, 1e-9))
    train_s = choice.steps * choice.step_s
    return EVAL_SHARE * train_s / max(eval_s, 1e-9)


def _candidate_sizes(stats: DataStats, pinned: int | None, gpu: bool = False,
                     smallest: int = MIN_IMAGE) -> list[int | None]:
    if not stats.sized:
        return [None]
    if pinned:
        return [pinned]
    top = min(MAX_IMAGE if gpu else MAX_IMAGE_CPU, max(smallest, _round8(stats.image_side or smallest)))
    sizes = [top]
    while sizes[-1] > smallest:
        sizes.append(max(smallest, min(sizes[-1] - 8, _round8(sizes[-1] * SIZE_STEP))))
    return sizes


def planned_size(space: SearchSpace) -> int:
    spec = space.parameters.get("image_size", {"type": "fixed", "value": MIN_IMAGE})
    values = [v for s in (spec if isinstance(spec, list) else [spec])  # `when` variants: every variant's sizes
              for v in (s.get("values") or [s.get("value") or s.get("high") or MIN_IMAGE])]
    return int(max(v for v in values if isinstance(v, (int, float))))
