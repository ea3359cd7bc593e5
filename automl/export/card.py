"""MODEL_CARD.md: what the data was, what was searched, what won, how well it does."""
from __future__ import annotations

import pandas as pd


def _table(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    for _, row in df.iterrows():
        cells = [f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v)) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def model_card(meta: dict, trials: pd.DataFrame | None) -> str:
    m = meta.get("test_metrics", {})
    rep = meta.get("data_report", {})
    metric = meta.get("metric", "accuracy")
    out = [f"# Model card: {meta['backbone']['model'].split('/')[-1]} for {meta['label_column']!r}", ""]
    if meta["task"] == "regression":
        what = f"- Task: {meta['modality']} regression (target mean/std {meta.get('target_scale')})"
        scores = (f"(RMSE {m.get('rmse', float('nan')):.4g}, MAE {m.get('mae', float('nan')):.4g})")
    else:
        what = (f"- Task: {meta['task']} {meta['modality']} classification, {meta['num_classes']} classes: "
                f"{', '.join(map(str, meta['classes'][:30]))}{' …' if len(meta['classes']) > 30 else ''}")
        scores = (f"(accuracy {m.get('accuracy', float('nan')):.4f}, macro-F1 {m.get('f1_macro', float('nan')):.4f}, "
                  f"ECE {m.get('ece', float('nan')):.4f})")
    out += ["## Summary", "", what,
            f"- Backbone: `{meta['backbone']['model']}` ({meta['backbone']['library']}, "
            f"pretrained={meta['backbone']['pretrained']})",
            f"- Test {metric}: **{m.get(metric, float('nan')):.4f}** on {rep.get('split_sizes', {}).get('test', '?')} "
            f"held-out examples {scores}",
            f"- Selected on validation {metric} = {meta.get('search', {}).get('best_score', float('nan')):.4f} after "
            f"{meta.get('search', {}).get('n_trials', '?')} trials; retrained on train+validation for "
            f"{meta.get('retrain', {}).get('epochs', '?')} epochs", ""]
    out += ["## Data", "", f"- Rows received: {rep.get('rows_received')}, used: {rep.get('rows_used')}",
            f"- Split sizes: {rep.get('split_sizes')}", f"- Class counts: {rep.get('class_counts')}",
            f"- Imbalance ratio (largest/smallest class): {rep.get('imbalance_ratio', 1.0):.2f}",
            f"- Dropped: missing label {rep.get('dropped_missing_label', 0)}, missing input "
            f"{rep.get('dropped_missing_input', 0)}, unreadable images {len(rep.get('dropped_unreadable_images', []))}, "
            f"duplicates {rep.get('dropped_duplicates', 0)}, conflicting duplicates "
            f"{rep.get('dropped_conflicting_duplicates', 0)}, rare classes {rep.get('dropped_rare_classes', {})}",
            *[f"- Note: {n}" for n in rep.get("notes", [])],
            *([f"- Ignored columns: {rep['ignored_columns']}"] if rep.get("ignored_columns") else []), ""]
    shown = meta.get("searched_hyperparameters") or meta["hyperparameters"]  # only what applies to this model
    out += ["## Winning hyperparameters", "", "```", *[f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}"
                                                       for k, v in shown.items()], "```", ""]
    if trials is not None and len(trials):
        keep = [c for c in trials.columns if c.startswith("best_val") or c in ("status", "epochs_run", "best_epoch")]
        cfg_cols = [c for c in ("config/backbone", "config/unfreeze", "config/schedule", "config/augment",
                                "config/text_augment", "config/lr") if c in trials.columns]
        top = trials[["trial_id", *cfg_cols, *keep]].head(10).copy()
        top.columns = [c.replace("config/", "") for c in top.columns]
        counts = trials["status"].value_counts().to_dict() if "status" in trials else {}
        out += ["## Search", "", f"Trials by status: {counts}", "", "Top trials (validation):", "", _table(top), ""]
    figs = meta.get("figures", {})
    if "learning_curves" in figs:
        out += [f"![learning curves]({figs['learning_curves']})", ""]
    cv = meta.get("cross_validation")
    if cv:
        out += ["## Cross-validation of the winning config", "",
                f"{cv['folds']}-fold on train+validation: " + ", ".join(
                    f"{k} {v['mean']:.4f} ± {v['std']:.4f}" for k, v in cv["metrics"].items()), ""]
    if "per_class" in m:
        pc = pd.DataFrame({"class": meta["classes"], **{k: v for k, v in m["per_class"].items()}})
        out += ["## Per-class test metrics", "", _table(pc), ""]
    if "confusion_matrix" in figs:
        out += [f"![confusion matrix]({figs['confusion_matrix']})", ""]
    upd = meta.get("update")
    if upd:
        out += ["## Update of an earlier model", "", f"- Base model: `{upd['base_model']}`",
                f"- New test split: new model {upd['new_test']['new']:.4f} vs base {upd['new_test']['old']:.4f}",
                f"- Base model's test split: new model {upd['old_test']['new']:.4f} vs base {upd['old_test']['old']:.4f} "
                f"(forgetting = {upd['forgetting']:+.4f})",
                f"- L2 distance of weights from the base: {upd['l2_from_base']:.4f}",
                f"- Decision: **{upd['decision']}** — {upd['reason']}", ""]
    tr = meta.get("transferability")
    if tr and tr.get("ranking"):
        rows = ", ".join(f"`{r['backbone']}` {r['logme']:.3f}" for r in tr["ranking"])
        out += ["## Backbone pre-ranking (LogME)", "", f"Ranking before the search: {rows}. Kept: {tr.get('kept')}."
                + (f" Spearman agreement with the search's results: {tr['spearman_vs_search']:.2f}."
                   if tr.get("spearman_vs_search") is not None else ""), ""]
    if meta.get("suspected_label_errors"):
        out += ["## Suspected label errors", "",
                f"{meta['suspected_label_errors']} training rows have labels the model finds unlikely "
                "(out-of-fold, confident learning); see `suspected_label_errors.csv`.", ""]
    exp = meta.get("exports", {})
    out += ["## Files", "", "- `model.safetensors` + `config.json`: load with `automl.load(dir)`"]
    for k, v in exp.items():
        out.append(f"- {k}: " + (f"`{v['file']}` (max abs diff vs PyTorch {v['max_abs_diff']:.2e})" if "file" in v
                                  else f"not exported ({v.get('error')})"))
    out += ["", "## Provenance", "", f"- Versions: {meta.get('versions', {})}", f"- Seed: {meta.get('seed')}",
            f"- Dataset fingerprint: {meta.get('fingerprint')}", f"- Wall time: {meta.get('wall_time_s', 0):.0f} s "
            f"(search {meta.get('search', {}).get('trial_epochs', '?')} trial-epochs; retrain "
            f"{meta.get('retrain', {}).get('time_s', 0):.0f} s on {meta.get('retrain', {}).get('workers', 1)} worker(s); "
            f"peak checkpoint disk {meta.get('search', {}).get('peak_disk_mb', 0):.0f} MB)",
            f"- Command: `{meta.get('command', '')}`", "",
            "## Intended use", "",
            "Predicts the classes above for inputs like the training data. Scores hold for data from the same "
            "distribution; check on your own held-out data before relying on it, and watch rare classes "
            "(see per-class recall).", ""]
    return "\n".join(out)


def write_card(out_dir, meta: dict, trials, history: dict | None) -> None:
    """MODEL_CARD.md + MODEL_CARD.html + figures, into an export being written."""
    from pathlib import Path

    from automl.export import plots
    from automl.export.mdhtml import to_html

    out_dir = Path(out_dir)
    figs = {}
    if history and trials is not None and len(trials):
        figs["learning_curves"] = plots.learning_curves(history, trials, meta.get("metric", "accuracy"),
                                                        meta.get("search", {}).get("space", {}).get("max_epochs", 1), out_dir)
    cm = meta.get("test_metrics", {}).get("confusion_matrix")
    if cm:
        figs["confusion_matrix"] = plots.confusion(cm, meta["classes"], out_dir)
    meta["figures"] = figs
    text = model_card(meta, trials)
    (out_dir / "MODEL_CARD.md").write_text(text)
    (out_dir / "MODEL_CARD.html").write_text(to_html(text, title=f"Model card: {meta['backbone']['model']}"))
