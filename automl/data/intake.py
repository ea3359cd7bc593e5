"""Data intake: turn what the user has into a clean, split, labelled task.

Everything a user can get wrong is rejected here, before Ray starts and
before any compute is spent. Nothing is dropped without being counted in the
DataReport.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from automl import modalities
from automl.errors import DataError
from automl.data.images import ALPHA_BACKGROUND, IMAGE_EXTENSIONS, ImageDecodeError, ImageSource, inspect_image

LABEL_NAMES = ("label", "labels", "target", "class", "y", "category", "sentiment", "intent", "topic", "emotion")
TABLE_EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".json": "jsonl"}
SPLIT_NAMES = {"train": "train", "training": "train", "val": "validation", "valid": "validation",
               "validation": "validation", "dev": "validation", "test": "test", "testing": "test"}
MIN_PER_CLASS = 3  # one example each for train, validation and test


@dataclass
class DataReport:
    """What intake did to the data; written to data_report.json and the model card."""

    rows_received: int = 0
    rows_used: int = 0
    dropped_missing_label: int = 0
    dropped_missing_input: int = 0
    dropped_unreadable_images: list[dict] = field(default_factory=list)
    dropped_duplicates: int = 0
    dropped_conflicting_duplicates: int = 0
    dropped_rare_classes: dict = field(default_factory=dict)
    ignored_columns: list[str] = field(default_factory=list)
    class_counts: dict = field(default_factory=dict)
    imbalance_ratio: float = 1.0
    split_sizes: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["class_counts"] = {str(k): int(v) for k, v in self.class_counts.items()}
        return d


@dataclass
class TaskData:
    """A cleaned classification task with fixed train/validation/test splits."""

    modality: str                     # "image" or "text"
    task: str                         # "binary" or "multiclass"
    classes: list                     # original label values; position = class code
    y: np.ndarray                     # int64 class codes
    input_columns: list[str]
    label_column: str
    splits: dict[str, np.ndarray]     # "train" / "validation" / "test" -> row positions
    report: DataReport
    images: ImageSource | None = None         # decoded on demand: images[i] is HxWx3 uint8
    image_keys: list[str] | None = None       # content hash of each image
    texts: list[list[str]] | None = None     # one string per text column, per row
    base_dir: str | None = None
    row_index: np.ndarray | None = None      # each kept row's index in the user's table
    groups: np.ndarray | None = None         # each row's group (the `groups` column), for per-group metrics
    groups_column: str | None = None

    @property
    def num_classes(self) -> int:
        """Model outputs: one per class, or 1 for regression."""
        return len(self.classes) if self.task != "regression" else 1

    @property
    def rows(self):
        """Every row's input as the modality keeps it (an image collection, or a list of text tuples)."""
        return self.images if self.images is not None else self.texts

    def inputs(self, idx: np.ndarray) -> list:
        return [self.rows[i] for i in idx]

    def fingerprint(self) -> str:
        """Content hash of inputs+labels+splits: pins the test split across runs."""
        h = hashlib.sha256()
        h.update(self.modality.encode())
        for i in range(len(self.y)):
            if self.images is not None:
                h.update(self.image_keys[i].encode())
            else:
                h.update("\x1f".join(self.texts[i]).encode("utf-8", "replace"))
            h.update(str(self.y[i]).encode())
        for name in ("train", "validation", "test"):
            h.update(self.splits[name].tobytes())
        if self.images is not None and self.images.alpha_background != ALPHA_BACKGROUND:  # other pixels (an update)
            h.update(f"alpha_background={self.images.alpha_background}".encode())
        return h.hexdigest()[:16]


# ---------------------------------------------------------------------------- reading

def _read_table(path: Path) -> pd.DataFrame:
    kind = TABLE_EXTENSIONS.get(path.suffix.lower())
    if kind is None:
        raise DataError(
            f"Unsupported file extension {path.suffix!r} for {str(path)!r}; expected one of "
            f"{sorted(TABLE_EXTENSIONS)} or a folder of images in class subfolders. "
            "Fix: convert the file to CSV/Parquet/JSON Lines, or pass a pandas DataFrame.")
    try:
        if kind == "csv":
            return pd.read_csv(path, encoding="utf-8")
        if kind == "tsv":
            return pd.read_csv(path, sep="\t", encoding="utf-8")
        if kind == "parquet":
            return pd.read_parquet(path)
        return pd.read_json(path, lines=True, encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{str(path)!r} is not valid UTF-8 text ({exc.reason} at byte {exc.start}); expected a UTF-8 "
            "encoded file. Fix: re-save it as UTF-8 (e.g. iconv -f latin1 -t utf-8), or read it with "
            "pandas using the right encoding and pass the DataFrame.") from exc
    except (ValueError, OSError) as exc:
        raise DataError(f"Could not read {str(path)!r} as {kind}: {exc}. Fix: check the file is a valid {kind} file.") from exc


