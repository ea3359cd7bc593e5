"""Does the search beat one good config at equal wall time? (issues #14 and #15)

    python benchmarks/quality.py --budget 300 --seeds 3              # digits, stamps, fortunes
    python benchmarks/quality.py --sets stamps --seeds 1             # one set, quicker

For each real set (benchmarks/realsets.py) and seed, the same train/validation/test rows go to:
  ours    auto_finetune(df, time_budget_s=budget): plan, search, finalise, export (wall time measured)
  fixed   the space's start point trained once, in-process, for a sensible length at the images' native size
          (unweighted loss, fp32 steps, random batches: as a loop written by hand trains)
          (shrunk until one run fits the budget), on train; the final weights are tested
  fixed_grouped (text) `fixed` with its batches cut from texts of similar length, as the product cuts them
  scratch (images) a hand-written from-scratch config: resnet10t at the images' own size (at least 32 px),
          AdamW 3e-3, cosine, flip+crop, 15 epochs (fewer when they do not fit), like the one the icons were lost to
  random  the same plan, but random sampling and no early stopping; the best trial's weights are tested
  hf_search (text) transformers' Trainer.hyperparameter_search (Optuna, its default space) on the same MiniLM,
          stopped at the budget; the best trial's best epoch is tested
  autogluon (when /work/ag-venv exists) AutoGluon MultiModal 1.6.3, time_limit = budget, on the same MiniLM (texts)
          or the start point's EfficientNet-Lite0 ImageNet weights (sets of image files: not digits' arrays)
Test macro-F1 and wall time go to benchmarks/RESULTS.md (section "quality").
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

import realsets  # noqa: E402
from _results import write_section  # noqa: E402

AG_PYTHON = Path(os.environ.get("AUTOML_AG_PYTHON", "/work/ag-venv/bin/python"))


def split(df: pd.DataFrame, seed: int) -> pd.DataFrame:
    """A stratified 70/15/15 split column, the same for every method of a seed."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(df))
    rest, test = train_test_split(idx, test_size=0.15, stratify=df["label"], random_state=seed)
    train, val = train_test_split(rest, test_size=0.15 / 0.85, stratify=df["label"].iloc[rest], random_state=seed)
    out = df.copy()
    out["split"] = "train"
    out.iloc[val, out.columns.get_loc("split")] = "validation"
    out.iloc[test, out.columns.get_loc("split")] = "test"
    return out


def _cpus() -> int:
    """The CPUs this process may use (every method trains on all of them)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)


def macro_f1(model, df: pd.DataFrame) -> float:
    test = df[df["split"] == "test"].drop(columns=["split"])
    return float(model.evaluate(test, label="label")["f1_macro"])


class WeighedOptions:
    """Every option the final choice weighed (the start point, the winner, soups, ensembles), scored on the test rows
    in the same run: what another final-choice rule would have exported, without another run's training noise.
    Measurement only: it wraps the product's own `_decide` and `evaluate`, and changes nothing they return."""

    def __init__(self) -> None:
        from automl import stages
        from automl.training import combine

        self.combine, self.stages, self.rows = combine, stages, []
        self._decide, self._evaluate = combine._decide, stages.evaluate

    def __enter__(self) -> "WeighedOptions":
        def decide(options, ref, y_val, metric, num_classes, alpha, pool=None):
            self.weighed = (list(options), ref, y_val, metric, num_classes, pool)
            return self._decide(options, ref, y_val, metric, num_classes, alpha, pool)

        def evaluate(prepared, inputs, final, budget=None, **kw):
            from automl.stages import FinalModel

            if getattr(self, "weighed", None) is not None:
                options, ref, y_val, metric, k, pool = self.weighed
                pairs = [(o.kind, o.trial_ids, o.model, o.encoder, o.spec, o.config, o.val_score, p)
                         for o, p in options]
                if ref is not None:
                    pairs.insert(0, ("start point", [ref.trial_id], ref.model, ref.encoder, ref.spec, ref.config,
                                     float(self.combine._score(y_val, ref.proba, metric, k)), ref.proba))
                for kind, ids, model, enc, spec, cfg, val, proba in pairs:
                    test = self._evaluate(prepared, inputs, FinalModel(model, enc, spec, cfg, {}))
                    row = {"kind": kind, "trials": list(ids), "val": round(float(val), 4),
                           "test": round(float(test["f1_macro"]), 4)}
                    if ref is not None and kind != "start point":
                        row["p_plain"] = round(self.combine.p_not_better(y_val, proba, ref.proba, metric, k), 3)
                        row["p_pool"] = round(self.combine.p_not_better(y_val, proba, ref.proba, metric, k,
                                                                        pool=pool), 3)
                    self.rows.append(row)
                self.weighed = None
            return self._evaluate(prepared, inputs, final, budget, **kw)

        self.combine._decide, self.stages.evaluate = decide, evaluate
        return self

    def __exit__(self, *exc) -> None:
        self.combine._decide, self.stages.evaluate = self._decide, self._evaluate


