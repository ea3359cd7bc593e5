"""`automl serve`: exported models behind one HTTP app on Ray Serve.

    automl serve runs/mine/model runs/other/model --port 8000 [--token-file token.txt]
    curl -s 127.0.0.1:8000/models/model/predict -d '{"inputs": ["a short text"]}'

Routes: GET /healthz, GET /models (name, modality, classes, metric, card), POST /models/<name>/predict with
{"inputs": [...]}: texts (a list of [a, b] pairs for a text-pair model) or images as base64 strings or data URLs.
The answer is {"predictions": [...], "probabilities": [{label: p}, ...]} (regression: numbers only), exactly what
load(dir).predict / predict_proba give. Requests are checked in the ingress (size, token, input kinds, image
decoding) and answered with a 4xx saying what was received and what is expected; good ones are batched across
concurrent requests (serve.batch, counted in inputs) by the same replica, which holds the models (one hop).
"""
# No `from __future__ import annotations`: FastAPI reads the routes' annotations (Request) on the replicas, where
# a string annotation could not be resolved.
import asyncio
import base64
import binascii
import hmac
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request  # ray[serve]; module level: FastAPI resolves the routes' annotations here
from fastapi.responses import JSONResponse

from automl.errors import AutoMLError

MAX_REQUEST_BYTES = 10 * 2**20
MAX_INPUTS = 256
# Decoded pixels one request may ask for: a PNG of a few KB can decode to 40 MP (~120 MB); 256 such would be 30 GB.
MAX_REQUEST_PIXELS = 64_000_000
CONSTRUCTOR_TRIES = 3


class RequestError(ValueError):
    """A request the server answers with a 4xx; `status` is the HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def parse_inputs(body: object, modality: str, n_columns: int, max_inputs: int) -> list:
    """The inputs of a request body, each checked by its modality (modalities/: texts or pairs; image bytes
    decoded from base64 / data URLs)."""
    from automl import modalities

    if not isinstance(body, dict) or "inputs" not in body:
        raise RequestError(400, f"expected a JSON object {{\"inputs\": [...]}}; got {type(body).__name__} "
                                f"{str(body)[:80]!r}")
    inputs = body["inputs"]
    if not isinstance(inputs, list) or not inputs:
        raise RequestError(400, "expected \"inputs\" to be a non-empty list; got "
                                f"{'an empty list' if inputs == [] else type(inputs).__name__}")
    if len(inputs) > max_inputs:
        raise RequestError(413, f"{len(inputs)} inputs in one request; at most {max_inputs}. Fix: send smaller batches")
    adapter, out, pixels = modalities.get(modality), [], 0
    for i, item in enumerate(inputs):
        out.append(adapter.parse_request(item, i, n_columns))
        pixels += adapter.request_pixels(out[-1])
        if pixels > MAX_REQUEST_PIXELS:
            raise RequestError(413, f"the first {i + 1} inputs of this request decode to {pixels:,} pixels; at "
                                    f"most {MAX_REQUEST_PIXELS:,} a request. Fix: send smaller images (the model "
                                    "sees them at a few hundred pixels a side) or fewer a request")
    return out


def kind_of(item) -> str:
    if isinstance(item, str):
        return "an image (data URL)" if item.startswith("data:image/") else f"a string {item[:30]!r}"
    return f"a {type(item).__name__}"


def b64(text: str, i: int) -> bytes:
    m = re.match(r"^data:[\w/+.-]+;base64,(.*)$", text, re.S)
    try:
        return base64.b64decode(m.group(1) if m else text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(422, f"input {i} is not base64 (a text sent to an image model?); expected an image as "
                                "base64 or a data URL") from None


def answer(model, inputs: list) -> list[dict]:
    """One result per input, as load(dir).predict / predict_proba give them (JSON-ready)."""
    from automl import modalities

    m = model.manifest
    df = modalities.get(m.modality).request_frame(inputs, m.input_columns)
    if model.is_regression:
        return [{"prediction": float(v)} for v in model.predict(df)]
    proba = model.predict_proba(df)
    labels = [model.classes[i] for i in proba.to_numpy().argmax(1)]
    return [{"prediction": _plain(lab), "probabilities": {str(k): float(v) for k, v in row.items()}}
            for lab, (_, row) in zip(labels, proba.iterrows())]


def _plain(v):
    return v.item() if hasattr(v, "item") else v


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    max_batch_size: int = 16          # inputs of concurrent requests predicted together (a larger request: alone)
    batch_wait_s: float = 0.005
    replicas: int = 1
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    max_request_bytes: int = MAX_REQUEST_BYTES
    max_inputs: int = MAX_INPUTS
    direct: bool = False              # clients reach the replica itself on `port` (Serve's proxy: on port + 1)

    @property
    def proxy_port(self) -> int:
        """Where Ray Serve's HTTP proxy listens: `port`, or the next one when the replica takes `port` (direct)."""
        return self.port + 1 if self.direct else self.port