def _read_image_folder(root: Path) -> pd.DataFrame:
    """root/<class>/<file>, or root/{train,val,test}/<class>/<file>."""
    split_dirs = {SPLIT_NAMES[p.name.lower()]: p for p in root.iterdir()
                  if p.is_dir() and p.name.lower() in SPLIT_NAMES}
    rows = []
    sources = split_dirs.items() if split_dirs else [(None, root)]
    for split, base in sources:
        for class_dir in sorted(p for p in base.iterdir() if p.is_dir()):
            for f in sorted(class_dir.rglob("*")):
                if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                    row = {"image": str(f), "label": class_dir.name}
                    if split:
                        row["split"] = split
                    rows.append(row)
    if not rows:
        raise DataError(
            f"Folder {str(root)!r} holds no images in class subfolders; expected root/<class>/<image file> "
            f"with extensions {IMAGE_EXTENSIONS}. Fix: arrange images as root/cat/1.png, root/dog/2.png, ...")
    return pd.DataFrame(rows)


def existing_path(data: str | os.PathLike) -> Path:
    """A dataset's path (~ expanded), or a DataError saying it does not exist."""
    path = Path(data).expanduser()
    if not path.exists():
        raise DataError(f"Dataset path {str(path)!r} does not exist. Fix: pass an existing file or folder.")
    return path


def to_dataframe(data: Any) -> tuple[pd.DataFrame, str | None]:
    """Normalise every accepted input form to (DataFrame, base dir for relative paths)."""
    if isinstance(data, pd.DataFrame):
        return data, None
    if isinstance(data, (str, os.PathLike)):
        path = existing_path(data)
        if path.is_dir():
            return _read_image_folder(path), None
        return _read_table(path), str(path.parent)
    if isinstance(data, tuple) and len(data) == 2:
        X, y = data
        X = np.asarray(X) if not isinstance(X, list) else X
        if len(X) != len(y):
            raise DataError(f"(X, y) have different lengths: {len(X)} inputs and {len(y)} labels. Fix: pass one label per input.")
        if isinstance(X, np.ndarray) and X.ndim == 2 and int(np.sqrt(X.shape[1])) ** 2 == X.shape[1]:
            side = int(np.sqrt(X.shape[1]))
            X = X.reshape(len(X), side, side)  # flattened square images, e.g. sklearn digits
        # The column is named after the modality that reads it (an export's input column for predict(X)).
        col = modalities.detect(pd.Series(list(X[:50]))) or "input"
        return pd.DataFrame({col: list(X), "label": list(y)}), None
    if hasattr(data, "to_pandas") and hasattr(data, "features"):  # datasets.Dataset
        return data.to_pandas(), None
    if hasattr(data, "keys") and all(hasattr(data[k], "to_pandas") for k in data.keys()):  # DatasetDict
        frames = []
        for k in data.keys():
            part = data[k].to_pandas()
            part["split"] = SPLIT_NAMES.get(k.lower(), k)
            frames.append(part)
        return pd.concat(frames, ignore_index=True), None
    raise DataError(
        f"Unsupported dataset type {type(data).__name__}; expected a pandas DataFrame, a path to a "
        "CSV/TSV/Parquet/JSONL file or an image folder, an (X, y) tuple, or a Hugging Face Dataset. "
        "Fix: convert your data to one of these (pandas.DataFrame is simplest).")


# ---------------------------------------------------------------------------- columns

def find_label_column(df: pd.DataFrame, label: str | None) -> str:
    if label is not None:
        if label not in df.columns:
            raise DataError(
                f"Label column {label!r} not found; the columns are {list(map(str, df.columns))}. "
                "Fix: pass label= one of these columns.")
        return label
    lower = {str(c).lower(): c for c in df.columns}
    for name in LABEL_NAMES:
        if name in lower:
            return lower[name]
    raise DataError(
        f"No label column given and none is named one of {LABEL_NAMES}; the columns are "
        f"{list(map(str, df.columns))}. Fix: pass label='<column with the classes>'.")


