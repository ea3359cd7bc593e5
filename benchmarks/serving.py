"""Serving throughput and latency (issue #17): single-row requests from 8 concurrent clients.

    python benchmarks/serving.py [--requests 400]

For one image model (EfficientNet-Lite0 on Tux Paint stamps) and one text model (MiniLM on fortunes), each
exported by a short auto_finetune run, measures requests per second and p50/p99 latency through `automl serve`
with dynamic batching (max batch 16) and without (max batch 1), against calling `predict_proba` in-process on
the same single rows. Writes the "serving" section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import base64
import json
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import realsets  # noqa: E402
from _results import write_section  # noqa: E402

CLIENTS = 8


def export(kind: str, out: Path) -> tuple[Path, list]:
    """A small export and the single-row inputs to send it (as the server takes them, and as predict takes them)."""
    from automl import auto_finetune

    if kind == "image":
        df = realsets.stamps().groupby("label").head(20).reset_index(drop=True)
        m = auto_finetune(df, time_budget_s=90, output_dir=out / kind, progress=False, export_formats=False,
                          search_space={"backbone": "efficientnet-lite0", "max_epochs": 3})
        raw = [Path(p).read_bytes() for p in df["image"].head(32)]
        return Path(m.export_dir), [(base64.b64encode(r).decode(), pd.DataFrame({"image": [r]})) for r in raw]
    df = realsets.fortunes().groupby("label").head(40).reset_index(drop=True)
    m = auto_finetune(df, time_budget_s=90, output_dir=out / kind, progress=False, export_formats=False,
                      search_space={"max_epochs": 3})
    texts = df["text"].head(32).tolist()
    return Path(m.export_dir), [(t, [t]) for t in texts]


def _figures(lat: list[float], n: int, wall: float) -> dict:
    return {"rps": n / wall, "p50_ms": 1000 * float(np.percentile(lat, 50)),
            "p99_ms": 1000 * float(np.percentile(lat, 99))}


def load_test(url: str, payloads: list, n: int, clients: int = CLIENTS) -> dict:
    """n single-row requests from `clients` threads; returns throughput and latency percentiles."""
    lat: list[float] = []
    lock = threading.Lock()
    counter = iter(range(n))

    def client():
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            body = json.dumps({"inputs": [payloads[i % len(payloads)][0]]}).encode()
            req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
            t = time.perf_counter()
            with urllib.request.urlopen(req, timeout=120) as r:
                r.read()
            with lock:
                lat.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return _figures(lat, n, time.perf_counter() - t0)


def _one_at_a_time(call, payloads: list, n: int) -> dict:
    """n calls of `call(payload)`, one after another in this process; throughput and latency percentiles."""
    lat = []
    t0 = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        call(payloads[i % len(payloads)])
        lat.append(time.perf_counter() - t)
    return _figures(lat, n, time.perf_counter() - t0)


def in_process(export_dir: Path, payloads: list, n: int) -> dict:
    """load(dir).predict_proba on one row at a time (a DataFrame), with this process's threads."""
    from automl import load

    m = load(export_dir)
    return _one_at_a_time(lambda p: m.predict_proba(p[1]), payloads, n)


def replica_work(export_dir: Path, payloads: list, n: int, threads: int, kind: str) -> dict:
    """What a replica with `threads` CPUs does for a one-row request, without HTTP or Ray: the JSON body read and
    checked (serve.parse_inputs), then answered (serve.answer), with that many torch threads."""
    from automl import load
    from automl.ops.serve import MAX_INPUTS, answer, parse_inputs
    from automl.runtime import set_threads, threads_kept

    m = load(export_dir)
    columns = len(m.manifest.input_columns)

    def call(p):
        body = json.loads(json.dumps({"inputs": [p[0]]}).encode())
        answer(m, parse_inputs(body, kind, columns, MAX_INPUTS))

    with threads_kept():
        set_threads(threads)
        return _one_at_a_time(call, payloads, n)


