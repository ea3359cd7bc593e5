"""Which rows are suspected label errors: rung 0's out-of-fold heads, a fine-tune's margins, or both.

    python benchmarks/label_views.py run --set fortunes --seed 0     # ~4-5 min on 2 cores
    python benchmarks/label_views.py table                          # every saved run

`run`: 5% of a set's labels flipped (the flips of `candidates.py --parts labels_rung0` for the seed); rung 0 probes
every pretrained backbone of the space and cross-validates its heads (out-of-fold probabilities of train+validation,
as the product does); the space's start point is then fine-tuned on the train rows for 12 reports, keeping each
row's margins over its training (`training/margins.py`), and scores the validation rows. Saved as
`<dir>/<set>-<seed>.npz`.

`table`: for each saved run, confident learning on the out-of-fold probabilities says how many rows are flagged
(k); the k rows most against their label are then taken by four views: the out-of-fold margin alone ("oof"), the
mean of its share and the fine-tune's ("equal", what `labelnoise.suspects` does with `fine=`), the fine-tune's alone
("fine"), and a mean weighted by the two models' accuracies ("acc-w"). Precision and recall against the planted flips.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import realsets  # noqa: E402

DEFAULT_DIR = Path("automl_runs/label_views")


def run(name: str, seed: int, out_dir: Path, reports: int = 12) -> Path:
    import torch

    from automl import models
    from automl.data.encoders import predict_logits
    from automl.data.inputs import Inputs
    from automl.data.intake import prepare
    from automl.data.trial_data import TrialData
    from automl.search import ladder
    from automl.search.plan import MIN_IMAGE_PRETRAINED, image_side
    from automl.search.space import load_space
    from automl.training.loop import encode_inputs, fit, full_config

    torch.set_num_threads(2)
    df, flipped = realsets.with_flipped_labels(getattr(realsets, name)(), seed)
    task = prepare(df, "label", seed=seed, drop_rare_classes=True)
    size = min(128, max(MIN_IMAGE_PRETRAINED, image_side(task.images))) if task.modality == "image" else None
    inputs = Inputs.materialise(task, size, Path(tempfile.mkdtemp()))
    space = load_space("cpu_small", task.modality)
    start = full_config({**space.default_config(), "image_size": size, "max_length": 96, "seed": seed})
    tr, va, full = inputs.split("train"), inputs.split("validation"), inputs.split("full")
    values = space.parameters["backbone"]["values"]
    candidates = [start["backbone"]] + [v for v in values if v != start["backbone"] and models.resolve(v).pretrained]
    t0 = time.monotonic()
    r0 = ladder.probe(candidates, start, inputs.rows(tr), task.y[tr], inputs.rows(va), task.y[va],
                      num_classes=task.num_classes, metric="f1_macro", allowance_s=None, out_dir=tempfile.mkdtemp(),
                      seed=seed)
    ladder.cross_validate(r0, task.y[full], task.num_classes, "f1_macro", seed=seed, keep_oof=True)
    print(f"{name} {seed}: rung 0 {time.monotonic() - t0:.0f} s ({', '.join(r0.oof_backbones)})", flush=True)
    data = TrialData(task.modality, task.num_classes, inputs.rows(tr), task.y[tr], inputs.rows(va), task.y[va])
    t0 = time.monotonic()
    res = fit(start, data, epochs=reports)
    print(f"{name} {seed}: fine-tune {time.monotonic() - t0:.0f} s, validation macro-F1 by report "
          f"{[round(h.get('val_f1_macro', 0), 3) for h in res.history]}", flush=True)
    val_logits = predict_logits(res.model, res.encoder, encode_inputs(res.encoder, inputs.rows(va)),
                                torch.device("cpu")).numpy()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}-{seed}.npz"
    np.savez(path, sums=res.margins.sum, cnt=res.margins.count, oof=r0.oof_proba, y=task.y[full],
             rows=task.row_index[full], tr=tr, flipped=flipped, lv=val_logits)
    return path


def table(paths: list[Path]) -> list[str]:
    from automl.diagnostics.labelnoise import against_label, label_margin, suspects

    views = ("oof", "equal", "fine", "acc-w")
    lines = ["| set | seed | planted | k | accuracy: fine-tune (validation) / heads (out of fold) | "
             + " | ".join(f"{v}: P / R" for v in views) + " |", "|---|---|---|---|---|" + "---|" * len(views)]
    for path in paths:
        d = np.load(path)
        y, ntr = d["y"], len(d["tr"])
        planted = np.isin(d["rows"], d["flipped"])
        oof = d["oof"]
        oof_view = against_label(label_margin(oof, y))
        lv, yv = d["lv"], y[ntr:]
        pv = np.exp(lv - lv.max(1, keepdims=True))
        pv /= pv.sum(1, keepdims=True)
        fine = np.concatenate([against_label(d["sums"] / np.maximum(d["cnt"], 1)), against_label(label_margin(pv, yv))])
        acc_f, acc_o = (lv.argmax(1) == yv).mean(), (oof.argmax(1) == y).mean()
        k = len(suspects(oof, y, list(range(oof.shape[1]))))
        cells = []
        for w in (0.0, 0.5, 1.0, acc_f / (acc_f + acc_o)):
            top = np.argsort(-((1 - w) * oof_view + w * fine), kind="stable")[:k]
            hits = planted[top].sum()
            cells.append(f"{hits / max(1, k):.2f} / {hits / planted.sum():.2f}")
        name, seed = path.stem.rsplit("-", 1)
        lines.append(f"| {name} | {seed} | {planted.sum()} | {k} | {acc_f:.2f} / {acc_o:.2f} | " + " | ".join(cells)
                     + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["run", "table"])
    ap.add_argument("--set", default="fortunes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    args = ap.parse_args()
    if args.what == "run":
        print(run(args.set, args.seed, args.dir))
    else:
        print("\n".join(table(sorted(args.dir.glob("*.npz")))))


if __name__ == "__main__":
    main()
