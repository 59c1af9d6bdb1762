"""A study's trials written as text and read back into another storage, where the study resumes."""

import json

import optuna
import pytest
from optuna.trial import TrialState

from fmsearch import storage, transfer
from tests.conftest import run_tiny_study

NAMES = ["tiny/labels=100%", "tiny/labels=50%"]


def trials_as_text(url: str, name: str) -> list[tuple]:
    """What a trial means, without the storage's own ids (and without the weights, which stay behind)."""
    return [
        (
            t.number,
            t.state,
            t.values,
            t.params,
            t.distributions,
            t.intermediate_values,
            {k: v for k, v in t.user_attrs.items() if k != storage.Attr.WEIGHTS},
            t.datetime_start,
            t.datetime_complete,
        )
        for t in optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)
    ]


@pytest.mark.xdist_group("tiny-study")
def test_an_exported_study_comes_back_the_same_and_resumes_from_there(tiny_study, tiny, tmp_path):
    path = transfer.write_export(tiny_study.storage, "tiny", tmp_path / "results")
    assert path == tmp_path / "results" / "tiny" / "storage.json"
    payload = transfer.read_export(path)
    assert [s["name"] for s in payload["studies"]] == NAMES

    folder = tmp_path / "elsewhere"
    folder.mkdir()
    url = f"sqlite:///{folder}/studies.db"
    said = transfer.import_studies(url, payload)
    assert said == [f"{name}: 3 trials (3 complete, 0 pruned, 0 fail)" for name in NAMES]
    for name in NAMES:
        assert trials_as_text(url, name) == trials_as_text(tiny_study.storage, name)
        source = optuna.load_study(study_name=name, storage=tiny_study.storage)
        copy = optuna.load_study(study_name=name, storage=url)
        assert copy.user_attrs == source.user_attrs and copy.metric_names == ["val_accuracy"]

    # A second import leaves a study that has trials alone: merging would renumber one history.
    assert (
        transfer.import_studies(url, payload)[0]
        == f"{NAMES[0]}: left as it is (the storage already holds 3 trials)"
    )

    # The same study file resumes on the imported storage: one more trial each, numbered on; the
    # imported best keeps its recorded test score although its weights did not travel.
    resumed = run_tiny_study(folder, tiny, name="tiny", trials=4)
    for name, summary in zip(NAMES, resumed.summaries, strict=True):
        trials = optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)
        assert [t.number for t in trials] == [0, 1, 2, 3] and trials[3].state == TrialState.COMPLETE
        assert trials_as_text(url, name)[:3] == trials_as_text(tiny_study.storage, name)
        assert summary.test is not None and summary.test.trial == summary.best_trial


def test_a_running_trial_is_exported_as_failed_an_enqueued_one_as_waiting_and_every_number_kept(tmp_path):
    url = f"sqlite:///{tmp_path}/studies.db"
    study = optuna.create_study(storage=url, study_name="s/labels=10%", direction="maximize")
    for value in (0.5, 0.7):
        trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 2)})
        trial.report(value / 2, 0)
        trial.set_user_attr(storage.Attr.WEIGHTS, {"trial": trial.number, "artifact": "gone"})
        study.tell(trial, value)
    running = study.ask({"x": optuna.distributions.FloatDistribution(0, 2)})
    study.tell(study.ask({"x": optuna.distributions.FloatDistribution(0, 2)}), state=TrialState.PRUNED)
    study.enqueue_trial({"x": 1.5})
    retry = {"params": {"x": 0.25}, "distributions": {"x": optuna.distributions.FloatDistribution(0, 2)}}
    study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING, **retry))  # as a stale retry is
    confirm = optuna.create_study(storage=url, study_name="s@confirm/labels=10%", direction="maximize")
    confirm.add_trial(
        optuna.trial.create_trial(value=0.6, user_attrs={storage.Attr.SOURCE_TRIAL: 1, "config": {"seed": 1}})
    )
    optuna.create_study(storage=url, study_name="other/labels=10%")  # another study file's: not exported

    payload = json.loads(json.dumps(transfer.export(url, "s")))
    assert [s["name"] for s in payload["studies"]] == ["s/labels=10%", "s@confirm/labels=10%"]
    target = f"sqlite:///{tmp_path}/target.db"
    said = transfer.import_studies(target, payload)
    assert said == [
        "s/labels=10%: 6 trials (2 complete, 1 pruned, 1 fail, 2 waiting)",
        "s@confirm/labels=10%: 1 trials (1 complete, 0 pruned, 0 fail)",
    ]
    trials = optuna.load_study(study_name="s/labels=10%", storage=target).trials
    assert [(t.number, t.state) for t in trials] == [
        (0, TrialState.COMPLETE),
        (1, TrialState.COMPLETE),
        (running.number, TrialState.FAIL),
        (3, TrialState.PRUNED),
        (4, TrialState.WAITING),
        (5, TrialState.WAITING),
    ]
    assert trials[5].params == {"x": 0.25}
    assert trials[running.number].user_attrs[storage.Attr.STOP_REASON] == storage.STALE
    assert not any(storage.is_finished(t) for t in trials if t.state == TrialState.FAIL)  # it does not count
    assert trials[1].intermediate_values == {0: 0.35} and storage.Attr.WEIGHTS not in trials[1].user_attrs
    # the enqueued trial is the next one the study runs, with its parameters
    imported = optuna.load_study(study_name="s/labels=10%", storage=target)
    assert imported.ask({"x": optuna.distributions.FloatDistribution(0, 2)}).params == {"x": 1.5}
    reruns = optuna.load_study(study_name="s@confirm/labels=10%", storage=target).trials
    assert reruns[0].user_attrs[storage.Attr.SOURCE_TRIAL] == 1


@pytest.mark.parametrize(
    ("content", "said"),
    [
        (None, "does not exist: `fmsearch report NAME` writes it"),
        ("{not json", "is not readable as JSON"),
        ('{"format": "something else"}', "is not an fmsearch trials file"),
    ],
)
def test_a_missing_or_broken_trials_file_is_one_line(tmp_path, content, said):
    path = tmp_path / "storage.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(transfer.TransferError, match=said) as raised:
        transfer.read_export(path)
    assert "\n" not in str(raised.value)
