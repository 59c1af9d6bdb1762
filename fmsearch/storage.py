"""Where a study is kept: the Optuna storage, its artifacts, and the files written under results/.

study.py writes and report.py reads the same user attributes (`Attr`), counts trials with the same
`is_finished`, and keeps weights and figures in the same database (`DatabaseArtifactStore`), so any
machine that reaches the storage can score a best trial or serve a figure. Storage faults become one
line that names the storage with its password hidden (`fault_message`).
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import errno
import fcntl
import hashlib
import io
import os
import re
import tempfile
import threading
import time
import traceback
import urllib.parse
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, BinaryIO

import optuna
import sqlalchemy as sa
from optuna.artifacts import get_all_artifact_meta, upload_artifact
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from fmsearch import files
from fmsearch.errors import FmsearchError

DEFAULT_URL = "sqlite:///results/studies.db"
ENV_URL = "FMSEARCH_STORAGE"  # keeps a password off the command line and out of `ps`
SQLITE_BUSY_TIMEOUT = 120  # seconds a writer waits for another instead of failing "database is locked"
CONNECT_TIMEOUT = 10  # seconds before an unreachable PostgreSQL server is reported, not waited on
DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS)  # a write that cannot fit
WEIGHTS_FILE = "weights.pt"  # a trial's best-epoch state dict, as an artifact of the trial


class Attr:
    """User-attribute keys: what study.py records and report.py reads back."""

    # on each condition's study
    DESCRIPTION = "description"
    FINGERPRINT = "fingerprint"  # everything that gives a trial its meaning; see lineage.fingerprint
    # written beside the fingerprint by fmsearch before 2026-12; read only from such older studies
    CONDITION = "condition"
    FIXED = "fixed"
    MAX_EPOCHS = "max_epochs"
    BATCH_SIZE = "batch_size"
    ARCHIVED_FROM = "archived_from"
    WORKERS_JOINED = "workers_joined"  # how many workers, on every machine, have joined it
    HEARTBEAT = "heartbeat"  # {"interval", "grace"} in seconds, for every worker: the first joiner's
    TEST = "test"  # the best trial's test-set score
    # on each trial
    CONFIG = "config"
    HISTORY = "history"
    STOP_REASON = "stop_reason"
    BEST_EPOCH = "best_epoch"
    SECONDS = "seconds"
    EXECUTION = "execution"  # speed.Execution: how the trial ran (chosen for its machine, or forced)
    IMAGES_PER_SECOND = "images_per_second"  # the median epoch's training rate
    LABELED_IMAGES = "labeled_images"  # labeled images the run trained on (not the config's request)
    TEACHER_TEAM = "teacher_team"  # distill's teachers: count, cost and accuracies (runner.teachers_record)
    ERROR = "error"
    SAMPLER_SEED = "sampler_seed"  # its worker's: every worker on every machine draws its own
    COMMAND = "command"  # a confirmation rerun's: the `fmsearch confirm` run that claimed it (confirm.py)
    # on each trial of a confirmation study (confirm.py): the search trial it reruns; its TEST score
    SOURCE_TRIAL = "source_trial"
    WEIGHTS = "weights"  # {"trial": number, "artifact": id}: the weights this trial itself stored


# A run's stop_reason (Attr.STOP_REASON): how it ended.
MAX_EPOCHS = "max-epochs"  # ran every epoch
EARLY_STOPPED = "early-stopped"  # its monitor stopped improving for `patience` epochs
AT_CHANCE = "at-chance"  # its outputs stayed uniform (a dead network): stopped, a result, it counts
PRUNED = "pruned"  # the pruner judged it behind the others
DIVERGED = "diverged"  # its loss became NaN: a result, it counts
CRASHED = "crashed"  # it raised: not a result, it does not count
INTERRUPTED = "interrupted"  # Ctrl-C: it does not count
STALE = "stale"  # its worker died (no heartbeat): it does not count


def best_trial(trials: list[FrozenTrial]) -> FrozenTrial | None:
    """The best complete trial, the one a condition's answer is: the highest value, and of equal
    values the first to run. The test score, the kept weights and the report all name this one."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    return max(complete, key=lambda t: (t.value, -t.number)) if complete else None


