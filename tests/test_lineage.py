"""lineage.py: a study file's change is named and refused, or archived; raising trials is no change."""

import re
import shutil
from pathlib import Path

import optuna
import pytest
from optuna.artifacts import get_all_artifact_meta

from fmsearch import lineage, spec, storage
from tests.conftest import SPACE, run_tiny_study, study_text, write_study


def test_changes_are_named_key_by_key_down_to_the_leaf():
    old = {"space": {"lr": {"low": 0.001, "log": True}, "arch": {"choices": ["plain"]}}, "max_epochs": 3}
    new = {"space": {"lr": {"low": 0.01, "log": True}, "tau": {"low": 0.8}}, "max_epochs": 3}
    assert lineage.fingerprint_changes(old, new) == [
        "space.arch removed",
        "space.lr.low: 0.001 -> 0.01",
        "space.tau added",
    ]
    assert lineage.fingerprint_changes(new, new) == []


def test_an_archived_name_keeps_the_condition_so_report_can_read_it():
    assert (
        lineage.archived_name("semi/labels=10%", "20261202T1200Z")
        == "semi@archived-20261202T1200Z/labels=10%"
    )


def trials_of(storage_url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=storage_url).get_trials(deepcopy=False)


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory, tiny):
    """A one-condition study with 2 finished trials of 1 epoch, to change and rerun on copies."""
    folder = tmp_path_factory.mktemp("fingerprint")
    run_tiny_study(folder, tiny, study_text(trials=2, max_epochs=1), name="fp")
    return folder / "studies.db"


