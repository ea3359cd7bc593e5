"""After the search: the winner alone, a greedy soup, or a greedy ensemble of the top trials, whichever scores
best on validation (ties go to the simpler model).

Greedy soup (Wortsman et al., ICML 2022): average the weights of fine-tuned models of one architecture, adding
one only if the average scores better on validation. Its ingredients are the winner's own best few reports
(snapshots of one run, as AutoGluon MultiModal soups its top checkpoints) and the best weights of the other top
trials that share the winner's architecture. Greedy ensemble (Caruana et al., 2004): average the probabilities
of models, adding one only if validation improves; at most three members.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from automl.data.encoders import predict_logits
from automl.metrics import classification_metrics
from automl.runtime import device
from automl.search import kept
from automl.training.loop import build_encoder, encode_inputs, full_config, load_best

MAX_MEMBERS = 3


@dataclass
class Member:
    trial_id: str
    config: dict
    val_score: float                 # the trial's own best validation score
    model: torch.nn.Module = None
    encoder: object = None
    spec: object = None
    proba: np.ndarray | None = None  # validation probabilities

    @property
    def key(self) -> tuple:
        """What must match for weights to be averaged: architecture and input preprocessing."""
        return (str(self.config["backbone"]), self.config.get("image_size"), self.config.get("max_length"))


@dataclass
class Combined:
    kind: str                        # "single", "soup" or "ensemble"
    model: torch.nn.Module
    encoder: object
    spec: object
    config: dict
    val_score: float
    trial_ids: list[str] = field(default_factory=list)
    scores: dict = field(default_factory=dict)   # validation score of each option considered
    members: list[Member] = field(default_factory=list)   # the ensemble's members


def top_trials(trials, best_dir: str | None, metric: str, k: int = 5) -> list[tuple[str, dict, float]]:
    """(trial id, config, best val score) of the best `k` trials whose best weights were kept."""
    if not best_dir:
        return []
    col = f"best_val_{metric}"
    out = []
    for _, row in trials.dropna(subset=[col]).sort_values(col, ascending=False).iterrows():
        if kept.best_file(best_dir, str(row["trial_id"])):
            cfg = {c[len("config/"):]: v for c, v in row.items() if c.startswith("config/")
                   and not (isinstance(v, float) and np.isnan(v))}
            out.append((str(row["trial_id"]), cfg, float(row[col])))
        if len(out) == k:
            break
    return out


def _score(y: np.ndarray, proba: np.ndarray, metric: str, num_classes: int) -> float:
    return float(classification_metrics(y, proba, num_classes)[metric])


def _proba(model, encoder, x) -> np.ndarray:
    return torch.softmax(predict_logits(model, encoder, encode_inputs(encoder, x), device()), 1).numpy()


def combine(top: list[tuple[str, dict, float]], best_dir: str, num_classes: int, y_val: np.ndarray,
            metric: str, inputs_for) -> Combined:  # noqa: C901  (three greedy passes, read top to bottom)
    """Pick the best of the winner, a soup and an ensemble on the validation split.

    inputs_for(config) gives the validation inputs for a member's preprocessing (image size)."""
    from automl.models.ensemble import EnsembleClassifier

    members = []
    for tid, cfg, score in top:
        cfg = full_config(cfg)
        model, spec = load_best(cfg, num_classes, kept.best_file(best_dir, tid))
        enc = build_encoder(cfg, model, spec)
        m = Member(tid, cfg, score, model, enc, spec)
        m.proba = _proba(model, enc, inputs_for(cfg))
        members.append(m)
    best = members[0]
    single = _score(y_val, best.proba, metric, num_classes)
    result = Combined("single", best.model, best.encoder, best.spec, best.config, single, [best.trial_id])
    scores = {"single": single}

    # Greedy soup: the winner's other kept reports, then the other top trials of the same architecture.
    def state_of(weights_file: str) -> dict:
        m, _ = load_best(best.config, num_classes, weights_file)
        return {k: v.detach().cpu() for k, v in m.state_dict().items()}

    ingredients = [(f"{best.trial_id}@{Path(f).stem.rsplit('.r', 1)[-1]}", f)
                   for f in kept.snapshot_files(best_dir, best.trial_id)[1:]]
    ingredients += [(m.trial_id, kept.best_file(best_dir, m.trial_id)) for m in members[1:] if m.key == best.key]
    soup_ids, soup_score, soup_model, tried = [best.trial_id], single, None, 0
    states = [{k: v.detach().cpu().clone() for k, v in best.model.state_dict().items()}]
    for name, weights in ingredients:
        candidate_states = states + [state_of(weights)]
        avg = {k: (sum(s[k].float() for s in candidate_states) / len(candidate_states)).to(v.dtype)
               for k, v in states[0].items()}
        candidate, _ = load_best(best.config, num_classes, kept.best_file(best_dir, best.trial_id))
        candidate.load_state_dict(avg)
        s = _score(y_val, _proba(candidate.eval(), best.encoder, inputs_for(best.config)), metric, num_classes)
        tried += 1
        if s > soup_score:
            soup_ids, soup_score, soup_model, states = soup_ids + [name], s, candidate, candidate_states
    if tried:
        scores["soup"] = soup_score
        if soup_model is not None and soup_score > result.val_score:
            result = Combined("soup", soup_model, best.encoder, best.spec, best.config, soup_score, soup_ids)

    # Greedy ensemble of probabilities (one tokenizer for text: members share the winner's backbone).
    chosen = [best]
    for m in members[1:]:
        if len(chosen) == MAX_MEMBERS or (best.config.get("max_length") and m.key != best.key):
            continue
        s = _score(y_val, np.mean([c.proba for c in chosen + [m]], axis=0), metric, num_classes)
        if s > _score(y_val, np.mean([c.proba for c in chosen], axis=0), metric, num_classes):
            chosen.append(m)
    if len(chosen) > 1:
        ens_score = _score(y_val, np.mean([c.proba for c in chosen], axis=0), metric, num_classes)
        scores["ensemble"] = ens_score
        if ens_score > result.val_score:
            model = EnsembleClassifier([c.model for c in chosen], [c.encoder.to_dict() for c in chosen]).eval()
            result = Combined("ensemble", model, best.encoder, best.spec, best.config, ens_score,
                              [c.trial_id for c in chosen], members=chosen)
    result.scores = scores
    return result