def study_setting(study: optuna.Study, name: str, default: Any = None) -> Any:
    """A setting a condition's study was created with (`condition`, `fixed`, `max_epochs`, ...): from
    its fingerprint, else from the attribute of that name that older studies carry."""
    recorded = study.user_attrs.get(Attr.FINGERPRINT) or {}
    return recorded[name] if name in recorded else study.user_attrs.get(name, default)


@dataclass(frozen=True)
class BestTrialScore:
    """The best trial's one test-set score, kept on its condition's study (Attr.TEST)."""

    trial: int
    val_accuracy: float
    test_loss: float
    test_accuracy: float
    confusion: list[list[int]]  # rows: true class, columns: predicted
    classes: list[str]

    def save(self, study: optuna.Study) -> None:
        study.set_user_attr(Attr.TEST, asdict(self))

    @classmethod
    def of(cls, study: optuna.Study | optuna.study.StudySummary) -> BestTrialScore | None:
        """The study's score, or None where it has none or holds one of another shape (an older
        fmsearch's): `fmsearch study` then scores the best trial again."""
        record = study.user_attrs.get(Attr.TEST)
        if not isinstance(record, dict) or set(record) != {f.name for f in fields(cls)}:
            return None
        return cls(**record)


class StorageError(FmsearchError):
    """A storage cannot be used as asked; the message names it (password hidden) and the fix."""


class GateTimeout(StorageError):
    """A worker waited too long for a study's gate: another worker holds it and does not go on."""


def is_finished(trial: FrozenTrial) -> bool:
    """Counts toward a condition's trials: complete, pruned, or failed by divergence (not by a crash)."""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and trial.user_attrs.get(Attr.STOP_REASON) == DIVERGED


SECRET_KEYS = ("password", "passwd", "pwd", "pass")  # query keys whose value is a password


def mask(url: str) -> str:
    """The URL with every password replaced by ***, for every line a user or a log may see.

    Taken apart by hand rather than by SQLAlchemy, which reads `user:p@ss@host` as the password "p"
    and keeps a `?password=` query as it is: everything between the user's colon and the last "@"
    of the address is hidden, and so is the value of each password key in the query.
    """
    scheme, found, rest = url.partition("://")
    if not found:
        return url
    address, question, query = rest.partition("?")
    at = address.rfind("@")
    if at >= 0 and ":" in address[:at]:
        address = f"{address[: address.index(':')]}:***{address[at:]}"
    if question:
        query = "&".join(_masked_pair(pair) for pair in query.split("&"))
    return f"{scheme}://{address}{question}{query}"


def _masked_pair(pair: str) -> str:
    key, equals, value = pair.partition("=")
    return f"{key}=***" if equals and value and key.lower() in SECRET_KEYS else pair


def _secrets(url: str) -> list[str]:
    """Each password the URL carries, raw and decoded, as SQLAlchemy or a driver might echo it."""
    found = set()
    _, _, rest = url.partition("://")
    address, _, query = rest.partition("?")
    at = address.rfind("@")
    if at >= 0 and ":" in address[:at]:
        found.add(address[address.index(":") + 1 : at])
    for pair in query.split("&") if query else ():
        key, _, value = pair.partition("=")
        if key.lower() in SECRET_KEYS:
            found.add(value)
    with contextlib.suppress(Exception):  # not a URL SQLAlchemy reads
        parsed = sa.engine.make_url(url).password or ""
        if not any(parsed in secret for secret in found):  # it reads `user:p@ss@host` as "p"
            found.add(parsed)
    found |= {urllib.parse.unquote(secret) for secret in found}
    return sorted((secret for secret in found if secret), key=len, reverse=True)


def scrub(text: str, url: str) -> str:
    """`text` with the URL's passwords hidden wherever they appear (drivers may echo the URL)."""
    for secret in _secrets(url):
        text = text.replace(secret, "***")
    return text


def default_url() -> str:
    return os.environ.get(ENV_URL) or DEFAULT_URL


def check_url(url: str) -> str:
    """Refuse a URL no worker or rerun could share; raises StorageError with the fix."""
    try:
        parsed = sa.engine.make_url(url)
    except Exception:
        raise StorageError(
            f"{mask(url)!r} is not a storage URL: use sqlite:///results/studies.db "
            "or postgresql://user@host/db (password in $FMSEARCH_STORAGE)"
        ) from None
    if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise StorageError(
            f"{mask(url)!r} is an in-memory database that workers, reruns and reports cannot see: "
            "use a file, e.g. sqlite:///results/studies.db"
        )
    return url


