"""The plain training function, without Ray: unfreezing, schedules, augmentations, weights."""
from __future__ import annotations

import os

import math

import numpy as np
import pytest
import torch
from _fresh import FreshPythons

from automl import models

from automl.training import schedules
from automl.training import augment as aug
from automl.data.intake import prepare
from automl.data.trial_data import TrialData
from automl.training.loop import fit, full_config, make_optimizer, n_trainable_groups, set_trainable


def test_fit_runs_without_ray_and_learns(digits_trial_data):
    seen = []
    cfg = {"backbone": "timm/resnet10t:scratch", "image_size": 16, "lr": 3e-3, "schedule": "cosine", "augment": "crop"}
    res = fit(cfg, digits_trial_data, epochs=4, report=lambda m, state: seen.append((m, state())))
    assert [m["epoch"] for m, _ in seen] == [1, 2, 3, 4]
    assert seen[-1][0]["val_accuracy"] > 0.5  # 4 balanced classes: chance is 0.25
    assert seen[-1][0]["train_loss"] < seen[0][0]["train_loss"]
    assert set(seen[-1][1]) >= {"model", "optimizer", "scheduler", "epoch"}
    assert not res.model.training
    # Trained and fed channels-last on a CPU too: the layout oneDNN's convolutions run fastest on (a step 1.5x here).
    # Only kernels wider than 1x1 over several channels tell the layouts apart.
    convs = [p for p in res.model.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] > 1]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    batch = res.encoder.batch(digits_trial_data.x_train, np.arange(4))
    assert batch.shape == (4, 3, 16, 16) and batch.is_contiguous(memory_format=torch.channels_last)
    assert not batch.is_contiguous()


def test_resume_from_state_continues_identically(digits_trial_data):
    cfg = {"backbone": "timm/mobilenetv3_small_050:scratch", "image_size": 16, "lr": 1e-2, "batch_size": 64}
    states = []
    full = fit(cfg, digits_trial_data, epochs=2, report=lambda m, s: states.append(s()))
    resumed = fit(cfg, digits_trial_data, epochs=2, resume=states[0])
    a = dict(full.model.named_parameters())
    for n, p in resumed.model.named_parameters():
        assert torch.allclose(p, a[n], atol=1e-5), n
    # Each row's margins over the run carry over the resume: the same sums and counts as the run never stopped.
    assert full.margins.count.sum() > 0
    np.testing.assert_array_equal(resumed.margins.count, full.margins.count)
    np.testing.assert_allclose(resumed.margins.sum, full.margins.sum, atol=1e-4)


def test_a_rows_margin_is_its_labels_logit_over_the_best_other_summed_over_the_steps_that_trained_on_it():
    from automl.training.margins import Margins

    m = Margins(4)
    logits = torch.tensor([[2.0, 0.5, 1.0], [0.0, 3.0, -1.0], [1.0, 1.0, 4.0]])
    m.add(np.array([0, 1, 0]), logits, torch.tensor([0, 0, 2]))
    # row 0: 2.0 - 1.0 at the first, 4.0 - 1.0 at the third; row 1: 0.0 - 3.0; rows 2, 3: never trained on
    np.testing.assert_allclose(m.sum, [4.0, -3.0, 0.0, 0.0])
    np.testing.assert_array_equal(m.count, [2, 1, 0, 0])
    np.testing.assert_allclose(m.mean(), [2.0, -3.0, np.nan, np.nan])


def test_rows_with_flipped_labels_keep_the_lowest_margins_over_a_run(digits_df):
    """The area under the margin of a real run singles out planted flips (suspected label errors rank by it)."""
    df = digits_df.copy()
    rng = np.random.default_rng(0)
    flipped = rng.choice(len(df), 12, replace=False)
    df.loc[flipped, "label"] = (df.loc[flipped, "label"] + 1) % 4
    t = prepare(df)
    from automl.data.images import stack_resized

    tr = t.splits["train"]
    data = TrialData("image", t.num_classes, stack_resized(t.images, 16)[tr], t.y[tr])
    cfg = {"backbone": "timm/resnet10t:scratch", "image_size": 16, "lr": 3e-3, "batch_size": 16, "schedule": "cosine"}
    res = fit(cfg, data, epochs=5)
    aum = res.margins.mean()
    planted = np.isin(t.row_index[tr], flipped)
    assert np.isfinite(aum).all()  # five passes: every row was trained on
    lowest = np.argsort(aum)[:planted.sum()]
    assert planted[lowest].mean() >= 0.6, (planted.sum(), planted[lowest].mean())


