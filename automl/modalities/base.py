"""The modality adapter's interface and its registry (keyed by name, as backbones and schedules are)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from automl.plugins import put


class Modality:
    """What the pipeline needs to know about one kind of input. Imports stay inside the methods: `import automl`
    and `load()` must stay light."""

    name = ""
    sized = False               # the plan chooses the inputs' size (image side in px); else a length in tokens
    library = ""                # the backbone family that builds example inputs for tracing its models
    channels_last = False       # its batches are channels-last (and a model it trains is converted to match)
    cpu_bf16 = False            # its training steps run under bf16 autocast on a CPU with bf16 matrix units
    test_file = ""              # the export's stored test split
    max_columns: int | None = None  # input columns one model takes (None: every column of this kind)
    column_hint = ""            # what a column of its inputs holds, for error messages

    # ------------------------------------------------------------------ data
    def claims(self, sample) -> bool:
        """Whether a column holds this modality's inputs, from a sample of its non-missing values (a Series)."""
        raise NotImplementedError

    def identifiers(self, df, columns: list[str]) -> list[str]:
        """Columns among `columns` (all claimed by this modality) that name rows rather than describe them, left
        out of the inputs when the user did not pick them. Default: none."""
        return []

    def present(self, df, columns: list[str]):
        """A boolean Series: rows whose input is present (others are dropped as missing); raises DataError when
        no row has one."""
        raise NotImplementedError

    def read_rows(self, df, columns: list[str], base_dir, report, strict: bool, preprocessing=None):
        """(rows, content keys, kept row positions) of a cleaned table: the inputs as the task keeps them, read as
        `preprocessing` (an export's, for an update of it) says (None: as training reads them now)."""
        raise NotImplementedError

    def task_fields(self, rows, keys: list[str]) -> dict:
        """The TaskData fields that hold the rows read (read_rows)."""
        raise NotImplementedError

    def split_keys(self, keys: list[str], rows, report) -> list[str]:
        """The keys rows are split by (data/intake.row_positions): rows that are copies of one input in all but
        form must share one, so that they land in one split. Default: the content keys themselves. rows: the
        inputs (read_rows); report: the data report, for what the check did or could not do."""
        return keys

    @staticmethod
    def grouped(keys: list[str], forms: list[str]) -> list[str]:
        """Keys of rows whose `forms` agree, made one: each group takes its smallest member's key, so a row with no
        twin keeps the split it had before (a twin added later that sorts first moves its group, once)."""
        first: dict = {}
        for k, f in zip(keys, forms):
            first[f] = min(first.get(f, k), k)
        return [first[f] for f in forms]

    def read_for_prediction(self, df, columns: list[str], base_dir, preprocessing=None) -> list:
        """The inputs of a table given to a loaded model (checked: a clear error for the wrong kind), read as its
        export's `preprocessing` says (None: as training reads them now)."""
        raise NotImplementedError

    def frame(self, data, column: str):
        """A list or array given to predict() as a one-column DataFrame."""
        import pandas as pd

        return pd.DataFrame({column: list(data)})

    def rows(self, task, idx, size: int | None):
        """Rows `idx` of a task as trials take them (images resized to `size`): for speed probes and pre-ranking."""
        raise NotImplementedError

    def store(self, task, storage_size: int | None, directory: Path):
        """(the materialised store of every row, [(row, reason) that did not decode])."""
        raise NotImplementedError

    def describe(self, stats, task, space, tokenizer_of, gpu: bool, seed: int) -> tuple[int | None, int | None]:
        """Fill the plan's data statistics; returns (pinned input size, max length)."""
        raise NotImplementedError

    def prerank_input(self, task, idx, config: dict) -> Any:
        """Rows `idx` for pre-ranking at the config's input size or length (set in `config` when unpinned)."""
        raise NotImplementedError

    def base_pins(self, manifest) -> dict:
        """Search-space pins an update of an export must keep (its input size)."""
        return {}

    # ------------------------------------------------------------------ training
    def augment(self, config: dict, encoder):
        """The training-time augmentation of a trial's config (a callable, or None)."""
        return None

    def mixup(self, config: dict, num_classes: int):
        """A batch mixer (timm's Mixup) when the config asks for one, else None."""
        return None

    def ensemble_input(self, first: dict, member: dict) -> tuple | None:
        """How an ensemble turns its first member's input into this member's (`member`, `first`: their
        preprocessing): (scale, shift, size) applied to a normalised image batch, or None where the members take the
        same input (one tokenizer)."""
        return None

    # ------------------------------------------------------------------ export and serving
    def model_inputs(self, raw: list, preprocessing, encoder):
        """Inputs read for prediction -> what the model's encoder batches."""
        raise NotImplementedError

    def stored_inputs(self, x, encoder):
        """A stored test split's inputs -> what the model's encoder batches."""
        raise NotImplementedError

    def encoder(self, preprocessing, export_dir: Path):
        """The export's input encoder, from its manifest's preprocessing."""
        raise NotImplementedError

    def save_test_split(self, out: Path, x, keep, labels: list) -> str:
        raise NotImplementedError

    def load_test_split(self, export_dir: Path):
        raise NotImplementedError

    def parse_request(self, item, i: int, n_columns: int):
        """One input of a serving request, checked (raises ops.serve.RequestError with what was expected)."""
        raise NotImplementedError

    def request_pixels(self, parsed) -> int:
        """Pixels one parsed request input decodes to (from its header): a request's budget (ops/serve.py)."""
        return 0

    def request_frame(self, inputs: list, columns: list[str]):
        """A request's parsed inputs as the DataFrame predict() takes."""
        raise NotImplementedError

    def resolve_paths(self, chunk, column: str, base: str):
        """A chunk of a table read from a file, its relative file paths made relative to that file."""
        return chunk


_MODALITIES: dict[str, Modality] = {}


def register(modality: Modality) -> Modality:
    put(_MODALITIES, modality.name, modality, "modality")
    return modality


def get(name: str) -> Modality:
    try:
        return _MODALITIES[name]
    except KeyError:
        raise ValueError(f"unknown modality {name!r}; known: {', '.join(sorted(_MODALITIES))}") from None


def names() -> list[str]:
    return list(_MODALITIES)


def detect(values) -> str | None:
    """The modality whose inputs a column holds (values: a Series), or None. Modalities are asked in the order
    they registered, so a column that several could read (image paths are strings) goes to the first."""
    sample = values.dropna()
    sample = sample.iloc[: min(len(sample), 50)]
    if sample.empty:
        return None
    return next((name for name, m in _MODALITIES.items() if m.claims(sample)), None)
