"""confirm.py: each condition's best configuration rerun on new seeds, resumably."""

import contextlib
import os
import threading
import time
from dataclasses import replace

import optuna
import pytest
from optuna.trial import TrialState

from fmsearch import confirm, spec, storage, study
from tests.conftest import run_tiny_study, study_text


def reruns(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=storage.confirm_name(name), storage=url).get_trials(deepcopy=False)


@contextlib.contextmanager
def beating(rdb, trial_id: int):
    """Another command's worker, alive: the trial's heartbeat, every interval while the block runs."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            rdb.record_heartbeat(trial_id)
            stop.wait(rdb.get_heartbeat_interval())

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def searched(tmp_path, tiny, name: str, trials: int, seeds: int):
    """A tiny one-condition study searched to its trials: (run, the condition's study name, its
    storage, its splits), ready to confirm on `seeds` seeds."""
    text = study_text(trials=trials, max_epochs=1) + f"\n[confirm]\nseeds = {seeds}\n"
    run = run_tiny_study(tmp_path, tiny, text, name=name)
    rdb = storage.open_storage(run.storage, heartbeat_interval=1)
    return run, run.summaries[0].study_name, rdb, study.load_splits(run.spec, run.options)


def test_a_killed_confirmation_resumes_without_repeating_a_seed(tmp_path, tiny):
    run, name, rdb, splits = searched(tmp_path, tiny, "conf", trials=2, seeds=2)
    best = storage.best_trial(optuna.load_study(study_name=name, storage=rdb).trials)

    lines = []

    def killed_after_the_first_seed(line: str) -> None:
        lines.append(line)
        if "test_accuracy" in line:  # not at the line that says it started
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        confirm.confirm(run.spec, rdb, splits, run.options, log=killed_after_the_first_seed)
    assert lines[0].startswith(f"{name}: trial #{best.number} on seed 1: started (its own run took ")
    assert lines[1].startswith(f"{name}: trial #{best.number} on seed 1: test_accuracy ") and len(lines) == 2
    # What a kill -9 leaves: the second seed claimed, RUNNING, and no heartbeat for a grace period.
    killed = optuna.load_study(study_name=storage.confirm_name(name), storage=rdb).ask()
    killed.set_user_attr("config", {**best.user_attrs["config"], "seed": 2})
    killed.set_user_attr("source_trial", best.number)
    first = [(t.number, t.user_attrs["config"]["seed"]) for t in reruns(run.storage, name) if t.value]
    assert len(first) == 1
    time.sleep(run.options.grace_period + 0.5)

    done = confirm.confirm(run.spec, rdb, splits, run.options)[0]
    trials = reruns(run.storage, name)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert [(t.number, t.user_attrs["config"]["seed"]) for t in complete][:1] == first  # kept, not rerun
    assert sorted(t.user_attrs["config"]["seed"] for t in complete) == confirm.seeds(0, 2) == [1, 2]
    assert all(t.user_attrs["source_trial"] == best.number for t in complete)
    assert trials[killed.number].state == TrialState.FAIL  # the killed rerun was failed, its seed run again
    assert done.source_trial == best.number and sorted(done.test_accuracy) == [1, 2]
    ran_in = best.user_attrs["execution"]["amp"]  # the precision this machine chose for the search
    assert best.user_attrs["config"]["amp"] is None and isinstance(ran_in, bool)
    for t in complete:  # the rerun is the best trial's configuration on another seed, scored once on test
        assert {k: v for k, v in t.user_attrs["config"].items() if k not in ("seed", "amp")} == {
            k: v for k, v in best.user_attrs["config"].items() if k not in ("seed", "amp")
        }
        # in the trial's own precision, stated, so that a machine choosing otherwise reruns it the same
        assert t.user_attrs["config"]["amp"] is ran_in and t.user_attrs["execution"]["amp"] is ran_in
        assert 0.0 < t.user_attrs["test"]["test_accuracy"] <= 1.0

    more = spec.parse(run.spec.path, run.spec.path.read_text().replace("seeds = 2", "seeds = 3"))
    again = confirm.confirm(more, rdb, splits, run.options)[0]
    assert sorted(again.test_accuracy) == [1, 2, 3]
    assert len([t for t in reruns(run.storage, name) if t.state == TrialState.COMPLETE]) == 3


def test_a_rerun_another_command_is_running_keeps_its_seed(tmp_path, tiny):
    """Two machines confirming one study: a live rerun (it beats) is neither failed nor repeated."""
    run, name, rdb, splits = searched(tmp_path, tiny, "live", trials=1, seeds=2)
    best = storage.best_trial(optuna.load_study(study_name=name, storage=rdb).trials)
    optuna.create_study(study_name=storage.confirm_name(name), storage=rdb, direction="maximize")
    elsewhere = optuna.load_study(study_name=storage.confirm_name(name), storage=rdb).ask()
    elsewhere.set_user_attr("config", {**best.user_attrs["config"], "seed": 1})
    elsewhere.set_user_attr("source_trial", best.number)
    with beating(rdb, elsewhere._trial_id):
        time.sleep(run.options.grace_period + 0.5)  # older than the grace period, but beating
        (done,) = confirm.confirm(run.spec, rdb, splits, run.options)
    trials = reruns(run.storage, name)
    assert [(t.user_attrs["config"]["seed"], t.state) for t in trials] == [
        (1, TrialState.RUNNING), (2, TrialState.COMPLETE)
    ]  # fmt: skip
    assert sorted(done.test_accuracy) == [2]


def test_two_workers_share_the_reruns_and_never_train_a_seed_twice(tmp_path, tiny):
    """`fmsearch confirm --jobs 2`: two processes claim seeds under the confirmation study's gate."""
    run, name, rdb, splits = searched(tmp_path, tiny, "pair", trials=1, seeds=4)
    (done,) = confirm.confirm(run.spec, rdb, splits, replace(run.options, jobs=2))
    trials = reruns(run.storage, name)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4  # no seed claimed twice, none failed
    assert (
        sorted(t.user_attrs["config"]["seed"] for t in trials) == [1, 2, 3, 4] == sorted(done.test_accuracy)
    )
    assert all(
        t.user_attrs["worker"].split(":")[1] != str(os.getpid()) for t in trials
    )  # the workers ran them
    assert done.test_accuracy == {
        t.user_attrs["config"]["seed"]: t.user_attrs["test"]["test_accuracy"] for t in trials
    }


