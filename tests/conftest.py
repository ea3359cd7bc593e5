"""Shared fixtures: one Ray instance per test session, tiny real data."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# Forced, not defaulted: a user's HF_HUB_OFFLINE=0 must not send the tests to the hub.
os.environ["HF_HUB_OFFLINE"] = "1"
# Runs learn this machine's fixed costs; the suite keeps its own file so one test's run does not re-plan another's
# and the user's ~/.cache is left alone.
_COSTS_DIR = tempfile.mkdtemp(prefix="automl-costs-")
atexit.register(shutil.rmtree, _COSTS_DIR, ignore_errors=True)  # one per session: none may be left in /tmp
os.environ["AUTOML_COSTS_FILE"] = os.path.join(_COSTS_DIR, "costs.json")

import numpy as np
import pandas as pd
import pytest


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """A test that trains in this process (use_ray=False) calls set_threads(n), which sets torch's thread count and
    OMP_NUM_THREADS: neither may leak into the tests after it (or into the processes they start), or their speed
    would depend on the order they run in."""
    from automl.runtime import threads_kept

    with threads_kept():
        yield


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from automl.cluster import ensure_ray

    started = ensure_ray(num_cpus=2)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def digits_df() -> pd.DataFrame:
    """A real image dataset: sklearn's 8x8 digits, 4 classes, 60 per class."""
    from sklearn.datasets import load_digits

    d = load_digits()
    keep = np.concatenate([np.flatnonzero(d.target == c)[:60] for c in range(4)])
    return pd.DataFrame({"image": list(d.images[keep]), "label": d.target[keep]})


@pytest.fixture(scope="session")
def text_df() -> pd.DataFrame:
    """Short texts with a clear signal: 3 topics."""
    rng = np.random.default_rng(0)
    topics = {
        "sport": ["match", "goal", "team", "coach", "league", "score", "player"],
        "food": ["pizza", "recipe", "bake", "dinner", "spicy", "salad", "soup"],
        "tech": ["laptop", "software", "code", "chip", "phone", "server", "app"],
    }
    filler = ["the", "a", "was", "really", "today", "my", "new", "great", "about"]
    rows = []
    for label, words in topics.items():
        for i in range(30):
            toks = list(rng.choice(words, 3)) + list(rng.choice(filler, 3))
            rng.shuffle(toks)
            rows.append({"text": " ".join(toks) + f" {i}", "label": label})
    return pd.DataFrame(rows).sample(frac=1.0, random_state=0).reset_index(drop=True)


@pytest.fixture(scope="session")
def digits_trial_data(digits_df):
    """digits_df prepared and split, as 16x16 images: the input of one search or trial."""
    from automl.data.intake import prepare
    from automl.data.images import stack_resized
    from automl.data.trial_data import TrialData

    t = prepare(digits_df)
    X = stack_resized(t.images, 16)
    tr, va = t.splits["train"], t.splits["validation"]
    return TrialData("image", t.num_classes, X[tr], t.y[tr], X[va], t.y[va])


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    from automl.models import minilm_dir

    return minilm_dir()


@pytest.fixture(params=[0, 1])
def global_random_seed(request) -> int:
    return request.param


@pytest.fixture(scope="session")
def free_port_factory():
    return _free_port


@pytest.fixture
def free_port() -> int:
    return _free_port()


def _free_port() -> int:
    """A free TCP port outside the kernel's ephemeral range (32768+), so no outgoing connection can take it
    between this check and the server's bind."""
    import random
    import socket

    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 30000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port in 20000-30000")


@pytest.fixture(scope="session")
def classifier_inputs():
    """features(name, size, x, num_classes): what a backbone's classifier sees for images x."""
    return _classifier_inputs


def _classifier_inputs(name: str, size: int, x, num_classes: int) -> np.ndarray:
    """The features a backbone's classifier sees for images x (its pooled body output), taken with a hook on the
    classifier itself: a path independent of the feature extraction rank_backbones uses."""
    import torch

    from automl import models
    from automl.training.loop import build_encoder, build_model, full_config

    cfg = full_config({"backbone": name, "image_size": size})
    torch.manual_seed(0)  # rank_backbones' seed: the same random-init bodies
    model, spec = build_model(cfg, num_classes)
    model.eval()
    enc = build_encoder(cfg, model, spec)
    seen = []
    hook = models.family(model).head(model).register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    with torch.no_grad():
        model(enc.batch(x, np.arange(len(x))))
    hook.remove()
    return seen[0].numpy()