def _app(models: dict[str, dict], opts: ServeOptions):
    """One deployment that is both the HTTP ingress and the models' server: each replica loads every model and
    answers its routes itself (no second hop through a deployment handle), batching concurrent requests per model
    by their inputs (serve.batch)."""
    from ray import serve

    app = FastAPI(title="automl", docs_url=None, redoc_url=None, openapi_url=None)

    # A replica that cannot start (an export whose weights do not load) fails the same way every time: a few tries,
    # not Serve's 20, before the server says so.
    @serve.deployment(num_replicas=opts.replicas, max_ongoing_requests=max(8, 4 * opts.max_batch_size),
                      max_constructor_retry_count=CONSTRUCTOR_TRIES,
                      ray_actor_options={"num_cpus": opts.cpus_per_replica, "num_gpus": opts.gpus_per_replica})
    @serve.ingress(app)
    class ModelServer:
        def __init__(self, dirs: dict, info: dict):
            self.info = info
            self.models = {name: _load_model(d, opts) for name, d in dirs.items()}
            self.batched = {name: _batcher(model, opts) for name, model in self.models.items()}
            self.in_flight = dict.fromkeys(self.models, 0)  # predict requests a model's route is answering now

        @app.get("/healthz")
        async def healthz(self):
            return {"status": "ok", "models": len(self.models)}

        @app.get("/models")
        async def list_models(self, request: Request):
            return _refusal(request, opts.token) or {"models": list(self.info.values())}

        @app.post("/models/{name}/predict")
        async def predict(self, name: str, request: Request):
            refused = _refusal(request, opts.token)
            if refused:
                return refused
            if name not in self.models:
                return JSONResponse({"error": f"no model named {name!r}; served: {sorted(self.models)}"},
                                    status_code=404)
            self.in_flight[name] += 1
            try:
                body = await _read_json(request, opts.max_request_bytes)
                info = self.info[name]
                inputs = parse_inputs(body, info["modality"], len(info["input_columns"]), opts.max_inputs)
                # Requests that reached the replica with this one get counted before it chooses: a request that
                # fills a batch by itself, or has no company, is predicted at once (a lone client would otherwise
                # wait batch_wait_s on every request); others wait to be batched.
                await asyncio.sleep(0)
                alone = len(inputs) >= opts.max_batch_size or self.in_flight[name] == 1
                rows = _answer_alone(self.models[name], inputs) if alone else await self.batched[name](inputs)
            except RequestError as exc:
                return JSONResponse({"error": str(exc)}, status_code=exc.status)
            finally:
                self.in_flight[name] -= 1
            return _prediction_response(rows, info["regression"])

    return ModelServer.bind({name: spec["dir"] for name, spec in models.items()},
                            {name: spec["info"] for name, spec in models.items()})


def _batcher(model, opts: ServeOptions):
    """`model`'s batched predict: concurrent requests' inputs predicted together, up to opts.max_batch_size inputs
    a batch (counted in inputs, not requests: 16 requests of 256 images would otherwise be one batch)."""
    from ray import serve

    @serve.batch(max_batch_size=opts.max_batch_size, batch_wait_timeout_s=opts.batch_wait_s,
                 batch_size_fn=lambda requests: sum(len(r) for r in requests))
    async def predict(requests: list[list]) -> list:
        return _answer_batch(model, requests, opts.max_inputs)

    return predict


