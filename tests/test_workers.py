"""workers.py: several worker processes share a study; a kill -9 or a Ctrl-C loses no finished trial."""

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

from fmsearch import storage, workers
from tests.conftest import QuietProgress, QuietReporter, run_tiny_study, study_text, write_study


def trials_of(storage_url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=storage_url).get_trials(deepcopy=False)


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
    url = f"sqlite:///{tmp_path}/studies.db"
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
            running = [t for t in trials_of(url, name) if t.state == TrialState.RUNNING]
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
    assert any(t.state == TrialState.RUNNING for t in trials_of(url, name))

    rerun = WORKER_SCRIPT.format(repo=str(Path.cwd()), folder=str(tmp_path), text=text, jobs=1)
    subprocess.run([sys.executable, "-c", rerun], check=True, capture_output=True, timeout=300)
    trials = trials_of(url, name)
    assert sum(storage.is_finished(t) for t in trials) == 3
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


def test_parallel_workers_run_on_a_storage_created_before_they_start(tmp_path, tiny):
    """study.run creates the schema and the studies itself: its workers only ever load them."""
    text = study_text(trials=1, max_epochs=1)
    assert not (tmp_path / "studies.db").exists()
    run = run_tiny_study(tmp_path, tiny, text, name="prepared", jobs=2)
    assert len(trials_of(run.storage, run.summaries[0].study_name)) == 1


def test_a_worker_catches_ctrl_c_only_where_its_command_was_not_started_deaf_to_it():
    """A shell without job control starts `fmsearch study ... &` with SIGINT ignored; a worker that
    caught it anyway would stop under a parent that carries on (exit 1, not 130, in one CI run)."""
    before = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        workers._catch_interrupts()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        signal.signal(signal.SIGINT, signal.default_int_handler)
        workers._catch_interrupts()
        assert signal.getsignal(signal.SIGINT) is workers._interrupt_once
    finally:
        signal.signal(signal.SIGINT, before)


class _TakenOver(QuietProgress):
    """After the trial's first epoch, another worker's stale check fails it, as when this worker was
    paused past the grace period."""

    def __init__(self, url: str, name: str, number: int):
        self.url, self.name, self.number = url, name, number

    def epoch_end(self, metrics: dict) -> None:
        if self.number == 0 and metrics["epoch"] == 1:
            study = optuna.load_study(study_name=self.name, storage=self.url)
            (trial,) = [t for t in study.get_trials(deepcopy=False) if t.number == 0]
            study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)


class _TakingReporter(QuietReporter):
    def __init__(self, url: str):
        super().__init__()
        self.url = url

    def trial_progress(self, study_name: str, number: int, max_epochs: int) -> _TakenOver:
        return _TakenOver(self.url, study_name, number)


def test_a_worker_whose_trial_was_failed_as_stale_says_so_in_one_line_and_goes_on(tmp_path, tiny):
    """Optuna 5 then raises on telling the trial (5.1: AssertionError "Should not reach."): the worker
    reports the trial as taken and runs the next one."""
    from fmsearch import spec, study

    study_spec = spec.parse(write_study(tmp_path, study_text(trials=2, max_epochs=2), "taken"))
    options = study.RunOptions(
        storage=f"sqlite:///{tmp_path}/studies.db",
        results_dir=tmp_path / "results",
        data_config=tiny.config(),
    )
    study.prepare(study_spec, options)
    reporter = _TakingReporter(options.storage)
    study.run(study_spec, options, lambda worker: reporter, study.load_splits(study_spec, options))
    outcomes = {o.number: o for o in reporter.ended}
    assert outcomes[0].stop_reason == "stale" and outcomes[0].error.startswith("another worker failed it")
    trials = trials_of(options.storage, "taken/labels=100%")
    assert trials[0].state == TrialState.FAIL and sum(storage.is_finished(t) for t in trials) == 2


def test_a_trial_whose_worker_died_before_its_first_heartbeat_is_failed_and_retried(tmp_path, tiny):
    """`ask()` creates a RUNNING trial and starts no heartbeat: a worker killed in that window leaves
    such a trial, which Optuna's stale check never fails. A rerun must not wait for it for ever."""
    text = study_text(trials=2, max_epochs=1)
    first = run_tiny_study(tmp_path, tiny, text, name="killed", trials=1)
    name = first.summaries[0].study_name
    orphan = optuna.load_study(study_name=name, storage=first.storage).ask()
    rerun = WORKER_SCRIPT.format(repo=str(Path.cwd()), folder=str(tmp_path), text=text, jobs=1)
    result = subprocess.run([sys.executable, "-c", rerun], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    trials = trials_of(first.storage, name)
    assert trials[orphan.number].state == TrialState.FAIL
    assert sum(storage.is_finished(t) for t in trials) == 2
    assert any(t.system_attrs.get("failed_trial") == orphan.number for t in trials)  # retried
