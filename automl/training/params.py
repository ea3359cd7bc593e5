"""Every hyperparameter a trial understands: its default and the values it accepts.

The training loop reads defaults from here; search spaces are checked against
it when they load (a misspelt schedule fails before Ray starts, not in every
trial). Registered names (schedules, augmentation policies, backbones) are
looked up in their registries, so adding one needs no change here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Param:
    default: Any
    expected: str                                  # the accepted values, in words
    accepts: Callable[[Any], bool]
    choices: Callable[[], list] | None = None      # for named values: the registry's current names


def _num(low=None, high=None, integer=False, low_open=False):
    def ok(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and float(v) != int(v)):
            return False
        return (low is None or (v > low if low_open else v >= low)) and (high is None or v <= high)
    return ok


def _schedules():
    from automl.training.schedules import list_schedules
    return list_schedules()


def _image_policies():
    from automl.training.augment import list_image_policies
    return list_image_policies()


def _text_policies():
    from automl.training.augment import list_text_policies
    return list_text_policies()


def _backbone_ok(v) -> bool:
    from automl.models import is_backbone_name
    return is_backbone_name(v)


PARAMS: dict[str, Param] = {
    "backbone": Param(None, "a backbone name: a registered alias, 'timm/<model>', 'hf/<id or dir>' or "
                      "'automl:<export dir>'", _backbone_ok),
    "image_size": Param(32, "'auto' (from the data) or an integer >= 8", lambda v: v == "auto" or _num(8, 1024, True)(v)),
    "max_length": Param(64, "'auto' (from the data) or an integer >= 4", lambda v: v == "auto" or _num(4, 8192, True)(v)),
    "unfreeze": Param("all", "'all' or the number of top blocks to train (0 = head only)",
                      lambda v: v == "all" or _num(0, None, True)(v)),
    "gradual_unfreeze_every": Param(0, "an integer >= 0 (reports between unfreezing steps; 0 = off)", _num(0, None, True)),
    "layer_decay": Param(1.0, "a number in (0, 1]", _num(0, 1, low_open=True)),
    "augment": Param("none", "a registered image augmentation policy", lambda v: v in _image_policies(), _image_policies),
    "mix": Param("none", "'none', 'mixup' or 'cutmix'", lambda v: v in ("none", "mixup", "cutmix"),
                 lambda: ["none", "mixup", "cutmix"]),
    "mix_alpha": Param(0.2, "a number > 0", _num(0, None, low_open=True)),
    "text_augment": Param("none", "a registered text augmentation policy", lambda v: v in _text_policies(),
                          _text_policies),
    "text_aug_rate": Param(0.1, "a number in [0, 1)", _num(0, 0.999)),
    "batch_size": Param(32, "an integer >= 1", _num(1, None, True)),
    "dropout": Param(0.0, "a number in [0, 1)", _num(0, 0.999)),
    "drop_path": Param(0.0, "a number in [0, 1)", _num(0, 0.999)),
    "optimizer": Param("adamw", "'adamw' or 'sgd'", lambda v: v in ("adamw", "sgd"), lambda: ["adamw", "sgd"]),
    "lr": Param(1e-3, "a number > 0", _num(0, 10, low_open=True)),
    "weight_decay": Param(1e-4, "a number >= 0", _num(0, 10)),
    "momentum": Param(0.9, "a number in [0, 1)", _num(0, 0.999)),
    "schedule": Param("cosine", "a registered LR schedule", lambda v: v in _schedules(), _schedules),
    "warmup_frac": Param(0.0, "a number in [0, 0.5]", _num(0, 0.5)),
    "restarts": Param(2, "an integer >= 1 (cosine_restarts cycles)", _num(1, None, True)),
    "step_gamma": Param(0.1, "a number in (0, 1] (step schedule decay)", _num(0, 1, low_open=True)),
    "label_smoothing": Param(0.0, "a number in [0, 1)", _num(0, 0.999)),
    "class_weighted": Param(False, "true or false", lambda v: isinstance(v, bool)),
    "grad_clip": Param(0.0, "a number >= 0 (0 = off)", _num(0)),
    "l2sp": Param(0.0, "a number >= 0", _num(0)),
    "init": Param("zero", "'zero' or 'probe' (rung 0's best linear head: LP-FT)", lambda v: v in ("zero", "probe"),
                  lambda: ["zero", "probe"]),
    "seed": Param(0, "an integer >= 0", _num(0, None, True)),
    # Not searched: batches of rows with lengths (text) are cut from rows of similar length (loop.Batches).
    "length_grouped": Param(True, "true or false", lambda v: isinstance(v, bool)),
    # Not searched: a text model's training steps run under bf16 autocast on a CPU with AMX (runtime.cpu_bf16).
    "cpu_bf16": Param(True, "true or false", lambda v: isinstance(v, bool)),
    # Set by the plan, not searched: training rows between two reports (0: one pass over the data).
    "report_rows": Param(0, "an integer >= 0 (0 = one pass over the training data)", _num(0, None, True)),
}

DEFAULTS = {name: p.default for name, p in PARAMS.items() if name != "backbone"}


def problem(name: str, value) -> str | None:
    """Why `value` is not acceptable for parameter `name`, or None when it is."""
    p = PARAMS.get(name)
    if p is None or p.accepts(value):
        return None
    allowed = f"; allowed: {p.choices()}" if p.choices else ""
    return f"{value!r} is not {p.expected}{allowed}"
