"""Transparent images: stretched to a square, or padded to one with transparent pixels? (issue #24, small RGBA images)

    python benchmarks/aspect.py --probe --seeds 5 --size 96   # linear probes on frozen features (deterministic)
    python benchmarks/aspect.py --seeds 4 --size 64 --epochs 12   # the start point fine-tuned

Half the Tux Paint stamps are wider or taller than 1.25:1 (0.5:1 to 2.1:1 between the 5th and 95th percentiles).
Training reads every image stretched to size x size; an image with an alpha channel can instead be padded to a
square canvas with transparent pixels first, which keeps its drawing's shape (the padding is filled as the rest of
its background is). For each split seed (quality.py's stratified 70/15/15 split), the image start point of the
CPU space (EfficientNet-Lite0, ImageNet weights) is fitted alone (`fit`, no Ray, no search) on the same rows, the
same training seed and the same number of steps, once on stretched and once on padded images, and scored on the
test rows: macro-F1 of its last report's weights. With --probe, rung 0 instead: each pretrained EfficientNet-Lite's
frozen features and its grid of linear heads (search/ladder.fit_heads), the head best on validation scored on test;
no training noise, so the two canvases' difference is the features' alone. Nothing is written to RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import realsets  # noqa: E402
from quality import split  # noqa: E402


def _padded(img: Image.Image) -> Image.Image:
    """An image with transparency centred on a transparent square canvas (others unchanged)."""
    from automl.data.images import has_transparency

    if not has_transparency(img):
        return img
    img = img.convert("RGBA")
    w, h = img.size
    side = max(w, h)
    canvas = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def _arrays(paths, size: int, pad: bool) -> np.ndarray:
    from automl.data import images

    out = np.empty((len(paths), 3, size, size), np.uint8)
    for i, p in enumerate(paths):
        with Image.open(p) as img:
            img.load()
            img = _padded(img) if pad else img
            rgb = images.decode_image(img, alpha_background=images.ALPHA_BACKGROUND)
        out[i] = images.resize_rgb(rgb, size).transpose(2, 0, 1)
    return out


_FEATURES: dict = {}  # (canvas, backbone) -> features of every image: the same for every split seed


def _probe(start: dict, x: np.ndarray, y: np.ndarray, idx: dict, num_classes: int, canvas: str
           ) -> tuple[float, float, float]:
    """(test macro-F1, validation macro-F1, seconds), each the mean over the three EfficientNet-Lites of the head
    best on validation among rung 0's grid (a mean over backbones, not the best of them: less selection noise)."""
    from automl.metrics import classification_metrics
    from automl.search.ladder import _frozen, fit_heads, proba
    from automl.training.featcache import body_features
    from automl.training.loop import default_device

    t0, tests, vals = time.time(), [], []
    for name in ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"):
        if (canvas, name) not in _FEATURES:
            model, enc = _frozen(start, name, num_classes, default_device(), 0)
            _FEATURES[canvas, name] = body_features(model, enc, x, default_device()).numpy()
        f = _FEATURES[canvas, name]
        heads = fit_heads(f[idx["train"]], y[idx["train"]], f[idx["validation"]], y[idx["validation"]], num_classes,
                          "f1_macro")
        top = max(heads, key=lambda h: h["score"])
        test = classification_metrics(y[idx["test"]], proba(f[idx["test"]], top["w"], top["b"]), num_classes)
        tests.append(float(test["f1_macro"]))
        vals.append(top["score"])
    return float(np.mean(tests)), float(np.mean(vals)), time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--set", default="stamps")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--probe", action="store_true", help="linear heads on frozen features instead of a fine-tune")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = ap.parse_args()

    import torch

    from automl.data.intake import class_weights
    from automl.data.trial_data import TrialData
    from automl.search.space import load_space
    from automl.training.loop import default_device, evaluate, fit

    torch.set_num_threads(args.threads)
    df = getattr(realsets, args.set)()
    classes = sorted(df["label"].unique())
    y_all = df["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    start = dict(load_space("cpu_small", modality="image").start_points[0], image_size=args.size)
    print(f"{args.set}: {len(df)} images, {len(classes)} classes; start point {start}")
    rows, arrays = [], {}
    for seed in range(args.seeds):
        parts = split(df, seed)["split"].to_numpy()
        idx = {p: np.flatnonzero(parts == p) for p in ("train", "validation", "test")}
        weights = class_weights(y_all[idx["train"]], len(classes))
        for pad in (False, True):
            canvas = "padded" if pad else "stretched"
            if canvas not in arrays:
                arrays[canvas] = _arrays(df["image"].tolist(), args.size, pad)
            x = arrays[canvas]
            if args.probe:
                rows.append((seed, canvas, *_probe(start, x, y_all, idx, len(classes), canvas)))
            else:
                data = TrialData("image", len(classes), x[idx["train"]], y_all[idx["train"]], x[idx["validation"]],
                                 y_all[idx["validation"]], class_weights=weights)
                t0 = time.time()
                res = fit({**start, "seed": seed}, data, epochs=args.epochs)  # fit seeds torch from the config
                test = evaluate(res.model, res.encoder, x[idx["test"]], y_all[idx["test"]], len(classes),
                                default_device())
                rows.append((seed, canvas, test["f1_macro"], res.history[-1]["val_f1_macro"], time.time() - t0))
            print(f"seed {seed} {canvas:>9}: test macro-F1 {rows[-1][2]:.4f}, validation {rows[-1][3]:.4f} "
                  f"({rows[-1][4]:.0f} s)", flush=True)
    print("\n| seed | stretched | padded | padded − stretched |\n|---|---|---|---|")
    for seed in range(args.seeds):
        s, p = (r[2] for r in rows if r[0] == seed)
        print(f"| {seed} | {s:.4f} | {p:.4f} | {100 * (p - s):+.1f} |")
    s_mean = np.mean([r[2] for r in rows if r[1] == "stretched"])
    p_mean = np.mean([r[2] for r in rows if r[1] == "padded"])
    print(f"| mean | {s_mean:.4f} | {p_mean:.4f} | {100 * (p_mean - s_mean):+.1f} |")


if __name__ == "__main__":
    main()
