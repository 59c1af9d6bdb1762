import math
import re
import shlex
import shutil
import subprocess
import sys
import threading
from dataclasses import replace

import optuna
import pandas as pd
import pytest
from optuna.artifacts import get_all_artifact_meta
from optuna.distributions import FloatDistribution, IntDistribution
from optuna_dashboard import get_note
from PIL import Image

from fmsearch import cli, confirm, report, spec, study
from fmsearch.config import SETTINGS, TrainConfig
from fmsearch.storage import Attr, BestTrialScore, DatabaseArtifactStore, confirm_name, open_storage
from tests.conftest import TINY_STUDY, run_tiny_study, study_text, write_study

pytestmark = pytest.mark.xdist_group("tiny-study")  # one pytest worker runs the session's tiny study
FIGURES = {"curves.png", "fraction.png", "search.png", "classes.png", "confusion.png"}
CONDITIONS = ("tiny/labels=100%", "tiny/labels=50%")


@pytest.fixture(scope="module")
def tiny_report(tiny_study, tmp_path_factory):
    """The report of the tiny study, drawn from a copy of its storage."""
    folder = tmp_path_factory.mktemp("report")
    shutil.copy(tiny_study.storage.removeprefix("sqlite:///"), folder / "studies.db")
    storage = f"sqlite:///{folder}/studies.db"
    rdb = open_storage(storage)
    summary, images = report.write_report(rdb, "tiny", folder / "results", DatabaseArtifactStore(rdb))
    return storage, summary, images


def test_report_draws_every_figure_the_data_supports(tiny_report):
    _, summary, images = tiny_report
    assert {p.name for p in images} >= FIGURES
    for image in images:
        with Image.open(image) as png:
            assert png.width >= 1000 and png.height >= 400
            assert round(png.info["dpi"][0]) >= 150


def test_summary_gives_the_answer_first_then_a_table_per_condition(tiny_report):
    _, summary, images = tiny_report
    text = summary.read_text()
    lines = text.splitlines()
    assert lines[0] == "# Study `tiny`"
    answer = next(line for line in lines if line.startswith("- "))  # before any table
    assert re.match(r"- \*\*labels=50%\*\* \(500 labeled images\): full labels \d\.\d{4} \(trial #", answer)
    assert lines.index(answer) < 10 and "a single run" in answer  # not confirmed: the best trial's own
    for name in CONDITIONS:
        section = text.split(f"## {name}\n", 1)[1].split("##")[0]
        for row in (
            "validation accuracy",
            "test accuracy",
            "trials complete / pruned / failed",
            "epochs spent / every trial to max epochs",
            "training wall time",
        ):
            assert f"| {row} |" in section
    for image in images:
        assert f"({image.name})" in text


def test_report_saves_the_note_and_uploads_the_figures_to_the_dashboard(tiny_report):
    storage, _, images = tiny_report
    for name in ("tiny/labels=100%", "tiny/labels=50%"):
        loaded = optuna.load_study(study_name=name, storage=storage)
        assert get_note(loaded).startswith("# Study `tiny`")
        assert {meta.filename for meta in get_all_artifact_meta(loaded)} == {p.name for p in images}


def test_a_study_with_no_finished_trial_gets_a_message_not_an_empty_figure(tmp_path, tiny):
    empty = spec.parse(write_study(tmp_path, name="empty"))
    options = study.RunOptions(storage=f"sqlite:///{tmp_path}/s.db", data_config=tiny.config())
    study.prepare(empty, options)
    with pytest.raises(
        report.ReportError, match="'empty' has no finished trial yet: run `make study STUDY=empty`"
    ):
        report.write_report(options.storage, "empty", tmp_path / "results")
    assert not (tmp_path / "results" / "empty").exists()


def test_an_unknown_study_is_named_with_the_command_to_run(tmp_path):
    storage = f"sqlite:///{tmp_path}/s.db"
    optuna.create_study(storage=storage, study_name="other")
    with pytest.raises(report.ReportError, match="no study named 'nothing'.*make study STUDY=nothing"):
        report.write_report(storage, "nothing", tmp_path)


