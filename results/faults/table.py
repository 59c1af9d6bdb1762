"""The fault table: each fault of the audit, caused through the real command line on a slice of the
real data, with the last line the user saw, the exit code and what was checked afterwards.

    .venv/bin/python results/faults/table.py    # about 10 minutes on 2 cores; writes table.md here

Each case runs in its own scratch folder with its own SQLite storage (PostgreSQL's cases are in the
test suite). Nothing here is mocked: the commands are `fmsearch ...` as a user types them.
"""

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import sqlalchemy
from optuna.artifacts import get_all_artifact_meta

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
FMSEARCH = [sys.executable, "-m", "fmsearch.cli"]
DATA = (REPO / "data").resolve()
STUDY = """description = "fault table"
trials = {trials}
max_epochs = {epochs}
batch_size = 64
patience = 2
pool_limit = 1000
val_size = 1000

pruner = {{ name = "none" }}  # the sampler is the default: TPE, seed 0

[fixed]
{fixed}

[conditions]
labeled_fraction = [{fractions}]

[space]
lr = {{ low = 3e-4, high = 3e-3, log = true }}
"""
ROWS: list[tuple[str, str, str, int | str, str]] = []
optuna.logging.set_verbosity(optuna.logging.WARNING)


def study_file(folder: Path, trials=2, epochs=1, fixed="", fractions="1.0", name="f") -> Path:
    path = folder / f"{name}.toml"
    path.write_text(STUDY.format(trials=trials, epochs=epochs, fixed=fixed, fractions=fractions))
    return path


def scratch(name: str) -> Path:
    folder = Path(tempfile.mkdtemp(prefix=f"fault-{name}-"))
    return folder


def env(**extra) -> dict:
    return {**os.environ, "FMSEARCH_DATA": str(DATA), "PYTHONPATH": str(REPO), **extra}


def run(folder: Path, *args: str, timeout=600, **extra) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*FMSEARCH, *args], cwd=folder, env=env(**extra), capture_output=True, text=True, timeout=timeout
    )


class Started:
    """A command left running, its output in files (a pipe nobody reads fills up and stalls it)."""

    def __init__(self, folder: Path, *args: str):
        self.out, self.err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # noqa: SIM115 (read in finish)
        self.process = subprocess.Popen(
            [*FMSEARCH, *args], cwd=folder, env=env(), stdout=self.out, stderr=self.err
        )
        self.pid = self.process.pid

    def finish(self, timeout: float = 600) -> subprocess.CompletedProcess:
        self.process.wait(timeout=timeout)
        self.out.seek(0)
        self.err.seek(0)
        return subprocess.CompletedProcess(
            self.process.args, self.process.returncode, self.out.read(), self.err.read()
        )


def start(folder: Path, *args: str) -> Started:
    return Started(folder, *args)


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def trials(folder: Path, name: str = "f/labels=100%") -> list:
    url = f"sqlite:///{folder}/results/studies.db"
    try:
        return optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)
    except (KeyError, sqlalchemy.exc.OperationalError):  # no study yet, or no database file yet
        return []


def finished(folder: Path, name: str = "f/labels=100%") -> int:
    return sum(
        t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        for t in trials(folder, name)
    )


def wait_running(folder: Path, name: str = "f/labels=100%", timeout=120) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if any(t.state == optuna.trial.TrialState.RUNNING for t in trials(folder, name)):
            return
        time.sleep(0.5)
    raise TimeoutError("no trial started")


def row(case: str, done: str, result, checked: str) -> None:
    # what a failed command said last (stderr), or a finished one's last summary line (stdout)
    line = (last_line(result.stderr) if result.returncode else last_line(result.stdout)) or last_line(
        result.stderr + result.stdout
    )
    ROWS.append((case, done, line, result.returncode, checked))
    print(f"{case}: exit {result.returncode}: {line}\n    {checked}", flush=True)


def case_1_death_before_first_heartbeat():
    folder = scratch("1")
    path = study_file(folder, trials=2)
    run(folder, "study", str(path), "--trials", "1", "--heartbeat", "1")
    study = optuna.load_study(study_name="f/labels=100%", storage=f"sqlite:///{folder}/results/studies.db")
    orphan = study.ask()  # a RUNNING trial whose process dies before its first heartbeat
    before = finished(folder)
    result = run(folder, "study", str(path), "--heartbeat", "1", timeout=300)
    state = trials(folder)[orphan.number].state.name
    row(
        "1 worker died before its first heartbeat",
        "ask() then exit; rerun --heartbeat 1",
        result,
        f"finished {before} -> {finished(folder)}; the orphan #{orphan.number} is {state}, retried",
    )


