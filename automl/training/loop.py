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

from automl import modalities, models
from automl.data.encoders import ImageEncoder, TextEncoder, forward, predict_logits, row_lengths
from automl.data.trial_data import TrialData, subset
from automl.metrics import classification_metrics
from automl.runtime import amp_dtype, autocast, cpu_bf16, first_pass_is_slow
from automl.runtime import device as default_device
from automl.training import featcache, schedules
from automl.training.margins import Margins
from automl.training.params import DEFAULTS

@dataclass
class FitResult:
    model: nn.Module
    encoder: Any
    history: list[dict] = field(default_factory=list)
    spec: models.BackboneSpec | None = None
    margins: Margins | None = None   # each training row's margin over the run (classification)


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
    """Token ids for texts (tokenised once, on disk for a `Rows` handle, per process otherwise); images pass."""
    if isinstance(encoder, TextEncoder) and hasattr(getattr(x, "store", None), "ids"):
        ids = x.store.ids(encoder)
        return [ids[i] for i in x.idx]
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
        momentum = float(config["momentum"])  # Nesterov needs a momentum: plain SGD at 0
        return torch.optim.SGD(param_groups, lr=float(config["lr"]), momentum=momentum, nesterov=momentum > 0)
    if config["optimizer"] == "adamw":
        return torch.optim.AdamW(param_groups, lr=float(config["lr"]))
    raise ValueError(f"Unknown optimizer {config['optimizer']!r}; expected 'adamw' or 'sgd'.")


@torch.no_grad()
def recalibrate_bn(model: nn.Module, encoder, x, idx: np.ndarray, device, batch_size: int,
                   max_batches: int = 8) -> None:
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
    saved = model.state_dict()  # persistent buffers only (transformers keep position ids as non-persistent ones)
    state.update({n: b.detach().cpu().clone() for n, b in model.named_buffers() if n in saved})
    return state


def evaluate(model, encoder, x, y, num_classes: int, device, detailed: bool = False,
             target_scale: tuple[float, float] | None = None, keep_scores: bool = False) -> dict:
    """Metrics of `model` on (x, y); keep_scores adds "scores" (probabilities, or predictions for regression)."""
    logits = predict_logits(model, encoder, x, device)
    if target_scale is not None:
        from automl.metrics import regression_metrics

        mean, std = target_scale
        pred = logits[:, 0].numpy() * std + mean
        out = regression_metrics(np.asarray(y, dtype=float), pred)
        out["loss"] = float(np.mean(((pred - np.asarray(y)) / std) ** 2))
        scores = pred
    else:
        scores = torch.softmax(logits, 1).numpy()
        out = classification_metrics(np.asarray(y), scores, num_classes, detailed=detailed)
        out["loss"] = float(nn.functional.cross_entropy(logits, torch.tensor(np.asarray(y))).item())
    if keep_scores:
        out["scores"] = scores
    return out


