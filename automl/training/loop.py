"""Train one configuration: a plain function that runs without Ray.

Ray Tune (trials) and Ray Train (retrain) wrap `fit` at the edge through its
`report` callback and `wrap_model` hook; tests call it directly.
"""
from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from automl import models
from automl.data.encoders import ImageEncoder, TextEncoder, forward, predict_logits
from automl.data.trial_data import TrialData
from automl.metrics import classification_metrics
from automl.runtime import device as default_device
from automl.training import augment as aug
from automl.training import featcache, schedules
from automl.training.params import DEFAULTS

@dataclass
class FitResult:
    model: nn.Module
    encoder: Any
    history: list[dict] = field(default_factory=list)
    spec: models.BackboneSpec | None = None


def full_config(config: dict) -> dict:
    return {**DEFAULTS, **{k: v for k, v in config.items() if v is not None}}


def build_model(config: dict, num_classes: int, pretrained: bool | None = None):
    spec = models.resolve(config["backbone"])
    model = models.build(spec, num_classes, dropout=float(config["dropout"]),
                         drop_path=float(config["drop_path"]), pretrained=pretrained)
    return model, spec


def build_encoder(config: dict, model, spec) -> ImageEncoder | TextEncoder:
    return models.family(spec).encoder(model, spec, config)


_ENCODED: dict[tuple, list] = {}


def encode_inputs(encoder, x):
    """Token ids for texts (tokenised once per process for the same texts, tokenizer and length); images pass."""
    if isinstance(encoder, TextEncoder):
        # Keyed by content: a list that ray.get re-creates, or another fold's list, must not hit a stale entry.
        key = (encoder.tokenizer.name_or_path, encoder.max_length, hash(tuple(map(tuple, x))))
        if key not in _ENCODED:
            if len(_ENCODED) > 8:
                _ENCODED.clear()
            _ENCODED[key] = encoder.encode(x)
        return _ENCODED[key]
    return x


def n_trainable_groups(config: dict, n_body: int, epoch: int) -> int:
    """How many body groups (from the top) train at `epoch` (0-based)."""
    k = n_body if config["unfreeze"] in ("all", -1, None) else min(int(config["unfreeze"]), n_body)
    every = int(config.get("gradual_unfreeze_every") or 0)
    if every > 0 and k < n_body:
        k = min(n_body, k + epoch // every)
    return k


def set_trainable(model: nn.Module, groups: list[list[str]], k: int) -> None:
    """Train the head plus the top k body groups; keep frozen BatchNorm statistics fixed."""
    train_names = set(groups[-1])
    for g in groups[len(groups) - 1 - k: len(groups) - 1]:
        train_names.update(g)
    for n, p in model.named_parameters():
        p.requires_grad_(n in train_names)


def eval_frozen(model: nn.Module) -> None:
    """Put every fully frozen submodule in eval mode: a frozen part is a fixed feature extractor
    (BatchNorm statistics and dropout inside it stay off), which also makes its outputs cacheable."""
    for m in model.modules():
        params = list(m.parameters())
        if params and not any(p.requires_grad for p in params):
            m.eval()


def make_optimizer(model: nn.Module, groups: list[list[str]], config: dict) -> torch.optim.Optimizer:
    """One param group per (layer, decay/no-decay): layer-wise lr decay, no weight decay on norms/biases."""
    params = dict(model.named_parameters())
    n = len(groups)
    param_groups = []
    for i, names in enumerate(groups):
        scale = float(config["layer_decay"]) ** (n - 1 - i)
        decay = [params[x] for x in names if params[x].ndim > 1]
        no_decay = [params[x] for x in names if params[x].ndim <= 1]
        lr = float(config["lr"]) * scale
        if decay:
            param_groups.append({"params": decay, "lr": lr, "weight_decay": float(config["weight_decay"])})
        if no_decay:
            param_groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0})
    if config["optimizer"] == "sgd":
        return torch.optim.SGD(param_groups, lr=float(config["lr"]), momentum=float(config["momentum"]), nesterov=True)
    if config["optimizer"] == "adamw":
        return torch.optim.AdamW(param_groups, lr=float(config["lr"]))
    raise ValueError(f"Unknown optimizer {config['optimizer']!r}; expected 'adamw' or 'sgd'.")


