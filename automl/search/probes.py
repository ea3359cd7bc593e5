"""Speed probes: what a step of the start point and of the space's from-scratch nets costs on this machine, on a
sample of real rows at the sizes the plan may choose (search/plan.py prices every candidate from these)."""
from __future__ import annotations

import numpy as np

from automl import modalities, models
from automl.budget import DEFAULT_COSTS
from automl.data.intake import TaskData
from automl.errors import AutoMLError
from automl.search.space import SearchSpace
from automl.training.loop import full_config


def pretrained(name) -> bool:
    """Whether a backbone name stands for pretrained weights (False when it cannot be resolved)."""
    try:
        return models.resolve(name).pretrained
    except AutoMLError:
        return False


def speed_probe(task: TaskData, start: dict, res: dict, max_length: int | None, node_cpus: int,
                side: int | None = None, pinned: int | None = None, shares=None,
                thread_speedup: float = DEFAULT_COSTS["thread_speedup"]):
    """speed_at(size): the start point's measured speed on a sample of real rows (inputs with a size the plan
    chooses, images: at two sizes, scaled with the pixel count in between; at one where the plan can choose only
    one). side: the inputs' median size; pinned: the size the user pinned, if any.

    shares(speed) -> bool (search/plan.could_share): whether trials could still run side by side at the start
    point's speed with every CPU of the node, at the size it was timed at. Where they cannot, nothing is timed
    on one trial's CPUs at that size (the plan reads that only for trials side by side): that cost 12 s of
    fortunes' 26 s plan at 300 s (a MiniLM step is 4 s on one core of two) and the start point then ran alone.
    The one-trial figures are then the node's times `thread_speedup` (Speed.one_trial_timed is False)."""
    from automl.search.plan import MAX_IMAGE, MAX_IMAGE_CPU, MIN_IMAGE, Speed, min_image

    adapter = modalities.get(task.modality)
    rng = np.random.default_rng(0)
    tr = rng.permutation(task.splits["train"])[:64]
    va = rng.permutation(task.splits["validation"])[:64]
    memo: dict = {}
    probe_hi = None
    if adapter.sized:
        smallest = min_image(models.resolve(start["backbone"]).pretrained)
        # Timed at the largest size the plan may choose (interpolating by pixel count from 96 px under-estimated
        # EfficientNet-Lite0 at 128 px by 30%, and the start point was cut by the budget mid-schedule).
        probe_hi = min(MAX_IMAGE if res.get("gpu") else MAX_IMAGE_CPU, max(smallest, -(-(side or smallest) // 8) * 8))
    # Each size is timed with every CPU first; one trial's CPUs only where trials could share the node at that
    # price (a second set-up: what a budget large enough for that pays).
    split = shares is not None and node_cpus > int(res.get("cpu", 1)) and not res.get("gpu")

    def measure(size):
        if size not in memo:
            timed = lambda alone_only: measured_speed(task, start, res, max_length, node_cpus, size, tr, va,  # noqa
                                                      alone_only=alone_only, thread_speedup=thread_speedup)
            sp = timed(True) if split else None
            memo[size] = sp if sp is not None and not shares(sp) else timed(False)
        return memo[size]

    # Images no larger than the smallest size the start backbone trains at (digits, 48 px icons) leave the plan one
    # size: a second probe at 32 px would only spend budget (~2.5 s of 60 on digits, 2 cores).
    one_size = adapter.sized and pinned is None and probe_hi == smallest

    def speed_at(size):
        if one_size:
            return measure(probe_hi)
        if not adapter.sized or size is None or size <= MIN_IMAGE:
            return measure(MIN_IMAGE if adapter.sized else None)
        # Two probes (32 px and the largest size) and the cost in between grows with the pixel count.
        lo, hi = measure(MIN_IMAGE), measure(probe_hi)
        if hi.size == lo.size:
            return lo
        frac = (size ** 2 - MIN_IMAGE ** 2) / (hi.size ** 2 - MIN_IMAGE ** 2)
        # Monotone in the size: never below the cheaper probe (a GPU can time 96 px faster than 32 px).
        mix = lambda a, b: max(min(a, b), a + (b - a) * frac)  # noqa: E731
        alone = mix(lo.step_s_alone, hi.step_s_alone) if lo.step_s_alone and hi.step_s_alone else None
        build = mix(lo.build_s, hi.build_s) if lo.build_s is not None and hi.build_s is not None else None
        return Speed(mix(lo.setup_s, hi.setup_s), mix(lo.step_s, hi.step_s), mix(lo.eval_row_s, hi.eval_row_s),
                     lo.batch_size, size, alone, build, max(lo.warmup_s, hi.warmup_s),
                     one_trial_timed=lo.one_trial_timed and hi.one_trial_timed)

    # Measured now, not when the plan first asks: the plan reads the time left after this returns, and must not
    # size the search for seconds the probes then spend.
    speed_at(probe_hi)
    speed_at.largest = probe_hi
    speed_at.alone_only = not speed_at(probe_hi).one_trial_timed
    return speed_at


def nominal_speed(task: TaskData, start: dict, pinned: int | None = None):
    """speed_at(size) for a run without a time budget: nothing is priced, so nothing is timed (a probe cost each
    such run 2-15 s). The plan then reads only how a validation row compares with a training step (how often to
    validate): a validation row at 0.4 of a training row's share of a step, as probes measured it (Lite0 at
    128 px 0.36, MiniLM 0.43; 2 cores). The start backbone is built once, so one that cannot load gives way to the
    next as it does with a probe."""
    import time

    from automl.search.plan import Speed
    from automl.training.loop import build_model

    adapter = modalities.get(task.modality)
    t0 = time.perf_counter()
    build_model(start, task.num_classes)  # raises ModelLoadError for weights that cannot load
    build_s = time.perf_counter() - t0
    bs = int(start["batch_size"])

    def speed_at(size):
        return Speed(0.0, 1.0, 0.4 / bs, bs, size if adapter.sized else None, None, build_s, 0.0, measured=False)

    speed_at.largest = pinned  # no size is timed, so no scratch net is priced at one (scratch_speeds)
    return speed_at


def measured_speed(task: TaskData, cfg: dict, res: dict, max_length: int | None, node_cpus: int,
                   size: int | None, tr: np.ndarray, va: np.ndarray, alone_only: bool = False,
                   thread_speedup: float = DEFAULT_COSTS["thread_speedup"]):
    """One config's speed on rows `tr`/`va` at an image size (None: text), timed as a trial runs: with its own
    CPUs, and with a whole node's when it runs alone (alone_only: with the node's alone, the trial's own then
    estimated as `thread_speedup` times slower)."""
    from automl.data.trial_data import TrialData
    from automl.search.plan import Speed

    adapter = modalities.get(task.modality)
    pick = lambda idx: adapter.rows(task, idx, size)  # noqa: E731
    data = TrialData(task.modality, task.num_classes, pick(tr), task.y[tr], pick(va), task.y[va],
                     task="regression" if task.task == "regression" else "classification")
    cfg = {**cfg, "image_size": size or cfg.get("image_size"), "max_length": max_length or 64}
    # Text steps are priced at the padding of batches of the training rows, not of the probe's 64 (loop.Batches).
    sample = None if adapter.sized else pick(np.random.default_rng(1).permutation(task.splits["train"])[:PAD_ROWS])
    timed = lambda threads: _timed_where_trials_run(res, cfg, data, threads, sample)  # noqa: E731
    mine, alone = int(res.get("cpu", 1)), int(node_cpus)
    if alone_only and alone > mine:
        m = timed((alone,))
        return Speed(m["setup_s"], m["step_s"] * thread_speedup, m["eval_row_s"] * thread_speedup,
                     m["batch_size"], size, m["step_s"], m.get("build_s"), m.get("warmup_s", 0.0),
                     one_trial_timed=False)
    m = timed((mine, alone) if alone > mine else (mine,))
    return Speed(m["setup_s"], m["step_s"], m["eval_row_s"], m["batch_size"], size, m.get(f"step_s_{alone}"),
                 m.get("build_s"), m.get("warmup_s", 0.0))


def scratch_speeds(task: TaskData, space: SearchSpace, res: dict, size: int | None,
                   max_length: int | None, alone_on: int | None = None,
                   thread_speedup: float = DEFAULT_COSTS["thread_speedup"]) -> dict:
    """The space's from-scratch backbones, each timed at `size` (the largest the plan may choose), so the plan
    prices them as themselves (search/plan.price_kinds); none when the start point is itself from scratch.
    alone_on: the node's CPUs, where trials cannot run side by side (they are timed as they will run: alone)."""
    start = full_config(space.default_config())
    spec = space.parameters.get("backbone", {})
    values = list(spec.get("values") or []) if isinstance(spec, dict) else []
    if not pretrained(start["backbone"]):
        return {}
    rng = np.random.default_rng(1)
    tr = rng.permutation(task.splits["train"])[:64]
    va = rng.permutation(task.splits["validation"])[:64]
    out = {}
    for b in values:
        if b == start["backbone"] or pretrained(b):
            continue
        point = next((p for p in space.start_points if p.get("backbone") == b), {})
        cfg = full_config(space.fit_point({**start, **point, "backbone": b}))
        try:
            # With a trial's own CPUs only (the plan scales that for a trial alone): each probe is budget the start
            # point does not train with (two nets at 128 px, timed twice each, cost it ~10 s of 300).
            out[b] = measured_speed(task, cfg, res, max_length, alone_on or int(res.get("cpu", 1)), size, tr, va,
                                    alone_only=bool(alone_on), thread_speedup=thread_speedup)
        except AutoMLError:
            continue  # it cannot be built here: the search drops it when a trial tries (as before)
    return out


PAD_ROWS = 2048  # training rows whose batches' padding prices a text step (a pass of 64 batches of 32)


def _timed_where_trials_run(res: dict, cfg: dict, data, threads: tuple[int, ...], sample=None) -> dict:
    """measure_speed on the device trials will use: here when this process has it (or trials use no GPU), else
    in a Ray task holding a trial's GPU (a cluster whose driver has none must not plan GPU trials at CPU speed)."""
    import torch

    from automl.runtime import device
    from automl.training.loop import measure_speed

    if not res.get("gpu"):
        return measure_speed(cfg, data, device=torch.device("cpu"), steps=3, threads=threads, train_sample=sample)
    if device().type != "cpu":
        return measure_speed(cfg, data, device=device(), steps=3, threads=threads, train_sample=sample)
    import ray

    from automl.plugins import snapshot

    task = ray.remote(num_cpus=res.get("cpu", 1), num_gpus=res["gpu"])(_measure_in_worker)
    return ray.get(task.remote(cfg, data, threads, snapshot(), sample))


def _measure_in_worker(cfg: dict, data, threads: tuple[int, ...], plugins: dict, sample=None) -> dict:
    from automl.plugins import install
    from automl.training.loop import measure_speed

    install(plugins)  # the user's registered backbones and policies, as trials get them
    return measure_speed(cfg, data, steps=3, threads=threads, train_sample=sample)
