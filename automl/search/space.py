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
VARIANT_MARK = "__"  # Optuna's name for variant i > 0 of a parameter: "<name>__<i>"
TOP_KEYS = {"name", "description", "max_epochs", "grace_period", "reduction_factor", "parameters", "start_points"}


def _sections() -> set[str]:
    """The keys that make a dict a space rather than overrides: `parameters` and a section per registered modality
    (`image:`, `text:`, ...)."""
    from automl import modalities

    return {"parameters", *modalities.names()}


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


def _check_param(where: str, name: str, spec: Any, earlier: list[str]):
    if isinstance(spec, list) and spec and all(isinstance(s, dict) for s in spec):
        # Variants: the first whose `when` holds is sampled (e.g. an LR range for head-only training of its own).
        return [_check_param(where, name, s, earlier) for s in spec]
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
    """A randomly initialised backbone (':scratch', or a registered alias or dict saying pretrained=False)."""
    if isinstance(backbone, dict):
        return backbone.get("pretrained") is False
    if not isinstance(backbone, str):
        return False
    if backbone.endswith(":scratch"):
        return True
    from automl.models.registry import _ALIASES

    from automl.errors import ModelLoadError

    try:
        return backbone in _ALIASES and _ALIASES[backbone]().pretrained is False
    except ModelLoadError:  # an alias whose weights are missing is a pretrained one; building it says why it fails
        return False


def _opt_int(v) -> int | None:
    return None if v is None else int(v)


@dataclass
class SearchSpace:
    """A validated search space for one modality."""

    name: str
    modality: str
    parameters: dict[str, dict]
    max_epochs: int | None = None        # reports in a full-length trial; None: the plan decides
    grace_period: int | None = None      # ASHA's first rung, in reports; None: the plan decides
    reduction_factor: int | None = None
    start_points: list[dict] = field(default_factory=list)

    # -------------------------------------------------------------- sampling
    def __call__(self, trial) -> dict:
        """Optuna define-by-run: sample active parameters, return the fixed ones."""
        config: dict[str, Any] = {}
        fixed: dict[str, Any] = {}
        for name in self.parameters:
            found = self._variant(name, {**config, **fixed})
            if found is None:
                continue
            i, spec = found
            key = self.sampling_name(name, i)
            kind = spec["type"]
            if kind == "fixed":
                value = fixed[name] = spec["value"]
            elif kind == "choice":
                value = trial.suggest_categorical(key, spec["values"])
            elif kind == "float":
                value = trial.suggest_float(key, float(spec["low"]), float(spec["high"]),
                                            log=bool(spec.get("log", False)), step=spec.get("step"))
            else:
                value = trial.suggest_int(key, int(spec["low"]), int(spec["high"]),
                                          log=bool(spec.get("log", False)), step=int(spec.get("step", 1)))
            config[name] = value
            if key != name:
                fixed[name] = value  # the trial reads the plain name; Optuna keeps each variant's own history
        return fixed

    @staticmethod
    def sampling_name(name: str, variant: int) -> str:
        return name if variant == 0 else f"{name}{VARIANT_MARK}{variant}"

    @staticmethod
    def _active(spec: dict, values: dict) -> bool:
        return all(values.get(dep) in allowed for dep, allowed in (spec.get("when") or {}).items())

    def _variant(self, name: str, values: dict) -> tuple[int, dict] | None:
        """The spec in force for `name` given the values chosen so far (index, spec), or None when inactive:
        its `when` fails, or it is a transfer setting of a randomly initialised backbone."""
        if name in TRANSFER_PARAMS and _scratch(values.get("backbone")):
            return None
        spec = self.parameters[name]
        for i, s in enumerate(spec if isinstance(spec, list) else [spec]):
            if self._active(s, values):
                return i, s
        return None

    def _on(self, name: str, spec, values: dict) -> bool:
        return self._variant(name, values) is not None

    def active_config(self, config: dict) -> dict:
        """Drop parameters a config holds that its own conditions switch off (and variants' sampling names)."""
        out = {}
        for name in self.parameters:
            if name in config and self._on(name, None, out):
                out[name] = config[name]
        return {**out, **{k: v for k, v in config.items() if k not in self.parameters and VARIANT_MARK not in k}}

    def sampling_point(self, point: dict) -> dict:
        """A start point as Optuna names it (variants other than the first have their own names)."""
        out = {}
        active = self.active_config(point)
        for name, value in active.items():
            found = self._variant(name, active) if name in self.parameters else None
            if found is not None and found[1]["type"] != "fixed":
                out[self.sampling_name(name, found[0])] = value
        return out

    def default_config(self) -> dict:
        """The first start point, or the first/middle value of each active parameter."""
        if self.start_points:
            return self.active_config(self.start_points[0])
        cfg: dict[str, Any] = {}
        for name in self.parameters:
            found = self._variant(name, cfg)
            if found is None:
                continue
            spec = found[1]
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

    def pinned(self, name: str):
        """The value a parameter is pinned to (a single `fixed` spec), else None: a range, a choice or `when`
        variants leave it to the search."""
        spec = self.parameters.get(name)
        return spec.get("value") if isinstance(spec, dict) and spec.get("type") == "fixed" else None

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
                   max_epochs=_opt_int(d.get("max_epochs")), grace_period=_opt_int(d.get("grace_period")),
                   reduction_factor=_opt_int(d.get("reduction_factor")),
                   start_points=list(d.get("start_points") or []))

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
            current = d["parameters"].get(name)
            if isinstance(change, dict) and isinstance(current, list):
                current = {k: v for k, v in current[0].items() if k != "when"}  # a change replaces the variants
            if isinstance(change, dict) and current is not None:
                merged = {**current, **change}
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
        fitted = [(p, space.fit_point(p)) for p in self.start_points]
        # A later start point made for a backbone the new space does not have (cpu_small's from-scratch one in a
        # user's space of other backbones) is dropped, not run as some other backbone with its settings.
        space.start_points = [f for i, (p, f) in enumerate(fitted)
                              if i == 0 or "backbone" not in p or "backbone" in f]
        return space

    def backbones(self) -> list:
        """The backbones the space chooses among (its one pinned backbone, when it is fixed; none when unset)."""
        spec = self.parameters.get("backbone", {})
        return list(spec.get("values") or [spec.get("value")]) if isinstance(spec, dict) else []

    def with_backbones(self, values: list) -> "SearchSpace":
        """The space choosing among the backbones `values` only; the first start point, when its backbone is not
        among them, starts from values[0] instead (later ones made for other backbones are dropped)."""
        new = self.with_overrides({"backbone": {"type": "choice", "values": list(values)}})
        new.start_points = [new.fit_point(p if p.get("backbone") in values else {**p, "backbone": values[0]})
                            for i, p in enumerate(self.start_points)
                            if i == 0 or "backbone" not in p or p.get("backbone") in values]
        return new

    def fit_point(self, point: dict) -> dict:
        """Adapt a start point to this space: pinned values win, out-of-range values are dropped."""
        out = {}
        for name, value in point.items():
            specs = self.parameters.get(name)
            for spec in (specs if isinstance(specs, list) else [specs] if specs else []):
                if spec["type"] == "fixed":
                    out[name] = spec["value"]
                elif spec["type"] == "choice":
                    if value in spec["values"]:
                        out[name] = value
                elif isinstance(value, (int, float)) and spec["low"] <= value <= spec["high"]:
                    out[name] = value
                if name in out:
                    break
        for name, spec in self.parameters.items():
            if isinstance(spec, dict) and spec["type"] == "fixed":
                out[name] = spec["value"]
        return out