def infer_inputs(df: pd.DataFrame, label_col: str, inputs: list[str] | None, exclude: tuple = (),
                 report: DataReport | None = None) -> tuple[str, list[str], list[str]]:
    """Return (modality, input columns, ignored columns): each column's modality is the adapters' call
    (modalities.detect); where columns of several modalities are present the first registered wins. Columns the
    adapter reads as row identifiers are ignored unless named in `inputs` (said in `report`'s notes)."""
    candidates = [c for c in df.columns if c != label_col and str(c).lower() != "split" and c not in exclude]
    if inputs is not None:
        missing = [c for c in inputs if c not in df.columns]
        if missing:
            raise DataError(f"Input columns {missing} not found; the columns are {list(map(str, df.columns))}. "
                            "Fix: pass inputs= existing column names.")
        candidates = list(inputs)
    kinds = {c: modalities.detect(df[c]) for c in candidates}
    found = {name: [c for c, k in kinds.items() if k == name] for name in modalities.names()}
    found = {name: cols for name, cols in found.items() if cols}
    if not found:
        empty = [c for c in candidates if df[c].dropna().empty]
        detail = f" (all values empty in {empty})" if empty else ""
        expected = " or ".join(modalities.get(n).column_hint or f"a {n} column" for n in modalities.names())
        raise DataError(
            f"No usable input column{detail}: columns {[str(c) for c in candidates]} hold no inputs of a known "
            f"modality ({', '.join(modalities.names())}); expected {expected}. "
            "Fix: add such a column, or pass inputs=[...] naming it.")
    if len(found) > 1 and inputs is not None:
        mixed = " and ".join(f"{name} columns {cols}" for name, cols in found.items())
        raise DataError(f"Inputs mix {mixed}; one modality per model is supported. "
                        "Fix: pass inputs= with the columns of one modality only.")
    modality, chosen = next(iter(found.items()))
    adapter = modalities.get(modality)
    identifiers = adapter.identifiers(df, chosen) if inputs is None else []
    chosen = [c for c in chosen if c not in identifiers][: adapter.max_columns]
    ignored = [str(c) for c in candidates if c not in chosen]
    if report is not None and identifiers:
        report.notes.append(
            f"column(s) {[str(c) for c in identifiers]} left out of the inputs: every value is distinct and has no "
            "space, as row ids and URLs do. Pass inputs=[...] naming them to use them.")
    return modality, list(chosen), ignored


# ---------------------------------------------------------------------------- cleaning

def _clean_labels(df: pd.DataFrame, label_col: str, report: DataReport) -> pd.DataFrame:
    missing = df[label_col].isna() | df[label_col].map(lambda v: isinstance(v, str) and not v.strip())
    report.dropped_missing_label = int(missing.sum())
    if missing.all():
        raise DataError(f"All {len(df)} labels in column {label_col!r} are missing. Fix: fill in the labels.")
    df = df[~missing]
    nested = df[label_col].map(lambda v: isinstance(v, (list, tuple, dict, set, np.ndarray)))
    if nested.any():
        raise DataError(f"Label column {label_col!r} holds {type(df[label_col][nested].iloc[0]).__name__} values "
                        f"(e.g. {str(df[label_col][nested].iloc[0])[:80]}); expected one label per row (a string or "
                        "a number). Multi-label targets are not supported. Fix: one row per label, or join the "
                        f"labels into one string, e.g. df[{label_col!r}].map('|'.join).")
    types = set(df[label_col].map(lambda v: "number" if isinstance(v, (int, float, np.number, bool)) else type(v).__name__))
    if len(types) > 1:
        examples = {t: str(df[label_col][df[label_col].map(
            lambda v: ("number" if isinstance(v, (int, float, np.number, bool)) else type(v).__name__) == t)].iloc[0])
            for t in types}
        raise DataError(
            f"Label column {label_col!r} mixes value types {sorted(types)} (e.g. {examples}); expected one type. "
            f"Fix: convert the labels to one type, e.g. df[{label_col!r}] = df[{label_col!r}].astype(str).")
    for variants in _spelling_variants(df[label_col])[:5]:
        # Said, not merged: "Cat" and "cat" may be two classes on purpose; a stray space from a CSV rarely is.
        spaced_only = len({spelling_key(v, case=True) for v in variants}) == 1
        join = ".str.strip()" if spaced_only else ".str.strip().str.lower()"
        report.notes.append(f"labels {', '.join(map(repr, variants))} differ only in case or spacing and are trained "
                            f"as {len(variants)} classes, as given; if they are one, fix the labels (e.g. "
                            f"df[{label_col!r}] = df[{label_col!r}]{join}).")
    return df


