"""Search spaces: readable YAML in, Optuna define-by-run sampling out.

A file has common `parameters` plus optional `image:` / `text:` sections whose
parameters are merged over the common ones for that modality. Each parameter:

    lr:       {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
    schedule: {type: choice, values: [cosine, linear, onecycle]}
    warmup_frac: {type: float, low: 0.0, high: 0.2, when: {schedule: [cosine, linear]}}
    seed:     {type: fixed, value: 0}

`when` makes a parameter conditional on earlier ones; inactive parameters are
never sampled, so the searcher wastes no trials on them.
"""
from __future__ import annotations

import copy
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from automl.errors import SearchSpaceError
from automl.training.params import PARAMS, problem

TYPES = {"choice": {"values"}, "float": {"low", "high"}, "int": {"low", "high"}, "fixed": {"value"}}
OPTIONAL = {"log", "step", "when", "help"}
TOP_KEYS = {"name", "description", "max_epochs", "grace_period", "reduction_factor", "parameters",
            "image", "text", "start_points"}


def spaces_dir() -> Path:
    """search_spaces/ next to the package (source checkout) or under sys.prefix (wheel)."""
    import sys

    here = Path(__file__).resolve().parents[2] / "search_spaces"
    if here.is_dir():
        return here
    return Path(sys.prefix) / "share" / "automl" / "search_spaces"


def _check_values(where: str, name: str, spec: dict) -> None:
    """Names and values the training loop understands (training/params.py), before any compute is spent."""
    if name.startswith("_"):
        return  # internal hooks (tests' fault injection)
    if name not in PARAMS:
        close = difflib.get_close_matches(name, PARAMS, n=1)
        raise SearchSpaceError(f"{where}: unknown parameter {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                               + f"; the parameters a trial understands are {sorted(PARAMS)}.")
    values = {"fixed": [spec.get("value")], "choice": spec.get("values") or [],
              "float": [spec.get("low"), spec.get("high")], "int": [spec.get("low"), spec.get("high")]}[spec["type"]]
    for v in values:
        why = problem(name, v)
        if why:
            raise SearchSpaceError(f"{where}: parameter {name!r}: {why}.")


def _check_param(where: str, name: str, spec: Any, earlier: list[str]) -> dict:
    if not isinstance(spec, dict):
        spec = {"type": "fixed", "value": spec}  # a bare value pins the parameter
        _check_values(where, name, spec)
        return spec
    spec = dict(spec)
    if "type" not in spec:
        spec["type"] = "choice" if "values" in spec else "fixed" if "value" in spec else (
            "float" if isinstance(spec.get("low"), float) or isinstance(spec.get("high"), float) else "int")
    kind = spec["type"]
    if kind not in TYPES:
        raise SearchSpaceError(f"{where}: parameter {name!r} has type {kind!r}; expected one of {sorted(TYPES)}.")
    missing = TYPES[kind] - set(spec)
    if missing:
        raise SearchSpaceError(f"{where}: parameter {name!r} of type {kind!r} lacks {sorted(missing)}.")
    unknown = set(spec) - TYPES[kind] - OPTIONAL - {"type"}
    if unknown:
        raise SearchSpaceError(f"{where}: parameter {name!r} has unknown keys {sorted(unknown)}; "
                               f"allowed: {sorted(TYPES[kind] | OPTIONAL)}.")
    if kind == "choice" and (not isinstance(spec["values"], list) or not spec["values"]):
        raise SearchSpaceError(f"{where}: parameter {name!r} needs a non-empty list of values, got {spec['values']!r}.")
    if kind in ("float", "int"):
        lo, hi = spec["low"], spec["high"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi)):
            raise SearchSpaceError(f"{where}: parameter {name!r} needs numeric low/high, got low={lo!r}, high={hi!r}. "
                                   "Note: YAML reads 1e-4 as a string; write 1.0e-4.")
        if lo > hi:
            raise SearchSpaceError(f"{where}: parameter {name!r} has low={lo} > high={hi}.")
        if spec.get("log") and lo <= 0:
            raise SearchSpaceError(f"{where}: parameter {name!r} is log-scaled, so low must be > 0; got low={lo}.")
    when = spec.get("when")
    if when is not None:
        if not isinstance(when, dict):
            raise SearchSpaceError(f"{where}: parameter {name!r}: 'when' must map earlier parameters to allowed values.")
        for dep, allowed in when.items():
            if dep not in earlier:
                raise SearchSpaceError(f"{where}: parameter {name!r} depends on {dep!r}, which is not defined before it.")
            if not isinstance(allowed, list):
                spec["when"][dep] = [allowed]
    _check_values(where, name, spec)
    return spec


# How much of a pretrained body to train: meaningless for a randomly initialised one, which trains whole
# (training the top of random features, or decaying lr towards random layers, only wastes trials).
TRANSFER_PARAMS = ("unfreeze", "gradual_unfreeze_every", "layer_decay")


