"""A real two-node Ray cluster on this machine: a search whose trials run on both nodes and share the feature
cache across them, and a two-worker DDP retrain whose ranks sit on different nodes and which keeps the schedule
the winner was validated with. (What DDP itself promises, identical ranks and gradients averaged like one process
on the union batch, is checked without Ray in test_train.py.)

The cluster runs in a subprocess with its own Ray temp dir, so it never meets the test session's Ray.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

DRIVER = r"""
import json, sys
import numpy as np, pandas as pd
import ray
from ray.cluster_utils import Cluster
from sklearn.datasets import load_digits

out, storage = sys.argv[1], sys.argv[2]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
ray.init(address=cluster.address)
from automl import auto_finetune
from automl.errors import AutoMLError

d = load_digits()
keep = np.concatenate([np.flatnonzero(d.target == c)[:50] for c in range(4)])
df = pd.DataFrame({"image": list(d.images[keep]), "label": d.target[keep]})
result = {"nodes": [n["NodeID"] for n in ray.nodes() if n["Alive"]]}
try:  # a driver-local output folder is refused before any compute on a multi-node cluster
    auto_finetune(df, time_budget_s=None, max_trials=1, output_dir=out + "/refused", progress=False)
except AutoMLError as exc:
    result["refused"] = str(exc)
# Head-only trials of a pretrained backbone on un-augmented inputs: their frozen features are cached and shared.
space = {"backbone": "efficientnet-lite0", "unfreeze": 0, "augment": "none", "mix": "none",
         "gradual_unfreeze_every": 0, "image_size": 32, "max_epochs": 4, "lr": 0.02,
         "report_rows": 120}  # rows per report pinned: the retrain must scale them to train+validation
m = auto_finetune(df, time_budget_s=None, max_trials=6, output_dir=out + "/run", storage_path=storage,
                  search_space=space, retrain_workers=2, find_label_errors=False, export_formats=False,
                  progress=False)
t = m.trials
result["trials"] = t[["trial_id", "node", "feature_cache"]].to_dict("records")
retrained = t[t["trial_id"] == m.manifest.training["trials"][0]].iloc[0]  # the winner, or the start point kept
result["retrained"] = {"schedule": str(retrained["config/schedule"]), "lr": float(retrained["config/lr"])}
result["training"] = m.manifest.training
history = m.search.history
result["cache_from"] = {tid: [r.get("feature_cache_from") for r in rows] for tid, rows in history.items()}
result["accuracy"] = m.metrics["accuracy"]
man = m.manifest
result.update(plan=man.plan, hp=man.hyperparameters, searched=man.searched_hyperparameters,
              splits=m.data_report["split_sizes"])
from automl import load
result["exported_sum"] = float(sum(p.detach().double().sum() for p in load(m.export_dir).model.parameters()))
print("RESULT " + json.dumps(result))
ray.shutdown()
cluster.shutdown()
"""


def test_two_node_cluster_search_shares_the_feature_cache_and_retrains_across_nodes(tmp_path):
    import tempfile

    ray_tmp = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths must stay under 107 bytes
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = ray_tmp
    r = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path / "out"), str(tmp_path / "shared")],
                       capture_output=True, text=True, env=env, timeout=900)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, r.stderr[-3000:]
    res = json.loads(line[len("RESULT "):])
    assert len(res["nodes"]) == 2
    assert "storage_path" in res["refused"] and "Fix:" in res["refused"]
    trials = res["trials"]
    assert {t["node"] for t in trials} == set(res["nodes"])  # trials ran on both nodes
    # The frozen features were computed once and read by a trial on the *other* node.
    cross = [t for t in trials if t["feature_cache"] == "head:hit"
             and any(src and src != t["node"] for src in res["cache_from"][t["trial_id"]])]
    assert cross, trials
    # The retrain: the winner again on train+validation, for the length and schedule it was validated with (the
    # same reports, each scaled to the larger data: the same epochs), on two Ray Train workers on different nodes.
    train, hp, searched = res["training"], res["hp"], res["searched"]
    assert train["how"] == "retrain" and train["workers"] == 2
    assert len(set(train["nodes"])) == 2  # the two DDP ranks sat on different nodes
    assert train["epochs"] == train["schedule_epochs"] == res["plan"]["reports"]  # not cut mid-schedule
    n_train, n_full = res["splits"]["train"], res["splits"]["train"] + res["splits"]["validation"]
    assert hp["report_rows"] == round(searched["report_rows"] * n_full / n_train) and train["rows"] == n_full
    assert hp["schedule"] == res["retrained"]["schedule"] and hp["lr"] == res["retrained"]["lr"]
    sums = train["weight_sums"]
    assert len(sums) == 2 and sums[0] == sums[1]  # DDP kept both ranks' weights identical
    assert res["exported_sum"] == pytest.approx(sums[0], rel=1e-6)  # rank 0's weights are what was exported
    assert res["accuracy"] > 0.5  # a linear probe on 4 digit classes: chance is 0.25
