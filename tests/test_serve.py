"""`automl serve` on Ray Serve: real HTTP requests against exported image and text models, side by side."""
from __future__ import annotations

import base64
import io
import json
import shutil
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from automl import load
from automl.ops.serve import ServeOptions, serve

pytestmark = pytest.mark.slow
FIXTURES = Path(__file__).parent / "fixtures"
TOKEN = "s3cret-token"


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.asarray(arr) * 16).clip(0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _post(url: str, body, token: str | None = TOKEN, raw: bytes | None = None):
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_a_busy_port_is_refused_with_the_fix_and_leaves_serve_free_to_start_on_another(ray_session, tmp_path,
                                                                                         free_port_factory):
    """A port another process holds gets an error saying so, not a Ray traceback; Serve is left stopped, so the next
    server (this module's, on its own port, which the next tests use) starts."""
    import socket

    from automl import AutoMLError

    shutil.copytree(FIXTURES / "v1_text_export", tmp_path / "topics")
    port = free_port_factory()
    with socket.socket() as held:
        held.bind(("127.0.0.1", port))
        held.listen(1)
        with pytest.raises(AutoMLError, match=f"Could not listen on 127.0.0.1:{port}: another process holds that "
                                              f"port. Fix: serve on another port \\(--port {port + 1}\\)"):
            serve([tmp_path / "topics"], options=ServeOptions(port=port, cpus_per_replica=0))
    from ray.serve.context import _get_global_client
    from ray.serve.exceptions import RayServeException

    # Nothing is left holding the refused port's options.
    with pytest.raises(RayServeException, match="no Serve instance running"):
        _get_global_client()


@pytest.fixture(scope="module")
def server(ray_session, tmp_path_factory, free_port_factory):
    d = tmp_path_factory.mktemp("serve")
    (d / "token").write_text(TOKEN + "\n")
    dirs = []
    for name in ("v1_image_export", "v1_text_export"):
        shutil.copytree(FIXTURES / name, d / name)
        dirs.append(d / name)
    opts = ServeOptions(port=free_port_factory(), cpus_per_replica=0, max_request_bytes=50_000, max_inputs=8, max_batch_size=8)
    s = serve(dirs, names=["digits", "topics"], options=opts, token_file=d / "token")
    yield s, {"digits": load(dirs[0]), "topics": load(dirs[1])}
    s.shutdown()


def test_health_and_model_list(server):
    s, _ = server
    with urllib.request.urlopen(f"{s.url}/healthz", timeout=30) as r:
        assert json.loads(r.read()) == {"status": "ok", "models": 2}
    req = urllib.request.Request(f"{s.url}/models", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        listed = {m["name"]: m for m in json.loads(r.read())["models"]}
    assert set(listed) == {"digits", "topics"}
    assert listed["topics"]["modality"] == "text" and listed["topics"]["classes"] == ["food", "sport", "tech"]
    assert listed["digits"]["classes"] == ["0", "1", "2"]


def test_text_predictions_equal_load_predict_proba(server):
    s, models = server
    texts = ["the team scored a goal", "pizza for dinner", "my laptop runs new code"]
    status, out = _post(f"{s.url}/models/topics/predict", {"inputs": texts})
    assert status == 200, out
    want = models["topics"].predict_proba(texts)
    got = pd.DataFrame(out["probabilities"])[[str(c) for c in want.columns]].to_numpy()
    np.testing.assert_allclose(got, want.to_numpy(), atol=1e-6)
    assert out["predictions"] == list(models["topics"].predict(texts))


def test_image_predictions_from_base64_and_data_urls_equal_load(server, digits_df):
    s, models = server
    pngs = [_png(a) for a in digits_df["image"].head(4)]
    inputs = [base64.b64encode(pngs[0]).decode(), *("data:image/png;base64," + base64.b64encode(p).decode()
                                                   for p in pngs[1:])]
    status, out = _post(f"{s.url}/models/digits/predict", {"inputs": inputs})
    assert status == 200, out
    want = models["digits"].predict_proba(pd.DataFrame({"image": pngs}))
    got = pd.DataFrame(out["probabilities"])[[str(c) for c in want.columns]].to_numpy()
    np.testing.assert_allclose(got, want.to_numpy(), atol=1e-6)
    assert out["predictions"] == [int(v) for v in models["digits"].predict(pd.DataFrame({"image": pngs}))]


@pytest.mark.parametrize("model, kwargs, status, message", [
    ("topics", {"token": None}, 401, "missing or wrong bearer token"),
    ("topics", {"token": "wrong"}, 401, "missing or wrong bearer token"),
    ("topics", {"raw": b"{not json"}, 400, "the body is not JSON"),
    ("topics", {"body": {"inputs": []}}, 400, "non-empty list; got an empty list"),
    ("topics", {"body": {"texts": ["a"]}}, 400, 'expected a JSON object {"inputs": [...]}'),
    ("topics", {"body": {"inputs": ["data:image/png;base64,iVBORw0KGgo="]}}, 422, "this text model expects a list"),
    ("digits", {"body": {"inputs": ["a plain sentence"]}}, 422, "is not base64 (a text sent to an image model?)"),
    ("digits", {"body": {"inputs": [base64.b64encode(b"\x89PNG not really").decode()]}}, 422,
     "is not a readable image"),
    ("digits", {"body": {"inputs": [[1, 2, 3]]}}, 422, "expects images as base64"),
    ("topics", {"body": {"inputs": ["x" * 60_000]}}, 413, "at most 50000"),
    ("topics", {"body": {"inputs": ["a"] * 9}}, 413, "9 inputs in one request; at most 8"),
    ("nope", {"body": {"inputs": ["a"]}}, 404, "no model named 'nope'"),
])
def test_bad_requests_get_a_4xx_saying_what_was_wrong_and_the_server_keeps_serving(server, model, kwargs, status,
                                                                                  message):
    s, models = server
    body = kwargs.get("body", {"inputs": ["a goal"]})
    got, out = _post(f"{s.url}/models/{model}/predict", body, token=kwargs.get("token", TOKEN), raw=kwargs.get("raw"))
    assert got == status and message in out["error"], out
    ok, again = _post(f"{s.url}/models/topics/predict", {"inputs": ["a goal"]})
    assert ok == 200 and again["predictions"] == list(models["topics"].predict(["a goal"]))


def test_concurrent_single_row_requests_are_each_answered_with_their_own_row(server):
    s, models = server
    texts = [f"{w} today" for w in ("goal", "pizza", "laptop", "coach", "salad", "server", "team", "soup")]
    results: dict = {}

    def call(i):
        results[i] = _post(f"{s.url}/models/topics/predict", {"inputs": [texts[i]]})

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(texts))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    want = models["topics"].predict_proba(texts).to_numpy()
    for i, (status, out) in results.items():
        assert status == 200
        got = np.array([out["probabilities"][0][str(c)] for c in models["topics"].classes])
        np.testing.assert_allclose(got, want[i], atol=1e-6)


def test_a_second_app_serves_beside_the_first_and_stopping_it_leaves_the_first_serving(server, tmp_path):
    """Also: a lone request is answered at once, not held until a batch fills. The second app's batches wait an
    hour for company; its one request at a time must come back within _post's 60 s."""
    s, models = server
    shutil.copytree(FIXTURES / "v1_text_export", tmp_path / "topics")
    port = int(s.url.rsplit(":", 1)[1])
    other = serve([tmp_path / "topics"], options=ServeOptions(port=port, cpus_per_replica=0, batch_wait_s=3600.0),
                  app_name="second")
    assert other.url.endswith(f":{port}/second") and other.names == ["topics"]
    status, out = _post(f"{other.url}/models/topics/predict", {"inputs": ["a goal"]}, token=None)  # no token here
    assert status == 200 and out["predictions"] == list(models["topics"].predict(["a goal"]))
    other.shutdown()
    assert _post(f"{other.url}/models/topics/predict", {"inputs": ["a goal"]}, token=None)[0] == 404
    ok, again = _post(f"{s.url}/models/topics/predict", {"inputs": ["a goal"]})
    assert ok == 200 and again["predictions"] == list(models["topics"].predict(["a goal"]))


def test_another_port_than_the_running_proxys_is_refused_with_the_port_to_use(server, tmp_path, free_port_factory):
    """Serve keeps the proxy's first port and ignores a later one: a server asked for another port must say so, not
    answer with a URL where nothing listens."""
    from automl import AutoMLError

    s, _ = server
    port = int(s.url.rsplit(":", 1)[1])
    shutil.copytree(FIXTURES / "v1_text_export", tmp_path / "topics")
    refused = f"HTTP proxy on 127.0.0.1:{port}; asked for 127.0.0.1:\\d+.*--host 127.0.0.1 --port {port}"
    with pytest.raises(AutoMLError, match=refused):
        serve([tmp_path / "topics"], options=ServeOptions(port=free_port_factory(), cpus_per_replica=0),
              app_name="elsewhere")


def test_a_batch_holds_max_batch_size_inputs_not_that_many_requests(server):
    """Issue 25 (serving): concurrent requests are batched by their inputs, at most max_batch_size a batch (16
    requests of 256 images were once one batch), and each request gets its own rows back. The product's batcher
    runs on a real Serve replica; there, `answer` is replaced by one that records what each call predicts."""
    from ray import serve as rs

    @rs.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 0})
    class Recorder:
        def __init__(self):
            from automl.ops import serve as automl_serve

            self.calls = []

            def echo(model, inputs):
                self.calls.append(len(inputs))
                return [{"prediction": x} for x in inputs]

            automl_serve.answer = echo  # this replica's process only
            # Calls of up to 16 inputs: only the batching can keep one at 8. A batch that is not full waits 2 s.
            self.predict = automl_serve._batcher(None, automl_serve.ServeOptions(max_batch_size=8, batch_wait_s=2.0,
                                                                                 max_inputs=16))

        async def __call__(self, inputs: list) -> list:
            return await self.predict(inputs)

        def seen(self) -> list:
            return self.calls

    handle = rs.run(Recorder.bind(), name="batching-check", route_prefix="/batching-check")
    try:
        pending = [handle.remote([f"r{i}-{j}" for j in range(4)]) for i in range(3)]
        out = [p.result(timeout_s=60) for p in pending]
        assert [[r["prediction"] for r in rows] for rows in out] == [[f"r{i}-{j}" for j in range(4)] for i in range(3)]
        assert sorted(handle.seen.remote().result(timeout_s=60)) == [4, 8]  # two requests batched, then the third
    finally:
        rs.delete("batching-check")


