"""The plan: trial length, ASHA's rungs, input sizes and what follows the search, from the budget and the data.

make_plan is a pure function of the data's statistics and the measured speed: these tests need no Ray.
"""
from __future__ import annotations

import math
from dataclasses import replace

import pytest

from automl.budget import Costs
from automl.search.plan import (FIRST_RUNG, FULL_TRIAL_SHARE, NARROW_STRETCH, RUNG0_MAX_STEP_LOSS, RUNG0_SETUP_S,
                                SINGLE_MIN_LENGTH, SINGLE_STRETCH, SINGLE_STRETCH_SOLE, SOUP_PASSES, TEST_SHARE,
                                DataStats, Speed, make_plan, rung0_cost, sensible_steps)
from automl.search.space import load_space

IMAGES = DataStats("image", n_train=500, n_val=100, n_full=600, n_test=100, image_side=130)
TEXTS = DataStats("text", n_train=1000, n_val=200, n_full=1200, n_test=200, token_p95=40)


@pytest.fixture
def frozen_clock(monkeypatch):
    """The searcher's and the clock file's "now" frozen at one instant (1.7e9), so the time left is exactly what a
    test writes, however loaded the machine."""
    import time
    import types

    from automl.search import clock as clock_mod
    from automl.search import tune as tune_mod

    frozen = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
    frozen.time = lambda: 1.7e9
    monkeypatch.setattr(clock_mod, "time", frozen)
    monkeypatch.setattr(tune_mod, "time", frozen)


def speed(step_at_96: float = 0.5, setup: float = 2.0):
    """A CNN-like cost: a fixed part plus a part that grows with the pixel count."""
    def at(size):
        size = size or 32
        return Speed(setup, 0.1 + step_at_96 * (size / 96) ** 2, 0.002 * (size / 32) ** 2, 32, size)
    return at


def plan(stats=IMAGES, budget=300.0, at=None, space=None, **kw):
    space = space or load_space("cpu_small", stats.modality)
    args = dict(budget_left_s=budget, elapsed_s=5.0, costs=Costs(), resources={"cpu": 1}, concurrency=2,
                retrain_cpus=2, max_trials=None, pretrained=True, export_formats=True, label_errors="auto",
                cv_folds=None, max_length=48 if stats.modality == "text" else None, node_cpus=2)
    args.update(kw)
    return make_plan(space, stats, at or speed(), **args)


def test_a_larger_budget_buys_larger_inputs_longer_trials_and_a_retrain():
    small, large = plan(budget=120), plan(budget=3 * 3600)
    assert small.storage_size < large.storage_size == 128  # native size (130 px), at most 128 px on a CPU
    assert small.trial_s < large.trial_s and not small.retrain and large.retrain
    assert large.regime == "search" and small.regime == "single"
    for p in (small, large):  # a search's full-length trial takes at most a third of it; a single run fits
        search_s = p.search_ends_at_s - 5.0 - Costs()["ray_start_s"]
        assert p.trial_s <= (FULL_TRIAL_SHARE if p.regime == "search" else 1.0) * search_s * 1.02
        assert "the start point runs first and is never stopped" in " ".join(p.reasons)


def test_budgets_from_a_minute_to_hours_all_plan_a_run_that_fits():
    for budget in (60, 300, 1800, 6 * 3600):
        p = plan(budget=budget)
        reserved = (p.retrain_s if p.retrain else 0) + (p.cross_fit_s if p.label_errors else 0)
        assert p.search_ends_at_s + reserved + Costs()["export_image_s"] <= 5.0 + budget
        assert p.reports >= 4 and p.report_rows >= 1 and p.last_start_at_s < p.search_ends_at_s


def test_slower_steps_narrow_the_search_then_shorten_the_single_run_and_only_then_shrink_the_images():
    """Resolution first: smaller images only when not even the start point alone fits at the data's own size."""
    steps = lambda p: p.reports * math.ceil(p.report_rows / 32)  # noqa: E731
    sensible = sensible_steps(True, math.ceil(500 / 32))
    fastest, fast = plan(at=speed(0.005), budget=900), plan(at=speed(0.05))
    slow, slower, slowest = plan(at=speed(0.1)), plan(at=speed(0.75)), plan(at=speed(0.8))
    assert (fastest.storage_size, fastest.regime) == (128, "search")  # native size, full length
    assert steps(fastest) == pytest.approx(sensible, rel=0.1)
    for p in (fast, slow):  # then a narrow search, its trials still at full length
        assert (p.storage_size, p.regime) == (128, "narrow") and steps(p) >= sensible
    assert (slower.storage_size, slower.regime) == (128, "single")  # then the start point alone, shortened
    assert SINGLE_MIN_LENGTH * sensible <= steps(slower) < 0.8 * sensible
    # Only then smaller images: at 128 px this step fits ~70% of the sensible length (half the length at 128 px
    # lost to the whole length at 64-88 px on stamps), so the images shrink until three quarters fit: to 112 px,
    # the next size down, not a quarter at once (a probe ~12% slower moved stamps from 128 to 96 px).
    assert slowest.storage_size == 112 and slowest.regime == "single"
    assert steps(slowest) >= SINGLE_MIN_LENGTH * sensible
    assert plan(at=speed(2.0)).storage_size < slowest.storage_size


def test_no_rung_judges_a_trial_before_a_quarter_of_its_length():
    for budget in (60, 300, 3600):
        p = plan(budget=budget)
        assert p.grace_period >= FIRST_RUNG * p.reports and p.space.grace_period == p.grace_period
        assert p.space.max_epochs == p.reports and p.space.reduction_factor == 3


def test_reports_are_rows_not_passes_on_small_and_large_data():
    tiny = plan(DataStats("image", 60, 20, 80, 20, image_side=32))
    big = plan(DataStats("image", 200_000, 20_000, 220_000, 20_000, image_side=32), budget=3600)
    assert tiny.report_rows > 60      # small data: several passes between two reports
    assert big.report_rows < 200_000  # large data: several reports in one pass
    assert tiny.space.parameters["report_rows"]["value"] == tiny.report_rows


def test_from_scratch_trains_longer_than_fine_tuning():
    assert sensible_steps(False, 20) > sensible_steps(True, 20)
    assert sensible_steps(True, 1000) == 3000 and sensible_steps(True, 2) == 40  # 3-20 epochs
    scratch, tuned = plan(budget=7200, pretrained=False), plan(budget=7200, pretrained=True)
    assert scratch.reports * scratch.report_rows > tuned.reports * tuned.report_rows


def test_text_is_cut_at_the_planned_length_and_pins_win():
    p = plan(TEXTS, max_length=48)
    assert p.space.parameters["max_length"]["value"] == 48 and p.storage_size is None
    pinned = plan(space=load_space("cpu_small", "image", {"image_size": 64, "max_epochs": 3}), pinned_size=64)
    assert pinned.storage_size == 64 and pinned.reports == 3 and pinned.report_rows == 0  # one pass per report


def test_optional_cross_fits_are_planned_in_or_skipped_with_a_reason():
    short, long = plan(budget=200), plan(budget=4 * 3600)
    assert not short.label_errors and "suspected-label-error cross-fit skipped" in " ".join(short.reasons)
    assert long.label_errors
    forced = plan(budget=200, label_errors=True)
    assert forced.label_errors and forced.search_ends_at_s < short.search_ends_at_s  # its time is reserved


def test_without_a_time_limit_trials_get_their_sensible_length_and_the_winner_is_retrained():
    p = plan(budget_left_s=None)
    assert p.retrain and p.search_ends_at_s is None and p.storage_size == 128


