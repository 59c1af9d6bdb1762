"""What `fmsearch study` says a study will cost, before it runs."""

from fmsearch import cost, spec
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


def test_a_study_that_searches_nothing_prices_one_rerun_fewer_per_condition(tmp_path, tiny_splits):
    """Its one run per condition was picked from nothing, so `fmsearch confirm` counts it as a seed."""
    for space, reruns in ((SPACE, 3), ("", 2)):
        fixed = "optimizer = 'adam'" + ("" if space else "\narch = 'plain'")
        text = study_text(trials=1, max_epochs=1, fixed=fixed, space=space) + "\n[confirm]\nseeds = 3\n"
        plan = cost.plan(spec.parse(write_study(tmp_path, text)), tiny_splits)
        (condition,) = plan.conditions
        assert (plan.confirm_seeds, plan.reruns) == (3, reruns)
        assert plan.confirm_seconds == condition.confirm_seconds(reruns) > 0