def _scratch(backbone: Any) -> bool:
    if isinstance(backbone, dict):
        return backbone.get("pretrained") is False
    return isinstance(backbone, str) and backbone.endswith(":scratch")


@dataclass
class SearchSpace:
    """A validated search space for one modality."""

    name: str
    modality: str
    parameters: dict[str, dict]
    max_epochs: int = 8
    grace_period: int = 1
    reduction_factor: int = 3
    start_points: list[dict] = field(default_factory=list)

    # -------------------------------------------------------------- sampling
    def __call__(self, trial) -> dict:
        """Optuna define-by-run: sample active parameters, return the fixed ones."""
        config: dict[str, Any] = {}
        fixed: dict[str, Any] = {}
        for name, spec in self.parameters.items():
            if not self._on(name, spec, {**config, **fixed}):
                continue
            kind = spec["type"]
            if kind == "fixed":
                fixed[name] = spec["value"]
            elif kind == "choice":
                config[name] = trial.suggest_categorical(name, spec["values"])
            elif kind == "float":
                config[name] = trial.suggest_float(name, float(spec["low"]), float(spec["high"]),
                                                   log=bool(spec.get("log", False)), step=spec.get("step"))
            else:
                config[name] = trial.suggest_int(name, int(spec["low"]), int(spec["high"]),
                                                 log=bool(spec.get("log", False)), step=int(spec.get("step", 1)))
        return fixed

    @staticmethod
    def _active(spec: dict, values: dict) -> bool:
        return all(values.get(dep) in allowed for dep, allowed in (spec.get("when") or {}).items())

    def _on(self, name: str, spec: dict, values: dict) -> bool:
        """Active: its `when` holds, and it is not a transfer setting of a randomly initialised backbone."""
        if name in TRANSFER_PARAMS and _scratch(values.get("backbone")):
            return False
        return self._active(spec, values)

    def active_config(self, config: dict) -> dict:
        """Drop parameters a config holds that its own conditions switch off."""
        out = {}
        for name, spec in self.parameters.items():
            if name in config and self._on(name, spec, out):
                out[name] = config[name]
        return {**out, **{k: v for k, v in config.items() if k not in self.parameters}}

    def default_config(self) -> dict:
        """The first start point, or the first/middle value of each active parameter."""
        if self.start_points:
            return self.active_config(self.start_points[0])
        cfg: dict[str, Any] = {}
        for name, spec in self.parameters.items():
            if not self._on(name, spec, cfg):
                continue
            kind = spec["type"]
            if kind == "fixed":
                cfg[name] = spec["value"]
            elif kind == "choice":
                cfg[name] = spec["values"][0]
            elif spec.get("log"):
                cfg[name] = math.sqrt(spec["low"] * spec["high"])
            else:
                mid = (spec["low"] + spec["high"]) / 2
                cfg[name] = int(round(mid)) if kind == "int" else mid
        return cfg

    def searchable(self) -> list[str]:
        return [n for n, s in self.parameters.items() if s["type"] != "fixed"]

    # -------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict:
        return {"name": self.name, "modality": self.modality, "max_epochs": self.max_epochs,
                "grace_period": self.grace_period, "reduction_factor": self.reduction_factor,
                "parameters": copy.deepcopy(self.parameters), "start_points": copy.deepcopy(self.start_points)}

    def to_yaml(self) -> str:
        # Order matters: a `when` may only refer to parameters above it.
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str, where: str = "<yaml>") -> "SearchSpace":
        return cls.from_dict(yaml.safe_load(text), where=where)

    @classmethod
    def from_dict(cls, d: dict, where: str = "<dict>") -> "SearchSpace":
        earlier: list[str] = []
        params = {}
        for name, spec in (d.get("parameters") or {}).items():
            params[name] = _check_param(where, name, spec, earlier)
            earlier.append(name)
        return cls(name=d.get("name", "custom"), modality=d.get("modality", "any"), parameters=params,
                   max_epochs=int(d.get("max_epochs", 8)), grace_period=int(d.get("grace_period", 1)),
                   reduction_factor=int(d.get("reduction_factor", 3)), start_points=list(d.get("start_points") or []))

    def with_overrides(self, overrides: dict | None) -> "SearchSpace":
        """Merge {"lr": {"low": .., "high": ..}} into specs; a bare value pins a parameter."""
        if not overrides:
            return self
        d = self.to_dict()
        for key in ("max_epochs", "grace_period", "reduction_factor"):
            if key in overrides:
                d[key] = overrides[key]
        for name, change in overrides.items():
            if name in ("max_epochs", "grace_period", "reduction_factor"):
                continue
            if isinstance(change, dict) and name in d["parameters"]:
                merged = {**d["parameters"][name], **change}
                if "type" not in change:
                    # Changing the range of a choice into low/high means a numeric range, and vice versa.
                    if {"low", "high"} & set(change) and merged["type"] in ("choice", "fixed"):
                        merged["type"] = "float" if any(isinstance(change.get(k), float) for k in ("low", "high")) else "int"
                    if "values" in change:
                        merged["type"] = "choice"
                for stale in set(merged) - TYPES.get(merged["type"], set()) - OPTIONAL - {"type"}:
                    merged.pop(stale)
                d["parameters"][name] = merged
            else:
                d["parameters"][name] = change if isinstance(change, dict) else {"type": "fixed", "value": change}
        space = SearchSpace.from_dict(d, where="search_space overrides")
        space.start_points = [space.fit_point(p) for p in self.start_points]
        return space

    def fit_point(self, point: dict) -> dict:
        """Adapt a start point to this space: pinned values win, out-of-range values are dropped."""
        out = {}
        for name, value in point.items():
            spec = self.parameters.get(name)
            if spec is None:
                continue
            if spec["type"] == "fixed":
                out[name] = spec["value"]
            elif spec["type"] == "choice":
                if value in spec["values"]:
                    out[name] = value
            elif isinstance(value, (int, float)) and spec["low"] <= value <= spec["high"]:
                out[name] = value
        for name, spec in self.parameters.items():
            if spec["type"] == "fixed":
                out[name] = spec["value"]
        return out