def text_speed(step_s: float):
    return lambda size: Speed(2.5, step_s, 0.01, 32, None)


def test_when_one_sensible_run_is_all_the_budget_buys_the_start_point_trains_alone_with_every_cpu():
    """A search of shortened trials loses to one well-trained config: the plan does not run one."""
    slow = plan(TEXTS, budget=300, at=text_speed(1.6))  # ~400 steps at 1.6 s: one run at best
    assert slow.regime == "single" and slow.concurrency == 1
    assert slow.last_start_at_s < 5.0 + slow.trial_s  # nothing starts after the start point: no rung reachable
    assert slow.resources["cpu"] == 2 and not slow.retrain
    steps = slow.reports * math.ceil(slow.report_rows / 32)
    assert steps >= 0.5 * sensible_steps(True, math.ceil(1000 / 32))  # not cut to a fraction of an epoch
    fast = plan(TEXTS, budget=300, at=text_speed(0.05))
    assert fast.regime == "search" and fast.concurrency == 2 and fast.max_trials is None


def test_narrow_search_keeps_the_start_point_at_full_length_in_its_own_slot():
    p = plan(TEXTS, budget=300, at=text_speed(0.3))  # one full-length trial fits each slot, three do not
    assert p.regime == "narrow" and p.concurrency == 2 and "start point trains at full length" in " ".join(p.reasons)
    sensible = sensible_steps(True, math.ceil(1000 / 32))
    assert p.reports * p.report_rows >= sensible * 32  # not shortened
    # Running ahead of its plan, it may grow into the time it would otherwise leave unused in its slot (the README
    # demo's start point ended ~25 s before its deadline, with nothing else able to start after it).
    assert p.stretch_rows == math.ceil(NARROW_STRETCH * sensible * 32 / p.reports) > p.report_rows


def test_when_only_a_shortened_trial_fits_beside_another_the_start_point_trains_alone_at_full_length():
    p = plan(TEXTS, budget=300, at=text_speed(0.45))  # 400 steps fit alone, not beside a rival
    assert p.regime == "single" and p.concurrency == 1 and p.max_trials is None
    assert p.reports * p.report_rows >= sensible_steps(True, math.ceil(1000 / 32)) * 32
    assert p.last_start_at_s > 5.0 + p.trial_s  # time is left after it: other configs may follow, one at a time


def test_small_images_are_upscaled_for_a_pretrained_backbone_only():
    icons = DataStats("image", n_train=500, n_val=100, n_full=600, n_test=100, image_side=20)
    pre, scratch = plan(icons, budget=900, pretrained=True), plan(icons, budget=900, pretrained=False)
    assert (pre.storage_size, scratch.storage_size) == (48, 32)
    assert "upscaled" in " ".join(pre.reasons) and "upscaled" not in " ".join(scratch.reasons)
    assert plan(icons, budget=60, at=speed(2.0), pretrained=True).storage_size == 48  # never below, even when slow


