"""The Ray Tune controller: OptunaSearch proposes, ASHA stops, the trial table tells the story; nothing is lost when
a trial's worker dies (it resumes from its checkpoint), and finished trials' checkpoints are pruned while the search
still runs. One 8-trial search serves them all."""
from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest
from ray.tune import Callback

from automl.search.tune import SearchConfig, SearchLimits, SearchStorage, run_search
from automl.search.space import load_space

# The tests that use `search` (one Ray Tune search, shared by the module) are marked slow one by one.


class Watch(Callback):
    """Looks, as results come in, for a finished trial whose checkpoints are gone while others still run."""

    def __init__(self, exp: Path):
        self.exp, self.finished, self.checkpointed, self.pruned_mid_search = exp, set(), set(), False

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.finished.add(trial.trial_id)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        for d in self.exp.glob("trial_*/checkpoint_*"):
            self.checkpointed.add(d.parent.name[len("trial_"):])
        running = any(t.status == "RUNNING" and t.trial_id not in self.finished for t in trials)
        for tid in self.finished & self.checkpointed:
            if running and not list((self.exp / f"trial_{tid}").glob("checkpoint_*")):
                self.pruned_mid_search = True


@pytest.fixture(scope="module")
def search(ray_session, digits_trial_data, tmp_path_factory):
    """8 trials of the CPU space at 16 px, two at a time, under ASHA. Every report is checkpointed and Tune saves its
    state every second (so pruning can follow within the search); the first trial to finish its third report dies
    once, right after its checkpoint, and names itself in the marker file."""
    tmp = tmp_path_factory.mktemp("search")
    marker, watch = tmp / "crashed", Watch(tmp / "s")
    space = load_space("cpu_small", "image", {"image_size": 16, "max_epochs": 4, "reduction_factor": 2,
                                              "_crash_once_after_epoch": f"3:{marker}"})
    watch.sigint_before = signal.getsignal(signal.SIGINT)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNE_GLOBAL_CHECKPOINT_S", "1")
        mp.setenv("AUTOML_SYNC_PERIOD_S", "1")
        result = run_search(digits_trial_data, space, SearchConfig(
            "accuracy", SearchStorage(str(tmp), "s", checkpoint_every_s=0), SearchLimits(max_trials=8), {"cpu": 1},
            concurrency=2, progress=False), callbacks=[watch])
    watch.sigint_after = signal.getsignal(signal.SIGINT)
    return result, marker, watch