@pytest.mark.parametrize("name", ["timm/resnet10t:scratch", "timm/mobilenetv3_small_050:scratch"])
def test_unfreeze_k_trains_head_plus_top_k_groups(name):
    model = models.build(name, 3)
    groups = models.family(model).layer_groups(model)
    head = set(groups[-1])
    assert head == {n for n, _ in model.named_parameters() if "fc" in n or "classifier" in n}
    for k in range(len(groups)):
        set_trainable(model, groups, k)
        expected = sum(len(g) for g in groups[len(groups) - 1 - k:])
        assert sum(p.requires_grad for p in model.parameters()) == expected


def test_text_groups_are_embeddings_layers_then_head(minilm_dir):
    model = models.build(models.BackboneSpec("hf", minilm_dir), 2)
    groups = models.family(model).layer_groups(model)
    assert len(groups) == 8  # embeddings, 6 encoder layers, the head
    assert all("embeddings" in n for n in groups[0]) and groups[-1] == ["head.weight", "head.bias"]
    set_trainable(model, groups, 0)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(groups[-1])


def test_gradual_unfreezing_adds_a_group_every_n_epochs():
    cfg = full_config({"unfreeze": 1, "gradual_unfreeze_every": 2})
    assert [n_trainable_groups(cfg, 5, e) for e in range(8)] == [1, 1, 2, 2, 3, 3, 4, 4]
    assert n_trainable_groups(full_config({"unfreeze": "all"}), 5, 0) == 5


def test_layer_decay_lowers_lr_towards_the_input():
    model = models.build("timm/resnet10t:scratch", 3)
    groups = models.family(model).layer_groups(model)
    opt = make_optimizer(model, groups, full_config({"lr": 1.0, "layer_decay": 0.5}))
    lrs = sorted({g["lr"] for g in opt.param_groups})
    assert lrs == [0.5 ** i for i in range(len(groups) - 1, -1, -1)]
    assert all(g["weight_decay"] == 0.0 for g in opt.param_groups if all(p.ndim <= 1 for p in g["params"]))


@pytest.mark.parametrize("name", schedules.list_schedules())
def test_each_schedule_has_its_shape(name):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = schedules.create(name, opt, 100, 0.1, {})
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    peak = int(np.argmax(lrs))
    if name == "constant":
        assert lrs[0] < lrs[5] < lrs[10] == lrs[-1] == 1.0
    else:
        assert lrs[0] < lrs[peak] and lrs[-1] < lrs[peak] * 0.5 and 3 <= peak <= 15
    if name == "step":
        assert len(set(np.round(lrs[20:], 6))) == 3  # three flat steps after warmup
    if name == "cosine_restarts":
        assert any(lrs[i + 1] > lrs[i] * 2 for i in range(20, 99))  # a restart jumps back up


@pytest.mark.parametrize("name", [p for p in aug.list_image_policies() if p != "none"])
def test_image_policies_change_images_and_keep_shape(name):
    torch.manual_seed(0)
    x = torch.randint(0, 255, (3, 24, 24), dtype=torch.uint8)
    t = aug.image_transform(name, 16)
    outs = [t(x) for _ in range(4)]
    assert all(o.shape == (3, 16, 16) and o.dtype == torch.uint8 for o in outs)
    plain = torch.nn.functional.interpolate(x[None].float(), size=(16, 16), mode="bilinear", antialias=True)[0]
    assert any((o.float() - plain).abs().mean() > 1.0 for o in outs)
    assert aug.image_transform("none", 16) is None


@pytest.mark.parametrize("name", [p for p in aug.list_text_policies() if p != "none"])
def test_text_policies_change_tokens_but_keep_special_tokens(name):
    import random

    random.seed(0)
    ids = [101] + list(range(1000, 1030)) + [102]
    t = aug.text_transform(name, 0.3, 103)
    out = t(ids)
    assert out != ids and out[0] == 101 and out[-1] == 102