def bare_floor(payloads: list, n: int, port: int, url_port: int | None = None) -> dict:
    """Ray Serve's own cost on this machine: one client, one request at a time, against an ingress that reads the
    same JSON body and answers without a model (what no change in automl's replica can go below). port: the
    proxy's; url_port: where the requests go (the replica's own port, under direct ingress)."""
    from ray import serve as rs

    @rs.deployment(ray_actor_options={"num_cpus": 1})
    class Bare:
        async def __call__(self, request):  # Serve hands an HTTP deployment the Starlette request
            return {"predictions": [len((await request.json())["inputs"])]}

    rs.start(http_options={"host": "127.0.0.1", "port": port})
    rs.run(Bare.bind(), name="bare", route_prefix="/bare")
    url = f"http://127.0.0.1:{url_port or port}/bare/predict"
    try:
        load_test(url, payloads, 16, clients=1)  # warm up
        return load_test(url, payloads, n, clients=1)
    finally:
        rs.shutdown()  # and its proxy: the next server starts Serve again on its own port


def direct_floor(payloads: list, n: int, port: int) -> dict:
    """bare_floor under Serve's direct ingress on the same bodies, in a fresh process (the setting is read as its
    Ray starts)."""
    import subprocess

    bodies = Path(tempfile.mkstemp(prefix="bodies-", suffix=".json")[1])
    bodies.write_text(json.dumps([p[0] for p in payloads]))
    code = ("import json, sys; sys.path.insert(0, %r); import serving; "
            "print(json.dumps(serving._direct_floor_here(%r, %d, %d)))" % (str(HERE), str(bodies), n, port))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    bodies.unlink()
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def _direct_floor_here(bodies: str, n: int, port: int) -> dict:
    from automl.cluster import ensure_ray
    from automl.ops.serve import ServeOptions, _direct_ingress

    _direct_ingress(ServeOptions(port=port, direct=True), local=True)
    ensure_ray()
    return bare_floor([(b, None) for b in json.loads(Path(bodies).read_text())], n, port + 1, url_port=port)