def case_2_paused_worker_and_other_heartbeat():
    folder = scratch("2")
    first = start(folder, "study", str(path := study_file(folder, trials=3, epochs=3)), "--heartbeat", "1")
    wait_running(folder)
    paused = next(t.number for t in trials(folder) if t.state == optuna.trial.TrialState.RUNNING)
    os.kill(first.pid, signal.SIGSTOP)
    time.sleep(6)  # past the study's grace (4 x 1 s)
    second = start(folder, "study", str(path), "--heartbeat", "1")
    deadline = time.time() + 180
    while trials(folder)[paused].state != optuna.trial.TrialState.FAIL and time.time() < deadline:
        time.sleep(0.5)  # until the second worker has failed the paused one's trial as stale
    os.kill(first.pid, signal.SIGCONT)
    result, other = first.finish(), second.finish()
    said = (result.stdout + result.stderr).replace("\r", "\n").splitlines()
    taken = [line for line in said if "failed it as stale" in line]
    row(
        "2 a worker paused past the grace",
        "SIGSTOP 6 s, a second worker, SIGCONT",
        result,
        f"paused worker said: {taken[0].strip() if taken else 'nothing'}; second exit {other.returncode}; "
        f"finished {finished(folder)} of 3",
    )
    before = finished(folder)
    slow = run(folder, "study", str(path), "--trials", "4", "--heartbeat", "3")
    study = optuna.load_study(study_name="f/labels=100%", storage=f"sqlite:///{folder}/results/studies.db")
    row(
        "2 a worker with a slower --heartbeat",
        "--heartbeat 3 --trials 4 on a study made with --heartbeat 1",
        slow,
        f"finished {before} -> {finished(folder)}; the study's: {study.user_attrs.get('heartbeat')}",
    )


def case_3_sigterm():
    folder = scratch("3")
    worker = start(folder, "study", str(study_file(folder, trials=4, epochs=3)), "--jobs", "2")
    wait_running(folder)
    time.sleep(2)
    os.kill(worker.pid, signal.SIGTERM)
    result = worker.finish(timeout=120)
    states = sorted(t.state.name for t in trials(folder))
    row(
        "3 SIGTERM",
        "kill -TERM during 2 running trials",
        result,
        f"trials afterwards: {states}",
    )


def case_4_seeds():
    folder = scratch("4")
    path = study_file(folder, trials=2)
    result = run(folder, "study", str(path), "--jobs", "2")
    seeds = sorted(t.user_attrs.get("sampler_seed") for t in trials(folder))
    row("4 two workers started together", "--jobs 2", result, f"sampler seeds of the trials: {seeds}")
    return folder


def case_6_stale_test_score(folder: Path):
    url = f"sqlite:///{folder}/results/studies.db"
    study = optuna.load_study(study_name="f/labels=100%", storage=url)
    test = dict(study.user_attrs["test"])
    best = max((t for t in study.trials if t.value is not None), key=lambda t: (t.value, -t.number))
    test["trial"] = 1 - best.number  # the score of a trial that is no longer the best
    study.set_user_attr("test", test)
    result = run(folder, "report", "f")
    summary = (folder / "results" / "f" / "summary.md").read_text()
    flagged = [line for line in summary.splitlines() if "trial #" in line][:2]
    row(
        "6 a stored test score of another trial",
        f"the study's test record names trial #{test['trial']}, the best is #{best.number}; fmsearch report",
        result,
        " / ".join(flagged)[:300],
    )


def case_8_two_reports(folder: Path):
    reports = [start(folder, "report", "f") for _ in range(2)]
    results = [p.finish(timeout=300) for p in reports]
    codes = [r.returncode for r in results]
    study = optuna.load_study(study_name="f/labels=100%", storage=f"sqlite:///{folder}/results/studies.db")
    names = [m.filename for m in get_all_artifact_meta(study)]
    result = results[1]
    row(
        "8 two reports at once",
        "two fmsearch report f together",
        result,
        f"exits {codes}; figure artifacts on the study: {len(names)} for {len(set(names))} names",
    )