def test_text_trial_with_real_minilm(text_df):
    t = prepare(text_df)
    tr, va = t.splits["train"], t.splits["validation"]
    data = TrialData("text", t.num_classes, [t.texts[i] for i in tr], t.y[tr], [t.texts[i] for i in va], t.y[va])
    cfg = {"backbone": "minilm-l6", "lr": 2e-4, "unfreeze": 2, "max_length": 16, "batch_size": 16,
           "schedule": "constant", "text_augment": "mask", "text_aug_rate": 0.1}
    hist = fit(cfg, data, epochs=3).history
    assert hist[-1]["val_accuracy"] > 0.6 and hist[-1]["trainable_groups"] == 2


def test_local_weight_file_is_used_as_pretrained_source(tmp_path):
    """The pretrained path: body weights come from the file, the head is re-initialised for the new labels."""
    from safetensors.torch import save_file

    import timm

    src = timm.create_model("resnet10t", pretrained=False, num_classes=7)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    spec = models.BackboneSpec("timm", "resnet10t", pretrained=True, weights=str(tmp_path / "w.safetensors"))
    model = models.build(spec, 3)
    body = model.body.state_dict()
    assert torch.equal(body["conv1.0.weight"], src.state_dict()["conv1.0.weight"])
    assert body["fc.weight"].shape == (3, 512)
    same = models.build(f"timm/resnet10t@{tmp_path / 'w.safetensors'}", 3)  # the YAML form
    assert torch.equal(same.body.state_dict()["conv1.0.weight"], src.state_dict()["conv1.0.weight"])


OFFLINE_PROBE = """
import os, socket
# Every attempt to reach the network (a name look-up or a connection) is recorded and refused at once, so the
# probe sees whether the hub was tried at all, whatever this machine's network and however loaded it is.
attempts = []
def _refuse(what):
    def refuse(*args, **kwargs):
        attempts.append(what + " " + repr(args[:2])[:120])
        raise OSError("network refused by the offline probe")
    return refuse
socket.getaddrinfo = _refuse("getaddrinfo")
socket.create_connection = _refuse("create_connection")
socket.socket.connect = _refuse("connect")
socket.socket.connect_ex = _refuse("connect_ex")
import automl  # the package itself must make hub look-ups offline, before timm/transformers load
from automl import models
from automl.errors import ModelLoadError
print("HF_HUB_OFFLINE=" + str(os.environ.get("HF_HUB_OFFLINE")))
for name, fix in (("timm/resnet18.a1_in1k", "weights="), ("hf/some-org/not-downloaded-model", "local dir")):
    try:
        models.build(name, 3)
        print("LOADED", name)
    except ModelLoadError as exc:
        print("REFUSED", name, fix in str(exc))
print("NETWORK ATTEMPTS", len(attempts), attempts[:3])
"""


def test_hub_lookups_are_offline_by_default_and_fail_fast_with_a_fix(fresh):
    """In a fresh process with no hub settings at all (the test session's own conftest sets HF_HUB_OFFLINE)."""
    out = fresh.output("offline").splitlines()
    assert "HF_HUB_OFFLINE=1" in out, out
    assert "REFUSED timm/resnet18.a1_in1k True" in out and "REFUSED hf/some-org/not-downloaded-model True" in out
    # Fails fast: the refusal comes without trying the hub (online retries would take about a minute per model).
    assert "NETWORK ATTEMPTS 0 []" in out, out


READ_ONLY_PROBE = """
import warnings
import numpy as np
from automl.data.trial_data import TrialData
from automl.training.loop import fit
def frozen(a):
    a.setflags(write=False)  # as a Ray worker gets its trial's arrays from the object store
    return a
rng = np.random.default_rng(0)
x = frozen(rng.integers(0, 255, (32, 3, 16, 16), dtype=np.uint8))
y = frozen(np.arange(32) % 2)
data = TrialData("image", 2, x, y, x, y, class_weights=frozen(np.ones(2, dtype=np.float32)))
warnings.simplefilter("error", UserWarning)  # torch says it once a process, and this process has not said it yet
fit({"backbone": "timm/resnet10t:scratch", "image_size": 16, "batch_size": 16, "class_weighted": True}, data, epochs=1)
print("TRAINED")
"""


