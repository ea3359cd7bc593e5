"""Model inputs of a task, materialised once and shared by path.

Images are decoded and resized to the planned size once, in parallel (Ray tasks when Ray is up), into a
memory-mapped uint8 N x 3 x S x S array under the run's storage; every trial, the retrain and the cross-fit
open it by path, so nothing large goes through the driver or the object store. Texts are tokenised once per
(tokenizer, max length) into a disk cache beside it. What a trial holds is a `Rows` handle: a store and row
numbers.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from automl.data.images import ImageDecodeError, decode_image, resize_rgb
from automl.data.intake import TaskData, class_weights
from automl.data.trial_data import TrialData

CHUNK = 512  # images per decoding task


def _decode_into(path: str, start: int, values: list, base_dir: str | None, size: int,
                 alpha_background: str) -> list[tuple[int, str]]:
    """Decode `values` into rows start.. of the memory-mapped array at `path`; returns (row, reason) failures."""
    arr = np.load(path, mmap_mode="r+")
    failures = []
    for j, value in enumerate(values):
        try:
            arr[start + j] = resize_rgb(decode_image(value, base_dir, alpha_background=alpha_background),
                                        size).transpose(2, 0, 1)
        except ImageDecodeError as exc:  # it passed the integrity check but its pixels do not decode
            arr[start + j] = 255
            failures.append((start + j, str(exc)))
    arr.flush()
    del arr
    return failures


@dataclass
class ImageStore:
    """A memory-mapped N x 3 x S x S uint8 file; opened lazily, once per process."""

    path: str
    size: int
    _array: Any = field(default=None, repr=False, compare=False)

    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r")
        return self._array

    def __getstate__(self):  # ship the path, never the pages
        return {"path": self.path, "size": self.size, "_array": None}

    @classmethod
    def build(cls, task: TaskData, size: int, directory: Path,
              parallel: bool | None = None) -> tuple["ImageStore", list[tuple[int, str]]]:
        """Decode every image of `task` at `size` into directory/images-<fingerprint>-<size>.npy (reused when
        there); in parallel Ray tasks when Ray is running (parallel=None), else here."""
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"images-{task.fingerprint()}-{size}.npy"
        failed = path.with_suffix(".failures.json")  # kept beside it: a reused store reports its blanks again
        if path.exists():
            return cls(str(path), size), [tuple(f) for f in json.loads(failed.read_text())] if failed.exists() else []
        tmp = directory / f".{path.name}.{uuid.uuid4().hex[:6]}.tmp.npy"
        n = len(task.images)
        np.lib.format.open_memmap(str(tmp), mode="w+", dtype=np.uint8, shape=(n, 3, size, size)).flush()
        chunks = [(s, task.images.values[s:s + CHUNK]) for s in range(0, n, CHUNK)]
        failures: list = []
        import ray

        use_ray = (ray.is_initialized() and len(chunks) > 1) if parallel is None else parallel
        try:
            if use_ray:
                # On this node only: tasks on other nodes writing parts of one memory-mapped file over a network
                # filesystem could write back whole pages over each other's rows at the chunk boundaries.
                from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

                here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
                task_fn = ray.remote(num_cpus=1)(_decode_into).options(scheduling_strategy=here)
                refs = [task_fn.remote(str(tmp), s, vals, task.images.base_dir, size, task.images.alpha_background)
                        for s, vals in chunks]
                for part in ray.get(refs):
                    failures += part
            else:
                for s, vals in chunks:
                    failures += _decode_into(str(tmp), s, vals, task.images.base_dir, size, task.images.alpha_background)
            if failures:
                failed.write_text(json.dumps(failures))
            else:
                failed.unlink(missing_ok=True)  # an earlier store's, since rebuilt
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)  # gone already when it was renamed into place
        return cls(str(path), size), failures


@dataclass
class TextStore:
    """All rows' texts, and a disk cache of their token ids per (tokenizer, max length)."""

    texts: list
    cache_dir: str | None
    key: str                                   # the texts' content hash
    _ids: dict = field(default_factory=dict, repr=False, compare=False)

    def __getstate__(self):
        return {"texts": self.texts, "cache_dir": self.cache_dir, "key": self.key, "_ids": {}}

    def ids(self, encoder) -> list:
        """Token ids of every row for this encoder: tokenised once, by whichever process needs them first."""
        name = hashlib.sha1(f"{encoder.tokenizer.name_or_path}|{encoder.max_length}|{self.key}".encode()).hexdigest()
        if name in self._ids:
            return self._ids[name]
        path = Path(self.cache_dir) / f"tokens-{name[:20]}.npz" if self.cache_dir else None
        ids = None
        if path is not None and path.exists():
            try:
                with np.load(path, allow_pickle=False) as z:
                    flat, offsets = z["flat"], z["offsets"]
                ids = [flat[offsets[i]:offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]
            except (OSError, ValueError, KeyError):
                ids = None  # a torn file: tokenise again
        if ids is None:
            ids = encoder.encode(self.texts)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{uuid.uuid4().hex[:6]}.tmp.npz")
                lengths = np.asarray([len(r) for r in ids], dtype=np.int64)
                np.savez(tmp, flat=np.asarray([t for r in ids for t in r], dtype=np.int32),
                         offsets=np.concatenate([[0], np.cumsum(lengths)]))
                os.replace(tmp, path)
        self._ids[name] = ids
        return ids


@dataclass
class Rows:
    """Some rows of a store: what a trial's x_train / x_val hold. rows[idx] gives model-ready inputs for those
    rows (a uint8 image array, or the texts)."""

    store: ImageStore | TextStore
    idx: np.ndarray

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i):
        j = self.idx[i]
        if isinstance(self.store, ImageStore):
            if isinstance(j, np.ndarray):
                order = np.argsort(j)  # memmaps read fastest in order
                out = np.empty((len(j), 3, self.store.size, self.store.size), dtype=np.uint8)
                out[order] = self.store.array()[j[order]]
                return out
            return self.store.array()[j]
        if isinstance(j, np.ndarray):
            return [self.store.texts[k] for k in j]
        return self.store.texts[j]

    def take(self, idx: np.ndarray) -> "Rows":
        return Rows(self.store, self.idx[np.asarray(idx)])

    def key(self) -> str:
        """Identifies the rows' content (for the feature cache) without reading them."""
        store = self.store.path if isinstance(self.store, ImageStore) else self.store.key
        return hashlib.sha1(f"{store}|".encode() + np.ascontiguousarray(self.idx).tobytes()).hexdigest()


