"""Rung 0 of the search's cost ladder: every pretrained backbone's frozen features, linear heads fitted in seconds.

The cheapest honest fidelity of "how many layers to unfreeze" is zero. For each pretrained backbone of the space
(images: EfficientNet-Lite0/1/2; text: MiniLM mean- and first-token-pooled) the frozen body's pooled features
are computed once for the training and validation rows, and class-weighted or plain logistic regressions with a
few regularisation strengths are fitted on them (scikit-learn, on standardised features) and scored on
validation. What that buys:

- every pretrained backbone is judged on the data before a fine-tune is spent on it: the fine-tunes (rungs 1-2,
  Ray Tune with ASHA) search only the backbones rung 0 promotes, beside the cheap scratch nets;
- each promoted backbone's best head becomes the starting head of its fine-tunes (LP-FT, Kumar et al., ICLR
  2022): a fine-tune starts at its probe's score instead of a zero head;
- a probe is a model in its own right (the backbone with that linear head): on small or few-shot data it can be
  the best one, and the final choice (training/combine.py) weighs it beside the fine-tunes, alone or in an
  ensemble;
- out-of-fold probabilities of the best probe (5 folds over train+validation) list suspected label errors for
  seconds of work (diagnostics/labelnoise.py), where a cross-fit of fine-tunes costs minutes.

Rung 0 is priced as it runs: each backbone's validation features are timed first, and its training features are
computed only for as many rows as the rung's allowance still pays for (a stratified sample), or it is skipped
with a reason; the first is probed whatever the allowance, on a floor of rows (a model is promised). `probe` is a plain function (no Ray): the driver runs it between the plan and the search.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

C_GRID = (0.01, 0.1, 1.0, 10.0)   # inverse L2 strengths tried, on standardised features
MAX_ROWS = 6000                   # training rows a probe sees at most (a stratified sample beyond)
MIN_ROWS_PER_CLASS = 5            # a probe whose allowance buys fewer training rows than this per class is skipped
FLOOR_ROWS_PER_CLASS = 20         # ...except the first, which sees at least this many whatever the allowance: a
                                  # model is promised, and it is the cheapest there is (30 s on 1,797 digits: rung 0
                                  # had time for 43 rows and was skipped, and a 4-step fine-tune from a zero head
                                  # was exported at chance, 0.11, where a probe on 200 rows scores ~0.85 in 2 s)
FLOOR_ROWS = 400                  # many classes: the floor stops growing here (but never below MIN_ROWS_PER_CLASS)
LABEL_ERROR_FOLDS = 5
PROMOTE = 2                       # pretrained backbones promoted to the fine-tuning rungs
MAX_COST_RATIO = 2.0              # a start backbone dearer than this per row than the space's own is not taken
UPSCALE_ROWS = 1000               # training rows the upscaled side is judged on at most (a stratified sample)
UPSCALE_MARGIN = 0.02             # ...and how much better its cross-validated score must be: the larger side costs
                                  # about its square in features, and later in every prediction. 48 px icons, Lite0,
                                  # 5-fold CV on training rows, 3 splits: 96 px +7 to +11 points of macro-F1 (all
                                  # three Lites +8 to +9 on 702 rows); 8 px digits shown at 48 px: 96 px -2 to -3


@dataclass
class Probe:
    """One backbone's best head on its frozen features."""

    backbone: str
    val_score: float
    C: float
    balanced: bool
    row_s: float                      # seconds of features per row (the backbone's price at this input size)
    seconds: float                    # features + fits
    rows: int                         # training rows it was fitted on
    weight: np.ndarray                # [classes, features], on the raw (unstandardised) features
    bias: np.ndarray
    val_proba: np.ndarray
    head_file: str | None = None      # the head as the model's own parameters (safetensors), for LP-FT and export
    full_features: np.ndarray | None = None   # train+validation features (when every row was seen)
    head_probas: list = field(default_factory=list)   # validation probabilities of every head fitted (the pool
                                      # this probe was picked from, for selection-aware gates)
    cv_score: float | None = None     # its head config cross-validated on train+validation (cross_validate)
    row_flops: float = 0.0            # FLOPs of one row's features: the price compared between backbones (a timing
                                      # of a few rows on a busy machine can be off by more than MAX_COST_RATIO)
    image_size: int | None = None     # the side it was probed at, where larger than the trial's (Rung0.upscaled)

    @property
    def trial_id(self) -> str:
        """Its row's id in the trial table (its head is kept under that name)."""
        return Path(self.head_file).name.split(".")[0] if self.head_file else ""


