"""One options object for every front end: the Python API, the CLI, Ray Jobs and leaderboard suites.

Each option is declared once, in a group dataclass below, with its default, a
help line, the values it accepts and an example. From these declarations come
`auto_finetune`'s keyword arguments, the `automl finetune` flags (like
transformers' HfArgumentParser), the JSON that Ray Jobs and suites carry, and
the one validation of every value (sklearn style: what was received, what is
expected, how to fix it).
"""
from __future__ import annotations

import argparse
import difflib
import json
import math
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator

from automl.errors import AutoMLError


class OptionError(AutoMLError, ValueError):
    """An option has a value it cannot take."""


@dataclass(frozen=True)
class Rule:
    """The values an option accepts: `text` says which in words, `test` checks one."""

    text: str
    test: Callable[[Any], bool]

    def __or__(self, other: "Rule") -> "Rule":
        return Rule(f"{self.text} or {other.text}", lambda v: self.test(v) or other.test(v))


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def number(low: float | None = None, high: float | None = None, *, integer: bool = False,
           low_inclusive: bool = False) -> Rule:
    kind = "an integer" if integer else "a number"
    bounds = []
    if low is not None:
        bounds.append(f"{'>=' if low_inclusive else '>'} {low:g}")
    if high is not None:
        bounds.append(f"<= {high:g}")
    return Rule(f"{kind} {' and '.join(bounds)}".strip(), lambda v: _is_number(v)
                and (not integer or float(v).is_integer())
                and (low is None or (v >= low if low_inclusive else v > low)) and (high is None or v <= high))


def one_of(*values) -> Rule:
    return Rule("one of " + ", ".join(repr(v) for v in values), lambda v: v in values)


NONE = Rule("None", lambda v: v is None)
TEXT = Rule("a string", lambda v: isinstance(v, str) and bool(v.strip()))
PATH = Rule("a path", lambda v: isinstance(v, (str, Path)) and bool(str(v).strip()))
FLAG = Rule("True or False", lambda v: isinstance(v, bool))
MAPPING = Rule("a dict", lambda v: isinstance(v, dict))
TEXTS = Rule("a list of strings", lambda v: isinstance(v, (list, tuple)) and all(isinstance(s, str) for s in v))
CONFIGS = Rule("a list of dicts", lambda v: isinstance(v, (list, tuple)) and all(isinstance(s, dict) for s in v))


def _space_rule() -> Rule:
    def ok(v):
        from automl.search.space import SearchSpace

        return isinstance(v, (str, Path, dict, SearchSpace)) and (not isinstance(v, str) or bool(v.strip()))
    return Rule("a space name, a YAML path, a dict of overrides or a SearchSpace", ok)


def option(default, help: str, rule: Rule, *, example: str, flag: str | None = None, cli: str | None = None,
           aliases: tuple[str, ...] = ()):
    """Declare an option. cli: how the CLI reads it ('json' for dicts/lists, 'list' for comma-separated)."""
    kwargs = {"default_factory": lambda: default} if isinstance(default, (dict, list)) else {"default": default}
    return field(metadata={"help": help, "rule": rule, "example": example, "flag": flag, "cli": cli,
                           "aliases": aliases}, **kwargs)


@dataclass
class DataOptions:
    label: str | None = option(None, "label column (found automatically when named label/target/class/y/…)",
                               TEXT | NONE, example="label='category'")
    inputs: list[str] | None = option(None, "input columns (default: inferred from the table)", TEXTS | NONE,
                                      example="inputs=['title', 'body']", cli="list")
    task: str | None = option(None, "override the inferred task", one_of(None, "auto", "classification", "regression"),
                              example="task='regression'")
    drop_bad_images: bool = option(True, "drop unreadable images (listed in the data report) instead of failing",
                                   FLAG, example="drop_bad_images=False")
    drop_rare_classes: bool = option(False, "drop classes with fewer than 3 examples instead of failing", FLAG,
                                     example="drop_rare_classes=True")
    groups: str | None = option(None, "column whose groups get their own test metrics (not used as an input)",
                                TEXT | NONE, example="groups='region'")