def test_a_trial_on_read_only_arrays_trains_without_torchs_warning(fresh):
    """A trial's arrays come read-only from Ray's object store; torch.as_tensor on them warned of undefined behaviour
    in every trial worker (shown wherever the user started Ray with its worker logs on). In a fresh process: torch
    gives that warning once a process, so an earlier test here would hide it."""
    assert fresh.output("read-only").strip() == "TRAINED"


@pytest.fixture(scope="module")
def fresh():
    """This module's fresh-interpreter checks, started together when the first of them runs."""
    hub_unset = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "AUTOML_"))}
    pythons = FreshPythons({"offline": (["-c", OFFLINE_PROBE], hub_unset), "read-only": ["-c", READ_ONLY_PROBE]})
    yield pythons
    pythons.stop()


def test_unknown_backbone_names_say_which_forms_exist():
    from automl.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="Unknown backbone 'resnet18'.*'timm/<model name>'.*Fix:"):
        models.resolve("resnet18")


@pytest.mark.parametrize("name", schedules.list_schedules())
@pytest.mark.parametrize("warmup_frac", [0.0, 0.2])
def test_every_schedule_survives_a_handful_of_steps(name, warmup_frac):
    # Few-shot data: 50 images at batch 64 is one step per epoch, so a 6-epoch trial has 6 steps in all.
    for total in range(1, 9):
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=1.0)
        sched = schedules.create(name, opt, total, warmup_frac, {})
        lrs = []
        for _ in range(total):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        assert all(np.isfinite(lrs)) and max(lrs) > 0, (name, total, lrs)


def test_a_report_is_a_fixed_number_of_rows_not_a_pass(digits_trial_data):
    cfg = {"backbone": "timm/resnet10t:scratch", "image_size": 16, "batch_size": 32, "unfreeze": 0}
    n = len(digits_trial_data.y_train)
    one = fit(cfg, digits_trial_data, epochs=2).history  # no report_rows: one pass per report
    three = fit({**cfg, "report_rows": 3 * n}, digits_trial_data, epochs=2).history
    half = fit({**cfg, "report_rows": 64}, digits_trial_data, epochs=2).history  # below a pass
    assert [h["steps"] for h in one] == [math.ceil(n / 32), 2 * math.ceil(n / 32)]
    assert [h["steps"] for h in three] == [math.ceil(3 * n / 32), 2 * math.ceil(3 * n / 32)]
    assert [h["steps"] for h in half] == [2, 4] and half[-1]["epochs_seen"] == pytest.approx(128 / n)


@pytest.mark.parametrize("schedule", ["onecycle", "cosine"])
def test_a_run_that_would_overrun_its_deadline_compresses_the_rest_of_its_schedule(digits_trial_data, monkeypatch,
                                                                                   schedule):
    """After the first report the pace says the rest cannot fit (the margin is made tiny): the other reports
    train fewer steps, and the LR schedule still reaches its end exactly at the last report (OneCycleLR refuses
    to step past its end, so overshooting would raise)."""
    import time

    from automl.training import loop

    cfg = {"backbone": "timm/resnet10t:scratch", "image_size": 16, "batch_size": 16, "report_rows": 16 * 6,
           "schedule": schedule, "warmup_frac": 0.1, "lr": 1e-2}
    full = fit(cfg, digits_trial_data, epochs=4).history
    monkeypatch.setattr(loop.Pace, "MARGIN", 0.0)  # as if the deadline were here: no time left, however fast
    late = fit(cfg, digits_trial_data, epochs=4, deadline=time.time() + 600).history
    assert [h["steps"] for h in full] == [6, 12, 18, 24]
    assert [h["steps"] for h in late] == [6, 7, 8, 9] and late[-1]["schedule_compressed"] == 1
    assert late[-1]["lr"] == pytest.approx(full[-1]["lr"], rel=1e-6, abs=1e-9)  # the schedule's end, both runs
    assert late[0]["lr"] == pytest.approx(full[0]["lr"])  # the same until the pace changed
    stale = fit(cfg, digits_trial_data, epochs=2, deadline=time.time() - 1).history  # a past deadline is ignored
    assert [h["steps"] for h in stale] == [6, 12]


