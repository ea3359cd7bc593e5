"""Text batches cut from rows of similar length, in training and in every pass that predicts."""
import numpy as np
import pytest
import torch

from automl import models
from automl.data.encoders import TextEncoder, predict_logits
from automl.data.trial_data import TrialData
from automl.models.hf_family import load_tokenizer
from automl.training.loop import Batches, full_config, measure_speed

BS = 32


def _passes(batches: Batches, n: int, passes: int) -> list[np.ndarray]:
    steps = -(-passes * n // batches.bs)
    stream = np.concatenate([batches(k) for k in range(steps)])
    return [stream[j * n:(j + 1) * n] for j in range(passes)]


def test_training_batches_hold_rows_of_similar_length_and_every_row_once_a_pass():
    n = 8 * BS + 5  # one full group of 8 batches, and passes that do not end on a batch boundary
    lengths = np.random.default_rng(0).permutation(np.arange(1, n + 1))
    grouped = Batches(np.arange(n), BS, seed=3, lengths=lengths)
    for rows in _passes(grouped, n, 3):
        assert sorted(rows.tolist()) == list(range(n))  # nothing lost or repeated within a pass
    # Pass 0 starts on a batch boundary: its first 8 batches are cut from one group of 256 rows sorted by length,
    # so their length ranges do not overlap (random batches each span most of 1..261).
    first = [grouped(k) for k in range(8)]
    ranges = sorted((int(lengths[b].min()), int(lengths[b].max())) for b in first)
    assert all(hi < lo for (_, hi), (lo, _) in zip(ranges, ranges[1:]))
    # ... and come in a shuffled order, so a speed probe's few steps are random batches, not the shortest ones.
    means = [float(lengths[b].mean()) for b in first]
    assert means != sorted(means)
    # The same batches again for a resumed run.
    again = Batches(np.arange(n), BS, seed=3, lengths=lengths)
    assert all(np.array_equal(again(k), grouped(k)) for k in range(20))
    # Rows without lengths (images) are drawn as before: plain shuffled passes.
    plain = Batches(np.arange(n), BS, seed=3)
    assert max(int(np.ptp(lengths[plain(k)])) for k in range(8)) > n / 2


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    torch.manual_seed(0)
    model = models.build(models.BackboneSpec("hf", minilm_dir), 3).eval()
    return model, TextEncoder(load_tokenizer(minilm_dir), 48)


TEXTS = [["short"], ["a rather longer sentence about the weather and the sea today"], ["two words"],
         ["one more sentence of middling length"], ["x y z w"], ["the longest of them all, with many more words than "
                                                          "any other row has in this little list of texts"],
         ["medium text here, with a few words"]]


def test_predictions_and_frozen_features_come_back_in_row_order(minilm):
    model, enc = minilm
    ids = enc.encode(TEXTS)
    assert len({len(r) for r in ids}) == len(ids)  # every row a different length: sorting reorders them
    alone = torch.cat([predict_logits(model, enc, [r], "cpu") for r in ids])
    together = predict_logits(model, enc, ids, "cpu", batch_size=3)
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)

    family = models.family(model)
    pooled = family.pooled_features(model, enc, ids, "cpu", ["mean", "cls"], batch_size=3)
    for p in ("mean", "cls"):
        one = torch.cat([family.pooled_features(model, enc, [r], "cpu", [p])[p] for r in ids])
        torch.testing.assert_close(pooled[p], one, rtol=1e-4, atol=1e-4)

    # The activations entering the top layer, cached per token (frozen prefix): row i's are row i's own.
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.encoder.encoder.layer[-1].parameters():
        p.requires_grad_(True)
    prefix = family.split(model, 1, enc, ids, "cpu")
    got = prefix.features(enc, ids, "cpu", batch_size=3)
    for i, r in enumerate(ids):
        row = got.flat[got.offsets[i]:got.offsets[i + 1]]
        torch.testing.assert_close(row, prefix.features(enc, [r], "cpu").flat, rtol=1e-4, atol=1e-4)


def test_a_text_step_is_priced_at_what_the_training_rows_batches_pad_to(minilm_dir):
    short = [["word " * 2]] * 64          # the probe's rows
    long = [["word " * 20]] * 300         # the training rows they stand for
    enc = TextEncoder(load_tokenizer(minilm_dir), 64)
    n_short, n_long = len(enc.encode(short)[0]), len(enc.encode(long)[0])
    data = TrialData("text", 2, short, np.arange(64) % 2, short[:8], np.arange(8) % 2)
    cfg = full_config({"backbone": "minilm-l6", "batch_size": 8, "max_length": 64, "unfreeze": 0})
    out = measure_speed(cfg, data, steps=2, threads=(1,), device=torch.device("cpu"), train_sample=long)
    assert out["padded_ratio"] == pytest.approx(n_long / n_short)
    ungrouped = measure_speed({**cfg, "length_grouped": False}, data, steps=2, threads=(1,),
                              device=torch.device("cpu"), train_sample=long)
    assert ungrouped["padded_ratio"] == 1.0  # random batches: priced as timed, as before
