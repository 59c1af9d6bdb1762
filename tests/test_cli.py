import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState
from sqlalchemy.exc import OperationalError

from fmsearch import cli
from tests.conftest import REAL_ROOT, messages, needs_real_data

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def in_process(monkeypatch, capsys):
    """`fmsearch ARGS` run by cli.main in this process, as a CompletedProcess: for a test about what a
    command prints and returns rather than about its process, it saves starting Python and torch again
    (4-8 s of CPU per command on a 2-core Xeon)."""
    monkeypatch.setenv("FMSEARCH_DATA", str(REAL_ROOT))

    def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
        if cwd is not None:
            monkeypatch.chdir(cwd)
        try:
            code = cli.main(list(args))
        except SystemExit as exit:  # argparse: --help, or a bad argument
            code = exit.code
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["fmsearch", *args], code, out, err)

    return run


def fmsearch(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "FMSEARCH_DATA": str(REAL_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "fmsearch.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "--lr", "-1"], "argument --lr: must be positive, got -1"),
        (["train", "--arch", "resnet"], "argument --arch: invalid choice: 'resnet'"),
        (["train", "--dropout", "2"], "argument --dropout: must be in [0, 1), got 2"),
        (["train", "--warmup-epochs", "-1"], "argument --warmup-epochs: must be non-negative, got -1"),
        (["train", "--seed", "-1"], "argument --seed: must be in [0, 4294967295], got -1"),
        (["train", "--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
        (["study"], "the following arguments are required: name"),
        (["study", "semi", "--jobs", "0"], "argument --jobs: must be at least 1, got 0"),
        (["study", "semi", "--time", "1 hour"], "argument --time: '1 hour' is not a duration: write e.g. 1h"),
        (["study", "semi", "--time", "0m"], "argument --time: '0m' leaves no time"),
    ],
)
def test_bad_arguments_get_one_line_and_exit_2(args, message, in_process):
    result = in_process(*args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_an_absent_gpu_is_one_line(in_process):
    result = in_process("train", "--device", "cuda", "--epochs", "1")
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "no CUDA GPU" in result.stderr and "--device cpu" in result.stderr


def test_help_states_the_defaults(in_process):
    result = in_process("train", "--help")
    assert "(default 0.001)" in result.stdout and "(default plain)" in result.stdout


@needs_real_data
@pytest.mark.slow
def test_train_prints_the_epoch_table_and_the_test_score(tmp_path, in_process):
    result = in_process(
        "train",
        "--epochs",
        "2",
        "--pool-limit",
        "3000",
        "--device",
        "cpu",
        "--json",
        "run.json",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:5] == ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy"]
    assert [line.split()[0] for line in lines[1:3]] == ["1", "2"]
    test_accuracy = float(lines[-1].split()[-1])
    assert lines[-1].startswith("test_loss") and 0.7 < test_accuracy <= 1.0
    # The rule that keeps the best epoch is named, and only the kept epoch's test score is printed.
    assert re.search(r"best epoch \d by val_loss", result.stdout)
    assert result.stdout.count("test_accuracy") == 1
    assert "--monitor repeats one" in result.stdout
    assert (tmp_path / "run.json").exists()


@needs_real_data
def test_the_same_train_command_and_seed_give_the_same_numbers(tmp_path):
    """The speed settings are chosen once per machine and kept, so a rerun repeats every number."""
    runs = []
    for name in ("first.json", "second.json"):
        result = fmsearch(
            "train", "--epochs", "1", "--pool-limit", "1000", "--device", "cpu", "--json", name, cwd=tmp_path
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert "execution: " in result.stdout
        runs.append(json.loads((tmp_path / name).read_text()))
    timing = {"train_seconds", "epoch_seconds", "images_per_second"}
    first, second = ([{k: v for k, v in h.items() if k not in timing} for h in r["history"]] for r in runs)
    assert first == second and len(first) == 1
    assert (
        runs[0]["test_accuracy"] == runs[1]["test_accuracy"] and runs[0]["test_loss"] == runs[1]["test_loss"]
    )
    chosen = [{k: v for k, v in r["execution"].items() if k != "source"} for r in runs]
    assert chosen[0] == chosen[1] and runs[1]["execution"]["source"].startswith("cache ")


@needs_real_data
@pytest.mark.slow
def test_train_passes_the_semi_label_flags_through(tmp_path, in_process):
    flags = ["--labeled-fraction", "0.1", "--unlabeled", "pseudo", "--tau", "0.7", "--lambda-u", "2"]
    result = in_process(
        "train", "--epochs", "1", "--pool-limit", "2000", "--device", "cpu", *flags, "--no-debias",
        "--json", "run.json", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    saved = json.loads((tmp_path / "run.json").read_text())
    expected = {"labeled_fraction": 0.1, "unlabeled": "pseudo", "tau": 0.7, "lambda_u": 2.0, "debias": False}
    assert {key: saved["config"][key] for key in expected} == expected
    assert "mask_rate" in saved["history"][0]


@needs_real_data
@pytest.mark.slow
def test_a_short_study_on_real_data_runs_reports_and_resumes(tmp_path):
    """The smoke study cut to one trial of two epochs per condition, end to end through the CLI."""
    storage = f"sqlite:///{tmp_path}/studies.db"
    smoke = str(REPO / "studies" / "smoke.toml")
    first = fmsearch("study", smoke, "--trials", "1", "--epochs", "2", "--storage", storage, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    out = first.stdout
    assert "cost: at most 2 trials of 2 epochs" in out and "smaller: --trials, --epochs, --time" in out
    assert "smoke/labels=10%: 1 trial x 2 epochs" in out and "of confirmation (1 seed)" in out
    assert "smoke/labels=100% #0 COMPLETE" in out and "smoke/labels=10% #0 COMPLETE" in out
    assert "test_accuracy" in out
    for name in ("smoke/labels=100%", "smoke/labels=10%"):
        study = optuna.load_study(study_name=name, storage=storage)
        assert len(study.trials) == 1 and study.user_attrs["test"]["test_accuracy"] > 0.5
    assert (tmp_path / "results" / "smoke" / "labels-100pct-best.pt").exists()

    again = fmsearch("study", smoke, "--trials", "1", "--epochs", "2", "--storage", storage, cwd=tmp_path)
    assert again.returncode == 0 and "#1" not in again.stdout  # resumed: nothing left to run
    assert "nothing left to search" in again.stdout and "cost:" not in again.stdout  # and nothing timed

    report = fmsearch("report", "smoke", "--storage", storage, cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    assert (tmp_path / "results" / "smoke" / "summary.md").read_text().startswith("# Study `smoke`")
    assert "storage.json (the trials, for `fmsearch import`)" in report.stdout

    # A fresh checkout: the storage is gone, the committed trials are not. The same command resumes.
    elsewhere = f"sqlite:///{tmp_path}/elsewhere.db"
    moved = fmsearch("study", smoke, "--trials", "1", "--epochs", "2", "--storage", elsewhere, cwd=tmp_path)
    assert moved.returncode == 0, moved.stderr[-3000:]
    assert "resuming from results/smoke/storage.json" in moved.stdout
    assert "smoke/labels=10%: 1 trials (1 complete, 0 pruned, 0 fail)" in moved.stdout
    assert "nothing left to search" in moved.stdout and "test_accuracy" in moved.stdout


@needs_real_data
def test_data_command_names_its_source(in_process):
    result = in_process("data")
    assert result.returncode == 0 and result.stdout.startswith("data: local files in ")


def test_a_time_budget_reads_as_a_person_writes_it():
    from fmsearch import cli

    assert [cli._time_budget(t) for t in ("1h", "90m", "1h30m", "45s", "600", "1.5h")] == [
        3600, 5400, 5400, 45, 600, 5400,
    ]  # fmt: skip


def test_every_training_parameter_is_a_flag_that_reaches_the_config():
    from dataclasses import fields

    from fmsearch import cli, engine
    from fmsearch.params import parameters

    changed = {"arch": "adaptive", "optimizer": "sgd", "schedule": "cosine", "unlabeled": "pseudo"}
    changed |= {"monitor": "val_accuracy", "labeled_fraction": 0.5, "tau": 0.5, "dropout": 0.5}
    changed |= {"student_view": "strong", "distill_on": "labeled", "teacher_recipe": "student"}
    argv = ["train"]
    for p in parameters(engine.TrainConfig).values():
        flag = "--" + p.name.replace("_", "-")
        if p.type is bool:
            changed[p.name] = not p.default
            argv.append(flag if not p.default else "--no-" + flag[2:])
        else:
            if p.name not in changed:
                changed[p.name] = (p.default or 0) + 2 if p.type is int else p.default * 2 + 0.1
            argv += [flag, str(changed[p.name])]
        assert changed[p.name] != p.default, p.name
    config = cli.train_config(cli.build_parser().parse_args(argv))
    assert {f.name: getattr(config, f.name) for f in fields(config)} == changed
    assert cli.train_config(cli.build_parser().parse_args(["train"])) == engine.TrainConfig()
    assert cli.train_config(cli.build_parser().parse_args(["train", "--no-patience"])).patience is None


def test_train_flags_rebuild_a_config_through_the_train_parser():
    from dataclasses import asdict, replace

    from fmsearch.config import SETTINGS, TrainConfig, train_flags

    config = TrainConfig(
        arch="adaptive", lr=0.0012345678901234567, patience=None, debias=False, augment=True,
        labeled_count=500, unlabeled="pseudo", tau=0.81, warmup_epochs=2, amp=True, threads=3,
    )  # fmt: skip
    args = cli.build_parser().parse_args(["train", *train_flags(asdict(config))])
    assert cli.train_config(args) == replace(config, **dict.fromkeys(SETTINGS))  # left to the machine
    stated = ["--epochs", "10", "--batch-size", "64", "--patience", "3", "--monitor", "val_loss"]
    assert train_flags(asdict(TrainConfig())) == stated  # a run's length and stopping rule, always
    # A study's [fixed] distill settings reach every condition's config; a skip run never reads them.
    skip = asdict(TrainConfig(mixup=0.4, teachers=3, teacher_recipe="student", augment=True))
    assert train_flags(skip) == [*stated, "--augment"]
    assert "--mixup" in train_flags({**skip, "unlabeled": "distill"})


def test_a_user_error_is_one_line_and_a_bug_keeps_its_traceback(monkeypatch, capsys):
    from fmsearch import cli, data, engine, report, spec, study
    from fmsearch.errors import FmsearchError

    for error in (
        spec.SpecError,
        data.DataError,
        study.StudyError,
        report.ReportError,
        engine.DivergenceError,
    ):
        assert issubclass(error, FmsearchError)

    def user_error(args):
        raise spec.SpecError("studies/x.toml: trials: 0 is not a positive integer; write a whole number")

    monkeypatch.setattr(cli, "cmd_data", user_error)
    assert cli.main(["data"]) == 1
    assert capsys.readouterr().err == (
        "fmsearch data: error: studies/x.toml: trials: 0 is not a positive integer; write a whole number\n"
    )

    def bug(args):
        raise ValueError("math domain error")

    monkeypatch.setattr(cli, "cmd_data", bug)
    with pytest.raises(ValueError, match="math domain error"):
        cli.main(["data"])


INTERRUPTED_STUDY = """
description = "two workers, interrupted"
trials = 4
max_epochs = 20
batch_size = 64
patience = 20
pool_limit = 2000
val_size = 1000  # validation dominated these epochs; the test is about Ctrl-C

[pruner]
name = "none"

[fixed]
arch = "plain"

[space]
lr = { low = 1e-3, high = 3e-3, log = true }
"""


# `fmsearch` as a terminal's foreground job runs it: hearing SIGINT even where the suite itself was
# started with it ignored, as a shell without job control starts a background job (`make test &`).
AS_A_FOREGROUND_JOB = (
    "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "from fmsearch.cli import main; sys.exit(main(sys.argv[1:]))"
)


@needs_real_data
@pytest.mark.slow
@pytest.mark.parametrize(
    "stop,exit_code,said",
    [
        # what a terminal's Ctrl-C does: SIGINT to the whole process group
        ("ctrl-c", 130, "interrupted"),
        # `kill PID`, systemd, a batch scheduler's limit: SIGTERM to the command alone
        ("sigterm", 143, "terminated (SIGTERM)"),
    ],
)
def test_a_stop_with_two_jobs_fails_the_running_trials_at_once_in_one_line(tmp_path, stop, exit_code, said):
    (tmp_path / "stop.toml").write_text(INTERRUPTED_STUDY)
    storage = f"sqlite:///{tmp_path}/studies.db"
    env = {**os.environ, "FMSEARCH_DATA": str(REAL_ROOT)}
    command = ["study", "stop.toml", "--jobs", "2", "--device", "cpu", "--storage", storage]
    study = subprocess.Popen(
        [sys.executable, "-c", AS_A_FOREGROUND_JOB, *command], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:  # both workers part-way through a trial
        time.sleep(0.5)
        assert study.poll() is None, study.stderr.read()[-3000:]
        try:
            trials = optuna.load_study(study_name="stop", storage=storage).trials
        except (KeyError, OperationalError):
            continue
        if sum(t.state == TrialState.RUNNING and len(t.intermediate_values) >= 1 for t in trials) == 2:
            break
    if stop == "ctrl-c":
        os.killpg(study.pid, signal.SIGINT)
    else:
        os.kill(study.pid, signal.SIGTERM)
    _, err = study.communicate(timeout=120)
    assert study.returncode == exit_code
    assert messages(err) == [
        f"fmsearch study: {said}; running trials were marked FAIL (they do not count): rerun to resume"
    ], err[-3000:]
    assert "Traceback" not in err and "leaked semaphore" not in err and "KeyboardInterrupt" not in err
    trials = optuna.load_study(study_name="stop", storage=storage).trials
    assert not any(t.state == TrialState.RUNNING for t in trials)
    interrupted = [t for t in trials if t.user_attrs.get("stop_reason") == "interrupted"]
    assert len(interrupted) == 2 and all(t.state == TrialState.FAIL for t in interrupted)
    states = [(t.number, t.state.name) for t in trials]
    print(f"\n{stop}: {messages(err)[-1]} (exit {study.returncode}); {states}")


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["train", "--device", "foo"],
            "argument --device: unknown device 'foo': use cpu, cuda, cuda:N or mps",
        ),
        (["dashboard", "--port", "99999"], "argument --port: must be a TCP port in 1..65535, got 99999"),
        (
            ["study", "smoke", "--storage", "sqlite:///:memory:"],
            "argument --storage: 'sqlite:///:memory:' is an in-memory database",
        ),
        (["report", "../escape"], "argument name: '../escape' is not a study name"),
    ],
)
def test_more_bad_arguments_get_one_line_and_exit_2(args, message, in_process):
    result = in_process(*args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and message in result.stderr and "Traceback" not in result.stderr


def test_a_study_file_whose_name_would_leave_results_is_refused(tmp_path):
    (tmp_path / "...toml").write_text(INTERRUPTED_STUDY)
    result = fmsearch("study", "...toml", "--storage", f"sqlite:///{tmp_path}/s.db", cwd=tmp_path)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "...toml: '..' is not a study name" in result.stderr
    assert not (tmp_path / "s.db").exists() and not (tmp_path / "results").exists()


def test_a_dashboard_for_other_machines_needs_allow_remote(tmp_path):
    """optuna-dashboard has no login and can delete studies: binding beyond this machine is an opt-in."""
    result = fmsearch("dashboard", "--host", "0.0.0.0", "--storage", f"sqlite:///{tmp_path}/s.db")
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "--host 0.0.0.0 would serve the dashboard to other machines" in result.stderr
    assert "--allow-remote" in result.stderr and not (tmp_path / "s.db").exists()
    assert all(cli._is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "[::1]", "127.1.2.3"))
    assert not any(cli._is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.5", "example.org"))


@pytest.mark.parametrize(
    "target,variable", [("report", "STUDY"), ("study", "STUDY"), ("dashboard", "PORT"), ("train", "ARGS")]
)
def test_make_hands_its_variables_to_the_shell_quoted(tmp_path, target, variable):
    """`make -n` prints the command the shell would run; run it with fmsearch replaced by `true`."""
    value = f"x; touch {tmp_path}/INJECTED"
    command = ["make", "-n", "-C", str(REPO), target, f"{variable}={value}"]
    dry = subprocess.run(command, capture_output=True, text=True, check=True)
    line = next(line for line in reversed(dry.stdout.splitlines()) if f"fmsearch {target}" in line)
    subprocess.run(["sh", "-c", line.replace(".venv/bin/fmsearch", "true")], cwd=tmp_path, check=True)
    assert not (tmp_path / "INJECTED").exists()