def spelling_key(text: str, case: bool = False) -> str:
    """A text as a reader sees it: spacing ignored, and case unless `case` ("Cat  dog " and "cat dog" are one)."""
    text = " ".join(text.split())
    return text if case else text.casefold()


def _spelling_variants(labels: pd.Series) -> list[list[str]]:
    """Groups of distinct string labels that are equal once case and spacing are ignored ("Cat", "cat ")."""
    groups: dict[str, list[str]] = {}
    for v in labels.unique():
        if isinstance(v, str):
            groups.setdefault(spelling_key(v), []).append(v)
    return [sorted(g) for g in groups.values() if len(g) > 1]


def _inspect_images(df: pd.DataFrame, col: str, base_dir: str | None, report: DataReport, strict: bool,
                    alpha_background: str):
    """Check every image (in parallel threads: reading and verifying files releases the GIL), keeping its hash
    and size but not its pixels (decoded later with transparent pixels filled as `alpha_background` says)."""
    from concurrent.futures import ThreadPoolExecutor

    values = df[col].tolist()

    def one(value):
        try:
            return inspect_image(value, base_dir)
        except ImageDecodeError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        results = list(pool.map(one, values, chunksize=64))
    keys, sizes, keep = [], [], []
    for pos, (value, res) in enumerate(zip(values, results)):
        if isinstance(res, ImageDecodeError):
            row = df.index[pos]
            report.dropped_unreadable_images.append({"row": row.item() if hasattr(row, "item") else row,
                                                     "file": str(value)[:200], "reason": str(res)})
        else:
            keys.append(res[0])
            sizes.append(res[1:])
            keep.append(pos)
    if strict and report.dropped_unreadable_images:
        bad = report.dropped_unreadable_images
        raise DataError(
            f"{len(bad)} of {len(df)} images in column {col!r} cannot be read, e.g. row {bad[0]['row']} "
            f"({bad[0]['file']!r}): {bad[0]['reason']}. Expected readable image files. Fix: correct or remove these "
            "rows, or pass drop_bad_images=True to drop them (they are listed in the data report).")
    images = ImageSource([values[p] for p in keep], base_dir, np.asarray(sizes, dtype=np.int64).reshape(-1, 2),
                         alpha_background)
    return images, keys, keep


def _dedupe(keys: list, y: pd.Series, report: DataReport) -> np.ndarray:
    """Keep the first of exact duplicates; drop every copy of inputs with conflicting labels."""
    frame = pd.DataFrame({"k": keys, "y": y.astype(str).to_numpy()})
    n_labels = frame.groupby("k")["y"].transform("nunique")
    conflicting = n_labels > 1
    report.dropped_conflicting_duplicates = int(conflicting.sum())
    dup = frame.duplicated(["k"]) & ~conflicting
    report.dropped_duplicates = int(dup.sum())
    return (~(conflicting | dup)).to_numpy()


SPLIT_CODES = ("train", "validation", "test")


def row_positions(keys: list[str], seed: int) -> np.ndarray:
    """Each row's place in [0, 1), from a hash of the seed and the row's content alone: it does not depend on the
    other rows, their number or their order, so a row keeps it when the data grows."""
    out = np.empty(len(keys), dtype=np.float64)
    salt = f"{seed}\x1e".encode()
    for i, k in enumerate(keys):
        out[i] = int.from_bytes(hashlib.blake2b(salt + k.encode("utf-8", "replace"), digest_size=8).digest(),
                                "big") / 2.0 ** 64
    return out


