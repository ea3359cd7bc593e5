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


def test_the_schema_catches_a_wrongly_typed_value(cluster_cfg):
    cfg = copy.deepcopy(cluster_cfg)
    cfg["max_workers"] = "two"
    with pytest.raises(jsonschema.ValidationError, match="'two' is not of type 'integer'"):
        jsonschema.validate(cfg, _schema())


def test_rays_validator_catches_what_the_schema_lets_through(cluster_cfg):
    cfg = copy.deepcopy(cluster_cfg)
    cfg.pop("head_node_type")
    jsonschema.validate(cfg, _schema())  # the raw schema has no objection...
    with pytest.raises(ValueError, match="head_node_type"):  # ...Ray's own check does
        _ray_validate(cfg)


def test_capacity_is_planned_from_the_autoscaler_config_not_the_nodes_up_now():
    """The shipped cluster starts with a CPU-less head and no workers: plan from its node types."""
    from automl.cluster import ClusterInfo
    from automl.errors import AutoMLError

    info = ClusterInfo.from_config(ROOT / "cluster.yaml")
    # 6 CPU workers of 16 and 2 GPU workers of 4 CPUs + 1 GPU, within max_workers 8; the head has no CPUs.
    assert (info.cpus, info.gpus, info.node_cpus, info.node_gpus, info.max_nodes) == (104.0, 2.0, 16.0, 1.0, 9)
    assert info.max_concurrency(info.trial_resources(cpus=4, gpus=0)) == 26
    with pytest.raises(AutoMLError, match="largest node .* has 16 CPU"):
        info.trial_resources(cpus=32)  # no single node has 32 CPUs: such a trial would never start


def test_a_config_without_worker_resources_is_refused_with_a_fix(tmp_path):
    from automl.cluster import ClusterInfo
    from automl.errors import AutoMLError

    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    cfg["available_node_types"]["cpu_worker"]["resources"] = {}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(AutoMLError, match=r"\['cpu_worker'\] do not state their resources.*Fix"):
        ClusterInfo.from_config(tmp_path / "c.yaml")
