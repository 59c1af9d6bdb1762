import optuna
import pytest
from optuna.trial import TrialState

from fmsearch import semi, spec, storage, study
from tests.conftest import run_tiny_study, study_text, write_study

RECORDED = {
    "history",
    "stop_reason",
    "best_epoch",
    "seconds",
    "images_per_second",
    "device",
    "labeled_images",
    "git_revision",
    "torch_version",
    "optuna_version",
    "config",
}


def trials_of(storage: str, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


@pytest.mark.xdist_group("tiny-study")
def test_tiny_study_finishes_every_condition_and_records_everything(tiny_study):
    for summary, name in zip(tiny_study.summaries, ["tiny/labels=100%", "tiny/labels=50%"], strict=True):
        assert summary.study_name == name
        trials = trials_of(tiny_study.storage, name)
        assert sum(storage.is_finished(t) for t in trials) == 3 == len(trials)
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


@pytest.mark.xdist_group("tiny-study")
def test_the_best_trial_of_each_condition_is_scored_once_on_the_test_set(tiny_study):
    for summary in tiny_study.summaries:
        loaded = optuna.load_study(study_name=summary.study_name, storage=tiny_study.storage)
        test = loaded.user_attrs["test"]
        assert test["trial"] == loaded.best_trial.number
        assert 0.0 <= test["test_accuracy"] <= 1.0 and test["test_loss"] >= 0
        assert sum(map(sum, test["confusion"])) == 300  # every test image once
        best_copy = storage.best_weights_path(tiny_study.options.results_dir, summary.study_name)
        assert best_copy.exists()


def test_labeled_count_is_recorded_per_condition(tiny_study, tiny):
    """Each trial records how many labeled images it trained on: the pool, and half of it."""
    pool = len(study.load_splits(tiny_study.spec, tiny_study.options).train_labels)
    full, half = (trials_of(tiny_study.storage, s.study_name) for s in tiny_study.summaries)
    assert {t.user_attrs["labeled_images"] for t in full} == {pool}
    assert {t.user_attrs["labeled_images"] for t in half} == {semi.labeled_count_for(pool, 0.5, None)}


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
    assert sum(storage.is_finished(t) for t in trials) == 4
    assert any(t.state == TrialState.COMPLETE for t in trials)


def test_a_bad_storage_url_is_one_line_with_the_fix():
    with pytest.raises(
        storage.StorageError,
        match="cannot open storage .mysql://nowhere/x.: its database driver is not installed",
    ):
        storage.open_storage("mysql://nowhere/x")


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
    costs = [t.user_attrs["teacher_team"] for t in trials]
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


CRASHING = "labeled_count = 995"


def test_a_trial_that_raises_is_recorded_with_its_log_and_the_study_goes_on(tmp_path, tiny):
    space = "labeled_count = [995, 500]\nlr = { low = 1e-3, high = 3e-3, log = true }"
    text = study_text(trials=3, max_epochs=1, space=space).replace("name = 'tpe'", "name = 'random'")
    run = run_tiny_study(tmp_path, tiny, text, name="crash")
    trials = trials_of(run.storage, run.summaries[0].study_name)
    crashed = [t for t in trials if t.user_attrs.get("stop_reason") == "crashed"]
    assert crashed, [t.params for t in trials]  # the seed does draw the bad value
    for trial in crashed:
        assert trial.state == TrialState.FAIL and trial.params["labeled_count"] == 995
        log = storage.trial_log_path(run.options.results_dir, "crash/labels=100%", trial.number)
        assert trial.user_attrs["error"] == (
            "ConfigError: a stratified pick of 995 of 1000 needs at least 10 labeled and 10 unlabeled "
            f"samples: change the labeled count or fraction (traceback in {log})"
        )
        assert "Traceback" in log.read_text() and "select_labeled" in log.read_text()
    assert sum(storage.is_finished(t) for t in trials) == 3  # crashes don't count; the study went on


def test_a_worker_stops_after_three_crashes_in_a_row_and_a_rerun_adds_at_most_three(tmp_path, tiny):
    text = study_text(trials=3, max_epochs=1, fixed=f"optimizer = 'adam'\n{CRASHING}")
    for run in (1, 2):
        with pytest.raises(study.StudyError) as stopped:
            run_tiny_study(tmp_path, tiny, text, name="broken")
        message = str(stopped.value)
        assert "\n" not in message
        assert message.startswith("3 trials in a row raised an error, last broken/labels=100% #")
        assert "ConfigError: a stratified pick of 995" in message and "fix the cause, then rerun" in message
        trials = trials_of(f"sqlite:///{tmp_path}/studies.db", "broken/labels=100%")
        assert len(trials) == 3 * run and all(t.state == TrialState.FAIL for t in trials)


def test_a_sampler_seed_near_the_32_bit_limit_still_seeds_every_worker(tmp_path):
    text = study_text().replace("seed = 0", f"seed = {2**32 - 1}")
    big = spec.parse(write_study(tmp_path, text, name="big"))
    for offset in (0, 1000 * 3 + 17):
        sampler = study.make_sampler(big, seed_offset=offset)
        optuna.create_study(sampler=sampler).optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)


def test_each_worker_that_joins_a_study_gets_its_own_sampler_seed_and_the_studys_heartbeat(tmp_path):
    """Workers on machines started together have the same local index and see the same trials. The
    first to join sets the heartbeat and grace for all: a later --heartbeat never shortens the grace
    of another's trials, nor lengthens its own beat past it."""
    url = f"sqlite:///{tmp_path}/s.db"
    optuna.create_study(study_name="seeds", storage=url, direction="maximize")
    workers = [storage.open_storage(url, heartbeat, 4 * heartbeat) for heartbeat in (5, 1, 11)]
    assert [storage.join(rdb, "seeds") for rdb in workers] == [0, 1000, 2000]
    assert [(rdb.get_heartbeat_interval(), rdb.grace_period) for rdb in workers] == [(5, 20)] * 3
    assert storage.join(storage.open_storage(url), "seeds") == 3000  # no heartbeat: nothing to take


TWO_CONDITIONS = study_text(trials=2, max_epochs=1).replace(
    "labeled_fraction = [1.0]", "labeled_fraction = [1.0, 0.5]"
)


def test_conditions_take_turns_so_a_time_budget_leaves_each_the_same_share(tmp_path, tiny, monkeypatch):
    names = ["turns/labels=100%", "turns/labels=50%"]
    over = run_tiny_study(tmp_path, tiny, TWO_CONDITIONS, name="turns", deadline=1.0)  # long past
    assert [s.finished for s in over.summaries] == [0, 0]

    url = over.storage
    done = lambda: sum(storage.is_finished(t) for name in names for t in trials_of(url, name))  # noqa: E731
    monkeypatch.setattr(study.RunOptions, "out_of_time", lambda self: done() >= 3)  # up after 3 trials
    cut = run_tiny_study(tmp_path, tiny, TWO_CONDITIONS, name="turns", deadline=2e9)
    assert sorted(s.finished for s in cut.summaries) == [1, 2]  # turn about: 100%, 50%, 100%
    monkeypatch.undo()

    resumed = run_tiny_study(tmp_path, tiny, TWO_CONDITIONS, name="turns")
    assert [s.finished for s in resumed.summaries] == [2, 2]
    for name in names:
        assert [t.number for t in trials_of(url, name)] == [0, 1]  # nothing repeated, nothing lost
    started = sorted((t.datetime_start, name) for name in names for t in trials_of(url, name))
    assert [name for _, name in started] == names * 2
