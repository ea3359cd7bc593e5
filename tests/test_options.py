"""One options object: every option reaches every front end (API, CLI, Ray Jobs, suites), validated in one place."""
from __future__ import annotations

import argparse
import ast
import inspect
import json
import shlex

import pytest
import yaml

from automl import auto_finetune
from automl.ops.cli import build_parser
from automl.ops.jobs import entrypoint, load_manifest
from automl.ops.leaderboard import load_suite
from automl.options import FinetuneOptions, OptionError, add_arguments, from_args


def _samples(tmp_path) -> dict:
    """A non-default value for every option, taken from its declared example."""
    out = {}
    for _, f in FinetuneOptions.declared():
        value = ast.literal_eval(f.metadata["example"].split("=", 1)[1])
        if f.name == "base_model":
            (tmp_path / "base").mkdir(exist_ok=True)
            value = str(tmp_path / "base")
        out[f.name] = value
    defaults = FinetuneOptions().flat()
    assert all(out[k] != defaults[k] for k in out), "every example must differ from the default"
    return out


def _cli_args(name: str, value) -> list[str]:
    f = dict((f.name, f) for _, f in FinetuneOptions.declared())[name]
    flag = f.metadata["flag"] or "--" + name.replace("_", "-")
    if isinstance(value, bool) and f.metadata["cli"] != "auto-bool":
        return [flag if value else "--no-" + flag[2:]]
    if f.metadata["cli"] == "json":
        return [flag, json.dumps(value)]
    if f.metadata["cli"] == "list":
        return [flag, ",".join(value)]
    return [flag, str(value)]


def _parse_finetune(argv: list[str]) -> FinetuneOptions:
    ns = build_parser().parse_args(["finetune", "data.csv", *argv])
    return from_args(ns)


def test_every_option_reaches_every_front_end(tmp_path):
    samples = _samples(tmp_path)
    signature = inspect.signature(auto_finetune).parameters
    for name, value in samples.items():
        # Python API: a keyword argument of auto_finetune, into the options object.
        assert name in signature, name
        assert FinetuneOptions.from_kwargs(**{name: value}).flat()[name] == value, name
        # CLI: a flag of `automl finetune`.
        assert _parse_finetune(_cli_args(name, value)).flat()[name] == value, name
        # Ray Jobs: a key of a batch manifest, carried to the job as JSON and parsed back by its CLI.
        manifest = tmp_path / "batch.yaml"
        manifest.write_text(yaml.safe_dump({"jobs": [{"name": "j", "data": "d.csv", name: value}]}))
        (job,) = load_manifest(manifest)
        assert job["options"].flat()[name] == value, name
        argv = shlex.split(entrypoint(job))
        assert argv[:4] == ["python", "-m", "automl", "finetune"]
        assert _parse_finetune(argv[5:]).flat()[name] == value, name
        # Leaderboard suites: a key of a dataset entry.
        suite = tmp_path / "suite.yaml"
        suite.write_text(yaml.safe_dump({"datasets": [{"name": "s", "data": "d.csv", name: value}]}))
        (entry,) = load_suite(suite)
        assert entry["options"].flat()[name] == value, name


def test_options_round_trip_through_json(tmp_path):
    opts = FinetuneOptions.from_kwargs(**_samples(tmp_path))
    assert FinetuneOptions.from_json(opts.to_json()) == opts


@pytest.mark.parametrize("kwargs, message", [
    ({"time_budget_s": "abc"}, "`time_budget_s` must be a number > 0 or None; got 'abc'. Fix: e.g. time_budget_s=300"),
    ({"time_budget_s": -5}, "`time_budget_s` must be a number > 0 or None; got -5"),
    ({"max_trials": 2.5}, "`max_trials` must be an integer >= 1 or None; got 2.5"),
    ({"metric": "auc"}, "`metric` must be one of 'auto', 'accuracy', 'f1_macro', 'balanced_accuracy', 'r2'; got 'auc'"),
    ({"cv_folds": 1}, "`cv_folds` must be an integer >= 2 or None; got 1"),
    ({"progress": "yes"}, "`progress` must be True or False; got 'yes'"),
    ({"time_budget": 60}, "Unknown option(s) 'time_budget' (did you mean 'time_budget_s'?)"),
    ({"time_budget_s": None}, "the search would never end. Fix: give time_budget_s=600 (seconds) or max_trials=20"),
    ({"base_model": "/no/such/export"}, "`base_model` must be an existing export directory; got '/no/such/export'"),
    ({"output_dir": __file__}, f"`output_dir` must be a folder (made if missing); got {__file__!r}, which is a file"),
])
def test_bad_options_say_what_was_received_and_how_to_fix_it(kwargs, message):
    with pytest.raises(OptionError) as info:
        FinetuneOptions.from_kwargs(**kwargs)
    assert message in str(info.value)


def test_auto_finetune_refuses_bad_options_before_reading_data():
    with pytest.raises(OptionError, match="`seed` must be an integer >= 0"):
        auto_finetune("/this/path/is/never/read.csv", seed=-1)


def test_yaml_entries_name_where_the_bad_value_is(tmp_path):
    manifest = tmp_path / "batch.yaml"
    manifest.write_text(yaml.safe_dump({"jobs": [{"name": "icons", "data": "d.csv", "time_budget": "soon"}]}))
    with pytest.raises(OptionError, match=r"batch.yaml: job 'icons': `time_budget_s` must be a number"):
        load_manifest(manifest)


def test_cli_flags_given_beside_options_json_win():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    ns = parser.parse_args(["--options", json.dumps({"seed": 3, "max_trials": 4}), "--seed", "5"])
    opts = from_args(ns)
    assert (opts.search.seed, opts.search.max_trials) == (5, 4)


def test_cli_lists_the_bundled_spaces(capsys):
    from automl.ops.cli import main as cli_main
    from automl.search.space import spaces_dir

    assert cli_main(["spaces"]) == 0
    listed = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()}
    assert set(listed) == {"cpu_small", "image_classification", "regression", "text_classification"}
    assert listed["cpu_small"] == str(spaces_dir() / "cpu_small.yaml")