def _split(strata: np.ndarray, u: np.ndarray, val_frac: float, test_frac: float) -> dict[str, np.ndarray]:
    """A split that is stable as the data grows, stratified, with every class in every split asked for.

    A row's split follows from its hash position u alone: test if u < test_frac, validation if
    u >= 1 - val_frac, train otherwise. Rows added later never move an old row, so a model is never scored
    on rows it trained on because the data grew; and a smaller fraction (more data: smaller default
    fractions) only moves rows from test or validation to train, never the other way. The cut points are
    the same for every class, so each class gets about the fractions asked for.

    Per class (a stratum), a split asked for that the hash left empty takes the row nearest to its range from
    a split that holds more than one row of that class; train keeps at least one row of every class. Small
    classes (a few rows) can therefore shift a row as they grow; the row moved into test is the class's
    lowest-u train row, which stays the same row, or becomes a new one, as data is added.
    """
    n = len(strata)
    code = np.zeros(n, dtype=np.int64)  # 0 train, 1 validation, 2 test
    code[u >= 1.0 - val_frac] = 1
    code[u < test_frac] = 2
    target = {0: test_frac + (1.0 - val_frac - test_frac) / 2, 1: 1.0, 2: 0.0}
    wanted = [0] + ([1] if val_frac > 0 else []) + ([2] if test_frac > 0 else [])
    for c in np.unique(strata):
        rows = np.flatnonzero(strata == c)
        for s in wanted:
            held = code[rows]
            if (held == s).any():
                continue
            counts = np.bincount(held, minlength=3)
            donors = rows[counts[held] > 1]
            if s == 0 and not len(donors):
                donors = rows  # a class with one row: it trains
            if not len(donors):
                continue
            code[donors[np.argmin(np.abs(u[donors] - target[s]))]] = s
    return {name: np.flatnonzero(code == k).astype(np.int64) for k, name in enumerate(SPLIT_CODES)}


CARVE_FRAC = 0.15  # the share of train carved out for a split the split column does not have


def _carve(splits: dict, missing: list[str], strata: np.ndarray, u: np.ndarray, classes: list, task: str,
           split_col, report: DataReport) -> dict:
    """Carve the splits a split column lacks out of its train rows (stably, per class), and only those: every
    train row ends in exactly one split, and no class loses its last training row."""
    tr = splits["train"]
    part = _split(strata[tr], u[tr], CARVE_FRAC if "validation" in missing else 0.0,
                  CARVE_FRAC if "test" in missing else 0.0)
    out = dict(splits)
    out["train"] = tr[part["train"]]
    for k in missing:
        out[k] = tr[part[k]]
    carved = " and ".join(f"{len(out[k])} {k} rows" for k in missing)
    report.notes.append(
        f"the split column {str(split_col)!r} has no {' or '.join(missing)} rows: {carved} were carved out of the "
        f"{len(tr)} train rows (about {CARVE_FRAC:.0%} of each class, chosen by a hash of each row's content, so a "
        f"row keeps its split as the data grows); {len(out['train'])} train rows remain")
    if task != "regression":
        for k in missing:
            lacking = [c for c in np.unique(strata[tr]) if not (strata[out[k]] == c).any()]
            if lacking:
                report.notes.append(
                    f"class(es) {', '.join(repr(str(classes[c])) for c in lacking)} have too few train rows to spare "
                    f"one: kept in train, so they have no {k} row")
    return out


def prepare(data: Any, label: str | None = None, *, inputs: list[str] | None = None, seed: int = 0,
            val_frac: float | None = None, test_frac: float | None = None, drop_bad_images: bool = True,
            drop_rare_classes: bool = False, task: str | None = None,
            known_classes: list | None = None, groups: str | None = None, preprocessing: Any = None) -> TaskData:
    """Read, check, clean and split a dataset for classification or regression.

    task: None/"auto" infers it (regression for a float label with many distinct values),
    or "classification" / "regression" to override.
    known_classes: label values that keep their positions (a base model's classes);
    new label values are appended after them.
    preprocessing: a base model's export preprocessing: its inputs are read as it was trained (None: as now).
    """
    df, base_dir = _read_frame(data)
    report = DataReport(rows_received=int(len(df)))
    label_col = find_label_column(df, label)
    _check_groups(df, groups, inputs)
    groups_col = groups
    modality, in_cols, ignored = infer_inputs(df, label_col, inputs, exclude=(groups_col,) if groups_col else (),
                                           report=report)
    report.ignored_columns = ignored
    df = _clean_labels(df, label_col, report)

    adapter = modalities.get(modality)
    kept = _read_rows(adapter, df, in_cols, label_col, base_dir, report, strict=not drop_bad_images,
                      preprocessing=preprocessing)

    task = infer_task(kept.df[label_col], task, label_col)
    has_split_col = any(str(c).lower() == "split" for c in kept.df.columns)
    kept, counts = _drop_rare(kept, label_col, task, has_split_col, drop_rare_classes, report)
    _check_enough(counts, task, label_col, known_classes, report)
    classes, y, strata = _encode_labels(kept.df[label_col], counts, task, known_classes)

    u = row_positions(adapter.split_keys(kept.keys, kept.rows, report), seed)
    if has_split_col:
        splits = _column_splits(kept.df, strata, u, classes, task, report)
    else:
        splits = _auto_splits(y, strata, u, task, counts, val_frac, test_frac)

    report.rows_used = int(len(y))
    if task != "regression":
        _check_training_classes(y, classes, splits, report)
    task = _summarise(report, task, y, classes, counts, splits)
    return TaskData(
        modality=modality, task=task, classes=classes, y=y,
        input_columns=[str(c) for c in in_cols], label_column=str(label_col), splits=splits, report=report,
        **adapter.task_fields(kept.rows, kept.keys), base_dir=base_dir, row_index=kept.df.index.to_numpy(),
        groups=kept.df[groups_col].astype(str).to_numpy() if groups_col else None, groups_column=groups_col,
    )


