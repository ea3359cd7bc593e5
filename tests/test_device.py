"""One device for model and inputs, in every stage. No GPU here: PyTorch's "meta" device stands in for one.

On "meta" a forward pass runs (shapes only) when model and inputs are both there, and fails with a device
mismatch when they are not; copying the logits back then fails with "Cannot copy out of meta tensor", which is
how these tests see that the forward pass itself was consistent.
"""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from automl import models
from automl.data.encoders import ImageEncoder, predict_logits
from automl.runtime import device


def _model():
    torch.manual_seed(0)
    return models.build("timm/resnet10t:scratch", 4).eval()


def test_the_device_is_chosen_in_one_place(monkeypatch):
    monkeypatch.setenv("AUTOML_DEVICE", "meta")
    assert device() == torch.device("meta")
    monkeypatch.delenv("AUTOML_DEVICE")
    assert device().type in ("cpu", "cuda", "mps")


def test_prediction_moves_the_model_to_the_inputs_device():
    model, enc = _model(), ImageEncoder(16, [0.5] * 3, [0.5] * 3)  # the model is on the CPU
    x = np.zeros((3, 3, 16, 16), dtype=np.uint8)
    with pytest.raises(NotImplementedError, match="meta tensor"):
        predict_logits(model, enc, x, torch.device("meta"))
    assert next(model.parameters()).device.type == "meta"


def test_the_evaluate_stage_runs_model_and_inputs_on_the_chosen_device(monkeypatch, digits_df, tmp_path):
    """After a retrain the model comes back on the CPU; the test split must be scored where the model is."""
    from automl import stages
    from automl.data.inputs import Inputs
    from automl.data.intake import prepare

    task = prepare(digits_df)
    prepared = stages.Prepared(task, "accuracy", tmp_path)
    inputs = Inputs.materialise(task, 16, tmp_path / "inputs")
    model = _model()
    final = stages.FinalModel(model, ImageEncoder(16, [0.5] * 3, [0.5] * 3), models.resolve("timm/resnet10t:scratch"),
                              {"image_size": 16})
    metrics = stages.evaluate(prepared, inputs, final)  # the real device: a score comes back
    assert set(metrics) >= {"accuracy", "f1_macro", "log_loss", "per_class"}
    # The scores are the model's own on the test split: its forward pass here, scored by scikit-learn.
    from sklearn.metrics import accuracy_score, f1_score, log_loss

    te = inputs.split("test")
    x = inputs.pick(te)
    with torch.no_grad():
        proba = torch.softmax(model.cpu()(final.encoder.batch(x, np.arange(len(x)))), 1).numpy()
    y = task.y[te]
    assert metrics["accuracy"] == pytest.approx(accuracy_score(y, proba.argmax(1)))
    assert metrics["f1_macro"] == pytest.approx(f1_score(y, proba.argmax(1), average="macro", labels=range(4), zero_division=0))
    # On a GPU the stage's forward pass runs under bf16 autocast, the reference here in fp32 on the CPU.
    from automl.runtime import amp_dtype

    rel = 1e-5 if amp_dtype(device()) is None else 1e-2
    assert metrics["log_loss"] == pytest.approx(log_loss(y, np.clip(proba, 1e-7, 1), labels=range(4)), rel=rel)
    monkeypatch.setenv("AUTOML_DEVICE", "meta")  # a stand-in for a GPU
    with pytest.raises(NotImplementedError, match="meta tensor"):
        stages.evaluate(prepared, inputs, final)