def _du(path) -> int:
    """Bytes of the files under `path` now."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _peak_lower_bound(result) -> int:
    """What the experiment directory held at the search's end, before the finished trials' checkpoints were pruned:
    what it holds now, plus the last trial's newest checkpoint (model and optimizer state: at least as large as its
    weights file in best/)."""
    weights = max(f.stat().st_size for f in Path(result.experiment_path, "best").glob("*.final.safetensors"))
    return _du(result.experiment_path) + weights


@pytest.mark.slow
def test_search_runs_trials_and_asha_stops_some_early(search, digits_trial_data):
    result = search[0]
    t = result.trials
    assert len(t) == 8
    assert set(t["status"]) <= {"COMPLETED", "STOPPED_EARLY"}  # no time limit: nothing cut
    assert (t["status"] == "STOPPED_EARLY").sum() >= 1, t[["status", "epochs_run"]]  # stopped by ASHA, not the budget
    assert (t["epochs_run"] <= 4).all() and (t["status"] != "ERROR").all()
    assert {"config/backbone", "config/lr", "config/schedule", "best_val_accuracy", "epochs_run"} <= set(t.columns)
    assert t["config/lr"].nunique() == 8  # Optuna proposes distinct configs
    # The winner's score and report are those of the weights its trial kept (written by the trial itself, not read
    # back from the table), and those weights, evaluated here on the validation rows, score exactly that.
    import torch

    from automl.search import kept
    from automl.training.loop import build_encoder, encode_inputs, evaluate, full_config, load_best

    snap = kept.read(result.best_dir, result.best_trial_id)["snapshots"][0]  # its best report (ties: the later)
    assert snap["report"] == result.best_epoch and snap["score"] == pytest.approx(result.best_score)
    assert result.best_score == t["best_val_accuracy"].max()
    d = digits_trial_data
    model, spec = load_best(result.best_config, d.num_classes, kept.best_file(result.best_dir, result.best_trial_id))
    enc = build_encoder(full_config(result.best_config), model, spec)
    val = evaluate(model, enc, encode_inputs(enc, d.x_val), d.y_val, d.num_classes, torch.device("cpu"))
    assert val["accuracy"] == pytest.approx(result.best_score), (val, result.best_score)
    # The trial saved that report's validation probabilities beside its model: the final choice reads them instead
    # of a pass over the validation rows. They are the model's own, and read only for the rows they were scored on.
    from automl.training.combine import _member

    model_file = kept.model_file(result.best_dir, result.best_trial_id)
    m, _ = load_best(result.best_config, d.num_classes, model_file)
    own = evaluate(m, enc, encode_inputs(enc, d.x_val), d.y_val, d.num_classes, torch.device("cpu"),
                   keep_scores=True)["scores"]
    saved = kept.model_val_proba(result.best_dir, result.best_trial_id, d.y_val)
    assert saved is not None and saved.shape == own.shape and abs(saved - own).max() < 1e-4
    assert kept.model_val_proba(result.best_dir, result.best_trial_id, d.y_val[::-1]) is None
    member = _member(result.best_trial_id, result.best_config, result.best_score, result.best_dir, d.num_classes,
                     lambda _: None, d.y_val)  # no inputs: a pass over them would fail
    assert (member.proba == saved).all()
    assert result.best_config["image_size"] == 16
    # The space's start point (a sensible fixed config) is tried, and ASHA never stops it.
    start = t[(t["config/lr"] == 1e-3) & (t["config/backbone"] == "efficientnet-lite0")]
    assert len(start) == 1 and start.iloc[0]["status"] == "COMPLETED" and start.iloc[0]["epochs_run"] == 4


@pytest.mark.slow
def test_a_trial_whose_worker_dies_resumes_from_its_last_checkpoint(search, digits_trial_data):
    result, marker, _ = search
    tid = marker.read_text()  # the worker process really died once, in this trial
    row = result.trials.set_index("trial_id").loc[tid]
    assert row["status"] == "COMPLETED" and row["epochs_run"] == 4
    # Continued with its 4th report from the report-3 checkpoint, not from scratch: Tune's count of the trial's
    # reports (training_iteration) resumes either way, so the trial's own count (epoch) is what tells. (Ray restores
    # the trial's result file from storage on restart, so lines written after its last sync may be gone: judge by
    # time.)
    after_crash = [(r["training_iteration"], r["epoch"]) for r in result.history[tid]
                   if r["timestamp"] > marker.stat().st_mtime]
    assert after_crash == [(4, 4)]
    assert "_crash_once_after_epoch" not in result.best_config
    # Its rows' margins over its training (label errors rank by them) came through the crash: counted once for each
    # row of each of its steps, the three reports before it as well as the one after.
    bs = int(row["config/batch_size"])
    steps = 4 * -(-len(digits_trial_data.y_train) // bs)  # a report is a pass here (no deadline, no report_rows)
    assert row["config/mix"] == "none"  # mixed batches have no one label per row: not counted
    with np.load(Path(result.best_dir) / f"{tid}.margins.npz") as z:
        assert int(z["count"].sum()) == steps * bs and z["count"].min() >= 1, (steps, bs, z["count"].sum())


@pytest.mark.slow
def test_finished_trials_checkpoints_are_pruned_while_the_search_still_runs(search):
    result, _, watch = search
    assert watch.checkpointed and watch.pruned_mid_search
    assert not list(Path(result.experiment_path).glob("trial_*/checkpoint_*"))
    assert result.peak_disk_mb * 2**20 >= _peak_lower_bound(result)


@pytest.mark.slow
def test_after_the_search_ctrl_c_stops_the_run_at_once_again(search):
    """Tune leaves its own SIGINT handler installed after a search: a Ctrl-C while the run then finalised, evaluated
    or exported only set a flag nothing read any more. The search gives back the handler it found."""
    _, _, watch = search
    assert watch.sigint_after is watch.sigint_before, (watch.sigint_after, watch.sigint_before)


def test_the_progress_line_says_which_report_of_which_trial_scored_best(capsys):
    """The live view's "best" is any report's score, mid-schedule included: it names the trial and the report, so a
    user does not read it as a finished trial's (the search judges each trial by its end-of-schedule weights)."""
    from types import SimpleNamespace

    from automl.search.progress import SearchProgress

    view = SearchProgress("accuracy", max_epochs=4, time_budget_s=None)
    a, b = SimpleNamespace(trial_id="a", status="RUNNING"), SimpleNamespace(trial_id="b", status="RUNNING")
    for trial, it, score in ((a, 1, 0.6), (a, 2, 0.8), (b, 1, 0.5), (b, 2, 0.7), (a, 3, 0.75)):
        view.on_trial_result(it, [a, b], trial, {"training_iteration": it, "val_accuracy": score})
    b.status = "TERMINATED"
    view.on_trial_complete(2, [a, b], b)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "1 trials done (1 stopped early), 1 running" in line, line
    assert "best report's accuracy 0.8000 (a, report 2/4)" in line, line