def rungs(m) -> pd.Series:
    """Each trial's rung of the ladder (0: a head on frozen features); a run before the ladder had fine-tunes only."""
    return m.trials["rung"] if "rung" in m.trials else pd.Series(2, index=m.trials.index)


def ladder(m) -> str:
    """What the run tried, e.g. "24 heads + 1 fine-tunes on 3 backbones"."""
    rung = rungs(m)
    return (f"{(rung == 0).sum()} heads + {(rung != 0).sum()} fine-tunes on "
            f"{m.trials['config/backbone'].nunique()} backbones")


def ours(df: pd.DataFrame, budget: float, seed: int, out: Path) -> dict:
    from automl import auto_finetune

    t0 = time.monotonic()
    with WeighedOptions() as weighed:
        m = auto_finetune(df, label="label", time_budget_s=budget, seed=seed, output_dir=out, progress=False)
    wall = time.monotonic() - t0
    p = m.manifest.plan
    decision = str(m.manifest.training.get("decision") or "")
    how = m.manifest.training.get("how")
    how = f"{how}, start point kept" if decision.startswith("start point kept") else (
        f"{how}, beat the start point" if " chosen over the " in decision else how)
    rung = rungs(m)
    return {"f1": macro_f1(m, df), "wall": wall, "trials": len(m.trials), "how": how, "ladder": ladder(m),
            "rung0": next((r for r in p["reasons"] if r.startswith("rung 0:") and "heads on" in r), ""),
            "plan": f"{p['regime']}, {p.get('storage_size') or ''}{'px ' if p.get('storage_size') else ''}"
                    f"{p['reports']}x{p['report_rows']} rows, trial ~{p['trial_s']:.0f}s",
            "winner": str(m.manifest.searched_hyperparameters.get("backbone")), "options": weighed.rows,
            "decision": decision, "class_bias": _safely(class_bias, m, df),
            "spent": {k: round(v, 1) for k, v in ((m.manifest.budget or {}).get("spent_s") or {}).items()},
            # Where the search was planned to end and where it did (seconds after the run started): the budget's
            # unused share is mostly the gap between the two.
            "search_end": {"planned": round(p.get("search_ends_at_s") or 0, 1), "actual": round(_search_end(m), 1)},
            # Why the final model was not retrained where the plan held time for it (the hold then goes unused).
            "retrain": {"planned": bool(p.get("retrain")), "held_s": round(p.get("retrain_s") or 0, 1),
                        "ran": m.manifest.training.get("how") == "retrain",
                        "reason": m.manifest.training.get("reason"), "price_s": m.manifest.training.get("price_s"),
                        "paced": m.manifest.training.get("paced"),
                        "took_s": round(m.manifest.training.get("time_s") or 0, 1)},
            "final": {"trials": m.manifest.training.get("trials"), "val": m.manifest.training.get("val_scores"),
                      "rungs": {str(t): int(r) for t, r in zip(m.trials["trial_id"], rung)
                                if str(t) in (m.manifest.training.get("trials") or [])}}}


def _safely(fn, *args) -> dict:
    try:
        return fn(*args)
    except Exception as exc:  # a measurement's failure must not lose the run's result
        return {"error": repr(exc)[:300]}