def _engine_kwargs(url: str) -> dict[str, Any]:
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database:
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        if "timeout" in parsed.query:  # sqlite:///x.db?timeout=5 sets the busy timeout itself
            return {}
        return {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT}}
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if parsed.get_backend_name() == "postgresql" and "connect_timeout" not in parsed.query:
        kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT}
    return kwargs


class Storage(RDBStorage):
    """Optuna's RDB storage, whose heartbeat outlives a failed write.

    Optuna's heartbeat thread ends for good at its first exception, and `quiet_background_faults`
    keeps that quiet, so one dropped connection would leave a live trial to be failed as stale. Here
    a failed write is remembered (`heartbeat_trouble`) and the next beat, an interval later, tries again.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._heartbeat_faults: dict[int, tuple[float, str]] = {}  # trial id -> (since, error)

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            super().record_heartbeat(trial_id)
        except Exception as error:
            if not is_fault(error):
                raise
            since = self._heartbeat_faults.get(trial_id, (time.monotonic(), ""))[0]
            self._heartbeat_faults[trial_id] = (since, _root_message(error).splitlines()[0])
        else:
            self._heartbeat_faults.pop(trial_id, None)

    def heartbeat_trouble(self, trial_id: int) -> str | None:
        """Why this trial's heartbeat has not been written lately, or None while it beats."""
        if trial_id not in self._heartbeat_faults:
            return None
        since, error = self._heartbeat_faults[trial_id]
        return (
            f"its heartbeat could not be written for {time.monotonic() - since:.0f} s ({error}); past "
            f"{self.grace_period} s another worker may fail it and run it again"
        )


def open_storage(
    url: str, heartbeat_interval: int | None = None, grace_period: int | None = None, retry: bool = True
) -> Storage:
    """RDB storage with a heartbeat: a trial whose process died is failed, then (`retry`) retried up to
    3 times."""
    check_url(url)
    retry = RetryAfresh(max_retry=3) if heartbeat_interval and retry else None
    try:
        for attempt in range(3):
            try:
                return Storage(
                    url,
                    engine_kwargs=_engine_kwargs(url),
                    heartbeat_interval=heartbeat_interval,
                    grace_period=grace_period,
                    heartbeat_stale_trial_callback=retry,
                )
            except (sa.exc.IntegrityError, sa.exc.ProgrammingError):
                if attempt == 2:
                    raise
                time.sleep(0.5 + attempt)  # workers on several machines created the schema at once
    except ImportError:  # Optuna's, for an absent driver
        raise StorageError(
            f"cannot open storage {mask(url)!r}: its database driver is not installed; "
            "use sqlite:///path.db, or postgresql://user@host/db after pip install -e '.[postgres]'"
        ) from None
    except sa.exc.ArgumentError as error:
        raise StorageError(
            f"cannot open storage {mask(url)!r} ({scrub(str(error), url).splitlines()[0]}); "
            "use sqlite:///path.db or postgresql://user@host/db (pip install -e '.[postgres]')"
        ) from None
    except Exception as error:
        if is_fault(error):
            raise StorageError(fault_message(error, url, starting=True)) from None
        raise


def is_fault(error: BaseException) -> bool:
    """A database or connection failure, raised directly or wrapped by Optuna."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, sa.exc.SQLAlchemyError | optuna.exceptions.StorageInternalError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def quiet_optuna() -> None:
    """Keep Optuna's own logging and experimental/deprecation warnings out of the terminal."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module="optuna")


def quiet_background_faults() -> None:
    """Leave a storage fault in a background thread (Optuna's heartbeat) to the main thread to report.

    Without this, a database that goes away prints the heartbeat thread's traceback first.
    """
    if getattr(threading.excepthook, "fmsearch", False):
        return
    default = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_value is None or not is_fault(args.exc_value):
            default(args)

    hook.fmsearch = True  # type: ignore[attr-defined]
    threading.excepthook = hook


