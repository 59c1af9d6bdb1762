"""What `fmsearch study` says a study will cost, before it runs."""

import pytest

from fmsearch import cli, cost, spec, words
from tests.conftest import SPACE, study_text, write_study


def test_teachers_that_train_as_the_student_are_priced_once_per_trial(tmp_path, tiny_splits):
    """Control teachers are cached per architecture; a student-recipe team differs with each trial's lr."""
    teams = {}
    for recipe in ("control", "student"):
        fixed = f"optimizer = 'adam'\nteachers = 1\nteacher_epochs = 1\nteacher_recipe = '{recipe}'"
        text = study_text(trials=4, max_epochs=1, fixed=fixed, space=SPACE).replace(
            "labeled_fraction = [1.0]", "labeled_fraction = [0.5]\nunlabeled = ['distill']"
        )
        plan = cost.plan(spec.parse(write_study(tmp_path, text, name=recipe)), tiny_splits)
        (condition,) = plan.conditions
        assert condition.team_seconds > 0
        teams[recipe] = condition.teams
    assert teams == {"control": 2, "student": 4}  # two architectures; four trials


def test_a_condition_that_searches_nothing_prices_one_rerun_fewer(tmp_path, tiny_splits):
    """Its one run was picked from nothing, so `fmsearch confirm` counts it as a seed: in a study that
    searches nothing, and in a condition where no dimension of the space applies (tau under full labels)."""
    semi = "labeled_fraction = [1.0, 0.5]\nunlabeled = ['pseudo']"
    cases = (
        (SPACE, "", [3], ""),
        ("", "", [2], "each"),
        ("tau = { low = 0.8, high = 0.99 }", semi, [2, 3], "where nothing is searched"),
    )
    for space, conditions, reruns, own_runs in cases:
        fixed = "optimizer = 'adam'" + ("" if space == SPACE else "\narch = 'plain'")
        text = study_text(trials=1, max_epochs=1, fixed=fixed, space=space) + "\n[confirm]\nseeds = 3\n"
        study_spec = spec.parse(
            write_study(
                tmp_path, text.replace("labeled_fraction = [1.0]", conditions or "labeled_fraction = [1.0]")
            )
        )
        assert [study_spec.searches_nothing(c) for c in study_spec.condition_list()] == [
            r == 2 for r in reruns
        ]
        assert cli._own_runs(study_spec) == own_runs  # how `fmsearch study` and `confirm` say so
        plan = cost.plan(study_spec, tiny_splits)
        assert [c.reruns(plan.confirm_seeds) for c in plan.conditions] == reruns
        for condition, count in zip(plan.conditions, reruns, strict=True):
            one = condition.max_epochs * max(condition.epoch_seconds.values())
            assert one > 0 and condition.confirm_seconds(plan.confirm_seeds) == pytest.approx(count * one)
        assert plan.confirm_seconds == sum(c.confirm_seconds(3) for c in plan.conditions)


def test_durations_and_counts_read_as_words():
    assert [words.duration(s) for s in (45, 119, 1980, 9000)] == ["45 s", "119 s", "33 min", "2.5 h"]
    assert [words.count(n, "seed") for n in (0, 1, 3)] == ["0 seeds", "1 seed", "3 seeds"]