def test_a_log_gets_the_status_line_from_reports_every_30_s_while_no_trial_ends(capsys, monkeypatch):
    """Where the line cannot be redrawn (a log file, a job's log), it was printed only when a trial ended: a log
    showed the plan, then nothing for the minutes the start point trained alone. A report prints it now, at most
    once every PRINT_EVERY_S (the view's clock, here a fake one)."""
    from types import SimpleNamespace

    from automl.search import progress

    now = [1000.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    view = progress.SearchProgress("accuracy", max_epochs=12, time_budget_s=300)
    assert view.live is None  # capsys: not a terminal
    start = SimpleNamespace(trial_id="s", status="RUNNING")
    printed = []
    for report in range(1, 13):  # a report every 12 s
        now[0] += 12.0
        view.on_trial_result(report, [start], start, {"training_iteration": report, "val_accuracy": report / 100})
        printed += [(report, line) for line in capsys.readouterr().err.splitlines()]
    assert [r for r, _ in printed] == [3, 6, 9, 12], printed  # each the first report 30 s or more after the last line
    assert printed[0][1].endswith("best report's accuracy 0.0300 (s, report 3/12) |   264s left"), printed[0][1]
    start.status = "TERMINATED"
    view.on_trial_complete(12, [start], start)  # a trial's end is printed at once, as before
    assert "1 trials done (0 stopped early), 0 running" in capsys.readouterr().err


def test_the_progress_view_and_the_card_say_when_the_searcher_re_priced_the_plan(capsys, tmp_path):
    """The searcher re-prices what it has not timed by how fast the start point ran against its probe (a busy
    probe, then a quiet machine): the extra trials were the only sign of it. The view prints it once each time the
    noted drift moves; the card states the last one; a drift within NOTE_DRIFT (25%) is not mentioned."""
    import json
    from types import SimpleNamespace

    from automl import load
    from automl.export.card import model_card
    from automl.search.progress import SearchProgress

    noted = tmp_path / "clock_repriced.json"
    view = SearchProgress("accuracy", max_epochs=4, time_budget_s=300, repriced_file=str(noted))
    a = SimpleNamespace(trial_id="a", status="RUNNING")
    printed = []
    for it, drift in ((1, None), (2, 0.3), (3, 0.3), (4, 1.2)):
        if drift is not None:  # the searcher notes it as it suggests a trial, which then starts
            noted.write_text(json.dumps({"drift": drift}))
            view.on_trial_start(it, [a], a)
        view.on_trial_result(it, [a], a, {"training_iteration": it, "val_accuracy": 0.5})
        printed.append([line for line in capsys.readouterr().err.splitlines() if "re-priced" in line])
    assert printed[0] == [] and printed[2] == [] and printed[3] == [], printed
    assert printed[1] == ["automl: plan: the start point took 0.30x the time the speed probes priced (the machine "
                          "ran faster than while it planned): every candidate not yet timed, and the last start, were "
                          "re-priced by the same factor"], printed
    m = load(Path(__file__).parent / "fixtures" / "v1_text_export").manifest
    m.search = {**m.search, "drift": 2.5}
    assert "While the search ran, the start point took 2.50x the time the speed probes priced (the machine ran " \
        "slower" in model_card(m, None)
    m.search["drift"] = 1.2
    assert "re-priced" not in model_card(m, None)