class DirectServer:
    """`automl serve DIR --direct` in its own process (Serve's direct ingress is set before its Ray starts): the
    replica answers on `port` itself, without the proxy's hop."""

    def __init__(self, export_dir: Path, name: str, port: int, batch: int):
        import os
        import subprocess

        self.log = Path(tempfile.mkstemp(prefix="serve-direct-", suffix=".log")[1])
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen([sys.executable, "-m", "automl", "serve", str(export_dir), "--name", name,
                                          "--port", str(port), "--direct", "--max-batch-size", str(batch)],
                                         env=env, stdout=f, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{port}"
        ready = f"serving {name}: POST {self.url}/models/{name}/predict"
        deadline = time.time() + 300
        while ready not in self.log.read_text():
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError(f"automl serve --direct did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    from automl.cluster import ensure_ray
    from automl.ops.serve import ServeOptions, serve

    import torch

    ensure_ray()
    opts = ServeOptions()
    tmp = Path(tempfile.mkdtemp(prefix="serving-"))
    lines = [f"Single-row requests from {CLIENTS} concurrent clients, {args.requests} per measurement; the server "
             "and the clients share this machine's CPUs. `in-process` runs one row at a time (no HTTP, no "
             "concurrency): `load(dir).predict_proba` with this process's threads, and the replica's own work on the "
             "same request body (JSON read and checked, answered) with a replica's threads; what serving adds is "
             "measured against the latter. Batching = up to 16 inputs of concurrent requests predicted together "
             "by one replica; unbatched = 1.", "",
             "| model | mode | requests/s | p50 ms | p99 ms |", "|---|---|---|---|---|"]
    ratios = []
    for kind in ("image", "text"):
        d, payloads = export(kind, tmp)
        full = in_process(d, payloads, min(args.requests, 200))
        lines.append(f"| {kind} | in-process, predict_proba, {torch.get_num_threads()} threads | {full['rps']:.1f} | "
                     f"{full['p50_ms']:.1f} | {full['p99_ms']:.1f} |")
        # The replica's own work on the same request with its threads: what the server adds is the rest.
        base = replica_work(d, payloads, min(args.requests, 200), int(opts.cpus_per_replica), kind)
        lines.append(f"| {kind} | in-process, a replica's work, {int(opts.cpus_per_replica)} thread(s) | "
                     f"{base['rps']:.1f} | {base['p50_ms']:.1f} | {base['p99_ms']:.1f} |")
        res = {}
        for batch in (1, 16):
            server = serve([d], names=[kind], options=replace(opts, port=23000 + batch, max_batch_size=batch,
                                                              batch_wait_s=0.005))
            load_test(f"{server.url}/models/{kind}/predict", payloads, 16)  # warm up
            res[batch] = load_test(f"{server.url}/models/{kind}/predict", payloads, args.requests)
            # One client, one request at a time: what serving adds to a prediction, no queueing; on the batched
            # (default) server too, where a lone request must not wait for a batch to fill.
            a = res["alone", batch] = load_test(f"{server.url}/models/{kind}/predict", payloads, 100, clients=1)
            lines.append(f"| {kind} | served ({'batched' if batch > 1 else 'unbatched'}), one client at a time | "
                         f"{a['rps']:.1f} | {a['p50_ms']:.1f} | {a['p99_ms']:.1f} |")
            server.shutdown()
            r = res[batch]
            lines.append(f"| {kind} | served, {'batched (16)' if batch > 1 else 'unbatched'} | {r['rps']:.1f} | "
                         f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} |")
        # The same server with Serve's direct ingress (`automl serve --direct`): the replica answers on its own port.
        for batch in (1, 16):
            direct = DirectServer(d, kind, 23200 + 2 * batch, batch)
            try:
                url = f"{direct.url}/models/{kind}/predict"
                load_test(url, payloads, 16)  # warm up
                res["direct", batch] = load_test(url, payloads, args.requests)
                a = res["direct alone", batch] = load_test(url, payloads, 100, clients=1)
            finally:
                direct.stop()
            r = res["direct", batch]
            label = "batched" if batch > 1 else "unbatched"
            lines.append(f"| {kind} | served direct ({label}), one client at a time | {a['rps']:.1f} | "
                         f"{a['p50_ms']:.1f} | {a['p99_ms']:.1f} |")
            lines.append(f"| {kind} | served direct, {'batched (16)' if batch > 1 else 'unbatched'} | {r['rps']:.1f} | "
                         f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} |")
        floor = bare_floor(payloads, 100, 23100)
        lines.append(f"| {kind} | Ray Serve alone (an ingress reading the same body, no model), one client at a time "
                     f"| {floor['rps']:.1f} | {floor['p50_ms']:.1f} | {floor['p99_ms']:.1f} |")
        bare = direct_floor(payloads, 100, 23300)
        lines.append(f"| {kind} | Ray Serve alone, direct (the same ingress on its own port), one client at a time "
                     f"| {bare['rps']:.1f} | {bare['p50_ms']:.1f} | {bare['p99_ms']:.1f} |")
        ratios.append((kind, res[16]["rps"] / res[1]["rps"], res["alone", 1]["p50_ms"] - base["p50_ms"],
                       res["alone", 16]["p50_ms"] - base["p50_ms"], floor["p50_ms"],
                       res["direct alone", 16]["p50_ms"] - base["p50_ms"],
                       res["direct", 16]["rps"] / res["direct", 1]["rps"]))
        print("\n".join(lines[-12:]), flush=True)
    lines.append("")
    for kind, ratio, overhead, batched_overhead, floor, direct_overhead, direct_ratio in ratios:
        lines.append(f"- {kind}: batching gives {ratio:.2f}× the unbatched throughput (target ≥ 3×); serving adds "
                     f"{overhead:.1f} ms p50 over the replica's own work on one row, one client at a time "
                     f"({batched_overhead:.1f} ms on the batched server; target ≤ 5 ms), where Ray Serve alone "
                     f"takes {floor:.1f} ms. Served direct (`--direct`, the default batched server): "
                     f"{direct_overhead:.1f} ms added, batching {direct_ratio:.2f}×.")
    print("\n".join(lines))
    if not args.no_write:
        write_section("serving", "Serving (automl serve on Ray Serve)", lines)


if __name__ == "__main__":
    main()