class Batches:
    """Optimizer steps draw consecutive batches from a stream of shuffled passes over `shard`.

    A report ("epoch" in the metrics) is a fixed number of steps, not a pass: small data gets several passes per
    report and large data several reports per pass, so trials are judged after the same amount of training
    whatever the data size. Pass j is shuffled with (seed, j): a resumed run draws exactly the same batches.
    """

    GROUP = 8  # batches whose rows are sorted by length together (where rows have lengths)

    def __init__(self, shard: np.ndarray, batch_size: int, seed: int, lengths: np.ndarray | None = None):
        self.shard, self.bs, self.seed = shard, max(1, batch_size), seed
        self.lengths = None if lengths is None else np.asarray(lengths)
        self._pass, self._perm = -1, shard

    def _permutation(self, j: int) -> np.ndarray:
        if j != self._pass:
            rng = np.random.default_rng([self.seed, j])
            perm = self.shard[rng.permutation(len(self.shard))]
            self._pass, self._perm = j, perm if self.lengths is None else self._grouped(perm, j, rng)
        return self._perm

    def _grouped(self, perm: np.ndarray, j: int, rng) -> np.ndarray:
        """Pass j's rows with each batch cut from rows of similar length: every GROUP batches' worth of shuffled
        rows is sorted by length and cut into batches, and the batches are shuffled (so any step is a random
        batch, as a speed probe's few steps assume). A batch pads to its longest row: random batches of short
        texts padded to 2.7x their tokens, grouped ones to 1.2x, and a MiniLM step in `fit` took 0.75 s instead of
        1.35 (fortunes, 2 cores, 2026-12-05); transformers' `group_by_length` does the same."""
        head = (-j * len(self.shard)) % self.bs  # rows that complete the batch the previous pass began
        body = perm[head:]
        full = len(body) // self.bs * self.bs
        span = self.GROUP * self.bs
        batches = []
        for s in range(0, full, span):
            part = body[s:min(s + span, full)]
            part = part[np.argsort(self.lengths[part], kind="stable")]
            batches += [part[b:b + self.bs] for b in range(0, len(part), self.bs)]
        order = rng.permutation(len(batches))
        return np.concatenate([perm[:head], *(batches[i] for i in order), body[full:]]).astype(perm.dtype)

    def __call__(self, step: int) -> np.ndarray:
        n, out, pos = len(self.shard), [], step * self.bs
        while len(out) < self.bs:
            j, off = divmod(pos + len(out), n)
            out.extend(self._permutation(j)[off:off + self.bs - len(out)])
        return np.asarray(out)


def shard_of(n: int, rank: int, world_size: int) -> np.ndarray:
    """Rank `rank`'s rows: every rank gets the same number (wrapping around, as DistributedSampler pads), so all
    ranks take the same number of steps and no collective waits for a rank that has finished."""
    per_rank = math.ceil(n / world_size)
    return (np.arange(per_rank) * world_size + rank) % n


def steps_per_report(config: dict, shard_len: int, batch_size: int, world_size: int = 1) -> int:
    """Optimizer steps between two reports: the plan's rows per report (`report_rows`, the same for every batch
    size, so trials are compared after seeing the same data), or one pass over the shard when none is set."""
    rows = int(config.get("report_rows") or 0)
    if rows:
        return max(1, math.ceil(rows / world_size / batch_size))
    return max(1, math.ceil(shard_len / batch_size))


@dataclass
class _Setup:
    """Everything one run of `config` trains with (built once; fit and the plan's speed probe share it)."""

    config: dict
    model: nn.Module
    spec: Any
    encoder: Any
    groups: list
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loss: Callable
    augment: Callable | None
    mixup: Any
    anchor: dict
    x_train: Any
    x_val: Any
    y_train: torch.Tensor
    batches: Batches
    steps_per_report: int
    device: torch.device
    scaler: Any = None       # fp16 on a GPU without bf16: scales the loss so small gradients survive
    build_s: float = 0.0     # seconds to build the model and its encoder (what loading a kept trial costs)
    cpu_amp: bool = False    # bf16 autocast in training steps on a CPU (the modality gains and the CPU has AMX)
    margins: Margins | None = None  # classification: each row's margin at the steps that train on it

    def step(self, fwd_model: nn.Module, run_encoder, step: int, advance: int = 1) -> float:
        """One optimizer step on batch number `step` (mixed precision on a GPU), moving the LR schedule on by
        `advance` steps (more than one when a deadline compresses the schedule); returns the batch loss."""
        idx = self.batches(step)
        target = self.y_train[idx].to(self.device, non_blocking=True)
        if self.mixup is not None and len(idx) % 2 == 0:
            xb = run_encoder.batch(self.x_train, idx, self.augment, device=self.device)
            xb, soft = self.mixup(xb, target)
            with autocast(self.device, cpu=self.cpu_amp):
                logits = fwd_model(xb)
            loss = torch.sum(-soft * torch.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        else:
            logits = forward(fwd_model, run_encoder, self.x_train, idx, self.device, self.augment, self.cpu_amp)
            loss = self.loss(logits.float(), target)
            if self.margins is not None:  # mixed batches have no one label per row: not counted
                self.margins.add(idx, logits, target)
        if self.anchor:
            l2sp = float(self.config["l2sp"])
            loss = loss + l2sp * sum(((p - self.anchor[nme]) ** 2).sum() for nme, p in self.model.named_parameters()
                                     if p.requires_grad and nme in self.anchor)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if float(self.config["grad_clip"]) > 0:
            nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                     float(self.config["grad_clip"]))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        for _ in range(advance):
            self.scheduler.step()
        return float(loss.detach())


