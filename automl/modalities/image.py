"""Images: files, bytes, PIL images or arrays in one column; decoded once into a store at the planned size."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from automl.modalities.base import Modality, register


# Decoding this many pixels again for the near-copy check costs ~5 s on 2 cores (702 PNG stamps, 32 MP: 1.8 s).
NEAR_COPY_PIXELS = 100_000_000
NEAR_COPY_MIN_SIDE = 24  # pixels: 8x8 digits 8 bits apart are other digits as often as copies


class ImageModality(Modality):
    name = "image"
    sized = True
    library = "timm"
    channels_last = True
    test_file = "test_split.npz"
    max_columns = 1
    column_hint = "an image column (file paths, bytes, PIL images or arrays)"

    def claims(self, sample):
        from PIL import Image

        from automl.data.images import looks_like_image_path

        first = sample.iloc[0]
        if isinstance(first, np.ndarray):
            return first.ndim >= 2  # a 1-d array is a feature vector, not an image
        if isinstance(first, (Image.Image, bytes, bytearray)) or (isinstance(first, dict) and "bytes" in first):
            return True
        strings = sample[sample.map(lambda v: isinstance(v, str))]
        return len(strings) > 0 and strings.map(looks_like_image_path).mean() >= 0.8

    def ensemble_input(self, first, member):
        import torch

        m0, s0 = torch.tensor(first["mean"]), torch.tensor(first["std"])
        mi, si = torch.tensor(member["mean"]), torch.tensor(member["std"])
        return (s0 / si).view(1, 3, 1, 1), ((m0 - mi) / si).view(1, 3, 1, 1), int(member["size"])

    # ------------------------------------------------------------------ data
    def present(self, df, columns):
        return df[columns[0]].map(lambda v: v is not None and not (isinstance(v, float) and np.isnan(v)))

    def read_rows(self, df, columns, base_dir, report, strict, preprocessing=None):
        from automl.data.intake import _inspect_images
        from automl.errors import DataError

        images, keys, keep = _inspect_images(df, columns[0], base_dir, report, strict=strict,
                                             alpha_background=_fill(preprocessing))
        if not len(images):
            raise DataError(f"None of the images in column {columns[0]!r} could be read "
                            f"(e.g. {report.dropped_unreadable_images[0]}). Fix: check the paths/files.")
        return images, keys, keep

    def task_fields(self, rows, keys):
        return {"images": rows, "image_keys": keys}

    def split_keys(self, keys, rows, report):
        # A picture saved again (resized, re-encoded) is the same picture: one split for all its copies, by a
        # perceptual hash (data/images.fingerprint). That decodes every image once more; where that would cost
        # more than ~NEAR_COPY_PIXELS of decoding (PNGs decode fully), exact copies only, and the report says so.
        from concurrent.futures import ThreadPoolExecutor

        from automl.data.images import NEAR_COPY_ALL_PAIRS, ImageDecodeError, fingerprint, near_copies

        pixels = int(np.prod(rows.sizes, axis=1).sum()) if len(rows) else 0
        if pixels > NEAR_COPY_PIXELS:
            report.notes.append(f"near-copy check of images skipped: {pixels / 1e6:.0f} megapixels to decode (at most "
                                f"{NEAR_COPY_PIXELS / 1e6:.0f}); only byte-identical images are kept to one split")
            return keys

        def one(i):
            if rows.sizes[i].min() < NEAR_COPY_MIN_SIDE:
                return None  # too small for a fingerprint to tell pictures apart: exact copies only
            try:
                return fingerprint(rows.values[i], rows.base_dir)
            except ImageDecodeError:
                return None  # it decoded at intake; keep its exact key
        with ThreadPoolExecutor(max_workers=min(8, 2 * (os.cpu_count() or 1))) as pool:
            prints = list(pool.map(one, range(len(rows)), chunksize=64))
        if len(set(prints)) > NEAR_COPY_ALL_PAIRS:
            report.notes.append(f"near copies of images found by equal fingerprints only: {len(set(prints))} distinct "
                                f"fingerprints (compared pairwise up to {NEAR_COPY_ALL_PAIRS})")
        return self.grouped(keys, [str(g) for g in near_copies(prints)])

    def read_for_prediction(self, df, columns, base_dir, preprocessing=None):
        from automl.data.images import ImageDecodeError, decode_image
        from automl.data.intake import require_columns
        from automl.errors import DataError

        missing = [c for c in columns if c not in df.columns]
        if len(missing) == 1 and "image" in df.columns:  # the column name the array/folder forms give
            df = df.rename(columns={"image": missing[0]})
        require_columns(df, columns)
        out, fill = [], _fill(preprocessing)
        # The row's index label, not its position: a chunk of a large file (automl predict) or a filtered table
        # named the wrong row.
        for i, v in zip(df.index, df[columns[0]].tolist()):
            try:
                out.append(decode_image(v, base_dir, alpha_background=fill))
            except ImageDecodeError as exc:
                raise DataError(f"Row {i} of column {columns[0]!r}: {exc}. This model expects images. "
                                "Fix: pass readable images (paths, bytes, PIL images or arrays).") from exc
        return out

    def frame(self, data, column):
        import pandas as pd

        one = isinstance(data, np.ndarray) and data.ndim <= 2  # a single image given as an array
        return pd.DataFrame({column: [data] if one else list(data)})

    def rows(self, task, idx, size):
        from automl.data.images import stack_resized

        return stack_resized([task.images[i] for i in idx], size)

    def store(self, task, storage_size, directory):
        from automl.data.inputs import ImageStore
        from automl.errors import DataError

        store, failures = ImageStore.build(task, int(storage_size), Path(directory))
        if len(failures) > len(task.images) / 2:  # nothing worth training on: say so, not train on blanks
            Path(store.path).unlink(missing_ok=True)  # nor leave it for the next run to reuse
            raise DataError(f"{len(failures)} of {len(task.images)} images passed the intake check but did not decode "
                            f"when read for training (first: {failures[0][1]}). Fix: keep the image files in place, "
                            "unchanged, while the run lasts.")
        for row, reason in failures:
            task.report.notes.append(f"image at row {task.row_index[row] if task.row_index is not None else row}"
                                     f" did not decode ({reason}); trained on as a blank image")
        return store, failures

    def describe(self, stats, task, space, tokenizer_of, gpu, seed):
        from automl.search.plan import image_side

        stats.image_side = image_side(task.images)
        size = space.pinned("image_size")
        return (size if isinstance(size, int) else None), None

    def prerank_input(self, task, idx, config):
        from automl.search.prerank import PRERANK_IMAGE

        # At the pinned size, else at a size every backbone sees enough of (the plan picks the real one later).
        if not isinstance(config.get("image_size"), int):
            config["image_size"] = PRERANK_IMAGE
        return self.rows(task, idx, config["image_size"])

    def base_pins(self, manifest):
        return {"image_size": manifest.preprocessing.size}

    # ------------------------------------------------------------------ training
    def augment(self, config, encoder):
        from automl.training import augment

        return augment.image_transform(config["augment"], int(config["image_size"]))

    def mixup(self, config, num_classes):
        if config["mix"] == "none":
            return None
        from timm.data import Mixup

        alpha = float(config["mix_alpha"])
        return Mixup(mixup_alpha=alpha if config["mix"] == "mixup" else 0.0,
                     cutmix_alpha=alpha if config["mix"] == "cutmix" else 0.0,
                     label_smoothing=float(config["label_smoothing"]), num_classes=num_classes)

    # ------------------------------------------------------------------ export and serving
    def model_inputs(self, raw, preprocessing, encoder):
        from automl.data.images import stack_resized

        return stack_resized(raw, preprocessing.storage_size)

    def stored_inputs(self, x, encoder):
        return x  # stored decoded and resized

    def encoder(self, preprocessing, export_dir):
        from automl.data.encoders import ImageEncoder

        return ImageEncoder(preprocessing.size, preprocessing.mean, preprocessing.std)

    def save_test_split(self, out, x, keep, labels):
        import json

        # Labels as JSON strings inside the npz: no object arrays, so no pickle on load.
        np.savez_compressed(Path(out) / self.test_file, x=np.asarray(x)[keep],
                            labels=np.asarray([json.dumps(v) for v in labels]))
        return self.test_file

    def load_test_split(self, export_dir):
        import json

        f = Path(export_dir) / self.test_file
        if not f.exists():
            return None
        with np.load(f, allow_pickle=False) as z:
            return z["x"], [json.loads(v) for v in z["labels"]]

    def parse_request(self, item, i, n_columns):
        from automl.data.images import ImageDecodeError, inspect_image
        from automl.ops.serve import RequestError, b64, kind_of

        if not isinstance(item, str):
            raise RequestError(422, f"input {i} is {kind_of(item)}; this image model expects images as base64 "
                                    "strings or data URLs (data:image/png;base64,...)")
        raw = b64(item, i)
        try:
            inspect_image(raw)
        except ImageDecodeError as exc:
            raise RequestError(422, f"input {i} is not a readable image ({exc}); expected PNG/JPEG/... "
                                    "bytes, base64-encoded") from None
        return raw

    def request_pixels(self, parsed):
        import io

        from PIL import Image

        with Image.open(io.BytesIO(parsed)) as img:  # the header only: nothing is decoded
            return img.size[0] * img.size[1]

    def request_frame(self, inputs, columns):
        import pandas as pd

        return pd.DataFrame({columns[0]: inputs})

    def resolve_paths(self, chunk, column, base):
        if column not in chunk:
            return chunk
        return chunk.assign(**{column: [str(Path(base) / p) if isinstance(p, str) and not Path(p).is_absolute()
                                        else p for p in chunk[column]]})


def _fill(preprocessing) -> str:
    """How an export's preprocessing fills transparent pixels (None: as training does now), checked."""
    from automl.data.images import ALPHA_BACKGROUND, ALPHA_BACKGROUNDS
    from automl.errors import DataError

    fill = getattr(preprocessing, "alpha_background", ALPHA_BACKGROUND)
    if fill not in ALPHA_BACKGROUNDS:
        raise DataError(f"This export fills transparent pixels with {fill!r}; this version of automl knows "
                        f"{list(ALPHA_BACKGROUNDS)}. Fix: load it with the automl version that wrote it "
                        "(its card's provenance names it).")
    return fill


register(ImageModality())
