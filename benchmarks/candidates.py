"""Better candidates (issue #15): pretrained vs scratch, mean vs CLS pooling, soups/ensembles, label errors.

    python benchmarks/candidates.py [--budget 300] [--parts pretrained,pooling,combine,labels]

- pretrained: auto_finetune on Tux Paint stamps with the backbone pinned to EfficientNet-Lite0, ImageNet weights vs
  the same network from scratch, at equal wall time (the rest of the space searched as usual).
- pooling: MiniLM's start-point config trained once on fortunes with mean pooling (how it was pretrained) vs the
  first token (CLS), same steps.
- combine: for an auto_finetune run per set (no retrain), the test score of the exported model (winner, soup or
  ensemble, chosen on validation) against the best single trial's own weights.
- labels: 5% of training labels flipped to another class; a 2-fold cross-fit of the start point and confident
  learning; precision and recall of the flagged rows, and how many rows are flagged when nothing was flipped.
- labels_rung0: the same flips, flagged as the product does now: rung 0 (search/ladder.py) probes every pretrained
  backbone of the space, each probe's head is refitted on 5 folds of its frozen features, and their out-of-fold
  probabilities are averaged.
- labels_product: the same flips, flagged by auto_finetune as a user runs it (--budget): confident learning on rung
  0's out-of-fold heads says how many, the best fine-tune's margins over its training also say which.
Writes the "candidates" section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import realsets  # noqa: E402
from _results import write_section  # noqa: E402
from quality import macro_f1, split  # noqa: E402


def pretrained_vs_scratch(budget: float, seed: int) -> list[str]:
    from automl import auto_finetune

    df = split(realsets.stamps(), seed)
    out = []
    for name, backbone in (("pretrained (ImageNet)", "efficientnet-lite0"),
                           ("from scratch", {"library": "timm", "model": "tf_efficientnet_lite0", "pretrained": False,
                                             "data_config": {"mean": [0.5] * 3, "std": [0.5] * 3}})):
        t0 = time.monotonic()
        m = auto_finetune(df, label="label", time_budget_s=budget, seed=seed, progress=False,
                          output_dir=tempfile.mkdtemp(), search_space={"backbone": backbone})
        out.append(f"| stamps | {seed} | EfficientNet-Lite0 {name} | {macro_f1(m, df):.4f} | {len(m.trials)} | "
                   f"{time.monotonic() - t0:.0f} |")
        print(out[-1], flush=True)
    return out


def pooling(seed: int) -> list[str]:
    import torch

    from automl.data.inputs import Inputs
    from automl.data.intake import prepare
    from automl.models import minilm_dir
    from automl.search.plan import sensible_steps
    from automl.search.space import load_space
    from automl.training.loop import evaluate, fit, full_config

    torch.set_num_threads(2)
    df = split(realsets.fortunes(), seed)
    task = prepare(df, "label", seed=seed)
    inputs = Inputs.materialise(task, None, Path(tempfile.mkdtemp()))
    cls_dir = Path(tempfile.mkdtemp()) / "minilm-cls"
    shutil.copytree(minilm_dir(), cls_dir, ignore=shutil.ignore_patterns("1_Pooling", "modules.json"))
    base = full_config({**load_space("cpu_small", "text").default_config(), "max_length": 128, "seed": seed})
    steps = sensible_steps(True, -(-len(task.splits["train"]) // 32)) // 2
    out = []
    for name, backbone in (("mean (as pretrained)", "minilm-l6"), ("CLS (first token)", f"hf/{cls_dir}")):
        cfg = {**base, "backbone": backbone, "report_rows": steps * 32 // 4}
        t0 = time.monotonic()
        res = fit(cfg, inputs.trial_data(), epochs=4, device=torch.device("cpu"))
        te = inputs.split("test")
        from automl.training.loop import encode_inputs

        m = evaluate(res.model, res.encoder, encode_inputs(res.encoder, inputs.rows(te)), task.y[te],
                     task.num_classes, torch.device("cpu"))
        out.append(f"| fortunes | {seed} | {name} | {res.model.pooling} | {m['f1_macro']:.4f} | "
                   f"{time.monotonic() - t0:.0f} |")
        print(out[-1], flush=True)
    return out


def combine(budget: float, seed: int) -> list[str]:
    from automl import auto_finetune
    from automl.export.manifest import ExportManifest, Preprocessing
    from automl.export.predictor import FinetunedModel
    from automl.search import kept
    from automl.training.loop import build_encoder, full_config, load_best

    out = []
    for name in ("stamps", "fortunes"):
        df = split(getattr(realsets, name)(), seed)
        m = auto_finetune(df, label="label", time_budget_s=budget, seed=seed, progress=False, retrain=False,
                          output_dir=tempfile.mkdtemp())
        best = m.trials.iloc[0]
        cfg = full_config({k[7:]: v for k, v in best.items() if k.startswith("config/") and not pd.isna(v)})
        model, spec = load_best(cfg, len(m.classes), kept.model_file(m.search.best_dir, best["trial_id"]))
        enc = build_encoder(cfg, model, spec)
        single = FinetunedModel(model, enc, ExportManifest(
            task=m.manifest.task, modality=m.manifest.modality, classes=m.classes, label_column="label",
            input_columns=m.manifest.input_columns, metric="f1_macro", backbone=spec,
            preprocessing=Preprocessing(**enc.to_dict(), storage_size=m.manifest.preprocessing.storage_size)))
        scores = m.manifest.training.get("val_scores", {})
        out.append(f"| {name} | {seed} | {m.manifest.training['how']} of {len(m.manifest.training['trials'])} | "
                   f"{macro_f1(single, df):.4f} | {macro_f1(m, df):.4f} | "
                   + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()) + " |")
        print(out[-1], flush=True)
    return out


def labels(seed: int) -> list[str]:
    import torch

    from automl.data.inputs import Inputs
    from automl.data.intake import prepare
    from automl.diagnostics.labelnoise import out_of_fold_proba, summary, suspects
    from automl.search.plan import image_side, sensible_steps
    from automl.search.space import load_space
    from automl.training.loop import full_config

    torch.set_num_threads(1)
    out = []
    for name in ("digits", "stamps", "fortunes"):
        clean = getattr(realsets, name)()
        noisy, flipped = realsets.with_flipped_labels(clean, seed)
        row = []
        for which, df in (("flipped", noisy), ("clean", clean)):
            task = prepare(df, "label", seed=seed, drop_rare_classes=True)
            size = min(96, max(32, image_side(task.images))) if task.modality == "image" else None
            inputs = Inputs.materialise(task, size, Path(tempfile.mkdtemp()))
            full = inputs.split("full")
            start = load_space("cpu_small", task.modality).default_config()
            steps = sensible_steps(True, -(-len(full) // 64))  # each fold trains on half the rows
            cfg = full_config({**start, "image_size": size, "max_length": 96, "seed": seed,
                               "report_rows": max(1, steps * 32 // 4)})
            t0 = time.monotonic()
            proba = out_of_fold_proba(cfg, inputs.rows(full), task.y[full], task.num_classes, epochs=4,
                                      schedule_epochs=4, folds=2, seed=seed, modality=task.modality)
            found = suspects(proba, task.y[full], task.classes, task.row_index[full])
            if os.environ.get("AUTOML_DUMP_PROBA"):  # for looking at flagging rules without refitting
                np.savez(f"{os.environ['AUTOML_DUMP_PROBA']}/{name}-{which}.npz", proba=proba, y=task.y[full],
                         rows=task.row_index[full], flipped=flipped)
            took = time.monotonic() - t0
            if which == "flipped":
                planted = set(flipped) & set(task.row_index[full])
                hits = len(set(found["row"]) & planted)
                expected = summary(found, len(full))["expected_precision"]  # what the model card would say
                row += [f"{hits / max(1, len(found)):.2f}", f"{expected:.2f}" if expected is not None else "–",
                        f"{hits / max(1, len(planted)):.2f}", f"{len(found)} of {len(full)} ({len(planted)} planted)"]
            else:
                row += [f"{len(found)} ({len(found) / len(full):.1%})", f"{took:.0f}"]
        out.append(f"| {name} | " + " | ".join(row) + " |")
        print(out[-1], flush=True)
    return out


def _ranked(proba: np.ndarray, y: np.ndarray, planted: np.ndarray) -> list[str]:
    """What any cut-off of a ranking could reach: precision at recall 0.5 with the rows ranked by the probability of
    their given label (lowest first) and by confident learning's margin (largest first); and out-of-fold accuracy."""
    n = len(y)
    given = proba[np.arange(n), y]
    others = proba.copy()
    others[np.arange(n), y] = -1.0
    out = []
    for key in (given, -(others.max(1) - given)):
        hits = np.cumsum(planted[np.argsort(key, kind="stable")])
        k = int(np.searchsorted(hits, 0.5 * planted.sum())) + 1
        out.append(f"{hits[k - 1] / k:.2f}")
    return out + [f"{(proba.argmax(1) == y).mean():.3f}"]


