import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from sqlalchemy.exc import OperationalError

from fmsearch import study
from tests.conftest import run_tiny_study, study_text

RECORDED = {
    "history",
    "stop_reason",
    "best_epoch",
    "seconds",
    "images_per_second",
    "device",
    "seed",
    "labeled_count",
    "git_revision",
    "torch_version",
    "optuna_version",
    "config",
}


def trials_of(storage: str, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


def test_tiny_study_finishes_every_condition_and_records_everything(tiny_study):
    for summary, name in zip(tiny_study.summaries, ["tiny/labels=100%", "tiny/labels=50%"], strict=True):
        assert summary.study_name == name
        trials = trials_of(tiny_study.storage, name)
        assert sum(study.is_finished(t) for t in trials) == 3 == len(trials)
        for trial in trials:
            assert set(trial.user_attrs) >= RECORDED, RECORDED - set(trial.user_attrs)
            history = trial.user_attrs["history"]
            assert len(history) == len(trial.intermediate_values)
            assert [h["val_accuracy"] for h in history] == list(trial.intermediate_values.values())
            assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy"} <= set(history[0])
        for trial in trials:  # the pseudo-label metrics are recorded exactly for the pseudo trials
            pseudo = trial.params.get("unlabeled") == "pseudo"
            recorded = {"unlabeled_loss", "mask_rate", "pseudo_accuracy"} <= set(
                trial.user_attrs["history"][-1]
            )
            assert recorded == pseudo
    half_labels = trials_of(tiny_study.storage, "tiny/labels=50%")
    assert any(t.params["unlabeled"] == "pseudo" for t in half_labels)  # seeded: the check above ran


def test_the_best_trial_of_each_condition_is_scored_once_on_the_test_set(tiny_study):
    for summary in tiny_study.summaries:
        loaded = optuna.load_study(study_name=summary.study_name, storage=tiny_study.storage)
        test = loaded.user_attrs["test"]
        assert test["trial"] == loaded.best_trial.number
        assert 0.0 <= test["test_accuracy"] <= 1.0 and test["test_loss"] >= 0
        assert sum(map(sum, test["confusion"])) == 300  # every test image once
        best_copy = tiny_study.options.results_dir / "tiny" / f"{study.slug(summary.study_name)}-best.pt"
        assert best_copy.exists()


def test_labeled_count_is_recorded_per_condition(tiny_study):
    full, half = (trials_of(tiny_study.storage, s.study_name) for s in tiny_study.summaries)
    assert {t.user_attrs["labeled_count"] for t in full} == {1000}
    assert {t.user_attrs["labeled_count"] for t in half} == {500}


def test_rerunning_resumes_and_never_repeats_a_finished_trial(tmp_path, tiny):
    first = run_tiny_study(tmp_path, tiny, study_text(), name="resume")
    name = first.summaries[0].study_name
    before = [(t.number, t.state, t.value) for t in trials_of(first.storage, name)]
    run_tiny_study(tmp_path, tiny, study_text(), name="resume")
    assert [(t.number, t.state, t.value) for t in trials_of(first.storage, name)] == before
    run_tiny_study(tmp_path, tiny, study_text(), name="resume", trials=5)
    after = trials_of(first.storage, name)
    assert [(t.number, t.state, t.value) for t in after[:3]] == before and len(after) == 5


def test_an_aggressive_pruner_ends_trials_pruned(tmp_path, tiny):
    pruner = (
        "name = 'percentile'\npercentile = 10.0\nwarmup_epochs = 0\nstartup_trials = 1"  # keep the top 10%
    )
    space = "lr = { low = 1e-5, high = 3e-3, log = true }"  # slow rates lag behind: something to prune
    text = study_text(trials=6, max_epochs=4, pruner=pruner, space=space)
    run = run_tiny_study(tmp_path, tiny, text, name="pruned")
    trials = trials_of(run.storage, run.summaries[0].study_name)
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned, [t.state for t in trials]
    for trial in pruned:
        assert trial.user_attrs["stop_reason"] == "pruned"
        assert len(trial.intermediate_values) < 4


def test_early_stopping_ends_complete_with_the_best_epoch_value(tmp_path, tiny):
    fixed = "optimizer = 'adam'\narch = 'plain'"  # the monitor is the study's metric, val_accuracy
    text = study_text(
        trials=2, max_epochs=30, patience=1, fixed=fixed, space="lr = { low = 3e-3, high = 5e-3 }"
    )
    run = run_tiny_study(tmp_path, tiny, text, name="early")
    for trial in trials_of(run.storage, run.summaries[0].study_name):
        assert trial.state == TrialState.COMPLETE
        assert trial.user_attrs["stop_reason"] == "early-stopped"
        history = trial.user_attrs["history"]
        best_epoch = trial.user_attrs["best_epoch"]
        assert len(history) == best_epoch + 1
        assert (
            trial.value == history[best_epoch - 1]["val_accuracy"] == max(h["val_accuracy"] for h in history)
        )


def test_a_diverging_trial_fails_with_its_reason_and_the_study_goes_on(tmp_path, tiny):
    text = study_text(trials=4, fixed="optimizer = 'sgd'\narch = 'plain'", space="lr = [1e4, 1e-3]")
    run = run_tiny_study(tmp_path, tiny, text, name="diverge")
    trials = trials_of(run.storage, run.summaries[0].study_name)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert failed and all(t.params["lr"] == 1e4 for t in failed)
    for trial in failed:
        assert trial.user_attrs["stop_reason"] == "diverged"
        assert "NaN or inf" in trial.user_attrs["error"]
    assert sum(study.is_finished(t) for t in trials) == 4
    assert any(t.state == TrialState.COMPLETE for t in trials)


WORKER_SCRIPT = """
import sys
from pathlib import Path
sys.path.insert(0, {repo!r})
from tests.conftest import run_tiny_study, write_tiny_fashion_mnist
folder = Path({folder!r})
run_tiny_study(folder, write_tiny_fashion_mnist(folder / "data"), {text!r}, name="killed", jobs={jobs})
"""


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_a_study_killed_mid_trial_then_rerun_ends_with_exactly_n_per_condition(tmp_path):
    text = study_text(trials=3, max_epochs=12)
    script = WORKER_SCRIPT.format(repo=str(Path.cwd()), folder=str(tmp_path), text=text, jobs=2)
    storage = f"sqlite:///{tmp_path}/studies.db"
    name = "killed/labels=100%"
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # wait until a trial is part-way through its epochs
        time.sleep(0.5)
        if process.poll() is not None:
            pytest.fail(
                f"the study ended before it could be killed: {process.stderr.read().decode()[-2000:]}"
            )
        try:
            running = [t for t in trials_of(storage, name) if t.state == TrialState.RUNNING]
        except (KeyError, OperationalError):  # the study or its schema does not exist yet
            continue
        if any(len(t.intermediate_values) >= 2 for t in running):
            break
    workers = _children(process.pid)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 30
    while any(map(_alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(map(_alive, workers)), "worker processes outlived their killed parent"
    assert any(t.state == TrialState.RUNNING for t in trials_of(storage, name))

    rerun = WORKER_SCRIPT.format(repo=str(Path.cwd()), folder=str(tmp_path), text=text, jobs=1)
    subprocess.run([sys.executable, "-c", rerun], check=True, capture_output=True, timeout=300)
    trials = trials_of(storage, name)
    assert sum(study.is_finished(t) for t in trials) == 3
    assert not any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials)
    stale = [t for t in trials if t.state == TrialState.FAIL]
    assert stale, "the killed trial should have been failed by its heartbeat"
    retried = {t.system_attrs.get("failed_trial") for t in trials} - {None}
    assert {t.number for t in stale} <= retried


@pytest.mark.slow
def test_two_worker_processes_lose_nothing_and_duplicate_nothing(tmp_path, tiny):
    run = run_tiny_study(tmp_path, tiny, study_text(trials=6), name="pair", jobs=2)
    trials = trials_of(run.storage, run.summaries[0].study_name)
    assert len(trials) == 6 and [t.number for t in trials] == list(range(6))
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 6


def test_optunas_own_cli_reads_what_fmsearch_wrote(tiny_study):
    optuna_cli = Path(sys.executable).with_name("optuna")
    result = subprocess.run(
        [
            str(optuna_cli),
            "trials",
            "--storage",
            tiny_study.storage,
            "--study-name",
            "tiny/labels=50%",
            "-f",
            "json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = json.loads(result.stdout)
    assert len(rows) == 3 and {row["state"] for row in rows} <= {"COMPLETE", "PRUNED"}


def test_a_bad_storage_url_is_one_line_with_the_fix():
    with pytest.raises(study.StudyError, match="cannot open storage 'mysql://nowhere/x'.*use sqlite:///"):
        study.open_storage("mysql://nowhere/x")


def test_parallel_workers_run_on_a_storage_created_before_they_start(tmp_path, tiny):
    """study.run creates the schema and the studies itself: its workers only ever load them."""
    text = study_text(trials=1, max_epochs=1)
    assert not (tmp_path / "studies.db").exists()
    run = run_tiny_study(tmp_path, tiny, text, name="prepared", jobs=2)
    assert len(trials_of(run.storage, run.summaries[0].study_name)) == 1


DISTILL_STUDY = """
description = "tiny: distillation at half the labels"
trials = 3
max_epochs = 2
batch_size = 32
patience = 2

[pruner]
name = "none"

[fixed]
unlabeled = "distill"
teachers = 2
teacher_epochs = 2

[conditions]
labeled_fraction = [0.5]

[space]
lr = { low = 1e-3, high = 3e-3, log = true }
"""


def test_distill_trials_share_their_teachers_and_record_their_cost(tmp_path, tiny):
    run = run_tiny_study(tmp_path, tiny, DISTILL_STUDY, name="distilled")
    trials = trials_of(run.storage, run.summaries[0].study_name)
    assert len(trials) == 3 and all(t.state == TrialState.COMPLETE for t in trials)
    cache = run.options.results_dir / "teachers"
    assert len(list(cache.glob("*-logits.pt"))) == 2  # trained once by the first trial, read by the others
    costs = [t.user_attrs["teachers"] for t in trials]
    assert all(c == costs[0] for c in costs) and costs[0]["count"] == 2 and costs[0]["epochs"] == 4
    assert 0.0 < costs[0]["test_accuracy"] <= 1.0


def test_the_pruner_waits_for_the_pseudo_label_warm_up(tmp_path, tiny):
    """A pseudo trial is judged only after its labeled-only epochs plus the pruner's own warm-up."""
    pruner = "name = 'percentile'\npercentile = 99.0\nwarmup_epochs = 1\nstartup_trials = 1"
    text = (
        DISTILL_STUDY.replace('unlabeled = "distill"', 'unlabeled = "pseudo"\nwarmup_epochs = 3')
        .replace("max_epochs = 2", "max_epochs = 5")
        .replace("patience = 2", "patience = 5")
        .replace('name = "none"', pruner)
        .replace("trials = 3", "trials = 6")
        .replace("low = 1e-3, high = 3e-3", "low = 1e-5, high = 3e-3")  # slow rates lag: something to prune
    )
    run = run_tiny_study(tmp_path, tiny, text, name="warm")
    trials = trials_of(run.storage, run.summaries[0].study_name)
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned, [t.state for t in trials]  # a 99th-percentile pruner prunes once it may
    assert all(len(t.intermediate_values) >= 3 + 1 for t in pruned)