def test_a_search_short_of_its_trials_or_past_its_deadline_is_not_confirmed(tmp_path, tiny):
    """A search cut off by its time budget may still change its best: `make study TIME=` must not
    confirm it; and the confirmation itself starts no rerun after the budget's deadline."""
    run, name, rdb, splits = searched(tmp_path, tiny, "short", trials=1, seeds=2)
    lines = []
    assert confirm.confirm(run.spec.overridden(trials=3), rdb, splits, run.options, lines.append) == []
    assert lines == [
        f"{name}: its search has 1 of 3 finished trials, and its best may still change: confirmed once "
        "the search ends (`fmsearch study short` resumes it)"
    ]
    for jobs in (1, 2):  # said once, and no worker started to say it again
        lines.clear()
        late = replace(run.options, deadline=0.0, jobs=jobs)
        done = confirm.confirm(run.spec, rdb, splits, late, lines.append)
        assert [d.test_accuracy for d in done] == [{}]
        assert lines == ["time budget reached: no rerun started after it; run the same command to resume"]
    assert not optuna.load_study(study_name=storage.confirm_name(name), storage=rdb).trials


def test_a_condition_that_searched_nothing_counts_its_own_trial_as_a_seed(tmp_path, tiny):
    """No trial was picked from others (fraction.toml), so the trial is not optimistic: seeds = 2 is
    the trial and one rerun, and the report's confirmed score is over both."""
    from fmsearch import report

    text = study_text(trials=1, max_epochs=1, fixed="optimizer = 'adam'\narch = 'plain'", space="")
    run = run_tiny_study(tmp_path, tiny, text + "\n[confirm]\nseeds = 2\n", name="fixed")
    name = run.summaries[0].study_name
    rdb = storage.open_storage(run.storage)
    splits = study.load_splits(run.spec, run.options)
    own = run.summaries[0].test.test_accuracy
    (trial,) = optuna.load_study(study_name=name, storage=rdb).get_trials(deepcopy=False)
    assert run.spec.searches_nothing(run.spec.condition_list()[0]) and storage.unselected(trial)  # they agree
    done = confirm.confirm(run.spec, rdb, splits, run.options)[0]
    assert [t.user_attrs["config"]["seed"] for t in reruns(run.storage, name)] == [1]
    assert sorted(done.test_accuracy) == [0, 1] and done.test_accuracy[0] == own
    (condition,) = [c for c in report.load_conditions(run.storage, "fixed") if c.study.study_name == name]
    assert condition.score.confirmed and condition.score.accuracies == (own, done.test_accuracy[1])


def test_a_confirmed_score_gives_its_spread_or_says_it_has_none():
    def line(scores: dict[int, float]) -> str:
        return confirm.Confirmed("s/labels=10%", 3, scores).text()

    assert line({1: 0.90, 2: 0.92}) == "test_accuracy 0.9100 ± 0.0141 (n=2)"
    assert line({100: 0.8}) == "test_accuracy 0.8000 (n=1, a single run: no spread yet)"  # not "± nan"
    assert line({}) == "no seed has finished yet"


def test_confirmation_seeds_are_never_the_searchs_own():
    assert confirm.seeds(7, 3) == [8, 9, 10] and confirm.seeds(2**32 - 2, 3) == [2**32 - 1, 0, 1]
    assert confirm.seeds(0, 0) == []


def test_confirm_before_the_study_ran_is_one_line(tmp_path, capsys):
    from fmsearch import cli

    path = tmp_path / "early.toml"
    path.write_text(study_text(trials=2, max_epochs=1))
    assert cli.main(["confirm", str(path), "--storage", f"sqlite:///{tmp_path}/s.db"]) == 1
    assert capsys.readouterr().err == (
        f"fmsearch confirm: error: study 'early/labels=100%' is not in the storage: run "
        f"`fmsearch study {path}` first\n"
    )