def _setup(config: dict, data: TrialData, *, reports: int, device, rank: int = 0, world_size: int = 1,
           initial_state: dict | None = None) -> _Setup:
    seed = int(config["seed"]) + rank
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    random.seed(seed)
    t_build = time.perf_counter()
    model, spec = build_model(config, data.num_classes)
    if initial_state:
        model.load_state_dict(initial_state, strict=False)
    model.to(device)
    adapter = modalities.get(data.modality)
    if adapter.channels_last:
        model.to(memory_format=torch.channels_last)  # matches the batches (ImageEncoder.batch), on any device
    encoder = build_encoder(config, model, spec)
    build_s = time.perf_counter() - t_build
    groups = models.family(model).layer_groups(model)
    # Data parallel: the global batch is the config's batch size, so the searched LR still fits it; when the
    # workers do not divide it, the LR follows the global batch they make (linear scaling).
    local_bs = max(1, int(config["batch_size"]) // world_size)
    if local_bs * world_size != int(config["batch_size"]):
        config = {**config, "lr": float(config["lr"]) * local_bs * world_size / int(config["batch_size"])}
    optimizer = make_optimizer(model, groups, config)
    shard = shard_of(len(data.y_train), rank, world_size)
    per_report = steps_per_report(config, len(shard), local_bs, world_size)
    scheduler = schedules.create(config["schedule"], optimizer, per_report * reports, float(config["warmup_frac"]),
                                 config)
    regression = data.task == "regression"
    augment_fn = adapter.augment(config, encoder)
    mixup = None if regression else adapter.mixup(config, data.num_classes)
    if regression:
        mean, std = data.target_scale or (0.0, 1.0)
        mse = nn.MSELoss()
        loss = lambda out, target: mse(out[:, 0], (target - mean) / std)  # noqa: E731
    else:
        weights = None
        if config["class_weighted"] and data.class_weights is not None:
            weights = torch.tensor(np.asarray(data.class_weights), dtype=torch.float32, device=device)
        loss = nn.CrossEntropyLoss(weight=weights, label_smoothing=float(config["label_smoothing"]))
    head = set(groups[-1])
    anchor = ({n: p.detach().clone() for n, p in model.named_parameters() if n not in head}
              if float(config["l2sp"]) > 0 else {})
    x_train = encode_inputs(encoder, data.x_train)
    x_val = encode_inputs(encoder, data.x_val) if data.x_val is not None else None
    # A copy: a trial's labels come read-only from Ray's object store, where torch warned of undefined behaviour.
    y_train = torch.tensor(np.asarray(data.y_train), dtype=torch.float32 if regression else torch.long)
    lengths = row_lengths(x_train) if config["length_grouped"] else None
    scaler = torch.amp.GradScaler("cuda") if amp_dtype(device) == torch.float16 else None
    cpu_amp = device.type == "cpu" and adapter.cpu_bf16 and bool(config["cpu_bf16"]) and cpu_bf16()
    return _Setup(config, model, spec, encoder, groups, optimizer, scheduler, loss, augment_fn, mixup, anchor,
                  x_train, x_val, y_train, Batches(shard, local_bs, seed, lengths), per_report, device, scaler,
                  build_s, cpu_amp, None if regression else Margins(len(data.y_train)))


class Pace:
    """Steps per report, and how far each step moves the LR schedule, for a run that must end by a deadline.

    Without a deadline (or while the reports left fit before it) every report trains the planned steps and each
    step moves the schedule one step. When the measured pace says the reports left would overrun, the steps per
    report shrink to what fits and each step moves the schedule on by the ratio, so the schedule (warm-up, decay)
    still ends at the last report. Same reports: ASHA's rungs and the trial's length in reports do not change.
    With `max_per_report` (a run allowed to grow, e.g. the start point training alone), a run ahead of its plan
    stretches the other way, up to that many steps per report, each step moving the schedule on by less than one:
    the time a probe over-estimated is trained, not left unused.
    """

    MARGIN = 0.95        # aim to end within this share of the time left before the deadline (re-aimed each report)

    STRETCH = 1.1        # grow only when the reports left could train at least this much longer

    def __init__(self, per_report: int, reports: int, done: int, deadline: float | None, state: dict | None = None,
                 max_per_report: int | None = None):
        self.reports, self.deadline, self.end = reports, deadline, per_report * reports  # the schedule's last step
        self.max_per_report = max_per_report or per_report
        self.per_report, self.step, self.position, self.ratio, self.carry = per_report, done * per_report, \
            done * per_report, 1.0, 0.0
        self.compressed = self.stretched = 0
        if state:  # a resumed run continues at the pace it had
            for k in ("per_report", "step", "position", "ratio", "carry", "compressed", "stretched"):
                setattr(self, k, type(getattr(self, k))(state.get(k, getattr(self, k))))
        if deadline is not None and time.time() >= deadline:
            self.deadline = None  # a deadline already past when the run (re)starts is stale: ignore it

    def advance(self) -> int:
        """Schedule steps for the next optimizer step (`ratio` on average; never past the schedule's end)."""
        self.carry += self.ratio
        n = min(int(self.carry), self.end - self.position)
        self.carry -= int(self.carry)
        self.position += n
        return n

    def _pace(self, per: int, left: int) -> None:
        if per < self.per_report:
            self.compressed += 1
        else:
            self.stretched += 1
        self.per_report = per
        self.ratio, self.carry = (self.end - self.position) / (per * left), 0.0

    def observe(self, step_s: float, eval_s: float, reports_done: int) -> None:
        """After a report: if the reports left at this pace would overrun the deadline, compress the rest."""
        left = self.reports - reports_done
        if self.deadline is None or left <= 0:
            return
        time_left = self.MARGIN * (self.deadline - time.time()) - left * eval_s
        fits = int(time_left / max(step_s, 1e-9) / left)
        if left * self.per_report * step_s <= time_left:
            if self.max_per_report > self.per_report and fits >= self.STRETCH * self.per_report:
                self._pace(min(self.max_per_report, fits), left)  # ahead of plan: train the time it has
            return
        per = max(1, fits)
        if per < self.per_report:
            self._pace(per, left)

    def state(self) -> dict:
        return {"per_report": self.per_report, "step": self.step, "position": self.position, "ratio": self.ratio,
                "carry": self.carry, "compressed": self.compressed, "stretched": self.stretched}


def _resumed(s, resume: dict) -> tuple[int, list]:
    """Restore a checkpointed state into a set-up run; (the reports done, their history)."""
    set_trainable(s.model, s.groups, int(resume["trainable_k"]))
    s.model.load_state_dict(resume["model"], strict=False)
    s.optimizer.load_state_dict(resume["optimizer"])
    s.scheduler.load_state_dict(resume["scheduler"])
    if s.margins is not None:
        s.margins.load(resume.get("margins"))
    return int(resume["epoch"]), list(resume.get("history", []))


def _on_cached_features(config: dict, data: TrialData, s, start_epoch: int, device):
    """Frozen-feature caching (featcache.py): the trainable top trains on frozen activations computed once.
    (model run, its encoder, validation inputs, cache use, where a hit came from); the full model where the
    frozen prefix is not worth caching (s.x_train is replaced by the cached features where it is)."""
    model, groups = s.model, s.groups
    if data.cache_dir is None:
        return model, s.encoder, s.x_val, "off", ""
    k = n_trainable_groups(config, len(groups) - 1, start_epoch)
    set_trainable(model, groups, k)
    split = featcache.plan(config, model, s.encoder, k, s.x_train, device)
    if split is None:
        return model, s.encoder, s.x_val, "off", ""
    hits = featcache.STATS["hits"]
    s.x_train = featcache.cached_features(split, s.encoder, s.x_train, device, data.cache_dir,
                                          featcache.cache_key(config, s.spec, data.x_train, split))
    x_val = s.x_val
    if x_val is not None:
        x_val = featcache.cached_features(split, s.encoder, x_val, device, data.cache_dir,
                                          featcache.cache_key(config, s.spec, data.x_val, split))
    hit = featcache.STATS["hits"] > hits
    return (split.top(), featcache.FeatureInputs(), x_val, f"{split.tag}:hit" if hit else f"{split.tag}:computed",
            featcache.STATS["from"] if hit else "")


def fit(config: dict, data: TrialData, *, epochs: int, schedule_epochs: int | None = None,
        report: Callable[[dict, Callable[..., dict]], None] | None = None, resume: dict | None = None,
        wrap_model: Callable[[nn.Module], nn.Module] | None = None, rank: int = 0, world_size: int = 1,
        device: torch.device | None = None, initial_state: dict | None = None,
        deadline: float | None = None, max_report_rows: int | None = None) -> FitResult:
    """Train `config` for `epochs` reports of `steps_per_report` optimizer steps each (one pass over the data when
    the config sets none), evaluating on the validation set after each.

    schedule_epochs: the number of reports the LR schedule is planned for (default: epochs).
    report(metrics, state_fn): called after each report; state_fn() gives a checkpointable state,
    state_fn(weights_only=True) just the trained weights. resume: such a state, to continue from.
    wrap_model / rank / world_size: hooks for data-parallel training (ranks get equal shards of the data
    and batch_size / world_size rows per step). initial_state: weights to start from (a base model).
    deadline: a wall-clock time (time.time()) the run must end by: when the reports left would not fit, the rest
    of the schedule is compressed into fewer steps per report (`Pace`), so the run ends its schedule in time
    instead of being cut mid-schedule with its learning rate still high. max_report_rows: with a deadline, a run
    ahead of its plan may grow to this many rows per report (schedule stretched to match), to use its time.
    """
    config = full_config(config)
    device = device or default_device()
    s = _setup(config, data, reports=int(schedule_epochs or epochs), device=device, rank=rank, world_size=world_size,
               initial_state=initial_state)
    model, groups = s.model, s.groups
    n_body = len(groups) - 1
    regression = data.task == "regression"
    start_epoch, history = _resumed(s, resume) if resume else (0, [])
    stretch = steps_per_report({"report_rows": max_report_rows}, 0, s.batches.bs, world_size) if max_report_rows \
        else None
    pace = Pace(s.steps_per_report, epochs, start_epoch, deadline, resume.get("pace") if resume else None,
                max_per_report=stretch)

    run_model, run_encoder, x_val, cache_use, cache_from = _on_cached_features(config, data, s, start_epoch, device)
    fwd_model, current_k, seed = model, -1, int(config["seed"]) + rank
    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        # Per-report seeds: a run resumed from a checkpoint augments exactly as the original.
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
        first, per = pace.step, pace.per_report
        losses = [s.step(fwd_model, run_encoder, step, pace.advance()) for step in range(first, first + per)]
        pace.step += per
        train_s = time.perf_counter() - t0
        seen = np.concatenate([s.batches(step) for step in range(max(first, pace.step - 8), pace.step)])
        recalibrate_bn(run_model, run_encoder, s.x_train, seen, device, s.batches.bs, max_batches=min(8, max(2, per)))
        metrics = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "steps": pace.step,
                   "epochs_seen": pace.step * s.batches.bs / len(s.batches.shard),
                   "lr": s.optimizer.param_groups[-1]["lr"], "trainable_groups": k, "n_groups": n_body,
                   "epoch_time_s": train_s, "feature_cache": cache_use, "feature_cache_from": cache_from}
        val_proba = None
        if x_val is not None and data.y_val is not None and len(data.y_val):
            val = evaluate(run_model, run_encoder, x_val, data.y_val, data.num_classes, device,
                           target_scale=(data.target_scale or (0.0, 1.0)) if regression else None,
                           keep_scores=not regression)
            val_proba = val.pop("scores", None)
            metrics.update({f"val_{kk}": v for kk, v in val.items()})
        metrics["report_time_s"] = time.perf_counter() - t0
        pace.observe(train_s / per, metrics["report_time_s"] - train_s, epoch + 1)
        if pace.compressed:
            metrics["schedule_compressed"] = pace.compressed
        if pace.stretched:
            metrics["schedule_stretched"] = pace.stretched
        history.append(metrics)
        if report is not None:
            def state_fn(weights_only: bool = False, epoch_now=epoch + 1, k=k, val_proba=val_proba):
                if weights_only:  # with the validation pass that scored them (kept for the final choice)
                    return {"model": trainable_state(model),
                            "val": None if val_proba is None else (val_proba, np.asarray(data.y_val)),
                            "margins": s.margins}
                return {"model": trainable_state(model), "optimizer": copy.deepcopy(s.optimizer.state_dict()),
                        "scheduler": s.scheduler.state_dict(), "epoch": epoch_now, "trainable_k": k,
                        "history": list(history), "pace": pace.state(),
                        "margins": s.margins.state() if s.margins is not None else None}

            report(metrics, state_fn)
    model.eval()
    return FitResult(model=model, encoder=s.encoder, history=history, spec=s.spec, margins=s.margins)