def _load_model(export_dir: str, opts: ServeOptions):
    """A replica's model: loaded with the replica's threads, on its GPU if it was given one."""
    from automl.export.predictor import load
    from automl.runtime import quiet_libraries, set_threads

    quiet_libraries(search=False)  # a replica starts without Optuna, Ray Tune or Ray Train
    set_threads(max(1, int(opts.cpus_per_replica)))
    model = load(export_dir)
    if opts.gpus_per_replica:  # the replica was given a GPU: predict on it
        from automl.runtime import device

        model.to(device())
    return model


def _answer_batch(model, requests: list[list], max_inputs: int) -> list:
    """The answers to a batch of requests, one entry per request (its rows, or an error for that request alone)."""
    # Each element is one request's inputs: predict them all at once, hand each request its own rows.
    # If that fails, each request alone: one bad input must not fail the requests batched with it.
    # Serve batches requests, each up to max_inputs inputs: predicted max_inputs at a time, so memory stays
    # that of one full request however many are batched.
    flat = [x for r in requests for x in r]
    try:
        results = [y for i in range(0, len(flat), max_inputs)
                   for y in answer(model, flat[i:i + max_inputs])]
    except Exception:
        return [_answer_alone(model, r) for r in requests]
    out, start = [], 0
    for r in requests:
        out.append(results[start:start + len(r)])
        start += len(r)
    return out


def _answer_alone(model, inputs: list):
    """One request's answers, or the error its inputs raise (as a dict)."""
    try:
        return answer(model, inputs)
    except Exception as exc:  # reported to this request's client as a 422
        return {"error": f"the model could not read these inputs ({type(exc).__name__}: {str(exc)[:300]})"}


def _refusal(request: Request, token: str | None) -> JSONResponse | None:
    """A 401 answer when the server has a token and the request does not send it; None when it may pass."""
    if token is not None:
        given = request.headers.get("authorization", "")
        if not given.startswith("Bearer ") or not hmac.compare_digest(given[7:].strip().encode(), token.encode()):
            return JSONResponse({"error": "missing or wrong bearer token; send the header "
                                          "'Authorization: Bearer <token>' with the server's token"},
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})
    return None


async def _read_json(request: Request, max_bytes: int) -> object:
    """The request's JSON body, refused (RequestError) when it is over `max_bytes` or not JSON."""
    length = int(request.headers.get("content-length") or 0)
    if length > max_bytes:
        raise RequestError(413, f"request body of {length} bytes; at most {max_bytes}")
    raw = b""
    async for chunk in request.stream():  # a body sent without Content-Length is capped as it arrives
        raw += chunk
        if len(raw) > max_bytes:
            raise RequestError(413, f"request body of over {max_bytes} bytes; at most {max_bytes}")
    try:
        import json

        return json.loads(raw)
    except ValueError as exc:
        raise RequestError(400, f"the body is not JSON ({exc}); expected {{\"inputs\": [...]}}") from None


def _prediction_response(rows, regression: bool):
    """The HTTP answer to a predict request from its rows (or a 422 with the error its inputs raised)."""
    if isinstance(rows, dict):
        return JSONResponse({"error": rows["error"]}, status_code=422)
    result = {"predictions": [r["prediction"] for r in rows]}
    if not regression:
        result["probabilities"] = [r["probabilities"] for r in rows]
    return result


@dataclass
class Server:
    """A running server: its URL, and how to stop it."""

    url: str
    names: list[str]
    app: str = "automl"
    local: bool = True                 # Serve was started in an embedded local Ray, not on a cluster
    proxy_url: str = ""                # Ray Serve's proxy: the same routes, one hop more (the url, unless direct)
    own_ray: bool = False              # a direct server's own Ray, started for it: stopped with it

    def shutdown(self) -> None:
        """Stop this server's app; other apps keep serving. On the embedded local Ray, once no app is left, also
        Serve's proxy (so a later server may take another port); on a cluster Serve itself stays up. A direct
        server's own Ray is stopped too (its processes hold the direct settings)."""
        from ray import serve

        serve.delete(self.app)
        if self.local and not serve.status().applications:
            serve.shutdown()
        if self.own_ray:
            _stop_own_ray()