@dataclass
class _Kept:
    """The rows still kept: the table, each row's input as its modality keeps it, and each row's content key."""

    df: pd.DataFrame
    rows: Any
    keys: list[str]

    def where(self, mask: np.ndarray) -> _Kept:
        """Only the rows where `mask` holds."""
        return _Kept(self.df[mask], _subset(self.rows, mask), [k for k, m in zip(self.keys, mask) if m])


def _read_frame(data: Any) -> tuple[pd.DataFrame, str | None]:
    """The user's data as a DataFrame (and its base dir), refused if its columns repeat or it has no rows."""
    df, base_dir = to_dataframe(data)
    if df.columns.duplicated().any():
        dups = sorted({str(c) for c in df.columns[df.columns.duplicated()]})
        raise DataError(f"The table has duplicated column names {dups}; expected unique names. "
                        "Fix: rename the columns, e.g. df.columns = [...].")
    if len(df) == 0:
        raise DataError("The dataset is empty (0 rows); expected labelled examples. Fix: pass a non-empty dataset.")
    return df, base_dir


def _check_groups(df: pd.DataFrame, groups: str | None, inputs: list[str] | None) -> None:
    """Refuse a groups column that is missing or that is also an input."""
    if groups is not None and groups not in df.columns:
        raise DataError(f"Groups column {groups!r} not found; the columns are {list(map(str, df.columns))}. "
                        "Fix: pass groups= one of these columns (its values get their own test metrics).")
    if groups is not None and inputs is not None and groups in inputs:
        raise DataError(f"Column {groups!r} is both an input and the groups column; the groups column is only "
                        "used to break down the test metrics. Fix: drop it from inputs= or from groups=.")


def _read_rows(adapter: Any, df: pd.DataFrame, in_cols: list[str], label_col: str, base_dir: str | None,
               report: DataReport, strict: bool, preprocessing: Any = None) -> _Kept:
    """The rows with present, readable inputs, duplicates removed (each drop counted in `report`)."""
    ok = adapter.present(df, in_cols)  # missing / empty inputs
    report.dropped_missing_input = int((~ok).sum())
    df = df[ok.to_numpy()]
    rows, keys, keep = adapter.read_rows(df, in_cols, base_dir, report, strict=strict, preprocessing=preprocessing)
    df = df.iloc[keep]
    return _Kept(df, rows, keys).where(_dedupe(keys, df[label_col], report))


def _after_dedupe(report: DataReport) -> str:
    """Why a class can count fewer examples than the user gave: repeated inputs are kept once."""
    dup, clash = report.dropped_duplicates, report.dropped_conflicting_duplicates
    said = []
    if dup:
        said.append(f"{dup} exact copies of other rows were dropped, as copies of one input in two splits would score "
                    "a model on rows it trained on")
    if clash:
        said.append(f"{clash} rows whose identical inputs carry different labels were dropped")
    return f" (counted after {'; and after '.join(said)})" if said else ""