def test_a_single_condition_study_draws_no_fraction_plot(tmp_path, tiny):
    run = run_tiny_study(tmp_path, tiny, TINY_STUDY.replace("[1.0, 0.5]", "[0.5]"), name="single")
    earlier = tmp_path / "results" / "single" / "fraction.png"  # an earlier report's, of other trials
    earlier.parent.mkdir(parents=True, exist_ok=True)  # the study wrote its best weights there
    earlier.write_bytes(b"an old figure")
    (earlier.parent / "mine.png").write_bytes(b"the user's own")
    _, images = report.write_report(run.storage, "single", tmp_path / "results")
    names = {p.name for p in images}
    assert "fraction.png" not in names and {"curves.png", "search.png", "confusion.png"} <= names
    assert not earlier.exists() and (earlier.parent / "mine.png").exists()  # only fmsearch's own go


def test_a_study_that_searches_nothing_draws_no_search_plot(tmp_path, tiny):
    """fraction.toml fixes every hyperparameter: one run per condition, a search panel would be empty."""
    text = study_text(trials=1, max_epochs=1, fixed="optimizer = 'adam'\narch = 'plain'", space="")
    run = run_tiny_study(tmp_path, tiny, text, name="fixed")
    _, images = report.write_report(run.storage, "fixed", tmp_path / "results")
    assert "search.png" not in {p.name for p in images} and "curves.png" in {p.name for p in images}


def test_cli_report_errors_are_one_line(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fmsearch.cli",
            "report",
            "nothing",
            "--storage",
            f"sqlite:///{tmp_path}/s.db",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "fmsearch report: error: no study named 'nothing' in the storage: "
        "run `make study STUDY=nothing` first"
    ]


def test_a_categorical_learning_rate_is_drawn_too(tmp_path, tiny):
    text = study_text(space="arch = ['plain']\nlr = [1e-3, 3e-3]\ndropout = { low = 0.0, high = 0.5 }")
    run = run_tiny_study(tmp_path, tiny, text, name="listed")
    _, images = report.write_report(run.storage, "listed", tmp_path / "results")
    assert "search.png" in {p.name for p in images}


def test_reporting_twice_uploads_each_figure_once(tiny_report, tmp_path):
    storage, _, images = tiny_report
    rdb = open_storage(storage)
    report.write_report(rdb, "tiny", tmp_path / "results", DatabaseArtifactStore(rdb))  # the second report
    for name in ("tiny/labels=100%", "tiny/labels=50%"):
        loaded = optuna.load_study(study_name=name, storage=storage)
        metas = get_all_artifact_meta(loaded)
        assert len(metas) == len(images)  # counted, not compared as sets of names
        store = DatabaseArtifactStore(rdb)
        for meta in metas:
            assert (
                store.open_reader(meta.artifact_id).read()
                == (tmp_path / "results" / "tiny" / meta.filename).read_bytes()
            )


def test_a_study_whose_trials_all_diverged_is_told_so_not_to_run_make_study(tmp_path, tiny):
    text = study_text(trials=2, max_epochs=1, fixed="optimizer = 'sgd'\narch = 'plain'", space="lr = [1e4]")
    run = run_tiny_study(tmp_path, tiny, text, name="diverged")
    with pytest.raises(report.ReportError) as refused:
        report.write_report(run.storage, "diverged", tmp_path / "results")
    message = str(refused.value)
    assert "all 2 finished trials diverged" in message and "lower the top of the lr range" in message
    assert "make study" not in message


def test_a_stored_test_score_of_another_trial_is_never_shown_as_the_best_ones(tmp_path):
    """Trial #0 was scored; a resumed run then found #1 and stopped before scoring it."""
    url = f"sqlite:///{tmp_path}/s.db"
    made = optuna.create_study(study_name="stale", storage=url, direction="maximize")
    lr = FloatDistribution(1e-4, 1e-2, log=True)
    for value in (0.8, 0.9, 0.9):  # a tie: the first to run is the best
        made.add_trial(optuna.trial.create_trial(value=value, params={"lr": 1e-3}, distributions={"lr": lr}))
    score = BestTrialScore(0, 0.8, 0.5, 0.7777, [[1]], ["T-shirt/top"])
    score.save(made)
    (condition,) = report.load_conditions(url, "stale")
    assert condition.best.number == 1 and condition.test is None and condition.stale_test == score
    text = report.summary_markdown("stale", [condition], [], "")
    assert "0.7777" not in text and "not scored for trial #1: the stored score is trial #0's" in text

    BestTrialScore(1, 0.9, 0.4, 0.8888, [[1]], ["T-shirt/top"]).save(made)
    (condition,) = report.load_conditions(url, "stale")
    assert "test accuracy 0.8888 (trial #1, a single run)" in report.summary_markdown(
        "stale", [condition], [], ""
    )