def _listening(port: int) -> set[str]:
    """The IPv4 addresses something listens on at `port` (Linux: /proc/net/tcp, state 0A = LISTEN)."""
    import socket
    import struct

    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        ip, p = local.split(":")
        if state == "0A" and int(p, 16) == port:
            found.add(socket.inet_ntoa(struct.pack("<I", int(ip, 16))))
    return found


def _two_free_ports(free_port_factory) -> int:
    """A free port whose next one is free too (a direct server's replica and its proxy)."""
    import socket

    while True:
        port = free_port_factory()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue


def test_direct_serving_answers_on_the_replicas_own_port_as_the_proxy_does(tmp_path, free_port_factory):
    """`automl serve --direct` (its own process: Serve's direct ingress is set before its Ray starts): the replica
    itself answers on --port, the same as load().predict_proba and as Serve's proxy on --port + 1, both on
    127.0.0.1 only; it prints its URLs and not Serve's log lines; SIGTERM stops it and frees both ports."""
    import os
    import signal
    import subprocess
    import sys
    import time

    shutil.copytree(FIXTURES / "v1_text_export", tmp_path / "topics")
    port = _two_free_ports(free_port_factory)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = tmp_path / "serve.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "automl", "serve", str(tmp_path / "topics"), "--name", "topics",
                                 "--port", str(port), "--direct", "--cpus-per-replica", "0"], env=env, stdout=f,
                                stderr=subprocess.STDOUT)
    try:
        ready = f"serving topics: POST http://127.0.0.1:{port}/models/topics/predict"
        deadline = time.time() + 300  # a safety net: the wait is for the server's own line
        while ready not in log.read_text() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert ready in log.read_text(), log.read_text()[-3000:]
        assert f"one hop more: http://127.0.0.1:{port + 1}" in log.read_text()
        assert "Started Serve" not in log.read_text()  # quiet: Serve's own start-up lines are not the user's
        assert _listening(port) == {"127.0.0.1"} and _listening(port + 1) == {"127.0.0.1"}
        texts = ["the team scored a goal", "pizza for dinner", "my laptop runs new code"]
        want = load(tmp_path / "topics").predict_proba(texts)
        for url in (f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port + 1}"):
            status, out = _post(f"{url}/models/topics/predict", {"inputs": texts}, token=None)
            assert status == 200, (url, out)
            got = pd.DataFrame(out["probabilities"])[[str(c) for c in want.columns]].to_numpy()
            np.testing.assert_allclose(got, want.to_numpy(), atol=1e-5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0, log.read_text()[-3000:]
        assert not _listening(port) and not _listening(port + 1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


@pytest.mark.parametrize("kwargs, address, refused", [
    ({"replicas": 2}, None, "answers on one replica's own port; 2 replicas were asked for. Fix: --replicas 1"),
    ({}, "ray://10.0.0.9:10001", "starts a Ray of its own on this machine; a cluster address was given"),
    ({}, None, "needs a Ray started for it, and this process already runs one. Fix: serve from a fresh process"),
])
def test_direct_serving_that_cannot_be_had_is_refused_before_anything_starts(ray_session, tmp_path, free_port,
                                                                              kwargs, address, refused):
    import os

    from automl import AutoMLError

    shutil.copytree(FIXTURES / "v1_text_export", tmp_path / "topics")
    with pytest.raises(AutoMLError, match=refused):
        serve([tmp_path / "topics"], address=address, options=ServeOptions(port=free_port, direct=True, **kwargs))
    # Nothing was started or changed: no listener on either port, no direct-ingress setting left in this process.
    assert not _listening(free_port) and not _listening(free_port + 1)
    assert "RAY_SERVE_ENABLE_DIRECT_INGRESS" not in os.environ


def test_a_direct_server_that_fails_to_start_leaves_no_ray_nor_setting_behind(tmp_path, free_port_factory):
    """A direct server's own Ray carries its direct-ingress settings: when the server fails to start after that Ray
    started (here: another process holds the port Serve's proxy needs, --port + 1), the user gets the port and the
    fix, that Ray is stopped and the settings are taken out of the process, so the next server starts clean. In a
    fresh process (direct serving needs a Ray started for it)."""
    import os
    import socket
    import subprocess
    import sys

    from automl.ops.serve import DIRECT_ENV

    shutil.copytree(FIXTURES / "v1_text_export", tmp_path / "topics")
    port = _two_free_ports(free_port_factory)
    code = f"""
import json, os, ray
from automl.ops.serve import DIRECT_ENV, ServeOptions, serve
try:
    serve([{str(tmp_path / "topics")!r}], options=ServeOptions(port={port}, direct=True, cpus_per_replica=0))
except Exception as exc:
    print(json.dumps({{"error": str(exc), "ray": ray.is_initialized(), "env": [k for k in DIRECT_ENV if k in os.environ]}}))
"""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and k not in DIRECT_ENV}
    with socket.socket() as held:
        held.bind(("127.0.0.1", port + 1))
        held.listen(1)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["error"].startswith(f"Could not listen on 127.0.0.1:{port + 1}: another process holds that port. "
                                   f"Fix: serve on another port (--port {port + 2})"), got
    assert got["ray"] is False and got["env"] == []
    assert not _listening(port)
