"""cluster.yaml is valid for Ray's cluster launcher, checked with the validators shipped in Ray."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def _schema():
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _ray_validate(cfg: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cfg)))


@pytest.fixture(scope="module")
def cluster_cfg() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_passes_rays_schema_and_validator(cluster_cfg):
    jsonschema.validate(cluster_cfg, _schema())
    _ray_validate(cluster_cfg)
    types = cluster_cfg["available_node_types"]
    assert {"head", "cpu_worker", "gpu_worker"} <= set(types) and cluster_cfg["head_node_type"] == "head"
    start = " ".join(cluster_cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "RAY_AUTH_MODE=token" in start


def test_documented_on_prem_variant_is_valid(cluster_cfg):
    cfg = copy.deepcopy(cluster_cfg)
    cfg["provider"] = {"type": "local", "head_ip": "10.0.0.10", "worker_ips": ["10.0.0.11", "10.0.0.12"]}
    cfg["auth"] = {"ssh_user": "ubuntu", "ssh_private_key": "~/.ssh/id_rsa"}
    cfg["available_node_types"] = {"local.cluster.node": {"node_config": {}, "resources": {}, "min_workers": 2, "max_workers": 2}}
    cfg["head_node_type"] = "local.cluster.node"
    cfg["max_workers"] = 2
    jsonschema.validate(cfg, _schema())
    _ray_validate(cfg)


@pytest.mark.parametrize("mutate", [
    lambda c: c.update(max_workers="two"),                 # caught by the schema
    lambda c: c.pop("head_node_type"),                     # caught by Ray's validator
])
def test_the_validators_catch_broken_configs(cluster_cfg, mutate):
    cfg = copy.deepcopy(cluster_cfg)
    mutate(cfg)
    with pytest.raises(Exception):
        jsonschema.validate(cfg, _schema())
        _ray_validate(cfg)