def _drop_rare(kept: _Kept, label_col: str, task: str, has_split_col: bool, drop_rare_classes: bool,
               report: DataReport) -> tuple[_Kept, pd.Series]:
    """Refuse, or drop and report, classes too small to split; returns the rows kept and each label's count."""
    labels = kept.df[label_col]
    counts = labels.value_counts()
    rare = counts[counts < MIN_PER_CLASS] if task != "regression" else counts.iloc[:0]
    if len(rare) and not has_split_col:
        if not drop_rare_classes:
            raise DataError(
                f"Class(es) {dict((str(k), int(v)) for k, v in rare.items())} in column {label_col!r} have fewer than "
                f"{MIN_PER_CLASS} examples, too few to put one in each of train/validation/test"
                f"{_after_dedupe(report)}. "
                "Fix: add examples of these classes, remove them, or pass drop_rare_classes=True to drop them "
                "(they are listed in the data report).")
        report.dropped_rare_classes = {str(k): int(v) for k, v in rare.items()}
        keep = ~labels.isin(rare.index).to_numpy()
        kept = kept.where(keep)
        counts = labels[keep].value_counts()
    return kept, counts


def _check_enough(counts: pd.Series, task: str, label_col: str, known_classes: list | None,
                  report: DataReport) -> None:
    """Refuse data left with no rows, or with a single label (unless a base model brings other classes)."""
    if len(counts) == 0:
        r = report
        raise DataError(
            f"No rows are left after cleaning ({r.rows_received} received: {r.dropped_missing_label} missing labels, "
            f"{r.dropped_missing_input} missing inputs, {len(r.dropped_unreadable_images)} unreadable images, "
            f"{r.dropped_duplicates} duplicates, {r.dropped_conflicting_duplicates} identical inputs with different "
            "labels). Fix: check the inputs differ and are readable, and the labels are filled in.")
    if len(counts) < 2 and not known_classes:
        if task == "regression":
            raise DataError(f"Label column {label_col!r} has a single value after cleaning; regression needs varying "
                            "targets. Fix: check the label column.")
        raise DataError(
            f"Label column {label_col!r} has only one class ({list(map(str, counts.index))}) after cleaning; "
            "classification needs at least two. Fix: check the label column, or add examples of other classes.")


