"""The export's manifest, assembled from what the stages handed over: the data, the plan, the search, the final
model, its test metrics and its diagnostics. The export stage sequences; this module decides what is recorded."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from automl import models
from automl.data.intake import TaskData, plain
from automl.export.manifest import ExportManifest, Preprocessing, Provenance

if TYPE_CHECKING:  # annotations only: export does not import the stages or the search engine
    from automl.search.plan import Plan
    from automl.search.tune import SearchResult
    from automl.stages import Diagnostics, FinalModel


def search_summary(result: "SearchResult", plan: "Plan") -> dict:
    """What the manifest records of the search: its best score, trial counts, space and where it ran."""
    trials = result.trials
    return {"best_score": result.best_score, "best_report": result.best_epoch, "n_trials": int(len(trials)),
            "stopped_early": int((trials["status"] == "STOPPED_EARLY").sum()),
            "errors": int((trials["status"] == "ERROR").sum()), "space": plan.space.to_dict(),
            "experiment_path": result.experiment_path, "trial_epochs": int(trials["epochs_run"].sum()),
            "peak_disk_mb": result.peak_disk_mb, "max_reports": plan.reports, "drift": result.drift}


def manifest_for(task: TaskData, final: "FinalModel", result: "SearchResult", plan: "Plan", *, classes: list,
                 metric: str, storage_size: int | None, target_scale, test_metrics: dict,
                 diagnostics: "Diagnostics", seed: int, base_model: Path | None) -> ExportManifest:
    """The manifest of `final` as exported: preprocessing, backbone, hyperparameters, plan, search, test metrics
    (per-group metrics apart), diagnostics and provenance."""
    from automl.search.prerank import agreement

    pre = Preprocessing(**{k: v for k, v in final.encoder.to_dict().items() if k in Preprocessing.__dataclass_fields__},
                        storage_size=storage_size, pooling=getattr(final.model, "pooling", None),
                        alpha_background=task.images.alpha_background if task.modality == "image" else "white")
    return ExportManifest(
        task=task.task, modality=task.modality, classes=classes if task.task != "regression" else [],
        label_column=task.label_column, input_columns=task.input_columns, preprocessing=pre,
        backbone=models.family(final.spec).underlying(final.spec), metric=metric,
        hyperparameters={k: plain(v) for k, v in final.config.items()},
        searched_hyperparameters={k: plain(v) for k, v in result.best_config.items()},
        target_scale=list(target_scale) if target_scale else None, plan=plan.to_dict(),
        search=search_summary(result, plan), training=final.training,
        test_metrics={k: v for k, v in test_metrics.items() if k != "groups"},
        group_metrics=test_metrics.get("groups"), data_report=task.report.to_dict(),
        cross_validation=diagnostics.cross_validation, suspected_label_errors=diagnostics.label_error_summary,
        transferability=agreement(result.transferability, result.trials, metric), update=diagnostics.update,
        provenance=Provenance(fingerprint=task.fingerprint(), seed=seed,
                              command=" ".join(sys.argv) if sys.argv and sys.argv[0] else "python",
                              base_model=str(base_model) if base_model else None))
