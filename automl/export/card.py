"""MODEL_CARD.md (+ .html and figures): what the data was, what was searched, what won, how well it does,
and what the export's files carry."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from automl.diagnostics.labelnoise import NOISY_SHARE
from automl.export.manifest import ExportManifest
from automl.search.clock import drift_line

# Files that hold the user's data (rows, texts, images), as opposed to weights and summaries.
USER_DATA_FILES = {"test_split.npz": "the test split's images and labels",
                   "test_split.jsonl": "the test split's texts and labels",
                   "suspected_label_errors.csv": "row numbers and labels of suspected label errors",
                   "data_report.json": "column names, class names and counts, unreadable file names"}


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v).replace("|", "\\|")


def table(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for _, row in df.iterrows()]
    return "\n".join(lines)


def _kv(rows: dict) -> str:
    return table(pd.DataFrame({"": list(rows), "value": [_cell(v) for v in rows.values()]}))


def _summary(m: ExportManifest) -> list[str]:
    t, metric = m.test_metrics, m.metric
    rep = m.data_report
    if m.is_regression:
        what = f"{m.modality} regression of `{m.label_column}`"
        scores = f"RMSE {t.get('rmse', float('nan')):.4g}, MAE {t.get('mae', float('nan')):.4g}"
    else:
        shown = ", ".join(map(str, m.classes[:30])) + (" …" if len(m.classes) > 30 else "")
        what = f"{m.task} {m.modality} classification of `{m.label_column}` into {len(m.classes)} classes ({shown})"
        scores = (f"accuracy {t.get('accuracy', float('nan')):.4f}, macro-F1 {t.get('f1_macro', float('nan')):.4f}, "
                  f"calibration error {t.get('ece', float('nan')):.4f}")
    how = m.training.get("how", "retrain")
    paced = (f" (paced into the time the search left: its price was ~{m.training.get('price_s', '?')} s, its "
             f"retrain took {m.training.get('time_s', float('nan')):.0f} s)" if m.training.get("paced") else "")
    trained = {"retrain": f"then retrained on train+validation for {m.training.get('epochs', '?')} epochs{paced}",
               "checkpoint": "the winning trial's own weights are exported (no retrain: " +
                             str(m.training.get("reason", "")) + ")"}.get(how, m.training.get("description", how))
    if m.training.get("decision"):  # the start point kept, or what beat it and how surely
        trained += "; " + str(m.training["decision"])
    return ["## Summary", "",
            f"This model does {what}. It fine-tunes `{m.backbone.model}` ({m.backbone.library}, "
            f"{'pretrained' if m.backbone.pretrained else 'trained from scratch'}).", "",
            f"On {_tested(t, rep)} held-out test examples it scores **{metric} "
            f"{t.get(metric, float('nan')):.4f}** ({scores}). It was chosen by validation {metric} "
            f"({m.search.get('best_score', float('nan')):.4f}) among {m.search.get('n_trials', '?')} trials, "
            f"{trained}.", ""]


def _tested(t: dict, rep: dict) -> str:
    """How many test rows were scored: the split, or the stratified sample of it that the time budget allowed."""
    sampled = t.get("test_rows")
    if sampled:
        return f"a stratified {sampled['scored']} of the {sampled['of']} ({sampled['why']})"
    return str(rep.get("split_sizes", {}).get("test", "?"))


def _data(m: ExportManifest) -> list[str]:
    rep = m.data_report
    sizes = rep.get("split_sizes", {})
    dropped = {"missing label": rep.get("dropped_missing_label", 0), "missing input": rep.get("dropped_missing_input", 0),
               "unreadable images": len(rep.get("dropped_unreadable_images", [])),
               "duplicates": rep.get("dropped_duplicates", 0),
               "identical inputs with different labels": rep.get("dropped_conflicting_duplicates", 0),
               "rare classes": sum((rep.get("dropped_rare_classes") or {}).values())}
    lines = ["## Data", "",
             f"{rep.get('rows_received')} rows were received and {rep.get('rows_used')} used: "
             f"{sizes.get('train', '?')} for training, {sizes.get('validation', '?')} for validation and "
             f"{sizes.get('test', '?')} for the test.",
             "Dropped: " + (", ".join(f"{v} {k}" for k, v in dropped.items() if v) or "nothing") + "."]
    if rep.get("class_counts"):
        counts = rep["class_counts"]
        lines += [f"The largest class is {rep.get('imbalance_ratio', 1.0):.1f}× the smallest.", "",
                  table(pd.DataFrame({"class": list(counts), "rows": list(counts.values())}))]
    lines += [f"- Note: {n}" for n in rep.get("notes", [])]
    if rep.get("ignored_columns"):
        lines.append(f"- Columns not used as inputs: {', '.join(map(str, rep['ignored_columns']))}")
    return lines + [""]


def _search(m: ExportManifest, trials: pd.DataFrame | None) -> list[str]:
    out = ["## How the budget was spent", ""]
    plan = m.plan or {}
    for reason in plan.get("reasons", []):
        out.append(f"- {reason}")
    repriced = drift_line(float(m.search.get("drift", 1.0)))
    if repriced:
        out.append(f"- While the search ran, {repriced}.")
    spent = (m.budget or {}).get("spent_s", {})
    if spent:
        out += ["", "Time per stage (seconds): " + ", ".join(f"{k} {v:.0f}" for k, v in spent.items()) + "."]
    if m.search.get("peak_disk_mb") is not None:
        out += ["", f"Peak disk used by the search's checkpoints: {m.search['peak_disk_mb']:.1f} MB (checkpoints "
                "of finished trials are deleted as the search goes)."]
    out.append("")
    shown = m.searched_hyperparameters or m.hyperparameters
    out += ["## Winning configuration", "", _kv(shown), ""]
    if trials is not None and len(trials):
        keep = [c for c in trials.columns if c.startswith("best_val") or c in ("status", "epochs_run", "best_epoch")]
        cfg_cols = [c for c in ("config/backbone", "config/unfreeze", "config/schedule", "config/augment",
                                "config/text_augment", "config/lr") if c in trials.columns]
        top = trials[["trial_id", *cfg_cols, *keep]].head(10).copy()
        top.columns = [c.replace("config/", "").replace("best_val_", "val ") for c in top.columns]
        counts = trials["status"].value_counts().to_dict() if "status" in trials else {}
        out += ["## Search", "", "Trials by outcome: " + ", ".join(f"{v} {k.lower().replace('_', ' ')}"
                                                                   for k, v in counts.items()) + ".", "",
                "The ten best trials (validation):", "", table(top), ""]
    if "learning_curves" in m.figures:
        out += [f"![learning curves]({m.figures['learning_curves']})", ""]
    return out


def _evaluation(m: ExportManifest) -> list[str]:
    out = []
    cv = m.cross_validation
    if cv:
        out += ["## Cross-validation of the winning config", "",
                f"{cv['folds']}-fold on train+validation: " + ", ".join(
                    f"{k} {v['mean']:.4f} ± {v['std']:.4f}" for k, v in cv["metrics"].items()) + ".", ""]
    pc = m.test_metrics.get("per_class")
    if pc:
        out += ["## Per-class test metrics", "", table(pd.DataFrame({"class": m.classes, **pc})), ""]
    if "confusion_matrix" in m.figures:
        out += [f"![confusion matrix]({m.figures['confusion_matrix']})", ""]
    g = m.group_metrics
    if g:
        out += ["## Per-group test metrics", "", f"Groups of `{g['column']}`; the largest gap in {m.metric} between "
                f"groups is {g['gap']:.4f}.", "", table(pd.DataFrame(g["table"])), ""]
        if g.get("flagged"):
            out += [f"**Groups far below the rest:** {', '.join(map(str, g['flagged']))}.", ""]
    upd = m.update
    if upd:
        old = upd.get("old_test")
        rows = {"test split": ["new data"], "this model": [upd["new_test"]["new"]], "base model": [upd["new_test"]["old"]]}
        if old:
            rows = {k: v + [x] for (k, v), x in zip(rows.items(), ["base model's data", old["new"], old["old"]])}
        out += ["## Update of an earlier model", "", f"Base model: `{upd['base_model']}`.", "", table(pd.DataFrame(rows)), "",
                (f"Forgetting (drop on the base model's test split): {upd['forgetting']:+.4f}." if old else
                 "**Forgetting was not measured**: the base model's export carries no test split.")
                + f" Weights moved {upd['l2_from_base']:.4f} (L2) from the base.", "",
                f"Decision: **{upd['decision']}**: {upd['reason']}.", ""]
    tr = m.transferability
    if tr and tr.get("ranking"):
        out += ["## Backbone pre-ranking (LogME)", "",
                table(pd.DataFrame(tr["ranking"])), "", f"Kept for the search: {', '.join(tr.get('kept', []))}."
                + (f" Rank agreement with the search (Spearman): {tr['spearman_vs_search']:.2f}."
                   if tr.get("spearman_vs_search") is not None else ""), ""]
    le = m.suspected_label_errors
    if le and le.get("count") is not None:
        out += ["## Suspected label errors", "",
                f"{le['count']} training rows have labels the model finds unlikely (out-of-fold probabilities, "
                "confident learning); see `suspected_label_errors.csv`."
                + (f" How many is confident learning's; which rows, and their order, also weigh {le['ranked_with']}."
                   if le.get("ranked_with") else "")
                + (f" Expected precision: {le['expected_precision']:.2f} (if the model's probabilities are "
                   "calibrated)." if le.get("expected_precision") else "")
                + (f" That is {le['share']:.0%} of the rows, more than label noise usually explains: many are "
                   "likely rows the model confuses (overlapping classes), not wrong labels."
                   if le.get("share", 0) > NOISY_SHARE else ""), ""]
    return out


def _files(m: ExportManifest) -> list[str]:
    rows = []
    for name, size in sorted(m.files.items()):
        fmt = m.exports.get({"model.onnx": "onnx", "model.pt": "torchscript"}.get(name, ""), {})
        note = f"max abs diff vs PyTorch {fmt['max_abs_diff']:.1e}" if "max_abs_diff" in fmt else ""
        rows.append({"file": name, "size": f"{max(size, 1024) / 1024:.0f} KB" if size else "", "holds your data": USER_DATA_FILES.get(name, "no"),
                     "note": note})
    out = ["## Files in this export", ""]
    if rows:
        out.append(table(pd.DataFrame(rows)))
    out += ["", "`config.json` is the manifest (see `automl/export/manifest.py`); load the model with "
            "`automl.load(dir)`."]
    if not m.test_split:
        out.append("The test split is not stored: a later update of this model cannot measure forgetting.")
    missing = [f"{k} ({v.get('error')})" for k, v in m.exports.items() if "error" in v]
    if missing:
        out.append("Not exported: " + "; ".join(missing))
    return out + [""]


def model_card(m: ExportManifest, trials: pd.DataFrame | None) -> str:
    p = m.provenance
    out = [f"# Model card: {m.backbone.model.split('/')[-1]} for `{m.label_column}`", ""]
    out += _summary(m) + _data(m) + _search(m, trials) + _evaluation(m) + _files(m)
    out += ["## Provenance", "",
            _kv({"created": p.created_at, "seed": p.seed, "data fingerprint": p.fingerprint,
                 "wall time (s)": round(p.wall_time_s), "command": p.command,
                 **{f"{k} version": v for k, v in p.versions.items()}}), "",
            "## Intended use", "",
            "Predicts the classes above for inputs like the training data. Scores hold for data from the same "
            "distribution; check on your own held-out data before relying on it, and watch rare classes "
            "(see per-class recall).", ""]
    return "\n".join(out)


def write_card(out_dir, m: ExportManifest, trials, history: dict | None) -> None:
    """MODEL_CARD.md + MODEL_CARD.html + figures, into an export being written (run last: lists the files)."""
    from automl.export import plots
    from automl.export.mdhtml import to_html

    out_dir = Path(out_dir)
    if history and trials is not None and len(trials):  # without the history (a re-written card) the figure stays
        m.figures["learning_curves"] = plots.learning_curves(history, trials, m.metric,
                                                             m.search.get("max_reports", 1), out_dir)
    cm = m.test_metrics.get("confusion_matrix")
    if cm:
        m.figures["confusion_matrix"] = plots.confusion(cm, m.classes, out_dir)
    # The card lists the export's files: the ones already written, plus the card itself.
    names = [p for p in out_dir.rglob("*") if p.is_file()]
    m.files = {str(p.relative_to(out_dir)): p.stat().st_size for p in names}
    m.files.update({"MODEL_CARD.md": 0, "MODEL_CARD.html": 0, "config.json": 0})
    text = model_card(m, trials)
    (out_dir / "MODEL_CARD.md").write_text(text)
    (out_dir / "MODEL_CARD.html").write_text(to_html(text, title=f"Model card: {m.backbone.model}"))