def load_best(config: dict, num_classes: int, weights: str | None):
    """A trial's model with its best weights (trained parameters and buffers over the backbone's own start)."""
    from safetensors.torch import load_file

    if weights is None:
        raise RuntimeError("The search kept no weights for its best trial (results on remote storage, or the trial "
                           "was lost). Fix: give the run time for a retrain, or use a local/shared storage_path.")
    config = full_config(config)
    model, spec = build_model(config, num_classes)
    missing = set(load_file(weights)) - set(model.state_dict())
    if missing:
        raise RuntimeError(f"Best weights {weights!r} do not fit the winner's architecture: {sorted(missing)[:5]}.")
    model.load_state_dict(load_file(weights), strict=False)
    return model.eval(), spec


def measure_speed(config: dict, data: TrialData, *, steps: int = 4, device: torch.device | None = None,
                  threads: tuple[int, ...] = (1,), window_s: float | None = None, train_sample=None) -> dict:
    """Time `config`: model set-up, one optimizer step (after a warm-up step; the mean of up to `steps`, fewer once
    `window_s` (default TIMED_WINDOW_S) is filled) with each of `threads` CPU threads, and one validation row (with
    the first).

    The plan scales these to choose trial lengths; it runs the real training step, so augmentation, unfreezing
    depth and the batch size all count. Returns setup_s, step_s (first thread count), eval_row_s, batch_size,
    step_s_<n> for every thread count n, and warmup_s: what a process's first model of this kind pays once.

    train_sample: inputs like the training rows (a random sample of them), where data holds only a few: a step
    on rows with lengths (text) costs in proportion to its batch's padded tokens, so the timed steps are scaled
    from the probe's batches to what batches of the sample pad to (`padded_ratio`).
    """
    config = full_config(config)
    device = device or default_device()
    before = torch.get_num_threads()
    try:
        window_s = TIMED_WINDOW_S if window_s is None else window_s
        first = _time_once(config, data, steps, device, threads, window_s, warm_up=device.type not in _TIMED_ON,
                           train_sample=train_sample)
        _TIMED_ON.add(device.type)  # only once a model was timed: a start backbone that cannot load paid nothing
        if not first_pass_is_slow(device):
            return first
        # On a GPU every new model pays one-off costs (kernel loading and selection, lazy imports) in its set-up,
        # its first steps and its first validation pass: on an H200 they priced a MiniLM step at 1.13 s (0.05 s
        # warm) and a Lite0 trial's set-up at 9 s (2026-12-04). A trial actor pays them once (Tune reuses it), so
        # the plan charges them once, and every trial what the process pays when warm.
        warm = _time_once(config, data, steps, device, threads, window_s, train_sample=train_sample)
        return {**warm, "warmup_s": max(0.0, first["wall_s"] - warm["wall_s"])}
    finally:
        torch.set_num_threads(before)