def test_batches_stream_through_shuffled_passes_and_ranks_get_equal_shards():
    from automl.training.loop import Batches, shard_of

    b = Batches(np.arange(10), 4, seed=0)
    assert [len(b(i)) for i in range(3)] == [4, 4, 4]
    first_pass = np.concatenate([b(0), b(1), b(2)])[:10]
    assert sorted(first_pass.tolist()) == list(range(10))  # every row once per pass
    stream = np.concatenate([b(i) for i in range(5)])  # 20 rows: two whole passes, the second one reshuffled
    assert sorted(stream[10:20].tolist()) == list(range(10)) and not np.array_equal(stream[:10], stream[10:20])
    assert np.array_equal(Batches(np.arange(10), 4, seed=0)(5), b(5))  # a resumed run draws the same batch
    shards = [shard_of(11, r, 3) for r in range(3)]
    assert {len(s) for s in shards} == {4} and set(np.concatenate(shards)) == set(range(11))


DDP_CONFIG = {"backbone": {"library": "timm", "model": "test_vit", "pretrained": False, "kwargs": {"img_size": 32}},
              "image_size": 32, "optimizer": "sgd", "momentum": 0.0, "lr": 0.5, "weight_decay": 0.0, "batch_size": 8,
              "report_rows": 8, "schedule": "constant", "warmup_frac": 0.0, "dropout": 0.0, "seed": 3}


def _ddp_rank(rank: int, world: int, port: int, data_file: str, out_dir: str) -> None:
    """One rank of a real 2-process DDP run (gloo) of `fit`: one optimizer step, then its weights to a file."""
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.nn.parallel import DistributedDataParallel

    from automl.data.trial_data import TrialData

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    z = np.load(data_file)
    res = fit(DDP_CONFIG, TrialData("image", 3, z["x"], z["y"]), epochs=1, rank=rank, world_size=world,
              wrap_model=DistributedDataParallel, device=torch.device("cpu"))
    save_file({k: v.contiguous() for k, v in res.model.state_dict().items()}, f"{out_dir}/rank{rank}.safetensors")
    dist.destroy_process_group()


def test_ddp_ranks_stay_identical_and_average_gradients_like_one_process_on_the_union_batch(tmp_path, free_port):
    """What data parallelism promises: after a step both ranks hold the same weights, and they equal one process
    stepping on the union of the two ranks' batches (equal shards, batch_size / 2 rows each)."""
    import torch.multiprocessing as tmp_mp
    from safetensors.torch import load_file

    from automl.training.loop import Batches, build_model, full_config, make_optimizer, shard_of

    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 255, (20, 3, 32, 32), dtype=np.uint8), rng.integers(0, 3, 20)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    tmp_mp.spawn(_ddp_rank, args=(2, free_port, str(tmp_path / "data.npz"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)

    cfg = full_config(DDP_CONFIG)
    union = np.concatenate([Batches(shard_of(20, r, 2), 4, cfg["seed"] + r)(0) for r in range(2)])
    torch.manual_seed(cfg["seed"])  # rank 0's initial weights, which DDP broadcast to rank 1
    model, spec = build_model(cfg, 3)
    enc = models.family(spec).encoder(model, spec, cfg)
    groups = models.family(model).layer_groups(model)
    opt = make_optimizer(model, groups, cfg)
    loss = torch.nn.functional.cross_entropy(model(enc.batch(x, union)), torch.as_tensor(y[union]))
    loss.backward()
    opt.step()
    single = model.state_dict()
    torch.manual_seed(cfg["seed"])
    start = build_model(cfg, 3)[0].state_dict()
    assert not torch.allclose(start["body.head.weight"], single["body.head.weight"])  # the step moved the weights
    for k, v in single.items():
        assert torch.allclose(r0[k], v, atol=1e-5), k