def class_bias(m, df: pd.DataFrame) -> dict:
    """Measurement only: per-class log-biases on the exported model's probabilities, chosen by coordinate ascent
    on the validation rows' macro-F1 (ties: the smaller bias), and the test macro-F1 with and without them."""
    from sklearn.metrics import f1_score

    classes = [str(c) for c in m.classes]

    def logp(part):
        rows = df[df["split"] == part]
        proba = m.predict_proba(rows.drop(columns=["split", "label"])).to_numpy()
        return np.log(np.clip(proba, 1e-9, 1.0)), np.array([classes.index(str(v)) for v in rows["label"]])

    (lv, yv), (lt, yt) = logp("validation"), logp("test")

    def f1(y, lp, b):
        return f1_score(y, (lp + b).argmax(1), average="macro", labels=range(len(classes)), zero_division=0)

    b, grid = np.zeros(len(classes)), np.round(np.linspace(-2, 2, 41), 2)
    best = f1(yv, lv, b)
    for _ in range(3):
        for c in range(len(classes)):
            for g in sorted(grid, key=abs):
                trial = b.copy()
                trial[c] = g
                score = f1(yv, lv, trial)
                if score > best + 1e-9:
                    best, b = score, trial
    return {"val_plain": round(f1(yv, lv, 0), 4), "val_tuned": round(best, 4), "test_plain": round(f1(yt, lt, 0), 4),
            "test_tuned": round(f1(yt, lt, b), 4), "bias": [float(x) for x in b]}


def _search_end(m) -> float:
    """Seconds from the run's start to the search's end, from the budget's clock (the stages in their order)."""
    spent = (m.manifest.budget or {}).get("spent_s") or {}
    keys = list(spent)
    return sum(spent[k] for k in keys[:keys.index("search") + 1]) if "search" in keys else float("nan")


SCRATCH = {"backbone": "timm/resnet10t:scratch", "lr": 3e-3, "augment": "flip_crop", "batch_size": 32,
           "weight_decay": 5e-2, "schedule": "cosine", "warmup_frac": 0.05, "label_smoothing": 0.1, "dropout": 0.1,
           "unfreeze": "all", "layer_decay": 1.0, "init": "zero"}
SCRATCH_EPOCHS = 15


