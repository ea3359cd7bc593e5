"""Command line: automl finetune | predict | evaluate | spaces."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _finetune(args) -> int:
    from .api import auto_finetune

    overrides = json.loads(args.set) if args.set else None
    space = args.search_space
    if overrides and space is None:
        space = overrides
        overrides = None
    model = auto_finetune(
        args.data, label=args.label, inputs=args.inputs.split(",") if args.inputs else None,
        time_budget_s=args.time_budget, max_trials=args.max_trials, search_space=space,
        metric=args.metric, output_dir=args.output, seed=args.seed, ray_address=args.address,
        resources_per_trial={"cpu": args.cpus_per_trial, **({"gpu": args.gpus_per_trial} if args.gpus_per_trial else {})},
        retrain_workers=args.retrain_workers, resume=args.resume, progress=not args.quiet, verbose=args.verbose,
    )
    metric = model.meta["metric"]
    print(f"export: {model.export_dir}")
    print(f"test {metric}: {model.metrics[metric]:.4f}  (accuracy {model.metrics['accuracy']:.4f}, "
          f"macro-F1 {model.metrics['f1_macro']:.4f})")
    print(f"trials: {len(model.trials)} ({model.meta['search']['stopped_early']} stopped early by ASHA)")
    return 0


def _predict(args) -> int:
    import pandas as pd

    from .data import to_dataframe
    from .predictor import load

    model = load(args.model_dir)
    df, base = to_dataframe(args.data)
    out = Path(args.output) if args.output else None
    header = True
    # Batches keep memory flat on large inputs.
    for start in range(0, len(df), args.batch_size):
        chunk = df.iloc[start:start + args.batch_size]
        if base and model.meta["modality"] == "image":
            col = model.meta["input_columns"][0]
            if col in chunk:
                chunk = chunk.assign(**{col: [str(Path(base) / p) if isinstance(p, str) and not Path(p).is_absolute()
                                              else p for p in chunk[col]]})
        proba = model.predict_proba(chunk)
        res = pd.DataFrame({"prediction": [model.classes[i] for i in proba.to_numpy().argmax(1)]}, index=chunk.index)
        res = pd.concat([res, proba.add_prefix("proba_").set_index(chunk.index)], axis=1)
        if out is None:
            sys.stdout.write(res.to_csv(index=True, header=header))
        else:
            res.to_csv(out, mode="w" if header else "a", header=header, index=True)
        header = False
    if out is not None:
        print(f"wrote {len(df)} predictions to {out}")
    return 0


def _evaluate(args) -> int:
    from .predictor import load

    model = load(args.model_dir)
    metrics = model.evaluate(args.data, label=args.label)
    print(json.dumps(metrics, indent=2))
    return 0


def _spaces(args) -> int:
    from .space import spaces_dir

    for p in sorted(spaces_dir().glob("*.yaml")):
        print(f"{p.stem:24s} {p}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="automl", description="Fine-tune the best image/text classifier for your data.")
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("finetune", help="search, retrain and export a model")
    f.add_argument("data", help="CSV/TSV/Parquet/JSONL file or image folder (root/<class>/<file>)")
    f.add_argument("--label", help="label column (default: label/target/class/y)")
    f.add_argument("--inputs", help="comma-separated input columns (default: inferred)")
    f.add_argument("--time-budget", type=float, default=600, help="seconds for search + retrain (default 600)")
    f.add_argument("--max-trials", type=int, help="stop after this many trials")
    f.add_argument("--search-space", help="space name (e.g. cpu_small) or YAML path")
    f.add_argument("--set", help='JSON overrides, e.g. \'{"lr": {"low": 1e-5, "high": 1e-3}}\'')
    f.add_argument("--metric", default="auto", choices=["auto", "accuracy", "f1_macro", "balanced_accuracy"])
    f.add_argument("--output", help="output dir (default ./automl_runs/<fingerprint>)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    f.add_argument("--cpus-per-trial", type=float, default=1.0)
    f.add_argument("--gpus-per-trial", type=float, default=None)
    f.add_argument("--retrain-workers", type=int, default=1)
    f.add_argument("--resume", action="store_true", help="continue an interrupted search in --output")
    f.add_argument("--quiet", action="store_true", help="no progress lines")
    f.add_argument("--verbose", action="store_true", help="show Ray's logs")
    f.set_defaults(func=_finetune)
    pr = sub.add_parser("predict", help="predict with an exported model")
    pr.add_argument("model_dir")
    pr.add_argument("data")
    pr.add_argument("--output", help="CSV to write (default: stdout)")
    pr.add_argument("--batch-size", type=int, default=1024)
    pr.set_defaults(func=_predict)
    ev = sub.add_parser("evaluate", help="metrics of an exported model on labelled data")
    ev.add_argument("model_dir")
    ev.add_argument("data")
    ev.add_argument("--label")
    ev.set_defaults(func=_evaluate)
    sp = sub.add_parser("spaces", help="list the bundled search spaces")
    sp.set_defaults(func=_spaces)
    return p


def main(argv: list[str] | None = None) -> int:
    from .errors import AutoMLError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except AutoMLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
