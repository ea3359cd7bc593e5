"""Shared by the text experiments that run `fit` alone (length_or_ensemble.py, cpu_bf16.py): fortunes on
quality.py's splits, the cpu_small space's text start point, test probabilities, one printed line a seed."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402
import realsets  # noqa: E402

BATCH = 32  # the text start point's batch size (search_spaces/cpu_small.yaml)


def fortunes_split(base, seed: int):
    """Seed `seed`'s train/validation rows as TrialData, and the test texts and labels."""
    from automl.data.trial_data import TrialData

    df = quality.split(base, seed)
    classes = sorted(df.label.unique())
    y = df.label.map({c: i for i, c in enumerate(classes)}).values
    tr, va, te = (np.flatnonzero(df.split == s) for s in ("train", "validation", "test"))
    texts = [[t] for t in df.text]
    data = TrialData("text", len(classes), [texts[i] for i in tr], y[tr], [texts[i] for i in va], y[va],
                     task="classification")
    return data, [texts[i] for i in te], y[te]


def start_config() -> dict:
    """The text start point, every parameter filled in, at 128 tokens, unweighted (as it was when the experiments
    that use this were recorded; class_weighted.py measures the weights)."""
    from automl.search.space import load_space
    from automl.training.loop import full_config

    return full_config({**load_space("cpu_small", "text").default_config(), "max_length": 128,
                        "class_weighted": False})


def test_proba(result, texts) -> np.ndarray:
    """A `fit` result's class probabilities for `texts`."""
    import torch

    from automl.data.encoders import predict_logits
    from automl.training.loop import encode_inputs

    x = encode_inputs(result.encoder, texts)
    return torch.softmax(predict_logits(result.model, result.encoder, x, "cpu"), 1).numpy()


def run_seeds(one_seed, base=None) -> None:
    """Print one_seed(base, seed) for the seeds on the command line (default 0 1 2), with every CPU thread; base
    defaults to realsets.fortunes()."""
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    torch.set_num_threads(cpus)
    base = realsets.fortunes() if base is None else base
    for seed in [int(a) for a in sys.argv[1:]] or [0, 1, 2]:
        print(one_seed(base, seed), flush=True)