@dataclass
class SearchOptions:
    time_budget_s: float | None = option(600.0, "seconds for the whole run: search, retrain, evaluation and export "
                                         "(None: no limit; then give max_trials)", number(0) | NONE,
                                         example="time_budget_s=300", flag="--time-budget")
    max_trials: int | None = option(None, "stop after this many trials", number(1, integer=True, low_inclusive=True)
                                    | NONE, example="max_trials=20")
    search_space: Any = option(None, "a space name in search_spaces/ ('cpu_small', …), a YAML path, or a dict of "
                               "overrides of the default space", _space_rule() | NONE,
                               example="search_space='cpu_small'")
    search_overrides: dict | None = option(None, "overrides merged into the search space", MAPPING | NONE,
                                           example='search_overrides={"lr": {"low": 1e-5, "high": 1e-3}}',
                                           flag="--set", cli="json")
    metric: str = option("auto", "metric to maximise ('auto': macro-F1 when classes are imbalanced, else accuracy; "
                         "R² for regression)", one_of("auto", "accuracy", "f1_macro", "balanced_accuracy", "r2"),
                         example="metric='f1_macro'")
    seed: int = option(0, "random seed (splits, sampling, initialisation)", number(0, integer=True, low_inclusive=True),
                       example="seed=1")
    prerank: Any = option("auto", "rank pretrained backbones with LogME first and drop the worse half "
                          "('auto': when the space offers two or more)", FLAG | one_of("auto"),
                          example="prerank=False", cli="auto-bool")
    ladder: bool = option(True, "rung 0 first: linear heads on every pretrained backbone's frozen features, scored "
                          "on validation; fine-tunes start from the best heads (False: fine-tunes only)", FLAG,
                          example="ladder=False")
    start_points: list | None = option(None, "configs to try first (e.g. earlier winners: a warm start)",
                                       CONFIGS | NONE, example='start_points=[{"lr": 3e-4}]', cli="json")
    resume: bool = option(False, "continue an interrupted search in output_dir", FLAG, example="resume=True")
    retrain: Any = option("auto", "retrain the winner on train+validation ('auto': when the plan can afford it and "
                          "still search well; False: export the best trial's weights, or a soup/ensemble of the top "
                          "trials, chosen on validation)", FLAG | one_of("auto"), example="retrain=False",
                          cli="auto-bool")


@dataclass
class ResourceOptions:
    ray_address: str | None = option(None, "Ray cluster to use ('auto', 'ray://head:10001'); default RAY_ADDRESS "
                                     "or an embedded local Ray", TEXT | NONE, example="ray_address='auto'",
                                     flag="--address")
    cpus_per_trial: float | None = option(None, "CPUs per trial (default 1)", number(0) | NONE,
                                          example="cpus_per_trial=2")
    gpus_per_trial: float | None = option(None, "GPUs per trial, fractions allowed (default 1 when GPUs exist)",
                                          number(0, low_inclusive=True) | NONE, example="gpus_per_trial=0.5")
    retrain_workers: int = option(1, "Ray Train workers (DDP) for the final retrain",
                                  number(1, integer=True, low_inclusive=True), example="retrain_workers=2")
    cluster_config: str | None = option(None, "the cluster's autoscaler config (cluster.yaml): plan for the nodes it "
                                        "may start, not just the ones up now (default: the head's "
                                        "~/ray_bootstrap_config.yaml when there is one)", PATH | NONE,
                                        example="cluster_config='cluster.yaml'")
    storage_path: str | None = option(None, "where trials keep results and checkpoints: default "
                                      "<output_dir>/ray_results; on a cluster a shared path or a URI (s3://…)",
                                      PATH | NONE, example="storage_path='s3://bucket/automl'")


@dataclass
class UpdateOptions:
    base_model: str | None = option(None, "an earlier export to update: fine-tune from it, compare on old and new "
                                    "test splits", PATH | NONE, example="base_model='runs/v1/model'")
    promote_tolerance: float = option(0.01, "most an update may lose on the base model's test split and still be "
                                      "promoted", number(0, 1, low_inclusive=True), example="promote_tolerance=0.02")


@dataclass
class DiagnosticsOptions:
    find_label_errors: Any = option("auto", "cross-fit the winner to list suspected label errors ('auto': for "
                                    "classification with <= 20,000 rows when the budget allows)",
                                    FLAG | one_of("auto"), example="find_label_errors=True", cli="auto-bool")
    cv_folds: int | None = option(None, "k-fold cross-validate the winning config (mean ± std in the card)",
                                  number(2, integer=True, low_inclusive=True) | NONE, example="cv_folds=5")