def case_refusals():
    folder = scratch("refuse")
    cases = [
        ("9 [fixed] lr = nan", study_file(folder, fixed="lr = nan", name="nan"), []),
        ("10 two conditions, one name", study_file(folder, fractions="0.1, 0.1000001", name="twin"), []),
        ("11 pool_limit = 5", Path(str(study_file(folder, name="pool"))), []),
        ("12 --trials with nothing searched", study_file(folder, name="flat"), ["--trials", "3"]),
    ]
    space = "lr = { low = 3e-4, high = 3e-3, log = true }"
    (folder / "nan.toml").write_text((folder / "nan.toml").read_text().replace(space, "dropout = [0.1, 0.3]"))
    (folder / "pool.toml").write_text(
        (folder / "pool.toml").read_text().replace("pool_limit = 1000", "pool_limit = 5")
    )
    flat = (folder / "flat.toml").read_text().replace(space, "").replace("trials = 2", "trials = 1")
    (folder / "flat.toml").write_text(flat)
    for case, path, extra in cases:
        result = run(folder, "study", str(path), *extra)
        names = (
            optuna.get_all_study_names(f"sqlite:///{folder}/results/studies.db")
            if (folder / "results" / "studies.db").exists()
            else []
        )
        row(
            case,
            f"fmsearch study {path.name} {' '.join(extra)}",
            result,
            f"studies in the storage: {len(names)}",
        )
    result = run(folder, "train", "--pool-limit", "5")
    row("11 train --pool-limit 5", "fmsearch train --pool-limit 5", result, "no traceback")


def case_13_other_code():
    folder = scratch("13")
    path = study_file(folder, trials=2)
    run(folder, "study", str(path))
    study = optuna.load_study(study_name="f/labels=100%", storage=f"sqlite:///{folder}/results/studies.db")
    recorded = dict(study.user_attrs["fingerprint"])
    moved = {**recorded, "defaults": {**recorded["defaults"], "weight_decay": 1e-4}}
    unversioned = {k: v for k, v in recorded.items() if k not in ("training", "defaults")}
    for case, done, fingerprint in (
        ("13 trials of code with another default", "stored defaults.weight_decay 1e-4; rerun", moved),
        ("13 a study from before versions", "fingerprint without training/defaults; rerun", unversioned),
    ):
        study.set_user_attr("fingerprint", fingerprint)
        result = run(folder, "study", str(path), "--trials", "3")
        row(case, done, result, f"finished {finished(folder)} (unchanged)")
    report = run(folder, "report", "f")
    row("13 ... and its report", "fmsearch report f", report, "the report still reads it")


def case_15_passwords():
    folder = scratch("15")
    secrets = {
        "postgresql://user:p@ss:w/rd@127.0.0.1:1/db": "p@ss:w/rd",
        "postgresql://user@127.0.0.1:1/db?password=s3cret": "s3cret",
    }
    for url, secret in secrets.items():
        result = run(folder, "study", str(study_file(folder)), "--storage", url, timeout=120)
        leaked = secret in result.stdout + result.stderr
        row(
            "15 a password in the storage URL",
            f"--storage with {'@:/ in it' if '@' in secret else 'password= in the query'}",
            result,
            f"password printed: {leaked}",
        )


def case_16_make():
    """make hands STUDY to the shell quoted: the injected command is part of a study name fmsearch refuses."""
    study = ["make", "study", "STUDY=smoke; echo INJECTED"]
    shown = subprocess.run([*study[:1], "-n", *study[1:]], cwd=REPO, capture_output=True, text=True).stdout
    real = subprocess.run(study, cwd=REPO, capture_output=True, text=True, env=env())
    said = [line for line in real.stderr.splitlines() if line.startswith("fmsearch")]
    result = subprocess.CompletedProcess(
        study, real.returncode, real.stdout, said[-1] if said else real.stderr
    )
    command = [
        line.strip()
        for line in shown.splitlines()
        if "fmsearch.cli study" in line or "fmsearch study" in line
    ]
    row(
        "16 make STUDY='smoke; echo INJECTED'",
        "make study",
        result,
        f"echo ran: {any(x.strip() == 'INJECTED' for x in real.stdout.splitlines())}; "
        f"make -n shows: {command[0][:100] if command else '?'}",
    )


def case_17_dashboard():
    folder = scratch("17")
    result = run(folder, "dashboard", "--host", "0.0.0.0", timeout=60)
    row("17 dashboard on 0.0.0.0", "fmsearch dashboard --host 0.0.0.0", result, "nothing served")