def test_two_reports_at_once_upload_each_figure_once(tmp_path, monkeypatch):
    """Report A has checked which figures the study holds; report B checks while A waits before
    uploading. Without a lock around check-then-upload both find none and both upload."""
    url = f"sqlite:///{tmp_path}/s.db"
    made = optuna.create_study(study_name="race", storage=url, direction="maximize")
    made.add_trial(optuna.trial.create_trial(value=0.5))
    images = []
    for name in ("curves.png", "search.png"):
        Image.new("RGB", (8, 8), (len(name), 0, 0)).save(tmp_path / name)
        images.append(tmp_path / name)
    real = optuna.artifacts.get_all_artifact_meta
    a_checked, b_checked = threading.Event(), threading.Event()

    def checking(study_or_trial, **kwargs):
        metas = real(study_or_trial, **kwargs)
        if threading.current_thread().name == "A":
            a_checked.set()
            b_checked.wait(timeout=3)  # B's check, if nothing holds B back
        else:
            b_checked.set()
        return metas

    monkeypatch.setattr(optuna.artifacts, "get_all_artifact_meta", checking)

    def publish():
        rdb = open_storage(url)
        report.publish(report.load_conditions(rdb, "race"), images, "# race", DatabaseArtifactStore(rdb))

    a = threading.Thread(target=publish, name="A")
    b = threading.Thread(target=publish, name="B")
    a.start()
    assert a_checked.wait(timeout=30)
    b.start()
    a.join(timeout=60)
    b.join(timeout=60)
    names = sorted(meta.filename for meta in real(optuna.load_study(study_name="race", storage=url)))
    assert names == ["curves.png", "search.png"]


def test_trials_csv_holds_every_trial_with_its_condition(tiny_report):
    storage, summary, _ = tiny_report
    frame = pd.read_csv(summary.with_name("trials.csv"))
    total = sum(len(optuna.load_study(study_name=n, storage=storage).trials) for n in CONDITIONS)
    assert len(frame) == total and set(frame.run) == {"search"}
    assert set(frame.condition) == {"labels=100%", "labels=50%"}
    for column in ("best_epoch", "stop_reason", "labeled_images", "seconds", "test_accuracy", "params_lr"):
        assert column in frame
    assert not any("history" in column or "config" in column for column in frame)
    best = frame[frame.best]
    assert len(best) == 2 and best.test_accuracy.notna().all()  # each condition's best trial was scored
    assert frame[~frame.best].test_accuracy.isna().all()


def test_the_printed_command_trains_each_best_configuration_again(tiny_report):
    storage, summary, _ = tiny_report
    text = summary.read_text()
    for name in CONDITIONS:
        section = text.split(f"## {name}\n", 1)[1].split("\n## ")[0]
        (command,) = [line for line in section.splitlines() if line.startswith("fmsearch train ")]
        args = cli.build_parser().parse_args(shlex.split(command)[1:])
        best = optuna.load_study(study_name=name, storage=storage).best_trial
        stored = TrainConfig(**best.user_attrs[Attr.CONFIG])
        assert cli.train_config(args) == replace(stored, **dict.fromkeys(SETTINGS))
        assert args.val_size == 200 and args.pool_limit is None  # the tiny study's data


TAU_STUDY = """
description = "tau searched at 500 labels"
trials = 2
max_epochs = 1
batch_size = 32
patience = 1

[sampler]
name = "random"
seed = 0

[pruner]
name = "none"

[fixed]
optimizer = "adam"
unlabeled = "pseudo"

[conditions]
labeled_count = [500]

[space]
lr = { low = 1e-3, high = 3e-3, log = true }
tau = { low = 0.8, high = 0.95 }
"""


