"""Search spaces: YAML files load, validate, round-trip, and sample conditionally."""
from __future__ import annotations

import optuna
import pytest
import yaml

from automl import SearchSpaceError, load_space
from automl.search.space import SearchSpace, spaces_dir


@pytest.mark.parametrize("name", ["cpu_small", "image_classification", "text_classification", "regression"])
def test_bundled_spaces_load_and_round_trip(name):
    for modality in ("image", "text"):
        try:
            s = load_space(name, modality)
        except SearchSpaceError as exc:  # a single-modality file refuses the other modality, clearly
            assert "this space is for" in str(exc)
            continue
        again = SearchSpace.from_yaml(s.to_yaml())
        assert again.to_dict() == s.to_dict()
        assert {"backbone", "unfreeze", "schedule", "lr", "weight_decay", "batch_size"} <= set(s.parameters)


def test_cpu_small_covers_required_choices():
    img, txt = load_space("cpu_small", "image"), load_space("cpu_small", "text")
    # A portfolio of real pretrained backbones that load offline (rung 0 probes each), beside scratch nets.
    from automl import models

    pretrained = [v for v in img.parameters["backbone"]["values"] if models.resolve(v).pretrained]
    assert pretrained == ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"]
    assert len(img.parameters["backbone"]["values"]) > len(pretrained)
    assert txt.parameters["backbone"]["values"] == ["minilm-l6", "minilm-l6-cls", "paraphrase-minilm-l3"]
    assert all(models.resolve(v).pretrained for v in txt.parameters["backbone"]["values"])
    assert len(img.parameters["schedule"]["values"]) >= 3 and "warmup_frac" in img.parameters
    assert len(img.parameters["augment"]["values"]) >= 2 and len(txt.parameters["text_augment"]["values"]) >= 2
    assert {0, "all"} <= set(img.parameters["unfreeze"]["values"])


def test_conditional_parameters_are_sampled_only_when_active():
    space = load_space("cpu_small", "image")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen_mix = seen_none = False
    for _ in range(40):
        trial = study.ask()
        fixed = space(trial)
        assert fixed["image_size"] == "auto"  # the plan picks it from the data
        if trial.params["mix"] == "none":
            assert "mix_alpha" not in trial.params
            seen_none = True
        else:
            assert 0.1 <= trial.params["mix_alpha"] <= 1.0
            seen_mix = True
        study.tell(trial, 0.0)
    assert seen_mix and seen_none


def test_overrides_change_ranges_pin_values_and_keep_start_points():
    s = load_space("cpu_small", "image", {"lr": {"low": 1e-5, "high": 5e-4}, "backbone": "timm/resnet10t:scratch"})
    assert s.parameters["lr"]["low"] == 1e-5 and s.parameters["backbone"] == {"type": "fixed", "value": "timm/resnet10t:scratch"}
    point = s.start_points[0]
    assert point["backbone"] == "timm/resnet10t:scratch"
    assert "lr" not in point  # 1e-3 is outside the new range, so the searcher samples it


B = "timm/resnet10t:scratch"


@pytest.mark.parametrize("bad, key, needle", [
    ({"parameters": {"backbone": {"type": "choice", "values": []}}}, "backbone", "non-empty list"),
    ({"parameters": {"backbone": B, "lr": {"type": "float", "low": "1e-4", "high": 1.0}}}, "lr", "numeric low/high"),
    ({"parameters": {"backbone": B, "lr": {"type": "float", "low": 0.0, "high": 1.0, "log": True}}}, "lr",
     "low must be > 0"),
    ({"parameters": {"backbone": B, "batch_size": {"type": "int", "low": 5, "high": 1}}}, "batch_size",
     "low=5 > high=1"),
    ({"parameters": {"backbone": B, "dropout": {"type": "weird"}}}, "dropout", "has type 'weird'"),
    ({"parameters": {"backbone": B, "lr": {"values": [0.1], "when": {"dropout": [0.1]}}, "dropout": 0.1}}, "lr",
     "depends on 'dropout', which is not defined before it"),
    ({"parameters": {"backbone": B}, "colour": 1}, None, "unknown top-level keys ['colour']"),
    ({"parameters": {"lr": 0.1}}, None, "no 'backbone' parameter"),
])
def test_invalid_spaces_name_the_file_key_and_problem(tmp_path, bad, key, needle):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(bad, sort_keys=False))
    with pytest.raises(SearchSpaceError) as err:
        load_space(str(path), "image")
    msg = str(err.value)
    assert msg.startswith(f"{path}: "), msg  # the file first
    assert key is None or f"{path}: parameter {key!r}" in msg, msg  # then the key
    assert needle in msg, msg  # then the problem