@torch.no_grad()
def recalibrate_bn(model: nn.Module, encoder, x, idx: np.ndarray, device, batch_size: int, max_batches: int = 8) -> None:
    """Re-estimate trainable BatchNorm statistics on a few clean training batches ("precise BN").

    Running averages lag behind fast-changing weights, so a model evaluated
    after few steps looks like chance; that would mislead ASHA's early rungs.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and m.track_running_stats and any(p.requires_grad for p in m.parameters())]
    if not bns:
        return
    saved = [m.momentum for m in bns]
    was_training = model.training
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
        m.train()
    for b in range(min(max_batches, max(1, len(idx) // batch_size))):
        part = idx[b * batch_size:(b + 1) * batch_size]
        if len(part) > 1:
            forward(model, encoder, x, part, device)
    for m, mom in zip(bns, saved):
        m.momentum = mom
    model.train(was_training)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What changed during training: trainable parameters and all buffers (BN statistics)."""
    state = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    state.update({n: b.detach().cpu().clone() for n, b in model.named_buffers()})
    return state


def evaluate(model, encoder, x, y, num_classes: int, device, detailed: bool = False,
             target_scale: tuple[float, float] | None = None) -> dict:
    logits = predict_logits(model, encoder, x, device)
    if target_scale is not None:
        from automl.metrics import regression_metrics

        mean, std = target_scale
        pred = logits[:, 0].numpy() * std + mean
        out = regression_metrics(np.asarray(y, dtype=float), pred)
        out["loss"] = float(np.mean(((pred - np.asarray(y)) / std) ** 2))
        return out
    proba = torch.softmax(logits, 1).numpy()
    out = classification_metrics(np.asarray(y), proba, num_classes, detailed=detailed)
    out["loss"] = float(nn.functional.cross_entropy(logits, torch.as_tensor(np.asarray(y))).item())
    return out


