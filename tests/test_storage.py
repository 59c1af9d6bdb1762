"""The storage on real databases: SQLite files, and a real PostgreSQL server from Debian's package."""

import io
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from fmsearch import storage
from tests.conftest import REAL_ROOT, messages, needs_real_data, run_tiny_study, study_text

SCALE_STUDY = (
    study_text(trials=3, max_epochs=3, patience=3, fixed="optimizer = 'adam'\narch = 'plain'")
    .replace(
        "batch_size = 32", "batch_size = 64\npool_limit = 600\nval_size = 1000"
    )  # the test is about workers
    .replace("labeled_fraction = [1.0]", "labeled_fraction = [1.0, 0.5]")
    .replace("arch = ['plain', 'adaptive']\n", "")
)
SCALE_NAMES = ("scale/labels=100%", "scale/labels=50%")


def cli_env(url: str) -> dict[str, str]:
    """The environment of a worker: the storage URL (with its password) only in $FMSEARCH_STORAGE."""
    return {**os.environ, "FMSEARCH_DATA": str(REAL_ROOT), storage.ENV_URL: url, "OMP_NUM_THREADS": "1"}


def worker_command(study_file: Path) -> list[str]:
    """One machine's `fmsearch study` on the shared storage, with a 1 s heartbeat."""
    return [
        sys.executable,
        "-m",
        "fmsearch.cli",
        "study",
        str(study_file),
        "--device",
        "cpu",
        "--heartbeat",
        "1",
    ]