# Optimizer steps an epoch should give at least: on 50 images at batch 32 an epoch is 2 steps, so a
# 6-epoch trial (and the retrain) would stop after 12 steps, far from trained.
MIN_STEPS_PER_EPOCH = 16


def epoch_passes(space: SearchSpace, n_train: int) -> int:
    """Passes over the training data per reported epoch, so that small data sets still train enough."""
    spec = space.parameters.get("batch_size", {"type": "fixed", "value": 32})
    sizes = spec.get("values") or [spec.get("value", spec.get("low", 32))]
    steps = max(1, math.ceil(n_train / max(1, int(min(sizes)))))
    return max(1, math.ceil(MIN_STEPS_PER_EPOCH / steps))


def for_data_size(space: SearchSpace, n_train: int) -> SearchSpace:
    """The space with `epoch_passes` pinned for a training set of n_train rows (unless the space sets it)."""
    passes = epoch_passes(space, n_train)
    if passes == 1 or "epoch_passes" in space.parameters:
        return space
    return space.with_overrides({"epoch_passes": passes})


def load_space(source: str | Path | dict | SearchSpace | None, modality: str,
               overrides: dict | None = None) -> SearchSpace:
    """Load a space by name ('cpu_small'), path, or dict, for one modality."""
    if isinstance(source, SearchSpace):
        return source.with_overrides(overrides)
    where = "<dict>"
    if source is None:
        source = f"{modality}_classification"
    if isinstance(source, dict) and "parameters" not in source and "image" not in source and "text" not in source:
        # A dict without sections is a set of overrides of the default space.
        return load_space(None, modality, {**source, **(overrides or {})})
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.suffix:
            path = spaces_dir() / f"{source}.yaml"
        if not path.exists():
            available = sorted(p.stem for p in spaces_dir().glob("*.yaml"))
            raise SearchSpaceError(f"Search space {str(source)!r} not found (looked for {str(path)!r}); "
                                   f"expected a YAML path or one of {available}.")
        where = str(path)
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise SearchSpaceError(f"{where}: invalid YAML: {exc}") from exc
    else:
        raw = source
    if not isinstance(raw, dict):
        raise SearchSpaceError(f"{where}: expected a mapping at the top level, got {type(raw).__name__}.")
    unknown = set(raw) - TOP_KEYS - {"modality"}
    if unknown:
        raise SearchSpaceError(f"{where}: unknown top-level keys {sorted(unknown)}; allowed: {sorted(TOP_KEYS)}.")
    section = raw.get(modality) or {}
    if raw.get("modality") not in (None, "any", modality) and not section:
        raise SearchSpaceError(f"{where}: this space is for {raw['modality']!r} data, but the dataset is {modality!r}. "
                               f"Fix: use the {modality}_classification space or one with a {modality}: section.")
    merged = {
        "name": raw.get("name", Path(where).stem),
        "modality": modality,
        "max_epochs": section.get("max_epochs", raw.get("max_epochs", 8)),
        "grace_period": section.get("grace_period", raw.get("grace_period", 1)),
        "reduction_factor": section.get("reduction_factor", raw.get("reduction_factor", 3)),
        # Modality parameters come first: common ones may depend on them (e.g. on the backbone).
        "parameters": {**(section.get("parameters") or {}),
                       **{k: v for k, v in (raw.get("parameters") or {}).items() if k not in (section.get("parameters") or {})}},
        "start_points": section.get("start_points", raw.get("start_points") or []),
    }
    space = SearchSpace.from_dict(merged, where=where)
    if "backbone" not in space.parameters:
        raise SearchSpaceError(f"{where}: no 'backbone' parameter for {modality!r} data. Fix: add one under {modality}: parameters.")
    return space.with_overrides(overrides)