def fit(config: dict, data: TrialData, *, epochs: int, schedule_epochs: int | None = None,
        report: Callable[[dict, Callable[[], dict]], None] | None = None, resume: dict | None = None,
        wrap_model: Callable[[nn.Module], nn.Module] | None = None, rank: int = 0, world_size: int = 1,
        device: torch.device | None = None, initial_state: dict | None = None) -> FitResult:
    """Train `config` for `epochs` epochs, evaluating on the validation set after each.

    schedule_epochs: the length the LR schedule is planned for (retrain stops a
    schedule planned for the search's max epochs at the winner's best epoch).
    report(metrics, state_fn): called after each epoch; state_fn() gives a
    checkpointable state. resume: such a state, to continue from.
    wrap_model / rank / world_size: hooks for data-parallel training.
    initial_state: weights to start from (a base model being updated).
    """
    config = full_config(config)
    seed = int(config["seed"]) + rank
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    random.seed(seed)
    device = device or default_device()

    model, spec = build_model(config, data.num_classes)
    if initial_state:
        model.load_state_dict(initial_state, strict=False)
    model.to(device)
    encoder = build_encoder(config, model, spec)
    x_train = encode_inputs(encoder, data.x_train)
    x_val = encode_inputs(encoder, data.x_val) if data.x_val is not None else None

    groups = models.family(model).layer_groups(model)
    n_body = len(groups) - 1
    optimizer = make_optimizer(model, groups, config)
    n = len(data.y_train)
    shard = np.arange(rank, n, world_size)
    bs = int(config["batch_size"])
    # Small data: an "epoch" (one report, one ASHA step) is several passes over it (space.epoch_passes).
    passes = max(1, int(config["epoch_passes"]))
    regression = data.task == "regression"
    use_mix = data.modality == "image" and config["mix"] != "none" and not regression
    per_epoch = len(shard) * passes
    steps_per_epoch = max(1, (per_epoch // bs) if use_mix and per_epoch >= bs else math.ceil(per_epoch / bs))
    total_steps = steps_per_epoch * int(schedule_epochs or epochs)
    scheduler = schedules.create(config["schedule"], optimizer, total_steps, float(config["warmup_frac"]), config)

    if data.modality == "image":
        augment_fn = aug.image_transform(config["augment"], int(config["image_size"]))
    else:
        augment_fn = aug.text_transform(config["text_augment"], float(config["text_aug_rate"]),
                                        getattr(encoder.tokenizer, "mask_token_id", None))
    mixup = None
    if use_mix:
        from timm.data import Mixup

        alpha = float(config["mix_alpha"])
        mixup = Mixup(mixup_alpha=alpha if config["mix"] == "mixup" else 0.0,
                      cutmix_alpha=alpha if config["mix"] == "cutmix" else 0.0,
                      label_smoothing=float(config["label_smoothing"]), num_classes=data.num_classes)
    weights = None
    if config["class_weighted"] and data.class_weights is not None:
        weights = torch.as_tensor(data.class_weights, dtype=torch.float32, device=device)
    if regression:
        mean, std = data.target_scale or (0.0, 1.0)
        mse = nn.MSELoss()
        ce = lambda out, target: mse(out[:, 0], (target - mean) / std)  # noqa: E731
    else:
        ce = nn.CrossEntropyLoss(weight=weights, label_smoothing=float(config["label_smoothing"]))
    l2sp = float(config["l2sp"])
    head = set(groups[-1])
    anchor = {nme: p.detach().clone() for nme, p in model.named_parameters() if nme not in head} if l2sp > 0 else {}

    start_epoch, history = 0, []
    if resume:
        set_trainable(model, groups, int(resume["trainable_k"]))
        model.load_state_dict(resume["model"], strict=False)
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        start_epoch, history = int(resume["epoch"]), list(resume.get("history", []))

    y_train = torch.as_tensor(data.y_train, dtype=torch.float32 if regression else torch.long)
    # Frozen-feature caching: the trainable top trains on frozen activations computed once (featcache.py).
    run_model, run_encoder = model, encoder
    first_k = n_trainable_groups(config, n_body, start_epoch)
    cache_use = "off"
    if data.cache_dir is not None:
        set_trainable(model, groups, first_k)
        split = featcache.plan(config, model, encoder, first_k, x_train, device)
        if split is not None:
            hits = featcache.STATS["hits"]
            run_model, run_encoder = split.top(), featcache.FeatureInputs()
            x_train = featcache.cached_features(split, encoder, x_train, device, data.cache_dir,
                                                featcache.cache_key(config, spec, data.x_train, split))
            if x_val is not None:
                x_val = featcache.cached_features(split, encoder, x_val, device, data.cache_dir,
                                                  featcache.cache_key(config, spec, data.x_val, split))
            cache_use = f"{split.tag}:{'hit' if featcache.STATS['hits'] > hits else 'computed'}"
    fwd_model = model
    current_k = -1
    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        # Per-epoch seeds: a run resumed from a checkpoint shuffles and augments exactly as the original.
        rng = np.random.default_rng([seed, epoch])
        torch.manual_seed(seed * 100003 + epoch)
        random.seed(seed * 100003 + epoch)
        k = n_trainable_groups(config, n_body, epoch)
        if k != current_k:
            set_trainable(model, groups, k)
            current_k = k
            # DDP registers the parameters that need gradients when it wraps, so re-wrap on change.
            fwd_model = wrap_model(run_model) if wrap_model else run_model
        fwd_model.train()
        eval_frozen(model)
        order = np.concatenate([shard[rng.permutation(len(shard))] for _ in range(passes)])
        total_loss, seen = 0.0, 0
        for step in range(steps_per_epoch):
            idx = order[step * bs:(step + 1) * bs]
            if len(idx) == 0:
                continue
            target = y_train[idx].to(device)
            if mixup is not None and len(idx) % 2 == 0:
                xb = run_encoder.batch(x_train, idx, augment_fn).to(device)
                xb, soft = mixup(xb, target)
                loss = torch.sum(-soft * torch.log_softmax(fwd_model(xb), dim=-1), dim=-1).mean()
            else:
                loss = ce(forward(fwd_model, run_encoder, x_train, idx, device, augment_fn), target)
            if anchor:
                loss = loss + l2sp * sum(((p - anchor[nme]) ** 2).sum() for nme, p in model.named_parameters()
                                         if p.requires_grad and nme in anchor)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if float(config["grad_clip"]) > 0:
                nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], float(config["grad_clip"]))
            optimizer.step()
            scheduler.step()
            total_loss += float(loss.detach()) * len(idx)
            seen += len(idx)
        metrics = {"epoch": epoch + 1, "train_loss": total_loss / max(seen, 1), "steps": steps_per_epoch * (epoch + 1),
                   "lr": optimizer.param_groups[-1]["lr"], "trainable_groups": k, "n_groups": n_body,
                   "epoch_time_s": time.perf_counter() - t0, "feature_cache": cache_use}
        recalibrate_bn(run_model, run_encoder, x_train, order, device, bs)
        if x_val is not None and data.y_val is not None and len(data.y_val):
            val = evaluate(run_model, run_encoder, x_val, data.y_val, data.num_classes, device,
                           target_scale=(data.target_scale or (0.0, 1.0)) if regression else None)
            metrics.update({f"val_{kk}": v for kk, v in val.items()})
        history.append(metrics)
        if report is not None:
            epoch_now = epoch + 1

            def state_fn(epoch_now=epoch_now, k=k):
                return {"model": trainable_state(model), "optimizer": copy.deepcopy(optimizer.state_dict()),
                        "scheduler": scheduler.state_dict(), "epoch": epoch_now, "trainable_k": k,
                        "history": list(history)}

            report(metrics, state_fn)
    model.eval()
    return FitResult(model=model, encoder=encoder, history=history, spec=spec)
