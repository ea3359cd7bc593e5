"""bf16 autocast in a text model's training steps on a CPU that has AMX; predictions and images stay fp32."""
import numpy as np
import torch

from automl.data.encoders import predict_logits
from automl.data.trial_data import TrialData
from automl.runtime import cpu_bf16
from automl.training.loop import _setup, full_config

CPU = torch.device("cpu")


def _dtypes_seen(s) -> list[torch.dtype]:
    """What the model's first linear layer puts out during one training step and one prediction pass."""
    seen: list[torch.dtype] = []
    first = next(m for m in s.model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
    handle = first.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    try:
        s.model.train()
        s.step(s.model, s.encoder, 0)
        predict_logits(s.model, s.encoder, s.x_val, CPU)
    finally:
        handle.remove()
    return [seen[0], seen[-1]]


def test_text_steps_run_in_bf16_where_the_cpu_has_it_and_predictions_stay_fp32(minilm_dir, monkeypatch):
    texts = [[f"row {i} says {'yes' if i % 2 else 'no'}"] for i in range(16)]
    data = TrialData("text", 2, texts, np.arange(16) % 2, texts[:4], np.arange(4) % 2)
    cfg = full_config({"backbone": "minilm-l6", "batch_size": 8, "max_length": 16, "unfreeze": 1})
    monkeypatch.setenv("AUTOML_CPU_BF16", "1")
    assert cpu_bf16()
    assert _dtypes_seen(_setup(cfg, data, reports=1, device=CPU)) == [torch.bfloat16, torch.float32]
    off = _setup({**cfg, "cpu_bf16": False}, data, reports=1, device=CPU)  # turned off in the config
    assert _dtypes_seen(off) == [torch.float32, torch.float32]
    monkeypatch.setenv("AUTOML_CPU_BF16", "0")  # a CPU without bf16 matrix units
    assert _dtypes_seen(_setup(cfg, data, reports=1, device=CPU)) == [torch.float32, torch.float32]


def test_image_steps_stay_fp32_on_a_cpu_with_bf16(digits_trial_data, monkeypatch):
    monkeypatch.setenv("AUTOML_CPU_BF16", "1")
    cfg = full_config({"backbone": "timm/resnet10t:scratch", "image_size": 16, "batch_size": 16})
    assert _dtypes_seen(_setup(cfg, digits_trial_data, reports=1, device=CPU)) == [torch.float32, torch.float32]
