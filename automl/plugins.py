"""Registrations made in the user's process (register_backbone, register_schedule, register_image_policy,
register_text_policy, register_family, modalities.register) carried to Ray workers, which import automl afresh
and would not know them. Functions defined in a script travel by value (cloudpickle); built-ins travel as references."""
from __future__ import annotations

import warnings


def put(table: dict, name: str, value, what: str) -> None:
    """Register `value` under `name`, warning when it replaces another entry (as timm's registry does): a
    misspelt or shadowed name should not change behaviour silently."""
    if name in table and table[name] is not value:
        warnings.warn(f"{what} {name!r} was already registered; the new registration replaces it.", stacklevel=3)
    table[name] = value


def _registries() -> dict[str, dict]:
    from automl.modalities import base as modalities
    from automl.models import registry
    from automl.training import augment, schedules

    return {"backbones": registry._ALIASES, "families": registry._FAMILIES, "schedules": schedules._SCHEDULES,
            "image_policies": augment._IMAGE, "text_policies": augment._TEXT, "modalities": modalities._MODALITIES}


def snapshot() -> dict[str, dict]:
    """Every registry's entries as they are in this process."""
    return {kind: dict(entries) for kind, entries in _registries().items()}


def install(snap: dict[str, dict] | None) -> None:
    """Make a snapshot's entries known here (a worker calls this before it builds anything)."""
    for kind, entries in (snap or {}).items():
        _registries()[kind].update(entries)
