"""Augmentation policies, keyed by name.

Image policies map a uint8 CxHxW tensor to a uint8 CxSxS tensor (torchvision
v2 ops, which work on tensors, so no PIL round trip per sample). Text
policies map a list of token ids to a list of token ids. Adding a policy is
one decorated function returning the transform.
"""
from __future__ import annotations

import random
from typing import Callable

import torch

_IMAGE: dict[str, Callable[[int], Callable]] = {}
_TEXT: dict[str, Callable[[float, int], Callable]] = {}


def register_image_policy(name: str):
    def deco(fn):
        _IMAGE[name] = fn
        return fn
    return deco


def register_text_policy(name: str):
    def deco(fn):
        _TEXT[name] = fn
        return fn
    return deco


def list_image_policies() -> list[str]:
    return sorted(_IMAGE)


def list_text_policies() -> list[str]:
    return sorted(_TEXT)


def image_transform(name: str, size: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """None means: no per-sample work (inputs can be preprocessed once)."""
    if name not in _IMAGE:
        raise KeyError(f"Unknown image augmentation {name!r}; registered: {list_image_policies()}")
    return _IMAGE[name](size)


def text_transform(name: str, rate: float, mask_token_id: int | None):
    if name not in _TEXT:
        raise KeyError(f"Unknown text augmentation {name!r}; registered: {list_text_policies()}")
    return _TEXT[name](rate, mask_token_id)


# ---------------------------------------------------------------------------- images

def _resize(size: int):
    import torchvision.transforms.v2 as T
    return T.Resize((size, size), antialias=True)


@register_image_policy("none")
def _none(size):
    return None


@register_image_policy("flip_crop")
def _flip_crop(size):
    import torchvision.transforms.v2 as T
    return T.Compose([T.RandomResizedCrop(size, scale=(0.6, 1.0), antialias=True), T.RandomHorizontalFlip()])


@register_image_policy("crop")
def _crop(size):
    import torchvision.transforms.v2 as T
    # Shift/scale only: safe for data where mirror images change the class (digits, text in images).
    return T.Compose([T.RandomResizedCrop(size, scale=(0.7, 1.0), ratio=(0.85, 1.18), antialias=True)])


@register_image_policy("randaugment")
def _randaugment(size):
    import torchvision.transforms.v2 as T
    return T.Compose([_resize(size), T.RandAugment(num_ops=2, magnitude=9)])


@register_image_policy("trivialaugment")
def _trivial(size):
    import torchvision.transforms.v2 as T
    return T.Compose([_resize(size), T.TrivialAugmentWide()])


@register_image_policy("autoaugment")
def _autoaugment(size):
    import torchvision.transforms.v2 as T
    return T.Compose([_resize(size), T.AutoAugment(T.AutoAugmentPolicy.IMAGENET)])


# ---------------------------------------------------------------------------- text

@register_text_policy("none")
def _text_none(rate, mask_id):
    return None


@register_text_policy("mask")
def _mask(rate, mask_id):
    if mask_id is None:
        return _delete(rate, mask_id)  # tokenizer without a mask token: fall back to dropping tokens

    def f(ids: list[int]) -> list[int]:
        # Keep [CLS]/[SEP] (first and last) intact.
        return [ids[0]] + [mask_id if random.random() < rate else t for t in ids[1:-1]] + [ids[-1]]
    return f


@register_text_policy("delete")
def _delete(rate, mask_id):
    def f(ids):
        body = [t for t in ids[1:-1] if random.random() >= rate] or ids[1:2]
        return [ids[0]] + body + [ids[-1]]
    return f


@register_text_policy("swap")
def _swap(rate, mask_id):
    def f(ids):
        body = list(ids[1:-1])
        for _ in range(max(1, int(rate * len(body)))):
            if len(body) < 2:
                break
            i, j = random.randrange(len(body)), random.randrange(len(body))
            body[i], body[j] = body[j], body[i]
        return [ids[0]] + body + [ids[-1]]
    return f
