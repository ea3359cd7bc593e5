"""Would a chosen rung-0 head gain from a refit on train+validation? Offline, no search.

    python benchmarks/refit_heads.py stamps|fortunes|icons [--seeds 3] [--only-seed S]

For each seed (quality.py's split) rung 0 probes every pretrained backbone of the space as the product does
(search/ladder.probe: heads fitted on train, C and class weighting chosen on validation); each probe's head is then
refitted with the same C on train+validation features, and both heads are scored on the test rows. Prints one line
per probe: the test macro-F1 of the train-only head and of the refit.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import realsets  # noqa: E402
from quality import split  # noqa: E402


def main() -> None:
    import torch

    from automl import models
    from automl.data.inputs import Inputs
    from automl.data.intake import prepare
    from automl.metrics import classification_metrics
    from automl.runtime import device
    from automl.search import ladder
    from automl.search.plan import MIN_IMAGE_PRETRAINED, image_side
    from automl.search.space import load_space
    from automl.training.loop import build_encoder, build_model, full_config

    ap = argparse.ArgumentParser()
    ap.add_argument("set", choices=["stamps", "fortunes", "icons"])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--only-seed", type=int, default=None, help="run this one seed of the --seeds")
    args = ap.parse_args()
    torch.set_num_threads(2)
    for seed in range(args.seeds) if args.only_seed is None else [args.only_seed]:
        df = split(getattr(realsets, args.set)(), seed)
        task = prepare(df, "label", seed=seed, drop_rare_classes=True)
        size = min(96, max(MIN_IMAGE_PRETRAINED, image_side(task.images))) if task.modality == "image" else None
        inputs = Inputs.materialise(task, size, Path(tempfile.mkdtemp()))
        start = full_config({**load_space("cpu_small", task.modality).default_config(), "image_size": size,
                             "max_length": 96, "seed": seed})
        values = load_space("cpu_small", task.modality).parameters["backbone"]["values"]
        cands = [start["backbone"]] + [v for v in values if v != start["backbone"] and models.resolve(v).pretrained]
        tr, va, te, full = (inputs.split(s) for s in ("train", "validation", "test", "full"))
        r0 = ladder.probe(cands, start, inputs.rows(tr), task.y[tr], inputs.rows(va), task.y[va],
                          num_classes=task.num_classes, metric="f1_macro", allowance_s=None,
                          out_dir=tempfile.mkdtemp(), seed=seed)
        shared = ladder._SharedPasses(cands, device())

        def score(p):
            return classification_metrics(task.y[te], p, task.num_classes)["f1_macro"]

        for p in r0.probes:
            cfg = full_config({**start, "backbone": p.backbone, "unfreeze": 0})
            torch.manual_seed(seed)
            model, spec = build_model(cfg, task.num_classes)
            model.eval()
            f_test = shared.features(p.backbone, model, build_encoder(cfg, model, spec), inputs.rows(te), "test")
            w, b = ladder.standardised_fit(p.full_features, task.y[full], task.num_classes, p.C, p.balanced, seed)
            on_train, refit = score(ladder.proba(f_test, p.weight, p.bias)), score(ladder.proba(f_test, w, b))
            print(f"{args.set} seed {seed} {p.backbone}: val {p.val_score:.4f} (C={p.C:g}, class-weighted "
                  f"{p.balanced}); test: train-only head {on_train:.4f}, refit on train+validation {refit:.4f} "
                  f"({100 * (refit - on_train):+.1f})", flush=True)


if __name__ == "__main__":
    main()