def test_costs_learned_from_a_run_are_blended_saved_and_read_by_the_next_plan(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOML_COSTS_FILE", str(tmp_path / "costs.json"))
    c = Costs.load()
    assert c["export_image_s"] == 4.0  # the default until this machine has measured its own
    c.observe("export_image_s", 40.0)
    assert Costs.load()["export_image_s"] == 22.0  # half the old, half the new, persisted
    before = plan(budget=300, costs=Costs())
    after = plan(budget=300, costs=Costs.load())
    assert after.search_ends_at_s == pytest.approx(before.search_ends_at_s - 18.0, abs=0.5)  # the longer export


def test_a_trial_that_starts_late_trains_a_schedule_shortened_to_end_in_time(tmp_path, frozen_clock):
    """The searcher gives a late trial fewer rows per report (same reports: ASHA's rungs stay), never below MIN_FIT
    of its length, and lets it grow back to its length if it runs faster than priced; the start point always
    trains at full length; nothing starts after the last start time.
    The clock is frozen (the file's deadlines and the searcher's "now" read the same instant), so the time left
    is exactly what the test wrote, however loaded the machine."""
    from ray.tune.search import Searcher

    from automl.search.clock import FIT_MARGIN, MIN_FIT, fitted_rows, write_deadlines
    from automl.search.tune import DeadlineOptunaSearch, tpe_sampler

    assert fitted_rows(400, 100.0, 200.0) == 400                                # fits: full length
    assert fitted_rows(400, 100.0, 60.0) == int(400 * FIT_MARGIN * 0.6)           # shortened to the time left
    assert fitted_rows(400, 100.0, 10.0) == int(400 * MIN_FIT)                    # never below MIN_FIT
    space = load_space("cpu_small", "text", {"max_epochs": 8, "report_rows": 400})
    clock = tmp_path / "clock.json"

    def searcher():
        return DeadlineOptunaSearch(space, metric="val_accuracy", mode="max", sampler=tpe_sampler(0),
                                    points_to_evaluate=[space.sampling_point(space.start_points[0])],
                                    deadline_file=str(clock))

    write_deadlines(str(clock), last_start_s=30.0, ends_in_s=60.0, trial_s=100.0)  # the full length no longer fits
    s = searcher()
    start, late = s.suggest("a"), s.suggest("b")
    assert start["report_rows"] == 400 and start["lr"] == space.start_points[0]["lr"]
    assert late["report_rows"] == int(400 * FIT_MARGIN * 0.6)                   # 60 s left of a 100 s trial
    assert late["_stretch_rows"] == 400 and "_stretch_rows" not in start          # may grow back if it runs fast
    assert late["_deadline"] == start["_deadline"] == 1.7e9 + 60.0               # both end their schedule then
    write_deadlines(str(clock), last_start_s=1000.0, ends_in_s=2000.0, trial_s=100.0)
    full = s.suggest("c")
    assert full["report_rows"] == 400 and "_stretch_rows" not in full            # time enough: full length
    # The last to fit at full length (after its 100 s, 30 s is too little for any trial's shortest schedule): it may
    # grow into those 30 s instead of leaving them unused.
    write_deadlines(str(clock), last_start_s=1.0, ends_in_s=130.0, trial_s=100.0)
    last = s.suggest("c2")
    assert last["report_rows"] == 400 and last["_stretch_rows"] == int(400 * FIT_MARGIN * 130 / 100)
    write_deadlines(str(clock), last_start_s=-1.0, ends_in_s=50.0, trial_s=100.0)
    assert s.suggest("d") == Searcher.FINISHED
    write_deadlines(str(clock), last_start_s=-1.0, ends_in_s=50.0, trial_s=100.0)
    assert searcher().suggest("e")["report_rows"] == 400                         # a start point starts regardless


def test_rung0_gets_its_time_first_but_never_the_images_resolution():
    """Rung 0 (frozen features + linear heads) is reserved before the search and the search ends that much later;
    where its full reserve would shrink the images, it gets less (or nothing)."""
    without, with_ = plan(at=speed(0.02)), plan(at=speed(0.02), rung0_backbones=3)
    assert without.rung0_s == 0 and with_.rung0_s > 0
    assert with_.storage_size == without.storage_size == 128
    assert any(r.startswith("rung 0:") for r in with_.reasons)
    # The search's end moves by the reserve: the time before it is rung 0's, not the search's.
    assert with_.search_ends_at_s <= without.search_ends_at_s + 1e-6
    search = lambda p: p.search_ends_at_s - 5.0 - p.rung0_s  # noqa: E731
    assert search(with_) == pytest.approx(search(without) - with_.rung0_s, abs=1.0)
    # A step so slow that the single run barely fits at 128 px: rung 0 must not push the images smaller.
    # Nor take more than RUNG0_MAX_STEP_LOSS of the start point's steps where it cannot train its sensible length.
    for step in (0.4, 0.7, 0.8, 0.95):
        tight, tight0 = plan(at=speed(step)), plan(at=speed(step), rung0_backbones=3)
        assert tight0.storage_size == tight.storage_size
        steps = lambda p: p.reports * p.report_rows  # noqa: E731  (rows trained; the batch size is the same)
        assert steps(tight0) >= (1 - RUNG0_MAX_STEP_LOSS) * steps(tight) - tight.report_rows
    assert 0 < plan(at=speed(0.8), rung0_backbones=3).rung0_s < rung0_cost(3, IMAGES, speed(0.8)(128))  # less there
    # At the three-quarter boundary (128 px fits ~76% of the sensible length) any reserve would have shrunk the
    # images, so rung 0 got nothing and stamps at 300 s tried one config: the size is now judged on the time
    # before rung 0's reserve, which still costs the start point at most RUNG0_MAX_STEP_LOSS of its steps.
    edge, edge0 = plan(at=speed(0.75)), plan(at=speed(0.75), rung0_backbones=3)
    assert edge.storage_size == edge0.storage_size == 128 and edge0.rung0_s > 0
    assert edge0.reports * edge0.report_rows >= (1 - RUNG0_MAX_STEP_LOSS) * edge.reports * edge.report_rows - 32
    # Label errors come from rung 0's out-of-fold heads: no cross-fit is planned for them.
    assert not with_.label_errors



def test_rung0_gets_the_most_of_its_reserve_that_leaves_the_start_point_its_steps():
    """Where its whole reserve would cost the start point more than RUNG0_MAX_STEP_LOSS of its steps, rung 0 gets the
    most that does not, not the first halving that does not: at half of what it wanted, a fortunes run at 300 s
    probed two of its three text encoders."""
    rows = lambda p: p.reports * p.report_rows  # noqa: E731  (rows trained; the batch size is the same)
    cut = []
    for step in (0.4, 0.5, 0.6, 0.7, 0.8):
        alone, ladder = plan(at=speed(step)), plan(at=speed(step), rung0_backbones=3)
        want = rung0_cost(3, IMAGES, speed(step)(128))  # priced at the largest candidate side (130 px images)
        assert ladder.storage_size == alone.storage_size and 0 < ladder.rung0_s <= want + 1e-6
        assert rows(ladder) >= (1 - RUNG0_MAX_STEP_LOSS) * rows(alone) - alone.report_rows
        if ladder.rung0_s < want - 1e-6:
            # Cut to what leaves the start point its share of steps: within a report of the bound.
            cut.append(step)
            assert rows(ladder) <= (1 - RUNG0_MAX_STEP_LOSS) * rows(alone) + alone.report_rows, step
    assert len(cut) >= 2, cut


def test_rung0_does_not_cost_the_search_its_trials_side_by_side_where_a_share_of_its_reserve_keeps_them():
    """Rung 0 is priced at two to four times what it takes: on short texts at 300 s (packages), a reserve that
    turned "narrow" into the start point alone left one fine-tune where 10-17 had run. Where some share of it keeps
    the trials side by side it gets that share; where none does (a plan at the edge), it keeps its reserve."""
    from automl.search.plan import Speed

    def texts_at(step):
        return lambda size: Speed(2.0, step, step / 40, 32, None)

    space, kept = load_space("cpu_small", "text"), []
    for step in (0.30, 0.36, 0.37, 0.38, 0.396):
        alone = plan(stats=TEXTS, at=texts_at(step), space=space)
        ladder = plan(stats=TEXTS, at=texts_at(step), space=space, rung0_backbones=3, rung0_passes=2)
        want = rung0_cost(3, TEXTS, texts_at(step)(None), passes=2)
        assert alone.regime == "narrow" and 0 < ladder.rung0_s <= want + 1e-6
        if ladder.regime == "narrow":
            kept.append(step)
        else:  # not even an eighth of its reserve keeps them: rung 0 takes what it wants, as the start point allows
            assert ladder.rung0_s == pytest.approx(want)
    assert kept == [0.30, 0.36, 0.37, 0.38], kept
    cut = plan(stats=TEXTS, at=texts_at(0.37), space=space, rung0_backbones=3, rung0_passes=2)
    assert cut.rung0_s < 0.8 * rung0_cost(3, TEXTS, texts_at(0.37)(None), passes=2)


def test_rung0_judges_twice_the_trials_image_side_and_is_priced_for_it_unless_the_side_is_pinned():
    """Frozen features of tiny images may be better upscaled (search/ladder.py): rung 0 judges twice the trial's
    side, up to the CPU's largest, and its reserve pays for every backbone's features there. A side the user
    pinned is every model's; texts have none; 130 px images already train at the CPU's largest."""
    icons = replace(IMAGES, image_side=48)
    free = plan(stats=icons, at=speed(0.02), rung0_backbones=3)
    pinned = plan(stats=icons, at=speed(0.02), rung0_backbones=3, pinned_size=48,
                  space=load_space("cpu_small", "image", {"image_size": 48}))
    assert free.storage_size == pinned.storage_size == 48
    assert free.rung0_upscale == 96 and pinned.rung0_upscale is None
    assert free.rung0_s > pinned.rung0_s > 0
    # Where the larger side's time would turn trials side by side into fewer slots or the start point alone, it
    # gets none: rung 0 keeps what it had without it (the larger side is a bet on the data; the breadth is not).
    slow = [plan(stats=icons, at=speed(0.3), rung0_backbones=3, **kw) for kw in
            ({}, {"pinned_size": 48, "space": load_space("cpu_small", "image", {"image_size": 48})})]
    assert slow[0].rung0_upscale == 96 and slow[0].rung0_s == slow[1].rung0_s > 0
    assert (slow[0].regime, slow[0].concurrency) == (slow[1].regime, slow[1].concurrency) == ("search", 2)
    assert plan(at=speed(0.02), rung0_backbones=3).rung0_upscale is None
    # 130 px images that the budget shrinks to 112 px: rung 0 judges 128, and its line in the plan says so.
    shrunk = plan(at=speed(0.9), rung0_backbones=3)
    assert shrunk.storage_size == 112 and shrunk.rung0_upscale == 128
    assert any(r.startswith("rung 0:") and "(and at 128 px, where that pays)" in r for r in shrunk.reasons)
    assert any(r.startswith("rung 0:") and "(and at 96 px" in r for r in free.reasons)
    assert plan(stats=TEXTS, at=speed(0.02), rung0_backbones=2).rung0_upscale is None
    sp = speed(0.02)(48)
    base, up = rung0_cost(3, icons, sp), rung0_cost(3, icons, sp, 96)
    assert up - base >= 4 * (base - 3 * RUNG0_SETUP_S)  # a row at 96 px costs about four at 48


def test_rung0_prices_one_forward_pass_per_checkpoint_not_per_pooling():
    """MiniLM mean- and first-token-pooled are two backbones of one checkpoint: rung 0 computes their features in
    one pass (ladder._SharedPasses), so its reserve pays for one pass and two builds. Priced as two passes, a
    fortunes run reserved 26-31 s and used 4."""
    from automl.search.ladder import forward_passes

    assert forward_passes(["minilm-l6", "minilm-l6-cls"]) == 1
    assert forward_passes(["efficientnet-lite0", "efficientnet-lite1", "minilm-l6"]) == 3
    sp = speed(0.5)(None)
    two, one = rung0_cost(2, TEXTS, sp), rung0_cost(2, TEXTS, sp, passes=1)
    assert one - 2 * RUNG0_SETUP_S == pytest.approx((two - 2 * RUNG0_SETUP_S) / 2)
    kw = dict(stats=TEXTS, budget=600.0, at=speed(0.5), space=load_space("cpu_small", "text"))
    priced_twice, priced_once = plan(rung0_backbones=2, **kw), plan(rung0_backbones=2, rung0_passes=1, **kw)
    assert 0 < priced_once.rung0_s < priced_twice.rung0_s
    assert priced_once.rung0_s == pytest.approx(one)


def test_when_not_even_the_start_points_shortest_run_fits_rung0_still_gets_time():
    """30 s on 1,797 digits: the plan reserved nothing for rung 0 (it may not cost the start point its steps), the
    start point then trained 4 steps from a zero head and was exported at chance (0.11). Where the start point's
    shortest run cannot be paid for, rung 0, seconds for a model, is what the budget buys."""
    with pytest.warns(UserWarning, match="cannot pay for the shortest run"):
        tiny = plan(budget=20.0, at=speed(2.0), rung0_backbones=3)
    assert tiny.rung0_s >= 1.0 and any(r.startswith("rung 0:") for r in tiny.reasons)
    with pytest.warns(UserWarning, match=r"and \d+ steps take ~\d+ s; expect the run to overrun"):  # texts: no size
        texts = plan(stats=TEXTS, budget=5.0, at=speed(2.0), rung0_backbones=2)
    assert texts.rung0_s >= 1.0


def test_when_the_start_point_can_train_less_than_one_pass_rung0_gets_its_time():
    """30 s on digits with another machine's learned costs: no overrun, but 9 steps (0.2 of a pass) from a zero
    head, exported at 0.21, while rung 0 got nothing. Under one pass over the training rows rung 0 gets the time
    it wants; from a pass on it still may not cost the start point its steps."""
    import warnings

    per_pass = math.ceil(IMAGES.n_train / 32)
    with warnings.catch_warnings():
        # Before rung 0 took its time this was not the overrun case (7 steps planned, no warning); with it, the
        # start point's 4 steps may now be said to overrun by a second.
        warnings.simplefilter("ignore")
        short = plan(budget=35.0, at=speed(2.0), rung0_backbones=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        longer = plan(budget=40.0, at=speed(2.0), rung0_backbones=3)
    assert short.reports * short.report_rows < per_pass * 32
    assert short.rung0_s >= 2.0  # it was an eighth of what it wanted: 0.36 s
    assert longer.reports * longer.report_rows >= per_pass * 32 and longer.rung0_s < 1.0


def test_without_a_time_limit_the_retrain_still_has_its_planned_training_time():
    """What a retrain takes beyond its planned training is learned as Ray Train's start-up (stages.finalise):
    with no planned training (a run without a time budget), the whole retrain was recorded as start-up and
    later budgeted runs on that machine reserved far too much."""
    p = plan(budget=None)
    assert p.retrain and p.trial_s > 0
    assert p.retrain_fixed_s == Costs()["ray_train_startup_s"]
    assert p.retrain_s - p.retrain_fixed_s == pytest.approx(p.trial_s / p.retrain_speedup * IMAGES.n_full
                                                            / IMAGES.n_train)


def test_the_retrain_is_priced_as_it_runs_alone_with_the_nodes_cpus_not_at_the_searchs_pace():
    """Oxygen at 600 s: the retrain was priced at a search trial's pace (two side by side, one CPU each), held
    141 s and took 77 (its training about half its price), and the run ended at 89% of its budget. With no set-up
    or validation to dilute it, a step alone with both CPUs is Costs' concurrency_slowdown x thread_speedup
    cheaper than beside another trial on one."""
    costs = Costs()
    steps_only = lambda size: Speed(0.0, 0.5, 1e-12, 32, size or 32)  # noqa: E731
    for budget in (None, 3 * 3600):
        p = plan(budget=budget, at=steps_only)
        assert p.retrain and p.concurrency == 2 and p.regime == "search"
        assert p.retrain_speedup == pytest.approx(costs["concurrency_slowdown"] * costs["thread_speedup"])
        assert p.retrain_s - p.retrain_fixed_s == pytest.approx(p.trial_s / p.retrain_speedup * 1.2)
    # A run alone already trains with every CPU: nothing to re-price.
    alone = plan(at=steps_only, concurrency=1)
    assert alone.concurrency == 1 and alone.retrain_speedup == pytest.approx(1.0)


def test_a_start_point_shortened_to_fit_may_grow_back_to_its_sensible_length():
    """Alone all search long, the start point is planned as long as the probe says fits; if it runs ahead of
    that plan it may grow to its sensible length (loop.Pace), so an over-estimated probe leaves no time unused."""
    sensible = sensible_steps(True, math.ceil(500 / 32))
    single = plan(at=speed(0.75), others=scratch(0.05))
    assert single.regime == "single" and single.storage_size == 128
    assert single.report_rows * single.reports < 0.8 * sensible * 32
    assert single.stretch_rows == math.ceil(SINGLE_STRETCH * sensible * 32 / single.reports)
    assert plan(budget=3 * 3600).stretch_rows == 0  # a search's trials keep the length they are compared at


def test_a_start_point_alone_at_its_sensible_length_may_still_grow_when_it_runs_ahead():
    """Digits at 300 s: the start point, alone at its full sensible length, ended early (the probe over-priced its
    steps) and runs ended at 237 and 241 s. Alone, it may now grow past its sensible length into that time."""
    single = plan(budget=500, others=scratch(0.05))
    sensible = sensible_steps(True, math.ceil(500 / 32))
    assert single.regime == "single" and single.report_rows * single.reports >= sensible * 32
    assert single.stretch_rows == math.ceil(SINGLE_STRETCH * sensible * 32 / single.reports) > single.report_rows
    # With no cheaper backbone priced to use the time it leaves (text), it may grow further.
    sole = plan(budget=500)
    assert sole.regime == "single" and sole.reports == single.reports and sole.report_rows == single.report_rows
    assert sole.stretch_rows == math.ceil(SINGLE_STRETCH_SOLE * sensible * 32 / sole.reports)
    assert SINGLE_STRETCH_SOLE > SINGLE_STRETCH


def test_a_pinned_large_image_size_on_20000_images_plans_a_run_inside_a_four_minute_budget():
    """Measured (#25.13): 20,000 images pinned at 128 px, 3 s a step and 30 ms a validation row, 240 s: the plan
    ended its search at ~930 s (a validation of 2,000 rows per report, a search floored at one full trial) and the
    run took 902 s. Now validation is sized to the budget and the search ends inside it."""
    big = DataStats("image", n_train=16000, n_val=2000, n_full=18000, n_test=2000, image_side=128)
    slow = lambda size: Speed(5.0, 3.052, 0.03, 32, size or 128)  # noqa: E731
    pinned = load_space("cpu_small", "image", {"image_size": 128})
    p = plan(stats=big, budget=240.0, at=slow, pinned_size=128, space=pinned)
    assert p.storage_size == 128 and p.val_rows is not None and p.val_rows < 2000
    # The test's scoring still fits after it: the sample of the split a tenth of the budget buys (all of it took 60 s)
    assert p.search_ends_at_s <= 5.0 + 240.0 - TEST_SHARE * 240.0
    assert any("the final model is tested on a stratified ~" in r for r in p.reasons)
    assert p.trial_s <= p.search_ends_at_s - 5.0
    with pytest.warns(UserWarning, match="cannot pay for the shortest run"):
        tiny = plan(stats=big, budget=30.0, at=slow, pinned_size=128, space=pinned)
    assert any("cannot pay for the shortest run" in r for r in tiny.reasons)


def test_a_resumed_plan_ends_its_search_within_the_new_budget(tmp_path):
    """Resumed with a smaller budget, the saved plan's search ends as long before the new budget's end as it was
    planned to end before the old one's (before: the search got its old length again and overran)."""
    from automl.search.plan import Plan

    p = plan(budget=600.0)
    p.budget_s = 600.0
    p.save(tmp_path / "plan.json")
    tail = 600.0 - p.search_ends_at_s
    same = Plan.load(tmp_path / "plan.json", elapsed_s=5.0, budget_s=600.0)
    assert same.search_ends_at_s == pytest.approx(p.search_ends_at_s)
    less = Plan.load(tmp_path / "plan.json", elapsed_s=5.0, budget_s=300.0)
    assert less.search_ends_at_s == pytest.approx(300.0 - tail)
    assert less.last_start_at_s == pytest.approx(p.last_start_at_s - (600.0 - 300.0))
    assert any("ends 300 s earlier" in r for r in less.reasons)


SCRATCH = "timm/resnet10t:scratch"


def scratch(step: float, size: int = 128) -> dict:
    """A from-scratch backbone's measured speed (at the largest candidate size)."""
    return {SCRATCH: Speed(1.0, step, 0.001, 32, size, step / 1.6)}


def test_a_from_scratch_net_is_priced_at_its_own_step_and_trains_its_own_length():
    """Every candidate priced as itself (#24): a from-scratch net a fifth of the start point's cost a step trains
    its own sensible length (60 epochs of 16 steps here, against the fine-tune's 400 steps) yet a full-length
    trial of it costs less, so more of them fit the same time and they may start later; a dear one is priced dear,
    not at the start point's cost."""
    at = speed(0.02)
    start_step = at(128).step_s
    base = plan(at=at, budget=900)
    cheap, dear = plan(at=at, budget=900, others=scratch(start_step / 5)), plan(at=at, budget=900,
                                                                              others=scratch(start_step * 3))
    k = cheap.kinds[SCRATCH]
    assert k["report_rows"] * cheap.reports / 32 >= sensible_steps(False, math.ceil(500 / 32)) - cheap.reports
    assert k["report_rows"] > cheap.report_rows and k["trial_s"] < cheap.trial_s
    assert dear.kinds[SCRATCH]["trial_s"] > dear.trial_s
    # Its trials start until its own (shorter) run no longer fits; a dear one changes nothing there.
    assert cheap.last_start_at_s > base.last_start_at_s == dear.last_start_at_s
    assert (cheap.trial_s, cheap.report_rows, cheap.storage_size) == (base.trial_s, base.report_rows,
                                                                      base.storage_size)
    assert any(r.startswith(f"{SCRATCH} priced as itself") for r in cheap.reasons)


def test_where_the_start_point_runs_alone_a_scratch_start_point_gets_time_reserved_only_when_affordable():
    """In the single regime the from-scratch start point gets time reserved after the start point when that
    costs the start point neither its image size nor more than RUNG0_MAX_STEP_LOSS of its steps: the start point
    then ends its schedule that much earlier. Otherwise nothing is reserved (the reason says so) and it runs in
    whatever time the start point leaves."""
    at = speed(0.3)
    base = plan(at=at)
    cheap, dear = plan(at=at, others=scratch(0.01)), plan(at=at, others=scratch(0.3))
    assert base.regime == cheap.regime == dear.regime == "single"
    assert [p.get("backbone") for p in cheap.space.start_points] == ["efficientnet-lite0", SCRATCH]
    assert cheap.first_ends_at_s == pytest.approx(cheap.search_ends_at_s - cheap.kinds[SCRATCH]["trial_s"], abs=1)
    steps = lambda p: p.reports * p.report_rows  # noqa: E731
    assert cheap.storage_size == base.storage_size and steps(cheap) >= (1 - RUNG0_MAX_STEP_LOSS) * steps(base)
    assert [p.get("backbone") for p in dear.space.start_points] == ["efficientnet-lite0", SCRATCH]
    assert dear.first_ends_at_s is None and any(r.startswith(f"no time reserved for {SCRATCH}")
                                                for r in dear.reasons)
    assert dear.search_ends_at_s == base.search_ends_at_s and dear.report_rows == base.report_rows


def test_when_the_start_points_kind_no_longer_fits_the_searcher_starts_a_cheaper_kind(tmp_path, frozen_clock):
    """The searcher prices each suggestion by its backbone's kind: a from-scratch trial trains its own rows a
    report, and once a full-length fine-tune can no longer fit the time left, the next trial is of a kind that
    can (Optuna samples the rest of its config)."""
    from ray.tune.search import Searcher

    from automl.search.clock import FIT_MARGIN, MIN_FIT, write_deadlines
    from automl.search.tune import DeadlineOptunaSearch, tpe_sampler

    space = load_space("cpu_small", "image", {"max_epochs": 8, "report_rows": 400, "image_size": 48})
    clock = tmp_path / "clock.json"
    kinds = {SCRATCH: {"report_rows": 1000, "trial_s": 20.0}}
    points = [space.sampling_point(p) for p in space.start_points]
    s = DeadlineOptunaSearch(space, metric="val_accuracy", mode="max", sampler=tpe_sampler(0),
                             points_to_evaluate=points, deadline_file=str(clock))
    write_deadlines(str(clock), last_start_s=500.0, ends_in_s=1000.0, trial_s=100.0, kinds=kinds,
                    first_ends_in_s=900.0)
    first, second = s.suggest("a"), s.suggest("b")
    assert first["backbone"] == "efficientnet-lite0" and first["report_rows"] == 400
    assert first["_deadline"] == 1.7e9 + 900.0 and second["_deadline"] == 1.7e9 + 1000.0
    assert second["backbone"] == SCRATCH and second["report_rows"] == 1000     # its own length
    late_start = DeadlineOptunaSearch(space, metric="val_accuracy", mode="max", sampler=tpe_sampler(0),
                                      points_to_evaluate=points, deadline_file=str(clock))
    write_deadlines(str(clock), last_start_s=30.0, ends_in_s=15.0, trial_s=100.0, kinds=kinds)
    late_start.suggest("s1")                    # the first start point: full length, whatever the time
    assert late_start.suggest("s2")["report_rows"] == int(1000 * FIT_MARGIN * 15 / 20)  # the time it leaves
    gone = DeadlineOptunaSearch(space, metric="val_accuracy", mode="max", sampler=tpe_sampler(0),
                                points_to_evaluate=points, deadline_file=str(clock))
    write_deadlines(str(clock), last_start_s=-1.0, ends_in_s=5.0, trial_s=100.0, kinds=kinds)
    gone.suggest("g1")
    assert gone.suggest("g2") == Searcher.FINISHED  # no time for it, nor for anything else
    write_deadlines(str(clock), last_start_s=30.0, ends_in_s=30.0, trial_s=100.0, kinds=kinds)
    late = [s.suggest(f"c{i}") for i in range(4)]
    assert all(c["backbone"] == SCRATCH and c["report_rows"] == 1000 for c in late)  # 30 s left: fits 20 s
    # Past the last start (the start point's kind), a cheaper kind whose shortest schedule still fits starts, fitted
    # to the time left; once not even that fits, the search is over.
    write_deadlines(str(clock), last_start_s=-1.0, ends_in_s=15.0, trial_s=100.0, kinds=kinds)
    after = s.suggest("e")
    assert after["backbone"] == SCRATCH and after["report_rows"] == int(1000 * FIT_MARGIN * 15 / 20)
    assert after["_stretch_rows"] == 1000                                         # back to its own length if fast
    write_deadlines(str(clock), last_start_s=-1.0, ends_in_s=20.0 * MIN_FIT / FIT_MARGIN - 1, trial_s=100.0,
                    kinds=kinds)
    assert s.suggest("d") == Searcher.FINISHED


def _one_report(searcher, trial_id: str, config: dict, row_s: float, metric: str, score: float) -> None:
    """A trial's first report to the searcher: 320 rows at `row_s` a row, 0.5 s validating, 0.5 s set-up."""
    steps = 320 // config["batch_size"]
    searcher.on_trial_result(trial_id, {"steps": steps, "epoch_time_s": row_s * steps * config["batch_size"],
                                        "report_time_s": row_s * 320 + 0.5, "time_total_s": row_s * 320 + 1.0,
                                        metric: score, "training_iteration": 1})


def test_the_searcher_prices_a_config_class_it_has_timed_at_its_measured_pace(tmp_path, frozen_clock):
    """The plan prices every config as a full fine-tune; once trials of a class (backbone, layers trained) have
    reported, a config of that class is priced at what they took. A partial fine-tune four times cheaper than the
    plan's price trains its full length where the plan's price would have shortened it, and starts past the last
    start time while its shortest schedule still fits (the best-scoring class that fits first)."""
    from ray.tune.search import Searcher

    from automl.search.clock import FIT_MARGIN, MIN_FIT, write_deadlines
    from automl.search.tune import DeadlineOptunaSearch, tpe_sampler

    space = load_space("cpu_small", "text", {"max_epochs": 8, "report_rows": 400})
    clock = tmp_path / "clock.json"
    s = DeadlineOptunaSearch(space, metric="val_f1_macro", mode="max", sampler=tpe_sampler(0),
                             points_to_evaluate=[space.sampling_point(space.start_points[0])],
                             deadline_file=str(clock))

    def report(trial_id, config, row_s, score):
        _one_report(s, trial_id, config, row_s, "val_f1_macro", score)

    write_deadlines(str(clock), last_start_s=500.0, ends_in_s=1000.0, trial_s=100.0)
    start = s.suggest("a")
    report("a", start, 0.03, 0.6)                  # all layers: 0.5 + 8 * (400 * 0.03 + 0.5) = 100.5 s, as planned
    s._ot_study.enqueue_trial({"backbone": "minilm-l6", "unfreeze": 2})
    top2 = s.suggest("b")
    assert top2["unfreeze"] == 2 and top2["report_rows"] == 400
    report("b", top2, 0.0075, 0.5)                 # the top two layers: 0.5 + 8 * (3 + 0.5) = 28.5 s
    # 60 s left: a config priced as the plan prices it (100 s) would train 400 * 0.85 * 0.6 rows a report; one of
    # the measured partial class (28.5 s) trains its full length.
    write_deadlines(str(clock), last_start_s=30.0, ends_in_s=60.0, trial_s=100.0)
    s._ot_study.enqueue_trial({"backbone": "minilm-l6", "unfreeze": 2})
    c = s.suggest("c")
    assert (c["unfreeze"], c["report_rows"]) == (2, 400) and "_stretch_rows" not in c
    # Past the last start time, the searcher starts a measured class that still fits, the best-scoring first: with
    # 40 s left both fit (all layers at 35.5 s shortest), with 20 s only the partial fine-tune.
    write_deadlines(str(clock), last_start_s=-1.0, ends_in_s=40.0, trial_s=100.0)
    late = s.suggest("d")
    assert late["unfreeze"] == "all" and late["report_rows"] == int(400 * FIT_MARGIN * 40 / 100.5)
    write_deadlines(str(clock), last_start_s=-1.0, ends_in_s=20.0, trial_s=100.0)
    later = s.suggest("d2")
    assert later["unfreeze"] == 2 and later["report_rows"] == int(400 * FIT_MARGIN * 20 / 28.5)
    write_deadlines(str(clock), last_start_s=-1.0, ends_in_s=28.5 * MIN_FIT / FIT_MARGIN - 0.5, trial_s=100.0)
    assert s.suggest("e") == Searcher.FINISHED     # not even its shortest schedule fits


def test_the_searcher_reprices_the_plan_by_how_fast_the_start_point_ran_against_its_probe(tmp_path, frozen_clock):
    """The probes timed every kind in the same few seconds: where the start point then trains at a quarter of its
    price (the machine was busy while it planned), a scratch net priced from the same probes costs a quarter too,
    so it starts in the time the start point leaves, fitted to it, where the plan's price had ended the search (the
    README demo with a CPU-bound job beside its planning ended at 87% of its budget). Where the machine runs twice
    as slow as probed, a kind whose planned price still fits no longer starts. A config the plan did not time (a
    partial fine-tune) is priced at its own pace but says nothing about the machine."""
    from ray.tune.search import Searcher

    from automl.search.clock import FIT_MARGIN, MIN_FIT, read_drift, repriced_path, write_deadlines
    from automl.search.tune import DeadlineOptunaSearch, tpe_sampler

    space = load_space("cpu_small", "image", {"max_epochs": 8, "report_rows": 400, "image_size": 48})
    clock = tmp_path / "clock.json"
    kinds = {SCRATCH: {"report_rows": 1000, "trial_s": 80.0}}
    points = [space.sampling_point(space.start_points[0])]

    def ran(full_s: float, planned_s: float) -> DeadlineOptunaSearch:
        """A searcher whose start point (priced `planned_s`) reported at the pace of a `full_s` full length."""
        s = DeadlineOptunaSearch(space, metric="val_accuracy", mode="max", sampler=tpe_sampler(0),
                                 points_to_evaluate=points, deadline_file=str(clock))
        write_deadlines(str(clock), last_start_s=500.0, ends_in_s=1000.0, trial_s=planned_s, kinds=kinds)
        start = s.suggest("a")
        row_s = ((full_s - 0.5) / 8 - 0.5) / 400       # 0.5 s set-up, 8 reports of 400 rows and 0.5 s validating
        _one_report(s, "a", start, row_s, "val_accuracy", 0.9)
        return s

    fast = ran(100.0, planned_s=400.0)
    assert fast.paces.drift() == pytest.approx(0.25)
    noted = repriced_path(str(clock))  # what the progress view shows and the card states, once it re-priced by it
    assert read_drift(noted) == 1.0
    # 20 s left, past the plan's last start: the start point's kind (100 s as measured) no longer fits; the scratch
    # net, 80 s as priced (its shortest schedule 28 s), would not either, but at 20 s as the machine runs it does.
    write_deadlines(str(clock), last_start_s=-1.0, ends_in_s=20.0, trial_s=400.0, kinds=kinds)
    late = fast.suggest("b")
    assert late["backbone"] == SCRATCH and late["report_rows"] == int(1000 * FIT_MARGIN * 20 / 20)
    assert read_drift(noted) == pytest.approx(0.25)
    assert late["_deadline"] == 1.7e9 + 20.0
    slow = ran(200.0, planned_s=100.0)
    assert slow.paces.drift() == pytest.approx(2.0)
    # 12 s left: as priced (20 s) the scratch net's shortest schedule (7 s) fits; at twice that (14 s) it does not.
    write_deadlines(str(clock), last_start_s=-1.0, ends_in_s=12.0, trial_s=100.0, kinds={
        SCRATCH: {"report_rows": 1000, "trial_s": 20.0}})
    assert slow.suggest("b") == Searcher.FINISHED and read_drift(noted) == pytest.approx(2.0)
    # Nor, with no kind priced, does a config start before the plan's last start (its shortest schedule of 100 s,
    # 35 s, would fit the 60 s left) where the start point's kind, 200 s as the machine runs, cannot train its 71.
    write_deadlines(str(clock), last_start_s=60.0 - 100.0 * MIN_FIT / FIT_MARGIN, ends_in_s=60.0, trial_s=100.0)
    assert slow.suggest("b2") == Searcher.FINISHED
    # A partial fine-tune a quarter of the plan's full price is a cheaper config, not a faster machine.
    slow._ot_study.enqueue_trial({"backbone": "efficientnet-lite0", "unfreeze": 1})
    write_deadlines(str(clock), last_start_s=500.0, ends_in_s=1000.0, trial_s=100.0, kinds=kinds)
    _one_report(slow, "c", slow.suggest("c"), 0.001, "val_accuracy", 0.8)
    assert slow.paces.drift() == pytest.approx(2.0) and read_drift(noted) == pytest.approx(2.0)


def test_a_search_saved_before_the_plans_prices_were_kept_resumes_its_paces_without_drift():
    """The searcher (and its Paces) is pickled in the experiment's state; one saved by the version before the
    re-pricing has no plan prices, and a resume after an upgrade must not fail on them."""
    import pickle

    from automl.search.clock import Paces

    old = Paces(4)
    old.start("t", {"backbone": "b", "unfreeze": "all", "batch_size": 8}, 80)
    old.observe("t", {"steps": 10, "epoch_time_s": 8.0, "report_time_s": 9.0, "time_total_s": 10.0})
    del old.planned  # as that version pickled it
    resumed = pickle.loads(pickle.dumps(old))
    assert resumed.drift() == 1.0 and resumed.repriced({"trial_s": 50.0}) == {"trial_s": 50.0}
    assert resumed.trial_s({"backbone": "b", "unfreeze": "all"}) == pytest.approx(1.0 + 4 * (80 * 0.1 + 1.0))


def test_the_plans_deadlines_reach_the_search_as_one_limits_object_measured_from_the_searchs_start():
    from automl.search.clock import SearchLimits
    from automl.search.plan import Plan
    from automl.search.tune import SearchConfig, SearchStorage

    space = load_space("cpu_small", "image", {"max_epochs": 4})
    plan = Plan(space, 32, {"cpu": 1}, 2, 1, search_ends_at_s=200.0, last_start_at_s=150.0, max_trials=None,
                trial_s=60.0, stretch_rows=640, kinds={"timm/resnet10t:scratch": {"report_rows": 96, "trial_s": 20.0}},
                first_ends_at_s=170.0)
    lim = plan.search_limits(elapsed_s=50.0)
    assert (lim.time_budget_s, lim.last_start_s, lim.first_ends_s) == (150.0, 100.0, 120.0)
    assert (lim.trial_s, lim.stretch_rows, lim.kinds) == (60.0, 640, plan.kinds)
    # A search that starts at its deadline still gets a few seconds (Tune needs a positive budget); a trial may not
    # start any more (a negative last start).
    late = plan.search_limits(elapsed_s=199.0)
    assert late.time_budget_s == 5.0 and late.last_start_s == -49.0
    # Without a time budget the plan must bound the search by a trial count: the limits refuse to be endless.
    with pytest.raises(ValueError, match="time_budget_s or max_trials"):
        SearchLimits()
    with pytest.raises(ValueError, match="concurrency must be >= 1"):
        SearchConfig("accuracy", SearchStorage("/tmp/x", "s"), SearchLimits(max_trials=2), {"cpu": 1}, concurrency=0)
    with pytest.raises(ValueError, match="needs CPUs or a GPU"):
        SearchConfig("accuracy", SearchStorage("/tmp/x", "s"), SearchLimits(max_trials=2), {"cpu": 0})


def test_the_time_held_after_the_search_prices_a_kept_trial_at_its_model_build_and_the_nodes_cpus():
    """Finalising loads kept trials (a model build each, not a trial's whole set-up with its data and warm-up step)
    and scores them in the driver with every CPU: priced as trials, it held back a quarter of 300 s of text."""
    def text_speed(build_s, eval_row_s=0.02):
        return lambda size: Speed(12.0, 2.6, eval_row_s, 32, None, 1.5, build_s)

    whole, built = plan(TEXTS, at=text_speed(None)), plan(TEXTS, at=text_speed(1.0))
    # TOP_TRIALS loads; their validation probabilities are the trials' own (saved), and a soup's ingredients are
    # scored on the validation rows: SOUP_PASSES passes are held for them.
    loads, rows = 5, TEXTS.n_val
    assert built.search_ends_at_s - whole.search_ends_at_s == pytest.approx(loads * (0.5 * 12.0 - 1.0), abs=0.1)
    assert built.trial_s > whole.trial_s  # the start point alone trains in the time given back
    slower_rows = plan(TEXTS, at=text_speed(1.0, eval_row_s=0.04))
    per_row = 0.02 / Costs()["thread_speedup"]  # a row costs what it costs with every CPU, not one trial's
    assert built.search_ends_at_s - slower_rows.search_ends_at_s == pytest.approx(
        (SOUP_PASSES * rows + TEXTS.n_test) * per_row, abs=0.1)


def test_an_accelerators_one_off_warm_up_is_charged_once_before_the_search():
    """A trial process's first model on a GPU pays one-off costs (measure_speed's warmup_s: ~10 s on an H200);
    the plan takes them off the search's time once, not off every trial (which would price each trial as if it
    ran in a fresh process, as the set-up did before)."""
    warm = speed()
    cold = lambda size: replace(warm(size), warmup_s=20.0)  # noqa: E731
    a, b = plan(budget=600, at=warm), plan(budget=600, at=cold)
    assert a.search_ends_at_s - b.search_ends_at_s == pytest.approx(20.0, abs=1.0)
    assert a.trial_s == pytest.approx(b.trial_s, rel=0.05)


@pytest.mark.parametrize("side, sizes", [(8, [48]), (100, [32, 104])])
def test_the_speed_probe_times_a_second_size_only_where_the_plan_can_choose_one(digits_df, monkeypatch, side, sizes):
    """A pretrained start point trains at 48 px or more: on images no larger (8 px digits) the plan has one size, and
    a probe at 32 px only spent budget (~2.5 s of 60 on digits); larger images are timed at two sizes and priced
    in between."""
    from automl.data.intake import prepare
    from automl.search import probes
    from automl.training.loop import full_config

    timed = []
    monkeypatch.setattr(probes, "measured_speed", lambda task, cfg, res, ml, nc, size, tr, va, **k:
                        timed.append(size) or Speed(1.0, 0.1 * size, 0.001, 32, size))
    task = prepare(digits_df)
    start = full_config(load_space("cpu_small", "image").default_config())
    speed_at = probes.speed_probe(task, start, {"cpu": 1}, None, 2, side=side)
    for size in (None, 48, sizes[-1]):
        speed_at(size)
    assert sorted(timed) == sizes
    assert speed_at(48).step_s == pytest.approx(0.1 * (sizes[-1] if len(sizes) == 1 else 48), rel=0.3)


def test_a_run_without_a_time_budget_times_no_training_step(digits_df, monkeypatch, tmp_path):
    """Nothing is priced without a time budget, so nothing is timed (a probe cost each such run 2-15 s): the plan
    gets a nominal speed, says its length is not timed, and a start backbone that cannot load still fails
    there, so the next one takes its place."""
    from types import SimpleNamespace

    from automl import stages
    from automl.data.intake import prepare
    from automl.errors import ModelLoadError
    from automl.search import probes

    timed = []
    monkeypatch.setattr(probes, "measured_speed", lambda *a, **k: timed.append(a[5]) or Speed(1.0, 0.1, 0.001, 32, a[5]))
    prepared = stages.Prepared(prepare(digits_df), "accuracy", tmp_path)
    space = load_space("cpu_small", "image")
    node = SimpleNamespace(node_cpus=2, max_concurrency=lambda res: 2)
    *_, speed_at, others = stages._start_and_speed(prepared, space, {"cpu": 1}, node, 0, budget_left=None)
    assert timed == [] and others == {} and speed_at(48).measured is False
    planned = plan(DataStats("image", 150, 45, 195, 45, image_side=8), budget=None, at=speed_at, max_trials=2)
    assert "not timed: no time budget" in planned.reasons[0] and "ms/step" not in planned.reasons[0]
    *_, speed_at, _ = stages._start_and_speed(prepared, space, {"cpu": 1}, node, 0, budget_left=lambda: 300.0)
    assert timed and speed_at(48).measured is True  # with a budget the probe times the start point
    broken = space.with_overrides({"backbone": "timm/no_such_model:scratch"})
    with pytest.raises(ModelLoadError):
        stages._start_and_speed(prepared, broken, {"cpu": 1}, node, 0, budget_left=None)


def test_one_trials_cpus_are_timed_only_where_trials_could_run_side_by_side(digits_df, monkeypatch):
    """fortunes at 300 s on 2 cores: timing a MiniLM step on one core (4 s a step) took 12 s of a 26 s plan whose
    start point then ran alone with both. The probe times each size with every CPU first; where even that price
    leaves no room for trials side by side, nothing is timed on one trial's CPUs there, and the plan is the one
    it would have made with them."""
    from automl.data.intake import prepare
    from automl.search import probes
    from automl.search.plan import could_share
    from automl.training.loop import full_config

    timed = []

    def measured(task, cfg, res, ml, nc, size, tr, va, alone_only=False, thread_speedup=1.5):
        timed.append((size, alone_only))
        step_alone = 0.2 * (size / 32) ** 2
        one = step_alone * 1.8  # one core of two: slower than the estimate (1.5x), as measured for MiniLM
        if alone_only:
            return Speed(1.0, step_alone * thread_speedup, 0.002 * thread_speedup, 32, size, step_alone,
                         one_trial_timed=False)
        return Speed(1.0, one, 0.002 * 1.8, 32, size, step_alone)

    monkeypatch.setattr(probes, "measured_speed", measured)
    task = prepare(digits_df)
    space = load_space("cpu_small", "image")
    start = full_config(space.default_config())
    stats = DataStats("image", 1200, 300, 1500, 300, image_side=100)
    costs = Costs()

    def probe(budget):
        timed.clear()
        shares = lambda sp: could_share(sp, stats, space, budget, costs, True, 2)  # noqa: E731
        return probes.speed_probe(task, start, {"cpu": 1}, None, 2, side=100, shares=shares)

    short = probe(120.0)
    assert timed == [(32, True), (104, True)] and short.alone_only  # every CPU only, at either size
    long_ = probe(3600.0)
    assert timed == [(32, True), (32, False), (104, True), (104, False)] and not long_.alone_only  # both
    assert not short(48).one_trial_timed and long_(48).one_trial_timed
    for budget, at in ((120.0, short), (3600.0, long_)):
        full = plan(stats=stats, budget=budget, at=at)
        both = plan(stats=stats, budget=budget, at=lambda size: measured(None, None, None, None, 2, size or 32,
                                                                           None, None))
        assert (full.regime, full.storage_size) == (both.regime, both.storage_size)
    assert plan(stats=stats, budget=120.0, at=short).regime == "single"
    assert plan(stats=stats, budget=3600.0, at=long_).regime in ("search", "narrow")


def test_a_trial_is_charged_the_validations_it_will_run_not_twelve():
    """Validation is kept within a fifth of a trial's training, so where it is dear (MiniLM on a CPU) a trial reports
    fewer than 12 times. The plan charged 12 validations whatever the reports: ~20 s of 300 on fortunes that the
    start point, alone, then did not train (the run ended 26 s early)."""
    def text_speed(size):
        return Speed(3.0, 3.3, 0.04, 32, None, 2.2, 0.1)

    texts = DataStats("text", n_train=1000, n_val=400, n_full=1400, n_test=200, token_p95=40)
    p = plan(texts, at=text_speed)
    assert p.regime == "single" and 4 < p.reports < 12 and p.val_rows == 200  # validation sized to the budget
    steps = p.reports * p.report_rows / 32
    one_validation = p.val_rows * 0.04 * (2.2 / 3.3)  # with both CPUs, as the trial alone runs it
    # (the reports are a whole number: a share of one validation more is charged than run at most)
    assert p.trial_s == pytest.approx(3.0 + steps * 2.2 + p.reports * one_validation, rel=0.03)


def test_a_large_test_split_is_priced_at_a_tenth_of_the_budget_and_its_sample_said():
    """Measured: 100,000 short texts at 240 s scored all 5,000 test rows in 81 s, where the fine-tune had 111 s. The
    test now costs at most TEST_SHARE of the budget: the search ends where it would with only the rows that buys,
    and the plan says the test is a sample. A split that fits in that share is priced, and scored, whole."""
    from automl.search.plan import MIN_TEST_ROWS

    big = DataStats("text", n_train=80000, n_val=10000, n_full=90000, n_test=5000, token_p95=56)
    at = lambda size: Speed(3.0, 0.53, 0.016, 32, None)  # noqa: E731  (16 ms a validation row, as measured)
    alone = {"resources": {"cpu": 2}}  # the trial's CPUs are the node's: a row costs what the probe measured
    sampled = plan(stats=big, budget=240.0, at=at, **alone)
    buys = int(TEST_SHARE * 240.0 / 0.016)
    assert MIN_TEST_ROWS < buys < 5000
    as_if = plan(stats=replace(big, n_test=buys), budget=240.0, at=at, **alone)
    assert sampled.search_ends_at_s == pytest.approx(as_if.search_ends_at_s)
    said = [r for r in sampled.reasons if "tested on" in r]  # (the validation rows' reason no longer says "whole")
    assert said == [f"the final model is tested on a stratified ~{buys} of the 5000 test rows (scoring all would "
                    "take ~80 s, more than 10% of the budget); the card says how many"], said
    assert not any("tested on a stratified" in r for r in as_if.reasons)
    # Three times the budget buys the whole split: it is priced whole, and nothing is said
    roomy = plan(stats=big, budget=3 * 3600.0, at=at, **alone)
    assert not any("tested on a stratified" in r for r in roomy.reasons)
