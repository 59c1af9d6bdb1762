import shutil
import subprocess
import sys
import threading

import optuna
import pytest
from optuna.artifacts import get_all_artifact_meta
from optuna.distributions import FloatDistribution
from optuna_dashboard import get_note
from PIL import Image

from fmsearch import report, spec, study
from fmsearch.storage import BestTrialScore, DatabaseArtifactStore, open_storage
from tests.conftest import TINY_STUDY, run_tiny_study, study_text, write_study

pytestmark = pytest.mark.xdist_group("tiny-study")  # one pytest worker runs the session's tiny study
FIGURES = {"curves.png", "fraction.png", "search.png", "confusion.png"}


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
    assert "labels=100%: test accuracy" in text.split("##")[0]  # the answer comes before any table
    for name in ("tiny/labels=100%", "tiny/labels=50%"):
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
    _, images = report.write_report(run.storage, "single", tmp_path / "results")
    names = {p.name for p in images}
    assert "fraction.png" not in names and {"curves.png", "search.png", "confusion.png"} <= names


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