def _copy_of(finished_study: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(finished_study, folder / "studies.db")
    return folder


SNAPSHOT = "fp/labels=100%"


def _snapshot(storage_url: str) -> list[tuple]:
    loaded = optuna.load_study(study_name=SNAPSHOT, storage=storage_url)
    trials = [(t.number, t.state, t.value, t.params) for t in loaded.get_trials(deepcopy=False)]
    return [trials, loaded.user_attrs["fingerprint"]]


@pytest.mark.parametrize(
    "change,changed",
    [
        ({"fixed": "optimizer = 'sgd'"}, "fixed.optimizer: 'adam' -> 'sgd'"),
        ({"space": SPACE.replace("high = 3e-3", "high = 5e-3")}, "space.lr.high: 0.003 -> 0.005"),
        ({"space": SPACE.replace(", log = true", "")}, "space.lr.log: True -> False"),
        ({"space": SPACE.replace("['plain', 'adaptive']", "['plain']")}, "space.arch.choices"),
        ({"space": SPACE + "\nweight_decay = { low = 0.0, high = 0.001 }"}, "space.weight_decay added"),
        ({"max_epochs": 2}, "max_epochs: 1 -> 2"),
        ({"pruner": "name = 'median'"}, "pruner.name: 'none' -> 'median'"),
    ],
    ids=["fixed", "range", "log", "choices", "new-dimension", "max-epochs", "pruner"],
)
def test_a_changed_study_file_is_refused_before_training_and_names_the_change(
    finished_study, tmp_path, tiny, change, changed
):
    folder = _copy_of(finished_study, tmp_path)
    url = f"sqlite:///{folder}/studies.db"
    before = _snapshot(url)
    text = study_text(**{"trials": 2, "max_epochs": 1, **change})
    with pytest.raises(lineage.StudyChanged) as refused:
        run_tiny_study(folder, tiny, text, name="fp")
    message = str(refused.value)
    assert "\n" not in message and changed in message
    assert message.startswith(f"study '{SNAPSHOT}' in {url} holds 2 trials run with other settings")
    assert "--archive-changed" in message and "new name" in message
    assert _snapshot(url) == before  # nothing trained, nothing overwritten
    assert not (folder / "results").exists()


@pytest.mark.parametrize(
    "edit,changed",
    [
        (lambda fp: fp["defaults"].update(weight_decay=1e-4), "defaults.weight_decay: 0.0001 -> 0.0"),
        (lambda fp: fp.update(training=0), "training: 0 -> 1"),
        (lambda fp: [fp.pop("training"), fp.pop("defaults")], "training: not recorded"),
    ],
    ids=["a-code-default-moved", "older-training-version", "before-versions"],
)
def test_trials_run_by_other_code_are_refused_even_with_the_same_study_file(
    finished_study, tmp_path, tiny, edit, changed
):
    """The stored fingerprint as code with another default, another training version, or from before
    versions would have written it: the unchanged study file must not add trials to it."""
    folder = _copy_of(finished_study, tmp_path)
    url = f"sqlite:///{folder}/studies.db"
    study = optuna.load_study(study_name=SNAPSHOT, storage=url)
    recorded = study.user_attrs["fingerprint"]
    edit(recorded)
    study.set_user_attr("fingerprint", recorded)
    with pytest.raises(lineage.StudyChanged, match=re.escape(changed)):
        run_tiny_study(folder, tiny, study_text(trials=3, max_epochs=1), name="fp")
    assert len(trials_of(url, SNAPSHOT)) == 2


def test_a_parameter_added_to_the_code_since_does_not_count_as_a_change(finished_study, tmp_path, tiny):
    """A new parameter comes in at a default that trains as before (TRAINING_VERSION says otherwise)."""
    folder = _copy_of(finished_study, tmp_path)
    url = f"sqlite:///{folder}/studies.db"
    study = optuna.load_study(study_name=SNAPSHOT, storage=url)
    recorded = study.user_attrs["fingerprint"]
    del recorded["defaults"]["weight_decay"]  # as a study recorded before weight_decay existed
    study.set_user_attr("fingerprint", recorded)
    run_tiny_study(folder, tiny, study_text(trials=3, max_epochs=1), name="fp")
    assert len(trials_of(url, SNAPSHOT)) == 3


def test_the_fingerprint_holds_the_defaults_a_condition_may_read_but_no_execution_setting(tmp_path):
    text = study_text(trials=2, max_epochs=1)
    semi_text = text.replace("labeled_fraction = [1.0]", "labeled_fraction = [0.5]\nunlabeled = ['vat']")
    for body, vat in ((text, False), (semi_text, True)):
        parsed = spec.parse(write_study(tmp_path, body, name="defaults"))
        recorded = lineage.defaults(parsed, parsed.condition_list()[-1])
        assert ("vat_eps" in recorded) == vat and "weight_decay" in recorded
        assert not set(recorded) & {"amp", "channels_last", "compile", "eval_batch_size", "threads"}


def test_the_epochs_flag_counts_as_a_change_of_max_epochs(finished_study, tmp_path, tiny):
    folder = _copy_of(finished_study, tmp_path)
    with pytest.raises(lineage.StudyChanged, match="max_epochs: 1 -> 3"):
        run_tiny_study(folder, tiny, study_text(trials=2, max_epochs=1), name="fp", epochs=3)


def test_raising_trials_resumes_the_same_study(finished_study, tmp_path, tiny):
    folder = _copy_of(finished_study, tmp_path)
    url = f"sqlite:///{folder}/studies.db"
    before = _snapshot(url)[0]
    run_tiny_study(folder, tiny, study_text(trials=3, max_epochs=1), name="fp")
    after = _snapshot(url)[0]
    assert after[:2] == before and len(after) == 3


def test_archive_changed_keeps_the_old_trials_and_starts_afresh(finished_study, tmp_path, tiny):
    folder = _copy_of(finished_study, tmp_path)
    url = f"sqlite:///{folder}/studies.db"
    old_trials = _snapshot(url)[0]
    text = study_text(trials=1, max_epochs=1, fixed="optimizer = 'sgd'")
    run_tiny_study(folder, tiny, text, name="fp", archive_changed=True)
    names = optuna.get_all_study_names(storage=url)
    archived = [n for n in names if n.startswith("fp@archived-")]
    assert len(archived) == 1 and archived[0].endswith("/labels=100%") and SNAPSHOT in names
    kept = optuna.load_study(study_name=archived[0], storage=url)
    assert [(t.number, t.state, t.value, t.params) for t in kept.trials] == old_trials
    assert storage.study_setting(kept, "fixed") == {"optimizer": "adam"}
    assert kept.user_attrs["archived_from"] == SNAPSHOT
    fresh = optuna.load_study(study_name=SNAPSHOT, storage=url)
    assert len(fresh.trials) == 1 and storage.study_setting(fresh, "fixed") == {"optimizer": "sgd"}
    # the archived study keeps its weights in the storage: its best trial can still be scored
    rdb = storage.open_storage(url)
    metas = get_all_artifact_meta(kept.best_trial, storage=rdb)
    assert [m.filename for m in metas] == ["weights.pt"]
    assert storage.DatabaseArtifactStore(rdb).open_reader(metas[0].artifact_id).read()


def test_a_fixed_setting_no_trial_of_the_condition_reads_is_no_change(finished_study, tmp_path, tiny):
    """distill's teacher settings added to [fixed] leave a full-label condition's trials as they were,
    and change a distill condition's."""
    folder = _copy_of(finished_study, tmp_path)
    url = f"sqlite:///{folder}/studies.db"
    fixed = "optimizer = 'adam'\nteacher_recipe = 'student'\nteachers = 3"
    resumed = run_tiny_study(folder, tiny, study_text(trials=3, max_epochs=1, fixed=fixed), name="fp")
    assert len(trials_of(url, SNAPSHOT)) == 3
    recorded = optuna.load_study(study_name=SNAPSHOT, storage=url).user_attrs["fingerprint"]

    def fixing(fingerprint, **settings):
        return {**fingerprint, "fixed": {**fingerprint["fixed"], **settings}}

    assert lineage.meaningful_changes(recorded, fixing(recorded, teacher_recipe="control")) == []
    assert lineage.meaningful_changes(recorded, fixing(recorded, optimizer="sgd")) == [
        "fixed.optimizer: 'adam' -> 'sgd'"
    ]
    distill = fixing(recorded, teacher_recipe="student")
    distill["condition"] = {"labeled_fraction": 0.5, "unlabeled": "distill"}
    assert "fixed.teacher_recipe: 'student' -> 'control'" in lineage.meaningful_changes(
        distill, fixing(distill, teacher_recipe="control")
    )
    searched = fixing(recorded, teachers=3)
    searched["space"] = {**recorded["space"], "unlabeled": {"choices": ["skip", "distill"]}}
    assert lineage.meaningful_changes(searched, fixing(searched, teachers=5)) == ["fixed.teachers: 3 -> 5"]
    assert resumed.summaries[0].finished == 3