def sample_rows(rows: np.ndarray, y: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """About n of `rows` (y: their labels), each class in proportion and every class kept (a class with one row
    keeps it), whatever n is: unlike a stratified split, it has no left-over part that must hold every class."""
    if n >= len(rows):
        return np.sort(rows)
    rng = np.random.default_rng(seed)
    share = n / len(rows)
    keep = [rng.permutation(rows[y == c])[:max(1, round(share * (y == c).sum()))] for c in np.unique(y)]
    return np.sort(np.concatenate(keep))


@dataclass
class Inputs:
    """Every row's input, materialised once: images in a memory-mapped store, texts with a token cache."""

    task: TaskData
    store: ImageStore | TextStore
    storage_size: int | None = None
    target_scale: tuple[float, float] | None = None   # regression: (mean, std) of train+validation targets
    failures: list = field(default_factory=list)       # images whose pixels did not decode (replaced by white)

    @classmethod
    def materialise(cls, task: TaskData, storage_size: int | None, directory: str | Path) -> "Inputs":
        from automl import modalities

        store, failures = modalities.get(task.modality).store(task, storage_size, Path(directory))
        scale = None
        if task.task == "regression":
            # Standardised with train+validation statistics, fixed for search and retrain alike.
            y = task.y[np.concatenate([task.splits["train"], task.splits["validation"]])]
            scale = (float(y.mean()), float(y.std() or 1.0))
        return cls(task, store, storage_size, scale, failures)

    def rows(self, idx: np.ndarray) -> Rows:
        return Rows(self.store, np.asarray(idx))

    def pick(self, idx: np.ndarray):
        """The inputs of rows `idx` themselves (an array, or a list of texts): for small sets, e.g. the test split."""
        return self.rows(idx)[np.arange(len(idx))]

    def split(self, name: str) -> np.ndarray:
        if name == "full":
            return np.concatenate([self.task.splits["train"], self.task.splits["validation"]])
        return self.task.splits[name]

    def scored(self, split: str = "validation", max_rows: int | None = None) -> np.ndarray:
        """The rows of `split` that are scored: all, or a stratified sample of `max_rows` (the same sample each
        time, so trials, rung 0 and the final choice score the same rows)."""
        rows, t = self.split(split), self.task
        if max_rows and len(rows) > max_rows:
            rows = sample_rows(rows, t.y[rows] if t.task != "regression" else np.zeros(len(rows)), max_rows)
        return rows

    def trial_data(self, train: str = "train", validation: str | None = "validation",
                   cache_dir: str | None = None, max_val: int | None = None) -> TrialData:
        """What a trial (train on `train`, score on `validation`) or a retrain (`full`, no validation) needs.

        max_val: score on a stratified sample of at most this many validation rows (large validation sets
        would cost more than the training between two reports)."""
        t = self.task
        tr = self.split(train)
        va = self.scored(validation, max_val) if validation else None
        regression = t.task == "regression"
        return TrialData(t.modality, t.num_classes, self.rows(tr), t.y[tr],
                         self.rows(va) if va is not None else None, t.y[va] if va is not None else None,
                         None if regression else class_weights(t.y[tr], t.num_classes),
                         task="regression" if regression else "classification", cache_dir=cache_dir,
                         target_scale=self.target_scale)
