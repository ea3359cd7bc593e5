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

from automl.plugins import put

_IMAGE: dict[str, Callable[[int], Callable]] = {}
_TEXT: dict[str, Callable[[float, int], Callable]] = {}


def register_image_policy(name: str):
    def deco(fn):
        put(_IMAGE, name, fn, "image policy")
        return fn
    return deco


def register_text_policy(name: str):
    def deco(fn):
        put(_TEXT, name, fn, "text policy")
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


def text_transform(name: str, rate: float, mask_token_id: int | None, tokenizer=None):
    """A function token ids -> token ids acting on whole words (None: no per-sample work)."""
    if name not in _TEXT:
        raise KeyError(f"Unknown text augmentation {name!r}; registered: {list_text_policies()}")
    return _TEXT[name](rate, mask_token_id, word_starts(tokenizer) if name != "none" else None)


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
# Text policies act on whole words: a word is a token that starts one plus the continuation pieces after it
# ("##ing" in WordPiece; SentencePiece/BPE mark word starts instead). Rows keep their first and last token
# ([CLS]/[SEP] or <s>/</s>) intact.

def word_starts(tokenizer) -> "list[bool] | None":
    """For each token id: does it start a word? Read once from the tokenizer's vocabulary."""
    if tokenizer is None:
        return None
    vocab = tokenizer.get_vocab()
    starts = [True] * (max(vocab.values()) + 1)
    marks = [t for t in vocab if t.startswith(("\u2581", "\u0120"))]   # SentencePiece "▁", byte-level BPE "Ġ"
    for tok, i in vocab.items():
        if marks:
            starts[i] = tok.startswith(("\u2581", "\u0120")) or not tok[:1].isalnum()
        else:
            starts[i] = not tok.startswith("##")
    return starts


def _words(ids: list[int], starts) -> list[list[int]]:
    words: list[list[int]] = []
    for t in ids[1:-1]:
        if words and starts is not None and t < len(starts) and not starts[t]:
            words[-1].append(t)
        else:
            words.append([t])
    return words


def _join(ids: list[int], words: list[list[int]]) -> list[int]:
    return [ids[0]] + [t for w in words for t in w] + [ids[-1]]


@register_text_policy("none")
def _text_none(rate, mask_id, starts=None):
    return None


@register_text_policy("mask")
def _mask(rate, mask_id, starts=None):
    if mask_id is None:
        return _delete(rate, mask_id, starts)  # tokenizer without a mask token: fall back to dropping words

    def f(ids: list[int]) -> list[int]:
        return _join(ids, [[mask_id] * len(w) if random.random() < rate else w for w in _words(ids, starts)])
    return f


@register_text_policy("delete")
def _delete(rate, mask_id, starts=None):
    def f(ids):
        words = _words(ids, starts)
        return _join(ids, [w for w in words if random.random() >= rate] or words[:1])
    return f


@register_text_policy("swap")
def _swap(rate, mask_id, starts=None):
    def f(ids):
        words = _words(ids, starts)
        for _ in range(max(1, int(rate * len(words)))):
            if len(words) < 2:
                break
            i = random.randrange(len(words) - 1)  # neighbours: keeps the sentence readable
            words[i], words[i + 1] = words[i + 1], words[i]
        return _join(ids, words)
    return f