@dataclass
class Rung0:
    """What rung 0 found: probes best first, one table row per head fitted, and what it skipped."""

    probes: list[Probe] = field(default_factory=list)   # at the trial's inputs: fine-tunes start from their heads
    upscaled: list[Probe] = field(default_factory=list)  # at a larger image side that paid (models only)
    upscale_note: str = ""                # whether the larger side was taken, and on what evidence
    rows: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    oof_proba: np.ndarray | None = None   # out-of-fold probabilities of train+validation (every probe's mean)
    oof_folds: int = 0
    oof_backbones: list[str] = field(default_factory=list)  # the probes averaged into oof_proba
    y_val: np.ndarray | None = None       # the validation labels the heads were scored on, in their order

    def pool(self, y_val: np.ndarray) -> list[np.ndarray]:
        """Validation probabilities of every head fitted, if they were scored on `y_val`'s rows (else none)."""
        if self.y_val is None or not np.array_equal(self.y_val, y_val):
            return []
        return [q for p in self.models for q in p.head_probas]

    @property
    def models(self) -> list[Probe]:
        """Every probe, at the trial's inputs or upscaled, best on validation first: each is a model."""
        return sorted(self.probes + self.upscaled, key=lambda p: p.val_score, reverse=True)

    @property
    def best(self) -> Probe | None:
        return self.probes[0] if self.probes else None

    def head_files(self) -> dict[str, str]:
        """backbone -> its best head's file: the starting head of that backbone's fine-tunes."""
        return {p.backbone: p.head_file for p in self.probes if p.head_file}

    def summary(self) -> str:
        if not self.probes:
            return "rung 0: no pretrained backbone probed" + (f" ({'; '.join(self.skipped)})" if self.skipped else "")
        backbones = len(self.probes)
        best = self.models[0]
        return (f"rung 0: {len(self.rows)} linear heads on the frozen features of {backbones} "
                f"backbone{'s' * (backbones > 1)} in {self.seconds:.0f} s; best {best.backbone}"
                f"{f' at {best.image_size} px' if best.image_size else ''} (val {best.val_score:.4f})"
                + (f"; {self.upscale_note}" if self.upscale_note else "")
                + (f"; skipped {'; '.join(self.skipped)}" if self.skipped else ""))