def test_every_searched_dimension_gets_a_panel_and_a_count_condition_its_count(tmp_path, tiny):
    run = run_tiny_study(tmp_path, tiny, TAU_STUDY, name="counted")
    (condition,) = report.load_conditions(run.storage, "counted")
    assert condition.label == "labels=500" and condition.budget == "labels=500"
    assert not condition.is_full and condition.arm == "pseudo" and condition.labeled_images == 500
    dimensions = {d.name: d for d in report.searched_dimensions([condition])}
    assert set(dimensions) == {"lr", "tau"} and dimensions["lr"].log and not dimensions["tau"].log
    figure = report.draw_search([condition])
    titles = [ax.get_title().splitlines()[0] for ax in figure.axes if ax.get_visible() and ax.get_title()]
    report.plt.close(figure)
    assert titles == ["optimization history (line: best so far)", "lr", "tau"]
    summary, _ = report.write_report(run.storage, "counted", tmp_path / "results")
    counted = "- **labels=500** (500 labeled images): no full-labels condition; no labels-only condition; "
    assert counted + "with pseudo " in summary.read_text()


@pytest.fixture(scope="module")
def confirmed_report(tiny_study, tiny_splits, tmp_path_factory):
    """The tiny study confirmed on 2 new seeds (fmsearch confirm, in-process), then reported."""
    folder = tmp_path_factory.mktemp("confirmed")
    shutil.copy(tiny_study.storage.removeprefix("sqlite:///"), folder / "studies.db")
    rdb = open_storage(f"sqlite:///{folder}/studies.db")
    confirming = spec.parse(write_study(folder, TINY_STUDY + "\n[confirm]\nseeds = 2\n"))
    options = study.RunOptions(storage=f"sqlite:///{folder}/studies.db", results_dir=folder / "results")
    confirm.confirm(confirming, rdb, tiny_splits, options)
    return rdb, *report.write_report(rdb, "tiny", folder / "results")


def test_a_confirmed_study_opens_with_means_and_spreads_and_draws_the_budgets(confirmed_report):
    rdb, summary, images = confirmed_report
    assert {"fraction.png", "classes.png"} <= {p.name for p in images}
    lines = summary.read_text().splitlines()
    answer = next(i for i, line in enumerate(lines) if line.startswith("- "))
    spread = r"\d\.\d{4} ± \d\.\d{4} \(n=2\)"
    assert re.match(rf"- \*\*labels=50%\*\* \(500 labeled images\): full labels {spread}; ", lines[answer])
    assert re.search(rf"(labels alone|with pseudo) {spread}", lines[answer])
    assert "a single run" not in lines[answer]
    assert "SE of the difference" in lines[answer + 1] and "spreads" in lines[answer + 1]
    frame = pd.read_csv(summary.with_name("trials.csv"))
    reruns = frame[frame.run == "confirmation"]
    assert len(reruns) == 4 and set(reruns.seed) == {1, 2} and reruns.test_accuracy.notna().all()
    assert set(reruns.study) == {confirm_name(n) for n in CONDITIONS}


def test_a_difference_gives_both_spreads_and_the_standard_error_of_the_difference():
    def score(*accuracies):
        return report.Score(accuracies, (), (), 0, True)

    apart = report.difference(
        "distill against labels alone", score(0.85, 0.86, 0.87), score(0.80, 0.81, 0.82)
    )
    se = math.sqrt(0.01**2 / 3 + 0.01**2 / 3)
    assert "+0.0500 (0.8600 ± 0.0100 (n=3) against 0.8100 ± 0.0100 (n=3)" in apart
    assert f"SE of the difference {se:.4f}" in apart and apart.endswith("do not overlap")
    close = report.difference("x", score(0.81, 0.83), score(0.80, 0.82))
    assert close.endswith("the ± spreads overlap")
    single = report.difference("x", score(0.81), score(0.80, 0.82))
    assert "a single run" in single and "SE" not in single


