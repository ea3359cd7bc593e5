"""Transferability pre-ranking: score candidate backbones with LogME before spending trials.

LogME (You et al., ICML 2021) is the log marginal evidence of a Bayesian linear
model on a backbone's frozen features: one forward pass per backbone, no
training. Higher means the features separate the labels better.
"""
from __future__ import annotations

import numpy as np

PRERANK_ROWS = 1000   # training rows LogME scores each backbone on
PRERANK_IMAGE = 64    # image side they are scored at when the space does not pin one


def _evidence(y: np.ndarray, f: np.ndarray, v: np.ndarray, s: np.ndarray, n: int, d: int) -> float:
    alpha, beta, eps = 1.0, 1.0, 1e-5
    lam = alpha / beta
    proj = v.T @ (f.T @ y)
    for _ in range(11):
        gamma = float((beta * s / (alpha + beta * s)).sum())
        m = v @ (proj * beta / (alpha + beta * s))
        alpha_de = float((m * m).sum())
        alpha = gamma / (alpha_de + eps)
        beta_de = float(((y - f @ m) ** 2).sum())
        beta = (n - gamma) / (beta_de + eps)
        new_lam = alpha / beta
        if abs(new_lam - lam) / lam < 0.01:
            break
        lam = new_lam
    ev = (d / 2.0 * np.log(alpha) + n / 2.0 * np.log(beta) - 0.5 * np.sum(np.log(alpha + beta * s))
          - beta / 2.0 * (beta_de + eps) - alpha / 2.0 * (alpha_de + eps) - n / 2.0 * np.log(2 * np.pi))
    return float(ev / n)


def logme(features: np.ndarray, y: np.ndarray) -> float:
    """LogME of (n x d) features for integer labels y (classification) or float targets (regression)."""
    f = np.asarray(features, dtype=np.float64)
    n, d = f.shape
    # Eigen-decomposition of F^T F (d x d): cheap when d is a few hundred.
    s, v = np.linalg.eigh(f.T @ f)
    s = np.clip(s, 0.0, None)
    if np.issubdtype(np.asarray(y).dtype, np.floating):
        t = (y - y.mean()) / (y.std() + 1e-12)
        return _evidence(t, f, v, s, n, d)
    return float(np.mean([_evidence((y == c).astype(np.float64), f, v, s, n, d) for c in np.unique(y)]))


def rank_backbones(candidates: list[str], data, config: dict, max_rows: int = PRERANK_ROWS, seed: int = 0) -> list[dict]:
    """LogME of each candidate on (a sample of) the training data, best first."""
    import torch

    from automl.data.trial_data import subset
    from automl.runtime import device
    from automl.training.featcache import body_features
    from automl.training.loop import build_encoder, build_model, encode_inputs, full_config

    rng = np.random.default_rng(seed)
    n = len(data.y_train)
    idx = np.sort(rng.choice(n, min(n, max_rows), replace=False))
    x = subset(data.x_train, idx)
    y = data.y_train[idx]
    out = []
    for name in candidates:
        cfg = full_config({**config, "backbone": name})
        torch.manual_seed(seed)
        model, spec = build_model(cfg, data.num_classes)
        enc = build_encoder(cfg, model, spec)
        feats = body_features(model.to(device()), enc, encode_inputs(enc, x), device()).numpy()
        out.append({"backbone": name, "logme": logme(feats, y)})
    return sorted(out, key=lambda r: r["logme"], reverse=True)


def spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    if len(a) < 2:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def prerank_space(space, data, mode, seed: int, config: dict | None = None):
    """LogME pre-ranking of the space's pretrained backbones: keep the better half, best first.

    Returns (space, report). mode 'auto' ranks when the space offers two or more
    pretrained backbones; True ranks any choice; a backbone whose weights cannot
    be loaded is dropped (better now than failing every trial). config: the
    hyperparameters features are taken with (default: the space's start point).
    """
    from automl import models
    from automl.errors import ModelLoadError

    spec = space.parameters.get("backbone", {})
    values = list(spec.get("values") or [])
    pretrained = [v for v in values if models.resolve(v).pretrained]
    if not mode or spec.get("type") != "choice" or (len(pretrained) < 2 and mode is not True):
        return space, None
    ranking, failed = [], []
    for v in values:
        try:
            ranking += rank_backbones([v], data, config or space.default_config(), seed=seed)
        except Exception as exc:  # weights that cannot load, or a model that cannot take these inputs
            failed.append({"backbone": v, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
    ranking.sort(key=lambda r: r["logme"], reverse=True)
    if not ranking:
        reasons = "; ".join(f"{f['backbone']}: {f['error']}" for f in failed)
        raise ModelLoadError(f"None of the space's {len(values)} backbones could be loaded ({reasons}). Fix: install "
                             "or point at their weights (README: Offline weights), or use a space with "
                             "efficientnet-lite0.")
    names = [r["backbone"] for r in ranking]
    keep = names[: max(1, -(-len(names) // 2))] if len(names) >= 3 else names
    # A start point whose backbone was dropped starts from the best-ranked one instead.
    new = space.with_backbones(keep)
    return new, {"ranking": ranking, "kept": keep, "failed": failed}


def agreement(report: dict | None, trials, metric: str) -> dict | None:
    """How well LogME's order matched the search's (best validation score per backbone)."""
    if not report or not report.get("ranking"):
        return report
    col = f"best_val_{metric}"
    best = trials.groupby("config/backbone")[col].max().to_dict() if "config/backbone" in trials else {}
    pairs = [(r["logme"], best[r["backbone"]]) for r in report["ranking"] if r["backbone"] in best]
    report = dict(report)
    report["search_best"] = {k: float(v) for k, v in best.items()}
    report["spearman_vs_search"] = spearman([a for a, _ in pairs], [b for _, b in pairs]) if len(pairs) >= 2 else None
    return report
