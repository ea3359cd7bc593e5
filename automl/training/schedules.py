"""Learning-rate schedules, keyed by name. Each steps once per optimizer step.

Adding one is one function: decorate `fn(optimizer, total_steps, warmup_steps, config)`
returning a torch LR scheduler with `@register_schedule("name")`.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.optim.lr_scheduler import LRScheduler

from automl.plugins import put

ScheduleFn = Callable[[torch.optim.Optimizer, int, int, dict], LRScheduler]
_SCHEDULES: dict[str, ScheduleFn] = {}


def register_schedule(name: str):
    def deco(fn: ScheduleFn) -> ScheduleFn:
        put(_SCHEDULES, name, fn, "schedule")
        return fn
    return deco


def list_schedules() -> list[str]:
    return sorted(_SCHEDULES)


def create(name: str, optimizer: torch.optim.Optimizer, total_steps: int, warmup_frac: float, config: dict) -> LRScheduler:
    if name not in _SCHEDULES:
        raise KeyError(f"Unknown LR schedule {name!r}; registered: {list_schedules()}")
    total_steps = max(1, int(total_steps))
    warmup = int(round(max(0.0, min(warmup_frac, 0.5)) * total_steps))
    return _SCHEDULES[name](optimizer, total_steps, warmup, config)


@register_schedule("constant")
def _constant(opt, total, warmup, cfg):
    from transformers import get_constant_schedule_with_warmup
    return get_constant_schedule_with_warmup(opt, warmup)


@register_schedule("linear")
def _linear(opt, total, warmup, cfg):
    from transformers import get_linear_schedule_with_warmup
    return get_linear_schedule_with_warmup(opt, warmup, total)


@register_schedule("cosine")
def _cosine(opt, total, warmup, cfg):
    from transformers import get_cosine_schedule_with_warmup
    return get_cosine_schedule_with_warmup(opt, warmup, total)


@register_schedule("cosine_restarts")
def _cosine_restarts(opt, total, warmup, cfg):
    from transformers import get_cosine_with_hard_restarts_schedule_with_warmup
    return get_cosine_with_hard_restarts_schedule_with_warmup(opt, warmup, total, num_cycles=int(cfg.get("restarts", 2)))


@register_schedule("step")
def _step(opt, total, warmup, cfg):
    from torch.optim.lr_scheduler import LinearLR, SequentialLR, StepLR
    # Decay by 10x at 1/3 and 2/3 of the steps after warmup.
    step = StepLR(opt, step_size=max(1, (total - warmup) // 3), gamma=float(cfg.get("step_gamma", 0.1)))
    if warmup == 0:
        return step
    return SequentialLR(opt, [LinearLR(opt, start_factor=1e-3, total_iters=warmup), step], milestones=[warmup])


@register_schedule("onecycle")
def _onecycle(opt, total, warmup, cfg):
    from torch.optim.lr_scheduler import LambdaLR, OneCycleLR
    if total < 4:  # too few steps for a cycle (torch divides by zero when a phase has no length)
        return LambdaLR(opt, lambda _: 1.0)
    # One-cycle has its own warm-up phase: the warmup fraction sets its length (at least two steps).
    pct = min(max(warmup / total, 0.05, 2.0 / total), 0.5)
    return OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=total, pct_start=pct,
                      anneal_strategy="cos", cycle_momentum=False)