def _stored(url: str, name: str, condition: dict, values: list[float], tests: list[float], **params) -> None:
    """A condition's study written straight into storage as `fmsearch study` and `confirm` leave it."""
    made = optuna.create_study(study_name=name, storage=url, direction="maximize")
    made.set_user_attr(Attr.FINGERPRINT, {"condition": condition, "fixed": {}, "space": {}, "max_epochs": 2})
    distributions = {"warmup_epochs": IntDistribution(0, 5), "dropout": FloatDistribution(0.0, 0.5)}
    config = {**condition, "monitor": "val_accuracy"}
    for value in values:
        made.add_trial(
            optuna.trial.create_trial(
                value=value,
                params=params,
                distributions={k: distributions[k] for k in params},
                user_attrs={Attr.CONFIG: config, Attr.LABELED_IMAGES: condition.get("labeled_count", 1000)},
            )
        )
    best = made.best_trial.number
    rerun = optuna.create_study(study_name=confirm_name(name), storage=url, direction="maximize")
    for seed, accuracy in enumerate(tests, start=1):
        test = {"test_loss": 0.5, "test_accuracy": accuracy, "test_recall": [accuracy] * 10}
        attrs = {Attr.CONFIG: {**config, "seed": seed}, Attr.SOURCE_TRIAL: best, Attr.TEST: test}
        rerun.add_trial(optuna.trial.create_trial(value=0.5, user_attrs=attrs))


