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
    out += ["## Summary", "",
            f"- Task: {meta['task']} {meta['modality']} classification, {meta['num_classes']} classes: "
            f"{', '.join(map(str, meta['classes'][:30]))}{' …' if len(meta['classes']) > 30 else ''}",
            f"- Backbone: `{meta['backbone']['model']}` ({meta['backbone']['library']}, "
            f"pretrained={meta['backbone']['pretrained']})",
            f"- Test {metric}: **{m.get(metric, float('nan')):.4f}** on {rep.get('split_sizes', {}).get('test', '?')} "
            f"held-out examples (accuracy {m.get('accuracy', float('nan')):.4f}, macro-F1 {m.get('f1_macro', float('nan')):.4f}, "
            f"ECE {m.get('ece', float('nan')):.4f})",
            f"- Selected on validation {metric} = {meta.get('search', {}).get('best_score', float('nan')):.4f} after "
            f"{meta.get('search', {}).get('n_trials', '?')} trials; retrained on train+validation for "
            f"{meta.get('retrain', {}).get('epochs', '?')} epochs", ""]
    out += ["## Data", "", f"- Rows received: {rep.get('rows_received')}, used: {rep.get('rows_used')}",
            f"- Split sizes: {rep.get('split_sizes')}", f"- Class counts: {rep.get('class_counts')}",
            f"- Imbalance ratio (largest/smallest class): {rep.get('imbalance_ratio', 1.0):.2f}",
            f"- Dropped: missing label {rep.get('dropped_missing_label', 0)}, missing input "
            f"{rep.get('dropped_missing_input', 0)}, unreadable images {len(rep.get('dropped_unreadable_images', []))}, "
            f"duplicates {rep.get('dropped_duplicates', 0)}, conflicting duplicates "
            f"{rep.get('dropped_conflicting_duplicates', 0)}, rare classes {rep.get('dropped_rare_classes', {})}", ""]
    out += ["## Winning hyperparameters", "", "```", *[f"{k}: {v}" for k, v in meta["hyperparameters"].items()], "```", ""]
    if trials is not None and len(trials):
        keep = [c for c in trials.columns if c.startswith("best_val") or c in ("status", "epochs_run", "best_epoch")]
        cfg_cols = [c for c in ("config/backbone", "config/unfreeze", "config/schedule", "config/augment",
                                "config/text_augment", "config/lr") if c in trials.columns]
        top = trials[["trial_id", *cfg_cols, *keep]].head(10).copy()
        top.columns = [c.replace("config/", "") for c in top.columns]
        counts = trials["status"].value_counts().to_dict() if "status" in trials else {}
        out += ["## Search", "", f"Trials by status: {counts}", "", "Top trials (validation):", "", _table(top), ""]
    if "per_class" in m:
        pc = pd.DataFrame({"class": meta["classes"], **{k: v for k, v in m["per_class"].items()}})
        out += ["## Per-class test metrics", "", _table(pc), ""]
    exp = meta.get("exports", {})
    out += ["## Files", "", "- `model.safetensors` + `config.json`: load with `automl.load(dir)`"]
    for k, v in exp.items():
        out.append(f"- {k}: " + (f"`{v['file']}` (max abs diff vs PyTorch {v['max_abs_diff']:.2e})" if "file" in v
                                  else f"not exported ({v.get('error')})"))
    out += ["", "## Provenance", "", f"- Versions: {meta.get('versions', {})}", f"- Seed: {meta.get('seed')}",
            f"- Dataset fingerprint: {meta.get('fingerprint')}", f"- Wall time: {meta.get('wall_time_s', 0):.0f} s", "",
            "## Intended use", "",
            "Predicts the classes above for inputs like the training data. Scores hold for data from the same "
            "distribution; check on your own held-out data before relying on it, and watch rare classes "
            "(see per-class recall).", ""]
    return "\n".join(out)