def _root_message(error: BaseException) -> str:
    """The driver's own message, under SQLAlchemy's and Optuna's wrappers."""
    seen: BaseException = error
    while True:
        if isinstance(seen, sa.exc.DBAPIError) and seen.orig is not None:
            seen = seen.orig
            break
        nxt = seen.__cause__ or seen.__context__
        if nxt is None:
            break
        seen = nxt
    lines = [line.strip() for line in str(seen).splitlines() if line.strip()]
    return " ".join(lines[:2]) if lines else type(seen).__name__


# (pattern in the driver's message, what it means, what to do), first match wins
_FAULTS = (
    (r"readonly database|read-only", "is read-only", "make the file and its folder writable, or use another"),
    (
        r"database is locked",
        "stayed locked by another process past the busy timeout",
        "let the other writer finish, or raise ?timeout= in the URL",
    ),
    (r"disk is full|no space left|file too large", "has no room to write", "free disk space, then rerun"),
    (
        r"disk i/o error",
        "could not write to its disk (a full or failing disk)",
        "free disk space or check the disk, then rerun",
    ),
    (r"unable to open database file", "cannot be opened", "check that its folder exists and is writable"),
    (r"password authentication failed|authentication", "refused the login", "check the user and password"),
    (r"database .* does not exist", "has no such database", "create it (createdb) or fix the name"),
    (
        r"timeout expired|timed out",
        "did not answer within the connect timeout",
        "check the host, port and firewall, then rerun",
    ),
)
# A lost or refused connection: unreachable when opening the storage, gone when it was in use.
_CONNECTION = (
    r"terminating connection|server closed the connection|connection.*(lost|closed|reset|refused)|"
    r"consuming input failed|ssl syscall|shutting down|could not connect|connection failed|no route|"
    r"name or service not known"
)


def fault_message(error: BaseException, url: str, starting: bool = False) -> str:
    """One line: which storage failed (password hidden), what happened, and what to do.

    `starting`: the storage was being opened, so a dropped connection means it is unreachable.
    """
    detail = scrub(_root_message(error), url)
    faults = [
        *_FAULTS,
        (_CONNECTION, "is unreachable", "start the database server or fix the host and port, then rerun")
        if starting
        else (_CONNECTION, "went away mid-study", "rerun when it is back (the interrupted trial is retried)"),
    ]
    for pattern, meaning, fix in faults:
        if re.search(pattern, detail, flags=re.IGNORECASE):
            return f"storage {mask(url)} {meaning} ({detail}): {fix}; finished trials stay in it"
    return f"storage {mask(url)} failed ({detail}): check it, then rerun; finished trials stay in it"


_ARTIFACTS = sa.Table(
    "fmsearch_artifacts",
    sa.MetaData(),
    sa.Column("artifact_id", sa.String(64), primary_key=True),
    sa.Column("body", sa.LargeBinary, nullable=False),
)


class DatabaseArtifactStore:
    """An Optuna artifact store in the study storage's own database (table fmsearch_artifacts).

    Weights and figures live where the trials live: every worker, the report and the dashboard
    read them through the storage URL, on any machine. Optuna links an artifact to its study or
    trial by a system attribute, which copy_study keeps, so an archived study keeps its weights.
    """

    def __init__(self, storage: RDBStorage):
        self.engine = storage.engine
        try:
            _ARTIFACTS.create(self.engine, checkfirst=True)
        except sa.exc.SQLAlchemyError:  # another worker created it at the same moment
            if not sa.inspect(self.engine).has_table(_ARTIFACTS.name):
                raise

    def open_reader(self, artifact_id: str) -> BinaryIO:
        with self.engine.connect() as connection:
            row = connection.execute(
                sa.select(_ARTIFACTS.c.body).where(_ARTIFACTS.c.artifact_id == artifact_id)
            ).first()
        if row is None:
            raise ArtifactNotFound(f"artifact {artifact_id} is not in the storage")
        return io.BytesIO(row[0])

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        body = content_body.read()
        with self.engine.begin() as connection:
            where = _ARTIFACTS.c.artifact_id == artifact_id
            if connection.execute(sa.update(_ARTIFACTS).where(where).values(body=body)).rowcount == 0:
                connection.execute(sa.insert(_ARTIFACTS).values(artifact_id=artifact_id, body=body))

    def remove(self, artifact_id: str) -> None:
        with self.engine.begin() as connection:
            connection.execute(sa.delete(_ARTIFACTS).where(_ARTIFACTS.c.artifact_id == artifact_id))