def test_the_answer_gives_the_share_of_the_lost_accuracy_won_back(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    _stored(url, "few/labels=100%", {"labeled_fraction": 1.0}, [0.9], [0.90, 0.92])
    low = {"labeled_count": 100}
    _stored(url, "few/labels=100,unlabeled=skip", {**low, "unlabeled": "skip"}, [0.7], [0.70, 0.72])
    _stored(url, "few/labels=100,unlabeled=vat", {**low, "unlabeled": "vat"}, [0.8], [0.76, 0.78])
    conditions = report.load_conditions(url, "few")
    assert [c.label for c in conditions] == [
        "labels=100%", "labels=100,unlabeled=skip", "labels=100,unlabeled=vat"
    ]  # fmt: skip
    line = report.answer_lines(conditions)[0]
    assert line == (
        "- **labels=100** (100 labeled images): full labels 0.9100 ± 0.0141 (n=2); labels alone 0.7100 ± "
        "0.0141 (n=2); with vat 0.7700 ± 0.0141 (n=2); the unlabeled images won back 30% of the accuracy "
        "lost without labels."
    )


def test_a_best_value_at_the_edge_of_an_int_or_float_range_is_warned_about(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    _stored(url, "edge", {}, [0.8], [], warmup_epochs=5, dropout=0.0)
    (condition,) = report.load_conditions(url, "edge")
    text = report.summary_markdown("edge", [condition], [], "")
    assert "Note: best warmup_epochs = 5 is at the high edge of its range [0, 5]; widen it" in text
    assert (
        "Note: best dropout = 0 is at the low edge of its range [0, 0.5], which is as far as dropout goes"
        in text
    )
    figure = report.draw_search([condition])
    titles = {ax.get_title() for ax in figure.axes}
    report.plt.close(figure)
    assert "warmup_epochs\nbest at the edge of its range in edge" in titles


def test_a_single_label_budget_gets_an_axis_of_its_own_width():
    """One hidden-label budget (and full labels as the band) is not spread over decades."""
    fig, (one, several) = report.plt.subplots(1, 2)
    several.plot([500, 5000], [0.8, 0.9])
    report._budget_axis(one, {5000}, by_images=True)
    report._budget_axis(several, {500, 5000}, by_images=True)
    assert one.get_xlim() == (2500, 10000) and list(one.get_xticks()) == [5000]
    assert one.xaxis.get_major_formatter()(5000, 0) == "5,000"
    low, high = several.get_xlim()
    assert low <= 500 and high >= 5000 and one.get_xscale() == several.get_xscale() == "log"
    report.plt.close(fig)


def test_full_labels_legend_shows_a_band_where_confirmed_and_a_dashed_line_for_a_single_run():
    fig, ax = report.plt.subplots()
    confirmed = report.Score((0.92, 0.93, 0.94), (), (), 0, True)
    single = report.Score((0.93,), (), (), 0, False)
    band = report._full_band(ax, confirmed, "0.25", "confirmed")
    line = report._full_band(ax, single, "0.25", "single")
    assert isinstance(band, report.matplotlib.patches.Patch) and len(ax.patches) == 1  # the ± sd band
    assert line.get_linestyle() == "--" and line.get_label() == "single"
    report.plt.close(fig)


def test_a_dead_trial_is_marked_on_the_lower_edge_and_leaves_the_scale_to_the_rest(tmp_path):
    """A trial at chance (too high a learning rate) would squeeze the others into the top tenth."""
    url = f"sqlite:///{tmp_path}/s.db"
    _stored(url, "dead", {}, [0.90, 0.10, 0.85], [], dropout=0.2)
    (condition,) = report.load_conditions(url, "dead")
    figure = report.draw_search([condition])
    history, dropout = figure.axes[:2]
    for ax in (history, dropout):
        low, high = ax.get_ylim()
        assert 0.80 < low < 0.85 and high > 0.90  # the scale of the live trials
        marked = [c.get_offsets().tolist() for c in ax.collections if not c.get_clip_on()]
        assert marked == [[[1 if ax is history else 0.2, low]]]  # trial #1, at dropout 0.2
    labels = [t.get_text() for t in figure.legends[0].get_texts()]
    report.plt.close(figure)
    assert "under the scale: at most twice chance" in labels
    # every trial dead: they are the scale, drawn as points
    _stored(url, "alldead", {}, [0.10, 0.11], [], dropout=0.2)
    figure = report.draw_search(report.load_conditions(url, "alldead"))
    history = figure.axes[0]
    report.plt.close(figure)
    assert sorted(y for c in history.collections for _, y in c.get_offsets().tolist()) == [0.10, 0.11]
    assert history.get_ylim()[0] < 0.10


def test_importances_are_fanova_as_the_figure_says_not_optunas_default(tmp_path):
    """Optuna 5's default evaluator is PED-ANOVA; importance.png's axis says fANOVA's share of variance."""
    url = f"sqlite:///{tmp_path}/s.db"
    made = optuna.create_study(study_name="imp", storage=url, direction="maximize")
    made.set_user_attr(Attr.FINGERPRINT, {"condition": {}, "fixed": {}, "space": {}, "max_epochs": 2})
    space = {"x": FloatDistribution(0.0, 1.0), "y": FloatDistribution(0.0, 1.0)}
    for k in range(12):
        x, y = (k * 7 % 12) / 12, (k * 5 % 12) / 12
        trial = optuna.trial.create_trial(value=x + 0.1 * y, params={"x": x, "y": y}, distributions=space)
        made.add_trial(trial)
    (condition,) = report.load_conditions(url, "imp")
    fanova = optuna.importance.FanovaImportanceEvaluator(seed=0)
    assert report.importances(condition) == optuna.importance.get_param_importances(made, evaluator=fanova)
    assert report.importances(condition) != optuna.importance.get_param_importances(made)
    assert report.importances(condition)["x"] > 2 * report.importances(condition)["y"]


def test_conditions_follow_their_budget_before_any_trial_has_run(tmp_path):
    """A study of several budgets, some still without a trial (so without a known image count), reads
    from the largest budget down and skip first at each, whatever order the storage holds them in."""
    url = f"sqlite:///{tmp_path}/s.db"
    for fraction in (0.25, 0.1):  # not run yet: no labeled-image count
        for arm in ("distill", "skip"):
            name, condition = f"b/labels={fraction:.0%},unlabeled={arm}", {"labeled_fraction": fraction}
            made = optuna.create_study(study_name=name, storage=url, direction="maximize")
            made.set_user_attr(Attr.FINGERPRINT, {"condition": {**condition, "unlabeled": arm}, "fixed": {}})
    _stored(url, "b/labels=5%,unlabeled=skip", {"labeled_fraction": 0.05, "unlabeled": "skip"}, [0.8], [])
    _stored(url, "b/labels=1%,unlabeled=skip", {"labeled_fraction": 0.01, "unlabeled": "skip"}, [0.7], [])
    _stored(url, "b/labels=100%", {"labeled_fraction": 1.0}, [0.9], [])
    assert [c.label for c in report.load_conditions(url, "b")] == [
        "labels=100%",
        "labels=25%,unlabeled=skip", "labels=25%,unlabeled=distill",
        "labels=10%,unlabeled=skip", "labels=10%,unlabeled=distill",
        "labels=5%,unlabeled=skip", "labels=1%,unlabeled=skip",
    ]  # fmt: skip
