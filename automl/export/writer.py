"""Write an export directory atomically, and read one back without pickle.

Layout: model.safetensors and config.json (the manifest, see manifest.py), what
the backbone family needs to rebuild the architecture offline (hf/ for text:
config and tokenizer), model.pt (TorchScript), model.onnx, trials.csv,
metrics.json, data_report.json, the model card and its figures.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import io
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from automl import modalities
from automl.errors import ModelLoadError
from automl.export.manifest import SCHEMA_VERSION, ExportManifest
from automl.models.registry import family

WEIGHTS = "model.safetensors"
PARITY_TOLERANCE = 1e-3  # TorchScript and ONNX copies are kept only within this (relative) max abs difference


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("automl", "torch", "torchvision", "timm", "transformers", "ray", "optuna", "scikit-learn"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _script_and_onnx(model, manifest: ExportManifest, out: Path) -> dict:
    """TorchScript and ONNX copies, each checked against PyTorch on a sample batch."""
    report: dict = {}
    fam = family(model)
    example = fam.example_inputs(vars(manifest.preprocessing))
    with torch.no_grad():
        ref = model(*example).numpy()
    tolerance = PARITY_TOLERANCE * max(1.0, float(np.abs(ref).max()))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(model, example, strict=False, check_trace=False)
        traced.save(str(out / "model.pt"))
        diff = float(np.abs(torch.jit.load(str(out / "model.pt"))(*example).detach().numpy() - ref).max())
        if not diff <= tolerance:  # NaN fails too
            os.remove(out / "model.pt")
            raise RuntimeError(f"TorchScript output differs from PyTorch by {diff:.3g} (max abs); the TorchScript "
                               "file was not kept")
        report["torchscript"] = {"file": "model.pt", "max_abs_diff": diff}
    except Exception as exc:  # some architectures do not trace; the safetensors export still stands
        warnings.warn(f"TorchScript export failed: {exc}")
        report["torchscript"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    names = list(fam.input_names) or (["pixel_values"] if len(example) == 1 else ["input_ids", "attention_mask"])
    axes = {n: ({0: "batch"} if len(example) == 1 else {0: "batch", 1: "sequence"}) for n in names}
    axes["logits"] = {0: "batch"}
    try:
        import onnxruntime as ort

        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(model, example, str(out / "model.onnx"), input_names=names, output_names=["logits"],
                              dynamic_axes=axes, opset_version=17, dynamo=False)
        sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
        got = sess.run(None, {n: t.numpy() for n, t in zip(names, example)})[0]
        diff = float(np.abs(got - ref).max())
        if not diff <= tolerance:
            os.remove(out / "model.onnx")
            raise RuntimeError(f"ONNX output differs from PyTorch by {diff:.3g} (max abs); the ONNX file was not kept")
        report["onnx"] = {"file": "model.onnx", "opset": 17, "max_abs_diff": diff, "inputs": names}
    except Exception as exc:
        warnings.warn(f"ONNX export failed: {exc}")
        report["onnx"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    return report


def write_export(target: str | Path, model, encoder, manifest: ExportManifest,
                 tables: dict[str, object] | None = None, formats: bool = True,
                 writers: list[Callable[[Path, ExportManifest], None]] | None = None) -> Path:
    """Write everything to a temp dir next to `target`, then rename it into place.

    A crash at any point leaves either the previous export or none at `target`,
    never a half-written one. `writers(dir, manifest)` add files (the test split,
    the model card) and may fill in manifest fields.
    """
    import json

    from safetensors.torch import save_model

    target = Path(target).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        model = model.cpu().eval()
        save_model(model, str(tmp / WEIGHTS))
        fam = family(model)
        fam.save_extra(model, encoder, tmp)
        if formats:
            manifest.exports = _script_and_onnx(model, manifest, tmp)
        if hasattr(fam, "save_transformers"):  # text: hf/ loads in plain transformers (see hf/README.md)
            manifest.exports["transformers"] = fam.save_transformers(model, tmp, manifest)
        for name, table in (tables or {}).items():
            if hasattr(table, "to_csv"):
                table.to_csv(tmp / name, index=False)
            else:
                (tmp / name).write_text(json.dumps(table, indent=2, default=str))
        for write in writers or []:
            write(tmp, manifest)
        manifest.provenance.versions = versions()
        manifest.provenance.created_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        manifest.files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest.write(tmp)  # last: its file list vouches for every other file
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_model(path: str | Path):
    """Rebuild (model, encoder, manifest) from the files alone: no pickle."""
    from safetensors.torch import load_model as st_load

    path = Path(path).resolve()
    manifest = ExportManifest.read(path)
    _check_architecture(manifest.backbone, path)
    pre = manifest.preprocessing
    if pre.pooling == "legacy":
        from automl.export.legacy import rebuild

        model = rebuild(path)
    else:
        model = family(manifest.backbone).rebuild(path, manifest.backbone, manifest.num_classes,
                                                  manifest.hyperparameters)
    st_load(model, str(path / WEIGHTS))
    model.eval()
    return model, modalities.get(manifest.modality).encoder(pre, path), manifest


# What an export's config.json may name as its architecture. An export is rebuilt from its own files only: an
# "automl" backbone (an earlier export as a fine-tune's start) would make the loader open another directory, or
# itself without end; timm arguments that name files would make timm read them.
EXPORT_LIBRARIES = {"timm", "hf", "ensemble"}
MEMBER_LIBRARIES = {"timm", "hf"}
_FILE_ARGS = ("path", "file", "checkpoint", "pretrained", "url", "hub")


def _check_architecture(backbone, path: Path) -> None:
    from automl.models.registry import BackboneSpec

    def refuse(what: str) -> None:
        raise ModelLoadError(f"{path} is not a loadable automl export: its config.json names {what}. An export is "
                             "rebuilt from its own files only (timm or Hugging Face architectures, or an ensemble of "
                             "them). Fix: load an export written by automl, or re-export the model.")

    members = [BackboneSpec.from_dict(m["backbone"]) for m in backbone.kwargs.get("members", [])] \
        if backbone.library == "ensemble" else []
    if backbone.library not in EXPORT_LIBRARIES:
        refuse(f"the backbone library {backbone.library!r}")
    for spec in [backbone] + members:
        if spec is not backbone and spec.library not in MEMBER_LIBRARIES:
            refuse(f"an ensemble member of library {spec.library!r}")
        bad = sorted(k for k in spec.kwargs if spec.library == "timm" and any(w in k.lower() for w in _FILE_ARGS))
        if bad:
            refuse(f"timm arguments that read files or download ({', '.join(bad)})")


def strip_test_split(path: str | Path) -> list[str]:
    """Remove the stored test split (rows of the user's data) from an export, atomically; the model still loads
    and predicts, and its card says that a later update cannot measure forgetting. Returns the removed files."""
    import pandas as pd

    from automl.export.card import write_card

    path = Path(path).resolve()
    manifest = ExportManifest.read(path)
    gone = [f for f in ("test_split.npz", "test_split.jsonl") if (path / f).exists()]
    if not gone:
        return []
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    shutil.copytree(path, tmp)
    try:
        for f in gone:
            (tmp / f).unlink()
        manifest.test_split = None
        manifest.schema_version = SCHEMA_VERSION  # written in today's layout (an old export was read into it)
        trials = pd.read_csv(tmp / "trials.csv") if (tmp / "trials.csv").exists() else None
        write_card(tmp, manifest, trials, None)
        manifest.files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*"))
                          if p.is_file() and str(p.relative_to(tmp)) != "config.json"}
        manifest.write(tmp)
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return gone