def standardised_fit(f_train: np.ndarray, y: np.ndarray, num_classes: int, C: float, balanced: bool,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A multinomial logistic regression on standardised features, returned as (W, b) over the raw features
    for all `num_classes` classes (a class absent from y gets a bias that never wins)."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    mean, std = f_train.mean(0), f_train.std(0) + 1e-6
    lr = LogisticRegression(C=C, class_weight="balanced" if balanced else None, max_iter=300, random_state=seed)
    # One BLAS/OpenMP thread: lbfgs's small products lose to thread hand-offs (2 cores: 0.2 s against 1.0 s for
    # six heads on 1200x1280 features; an H200 host's 16 threads took 14 s for four heads on digits, 2026-12-04).
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore")  # ConvergenceWarning at small C on separable data: the head is still fine
        lr.fit((f_train - mean) / std, y)
    coef, intercept = lr.coef_, lr.intercept_
    if coef.shape[0] == 1:  # binary: one logit; as two symmetric ones the softmax is the same sigmoid
        coef, intercept = np.vstack([-coef / 2, coef / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
    w = np.zeros((num_classes, f_train.shape[1]))
    b = np.full(num_classes, -30.0)
    w[lr.classes_] = coef / std
    b[lr.classes_] = intercept - (coef / std) @ mean
    return w.astype(np.float32), b.astype(np.float32)


def proba(features: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    z = features @ w.T + b
    z -= z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def fit_heads(f_train, y_train, f_val, y_val, num_classes: int, metric: str, balanced_options=(False, True),
              seed: int = 0) -> list[dict]:
    """Every head of the grid, scored on validation: dicts with C, balanced, score, w, b, proba, fit_s."""
    from automl.metrics import classification_metrics

    out = []
    for balanced in balanced_options:
        for C in C_GRID:
            t0 = time.monotonic()
            w, b = standardised_fit(f_train, y_train, num_classes, C, balanced, seed)
            p = proba(f_val, w, b)
            out.append({"C": C, "balanced": balanced, "w": w, "b": b, "proba": p, "fit_s": time.monotonic() - t0,
                        "score": float(classification_metrics(y_val, p, num_classes)[metric])})
    return out


def _head_state(model, w: np.ndarray, b: np.ndarray) -> dict:
    """The head as the model's own parameters: its family's linear head, named as the model names it."""
    import torch

    from automl import models

    head = models.family(model).head(model)
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(head.weight)]: torch.from_numpy(np.ascontiguousarray(w)),
            names[id(head.bias)]: torch.from_numpy(np.ascontiguousarray(b))}


def checkpoints(candidates: list[str]) -> dict[str, tuple[str, str]]:
    """(checkpoint, pooling) of each candidate whose features are one pooling of a checkpoint's outputs (MiniLM
    mean- or first-token-pooled); the others are left out."""
    from automl import models

    of = {}
    for name in candidates:
        try:
            spec = models.resolve(name)
            found = models.family(spec).pooling(spec)
        except Exception:  # judged when the backbone is probed
            found = None
        if found:
            of[name] = found
    return of


def forward_passes(candidates: list[str]) -> int:
    """The forward passes rung 0's features of `candidates` take: one per checkpoint, whatever its poolings
    (_SharedPasses)."""
    of = checkpoints(candidates)
    return len({of[n][0] if n in of else n for n in candidates})


class _SharedPasses:
    """Features of backbones that are poolings of one checkpoint (MiniLM mean- and first-token-pooled) come from
    one forward pass: the first of them computes every pooling, the others read theirs (rung 0 on text costs
    one pass per checkpoint, not one per pooling)."""

    def __init__(self, candidates: list[str], dev):
        self.dev, self.row_s, self.rows, self._memo = dev, {}, {}, {}
        self.of = checkpoints(candidates)
        groups: dict[str, list[str]] = {}
        for key, pooling in self.of.values():
            if pooling not in groups.setdefault(key, []):
                groups[key].append(pooling)
        self.groups = {k: v for k, v in groups.items() if len(v) > 1}

    def features(self, name: str, model, enc, x, tag) -> np.ndarray:
        from automl import models
        from automl.training.featcache import body_features
        from automl.training.loop import encode_inputs

        key, pooling = self.of.get(name, (None, None))
        if key not in self.groups:
            return body_features(model, enc, encode_inputs(enc, x), self.dev).float().numpy()
        if (key, tag, pooling) not in self._memo:
            got = models.family(model).pooled_features(model, enc, encode_inputs(enc, x), self.dev, self.groups[key])
            self._memo.update({(key, tag, p): f.numpy() for p, f in got.items()})
        return self._memo[(key, tag, pooling)]

    def done(self, name: str, row_s: float, rows: int) -> None:
        """The siblings of `name` reuse its measured cost a row and its training rows."""
        key = self.of.get(name, (None,))[0]
        for other, (k, _) in self.of.items():
            if k == key and key in self.groups and other != name:
                self.row_s.setdefault(other, row_s)
                self.rows.setdefault(other, rows)


def probe(candidates: list[str], config: dict, x_train, y_train: np.ndarray, x_val, y_val: np.ndarray, *,
          num_classes: int, metric: str, allowance_s: float | None, out_dir: str | Path, seed: int = 0,
          progress=None, upscale: int | None = None) -> Rung0:
    """Rung 0 over `candidates` (pretrained backbone names, the space's start backbone first): each backbone's
    frozen features and its heads, within `allowance_s` seconds (None: no limit). `config` gives the input size
    or length and the preprocessing. Heads are written to `out_dir`/<trial id>.head.safetensors.

    upscale: a larger image side to probe at as well (plan.probe_upscale). Where the start backbone's features at
    that side cross-validate better on the training rows than at the trial's (`upscale_pays`), every backbone is
    probed at it too: those probes are models of their own (`Rung0.upscaled`), never a fine-tune's starting head
    (a head fitted at one side scores near chance on features of another: digits 0.06-0.12 against 0.96)."""
    from safetensors.torch import save_file

    from automl.data.inputs import sample_rows
    from automl.data.trial_data import subset
    from automl.runtime import device

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    result = Rung0(y_val=np.asarray(y_val))
    # Class weighting may pay where the metric weighs classes equally (stamps: it won on two backbones of three,
    # plain heads on the third); where the metric weighs rows, plain heads only.
    balanced_options = (False, True) if metric in ("f1_macro", "balanced_accuracy") else (False,)
    dev = device()
    n_train = len(y_train)
    shared = _SharedPasses(candidates, dev)
    floor = min(FLOOR_ROWS_PER_CLASS * num_classes, max(FLOOR_ROWS, MIN_ROWS_PER_CLASS * num_classes))

    def left() -> float:
        return math.inf if allowance_s is None else allowance_s - (time.monotonic() - t_start)

    def one(name: str, tid: str, cfg_in: dict, first: bool, upscaled: bool = False,
            rows_seen: tuple | None = None) -> tuple[Probe, np.ndarray] | None:
        """`name` probed at `cfg_in`'s inputs: its probe and the training rows it saw (None: skipped, with the
        reason in result.skipped). rows_seen: (rows, their features) already computed at these inputs."""
        what = f"{name} at {cfg_in['image_size']} px" if upscaled else name
        if left() <= 0 and not first:
            result.skipped.append(f"{what}: rung 0's {allowance_s:.0f} s were spent")
            return None
        t0 = time.monotonic()
        try:
            model, enc = _frozen(cfg_in, name, num_classes, dev, seed)
            t_rows = time.monotonic()
            f_val = shared.features(name, model, enc, x_val, ("val", upscaled))
        except Exception as exc:  # weights that cannot load, or inputs the model cannot take: judged, not fatal
            result.skipped.append(f"{what}: {type(exc).__name__}: {str(exc)[:200]}")
            return None
        row_s = (None if upscaled else shared.row_s.get(name)) or (time.monotonic() - t_rows) / max(1, len(y_val))
        flops = row_flops(model, enc, subset(x_val, np.arange(1)), dev)
        # The training rows this backbone's features can still be paid for (the fits take about a fifth more);
        # another pooling of a checkpoint already probed reuses its rows, whose features are already there.
        affordable = n_train if allowance_s is None else int((left() - (time.monotonic() - t0)) / (1.2 * row_s))
        rows = (None if upscaled else shared.rows.get(name)) \
            or min(n_train, MAX_ROWS, max(floor if first else 0, affordable))
        if rows < MIN_ROWS_PER_CLASS * num_classes and rows < n_train:
            result.skipped.append(f"{what}: its features cost {row_s * 1000:.1f} ms a row, rung 0 had time for "
                                  f"{rows} of {n_train} training rows")
            return None
        pick = sample_rows(np.arange(len(y_train)), y_train, rows, seed)
        if rows_seen is not None and np.array_equal(rows_seen[0], pick):
            f_train = rows_seen[1]
        else:
            f_train = shared.features(name, model, enc, subset(x_train, pick), ("train", rows, upscaled))
        if not upscaled:
            shared.done(name, row_s, rows)
        heads = fit_heads(f_train, y_train[pick], f_val, y_val, num_classes, metric, balanced_options, seed)
        best = max(heads, key=lambda h: (h["score"], -abs(math.log10(h["C"]))))
        head_file = out_dir / f"{tid}.head.safetensors"
        save_file(_head_state(model, best["w"], best["b"]), str(head_file))
        seconds = time.monotonic() - t0
        p = Probe(name, best["score"], best["C"], best["balanced"], row_s, seconds, len(pick), best["w"], best["b"],
                  best["proba"], str(head_file),
                  np.concatenate([f_train, f_val]) if len(pick) == n_train else None, [h["proba"] for h in heads],
                  row_flops=flops, image_size=int(cfg_in["image_size"]) if upscaled else None)
        result.rows.extend(_head_rows(tid, name, heads, best, cfg_in, metric, seconds, len(pick)))
        if progress:
            progress(_progress_line(what, row_s, heads, best, metric, seconds, len(pick)))
        del model
        return p, pick

    seen: dict[str, tuple[Probe, np.ndarray]] = {}
    for i, name in enumerate(candidates):
        got = one(name, f"r0_{i}", config, first=not result.probes)  # the first is probed however little is left
        if got:
            result.probes.append(got[0])
            seen[name] = got
    if upscale and seen and upscale > int(config.get("image_size") or upscale):
        _probe_upscaled(result, seen, candidates, config, upscale, one, left, x_train, y_train, num_classes,
                        metric, seed, progress)
    result.probes.sort(key=lambda p: p.val_score, reverse=True)
    result.upscaled.sort(key=lambda p: p.val_score, reverse=True)
    result.seconds = time.monotonic() - t_start
    return result


def _probe_upscaled(result: Rung0, seen: dict, candidates: list[str], config: dict, upscale: int, one, left,
                    x_train, y_train: np.ndarray, num_classes: int, metric: str, seed: int, progress) -> None:
    """Judge `upscale` px on the first backbone probed (cross-validation on its training rows, both sides) and,
    where it pays, probe every backbone at it (`one`: probe()'s single-backbone step)."""
    from automl.data.inputs import sample_rows
    from automl.data.trial_data import subset
    from automl.runtime import device
    from automl.training.featcache import body_features
    from automl.training.loop import encode_inputs

    name = next(n for n in candidates if n in seen)
    probe0, pick = seen[name]
    size = int(config["image_size"])
    rows = sample_rows(pick, y_train[pick], UPSCALE_ROWS, seed)
    reuse = probe0.full_features is not None and np.array_equal(rows, pick)  # its probe saw every training row
    # Features cost about the square of the side; the judgement is skipped when rung 0 cannot pay for it.
    cost = 1.2 * len(rows) * probe0.row_s * ((upscale / size) ** 2 + (0 if reuse else 1))
    if left() < cost:
        result.skipped.append(f"{upscale} px: rung 0 had no time left to judge it (~{cost:.0f} s)")
        return
    dev = device()
    feats = {}
    for side in (size, upscale):
        if side == size and reuse:
            feats[side] = probe0.full_features[:len(pick)]
            continue
        model, enc = _frozen({**config, "image_size": side}, name, num_classes, dev, seed)
        feats[side] = body_features(model, enc, encode_inputs(enc, subset(x_train, rows)), dev).float().numpy()
    balanced = metric in ("f1_macro", "balanced_accuracy")
    scores = {side: cv_score(f, y_train[rows], num_classes, metric, balanced, seed) for side, f in feats.items()}
    if scores[size] is None or not upscale_pays(scores[size], scores[upscale]):
        result.upscale_note = (f"{upscale} px not taken: {name}'s frozen features cross-validate "
                               f"{_fmt(scores[upscale])} on training rows against {_fmt(scores[size])} at {size} px")
        if progress:
            progress(f"rung 0: {result.upscale_note}")
        return
    result.upscale_note = (f"{upscale} px taken for frozen-feature models: {name}'s features cross-validate "
                           f"{scores[upscale]:.4f} on training rows against {scores[size]:.4f} at {size} px")
    if progress:
        progress(f"rung 0: {result.upscale_note}")
    at = {**config, "image_size": upscale}
    for i, b in enumerate(candidates):
        if b not in seen:
            continue
        got = one(b, f"r0_{i}_{upscale}px", at, first=False, upscaled=True,
                  rows_seen=(rows, feats[upscale]) if b == name else None)
        if got:
            result.upscaled.append(got[0])


def _frozen(config: dict, name: str, num_classes: int, dev, seed: int):
    """Backbone `name` with a linear head, built for `config`'s inputs, in eval mode on `dev`, and its encoder."""
    import torch

    from automl.training.loop import build_encoder, build_model, full_config

    cfg = full_config({**config, "backbone": name, "unfreeze": 0})
    torch.manual_seed(seed)
    model, spec = build_model(cfg, num_classes)
    model.to(dev).eval()
    return model, build_encoder(cfg, model, spec)


def cv_score(f: np.ndarray, y: np.ndarray, num_classes: int, metric: str, balanced: bool, seed: int = 0,
             folds: int = 5, C: float = 0.1) -> float | None:
    """`metric` of one head config's out-of-fold predictions over rows `f` (None: a class too small to fold)."""
    from automl.metrics import classification_metrics

    got = _out_of_fold(f, y, num_classes, C, balanced, folds, seed)
    return None if got is None else float(classification_metrics(y, got[0], num_classes)[metric])


def upscale_pays(at_size: float, upscaled: float) -> bool:
    """Whether frozen features at the larger side are worth their price: better by UPSCALE_MARGIN or more."""
    return upscaled >= at_size + UPSCALE_MARGIN


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _head_rows(tid: str, name: str, heads: list[dict], best: dict, config: dict, metric: str, seconds: float,
               n_rows: int) -> list[dict]:
    """One trial-table row per head fitted on `name`'s features (the best head under the trial id `tid`)."""
    input_cols = {k: config[k] for k in ("image_size", "max_length") if config.get(k) is not None}
    out = []
    for j, h in enumerate(heads):
        out.append({"trial_id": tid if h is best else f"{tid}_{j}", "rung": 0, "start_point": False,
                    "config/backbone": name, "config/unfreeze": 0, **{f"config/{k}": v for k, v in input_cols.items()},
                    "config/class_weighted": h["balanced"], "head": f"logistic C={h['C']:g}",
                    f"best_val_{metric}": h["score"], "best_epoch": 0, "best_val_loss": math.nan,
                    "epochs_run": 0, "time_s": h["fit_s"] + (seconds - sum(x["fit_s"] for x in heads))
                    / len(heads), "status": "COMPLETED", "rows": n_rows})
    return out


def _progress_line(name: str, row_s: float, heads: list[dict], best: dict, metric: str, seconds: float,
                   n_rows: int) -> str:
    """What rung 0 reports once backbone `name` is probed."""
    return (f"rung 0: {name} features {row_s * 1000:.1f} ms/row, {len(heads)} heads on {n_rows} rows, "
            f"best val {metric} {best['score']:.4f} (C={best['C']:g}"
            f"{', class-weighted' if best['balanced'] else ''}) in {seconds:.0f} s")


def out_of_fold(probe_: Probe, y_full: np.ndarray, num_classes: int, folds: int = LABEL_ERROR_FOLDS,
                seed: int = 0) -> tuple[np.ndarray, int] | None:
    """Out-of-fold probabilities of train+validation from the probe's head config refitted per fold (seconds),
    and the folds used (fewer when a class is smaller; None when the probe did not see every row)."""
    f = probe_.full_features
    if f is None or len(f) != len(y_full):
        return None
    return _out_of_fold(f, y_full, num_classes, probe_.C, probe_.balanced, folds, seed)


def _out_of_fold(f: np.ndarray, y: np.ndarray, num_classes: int, C: float, balanced: bool, folds: int,
                 seed: int) -> tuple[np.ndarray, int] | None:
    """Out-of-fold probabilities of one head config over rows `f` (stratified folds, fewer when a class is
    smaller) and the folds used; None when a class has fewer than two rows."""
    from sklearn.model_selection import StratifiedKFold

    counts = np.bincount(y, minlength=num_classes)
    k = int(min(folds, counts[counts > 0].min()))
    if k < 2:
        return None
    out = np.zeros((len(y), num_classes))
    for tr, te in StratifiedKFold(k, shuffle=True, random_state=seed).split(f, y):
        out[te] = proba(f[te], *standardised_fit(f[tr], y[tr], num_classes, C, balanced, seed))
    return out, k


def row_flops(model, enc, x_one, dev) -> float:
    """FLOPs of the frozen features of one row (0 when the counter cannot trace the model)."""
    from torch.utils.flop_counter import FlopCounterMode

    from automl.training.featcache import body_features
    from automl.training.loop import encode_inputs

    try:
        with FlopCounterMode(display=False) as counter:
            body_features(model, enc, encode_inputs(enc, x_one), dev)
        return float(counter.get_total_flops())
    except Exception:
        return 0.0


def _cost(p: Probe, ref: Probe) -> float:
    """How many times `ref`'s price a row `p` costs: counted FLOPs where both have them, else timed seconds."""
    if p.row_flops > 0 and ref.row_flops > 0:
        return p.row_flops / ref.row_flops
    return p.row_s / max(ref.row_s, 1e-12)


def cross_validate(rung0: Rung0, y_seen: np.ndarray, num_classes: int, metric: str, seed: int = 0,
                   keep_oof: bool = False) -> None:
    """Each probe's head config refitted per fold over every row it has features for (train+validation, in that
    order: `y_seen`): its `cv_score`, from about six times the rows validation alone has. Seconds: the features
    are there. keep_oof (`y_seen` is every row of train+validation): rung0.oof_proba becomes the mean of every
    probe's out-of-fold probabilities, for suspected label errors. The mean, not the best probe's: 5% planted flips
    were found at precision 0.50 / 0.38 / 0.98 (stamps seeds 0 and 1, digits) from the mean of three
    EfficientNet-Lite heads against 0.31 / 0.18 / 0.76 from the best one, at about the same recall (2026-12-04)."""
    from automl.metrics import classification_metrics

    found = []
    for p in rung0.models:
        oof = out_of_fold(p, y_seen, num_classes, seed=seed)
        if oof is not None:
            p.cv_score = float(classification_metrics(y_seen, oof[0], num_classes)[metric])
            found.append((p.backbone + (f" at {p.image_size} px" if p.image_size else ""), oof))
    if keep_oof and found:
        rung0.oof_proba = np.mean([proba for _, (proba, _) in found], axis=0)
        rung0.oof_folds = min(folds for _, (_, folds) in found)
        rung0.oof_backbones = [b for b, _ in found]


def doubtful(rung0: Rung0 | None, start_val_score: float) -> dict[str, Probe]:
    """Rung-0 heads (trial id -> probe) whose cross-validated score is below the fine-tuned start point's
    validation score. They stay out of the final choice: on 100-odd validation rows a frozen-feature head can
    score far above what it generalises to (Tux Paint stamps, 300 s, two seeds of three: the EfficientNet-Lite1
    head scored 0.76 and 0.87 macro-F1 on validation against the fine-tune's 0.64 and 0.71, and 0.48 and 0.58 on
    test against `fixed`'s 0.66 and 0.62), while more rows tell the two apart."""
    if rung0 is None:
        return {}
    return {p.trial_id: p for p in rung0.models
            if p.head_file and p.cv_score is not None and p.cv_score < start_val_score}


def choose_start(rung0: Rung0, reference: str, y_val: np.ndarray, metric: str, num_classes: int,
                 alpha: float) -> tuple[str, str]:
    """The backbone the protected start point fine-tunes from its probe: the space's own (`reference`), unless
    another's probe beats it on validation beyond noise (the same paired bootstrap as the final choice, judged as
    the best of every head fitted) and costs
    at most MAX_COST_RATIO times as much a row. Returns (backbone, why)."""
    from automl.training.combine import p_not_better

    ref = next((p for p in rung0.probes if p.backbone == reference), None)
    if ref is None:
        best = rung0.best
        return (best.backbone, f"the start point's {reference} could not be probed; fine-tuning {best.backbone}, "
                               "rung 0's best") if best else (reference, "")
    for p in rung0.probes:
        if p is ref:
            break
        if _cost(p, ref) > MAX_COST_RATIO:
            continue
        pnb = p_not_better(y_val, p.val_proba, ref.val_proba, metric, num_classes, pool=rung0.pool(y_val))
        if pnb <= alpha:
            return p.backbone, (f"{p.backbone}'s probe beat {reference}'s on validation ({p.val_score:.4f} vs "
                                f"{ref.val_score:.4f}, P(not better) {pnb:.2f}): the start point fine-tunes it")
    return reference, f"the start point fine-tunes {reference} from its probe (val {ref.val_score:.4f})"


def promoted(rung0: Rung0, start: str, k: int = PROMOTE) -> list[str]:
    """The pretrained backbones the fine-tuning rungs search: the start point's and the best of the rest."""
    names = [start] + [p.backbone for p in rung0.probes if p.backbone != start]
    return names[:k]


def with_rung0(result, rung0: Rung0, metric: str, experiment_path: str):
    """The search's result with rung 0's heads in its trial table and each backbone's best head kept beside the
    trials' weights (so the final choice weighs probes as models); without a search result (no fine-tune
    reported in time), rung 0's best head is the winner."""
    import pandas as pd
    from safetensors.torch import load_file

    from automl.search import kept
    from automl.search.tune import SearchResult, node_id

    best_dir = result.best_dir if result is not None and result.best_dir else f"{experiment_path}/best"
    for p in rung0.models:
        tid = p.trial_id
        kept.keep(best_dir, tid, load_file(p.head_file), p.val_score, 0,
                  val=(p.val_proba, rung0.y_val) if rung0.y_val is not None else None)
    rows = pd.DataFrame(rung0.rows).assign(node=node_id())  # the driver fitted the heads
    col = f"best_val_{metric}"
    if result is None:
        best = rows[rows["trial_id"] == rung0.models[0].trial_id].iloc[0]
        config = {k[len("config/"):]: v for k, v in best.items() if k.startswith("config/") and not pd.isna(v)}
        result = SearchResult(trials=rows.iloc[0:0], best_config=config, best_epoch=0, best_score=float(best[col]),
                              metric=metric, experiment_path=experiment_path, history={},
                              best_trial_id=str(best["trial_id"]), best_dir=best_dir)
    trials = pd.concat([result.trials, rows], ignore_index=True)
    result.trials = trials.sort_values(col, ascending=False, na_position="last").reset_index(drop=True)
    result.rung0 = rung0
    return result