def test_unknown_space_name_lists_the_available_ones():
    with pytest.raises(SearchSpaceError, match="cpu_small"):
        load_space("nope", "image")
    assert (spaces_dir() / "cpu_small.yaml").exists()


def test_lr_variants_give_head_only_and_sgd_trials_their_own_range():
    """A head-only trial or an SGD trial samples its LR from its own range; fine-tuning from another."""
    space = load_space("cpu_small", "text")
    seen = {"head": [], "sgd": [], "fine-tune": []}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(120):
        trial = study.ask()
        fixed = space(trial)
        cfg = {**trial.params, **fixed}
        kind = "sgd" if cfg["optimizer"] == "sgd" else "head" if cfg["unfreeze"] == 0 else "fine-tune"
        seen[kind].append(cfg["lr"])
        assert "lr" in cfg and set(space.active_config(cfg)) >= {"lr"} and "lr__1" not in space.active_config(cfg)
        study.tell(trial, 0.0)
    assert min(seen["head"]) >= 1e-3 and max(seen["fine-tune"]) <= 5e-4 and min(seen["sgd"]) >= 1e-3
    assert all(len(v) > 5 for v in seen.values())
    # A start point is handed to Optuna under the name of its variant.
    point = space.sampling_point({**space.start_points[0], "unfreeze": 0, "lr": 0.01})
    assert point["lr__1"] == 0.01 and "lr" not in point


def test_transfer_settings_are_not_sampled_for_scratch_backbones():
    space = load_space("cpu_small", "image", {"backbone": {"values": ["timm/resnet10t:scratch", "timm/resnet10t"]}})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = {True: set(), False: set()}
    for _ in range(40):
        trial = study.ask()
        space(trial)
        scratch = trial.params["backbone"].endswith(":scratch")
        seen[scratch] |= set(trial.params)
        study.tell(trial, 0.0)
    assert not {"unfreeze", "gradual_unfreeze_every", "layer_decay"} & seen[True]  # a random body trains whole
    assert {"unfreeze", "layer_decay"} <= seen[False]
    cfg = space.active_config({"backbone": "timm/resnet10t:scratch", "unfreeze": 1, "lr": 0.01})
    assert "unfreeze" not in cfg and cfg["lr"] == 0.01


@pytest.mark.parametrize("param, spec, message", [
    ("schedule", {"type": "choice", "values": ["cosine", "cosin"]},
     "parameter 'schedule': 'cosin' is not a registered LR schedule; allowed: ['constant', 'cosine'"),
    ("lrr", {"type": "float", "low": 1.0e-4, "high": 1.0e-2}, "unknown parameter 'lrr' (did you mean 'lr'?)"),
    ("dropout", {"type": "float", "low": 0.1, "high": 1.5}, "parameter 'dropout': 1.5 is not a number in [0, 1)"),
    ("augment", "flip", "parameter 'augment': 'flip' is not a registered image augmentation policy"),
    ("backbone", "resnet18", "parameter 'backbone': 'resnet18' is not a backbone name"),
    ("optimizer", {"type": "choice", "values": ["adam"]}, "'adam' is not 'adamw' or 'sgd'"),
])
def test_spaces_are_checked_against_what_a_trial_understands(tmp_path, param, spec, message):
    """A misspelt schedule or an out-of-range value fails at load, naming the file and the key: no budget burnt."""
    import yaml

    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"parameters": {"backbone": "timm/resnet10t:scratch", param: spec}}))
    with pytest.raises(SearchSpaceError) as info:
        load_space(str(path), "image")
    assert str(path) in str(info.value) and message in str(info.value)


def test_a_start_point_made_for_a_backbone_the_space_lacks_is_dropped_not_run_as_another():
    """cpu_small's from-scratch start point (resnet10t, lr 3e-3) in a user's space without that backbone is
    dropped: run as EfficientNet-Lite0 with a from-scratch learning rate it would be a config nobody chose. The
    first start point (the space's default) still moves to an available backbone."""
    full = load_space("cpu_small", "image")
    assert [p["backbone"] for p in full.start_points] == ["efficientnet-lite0", "timm/resnet10t:scratch"]
    mine = load_space("cpu_small", "image", {"backbone": {"type": "choice", "values": ["efficientnet-lite0"]}})
    assert [(p["backbone"], p["lr"]) for p in mine.start_points] == [("efficientnet-lite0", 1e-3)]
    other = full.with_backbones(["efficientnet-lite1"])
    assert [(p["backbone"], p["lr"]) for p in other.start_points] == [("efficientnet-lite1", 1e-3)]