# Ray Serve's direct ingress (Ray 2.60, experimental there): the ingress replica runs an HTTP server of its own, so
# a request skips the proxy actor's hop. Serve reads these at import, in every process of the Ray instance: they are
# set before a local Ray starts. On a 2-core machine a request to an ingress that answers without a model took
# 1.2-1.7 ms p50 on the replica's own port against 8.8-13.5 ms through the proxy (benchmarks/RESULTS.md, "Serving").
def _direct_settings(port: int) -> dict[str, str]:
    """Serve's direct ingress on `port` alone."""
    return {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1),  # exclusive: the one port
            # No load balancer in front to drain for or to forget the port: a replica that stops or restarts
            # lets go of it at once and takes it again (Serve's defaults hold it 30 s and quarantine it longer).
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0", "RAY_SERVE_PORT_QUARANTINE_S": "0"}


DIRECT_ENV = tuple(_direct_settings(0))  # the settings' names


def _stop_own_ray() -> None:
    """Stop a direct server's own Ray and take its direct-ingress settings out of this process."""
    import ray

    ray.shutdown()
    for k in DIRECT_ENV:
        os.environ.pop(k, None)


def _direct_ingress(opts: ServeOptions, local: bool) -> None:
    """Set up Serve's direct ingress on opts.port for a server about to start its own local Ray, or refuse with why
    it cannot be had."""
    import ray

    if not local:
        raise AutoMLError("Direct serving (--direct) starts a Ray of its own on this machine; a cluster address was "
                          "given (--address or RAY_ADDRESS). Fix: serve through the cluster's proxy (without "
                          "--direct), or serve directly from a machine of its own without --address.")
    with socket.socket() as probe:  # the replica would fail to bind it only after Ray and Serve had started
        try:
            probe.bind((opts.host, opts.port))
        except OSError:
            raise _port_held(opts.host, opts.port, opts.port + 2) from None
    if opts.replicas != 1:
        raise AutoMLError(f"Direct serving (--direct) answers on one replica's own port; {opts.replicas} replicas "
                          "were asked for. Fix: --replicas 1, or serve several replicas through the proxy (without "
                          "--direct).")
    want = _direct_settings(opts.port)
    if ray.is_initialized():
        if any(os.environ.get(k) != v for k, v in want.items()):
            raise AutoMLError(f"Direct serving (--direct) on port {opts.port} needs a Ray started for it, and this "
                              "process already runs one. Fix: serve from a fresh process (`automl serve --direct "
                              "...`), or without direct serving.")
        return
    os.environ.update(want)


def _port_held(host: str, port: int, instead: int) -> AutoMLError:
    """The error for a port another process holds, with the --port to try instead."""
    return AutoMLError(f"Could not listen on {host}:{port}: another process holds that port. Fix: serve on another "
                       f"port (--port {instead}), or stop what listens there.")


def _check_proxy(opts: ServeOptions) -> None:
    """Refuse a host or port other than those of the Serve proxy already running on this Ray (serve.start keeps the
    first ones and only logs that it ignored the new), rather than hand back a URL nothing listens on."""
    from ray.serve.context import _get_global_client  # the running controller's HTTP options, as Serve reads them

    running = _get_global_client().http_config
    if (running.host, running.port) != (opts.host, opts.proxy_port):
        raise AutoMLError(f"Ray Serve already runs on this Ray with its HTTP proxy on {running.host}:{running.port}; "
                          f"asked for {opts.host}:{opts.proxy_port}, which it cannot open beside it. Fix: serve on "
                          f"that address (--host {running.host} --port {running.port}; an app of another name serves "
                          "beside the running ones), or stop Serve first (`serve shutdown`).")