class RetryAfresh(RetryHeartbeatStaleTrialCallback):
    """Optuna's retry of a dead worker's trial, without what the dead attempt wrote.

    Optuna's callback copies the attempt's user attributes and artifact links to the retry, so a
    retry that crashed early would show the dead attempt's curve, and its weights would sit beside
    the attempt's. The retry keeps the parameters and where it came from (`failed_trial`)."""

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        fresh = copy.deepcopy(trial)
        fresh.user_attrs = {}
        fresh.system_attrs = {k: v for k, v in trial.system_attrs.items() if not k.startswith(ARTIFACT_LINK)}
        super().__call__(study, fresh)


ARTIFACT_LINK = "artifacts:"  # the system-attribute prefix by which Optuna links an artifact to a trial


def keep_weights(artifacts: DatabaseArtifactStore, trial: optuna.Trial, state: dict) -> None:
    """Store a trial's best-epoch weights in the storage, as its artifact WEIGHTS_FILE, and name that
    artifact on the trial (Attr.WEIGHTS) with the trial's number."""
    import torch  # here, not above: the command line's parser imports this module without torch

    with tempfile.TemporaryDirectory(prefix="fmsearch-") as folder:
        path = Path(folder) / WEIGHTS_FILE
        torch.save(state, path)
        artifact = upload_artifact(artifact_store=artifacts, file_path=str(path), study_or_trial=trial)
    trial.set_user_attr(Attr.WEIGHTS, {"trial": trial.number, "artifact": artifact})


def kept_weights(artifacts: DatabaseArtifactStore, study: optuna.Study, trial: FrozenTrial) -> bytes | None:
    """The weights `keep_weights` stored for this very trial, or None.

    The artifact its Attr.WEIGHTS names, when that record carries this trial's number. A trial
    stored before that record: its last weights link that no earlier attempt of it (a dead worker's,
    whose links Optuna's retry copied) also holds."""
    links = [
        m.artifact_id
        for m in get_all_artifact_meta(trial, storage=study._storage)
        if m.filename == WEIGHTS_FILE
    ]
    record = trial.user_attrs.get(Attr.WEIGHTS)
    if isinstance(record, dict) and record.get("trial") == trial.number:
        return artifacts.open_reader(record["artifact"]).read() if record.get("artifact") in links else None
    attempts = set(trial.system_attrs.get("retry_history", []))
    inherited = {
        key.removeprefix(ARTIFACT_LINK)
        for earlier in study.get_trials(deepcopy=False)
        if earlier.number in attempts
        for key in earlier.system_attrs
        if key.startswith(ARTIFACT_LINK)
    }
    own = [link for link in links if link not in inherited]
    return artifacts.open_reader(own[-1]).read() if own else None