@dataclass
class OutputOptions:
    output_dir: str | None = option(None, "where the run and the export go (default "
                                    "./automl_runs/<modality>-<data fingerprint>)", PATH | NONE,
                                    example="output_dir='runs/mine'", flag="--output")
    export_formats: bool = option(True, "also export ONNX and TorchScript", FLAG, example="export_formats=False")
    keep_test_split: bool = option(True, "store the test split in the export (lets later updates measure "
                                   "forgetting; holds your data)", FLAG, example="keep_test_split=False")
    progress: bool = option(True, "show the progress view", FLAG, example="progress=False")
    verbose: bool = option(False, "show Ray's own logs", FLAG, example="verbose=True")


GROUPS = {"data": DataOptions, "search": SearchOptions, "resources": ResourceOptions, "update": UpdateOptions,
          "diagnostics": DiagnosticsOptions, "output": OutputOptions}
# Short names that batch manifests and suite files (YAML) may use for options.
YAML_ALIASES = {"time_budget": "time_budget_s", "set": "search_overrides", "resources": "resources_per_trial",
                "output": "output_dir", "address": "ray_address"}


@dataclass
class FinetuneOptions:
    """Every option of a run, grouped by what it concerns. Build with `FinetuneOptions.from_kwargs(...)`."""

    data: DataOptions = field(default_factory=DataOptions)
    search: SearchOptions = field(default_factory=SearchOptions)
    resources: ResourceOptions = field(default_factory=ResourceOptions)
    update: UpdateOptions = field(default_factory=UpdateOptions)
    diagnostics: DiagnosticsOptions = field(default_factory=DiagnosticsOptions)
    output: OutputOptions = field(default_factory=OutputOptions)

    @staticmethod
    def declared() -> Iterator[tuple[str, Any]]:
        """(group name, dataclass field) for every option, in declaration order."""
        for group, cls in GROUPS.items():
            for f in fields(cls):
                yield group, f

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for _, f in cls.declared()]

    @classmethod
    def from_kwargs(cls, **kwargs) -> "FinetuneOptions":
        """Options from flat keyword arguments (the API, and JSON from jobs and suites), validated."""
        kwargs = dict(kwargs)
        legacy = kwargs.pop("resources_per_trial", None)
        if legacy is not None:
            if not isinstance(legacy, dict) or set(legacy) - {"cpu", "gpu"}:
                raise OptionError(f"`resources_per_trial` must be a dict with keys 'cpu' and/or 'gpu'; got {legacy!r}. "
                                  "Fix: pass cpus_per_trial=... and gpus_per_trial=... instead.")
            kwargs.setdefault("cpus_per_trial", legacy.get("cpu"))
            kwargs.setdefault("gpus_per_trial", legacy.get("gpu"))
        names = cls.names()
        unknown = [k for k in kwargs if k not in names]
        if unknown:
            hints = {k: difflib.get_close_matches(k, names, n=1) for k in unknown}
            said = "; ".join(f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items())
            raise OptionError(f"Unknown option(s) {said}. Expected some of: {', '.join(names)}. "
                              "Fix: correct the name, see `automl finetune --help`.")
        groups = {g: {} for g in GROUPS}
        for group, f in cls.declared():
            if f.name in kwargs:
                groups[group][f.name] = kwargs[f.name]
        opts = cls(**{g: GROUPS[g](**v) for g, v in groups.items()})
        opts.validate()
        return opts

    @classmethod
    def from_entry(cls, entry: dict, where: str) -> "FinetuneOptions":
        """Options from a YAML entry (a batch job or a suite dataset), errors naming where it came from."""
        try:
            return cls.from_kwargs(**{YAML_ALIASES.get(k, k): v for k, v in entry.items()})
        except OptionError as exc:
            raise OptionError(f"{where}: {exc}") from None

    def validate(self) -> None:
        for group, f in self.declared():
            value = getattr(getattr(self, group), f.name)
            rule: Rule = f.metadata["rule"]
            if not rule.test(value):
                raise OptionError(f"`{f.name}` must be {rule.text}; got {value!r}. Fix: e.g. {f.metadata['example']}.")
        s = self.search
        if s.time_budget_s is None and not s.max_trials:
            raise OptionError("`time_budget_s` is None and `max_trials` is not set: the search would never end. "
                              "Fix: give time_budget_s=600 (seconds) or max_trials=20.")
        out = self.output.output_dir
        if out is not None and Path(out).exists() and not Path(out).is_dir():  # found only after the speed probes
            raise OptionError(f"`output_dir` must be a folder (made if missing); got {str(out)!r}, which is a file. "
                              "Fix: pass a folder, e.g. output_dir='runs/mine'.")
        if self.update.base_model is not None and not Path(self.update.base_model).exists():
            raise OptionError(f"`base_model` must be an existing export directory; got {self.update.base_model!r}. "
                              "Fix: pass the directory an earlier auto_finetune exported to (…/model).")

    def flat(self) -> dict:
        """{option name: value} (what from_kwargs takes)."""
        return {f.name: getattr(getattr(self, g), f.name) for g, f in self.declared()}

    def to_json(self) -> str:
        """JSON for Ray Jobs and manifests (a SearchSpace object is written as its dict)."""
        def plain(v):
            if hasattr(v, "to_dict"):
                return v.to_dict()
            return str(v) if isinstance(v, Path) else v
        return json.dumps({k: plain(v) for k, v in self.flat().items()}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "FinetuneOptions":
        return cls.from_kwargs(**json.loads(text))

    def replace(self, **changes) -> "FinetuneOptions":
        return FinetuneOptions.from_kwargs(**{**self.flat(), **changes})


# ---------------------------------------------------------------------------- the CLI, built from the declarations

def _flag(f) -> str:
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def _parse_json(text: str):
    if text.startswith("@"):
        text = Path(text[1:]).read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {text[:80]!r}") from exc


def _auto_bool(text: str):
    low = text.lower()
    if low in ("auto", "true", "false", "1", "0", "yes", "no"):
        return "auto" if low == "auto" else low in ("true", "1", "yes")
    raise argparse.ArgumentTypeError(f"expected auto, true or false; got {text!r}")


def _number(text: str):
    if text.lower() == "none":
        return None
    value = float(text)
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per option (plus --options JSON for everything at once); defaults stay unset (None)."""
    parser.add_argument("--options", type=_parse_json, default=None,
                        help="all options as JSON (or @file.json); flags given beside it win")
    for group, f in FinetuneOptions.declared():
        kind = f.metadata["cli"]
        kw: dict = {"dest": f.name, "default": argparse.SUPPRESS, "help": f.metadata["help"]}
        default = f.default if f.default is not MISSING else f.default_factory()
        if kind == "json":
            kw.update(type=_parse_json, metavar="JSON")
        elif kind == "list":
            kw.update(type=lambda s: [c for c in s.split(",") if c], metavar="A,B")
        elif kind == "auto-bool":
            kw.update(type=_auto_bool, metavar="{auto,true,false}")
        elif isinstance(default, bool):
            kw.update(action=argparse.BooleanOptionalAction)
        elif f.name in ("time_budget_s", "max_trials", "seed", "cpus_per_trial", "gpus_per_trial",
                        "retrain_workers", "promote_tolerance", "cv_folds"):
            kw.update(type=_number)
        parser.add_argument(_flag(f), **kw)
    parser.add_argument("--quiet", dest="progress", action="store_false", default=argparse.SUPPRESS,
                        help="same as --no-progress")


def from_args(ns: argparse.Namespace) -> FinetuneOptions:
    given = dict(getattr(ns, "options", None) or {})
    given.update({name: getattr(ns, name) for name in FinetuneOptions.names() if hasattr(ns, name)})
    return FinetuneOptions.from_kwargs(**given)


def options_doc() -> str:
    """The options, grouped, as text for auto_finetune's docstring and the README."""
    lines = []
    for group, cls in GROUPS.items():
        lines.append(f"    {group}:")
        for f in fields(cls):
            default = f.default if f.default is not MISSING else f.default_factory()
            lines.append(f"        {f.name} (default {default!r}): {f.metadata['help']}.")
    return "\n".join(lines)