def case_18_bad_row(folder4: Path):
    url = f"sqlite:///{folder4}/results/studies.db"
    study = optuna.load_study(study_name="f/labels=100%", storage=url)
    best = study.best_trial
    with sqlite3.connect(folder4 / "results" / "studies.db") as db:  # Optuna refuses to edit a finished trial
        db.execute(
            "UPDATE trial_user_attributes SET value_json = ? WHERE trial_id = ? AND key = 'config'",
            (json.dumps(dict(best.user_attrs["config"], colour="red")), best._trial_id),
        )
    study.set_user_attr("test", {"garbage": True})  # a test record of another shape: scored again
    result = run(folder4, "study", str(folder4 / "f.toml"))
    row(
        "18 a trial row another version wrote",
        "an unknown key in the best trial's config; rerun",
        result,
        f"finished {finished(folder4)} (unchanged)",
    )


def case_19_teacher_cache():
    folder = scratch("19")
    args = [
        "train",
        "--pool-limit",
        "1000",
        "--labeled-fraction",
        "0.1",
        "--unlabeled",
        "distill",
        "--teachers",
        "1",
        "--teacher-epochs",
        "1",
        "--epochs",
        "1",
    ]
    first = run(folder, *args)
    logits = sorted((folder / "results" / "teachers").glob("*-logits.pt"))
    logits[0].write_bytes(b"")
    result = run(folder, *args)
    said = [line for line in result.stderr.splitlines() if "cache entry" in line]
    row(
        "19 a teacher cache entry cut to 0 bytes",
        "truncate the logits file; train again",
        result,
        f"first exit {first.returncode}; it said: {said[0] if said else 'nothing'}",
    )


def case_20_truncated_gz():
    """Debian's own file, cut in half for the run and put back after (this needs root)."""
    folder = scratch("20")
    packaged = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
    kept = folder / packaged.name
    shutil.copy2(packaged, kept)
    try:
        packaged.write_bytes(kept.read_bytes()[: kept.stat().st_size // 2])
        result = run(folder, "data", FMSEARCH_DATA=str(folder / "data"))
    finally:
        shutil.copy2(kept, packaged)
    left = (
        sorted(p.name for p in (folder / "data").rglob("*") if p.is_file())
        if (folder / "data").exists()
        else []
    )
    row(
        "20 a truncated .gz in Debian's package",
        "train-images .gz cut in half; fmsearch data",
        result,
        f"files left in the data folder: {left}",
    )


def write_table() -> None:
    lines = [
        "| case | what was done | last line the user saw | exit | checked afterwards |",
        "|---|---|---|---|---|",
    ]
    for case, done, line, code, checked in ROWS:
        cells = [c.replace("|", "\\|") for c in (case, done, line, str(code), checked)]
        lines.append("| " + " | ".join(cells) + " |")
    out = Path(__file__).with_name("table.md")
    out.write_text(
        f"Made by `.venv/bin/python results/faults/table.py` on {time.strftime('%Y-%m-%d')}.\n\n"
        + "\n".join(lines)
        + "\n"
    )
    print(f"wrote {out}")


CASES = [
    "refusals",
    "passwords",
    "make",
    "dashboard",
    "truncated_gz",
    "death_before_first_heartbeat",
    "seeds_stale_score_reports",
    "other_code",
    "sigterm",
    "paused_worker",
    "teacher_cache",
    "bad_row",
]


def run_case(name: str) -> None:
    if name == "seeds_stale_score_reports":
        folder4 = case_4_seeds()
        case_6_stale_test_score(folder4)
        case_8_two_reports(folder4)
        case_18_bad_row(folder4)
        return
    {
        "refusals": case_refusals, "passwords": case_15_passwords, "make": case_16_make,
        "dashboard": case_17_dashboard, "truncated_gz": case_20_truncated_gz,
        "death_before_first_heartbeat": case_1_death_before_first_heartbeat, "other_code": case_13_other_code,
        "sigterm": case_3_sigterm, "paused_worker": case_2_paused_worker_and_other_heartbeat,
        "teacher_cache": case_19_teacher_cache,
    }[name]()  # fmt: skip


if __name__ == "__main__":
    # `table.py CASE ...` reruns those cases only; the rows of the others are kept from the last run.
    saved = HERE / ".rows.json"
    rows = json.loads(saved.read_text()) if saved.exists() else {}
    for name in sys.argv[1:] or CASES:
        ROWS.clear()
        try:
            run_case(name)
        except Exception as error:  # a case that could not be caused: say so, go on to the next
            print(f"{name}: the case itself failed: {error!r}", flush=True)
        rows[name] = ROWS[:]
        saved.write_text(json.dumps(rows, indent=1))
    ROWS[:] = [tuple(r) for name in CASES for r in rows.get(name, [])]
    write_table()
