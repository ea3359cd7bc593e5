"""Decode whatever a user holds as an image into an RGB uint8 array.

Accepted: file paths (absolute or relative to a base dir), raw bytes, PIL
images and numpy arrays (HxW, HxWx1/3/4, float in [0,1] or any numeric
range). Grayscale, palette and RGBA images are converted to RGB; transparent
pixels are composited over white so icons keep their shape.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class ImageDecodeError(Exception):
    """One image could not be read; the message names the file and why."""


def looks_like_image_path(value: object) -> bool:
    return isinstance(value, (str, os.PathLike)) and str(value).lower().endswith(IMAGE_EXTENSIONS)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")


def _array_to_pil(arr: np.ndarray) -> Image.Image:
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # CHW -> HWC
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise ImageDecodeError(f"array of shape {arr.shape} is not an image (expected HxW, HxWx3 or HxWx4)")
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        if lo >= 0.0 and hi <= 1.0:
            arr = arr * 255.0
        elif hi > 255.0 or lo < 0.0:
            arr = (arr - lo) / max(hi - lo, 1e-12) * 255.0
        arr = np.clip(np.nan_to_num(arr), 0, 255).astype(np.uint8)
    mode = "L" if arr.ndim == 2 else ("RGBA" if arr.shape[-1] == 4 else "RGB")
    return Image.fromarray(arr, mode=mode)


def decode_image(value: object, base_dir: str | os.PathLike | None = None, max_side: int = 512) -> np.ndarray:
    """Return an HxWx3 uint8 array, or raise ImageDecodeError saying why."""
    try:
        if isinstance(value, Image.Image):
            img = value
        elif isinstance(value, (bytes, bytearray, memoryview)):
            img = Image.open(io.BytesIO(bytes(value)))
        elif isinstance(value, dict) and "bytes" in value:  # Hugging Face datasets Image feature
            if value.get("bytes") is not None:
                img = Image.open(io.BytesIO(value["bytes"]))
            else:
                return decode_image(value.get("path"), base_dir, max_side)
        elif isinstance(value, np.ndarray):
            img = _array_to_pil(value)
        elif isinstance(value, (str, os.PathLike)):
            path = Path(value)
            if not path.is_absolute() and base_dir is not None:
                path = Path(base_dir) / path
            if not path.exists():
                raise ImageDecodeError(f"file does not exist: {path}")
            img = Image.open(path)
        else:
            raise ImageDecodeError(f"unsupported image value of type {type(value).__name__}")
        img.load()
        img = _to_rgb(img)
    except ImageDecodeError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageDecodeError(f"cannot decode image ({type(exc).__name__}: {exc})") from exc
    if max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def stack_resized(images: list[np.ndarray], size: int) -> np.ndarray:
    """Resize every image to size x size and stack as N x 3 x size x size uint8."""
    out = np.empty((len(images), 3, size, size), dtype=np.uint8)
    for i, arr in enumerate(images):
        if arr.shape[0] != size or arr.shape[1] != size:
            arr = np.asarray(Image.fromarray(arr).resize((size, size), Image.Resampling.BICUBIC))
        out[i] = arr.transpose(2, 0, 1)
    return out