def _encode_labels(labels: pd.Series, counts: pd.Series, task: str,
                   known_classes: list | None) -> tuple[list, np.ndarray, np.ndarray]:
    """(classes in code order, each row's target, each row's stratum); regression has no classes."""
    if task == "regression":
        classes = []
        y = labels.astype(float).to_numpy(dtype=np.float32)
        # Stratify on target quantiles so every split spans the range.
        n_bins = int(max(1, min(5, len(y) // (3 * MIN_PER_CLASS))))
        strata = pd.qcut(pd.Series(y), q=n_bins, labels=False, duplicates="drop").to_numpy(dtype=np.int64)
    else:
        classes = sorted(counts.index.tolist(), key=lambda v: (str(type(v)), v))
        if known_classes is not None:
            known = {str(c): c for c in known_classes}
            classes = list(known_classes) + [c for c in classes if str(c) not in known]
            labels = labels.map(lambda v: known.get(str(v), v))  # "3" in a CSV matches 3 in the base model
        code = {c: i for i, c in enumerate(classes)}
        y = labels.map(code).to_numpy(dtype=np.int64)
        strata = y
    return classes, y, strata


def _column_splits(df: pd.DataFrame, strata: np.ndarray, u: np.ndarray, classes: list, task: str,
                   report: DataReport) -> dict[str, np.ndarray]:
    """The splits the split column names, carving out of train those it has no rows for."""
    split_col = next(c for c in df.columns if str(c).lower() == "split")
    names = df[split_col].astype(str).str.lower().map(SPLIT_NAMES)
    if names.isna().any():
        bad = sorted(set(df[split_col][names.isna()].astype(str)))
        raise DataError(f"Split column {split_col!r} has values {bad}; expected train/validation/test. "
                        "Fix: rename those values or drop the column to split automatically.")
    splits = {k: np.flatnonzero(names.to_numpy() == k) for k in ("train", "validation", "test")}
    if len(splits["train"]) == 0:
        raise DataError(f"Split column {split_col!r} marks no rows as 'train'. Fix: mark training rows.")
    missing = [k for k in ("validation", "test") if len(splits[k]) == 0]
    if missing:
        splits = _carve(splits, missing, strata, u, classes, task, split_col, report)
    return splits


def _auto_splits(y: np.ndarray, strata: np.ndarray, u: np.ndarray, task: str, counts: pd.Series,
                 val_frac: float | None, test_frac: float | None) -> dict[str, np.ndarray]:
    """Stable stratified splits, with held-out fractions sized by the data unless given."""
    n = len(y)
    n_groups = 2 if task == "regression" else max(len(counts), 2)
    if n < MIN_PER_CLASS * n_groups:
        raise DataError(f"Only {n} usable rows for {n_groups} classes; need at least {MIN_PER_CLASS} per class to split. "
                        "Fix: add more labelled rows.")
    # Small data needs proportionally bigger held-out sets for a stable score.
    default = 0.2 if n < 500 else 0.15 if n < 5000 else 0.1
    return _split(strata, u, val_frac or default, test_frac or default)


def _check_training_classes(y: np.ndarray, classes: list, splits: dict[str, np.ndarray], report: DataReport) -> None:
    """Refuse a training split of one class; note the classes it lacks."""
    in_train = set(np.unique(y[splits["train"]]).tolist())
    if len(in_train) < 2:
        names = ", ".join(str(classes[i]) for i in in_train)
        raise DataError(f"The training split holds {len(in_train)} class ({names}) of {len(classes)}: nothing to "
                        "learn to tell apart. Fix: mark rows of every class as 'train' in the split column, or "
                        "drop it to split automatically.")
    absent = [str(classes[i]) for i in range(len(classes)) if i not in in_train]
    if absent:
        report.notes.append(f"classes with no training row (the model cannot predict them): {', '.join(absent)}")


def _summarise(report: DataReport, task: str, y: np.ndarray, classes: list, counts: pd.Series,
               splits: dict[str, np.ndarray]) -> str:
    """Fill in the report's target summary and split sizes; returns the task's final name."""
    if task == "regression":
        report.notes.append(f"regression target: mean {y.mean():.4g}, std {y.std():.4g}, range [{y.min():.4g}, {y.max():.4g}]")
    else:
        report.class_counts = {str(c): int(counts.get(c, 0)) for c in classes}
        report.imbalance_ratio = float(counts.max() / counts.min())
        task = "binary" if len(classes) == 2 else "multiclass"
    report.split_sizes = {k: int(len(v)) for k, v in splits.items()}
    return task


def _subset(rows, mask) -> Any:
    """The rows where `mask` holds (an image collection subsets itself; a list is filtered)."""
    return rows.subset(mask) if hasattr(rows, "subset") else [r for r, m in zip(rows, mask) if m]


def infer_task(labels: pd.Series, task: str | None, label_col: str) -> str:
    """'classification' or 'regression' (a float label with many distinct values)."""
    if task in (None, "auto"):
        numeric = pd.api.types.is_float_dtype(labels)
        if numeric:
            values = labels.astype(float)
            non_integer = bool((values != np.round(values)).any())
            if non_integer and values.nunique() > max(10, 0.05 * len(values)):
                return "regression"
        return "classification"
    if task in ("classification", "binary", "multiclass"):
        return "classification"
    if task == "regression":
        if not pd.api.types.is_numeric_dtype(labels):
            try:
                labels.astype(float)
            except (TypeError, ValueError) as exc:
                raise DataError(f"task='regression' needs a numeric label column; {label_col!r} holds e.g. "
                                f"{labels.iloc[0]!r}. Fix: use task='classification' or convert the labels to "
                                "numbers.") from exc
        return "regression"
    raise DataError(f"task={task!r} is not supported; expected 'auto', 'classification' or 'regression'.")


def read_inputs(data: Any, modality: str, input_columns: list[str], base_dir: str | None = None,
                preprocessing=None) -> list:
    """Inputs for prediction (no labels needed), with a clear error for the wrong kind of data; read as the model's
    `preprocessing` (export/manifest.Preprocessing) says, where it says how."""
    df, file_dir = to_dataframe(data)
    return modalities.get(modality).read_for_prediction(df, input_columns, file_dir or base_dir, preprocessing)


def require_columns(df: pd.DataFrame, input_columns: list[str]) -> None:
    missing = [c for c in input_columns if c not in df.columns]
    if missing:
        raise DataError(f"Input column(s) {missing} that the model was trained on are missing; the columns are "
                        f"{list(map(str, df.columns))}. Fix: rename your columns to {input_columns}.")


def plain(v):
    """numpy scalars as plain Python values (JSON, YAML and Optuna want those)."""
    return v.item() if isinstance(v, np.generic) else v


def class_weights(y: np.ndarray, num_classes: int) -> np.ndarray:
    """Inverse-frequency ('balanced') weights, as sklearn computes them."""
    from sklearn.utils.class_weight import compute_class_weight

    present = np.unique(y)
    w = np.ones(num_classes, dtype=np.float32)
    w[present] = compute_class_weight("balanced", classes=present, y=y)
    return w