def labels_rung0(seed: int) -> list[str]:
    """Planted flips found from 5-fold out-of-fold heads on rung 0's best backbone, as stages.probe does."""
    import torch

    from automl import models
    from automl.data.inputs import Inputs
    from automl.data.intake import prepare
    from automl.diagnostics.labelnoise import suspects
    from automl.search import ladder
    from automl.search.plan import MIN_IMAGE_PRETRAINED, image_side
    from automl.search.space import load_space
    from automl.training.loop import full_config

    torch.set_num_threads(2)
    out = []
    for name in ("stamps", "fortunes"):
        clean = getattr(realsets, name)()
        noisy, flipped = realsets.with_flipped_labels(clean, seed)
        row = []
        for which in ("flipped", "clean"):
            df = noisy if which == "flipped" else clean
            task = prepare(df, "label", seed=seed, drop_rare_classes=True)
            size = min(96, max(MIN_IMAGE_PRETRAINED, image_side(task.images))) if task.modality == "image" else None
            inputs = Inputs.materialise(task, size, Path(tempfile.mkdtemp()))
            space = load_space("cpu_small", task.modality)
            start = full_config({**space.default_config(), "image_size": size, "max_length": 96, "seed": seed})
            values = space.parameters["backbone"]["values"]
            candidates = [start["backbone"]] + [v for v in values if v != start["backbone"]
                                                and models.resolve(v).pretrained]
            tr, va, full = inputs.split("train"), inputs.split("validation"), inputs.split("full")
            t0 = time.monotonic()
            r0 = ladder.probe(candidates, start, inputs.rows(tr), task.y[tr], inputs.rows(va), task.y[va],
                              num_classes=task.num_classes, metric="f1_macro", allowance_s=None,
                              out_dir=tempfile.mkdtemp(), seed=seed)
            ladder.cross_validate(r0, task.y[full], task.num_classes, "f1_macro", seed=seed, keep_oof=True)
            if r0.oof_proba is None:
                raise RuntimeError(f"{name}: rung 0 did not see every row; no out-of-fold probabilities")
            found = suspects(r0.oof_proba, task.y[full], task.classes, task.row_index[full])
            took = time.monotonic() - t0
            if which == "flipped":
                planted = set(flipped) & set(task.row_index[full])
                hits = len(set(found["row"]) & planted)
                row += [" + ".join(r0.oof_backbones), f"{hits / max(1, len(found)):.2f}", f"{hits / max(1, len(planted)):.2f}",
                        f"{len(found)} of {len(full)} ({len(planted)} planted)",
                        *_ranked(r0.oof_proba, task.y[full], np.isin(task.row_index[full], flipped))]
            else:
                row += [f"{len(found)} ({len(found) / len(full):.1%})", f"{took:.0f}"]
        out.append(f"| {name} | " + " | ".join(row) + " |")
        print(out[-1], flush=True)
    return out