TIMED_WINDOW_S = 2.5  # seconds of timed steps after which a speed probe stops timing more (at least two)
MIN_TIMED_STEPS = 2
_TIMED_ON: set[str] = set()  # device types this process has timed a model on (its one-off costs are paid)


def padded_tokens(batches: Batches, steps) -> float:
    """Mean padded tokens of the batches of `steps` (their rows' longest length times their row count)."""
    return float(np.mean([len(idx) * batches.lengths[idx].max() for idx in map(batches, steps)]))


def _sample_padding(s: _Setup, train_sample) -> float | None:
    """Mean padded tokens of a pass of batches over `train_sample` as `s` batches (None: rows have no lengths)."""
    if s.batches.lengths is None or train_sample is None or not len(train_sample):
        return None
    lengths = row_lengths(encode_inputs(s.encoder, train_sample))
    if lengths is None:
        return None
    like = Batches(np.arange(len(lengths)), s.batches.bs, s.batches.seed, lengths)
    return padded_tokens(like, range(max(1, len(lengths) // s.batches.bs)))


def _time_once(config: dict, data: TrialData, steps: int, device: torch.device, threads: tuple[int, ...],
               window_s: float, warm_up: bool = False, train_sample=None) -> dict:
    """measure_speed's timings, taken once (on a fresh model). warm_up: the process has timed nothing yet, so a
    thread count's first step and the first validation pass run untimed first (on 2 CPU cores a fresh process
    timed Lite0's step with 2 threads at 1.45x and a validation row at 2x what they cost warm, 2026-12-04; timing
    the whole probe twice instead cost 21 s for MiniLM)."""
    torch.set_num_threads(threads[0])
    t0 = time.perf_counter()
    s = _setup(config, data, reports=1, device=device)
    n_body = len(s.groups) - 1
    set_trainable(s.model, s.groups, n_trainable_groups(config, n_body, 0))
    s.model.train()
    eval_frozen(s.model)
    s.step(s.model, s.encoder, 0)
    out = {"setup_s": time.perf_counter() - t0, "build_s": s.build_s, "batch_size": s.batches.bs}
    step, sample_padding = 1, _sample_padding(s, train_sample)
    for n in threads:
        torch.set_num_threads(n)
        if warm_up and n != threads[0]:  # the first thread count's warm-up step was the set-up's
            s.step(s.model, s.encoder, step)
            step += 1
        t1, timed, first = time.perf_counter(), 0, step
        # Up to `steps` steps, fewer once `window_s` is filled: three 2 s steps at each of two thread counts cost
        # 12 s of a 300 s budget's planning (Lite0 at 128 px, 2 cores). Never fewer than two: one step is 20-25%
        # off the mean (MiniLM's batches pad to their longest text; one timed step made the `fixed` baseline plan
        # 108 steps where three gave 153, 2026-12-04), and two cover both batches of the probe's 64 rows.
        while timed < steps and (timed < MIN_TIMED_STEPS or time.perf_counter() - t1 < window_s):
            s.step(s.model, s.encoder, step)
            step, timed = step + 1, timed + 1
        ratio = 1.0 if sample_padding is None else sample_padding / padded_tokens(s.batches, range(first, step))
        out[f"step_s_{n}"] = (time.perf_counter() - t1) / timed * ratio
        out.setdefault("padded_ratio", ratio)
    torch.set_num_threads(threads[0])
    rows = s.x_val if s.x_val is not None else s.x_train
    n_eval = min(len(rows), 128)
    if warm_up:
        predict_logits(s.model, s.encoder, subset(rows, np.arange(min(n_eval, 8))), device)
    t2 = time.perf_counter()
    predict_logits(s.model, s.encoder, subset(rows, np.arange(n_eval)), device)  # an array, texts or row handles
    out["eval_row_s"] = (time.perf_counter() - t2) / max(1, n_eval)
    out["step_s"] = out[f"step_s_{threads[0]}"]
    out["warmup_s"] = 0.0
    if warm_up:
        # The first build reads the weights and imports the family's code (Lite0: 2.3 s against 0.07 s warm on 2
        # cores): once a process, not once a trial, nor once for every kept trial finalising loads.
        t3 = time.perf_counter()
        again, again_spec = build_model(config, data.num_classes)
        build_encoder(config, again, again_spec)
        out["build_s"] = time.perf_counter() - t3
        out["warmup_s"] = max(0.0, s.build_s - out["build_s"])
        out["setup_s"] -= out["warmup_s"]
    out["wall_s"] = time.perf_counter() - t0
    return out
