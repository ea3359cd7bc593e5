"""Texts: one or more string columns (a pair for sentence-pair tasks); tokenised once per tokenizer and length."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from automl.modalities.base import Modality, register

DEFAULT_LENGTH = 64   # tokens, where nothing pins a length yet (pre-ranking, speed probes)
MIN_IDENTIFIER_ROWS = 20  # fewer distinct one-word values could be a small vocabulary as well as row ids


class TextModality(Modality):
    name = "text"
    library = "hf"
    test_file = "test_split.jsonl"
    column_hint = "a text column (strings)"
    # A MiniLM step (batch 32, texts of 15-60 tokens, 2 threads) took 0.34-0.36 s under bf16 autocast against
    # 0.53-0.57 s in fp32 on a 2-core Xeon with AMX (2026-12-05); Lite0 at 96 px ran 1.2x slower, so images stay fp32.
    cpu_bf16 = True

    # ------------------------------------------------------------------ data
    def claims(self, sample):
        return bool(sample.map(lambda v: isinstance(v, str)).any())

    def identifiers(self, df, columns):
        # A row id or URL paired with the text makes every row unique (duplicates then share no key and leak
        # across splits) and spends tokens on noise. Distinct values with no space in any is what such a column
        # looks like; it is left out beside a column that does not (sentences, or words that repeat), and where
        # every column looks so, all are kept (one-word inputs whose ids and texts cannot be told apart).
        def identifier(col):
            values = df[col].dropna()
            return (len(values) >= MIN_IDENTIFIER_ROWS and values.astype(str).is_unique
                    and not values.map(lambda v: isinstance(v, str) and any(c.isspace() for c in v.strip())).any())

        found = [c for c in columns if identifier(c)]
        return found if len(found) < len(columns) else []

    def present(self, df, columns):
        from automl.errors import DataError

        filled = df[columns].apply(lambda col: col.map(lambda v: isinstance(v, str) and bool(v.strip())))
        ok = filled.any(axis=1)
        if not ok.any():
            raise DataError(f"Text column(s) {columns} are empty in every labelled row; expected text. "
                            "Fix: check the column holds the text you want to classify.")
        return ok

    def read_rows(self, df, columns, base_dir, report, strict, preprocessing=None):
        texts = [[("" if not isinstance(v, str) else v.strip()) for v in row]
                 for row in df[columns].itertuples(index=False)]
        return texts, ["\x1f".join(t) for t in texts], list(range(len(texts)))

    def task_fields(self, rows, keys):
        return {"texts": rows}

    def split_keys(self, keys, rows, report):
        from automl.data.intake import spelling_key

        # Texts that differ only in case or spacing are one text to a reader: one split for all of them.
        return self.grouped(keys, ["\x1f".join(spelling_key(part) for part in k.split("\x1f")) for k in keys])

    def read_for_prediction(self, df, columns, base_dir, preprocessing=None):
        from automl.data.intake import require_columns
        from automl.errors import DataError
        from automl.modalities.base import detect

        require_columns(df, columns)
        kind = detect(df[columns[0]])
        if kind not in (None, self.name):
            raise DataError(f"Column {columns[0]!r} holds {kind} inputs but this model classifies text. "
                            "Fix: pass the text column the model was trained on.")
        # Stripped as in training (prepare): tokenizers that keep spaces as tokens would otherwise see other inputs.
        return [[("" if not isinstance(v, str) else v.strip()) for v in row]
                for row in df[columns].itertuples(index=False)]

    def rows(self, task, idx, size):
        return [task.texts[i] for i in idx]

    def store(self, task, storage_size, directory):
        from automl.data.inputs import TextStore

        key = hashlib.sha1("\x1e".join("\x1f".join(t) for t in task.texts).encode("utf-8", "replace")).hexdigest()
        return TextStore(task.texts, str(directory), key), []

    def describe(self, stats, task, space, tokenizer_of, gpu, seed):
        from automl.search.plan import token_p95

        length = space.pinned("max_length")
        tokenizer = tokenizer_of()
        stats.token_p95 = token_p95(tokenizer, [task.texts[i] for i in task.splits["train"]], seed=seed)
        # Cut at the 95th percentile of the data's own lengths (in steps of 8; at most 256 on a CPU).
        max_length = length if isinstance(length, int) else min(512 if gpu else 256,
                                                                max(16, -(-stats.token_p95 // 8) * 8))
        # Never past the model's positions (tokenizers without a limit report a huge sentinel).
        limit = getattr(tokenizer, "model_max_length", None)
        if isinstance(limit, int) and 0 < limit < 100_000 and max_length > limit:
            max_length = limit
        return None, max_length

    def prerank_input(self, task, idx, config):
        if not isinstance(config.get("max_length"), int):
            config["max_length"] = DEFAULT_LENGTH
        return self.rows(task, idx, None)

    # ------------------------------------------------------------------ training
    def augment(self, config, encoder):
        from automl.training import augment

        return augment.text_transform(config["text_augment"], float(config["text_aug_rate"]),
                                      getattr(encoder.tokenizer, "mask_token_id", None), encoder.tokenizer)

    # ------------------------------------------------------------------ export and serving
    def model_inputs(self, raw, preprocessing, encoder):
        return encoder.encode(raw)

    def stored_inputs(self, x, encoder):
        return encoder.encode(x)

    def encoder(self, preprocessing, export_dir):
        from automl.data.encoders import TextEncoder
        from automl.models.hf_family import load_tokenizer

        return TextEncoder(load_tokenizer(str(Path(export_dir) / "hf")), preprocessing.max_length)

    def save_test_split(self, out, x, keep, labels):
        with open(Path(out) / self.test_file, "w") as f:
            for i, lab in zip(keep, labels):
                f.write(json.dumps({"inputs": list(x[i]), "label": lab}) + "\n")
        return self.test_file

    def load_test_split(self, export_dir):
        f = Path(export_dir) / self.test_file
        if not f.exists():
            return None
        rows = [json.loads(line) for line in f.read_text().splitlines() if line]
        return [r["inputs"] for r in rows], [r["label"] for r in rows]

    def parse_request(self, item, i, n_columns):
        from automl.ops.serve import RequestError, kind_of

        want = "a list of [text, text] pairs" if n_columns > 1 else "a list of strings"
        ok = (isinstance(item, str) if n_columns == 1 else
              isinstance(item, list) and len(item) == n_columns and all(isinstance(s, str) for s in item))
        if not ok or (isinstance(item, str) and item.startswith("data:image/")):
            raise RequestError(422, f"input {i} is {kind_of(item)}; this text model expects {want}")
        return item if n_columns > 1 else [item]

    def request_frame(self, inputs, columns):
        import pandas as pd

        return pd.DataFrame({c: [row[j] for row in inputs] for j, c in enumerate(columns)})


register(TextModality())
