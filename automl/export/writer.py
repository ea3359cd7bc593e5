"""Write an export directory atomically, and read one back without pickle.

Layout: model.safetensors, config.json (backbone, head, preprocessing, label
map, hyperparameters, versions, fingerprint, file manifest), hf/ (tokenizer
and architecture config for text models), model.pt (TorchScript), model.onnx,
trials.csv, metrics.json, data_report.json, MODEL_CARD.md.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch

from automl.errors import ModelLoadError

FORMAT_VERSION = 1
CONFIG = "config.json"
WEIGHTS = "model.safetensors"


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("automl", "torch", "torchvision", "timm", "transformers", "ray", "optuna", "scikit-learn"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _example_batch(model, meta: dict):
    pre = meta["preprocessing"]
    if pre["kind"] == "image":
        return (torch.randn(2, 3, pre["size"], pre["size"]),)
    ids = torch.randint(1000, 2000, (2, 16), dtype=torch.long)
    return (ids, torch.ones_like(ids))


def _script_and_onnx(model, meta: dict, out: Path) -> dict:
    """TorchScript and ONNX copies, each checked against PyTorch on a sample batch."""
    report: dict = {}
    example = _example_batch(model, meta)
    with torch.no_grad():
        ref = model(*example).numpy()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(model, example, strict=False, check_trace=False)
        traced.save(str(out / "model.pt"))
        diff = float(np.abs(torch.jit.load(str(out / "model.pt"))(*example).detach().numpy() - ref).max())
        report["torchscript"] = {"file": "model.pt", "max_abs_diff": diff}
    except Exception as exc:  # some architectures do not trace; the safetensors export still stands
        report["torchscript"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    names = ["pixel_values"] if len(example) == 1 else ["input_ids", "attention_mask"]
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
        if diff > 1e-3 * max(1.0, float(np.abs(ref).max())):
            os.remove(out / "model.onnx")
            raise RuntimeError(f"ONNX output differs from PyTorch by {diff:.3g} (max abs); the ONNX file was not kept")
        report["onnx"] = {"file": "model.onnx", "opset": 17, "max_abs_diff": diff, "inputs": names}
    except Exception as exc:
        warnings.warn(f"ONNX export failed: {exc}")
        report["onnx"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    return report


def write_export(target: str | Path, model, meta: dict, tables: dict[str, object] | None = None,
                 tokenizer=None, formats: bool = True,
                 writers: list | None = None) -> Path:
    """Write everything to a temp dir next to `target`, then rename it into place.

    A crash at any point leaves either the previous export or none at `target`,
    never a half-written one.
    """
    from safetensors.torch import save_model

    target = Path(target).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        model = model.cpu().eval()
        save_model(model, str(tmp / WEIGHTS))
        if tokenizer is not None or model.library == "hf":
            (tmp / "hf").mkdir()
            if meta.get("classes"):
                model.body.config.id2label = {i: str(c) for i, c in enumerate(meta["classes"])}
                model.body.config.label2id = {str(c): i for i, c in enumerate(meta["classes"])}
            # A complete transformers folder: AutoModelForSequenceClassification.from_pretrained(dir/"hf") works.
            model.body.save_pretrained(str(tmp / "hf"))
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp / "hf"))
        meta = dict(meta)
        if formats:
            meta["exports"] = _script_and_onnx(model, meta, tmp)
        for name, table in (tables or {}).items():
            if hasattr(table, "to_csv"):
                table.to_csv(tmp / name, index=False)
            else:
                (tmp / name).write_text(json.dumps(table, indent=2, default=str))
        for write in writers or []:
            write(tmp, meta)  # e.g. the model card and its figures, which may use the export results
        meta["format_version"] = FORMAT_VERSION
        meta["versions"] = versions()
        meta["files"] = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        # config.json last: its manifest vouches for every other file.
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2, default=str))
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


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    cfg = path / CONFIG
    if not cfg.exists():
        raise ModelLoadError(f"{str(path)!r} is not an automl export: {CONFIG} is missing. "
                             "Fix: pass the directory auto_finetune printed as the export dir.")
    meta = json.loads(cfg.read_text())
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ModelLoadError(f"{str(path)!r} was written by a newer automl (format {meta['format_version']}). "
                             "Fix: upgrade automl.")
    for name, size in meta.get("files", {}).items():
        f = path / name
        if not f.exists() or f.stat().st_size != size:
            raise ModelLoadError(f"Export {str(path)!r} is incomplete or modified: {name} is "
                                 f"{'missing' if not f.exists() else 'a different size'}. Fix: re-export the model.")
    return meta


def load_model(path: str | Path):
    """Rebuild (model, encoder, meta) from the files alone: no pickle."""
    from safetensors.torch import load_model as st_load

    from automl.models import registry as backbones
    from automl.data.encoders import ImageEncoder, TextEncoder

    path = Path(path).resolve()
    meta = read_meta(path)
    spec = backbones.BackboneSpec(**meta["backbone"])
    if spec.library == "hf":
        spec = backbones.BackboneSpec("hf", str(path / "hf"), pretrained=False)
    model = backbones.build(spec, meta["num_classes"], dropout=meta["hyperparameters"].get("dropout", 0.0) or 0.0,
                            pretrained=False)
    st_load(model, str(path / WEIGHTS))
    model.eval()
    pre = meta["preprocessing"]
    if pre["kind"] == "image":
        encoder = ImageEncoder(pre["size"], pre["mean"], pre["std"])
    else:
        encoder = TextEncoder(backbones.load_tokenizer(str(path / "hf")), pre["max_length"])
    return model, encoder, meta