class Gate:
    """Serializes 'count a study's finished trials, then start one' among all its workers.

    Every worker of every command, on any machine, takes it, so together they stop at N trials: a
    worker holds it from counting until its new trial exists, and releasing twice is harmless.
    PostgreSQL: an advisory lock, which the server drops when a killed worker's connection goes.
    SQLite (one machine): an flock on a file beside the database, which the kernel drops likewise.
    A holder that is stopped but alive (Ctrl-Z, a paused VM) keeps it: the wait is bounded
    (`timeout`), and then a GateTimeout names the study and what to check.
    """

    POLL_SECONDS = 0.2

    def __init__(
        self,
        rdb: RDBStorage | DatabaseArtifactStore,
        study_name: str,
        purpose: str = "gate",
        timeout: float = 600.0,
    ):
        """`purpose` names what the lock serializes; other purposes never wait for this one."""
        self.engine = rdb.engine
        self.backend = rdb.engine.url.get_backend_name()
        self.study_name = study_name
        self.purpose = purpose
        self.timeout = timeout
        self._held: Any = None

    def __enter__(self) -> Gate:
        self.acquire()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.release()

    def acquire(self) -> None:
        if self.backend == "postgresql":
            named = self.study_name if self.purpose == "gate" else f"{self.study_name}#{self.purpose}"
            key = int.from_bytes(hashlib.sha1(named.encode()).digest()[:8], "big", signed=True)
            connection = self.engine.connect()
            try:
                self._wait(
                    lambda: connection.execute(
                        sa.text("SELECT pg_try_advisory_lock(:key)"), {"key": key}
                    ).scalar()
                )
            except BaseException:
                connection.close()
                raise
            connection.commit()
            self._held = (connection, key)
        elif self.backend == "sqlite" and self.engine.url.database:
            study = hashlib.sha1(self.study_name.encode()).hexdigest()[:12]  # one lock file per study
            handle = open(f"{self.engine.url.database}.{self.purpose}-{study}", "a")  # noqa: SIM115 (held until release)
            try:
                self._wait(lambda: _try_flock(handle))
            except BaseException:
                handle.close()
                raise
            self._held = handle

    def _wait(self, try_once: Callable[[], bool]) -> None:
        deadline = time.monotonic() + self.timeout
        while not try_once():
            if time.monotonic() > deadline:
                raise GateTimeout(
                    f"{self.study_name}: waited {self.timeout:.0f} s for another worker to finish starting "
                    f"a trial ({self.purpose}): a worker of this study may be stopped (Ctrl-Z, a paused "
                    "machine); resume or end it, then rerun; no trial ran past the study's count"
                )
            time.sleep(self.POLL_SECONDS)

    def release(self) -> None:
        held, self._held = self._held, None
        if held is None:
            return
        if self.backend == "postgresql":
            connection, key = held
            try:
                connection.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                connection.commit()
            finally:
                connection.close()
        else:
            fcntl.flock(held, fcntl.LOCK_UN)
            held.close()


def _try_flock(handle) -> bool:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def fail_heartbeatless_trials(study: optuna.Study) -> None:
    """Fail the RUNNING trials that never sent a heartbeat and started over the grace period ago, and
    have them retried as stale ones are. Their worker died between creating the trial and its first
    heartbeat (the sampler's work falls in that window); Optuna's stale check reads heartbeats only,
    so it would leave them RUNNING for ever, holding a slot of the study's N."""
    backend = getattr(study._storage, "_backend", study._storage)
    if not isinstance(backend, RDBStorage) or backend.get_heartbeat_interval() is None:
        return
    grace = backend.grace_period or 2 * backend.get_heartbeat_interval()  # Optuna's own default
    cutoff = datetime.datetime.now() - datetime.timedelta(seconds=grace)
    old = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if t.datetime_start is not None and t.datetime_start < cutoff
    ]
    if not old:
        return
    query = sa.text("SELECT trial_id FROM trial_heartbeats WHERE trial_id IN :ids").bindparams(
        sa.bindparam("ids", expanding=True)
    )
    with backend.engine.connect() as connection:
        beating = {row[0] for row in connection.execute(query, {"ids": [t._trial_id for t in old]})}
    retry = backend.get_heartbeat_stale_trial_callback()
    for trial in old:
        if trial._trial_id in beating:
            continue  # Optuna's own stale check judges it by its heartbeat
        try:
            failed = study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker failed it first
        if failed and retry is not None:
            retry(study, copy.deepcopy(study._storage.get_trial(trial._trial_id)))


def join(rdb: RDBStorage, name: str) -> int:
    """Join a study as one more worker. Returns a distinct, resume-aware offset to the sampler's seed:
    1000 times its place among every worker that ever joined, on any machine (counted under the gate),
    plus the trials before it. Machines started together would otherwise all draw the same points.

    The heartbeat interval and grace period are the study's, set by its first worker (--heartbeat, and
    4 times that) and taken by every later one, so that a worker started with another --heartbeat
    never fails a live trial early, nor has its own failed."""
    study = optuna.load_study(study_name=name, storage=rdb)
    with Gate(rdb, name):
        if rdb.get_heartbeat_interval() is not None:
            beat = study.user_attrs.get(Attr.HEARTBEAT)
            if beat is None:
                beat = {"interval": rdb.heartbeat_interval, "grace": rdb.grace_period}
                study.set_user_attr(Attr.HEARTBEAT, beat)
            rdb.heartbeat_interval, rdb.grace_period = beat["interval"], beat["grace"]
        joined = study.user_attrs.get(Attr.WORKERS_JOINED, 0)
        study.set_user_attr(Attr.WORKERS_JOINED, joined + 1)
        return 1000 * joined + len(study.get_trials(deepcopy=False))


