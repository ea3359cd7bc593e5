"""What an export's config.json contains: one typed manifest, written and read here alone.

Schema 2 (this version). Schema 1 exports (automl 0.1 before the manifest) are
read by mapping their keys; their text models use the legacy architecture
(`export/legacy.py`).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from automl.errors import ModelLoadError
from automl.models.registry import BackboneSpec

SCHEMA_VERSION = 2
CONFIG = "config.json"


@dataclass
class Preprocessing:
    """How raw inputs become model inputs (identical in training, prediction, serving)."""

    kind: str                              # "image" or "text"
    size: int | None = None                # image: side the model sees
    mean: list[float] | None = None
    std: list[float] | None = None
    storage_size: int | None = None        # image: side images are decoded and stored at
    max_length: int | None = None          # text: tokens kept
    pooling: str | None = None             # text: "mean" or "cls"
    alpha_background: str = "white"        # image: transparent pixels' fill (data/images.py; "white" before 2026-12)


@dataclass
class Provenance:
    fingerprint: str | None = None         # content hash of the training data and its splits
    seed: int | None = None
    command: str = ""
    wall_time_s: float = 0.0
    versions: dict = field(default_factory=dict)
    created_at: str = ""
    base_model: str | None = None          # the export this one updated, if any


@dataclass
class ExportManifest:
    """Everything known about an exported model. `files` lists every file with its size (the integrity check)."""

    task: str                              # "binary", "multiclass" or "regression"
    modality: str                          # "image" or "text"
    classes: list                          # label values; position = output index
    label_column: str
    input_columns: list[str]
    preprocessing: Preprocessing
    backbone: BackboneSpec                 # the architecture (timm / hf), as built
    metric: str                            # the metric the search optimised
    hyperparameters: dict = field(default_factory=dict)            # full training config
    searched_hyperparameters: dict = field(default_factory=dict)   # only the ones active for this model
    target_scale: list[float] | None = None                        # regression: (mean, std) of the target
    plan: dict = field(default_factory=dict)                       # the search plan and why (search/plan.py)
    search: dict = field(default_factory=dict)                     # summary: trials, best score, statuses
    training: dict = field(default_factory=dict)                   # how the final weights were obtained
    test_metrics: dict = field(default_factory=dict)
    data_report: dict = field(default_factory=dict)
    cross_validation: dict | None = None
    suspected_label_errors: dict | None = None                     # count, expected precision, method
    transferability: dict | None = None                            # LogME pre-ranking
    update: dict | None = None                                     # comparison with a base model
    group_metrics: dict | None = None                              # per-group test metrics
    exports: dict = field(default_factory=dict)                    # onnx / torchscript files and parity
    figures: dict = field(default_factory=dict)
    test_split: str | None = None                                  # stored test rows (for later updates)
    budget: dict = field(default_factory=dict)                     # time per stage
    provenance: Provenance = field(default_factory=Provenance)
    files: dict = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    @property
    def num_classes(self) -> int:
        """Model outputs: one per class, or 1 for regression."""
        return len(self.classes) if self.task != "regression" else 1

    @property
    def is_regression(self) -> bool:
        return self.task == "regression"

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        d = asdict(self)
        d["num_classes"] = self.num_classes
        return d

    def write(self, directory: str | Path) -> None:
        (Path(directory) / CONFIG).write_text(json.dumps(self.to_dict(), indent=2, default=str))

    @classmethod
    def from_dict(cls, d: dict) -> "ExportManifest":
        d = dict(d)
        if int(d.get("schema_version", d.get("format_version", 1))) < 2:
            d = _from_schema_1(d)
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["preprocessing"] = Preprocessing(**d["preprocessing"])
        d["backbone"] = BackboneSpec.from_dict(d["backbone"])
        d["provenance"] = Provenance(**d.get("provenance") or {})
        return cls(**d)

    @classmethod
    def read(cls, directory: str | Path, check_files: bool = True) -> "ExportManifest":
        """Read and check an export's manifest; every listed file must be present with its size."""
        directory = Path(directory)
        cfg = directory / CONFIG
        if not cfg.exists():
            raise ModelLoadError(f"{str(directory)!r} is not an automl export: {CONFIG} is missing. "
                                 "Fix: pass the directory auto_finetune printed as the export dir.")
        raw = json.loads(cfg.read_text())
        version = int(raw.get("schema_version", raw.get("format_version", 1)))
        if version > SCHEMA_VERSION:
            raise ModelLoadError(f"{str(directory)!r} was written by a newer automl (schema {version}, this "
                                 f"version reads up to {SCHEMA_VERSION}). Fix: upgrade automl.")
        manifest = cls.from_dict(raw)
        if check_files:
            for name, size in manifest.files.items():
                f = directory / name
                if not f.exists() or f.stat().st_size != size:
                    raise ModelLoadError(f"Export {str(directory)!r} is incomplete or modified: {name} is "
                                         f"{'missing' if not f.exists() else 'a different size'}. "
                                         "Fix: re-export the model.")
        return manifest


def _from_schema_1(d: dict) -> dict[str, Any]:
    """Schema 1 kept provenance and the retrain at the top level; text models were HF sequence classifiers."""
    out = dict(d)
    out["schema_version"] = SCHEMA_VERSION  # converted: written back, it must not be converted again
    out["provenance"] = {"fingerprint": d.get("fingerprint"), "seed": d.get("seed"), "command": d.get("command", ""),
                         "wall_time_s": d.get("wall_time_s", 0.0), "versions": d.get("versions", {}),
                         "base_model": d.get("base_model")}
    out["training"] = {"how": "retrain", **(d.get("retrain") or {})}
    n = d.get("suspected_label_errors")
    out["suspected_label_errors"] = {"count": n} if isinstance(n, int) else None
    pre = dict(d["preprocessing"])
    out["preprocessing"] = {k: pre.get(k) for k in ("kind", "size", "mean", "std", "storage_size", "max_length")}
    if d.get("modality") == "text":
        out["preprocessing"]["pooling"] = "legacy"
    return out