def fmsearch(*args: str, cwd: Path, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fmsearch.cli", *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def test_the_artifact_store_keeps_a_weights_sized_blob_in_postgresql(postgres_url):
    rdb = storage.open_storage(postgres_url)
    store = storage.DatabaseArtifactStore(rdb)
    body = os.urandom(3_000_000)
    store.write("weights", io.BytesIO(body))
    assert store.open_reader("weights").read() == body
    store.write("weights", io.BytesIO(b"replaced"))  # written in place, never twice
    assert store.open_reader("weights").read() == b"replaced"
    store.remove("weights")
    with pytest.raises(optuna.artifacts.exceptions.ArtifactNotFound):
        store.open_reader("weights")


@needs_real_data
@pytest.mark.slow
def test_three_worker_commands_on_postgresql_end_at_exactly_n_even_after_a_kill_9(
    postgres_server, postgres_url, tmp_path
):
    """Three `fmsearch study` commands, each in its own folder as on its own machine, share a study.

    One is killed with SIGKILL mid-trial and started again; every condition still ends at exactly N.
    """
    started = time.monotonic()
    study_file = tmp_path / "scale.toml"
    study_file.write_text(SCALE_STUDY)
    env = cli_env(postgres_url)
    command = worker_command(study_file)
    machines = [tmp_path / f"machine-{i}" for i in range(3)]
    for folder in machines:
        folder.mkdir()

    def start(folder: Path) -> subprocess.Popen:
        return subprocess.Popen(
            command, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    workers = [start(folder) for folder in machines]
    victim_pid, victim_trial = None, None
    deadline = time.monotonic() + 400
    while victim_pid is None and time.monotonic() < deadline:  # a trial part-way through its epochs
        time.sleep(0.5)
        assert all(w.poll() is None for w in workers), [
            w.stderr.read() for w in workers if w.poll() is not None
        ]
        try:
            trials = optuna.load_study(study_name=SCALE_NAMES[0], storage=postgres_url).trials
        except KeyError:  # the study does not exist yet
            continue
        for trial in trials:
            if trial.state == TrialState.RUNNING and len(trial.intermediate_values) >= 1:
                victim_pid, victim_trial = int(trial.user_attrs["worker"].rsplit(":", 1)[1]), trial.number
    assert victim_pid is not None, "no trial got past its first epoch"
    index = next(i for i, w in enumerate(workers) if w.pid == victim_pid)
    os.kill(victim_pid, signal.SIGKILL)
    workers[index].wait()
    workers[index] = start(machines[index])  # the machine's owner reruns the same command
    outputs = [w.communicate(timeout=600) for w in workers]
    for worker, (out, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err[-3000:]
        assert postgres_server.password not in out + err

    for name in SCALE_NAMES:
        trials = optuna.load_study(study_name=name, storage=postgres_url).trials
        assert sum(storage.is_finished(t) for t in trials) == 3, [(t.number, t.state) for t in trials]
        assert [t.number for t in trials] == list(range(len(trials)))  # none duplicated, none lost
        assert not any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials)
        # Machines started together must not all draw TPE's start-up points alike.
        ran = [t for t in trials if "worker" in t.user_attrs]
        seeds = {t.user_attrs["worker"]: t.user_attrs["sampler_seed"] for t in ran}
        assert len(seeds) >= 2 and len(set(seeds.values())) == len(seeds), seeds
    killed = optuna.load_study(study_name=SCALE_NAMES[0], storage=postgres_url).trials[victim_trial]
    assert killed.state == TrialState.FAIL
    retried = optuna.load_study(study_name=SCALE_NAMES[0], storage=postgres_url).trials
    assert any(t.system_attrs.get("failed_trial") == victim_trial for t in retried)

    reporter = tmp_path / "laptop"
    reporter.mkdir()
    report = fmsearch("report", "scale", cwd=reporter, env=env)
    assert report.returncode == 0, report.stderr
    summary = (reporter / "results" / "scale" / "summary.md").read_text()
    for name in SCALE_NAMES:
        study = optuna.load_study(study_name=name, storage=postgres_url)
        section = summary.split(f"## {name}\n", 1)[1]
        shown = re.search(r"\| validation accuracy \| ([0-9.]+) \(trial #(\d+),", section)
        assert (int(shown[2]), float(shown[1])) == (study.best_trial.number, round(study.best_value, 4))
        assert study.user_attrs["test"]["trial"] == study.best_trial.number
        for folder in machines:  # every machine has the best weights, whichever one trained them
            assert storage.best_weights_path(folder / "results", name).exists()

    # The test score does not depend on the machine: score again where no trial ever ran.
    study = optuna.load_study(study_name=SCALE_NAMES[0], storage=postgres_url)
    recorded = study.user_attrs["test"]
    study.set_user_attr("test", None)
    fresh = tmp_path / "fresh-machine"
    fresh.mkdir()
    rescored = fmsearch("study", str(study_file), "--device", "cpu", cwd=fresh, env=env)
    assert rescored.returncode == 0, rescored.stderr[-3000:]
    again = optuna.load_study(study_name=SCALE_NAMES[0], storage=postgres_url).user_attrs["test"]
    assert again["trial"] == recorded["trial"] and again["test_accuracy"] == recorded["test_accuracy"]
    print(f"\n3 workers on PostgreSQL, one killed and rerun: {time.monotonic() - started:.0f} s")
    for name in SCALE_NAMES:
        trials = optuna.load_study(study_name=name, storage=postgres_url).trials
        print(name, [(t.number, t.state.name, t.user_attrs.get("worker", "").split(":")[-1]) for t in trials])


REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "studies" / "smoke.toml")
PASSWORD = "pa55-w0rd-nobody-may-see"


def one_line_error(result: subprocess.CompletedProcess, command: str) -> str:
    """The single stderr line of a failed command, checked for shape."""
    assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert lines[0].startswith(f"fmsearch {command}: error: ")
    return lines[0]


def finished_counts(url: str) -> dict[str, int]:
    names = optuna.get_all_study_names(storage=url)
    return {
        n: sum(map(storage.is_finished, optuna.load_study(study_name=n, storage=url).trials)) for n in names
    }


@pytest.fixture(scope="module")
def small_study(tmp_path_factory, tiny) -> Path:
    """A SQLite file holding one finished study (2 trials of 1 epoch), to copy and break."""
    folder = tmp_path_factory.mktemp("small")
    run_tiny_study(folder, tiny, study_text(trials=2, max_epochs=1), name="kept")
    return folder / "studies.db"


def copy_storage(small_study: Path, folder: Path) -> tuple[Path, str]:
    target = folder / "studies.db"
    shutil.copy(small_study, target)
    return target, f"sqlite:///{target}"


@pytest.mark.parametrize(
    "url,masked,secret",
    [
        ("postgresql://ann:s3cret@db:5432/fm", "postgresql://ann:***@db:5432/fm", "s3cret"),
        ("postgresql://ann:p@ss@db/fm", "postgresql://ann:***@db/fm", "p@ss"),  # SQLAlchemy reads "p"
        ("postgresql://ann:pa%40ss@db/fm", "postgresql://ann:***@db/fm", "pa@ss"),
        ("postgresql://ann:p:w/x@db:5432/fm", "postgresql://ann:***@db:5432/fm", "p:w/x"),
        ("postgresql://ann@db/fm?password=s3cret", "postgresql://ann@db/fm?password=***", "s3cret"),
        ("postgresql://db/fm?ssl=1&PWD=s3cret", "postgresql://db/fm?ssl=1&PWD=***", "s3cret"),
        ("sqlite:///results/studies.db", "sqlite:///results/studies.db", None),
    ],
)
def test_every_form_of_password_is_masked_and_scrubbed(url, masked, secret):
    assert storage.mask(url) == masked
    echoed = storage.scrub(f"connection to {url} failed: password {secret} rejected", url)
    assert echoed.startswith(f"connection to {masked} failed") and (secret is None or secret not in echoed)


def test_make_never_echoes_the_storage_password():
    make = shutil.which("make")
    if make is None:
        pytest.skip("no make")
    url = f"postgresql://ann:{PASSWORD}@db/fm"
    for target in ("study", "report", "dashboard"):
        result = subprocess.run(
            [make, "-n", target, f"STORAGE={url}"], cwd=REPO, capture_output=True, text=True
        )
        assert result.returncode == 0 and "fmsearch" in result.stdout
        assert PASSWORD not in result.stdout + result.stderr
    help_text = subprocess.run([make, "help", f"STORAGE={url}"], cwd=REPO, capture_output=True, text=True)
    assert PASSWORD not in help_text.stdout


def test_a_read_only_sqlite_file_is_one_line_and_keeps_its_trials(small_study, tmp_path):
    path, url = copy_storage(small_study, tmp_path)
    before = finished_counts(url)
    if os.geteuid() == 0:  # root writes through file modes: make the file immutable instead
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
            pytest.skip("running as root on a file system without chattr +i")
    else:
        path.chmod(0o444)
        tmp_path.chmod(0o555)
    try:
        result = fmsearch("study", SMOKE, "--device", "cpu", "--storage", url, cwd=tmp_path, env=os.environ)
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        else:
            tmp_path.chmod(0o755)
            path.chmod(0o644)
    line = one_line_error(result, "study")
    assert line == (
        f"fmsearch study: error: storage {url} is read-only (attempt to write a readonly database): "
        "make the file and its folder writable, or use another; finished trials stay in it"
    )
    assert finished_counts(url) == before == {"kept/labels=100%": 2}


def test_a_database_locked_past_the_busy_timeout_is_one_line(small_study, tmp_path):
    path, url = copy_storage(small_study, tmp_path)
    before = finished_counts(url)
    holder = sqlite3.connect(path)
    holder.execute("BEGIN EXCLUSIVE")  # another process writing, for longer than the 1 s we wait
    try:
        started = time.monotonic()
        result = fmsearch(
            "study", SMOKE, "--device", "cpu", "--storage", f"{url}?timeout=1", cwd=tmp_path, env=os.environ
        )
        waited = time.monotonic() - started
    finally:
        holder.rollback()
        holder.close()
    line = one_line_error(result, "study")
    assert "stayed locked by another process past the busy timeout (database is locked)" in line
    assert "raise ?timeout= in the URL" in line and waited < 120
    assert finished_counts(url) == before


# The unroutable host is given a 2 s connect timeout in its URL, so that the test waits 2 s, not 10.
@pytest.mark.parametrize(
    "host", ["127.0.0.1:{port}/fm", "192.0.2.1:5432/fm?connect_timeout=2"], ids=["refused", "unroutable"]
)
def test_an_unreachable_postgresql_is_one_line_without_the_password_and_does_not_hang(tmp_path, host):
    pytest.importorskip("psycopg", reason="no psycopg: `make setup` installs the postgres extra")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql://fmsearch:{PASSWORD}@{host.format(port=port)}"
    started = time.monotonic()
    result = fmsearch(
        "study", SMOKE, "--device", "cpu", cwd=tmp_path, env={**os.environ, storage.ENV_URL: url}
    )
    assert time.monotonic() - started < 30  # the connect timeout, plus starting Python
    line = one_line_error(result, "study")
    assert PASSWORD not in result.stdout + result.stderr
    assert line.startswith(f"fmsearch study: error: storage {storage.mask(url)} ")
    assert "is unreachable" in line or "did not answer within the connect timeout" in line


def test_postgresql_connections_time_out_after_10_s_unless_the_url_says_otherwise():
    default = storage._engine_kwargs(f"postgresql://fmsearch:{PASSWORD}@dbhost/fm")
    assert default["connect_args"] == {"connect_timeout": storage.CONNECT_TIMEOUT}
    assert "connect_args" not in storage._engine_kwargs("postgresql://fmsearch@dbhost/fm?connect_timeout=2")


CLI = "import sys; from fmsearch.cli import main; sys.exit(main(sys.argv[1:]))"


def _with_file_size_limit(limit: int, code: str) -> list[str]:
    """A Python command whose files may not grow past `limit` bytes, as on a disk that is full.

    The limit is set by the child itself: a `preexec_fn` can deadlock a threaded parent such as a
    pytest-xdist worker, between fork and exec.
    """
    limit_code = f"import resource; resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
    return [sys.executable, "-c", limit_code + code]


def test_a_full_disk_while_writing_figures_is_one_line_and_keeps_the_last_report(small_study, tmp_path):
    _, url = copy_storage(small_study, tmp_path)
    first = fmsearch("report", "kept", "--storage", url, cwd=tmp_path, env=os.environ)
    assert first.returncode == 0, first.stderr
    out = tmp_path / "results" / "kept"
    written = {p.name: p.read_bytes() for p in out.iterdir()}
    before = finished_counts(url)
    result = subprocess.run(
        [*_with_file_size_limit(20_000, CLI), "report", "kept", "--storage", url],
        cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    line = one_line_error(result, "report")
    assert line.startswith(
        f"fmsearch report: error: cannot write {Path('results/kept/curves.png')} (File too large)"
    )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == written  # whole old files, no debris
    assert finished_counts(url) == before


WEIGHTS_SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
from pathlib import Path
from fmsearch import storage
from fmsearch.study import StudyError
from tests.conftest import run_tiny_study, study_text, write_tiny_fashion_mnist
tiny = write_tiny_fashion_mnist(Path({folder!r}) / "data")
try:
    run_tiny_study(Path({folder!r}), tiny, study_text(trials=2, max_epochs=1), name="fresh")
except Exception as error:  # what `fmsearch study` prints
    print(storage.fault_message(error, {url!r}) if storage.is_fault(error) else error, file=sys.stderr)
    sys.exit(1)
"""


def test_a_full_disk_while_saving_weights_stops_with_one_line_and_loses_no_finished_trial(
    small_study, tmp_path
):
    path, url = copy_storage(small_study, tmp_path)
    (tmp_path / "data").mkdir()
    before = finished_counts(url)
    script = WEIGHTS_SCRIPT.format(repo=str(REPO), folder=str(tmp_path), url=url)
    # Room for the data and a trial's records, not for the database to grow by a 1.7 MB state dict.
    limit = path.stat().st_size + 300_000
    result = subprocess.run(
        _with_file_size_limit(limit, script), capture_output=True, text=True,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("storage ")]
    assert lines == [
        f"storage {url} could not write to its disk (a full or failing disk) (disk I/O error): "
        "free disk space or check the disk, then rerun; finished trials stay in it"
    ], result.stderr[-3000:]
    after = finished_counts(url)
    assert after["kept/labels=100%"] == before["kept/labels=100%"] == 2
    fresh = optuna.load_study(study_name="fresh/labels=100%", storage=url).trials
    assert [t.state for t in fresh] == [TrialState.FAIL]  # marked at once, not left RUNNING


@needs_real_data
@pytest.mark.slow
def test_postgresql_going_away_mid_study_is_one_line_and_a_rerun_finishes(
    postgres_server, postgres_url, tmp_path
):
    study_file = tmp_path / "scale.toml"
    study_file.write_text(
        # enough epochs that a trial is still training for a few polls after another finished: at 2, a
        # fast CPU (bf16, 2026-12) finished the whole study between two polls
        SCALE_STUDY.replace("max_epochs = 3", "max_epochs = 8").replace("[1.0, 0.5]", "[1.0]")
    )
    env = cli_env(postgres_url)
    command = worker_command(study_file)
    worker = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 900
    before = None
    while before is None and time.monotonic() < deadline:  # stop the server part-way through a later trial
        time.sleep(0.1)
        assert worker.poll() is None, worker.stderr.read()[-3000:]
        try:
            trials = optuna.load_study(study_name=SCALE_NAMES[0], storage=postgres_url).trials
        except KeyError:
            continue
        if any(t.state == TrialState.RUNNING and t.intermediate_values for t in trials) and any(
            storage.is_finished(t) for t in trials
        ):
            before = sum(map(storage.is_finished, trials))
            postgres_server.stop("immediate")
    assert before is not None, "no trial got past its first epoch after a finished one"
    try:
        out, err = worker.communicate(timeout=120)
    finally:
        postgres_server.start()
    lines = messages(err)
    assert worker.returncode == 1 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith(
        f"fmsearch study: error: storage {storage.mask(postgres_url)} went away mid-study"
    )
    assert postgres_server.password not in out + err
    trials = optuna.load_study(study_name=SCALE_NAMES[0], storage=postgres_url).trials
    assert sum(map(storage.is_finished, trials)) == before  # nothing finished was lost
    print(f"\nserver stopped mid-study with {before} finished: {lines[0]} (exit {worker.returncode})")
    rerun = fmsearch("study", str(study_file), "--device", "cpu", "--heartbeat", "1", cwd=tmp_path, env=env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    trials = optuna.load_study(study_name=SCALE_NAMES[0], storage=postgres_url).trials
    assert sum(map(storage.is_finished, trials)) == 3
    print(f"after the rerun: {[(t.number, t.state.name) for t in trials]}")


def _gate_is_bounded(url: str) -> None:
    rdb = storage.open_storage(url)
    holder = storage.Gate(rdb, "bounded/labels=100%")
    holder.acquire()  # a worker that took the gate, then was stopped (Ctrl-Z) before starting its trial
    waiter = storage.Gate(rdb, "bounded/labels=100%", timeout=0.5)
    started = time.monotonic()
    with pytest.raises(storage.GateTimeout, match=r"bounded/labels=100%: waited 0 s .* may be stopped"):
        waiter.acquire()
    assert time.monotonic() - started < 5
    with storage.Gate(rdb, "bounded/labels=50%", timeout=0.5):  # another study's gate is free
        pass
    holder.release()
    with waiter:  # free again
        pass


def test_a_stopped_holder_of_the_sqlite_gate_stalls_the_others_only_up_to_the_bound(tmp_path):
    _gate_is_bounded(f"sqlite:///{tmp_path}/s.db")


def test_a_stopped_holder_of_the_postgresql_gate_stalls_the_others_only_up_to_the_bound(postgres_url):
    _gate_is_bounded(postgres_url)


def test_a_retried_trial_keeps_none_of_the_dead_attempts_records_and_scores_its_own_weights(tmp_path):
    """Optuna's retry copies the dead attempt's user attributes and artifact links; the weights a
    study scores must be provably the retry's own."""
    import torch

    rdb = storage.open_storage(f"sqlite:///{tmp_path}/s.db", heartbeat_interval=1, grace_period=1)
    artifacts = storage.DatabaseArtifactStore(rdb)
    study = optuna.create_study(study_name="retried", storage=rdb, direction="maximize")
    storage.join(rdb, "retried")
    dead = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)})
    storage.keep_weights(artifacts, dead, {"w": torch.tensor([1.0])})  # then its worker dies
    dead.set_user_attr(storage.Attr.HISTORY, [{"epoch": 1}])
    time.sleep(1.5)
    storage.fail_heartbeatless_trials(study)
    retry = study.ask()
    started = study.trials[retry.number]
    assert started.system_attrs["failed_trial"] == dead.number and started.params == dead.params
    assert started.user_attrs == {} and not any(k.startswith("artifacts:") for k in started.system_attrs)
    storage.keep_weights(artifacts, retry, {"w": torch.tensor([2.0])})
    study.tell(retry, 0.5)
    body = storage.kept_weights(artifacts, study, study.trials[retry.number])
    assert torch.load(io.BytesIO(body), weights_only=True)["w"].item() == 2.0
    # a record that names another trial (copied from an attempt) is not this trial's weights
    other = study.trials[retry.number]
    other.user_attrs[storage.Attr.WEIGHTS] = {"trial": dead.number, "artifact": "x"}
    assert (
        torch.load(io.BytesIO(storage.kept_weights(artifacts, study, other)), weights_only=True)["w"] == 2.0
    )


def test_a_failed_heartbeat_write_is_reported_and_the_heartbeat_goes_on(tmp_path):
    """Optuna's heartbeat thread ends at its first failed write, leaving a live trial to be failed as
    stale by another worker. Here the database is locked past the busy timeout for one beat."""
    from optuna.storages._heartbeat import HeartbeatThread

    url = f"sqlite:///{tmp_path}/s.db"
    rdb = storage.Storage(
        url, engine_kwargs={"connect_args": {"timeout": 0.2}}, heartbeat_interval=1, grace_period=4
    )
    study = optuna.create_study(study_name="beats", storage=rdb)
    trial = study.ask()
    beats = HeartbeatThread(trial._trial_id, rdb)
    beats.start()
    time.sleep(0.5)
    lock = sqlite3.connect(tmp_path / "s.db")
    lock.execute("BEGIN EXCLUSIVE")
    time.sleep(2.5)
    trouble = rdb.heartbeat_trouble(trial._trial_id)
    assert trouble and "database is locked" in trouble, trouble
    lock.rollback()
    time.sleep(1.5)
    assert beats._thread.is_alive() and rdb.heartbeat_trouble(trial._trial_id) is None
    beats.join()