def labels_product(budget: float, seed: int) -> list[str]:
    """Planted flips found by the product as a user runs it: auto_finetune on the whole set with 5% of labels
    flipped (the same flips as labels_rung0 for the seed), its suspected label errors against the planted rows of
    train+validation (the rows it searches; the test split's flips cannot be found)."""
    from automl import auto_finetune
    from automl.data.intake import prepare
    from automl.options import DataOptions

    out = []
    for name in ("stamps", "fortunes"):
        df, flipped = realsets.with_flipped_labels(getattr(realsets, name)(), seed)
        d = DataOptions()
        task = prepare(df, "label", seed=seed, drop_rare_classes=d.drop_rare_classes, drop_bad_images=d.drop_bad_images)
        searched = set(task.row_index[np.concatenate([task.splits["train"], task.splits["validation"]])])
        planted = set(flipped) & searched
        t0 = time.monotonic()
        m = auto_finetune(df, label="label", time_budget_s=budget, seed=seed, output_dir=Path(tempfile.mkdtemp()),
                          progress=False)
        wall = time.monotonic() - t0
        sizes = m.data_report["split_sizes"]
        if sizes["train"] + sizes["validation"] != len(searched):
            raise RuntimeError(f"{name}: the product's split ({sizes}) is not the one reproduced here")
        found = set(m.label_errors["row"]) if m.label_errors is not None else set()
        hits = len(found & planted)
        le = m.manifest.suspected_label_errors or {}
        out.append(f"| {name} | {seed} | {hits / max(1, len(found)):.2f} | {hits / max(1, len(planted)):.2f} | "
                   f"{len(found)} of {len(searched)} ({len(planted)} planted) | "
                   f"{le.get('ranked_with', 'rung 0 alone').split(' (')[0]} | {wall:.0f} |")  # trial <id>'s margins
        print(out[-1], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--parts", default="pretrained,pooling,combine,labels")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    parts = args.parts.split(",")
    lines = []
    if "pretrained" in parts:
        lines += [f"### Pretrained vs scratch EfficientNet-Lite0 inside a search ({args.budget:.0f} s each)", "",
                  "| set | seed | backbone | test macro-F1 | trials | wall s |", "|---|---|---|---|---|---|",
                  *pretrained_vs_scratch(args.budget, args.seed), ""]
    if "pooling" in parts:
        lines += ["### MiniLM pooling: the start point trained once, same steps", "",
                  "| set | seed | pooling | model.pooling | test macro-F1 | s |", "|---|---|---|---|---|---|",
                  *pooling(args.seed), ""]
    if "combine" in parts:
        lines += [f"### Soup / ensemble vs the best single trial (auto_finetune, {args.budget:.0f} s, no retrain)", "",
                  "| set | seed | exported | best single trial, test macro-F1 | exported, test macro-F1 | "
                  "validation scores of the options |", "|---|---|---|---|---|---|",
                  *combine(args.budget, args.seed), ""]
    if "labels" in parts:
        lines += ["### Suspected label errors: 5% of labels flipped (targets: precision ≥ 0.6 at recall ≥ 0.5; "
                  "≤ 5% of clean rows flagged)", "",
                  "| set | precision | expected precision (card) | recall | flagged | flagged on clean data | s |",
                  "|---|---|---|---|---|---|---|",
                  *labels(args.seed), ""]
    if "labels_rung0" in parts:
        lines += ["### Suspected label errors from rung 0 (the mean of every probe's 5-fold heads): 5% of "
                  "labels flipped", "",
                  "| set | backbones averaged | precision | recall | flagged | precision at recall 0.5, ranked by p(given) "
                  "| by margin | out-of-fold accuracy | flagged on clean data | s (probes + folds) |",
                  "|---|---|---|---|---|---|---|---|---|---|",
                  *labels_rung0(args.seed), ""]
    if "labels_product" in parts:
        lines += [f"### Suspected label errors as auto_finetune lists them ({args.budget:.0f} s): 5% of labels flipped",
                  "", "| set | seed | precision | recall | flagged | which rows also from | wall s |",
                  "|---|---|---|---|---|---|---|", *labels_product(args.budget, args.seed), ""]
    print("\n".join(lines))
    if not args.no_write:
        write_section("candidates", "Better candidates", lines)


if __name__ == "__main__":
    main()