def serve(export_dirs: list[str | Path], *, names: list[str] | None = None, address: str | None = None,
          options: ServeOptions | None = None, token_file: str | Path | None = None,
          timeout_s: float = 180.0, app_name: str = "automl") -> Server:
    """Serve exported models over HTTP on Ray Serve (an embedded local Ray, or the cluster at `address`).

    names: one per export (default: each export folder's name). token_file: a file holding the bearer token
    every request must send. Binds 127.0.0.1 unless options.host says otherwise. app_name: the Serve application
    (serving again under the same name replaces it; another name serves beside it, on the same HTTP port).
    """
    from automl.cluster import ensure_ray
    from automl.export.manifest import ExportManifest
    from automl.runtime import quiet_libraries

    opts = options or ServeOptions()
    if token_file is not None:
        opts.token = Path(token_file).read_text().strip()
        if not opts.token:
            raise AutoMLError(f"Token file {str(token_file)!r} is empty. Fix: put the token in it.")
    dirs = [Path(d).resolve() for d in export_dirs]
    names = list(names or [d.name if d.name != "model" else d.parent.name for d in dirs])
    if len(names) != len(dirs) or len(set(names)) != len(names):
        raise AutoMLError(f"Give one distinct name per export; got names {names} for {len(dirs)} export(s). "
                          "Fix: pass --name for each, e.g. --name icons --name tickets.")
    models = {}
    for name, d in zip(names, dirs):
        m = ExportManifest.read(d)  # refuses a folder that is not a complete export, before anything starts
        card = d / "MODEL_CARD.html"
        models[name] = {"dir": str(d), "info": {
            "name": name, "modality": m.modality, "task": m.task, "classes": [str(c) for c in m.classes],
            "input_columns": m.input_columns, "metric": m.metric, "test_score": m.test_metrics.get(m.metric),
            "regression": m.is_regression, "card": card.as_uri() if card.exists() else None}}
    local = address is None and not os.environ.get("RAY_ADDRESS")
    if opts.direct:
        _direct_ingress(opts, local)
    import ray.serve  # noqa: F401  (its import sets its logger's level: quieted after it)

    quiet_libraries(search=False)  # Serve's own start-up lines: the server prints its URLs itself
    own_ray = ensure_ray(address) and opts.direct
    try:
        return _start(models, names, opts, app_name, local, own_ray, timeout_s)
    except BaseException:
        if own_ray:  # a direct server's own Ray, with its settings, is not left behind by a server that failed
            _stop_own_ray()
        raise


def _start(models: dict, names: list[str], opts: ServeOptions, app_name: str, local: bool, own_ray: bool,
           timeout_s: float) -> Server:
    """Serve's proxy, then the app, on the running Ray; the running server once its replicas are healthy."""
    from ray import serve as rs

    try:
        rs.start(http_options={"host": opts.host, "port": opts.proxy_port})
    except Exception as exc:
        if "Failed to bind" not in str(exc):
            raise
        if local:  # a Serve whose proxy could not start would hold this port's options for the next try
            rs.shutdown()
        raise _port_held(opts.host, opts.proxy_port, opts.proxy_port + 1) from None
    _check_proxy(opts)
    t0 = time.monotonic()
    prefix = "/" if app_name == "automl" else f"/{app_name}"
    try:
        rs.run(_app(models, opts), name=app_name, route_prefix=prefix, blocking=False)
    except RuntimeError as exc:  # Serve's own words name no export and no fix
        raise AutoMLError(f"The server's replica could not start ({str(exc)[:300]}; its traceback is in Ray's "
                          "serve logs, e.g. /tmp/ray/session_latest/logs/serve/). Fix: check that each export "
                          "loads, e.g. python -c 'import automl; automl.load(\"DIR\")'.") from None
    while True:  # serve.run returns once deployed; wait for the replicas to be healthy, within a limit
        status = rs.status().applications[app_name].status
        if str(status).endswith("RUNNING"):
            break
        if time.monotonic() - t0 > timeout_s:
            raise AutoMLError(f"The models did not start within {timeout_s:.0f} s (status {status}). Fix: ask for "
                              "fewer CPUs/GPUs per replica than the cluster has free.")
        time.sleep(0.5)
    path = prefix.rstrip("/")
    proxy = f"http://{opts.host}:{opts.proxy_port}{path}"
    return Server(f"http://{opts.host}:{opts.port}{path}" if opts.direct else proxy, names, app_name, local=local,
                  proxy_url=proxy, own_ray=own_ray)