@pytest.mark.parametrize("where", ["accelerator", "fresh CPU process", "CPU process that timed a model"])
def test_a_speed_probe_keeps_one_off_costs_out_of_a_step_and_a_row(monkeypatch, digits_trial_data, where):
    """The plan multiplies a step's time by every step and a row's by every validation row of every report, so
    one-off costs must not be in them. On a GPU every new model pays them (an H200 priced a MiniLM step at 1.13 s,
    0.05 s warm): the probe is timed twice and the excess charged once, as warmup_s. On a CPU a fresh process pays
    them at a thread count's first step and the first validation pass (2 cores: a Lite0 step with 2 threads at
    1.45x): those run untimed first. Stood in for here by 1 s at the first step with 2 threads and at the first
    validation pass; a process that has timed a model before is timed as it is."""
    from automl.training import loop

    calls = {"predict": 0}
    seen_threads = set()

    def predict(*args, **kwargs):
        calls["predict"] += 1
        if calls["predict"] == 1:
            time.sleep(1.0)
        return real_predict(*args, **kwargs)

    def step(self, *args, **kwargs):
        n = torch.get_num_threads()
        if n == 2 and n not in seen_threads:  # a thread pool's start, once a process
            time.sleep(1.0)
        seen_threads.add(n)
        return real_step(self, *args, **kwargs)

    def build(*args, **kwargs):
        calls["build"] = calls.get("build", 0) + 1
        if calls["build"] == 1:  # the weights' first read
            time.sleep(1.0)
        return real_build(*args, **kwargs)

    real_predict, real_step, real_build = loop.predict_logits, loop._Setup.step, loop.build_model
    monkeypatch.setattr(loop, "predict_logits", predict)
    monkeypatch.setattr(loop._Setup, "step", step)
    monkeypatch.setattr(loop, "build_model", build)
    monkeypatch.setattr(loop, "first_pass_is_slow", lambda dev: where == "accelerator")
    monkeypatch.setattr(loop, "_TIMED_ON", {"cpu"} if where == "CPU process that timed a model" else set())
    cfg = {"backbone": "timm/resnet10t:scratch", "image_size": 16, "batch_size": 32}
    out = loop.measure_speed(cfg, digits_trial_data, steps=2, device=torch.device("cpu"), threads=(1, 2))
    n_eval = min(len(digits_trial_data.y_val), 128)
    if where == "CPU process that timed a model":
        assert calls["predict"] == 1 and out["warmup_s"] == 0.0
        assert out["step_s_2"] >= 0.5 and out["eval_row_s"] * n_eval >= 1.0 and out["setup_s"] >= 1.0
        return
    assert out["step_s_2"] < 0.3 and out["eval_row_s"] * n_eval < 0.5
    assert out["setup_s"] < 1.0 and out["build_s"] < 0.5  # a trial's set-up and a kept trial's load, warm
    if where == "accelerator":
        assert calls["predict"] == 3  # a warm-up pass and a timed one, then a timed one on a fresh model
        assert out["warmup_s"] >= 2.5  # the first build, thread start and validation pass
    else:
        assert calls["predict"] == 2  # one untimed pass; no second probe
        assert 0.8 <= out["warmup_s"] < 1.5  # the first build's excess, charged once


def test_a_backbone_that_cannot_be_built_leaves_the_process_unwarmed(monkeypatch, digits_trial_data):
    """The start backbone may fail to load (the plan then probes the next one): that probe paid no one-off costs,
    so the next one must still warm up."""
    from automl.training import loop

    monkeypatch.setattr(loop, "_TIMED_ON", set())
    with pytest.raises(Exception):
        loop.measure_speed({"backbone": "timm/no_such_model:scratch", "image_size": 16}, digits_trial_data,
                           steps=1, device=torch.device("cpu"))
    assert loop._TIMED_ON == set()


@pytest.mark.parametrize("window_s, timed_per_count", [(0.0, 2), (1e9, 3)])
def test_a_speed_probe_stops_timing_slow_steps_once_its_window_is_filled(monkeypatch, digits_trial_data, window_s,
                                                                         timed_per_count):
    """Planning time is budget: a 2 s step needs no three timings at each thread count (12 s of a 300 s run's
    planning on 2 cores). A filled window stops the timing after two steps (one is 20-25% off); cheap steps are
    averaged over `steps`."""
    from automl.training import loop

    calls = []
    real_step = loop._Setup.step
    monkeypatch.setattr(loop._Setup, "step", lambda self, *a, **k: (calls.append(1), real_step(self, *a, **k))[1])
    monkeypatch.setattr(loop, "TIMED_WINDOW_S", window_s)
    monkeypatch.setattr(loop, "_TIMED_ON", {"cpu"})  # warm: no untimed warm-up steps besides the set-up's
    cfg = {"backbone": "timm/resnet10t:scratch", "image_size": 16, "batch_size": 32}
    out = loop.measure_speed(cfg, digits_trial_data, steps=3, device=torch.device("cpu"), threads=(1, 2))
    assert len(calls) == 1 + 2 * timed_per_count  # the set-up's step, then each thread count's timed steps
    assert out["step_s_1"] > 0 and out["step_s_2"] > 0