def keep_traceback(results_dir: Path, name: str, number: int, error: BaseException) -> str:
    """Write a crashed trial's traceback to its log (trial_log_path); ' (traceback in PATH)' to add
    to its one-line reason, or why there is none."""
    log = trial_log_path(results_dir, name, number)
    try:
        files.write_atomic(log, lambda path: path.write_text("".join(traceback.format_exception(error))))
    except OSError:
        return " (its traceback could not be written under results/)"
    return f" (traceback in {log})"


def heartbeat_trouble(trial: optuna.Trial) -> str | None:
    """Why a running trial's heartbeat has not been written lately (see Storage), or None."""
    backend = getattr(trial.study._storage, "_backend", trial.study._storage)
    return backend.heartbeat_trouble(trial._trial_id) if isinstance(backend, Storage) else None


def keep_best_weights(body: bytes, path: Path) -> None:
    """Copy a best trial's weights from the storage to this machine's results folder."""
    try:
        files.write_bytes(path, body)
    except OSError as error:
        raise StorageError(
            f"cannot write {path} ({error.strerror}): free disk space, then rerun; the weights stay in "
            "the storage"
        ) from None


def study_name(spec_name: str, condition: str) -> str:
    """A condition's Optuna study name: 'semi' and 'labels=10%' -> 'semi/labels=10%'; no condition,
    the study file's name alone."""
    return f"{spec_name}/{condition}" if condition else spec_name


CONFIRM = "@confirm"  # a spec name's suffix for its confirmation studies (confirm_name)


def confirm_name(name: str) -> str:
    """The confirmation study of a condition: 'semi/labels=10%' -> 'semi@confirm/labels=10%'."""
    spec_name, condition = study_name_parts(name)
    return study_name(spec_name + CONFIRM, condition)


def confirmation_reruns(study: optuna.Study, source_trial: int) -> dict[int, FrozenTrial]:
    """Seed -> the finished, test-scored confirmation rerun of `source_trial` of a condition's study
    (confirm.py), read from its '<spec>@confirm/<condition>' study; {} where there is none."""
    try:
        reruns = optuna.load_study(study_name=confirm_name(study.study_name), storage=study._storage)
    except KeyError:
        return {}
    done = {}
    for trial in reruns.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if trial.user_attrs.get(Attr.SOURCE_TRIAL) == source_trial and Attr.TEST in trial.user_attrs:
            done[trial.user_attrs[Attr.CONFIG]["seed"]] = trial
    return done


def unselected(trial: FrozenTrial) -> bool:
    """A trial that searched nothing (a study of fixed configurations, one trial per condition): no
    choice among trials made it look good, so its own test score counts as a confirmation seed."""
    return not trial.distributions


def confirmed_scores(study: optuna.Study, source_trial: int) -> dict[int, float]:
    """Seed -> test accuracy of the confirmation reruns of `source_trial` (confirmation_reruns)."""
    reruns = confirmation_reruns(study, source_trial)
    return {seed: trial.user_attrs[Attr.TEST]["test_accuracy"] for seed, trial in reruns.items()}


def study_name_parts(name: str) -> tuple[str, str]:
    """'semi/labels=10%' -> ('semi', 'labels=10%'); 'smoke' -> ('smoke', '')."""
    spec_name, _, condition = name.partition("/")
    return spec_name, condition


def slug(name: str) -> str:
    """A file-system name for a study: 'semi/labels=10%' -> 'labels-10pct'."""
    condition = study_name_parts(name)[1] or "all"
    return re.sub(r"[^A-Za-z0-9.]+", "-", condition.replace("%", "pct")).strip("-")


def best_weights_path(results_dir: Path, name: str) -> Path:
    """results/<spec>/<condition>-best.pt: the best trial's weights, copied out of the storage."""
    return Path(results_dir) / study_name_parts(name)[0] / f"{slug(name)}-best.pt"


def trial_log_path(results_dir: Path, name: str, number: int) -> Path:
    """results/<spec>/logs/<condition>-trial-N.log: the traceback of a trial that raised."""
    return Path(results_dir) / study_name_parts(name)[0] / "logs" / f"{slug(name)}-trial-{number}.log"
