"""Cost as the data grows (issue #16): memory and time at 1k/10k/50k images and 1k/20k/100k texts.

    python benchmarks/scale.py [--images 1000,10000,50000] [--texts 1000,20000,100000]

Images are the Tux Paint stamps enlarged by augmentation (random crops, flips, colour shifts) and written as PNG
files (cached under /tmp/automl-scale); texts are fortunes, varied word by word so no two are equal. For each size:
time to prepare (read and check) and to materialise (decode at the planned size into the memory-mapped store, in
parallel Ray tasks), peak RSS of the driver and of all processes (driver + Ray workers), and the time of one
trial-epoch (a pass over the training rows: resnet10t from scratch at 32 px for images, a 2-layer BERT for texts, so
the data path and not the model dominates). Then the 2-node run: trials per minute of the same small search on one
2-CPU node and on a 2-node cluster of 1 CPU each. Writes the "scale" section of RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import realsets  # noqa: E402
from _results import write_section  # noqa: E402

CACHE = Path("/tmp/automl-scale")


class PeakRSS:
    """Samples the driver's RSS and the RSS of every process on the machine that belongs to this Ray session."""

    def __init__(self):
        self.driver = self.total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = psutil.Process()
        while not self._stop.is_set():
            try:
                d = me.memory_info().rss
                total = d + sum(p.memory_info().rss for p in psutil.process_iter()
                                if p.pid != me.pid and _is_ray(p))
            except (psutil.Error, OSError):
                continue
            self.driver, self.total = max(self.driver, d), max(self.total, total)
            time.sleep(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _is_ray(p: psutil.Process) -> bool:
    try:
        return any("ray" in part for part in p.cmdline()[:3])
    except (psutil.Error, OSError):
        return False


def _cpu_seconds() -> dict[int, float]:
    """CPU seconds so far of every process on the machine, by pid. Summed per process because this sandbox's
    machine-wide counters (/proc/stat) do not see the Ray workers' time."""
    out = {}
    for p in psutil.process_iter():
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
        except (psutil.Error, OSError):
            pass
    return out


def _busy_since(before: dict[int, float]) -> float:
    return sum(max(0.0, t - before.get(pid, 0.0)) for pid, t in _cpu_seconds().items())


def images(n: int) -> tuple[pd.DataFrame, int]:
    """n labelled PNG files (stamps, augmented), and their size on disk in bytes."""
    from PIL import Image, ImageEnhance, ImageOps

    base = realsets.stamps()
    folder = CACHE / "images"
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    rows = []
    for i in range(n):
        src = base.iloc[i % len(base)]
        path = folder / f"{i}.png"
        if not path.exists():
            img = Image.open(src["image"]).convert("RGBA")
            if i >= len(base):  # the originals first, then augmented copies
                w, h = img.size
                box = (rng.randint(0, w // 8), rng.randint(0, h // 8), w - rng.randint(0, w // 8), h - rng.randint(0, h // 8))
                img = img.crop(box)
                if rng.random() < 0.5:
                    img = ImageOps.mirror(img)
                rgb = ImageEnhance.Color(img.convert("RGB")).enhance(rng.uniform(0.6, 1.4))
                img = Image.merge("RGBA", (*rgb.split(), img.split()[3]))
            img.save(path)
        rows.append({"image": str(path), "label": src["label"]})
    df = pd.DataFrame(rows)
    return df, sum(os.path.getsize(p) for p in df["image"])


def texts(n: int) -> pd.DataFrame:
    base = realsets.fortunes()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        src = base.iloc[i % len(base)]
        words = src["text"].split()
        if i >= len(base):  # a distinct variant: a few words dropped, plus the copy number
            keep = rng.random(len(words)) > 0.15
            words = [w for w, k in zip(words, keep) if k] or words
            words.append(str(i))
        rows.append({"text": " ".join(words), "label": src["label"]})
    return pd.DataFrame(rows)


def measure(df: pd.DataFrame, modality: str, work: Path) -> dict:
    import torch

    from automl.data.inputs import Inputs
    from automl.data.intake import prepare
    from automl.training.loop import fit

    out = {"rows": len(df)}
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        task = prepare(df, "label")
        out["prepare_s"] = time.perf_counter() - t0
        t1, c1 = time.perf_counter(), _cpu_seconds()
        inputs = Inputs.materialise(task, 32 if modality == "image" else None, work)
        out["materialise_s"] = time.perf_counter() - t1
        out["materialise_cores"] = _busy_since(c1) / max(out["materialise_s"], 1e-9)  # all processes' CPU / wall
        data = inputs.trial_data()
        if modality == "image":
            cfg = {"backbone": "timm/resnet10t:scratch", "image_size": 32, "batch_size": 64, "augment": "none"}
        else:
            tiny = HERE.parent / "tests" / "fixtures" / "v1_text_export" / "hf"
            cfg = {"backbone": f"hf/{tiny}", "max_length": 64, "batch_size": 64, "unfreeze": "all"}
        torch.set_num_threads(1)
        # Small sets train a few epochs and keep the last: a first pass over 700 rows mostly times warm-up.
        epochs = max(1, -(-3000 // len(data.y_train)))
        t2 = time.perf_counter()
        res = fit(cfg, data, epochs=epochs, device=torch.device("cpu"))
        out["fit_s"] = (time.perf_counter() - t2) / epochs  # with the model's set-up and the validation pass
        out["epoch_s"] = res.history[-1]["epoch_time_s"]  # the pass over the training rows alone
        out["train_rows"] = len(data.y_train)
        del res
    out["driver_mb"], out["total_mb"] = rss.driver / 2**20, rss.total / 2**20
    return out


TWO_NODE = r"""
import json, sys, time
import numpy as np, pandas as pd
import ray
from ray.cluster_utils import Cluster
from sklearn.datasets import load_digits
nodes = int(sys.argv[1])
c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2 // nodes})
for _ in range(nodes - 1):
    c.add_node(num_cpus=2 // nodes)
c.wait_for_nodes()
ray.init(address=c.address)
from automl import auto_finetune
d = load_digits()
df = pd.DataFrame({"image": list(d.images[:600]), "label": d.target[:600]})
t0 = time.perf_counter()
m = auto_finetune(df, time_budget_s=None, max_trials=8, output_dir=sys.argv[2], storage_path=sys.argv[2] + "/shared",
                  progress=False, retrain=False, export_formats=False, find_label_errors=False,
                  search_space={"backbone": "timm/resnet10t:scratch", "image_size": 16, "max_epochs": 4,
                                "reduction_factor": 100})
search_s = m.manifest.budget["spent_s"]["search"]
print("RESULT " + json.dumps({"trials": len(m.trials), "search_s": search_s, "nodes": m.trials["node"].nunique()}))
ray.shutdown(); c.shutdown()
"""


def trials_per_minute(nodes: int) -> dict:
    tmp = tempfile.mkdtemp(prefix="sc", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rs", dir="/tmp")
    r = subprocess.run([sys.executable, "-c", TWO_NODE, str(nodes), tmp], capture_output=True, text=True, env=env,
                       timeout=1800)
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT "))
    import json

    res = json.loads(line[7:])
    res["per_minute"] = 60 * res["trials"] / res["search_s"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", default="1000,10000,50000")
    ap.add_argument("--texts", default="1000,20000,100000")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    from automl.cluster import ensure_ray

    ensure_ray()
    lines = ["Peak RSS is sampled every 0.2 s: the driver alone, and the driver plus every Ray process (workers that "
             "decode images, the object store). `above files` is the driver's peak minus the input files' size on "
             "disk. `cores` is the CPU time of all processes (driver and Ray workers) / wall time while materialising "
             "(2 cores here; texts are not materialised: they are tokenised once, in the first fit, and cached). A "
             "trial-epoch is one pass over the training rows on 1 thread, the last of as many as make 3,000 rows "
             "(`fit s` is the whole fit per epoch: the model's set-up, the passes and the validation).",
             "", "| data | rows | files MB | prepare s | materialise s | cores | driver peak MB | above files MB | "
             "all processes peak MB | fit s | trial-epoch s | µs per row |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    per_row = {"image": [], "text": []}
    for modality, sizes in (("image", args.images), ("text", args.texts)):
        for n in [int(s) for s in sizes.split(",") if s]:
            t0 = time.perf_counter()
            if modality == "image":
                df, files = images(n)
            else:
                df, files = texts(n), 0
            build = time.perf_counter() - t0
            r = measure(df, modality, Path(tempfile.mkdtemp(prefix="scale-")))
            us = 1e6 * r["epoch_s"] / r["train_rows"]
            per_row[modality].append(us)
            lines.append(f"| {modality} | {n} | {files / 2**20:.0f} | {r['prepare_s']:.1f} | {r['materialise_s']:.1f} | "
                         f"{r['materialise_cores']:.1f} | {r['driver_mb']:.0f} | "
                         f"{r['driver_mb'] - files / 2**20:.0f} | {r['total_mb']:.0f} | {r['fit_s']:.1f} | "
                         f"{r['epoch_s']:.1f} | {us:.0f} |")
            print(lines[-1], f"(built in {build:.0f} s)", flush=True)
    lines.append("")
    for modality, v in per_row.items():
        if len(v) > 1:
            lines.append(f"- {modality}: time per row of a trial-epoch varies {max(v) / min(v):.2f}× across sizes "
                         "(linear cost: ≤ 1.2×).")
    one, two = trials_per_minute(1), trials_per_minute(2)
    lines += ["", "Two nodes (ray.cluster_utils.Cluster on this machine, 1 CPU each) against one node of 2 CPUs, "
              "the same 8-trial search:", "",
              f"- 1 node: {one['per_minute']:.1f} trials/min ({one['trials']} trials in {one['search_s']:.0f} s)",
              f"- 2 nodes: {two['per_minute']:.1f} trials/min ({two['trials']} trials in {two['search_s']:.0f} s, on "
              f"{two['nodes']} nodes) → {two['per_minute'] / one['per_minute']:.2f}× (same CPUs in total: the "
              "difference is what crossing nodes costs)"]
    print("\n".join(lines))
    if not args.no_write:
        write_section("scale", "Scale: memory and time as the data grows", lines)


if __name__ == "__main__":
    main()