def fixed(df: pd.DataFrame, budget: float, seed: int, native: bool = False, scratch: bool = False,
          grouped: bool = False, class_weighted: bool = False) -> dict:
    """The space's start point, trained once for a sensible length that fits the budget, no Ray, on the machine's
    device (`automl.runtime.device()`: the GPU where there is one) with all its CPU threads (2 here).
    Images: at their native size, shrunk until the full sensible length fits; with native=True ("fixed_native")
    at their native size as the plan caps it on a CPU (128 px), as many steps as fit instead."""
    import torch

    from automl.data.inputs import Inputs
    from automl.data.intake import prepare
    from automl.export.manifest import ExportManifest, Preprocessing
    from automl.export.predictor import FinetunedModel
    from automl.models import resolve
    from automl.runtime import device
    from automl.search.plan import MAX_IMAGE_CPU, image_side, min_image, sensible_steps, token_p95
    from automl.search.space import load_space
    from automl.training.loop import fit, full_config, measure_speed

    t0 = time.monotonic()
    threads = _cpus()
    torch.set_num_threads(threads)
    task = prepare(df, "label", seed=seed)
    space = load_space("cpu_small", task.modality)
    # Batches of random rows, as a loop written by hand draws them (transformers' Trainer: group_by_length=False);
    # the product cuts text batches from rows of similar length (training/loop.Batches). fp32 steps, as a loop
    # written by hand runs on a CPU (Trainer: bf16=False); the product's text steps run in bf16 where AMX pays.
    # An unweighted loss, as written by hand (Trainer's default); the product's text start point weighs classes.
    cfg = full_config({**space.default_config(), **(SCRATCH if scratch else {}), "seed": seed,
                       "length_grouped": grouped, "cpu_bf16": False, "class_weighted": class_weighted})
    spec = resolve(cfg["backbone"])
    n_train = len(task.splits["train"])
    steps = sensible_steps(spec.pretrained, -(-n_train // int(cfg["batch_size"])))
    size = None
    if scratch:
        steps = SCRATCH_EPOCHS * -(-n_train // int(cfg["batch_size"]))
        size = min(MAX_IMAGE_CPU, max(32, -(-image_side(task.images) // 8) * 8))
        cfg["image_size"] = size
    elif task.modality == "image":
        # The native size, but not below what the backbone needs (search/plan.py's rule: 48 px when pretrained).
        size = min(MAX_IMAGE_CPU if native else 224, max(min_image(spec.pretrained),
                                                         -(-image_side(task.images) // 8) * 8))
        work = Path(tempfile.mkdtemp(prefix="fixed-"))
        while not native:  # the native size, shrunk until the run fits 80% of the budget
            probe = Inputs.materialise(task, size, work)
            # Timed as it trains: with both threads (timing one thread made it shrink images it had time for).
            # All 3 steps timed, as before the product's probes stopped at a filled window (2026-12-04): the
            # baseline must not move with the product's code.
            sp = measure_speed({**cfg, "image_size": size}, probe.trial_data(), steps=3, threads=(threads,),
                               window_s=math.inf)
            if sp["setup_s"] + steps * sp["step_s"] <= 0.8 * budget or size <= min_image(spec.pretrained):
                break
            size = max(min_image(spec.pretrained), int(size * 0.75) // 8 * 8)
        cfg["image_size"] = size
    else:
        from automl.models.hf_family import load_tokenizer

        p95 = token_p95(load_tokenizer(spec.model), [task.texts[i] for i in task.splits["train"]])
        cfg["max_length"] = min(256, max(16, -(-p95 // 8) * 8))
    inputs = Inputs.materialise(task, size, Path(tempfile.mkdtemp(prefix="fixed-")))
    data = inputs.trial_data()
    sp = measure_speed(cfg, data, steps=3, threads=(threads,), window_s=math.inf)
    steps = min(steps, int((0.8 * budget - sp["setup_s"] - (time.monotonic() - t0)) / sp["step_s"]))
    reports = 10
    cfg["report_rows"] = max(1, steps * int(cfg["batch_size"]) // reports)
    res = fit(cfg, data, epochs=reports, device=device())
    classes = list(task.classes)
    manifest = ExportManifest(task=task.task, modality=task.modality, classes=classes, label_column="label",
                              input_columns=task.input_columns, metric="f1_macro", backbone=spec,
                              preprocessing=Preprocessing(**{k: v for k, v in res.encoder.to_dict().items()},
                                                          storage_size=size))
    model = FinetunedModel(res.model, res.encoder, manifest)
    return {"f1": macro_f1(model, df), "wall": time.monotonic() - t0,
            "plan": f"{size or ''}{'px ' if size else ''}{steps} steps"}


def random_search(df: pd.DataFrame, budget: float, seed: int, out: Path) -> dict:
    """The same plan as ours, but random configs and no early stopping; the best trial's own weights."""
    from automl import stages
    from automl.budget import Budget
    from automl.cluster import connect
    from automl.export.predictor import FinetunedModel
    from automl.options import FinetuneOptions
    from automl.search.tune import SearchConfig, SearchLimits, SearchStorage, experiment_name, run_search

    from _engines import random_no_stopping
    from automl.training.loop import build_encoder, full_config, load_best

    t0 = time.monotonic()
    opts = FinetuneOptions.from_kwargs(label="label", time_budget_s=budget, seed=seed, output_dir=str(out),
                                       progress=False)
    budget_ = Budget(budget)
    prepared = stages.prepare(df, data=opts.data, search=opts.search, update=opts.update, output=opts.output)
    plan = stages.plan(prepared, connect(), budget_, search=opts.search, resources=opts.resources,
                       diagnostics=opts.diagnostics, output=opts.output)
    inputs = stages.materialise(prepared, plan, resources=opts.resources)
    now = budget_.elapsed()
    # The search gets what ours gives search and retrain together (random has no retrain of its own).
    ends = plan.search_ends_at_s + (plan.retrain_s if plan.retrain else 0.0)
    config = SearchConfig(prepared.metric, SearchStorage(str(out / "ray"), experiment_name(out, False)),
                          SearchLimits(time_budget_s=ends - now), plan.resources, plan.concurrency, seed=seed,
                          progress=False)
    res = run_search(inputs.trial_data(), plan.space, config, start_points=[], engine=random_no_stopping)
    config = full_config(res.best_config)
    model, spec = load_best(config, prepared.task.num_classes, res.best_weights)
    enc = build_encoder(config, model, spec)
    from automl.export.manifest import ExportManifest, Preprocessing

    manifest = ExportManifest(task=prepared.task.task, modality=prepared.task.modality,
                              classes=list(prepared.task.classes), label_column="label",
                              input_columns=prepared.task.input_columns, metric=prepared.metric, backbone=spec,
                              preprocessing=Preprocessing(**enc.to_dict(), storage_size=inputs.storage_size))
    return {"f1": macro_f1(FinetunedModel(model, enc, manifest), df), "wall": time.monotonic() - t0,
            "trials": len(res.trials)}


def hf_search(df: pd.DataFrame, budget: float, seed: int, tmp: Path) -> dict:
    """transformers' `Trainer.hyperparameter_search` as its documentation shows it, on the same MiniLM: a
    `model_init`, the Optuna backend with its default space (learning rate 1e-6 to 1e-4, 1-5 epochs, batch 4-64,
    seed), evaluated and saved every epoch with the best epoch kept (`load_best_model_at_end`, macro-F1 on the
    validation rows), fp32 steps on the CPU (Trainer's default), padding to the longest text of a batch. Equal
    wall time: Optuna starts no trial after the budget (its `timeout`), and a callback stops the running one at the
    budget's end. The best trial's best checkpoint is tested (no retrain: that would need time the budget has not
    got)."""
    import optuna
    import torch
    from sklearn.metrics import f1_score
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainerCallback, TrainingArguments)

    from automl.models import minilm_dir

    t0 = time.monotonic()
    deadline = t0 + budget
    torch.set_num_threads(_cpus())
    classes = sorted(df["label"].unique(), key=str)
    index = {c: i for i, c in enumerate(classes)}
    tok = AutoTokenizer.from_pretrained(minilm_dir())

    def rows(part: str) -> list[dict]:
        d = df[df["split"] == part]
        enc = tok(list(d["text"]), truncation=True, max_length=128)
        return [{"input_ids": i, "attention_mask": m, "labels": index[y]}
                for i, m, y in zip(enc["input_ids"], enc["attention_mask"], d["label"])]

    train, val, test = rows("train"), rows("validation"), rows("test")

    def model_init(trial=None):
        return AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=len(classes))

    def metrics(pred) -> dict:
        return {"f1": f1_score(pred.label_ids, pred.predictions.argmax(-1), average="macro")}

    class Deadline(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if time.monotonic() >= deadline:
                control.should_training_stop = True

    args = TrainingArguments(output_dir=str(tmp / "hf"), eval_strategy="epoch", save_strategy="epoch",
                             save_total_limit=1, load_best_model_at_end=True, metric_for_best_model="f1",
                             report_to=[], disable_tqdm=True, logging_strategy="no",
                             use_cpu=not torch.cuda.is_available(), seed=seed)
    trainer = Trainer(model_init=model_init, args=args, train_dataset=train, eval_dataset=val,
                      data_collator=DataCollatorWithPadding(tok), compute_metrics=metrics, callbacks=[Deadline()])
    storage = f"sqlite:///{tmp / 'hf_study.db'}"  # its trials, read back below (BestRun holds the best alone)
    trainer.hyperparameter_search(direction="maximize", backend="optuna", n_trials=100,
                                  timeout=max(1.0, deadline - time.monotonic()),
                                  compute_objective=lambda m: m["eval_f1"], study_name="hf", storage=storage)
    study = optuna.load_study(study_name="hf", storage=storage)
    # The best trial with a checkpoint (one cut before its first epoch's end has none).
    for t in sorted((t for t in study.trials if t.value is not None), key=lambda t: -t.value):
        states = sorted((tmp / "hf" / f"run-{t.number}").glob("checkpoint-*/trainer_state.json"),
                        key=lambda f: int(f.parent.name.split("-")[1]))
        if states:
            break
    else:
        return {"error": f"no trial of {len(study.trials)} saved a checkpoint in {budget:.0f} s"}
    chosen = json.loads(states[-1].read_text()).get("best_model_checkpoint") or str(states[-1].parent)
    model = AutoModelForSequenceClassification.from_pretrained(chosen).eval()
    batch = DataCollatorWithPadding(tok)([{k: v for k, v in r.items() if k != "labels"} for r in test])
    with torch.no_grad():
        pred = model(**batch).logits.argmax(-1).numpy()
    f1 = float(f1_score([r["labels"] for r in test], pred, average="macro"))
    return {"f1": f1, "wall": time.monotonic() - t0, "trials": len(study.trials),
            "best": {k: (round(v, 7) if isinstance(v, float) else v) for k, v in t.params.items()}}


def timm_checkpoint(folder: Path, variant: int = 0) -> Path:
    """EfficientNet-Lite`variant`'s ImageNet weights (the product's own start point's, from the same package) as a
    local timm checkpoint in the form AutoGluon's timm_image reads: config.json (architecture, pretrained_cfg) and
    pytorch_model.bin."""
    import timm
    import torch

    from automl.models import efficientnet_lite as lite

    folder.mkdir(parents=True, exist_ok=True)
    name = lite.timm_name(variant)
    cfg = timm.create_model(name, pretrained=False).pretrained_cfg
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items() if k in (
        "input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode", "num_classes", "classifier")}
    cfg.update(mean=list(lite.MEAN), std=list(lite.STD))  # what these TF-trained weights expect
    weights = {k: v for k, v in lite.timm_state_dict(variant=variant).items() if not k.startswith("classifier.")}
    # AutoGluon builds the body without its ImageNet classifier (num_classes=0) and loads this file strictly.
    (folder / "config.json").write_text(json.dumps({"architecture": name, "num_classes": 0, "pretrained_cfg": cfg,
                                                    "num_features": int(weights["conv_head.weight"].shape[0])}))
    torch.save(weights, folder / "pytorch_model.bin")
    return folder


def autogluon(df: pd.DataFrame, budget: float, seed: int, tmp: Path) -> dict | None:
    """AutoGluon MultiModal (its own venv) on the same rows: texts on the product's MiniLM, images (paths) on the
    product's start point's EfficientNet-Lite0 ImageNet weights. None where it cannot run (no venv; in-memory
    images such as digits' arrays)."""
    from automl.models import minilm_dir

    images = "image" in df
    if not AG_PYTHON.exists() or (images and not isinstance(df["image"].iloc[0], str)):
        return None
    train = df[df["split"] != "test"].drop(columns=["split"])
    test = df[df["split"] == "test"].drop(columns=["split"])
    train.to_csv(tmp / "ag_train.csv", index=False)
    test.to_csv(tmp / "ag_test.csv", index=False)
    backbone = (["--image-checkpoint", str(timm_checkpoint(tmp / "ag_lite0"))] if images
                else ["--checkpoint", minilm_dir()])
    t0 = time.monotonic()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    r = subprocess.run([str(AG_PYTHON), str(HERE / "autogluon_baseline.py"), "--train", str(tmp / "ag_train.csv"),
                        "--test", str(tmp / "ag_test.csv"), "--label", "label", *backbone,
                        "--time-limit", str(int(budget)), "--out", str(tmp / "ag.json"), "--seed", str(seed)],
                       capture_output=True, text=True, env=env, timeout=budget * 3 + 300)
    if r.returncode != 0:
        return {"error": r.stderr[-500:]}
    res = json.loads((tmp / "ag.json").read_text())
    return {"f1": res["f1_macro"], "wall": time.monotonic() - t0}


SETS = {"digits": realsets.digits, "stamps": realsets.stamps, "fortunes": realsets.fortunes, "icons": realsets.icons,
        # Four times the rows (4,617: 1,189 down to 200 a class): 300 s on 2 CPU cores buy 2-4 passes over them.
        "fortunes_large": lambda: realsets.fortunes(max_per_class=1200),
        # Strongly imbalanced (1,586: 600 down to 24 a class, 25:1), as support tickets or rare defects are.
        "fortunes_skewed": lambda: realsets.fortunes(max_per_class=600, imbalance=25),
        # Held out from every earlier change: Debian package synopses by section (1,226, 10 classes at 10:1) and
        # Oxygen's 32 px RGBA icons by context (oxygen-icon-theme).
        "packages": realsets.packages, "oxygen": realsets.oxygen,
        # Binary at 10:1 (1,320: "is this package a game?"): macro-F1 then hangs on the rare class's ~20 test rows.
        "packages_binary": lambda: realsets.packages(sections=("utils", "games"), max_per_class=1200, imbalance=10)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=300)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--only-seed", type=int, default=None, help="run this one seed of the --seeds")
    ap.add_argument("--sets", default="digits,stamps,fortunes")
    ap.add_argument("--methods", default="ours,fixed,random,autogluon")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md as it is")
    args = ap.parse_args()
    methods = args.methods.split(",")
    rows = []
    for name in args.sets.split(","):
        base = SETS[name]()
        for seed in range(args.seeds) if args.only_seed is None else [args.only_seed]:
            df = split(base, seed)
            tmp = Path(tempfile.mkdtemp(prefix=f"quality-{name}-{seed}-"))
            row = {"set": name, "seed": seed}
            for method in methods:
                t = time.monotonic()
                if method == "ours":
                    r = ours(df, args.budget, seed, tmp / "ours")
                elif method in ("fixed", "fixed_native", "scratch", "fixed_grouped"):
                    if method in ("fixed_native", "scratch") and base.columns[0] != "image":
                        continue
                    if method == "fixed_grouped" and base.columns[0] != "text":
                        continue
                    r = fixed(df, args.budget, seed, native=method == "fixed_native", scratch=method == "scratch",
                              grouped=method == "fixed_grouped")
                elif method == "hf_search":
                    if base.columns[0] != "text":
                        continue
                    r = hf_search(df, args.budget, seed, tmp)
                elif method == "random":
                    r = random_search(df, args.budget, seed, tmp / "random")
                else:
                    r = autogluon(df, args.budget, seed, tmp)
                    if r is None:
                        continue
                row[method] = r
                print(f"{name} seed {seed} {method}: {r} ({time.monotonic() - t:.0f} s)", flush=True)
            rows.append(row)
            shutil.rmtree(tmp, ignore_errors=True)
    lines = report(rows, methods, args.budget)
    print("\n".join(lines))
    if not args.no_write:
        write_section("quality", f"Search vs one good config at equal wall time ({args.budget:.0f} s)", lines)


def report(rows: list[dict], methods: list[str], budget: float) -> list[str]:
    out = ["Test macro-F1 (wall time, s). `ours` is `auto_finetune(df, time_budget_s=budget)`; `fixed` is the "
           "space's start point trained once for a sensible length that fits the budget; `random` is the same plan "
           "with random sampling and no early stopping; `hf_search` is transformers' `Trainer.hyperparameter_search` "
           "(Optuna, its default space) on the same MiniLM (text); `autogluon` is AutoGluon MultiModal 1.6.3 on the "
           "same MiniLM (texts) or EfficientNet-Lite0 ImageNet weights (image files). Same train/validation/test "
           "rows for every method of a seed.", "",
           "| set | seed | " + " | ".join(methods) + " | ours − fixed | plan (ours) |",
           "|---|---|" + "---|" * len(methods) + "---|---|"]
    for r in rows:
        cells = []
        for m in methods:
            v = r.get(m)
            cells.append("" if not v else ("error" if "error" in v else f"{v['f1']:.4f} ({v['wall']:.0f})"))
        delta = (r["ours"]["f1"] - r["fixed"]["f1"]) * 100 if "ours" in r and "fixed" in r else float("nan")
        out.append(f"| {r['set']} | {r['seed']} | " + " | ".join(cells) + f" | {delta:+.1f} | "
                   f"{r.get('ours', {}).get('plan', '')}, {r.get('ours', {}).get('ladder', '')}, "
                   f"{r.get('ours', {}).get('how', '')} |")
    out.append("")
    for name in dict.fromkeys(r["set"] for r in rows):
        sel = [r for r in rows if r["set"] == name and "ours" in r and "fixed" in r]
        if sel:
            d = [(r["ours"]["f1"] - r["fixed"]["f1"]) * 100 for r in sel]
            over = max(r["ours"]["wall"] / budget for r in sel)
            out.append(f"- {name}: ours − fixed = {np.mean(d):+.1f} points on average (worst seed {min(d):+.1f}); "
                       f"longest run {over:.0%} of the budget.")
    return out


if __name__ == "__main__":
    main()