def load_space(source: str | Path | dict | SearchSpace | None, modality: str,
               overrides: dict | None = None) -> SearchSpace:
    """Load a space by name ('cpu_small'), path, or dict, for one modality."""
    if isinstance(source, SearchSpace):
        return source.with_overrides(overrides)
    where = "<dict>"
    if source is None:
        source = f"{modality}_classification"
    if isinstance(source, dict) and not _sections() & set(source):
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
    allowed = TOP_KEYS | _sections()
    unknown = set(raw) - allowed - {"modality"}
    if unknown:
        raise SearchSpaceError(f"{where}: unknown top-level keys {sorted(unknown)}; allowed: {sorted(allowed)}.")
    section = raw.get(modality) or {}
    if raw.get("modality") not in (None, "any", modality) and not section:
        raise SearchSpaceError(f"{where}: this space is for {raw['modality']!r} data, but the dataset is {modality!r}. "
                               f"Fix: use the {modality}_classification space or one with a {modality}: section.")
    merged = {
        "name": raw.get("name", Path(where).stem),
        "modality": modality,
        "max_epochs": section.get("max_epochs", raw.get("max_epochs")),
        "grace_period": section.get("grace_period", raw.get("grace_period")),
        "reduction_factor": section.get("reduction_factor", raw.get("reduction_factor")),
        # Modality parameters come first: common ones may depend on them (e.g. on the backbone).
        "parameters": {**(section.get("parameters") or {}),
                       **{k: v for k, v in (raw.get("parameters") or {}).items() if k not in (section.get("parameters") or {})}},
        "start_points": section.get("start_points", raw.get("start_points") or []),
    }
    space = SearchSpace.from_dict(merged, where=where)
    if "backbone" not in space.parameters:
        raise SearchSpaceError(f"{where}: no 'backbone' parameter for {modality!r} data. Fix: add one under {modality}: parameters.")
    return space.with_overrides(overrides)
