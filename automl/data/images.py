"""Decode whatever a user holds as an image into an RGB uint8 array.

Accepted: file paths (absolute or relative to a base dir), raw bytes, PIL
images and numpy arrays (HxW, HxWx1/3/4, float in [0,1] or any numeric
range). Grayscale, palette and RGBA images are converted to RGB; transparent
pixels are composited over white, or over black where what is drawn is nearly white, so icons keep their shape. A
photo's EXIF orientation is applied, so the pixels are the ones a viewer shows (a phone stores most photos
sideways with a tag saying so).
"""
from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


MAX_PIXELS = 40_000_000  # larger images are refused: decoding one would take gigabytes
EXIF_ORIENTATION = 0x0112
_SIDEWAYS = (5, 6, 7, 8)  # orientations that turn the image a quarter: its height and width swap
# How each EXIF orientation is undone (as ImageOps.exif_transpose does, without re-encoding the EXIF block, which
# raises on malformed tags that getexif() read without complaint).
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1 = upright), read from the header; 1 where there is none or it is unreadable."""
    try:
        return int(img.getexif().get(EXIF_ORIENTATION, 1) or 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not refuse an otherwise readable image
        return 1


class ImageDecodeError(Exception):
    """One image could not be read; the message names the file and why."""


def looks_like_image_path(value: object) -> bool:
    return isinstance(value, (str, os.PathLike)) and str(value).lower().endswith(IMAGE_EXTENSIONS)


# How transparent pixels are filled: "contrast" (white, or black under a nearly white drawing) or "white" (exports made
# before "contrast", whose models were trained on that).
ALPHA_BACKGROUNDS = ("contrast", "white")
ALPHA_BACKGROUND = "contrast"  # how training reads images now (and what a task's fingerprint takes as given)
# A drawing whose opaque pixels average at least this luminance (0-1) goes over black: a white glyph over white is
# a blank image (its shape is only in the alpha channel). Only a nearly white one: at 0.7, half the Oxygen icons
# went over black and `fixed` (one config fine-tuned, benchmarks/quality.py) lost 10 points of macro-F1 over 3
# seeds (0.547 against 0.649 over white the day before; `ours` 3.8): a class's backgrounds were no longer alike.
# At 0.9: 14 of 861 Oxygen icons, 4 of 702 stamps.
LIGHT_DRAWING = 0.9


def _to_rgb(img: Image.Image, alpha_background: str) -> Image.Image:
    if img.mode.startswith("I") or img.mode == "F":
        # 16- and 32-bit greys (scans, microscopy, depth maps) and float images: Pillow's convert() clips them at
        # 255, so a 16-bit PNG decoded nearly white and a float one in [0, 1] black. Scaled as arrays are.
        return _array_to_pil(np.asarray(img)).convert("RGB")
    if has_transparency(img):
        img = img.convert("RGBA")
        fill = 0 if alpha_background == "contrast" and _drawing_luminance(img) >= LIGHT_DRAWING else 255
        background = Image.new("RGBA", img.size, (fill, fill, fill, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")


def has_transparency(img: Image.Image) -> bool:
    """Whether an image has an alpha channel or a transparent palette entry."""
    return img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)


def _drawing_luminance(img: Image.Image) -> float:
    """The mean luminance (0-1, Pillow's "L") of an RGBA image's pixels weighed by their opacity (0 where nothing
    is opaque)."""
    alpha = np.asarray(img.getchannel("A"), dtype=np.float32)
    weight = alpha.sum()
    if weight <= 0:
        return 0.0
    return float((np.asarray(img.convert("L"), dtype=np.float32) * alpha).sum() / weight / 255.0)


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
        finite = np.isfinite(arr)
        if not finite.any():  # a black image would keep its label: refused as unreadable instead
            raise ImageDecodeError(f"array of shape {arr.shape} holds no finite value (all NaN or infinite)")
        # The range of the finite values: one infinite pixel scaled the rest of its image to black.
        lo, hi = float(arr[finite].min()), float(arr[finite].max())
        if lo >= 0.0 and hi <= 1.0:
            arr = arr * 255.0
        elif hi > 255.0 or lo < 0.0:
            arr = (arr - lo) / max(hi - lo, 1e-12) * 255.0
        arr = np.clip(np.nan_to_num(arr, nan=0.0, posinf=255.0, neginf=0.0), 0, 255).astype(np.uint8)
    mode = "L" if arr.ndim == 2 else ("RGBA" if arr.shape[-1] == 4 else "RGB")
    return Image.fromarray(arr, mode=mode)


def decode_image(value: object, base_dir: str | os.PathLike | None = None, max_side: int = 512,
                 alpha_background: str = ALPHA_BACKGROUND) -> np.ndarray:
    """Return an HxWx3 uint8 array, or raise ImageDecodeError saying why. alpha_background: how transparent pixels
    are filled (ALPHA_BACKGROUNDS)."""
    try:
        if isinstance(value, Image.Image):
            img = value
        elif isinstance(value, (bytes, bytearray, memoryview)):
            img = Image.open(io.BytesIO(bytes(value)))
        elif isinstance(value, dict) and "bytes" in value:  # Hugging Face datasets Image feature
            if value.get("bytes") is not None:
                img = Image.open(io.BytesIO(value["bytes"]))
            else:
                return decode_image(value.get("path"), base_dir, max_side, alpha_background)
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
        if img.size[0] * img.size[1] > MAX_PIXELS:  # read from the header, before a pixel is decoded
            raise ImageDecodeError(f"image of {img.size[0]}x{img.size[1]} pixels; at most {MAX_PIXELS} "
                                   "(a decompression bomb?)")
        img.load()
        turn = _UPRIGHT.get(_orientation(img))
        if turn is not None:
            img = img.transpose(turn)
        img = _to_rgb(img, alpha_background)
    except ImageDecodeError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"cannot decode image ({type(exc).__name__}: {exc})") from exc
    if max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def resize_rgb(arr: np.ndarray, size: int) -> np.ndarray:
    """An HxWx3 uint8 image as size x size x 3."""
    if arr.shape[0] != size or arr.shape[1] != size:
        arr = np.asarray(Image.fromarray(arr).resize((size, size), Image.Resampling.BICUBIC))
    return arr


def stack_resized(images, size: int) -> np.ndarray:
    """Resize every image to size x size and stack as N x 3 x size x size uint8."""
    out = np.empty((len(images), 3, size, size), dtype=np.uint8)
    for i, arr in enumerate(images):
        out[i] = resize_rgb(arr, size).transpose(2, 0, 1)
    return out


def _raw_bytes(value, base_dir) -> tuple[bytes | None, object]:
    """(the encoded file's bytes, or None for decoded values) and the value to open."""
    if isinstance(value, dict) and "bytes" in value:  # Hugging Face datasets Image feature
        value = value["bytes"] if value.get("bytes") is not None else value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value), value
    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        if not path.exists():
            raise ImageDecodeError(f"file does not exist: {path}")
        try:
            return path.read_bytes(), path
        except OSError as exc:
            raise ImageDecodeError(f"cannot read {path} ({type(exc).__name__}: {exc})") from exc
    return None, value


def inspect_image(value: object, base_dir: str | os.PathLike | None = None) -> tuple[str, int, int]:
    """(content hash, height, width) of an image, checked for integrity without keeping its pixels.

    Encoded files are hashed as bytes and checked by PIL: verify() (structure and checksums), and then, for
    every format but PNG, a full decode, since JPEG's verify() checks nothing and a truncated JPEG would decode
    to a blank image later. JPEGs decode at 1/8 scale (libjpeg still reads every entropy-coded segment, so a
    truncation is caught) to keep this cheap. PNG's verify() already reads every chunk through IEND with its
    CRC, which catches a truncated file. The pixels are decoded for training once, later, at the size the plan
    picks (data/inputs.py).
    """
    raw, value = _raw_bytes(value, base_dir)
    if raw is not None:
        try:
            with Image.open(io.BytesIO(raw)) as img:
                w, h = img.size
                if w * h > MAX_PIXELS:
                    raise ImageDecodeError(f"image of {w}x{h} pixels; at most {MAX_PIXELS} (a decompression bomb?)")
                fmt = img.format
                img.verify()
            if fmt != "PNG":  # verify() leaves the image unusable: open it again to decode it
                with Image.open(io.BytesIO(raw)) as img:
                    if fmt == "JPEG":
                        img.draft(None, (max(1, w // 8), max(1, h // 8)))
                    img.load()
                    if _orientation(img) in _SIDEWAYS:  # photos carry it (PNGs rarely; their size is a hint only)
                        h, w = w, h  # the size it is decoded at (decode_image applies the orientation)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise ImageDecodeError(f"cannot decode image ({type(exc).__name__}: {exc})") from exc
        return hashlib.sha1(raw).hexdigest(), h, w
    arr = decode_image(value)  # an array or a PIL image: already in memory
    return hashlib.sha1(arr.tobytes() + str(arr.shape).encode()).hexdigest(), arr.shape[0], arr.shape[1]


def fingerprint(value: object, base_dir: str | os.PathLike | None = None) -> str:
    """A perceptual key: a difference hash of the image (9x9 grey levels, one bit per horizontal and vertical
    step, 128 bits) and its mean colour. Resizing or re-encoding an image keeps it (nearly: see near_copies), so
    copies of one picture in other forms can be found; an exact-bytes hash cannot."""
    arr = decode_image(value, base_dir, max_side=64)
    grey = np.asarray(Image.fromarray(arr).convert("L").resize((9, 9), Image.Resampling.BOX), dtype=np.int16)
    bits = np.concatenate([(grey[:, 1:] > grey[:, :-1])[:8].ravel(), (grey[1:, :] > grey[:-1, :])[:, :8].ravel()])
    # With the mean colour: grey levels alone would make a picture and its recoloured variant one.
    tint = arr.reshape(-1, 3).mean(axis=0).round().astype(np.uint8)
    return np.packbits(bits).tobytes().hex() + tint.tobytes().hex()


NEAR_COPY_BITS = 8  # of fingerprint's 128: copies of 702 stamps resized to 60% as JPEGs differ by <= 7 in 9 of 10
#                     (<= 14 all), distinct stamps (their colour variants aside) by more
NEAR_COPY_SHADE = 12  # of 255: the most a copy's mean colour may differ in a channel
NEAR_COPY_ALL_PAIRS = 20_000  # distinct fingerprints compared pairwise (~2 s at this many); above, equal ones only
NEAR_COPY_MAX_LINKS = 5_000_000  # close pairs kept at most (memory); past it, equal fingerprints only


def near_copies(prints: list[str | None]) -> list[int]:
    """A group number for every row: rows whose fingerprints differ in at most NEAR_COPY_BITS bits and
    NEAR_COPY_SHADE in mean colour are one group, and so are their own near copies (None: a row of its own)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    keys = [f if f is not None else i for i, f in enumerate(prints)]  # a row without one is its own
    uniq, group = np.unique(np.array([str(k) for k in keys]), return_inverse=True)
    have = [j for j, u in enumerate(uniq) if len(u) == 38]  # 32 hex digits of bits, 6 of colour
    rows, cols, links = [], [], 0
    if 1 < len(have) <= NEAR_COPY_ALL_PAIRS:
        words = np.array([np.frombuffer(bytes.fromhex(uniq[j][:32]), dtype=">u8") for j in have], dtype=np.uint64)
        tint = np.array([np.frombuffer(bytes.fromhex(uniq[j][32:]), dtype=np.uint8) for j in have], dtype=np.int16)
        idx = np.asarray(have)
        for a in range(0, len(have), 256):
            d = np.bitwise_count(words[a:a + 256, None, :] ^ words[None, :, :]).sum(axis=-1)
            shade = np.abs(tint[a:a + 256, None, :] - tint[None, :, :]).max(axis=-1)
            x, y = np.nonzero((d <= NEAR_COPY_BITS) & (shade <= NEAR_COPY_SHADE))
            links += len(x)
            if links > NEAR_COPY_MAX_LINKS:
                rows, cols = [], []
                break
            rows.append(idx[x + a])
            cols.append(idx[y])
    if not rows:
        return group.tolist()
    r, c = np.concatenate(rows), np.concatenate(cols)
    graph = coo_matrix((np.ones(len(r), dtype=np.int8), (r, c)), shape=(len(uniq), len(uniq)))
    _, component = connected_components(graph, directed=False)
    return component[group].tolist()


class ImageSource(Sequence):
    """A task's images as the user gave them (paths, bytes, PIL images, arrays): pixels are decoded on demand,
    so holding 50,000 images costs their references, not tens of GB. `source[i]` is an HxWx3 uint8 array."""

    def __init__(self, values: list, base_dir: str | None, sizes: np.ndarray,
                 alpha_background: str = ALPHA_BACKGROUND):
        # Absolute: relative paths are the caller's (its working directory, or the table's folder), and the Ray
        # tasks that decode them run in a worker's working directory, not the caller's.
        self.values, self.sizes = list(values), np.asarray(sizes, dtype=np.int64)
        self.base_dir = os.path.abspath(base_dir) if base_dir else os.getcwd()
        self.alpha_background = alpha_background  # how transparent pixels are filled (decode_image)

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return decode_image(self.values[i], self.base_dir, alpha_background=self.alpha_background)

    def subset(self, keep: np.ndarray) -> "ImageSource":
        keep = np.asarray(keep)
        idx = np.flatnonzero(keep) if keep.dtype == bool else keep
        return ImageSource([self.values[i] for i in idx], self.base_dir, self.sizes[idx], self.alpha_background)

    def longer_sides(self) -> np.ndarray:
        return self.sizes.max(axis=1) if len(self.sizes) else np.zeros(0, dtype=np.int64)
