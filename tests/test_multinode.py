"""A real two-node Ray cluster on this machine: a search whose trials run on both nodes and share the feature
cache across them, and a two-worker DDP retrain whose ranks sit on different nodes.

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
         "gradual_unfreeze_every": 0, "image_size": 32, "max_epochs": 8, "lr": 0.02}
m = auto_finetune(df, time_budget_s=None, max_trials=6, output_dir=out + "/run", storage_path=storage,
                  search_space=space, retrain_workers=2, find_label_errors=False, export_formats=False,
                  progress=False)
t = m.trials
result["trials"] = t[["trial_id", "node", "feature_cache"]].to_dict("records")
result["training"] = m.manifest.training
history = m.search.history
result["cache_from"] = {tid: [r.get("feature_cache_from") for r in rows] for tid, rows in history.items()}
result["accuracy"] = m.metrics["accuracy"]
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
    train = res["training"]
    assert train["how"] == "retrain" and train["workers"] == 2
    assert len(set(train["nodes"])) == 2  # the two DDP ranks sat on different nodes
    assert res["accuracy"] > 0.5  # a linear probe on 4 digit classes: chance is 0.25
