"""Command line: automl finetune | predict | evaluate | spaces."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from automl.options import add_arguments


def _finetune(args) -> int:
    from automl.api import auto_finetune
    from automl.options import from_args

    model = auto_finetune(args.data, options=from_args(args))
    m = model.manifest
    print(f"export: {model.export_dir}")
    if model.is_regression:
        print(f"test r2: {model.metrics['r2']:.4f}  (rmse {model.metrics['rmse']:.4g}, mae {model.metrics['mae']:.4g})")
    else:
        print(f"test {m.metric}: {model.metrics[m.metric]:.4f}  (accuracy {model.metrics['accuracy']:.4f}, "
              f"macro-F1 {model.metrics['f1_macro']:.4f})")
    if m.update:
        print(f"update: {m.update['decision']} ({m.update['reason']})")
    print(f"trials: {len(model.trials)} ({m.search['stopped_early']} stopped early by ASHA)")
    return 0


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse says which flag and what it got)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1; got {text}")
    return value


def _predictions(model, chunk):
    """One chunk's rows of `automl predict`: the prediction, and each class's probability for a classifier."""
    import pandas as pd

    if model.is_regression:
        return pd.DataFrame({"prediction": model.predict(chunk)}, index=chunk.index)
    proba = model.predict_proba(chunk)
    res = pd.DataFrame({"prediction": [model.classes[i] for i in proba.to_numpy().argmax(1)]}, index=chunk.index)
    return pd.concat([res, proba.add_prefix("proba_").set_index(chunk.index)], axis=1)


def _predict(args) -> int:
    import pandas as pd

    from automl import modalities
    from automl.data.intake import existing_path, to_dataframe
    from automl.export.predictor import load

    model = load(args.model_dir)
    out = Path(args.output) if args.output else None
    header = True
    path = existing_path(args.data)  # read_csv's own error is a traceback
    if path.suffix.lower() in (".csv", ".tsv"):
        # Stream the table: memory stays flat however large the input file is.
        base = str(path.parent)
        chunks = pd.read_csv(path, sep="\t" if path.suffix.lower() == ".tsv" else ",", chunksize=args.batch_size)
    else:
        df, base = to_dataframe(args.data)
        chunks = (df.iloc[s:s + args.batch_size] for s in range(0, len(df), args.batch_size))
    n = 0
    # Written beside the output and renamed over it at the end: a failure or a Ctrl-C in a later chunk left a
    # partial file that looked whole, in place of the one there before.
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp") if out is not None else None
    try:
        for chunk in chunks:
            n += len(chunk)
            if base:
                chunk = modalities.get(model.manifest.modality).resolve_paths(chunk, model.manifest.input_columns[0],
                                                                              base)
            res = _predictions(model, chunk)
            if tmp is None:
                sys.stdout.write(res.to_csv(index=True, header=header))
            else:
                res.to_csv(tmp, mode="w" if header else "a", header=header, index=True)
            header = False
        if tmp is not None and tmp.exists():
            os.replace(tmp, out)
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    if out is not None:
        # A header-only file still gets its header (the columns a pipeline expects); the reason is said.
        print(f"wrote {n} predictions to {out}" + (f" ({args.data} has no rows)" if n == 0 else ""))
    return 0


def _evaluate(args) -> int:
    from automl.export.predictor import load

    model = load(args.model_dir)
    metrics = model.evaluate(args.data, label=args.label)
    print(json.dumps(metrics, indent=2))
    return 0


def _submit(args) -> int:
    from rich.console import Console

    from automl.ops import jobs

    batch, submitted = jobs.submit_batch(args.manifest, args.address, ship_package=not args.no_ship)
    console = Console()
    console.print(f"batch {batch}: submitted {len(submitted)} job(s)")
    for s in submitted:
        console.print(f"  {s['name']:20s} {s['submission_id']}  -> {s['output']}")
    follow = f"automl jobs list --batch {batch}" + (f" --address {args.address}" if args.address else "")
    if args.wait:
        try:
            status = jobs.wait([s["submission_id"] for s in submitted], args.address, timeout_s=args.timeout)
        except KeyboardInterrupt:  # the jobs are the cluster's now: say so, and how to follow or stop them
            console.print(f"stopped waiting; the jobs keep running. Follow with: {follow}; stop one with: automl "
                          "jobs stop SUBMISSION_ID")
            return 130
        console.print(jobs.summary_table(jobs.list_jobs(args.address, batch=batch)))
        return 0 if all(v == "SUCCEEDED" for v in status.values()) else 1
    console.print(f"follow with: {follow}")
    return 0


def _jobs(args) -> int:
    from rich.console import Console

    from automl.ops import jobs

    console = Console()
    if args.action == "list":
        console.print(jobs.summary_table(jobs.list_jobs(args.address, batch=args.batch)))
        return 0
    if not args.id:
        raise SystemExit(f"automl jobs {args.action} needs a submission id (see `automl jobs list`)")
    c = jobs.client(args.address)
    if args.action == "status":
        info = c.get_job_info(args.id)
        print(f"{args.id}: {str(info.status).split('.')[-1]}" + (f" ({info.message})" if info.message else ""))
    elif args.action == "logs":
        sys.stdout.write(c.get_job_logs(args.id))
    elif args.action == "stop":
        print(f"{args.id}: {'stopping' if c.stop_job(args.id) else 'already finished'}")
    return 0


def _leaderboard(args) -> int:
    import os

    from rich.console import Console

    from automl.ops import leaderboard
    from automl.ops.store import Store

    store = Store(args.db or os.environ.get("AUTOML_LEADERBOARD_DB") or "sqlite:///automl_leaderboard.db")
    console = Console()
    if args.action == "refresh":
        if not args.target:
            raise SystemExit("automl leaderboard refresh needs a suite file")
        if args.address and args.address.startswith(("http://", "https://")):
            # A job server address: one Ray Job per dataset, all writing to the shared --db.
            db = args.db or os.environ.get("AUTOML_LEADERBOARD_DB") or f"sqlite:///{os.path.abspath('automl_leaderboard.db')}"
            submitted = leaderboard.submit_refresh(args.target, db, args.address, force=args.force,
                                                   only=args.only.split(",") if args.only else None)
            for r in submitted:
                console.print(f"{r['dataset']:20s} {r.get('status', 'SUBMITTED'):10s} {r['submission_id']}")
            console.print(leaderboard.show(Store(db)))
            return 1 if any(r.get("status") not in ("SUCCEEDED", None) for r in submitted) else 0
        results = leaderboard.refresh(args.target, store, address=args.address, force=args.force,
                                      only=args.only.split(",") if args.only else None, progress=not args.quiet)
        for r in results:
            console.print(f"{r['dataset']:20s} {r['status']:10s} {r.get('reason', '')}")
        console.print(leaderboard.show(store))
        return 1 if any(r["status"] == "failed" for r in results) else 0
    if args.action == "show":
        console.print(leaderboard.show(store, args.dataset))
        return 0
    page = leaderboard.write_html(store, args.target or "leaderboard_html")
    print(f"wrote {page}")
    return 0


def _serve(args) -> int:
    import signal
    import threading

    from automl.ops.serve import ServeOptions, serve

    opts = ServeOptions(host=args.host, port=args.port, max_batch_size=args.max_batch_size, replicas=args.replicas,
                        cpus_per_replica=args.cpus_per_replica, gpus_per_replica=args.gpus_per_replica,
                        max_request_bytes=args.max_request_mb * 2**20, max_inputs=args.max_inputs,
                        direct=args.direct)
    server = serve(args.model_dirs, names=args.name, address=args.address, options=opts, token_file=args.token_file,
                   app_name=args.app)
    for name in server.names:
        print(f"serving {name}: POST {server.url}/models/{name}/predict  {{\"inputs\": [...]}}", flush=True)
    if server.proxy_url != server.url:
        print(f"(the same routes through Ray Serve's proxy, one hop more: {server.proxy_url})", flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.token_file:
        print(f"warning: listening on {args.host} without --token-file: anyone who can reach it can use it",
              file=sys.stderr)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    server.shutdown()
    return 0


def _export(args) -> int:
    from automl.export.writer import strip_test_split

    for d in args.model_dirs:
        removed = strip_test_split(d)
        print(f"{d}: removed {', '.join(removed) if removed else 'nothing (no stored test split)'}")
    return 0


def _spaces(args) -> int:
    from automl.search.space import spaces_dir

    for p in sorted(spaces_dir().glob("*.yaml")):
        print(f"{p.stem:24s} {p}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="automl", description="Fine-tune the best image/text classifier for your data.")
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("finetune", help="search, retrain and export a model")
    f.add_argument("data", help="CSV/TSV/Parquet/JSONL file or image folder (root/<class>/<file>)")
    add_arguments(f)  # one flag per option of automl.options.FinetuneOptions
    f.set_defaults(func=_finetune)
    pr = sub.add_parser("predict", help="predict with an exported model")
    pr.add_argument("model_dir")
    pr.add_argument("data")
    pr.add_argument("--output", help="CSV to write (default: stdout)")
    pr.add_argument("--batch-size", type=_positive_int, default=1024, help="rows read and predicted at a time")
    pr.set_defaults(func=_predict)
    ev = sub.add_parser("evaluate", help="metrics of an exported model on labelled data")
    ev.add_argument("model_dir")
    ev.add_argument("data")
    ev.add_argument("--label")
    ev.set_defaults(func=_evaluate)
    sb = sub.add_parser("submit", help="submit a batch manifest as Ray Jobs (one per dataset)")
    sb.add_argument("manifest", help="batch YAML (see automl/jobs.py or README)")
    sb.add_argument("--address", help="Ray job server, e.g. http://127.0.0.1:8265 (default: RAY_JOBS_ADDRESS or that)")
    sb.add_argument("--wait", action="store_true", help="wait for all jobs and print the summary table")
    sb.add_argument("--timeout", type=float, default=24 * 3600)
    sb.add_argument("--no-ship", action="store_true", help="do not ship this automl package (cluster has it installed)")
    sb.set_defaults(func=_submit)
    jb = sub.add_parser("jobs", help="follow submitted jobs")
    jb.add_argument("action", choices=["list", "status", "logs", "stop"])
    jb.add_argument("id", nargs="?", help="submission id (status/logs/stop)")
    jb.add_argument("--address")
    jb.add_argument("--batch", help="only this batch (list)")
    jb.set_defaults(func=_jobs)
    lb = sub.add_parser("leaderboard", help="nightly refresh of a suite of datasets, and its leaderboard")
    lb.add_argument("action", choices=["refresh", "show", "html"])
    lb.add_argument("target", nargs="?", help="refresh: suite.yaml; html: output dir")
    lb.add_argument("--db", help="SQLAlchemy URL (default: AUTOML_LEADERBOARD_DB or sqlite:///automl_leaderboard.db)")
    lb.add_argument("--address", help="Ray cluster address for the searches (ray://... or auto), or a job server "
                                      "(http://HEAD:8265) to run one Ray Job per dataset")
    lb.add_argument("--dataset", help="show: only this dataset")
    lb.add_argument("--only", help="refresh: comma-separated dataset names")
    lb.add_argument("--force", action="store_true", help="refresh: re-run datasets that finished recently too")
    lb.add_argument("--quiet", action="store_true")
    lb.set_defaults(func=_leaderboard)
    sv = sub.add_parser("serve", help="serve exported models over HTTP (Ray Serve)")
    sv.add_argument("model_dirs", nargs="+", help="export folders (…/model)")
    sv.add_argument("--name", action="append", help="a model's name in the URL (once per folder; default: its folder)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--token-file", help="file holding a bearer token every request must send")
    sv.add_argument("--max-batch-size", type=_positive_int, default=16,
                    help="inputs of concurrent requests predicted together")
    sv.add_argument("--replicas", type=_positive_int, default=1, help="server replicas (each holds every model)")
    sv.add_argument("--cpus-per-replica", type=float, default=1.0)
    sv.add_argument("--gpus-per-replica", type=float, default=0.0)
    sv.add_argument("--max-request-mb", type=float, default=10.0, help="largest request body accepted")
    sv.add_argument("--max-inputs", type=_positive_int, default=256, help="most inputs in one request")
    sv.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    sv.add_argument("--direct", action="store_true",
                    help="clients reach the replica itself on --port (Ray Serve's direct ingress: one hop fewer, "
                         "~1-2 ms a request of Serve's own instead of ~9-13 on 2 cores); one replica, a local Ray "
                         "of its own; Serve's proxy answers too, on --port + 1")
    sv.add_argument("--app", default="automl", help="Serve application name: another name serves beside it under "
                                                    "/<app>/models/... (the same name replaces it)")
    sv.set_defaults(func=_serve)
    ex = sub.add_parser("export", help="change an export: `strip` removes its stored test split (your data)")
    ex.add_argument("action", choices=["strip"])
    ex.add_argument("model_dirs", nargs="+")
    ex.set_defaults(func=_export)
    sp = sub.add_parser("spaces", help="list the bundled search spaces")
    sp.set_defaults(func=_spaces)
    return p


def main(argv: list[str] | None = None) -> int:
    from automl.errors import AutoMLError, RunInterrupted

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except AutoMLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RunInterrupted as exc:
        print(f"automl: {exc}", file=sys.stderr)
        return 130  # as a shell reports a command stopped by Ctrl-C


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
