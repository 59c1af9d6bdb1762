"""Optuna glue: one study per condition, its fingerprint, the objective, workers, the test evaluation.

The whole integration is in `Objective.__call__`: suggest a config through spec.suggest, hand
engine.fit an epoch hook that reports validation accuracy and asks the pruner, record what
happened as user attributes, and return the best epoch's value.
"""

from __future__ import annotations

import ctypes
import errno
import io
import json
import multiprocessing
import os
import re
import signal
import socket
import statistics
import subprocess
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import optuna
import torch
from optuna.artifacts import get_all_artifact_meta, upload_artifact
from optuna.storages import fail_stale_trials
from optuna.trial import FrozenTrial, TrialState
from sklearn.metrics import confusion_matrix

from fmsearch import data, engine, speed, storage, teachers
from fmsearch.errors import FmsearchError
from fmsearch.models import build_model
from fmsearch.spec import Categorical, StudySpec, suggest
from fmsearch.storage import CRASHED, DIVERGED, Attr, StorageError, is_finished

MAX_CONSECUTIVE_CRASHES = 3  # a worker stops after this many trials in a row raised an error
DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS)


class StudyError(FmsearchError):
    """A study cannot run as asked (a changed study file, crashing trials, ...); the message says the fix."""


class StudyChanged(StudyError):
    """A condition's stored trials were run with other settings than the study file now gives."""


class TrialCrashed(RuntimeError):
    """A trial raised an unexpected error; it is recorded on the trial and the study goes on."""


@dataclass(frozen=True)
class RunOptions:
    storage: str = storage.DEFAULT_URL
    jobs: int = 1  # worker processes
    device: str = "cpu"  # resolved once by the caller (engine.resolve_device)
    results_dir: Path = Path("results")
    heartbeat_interval: int = 5  # seconds between a running trial's heartbeats
    grace_period: int = 20  # seconds without a heartbeat before a trial counts as dead
    data_config: data.DataConfig = field(
        default_factory=data.DataConfig
    )  # the spec's pool_limit applies on top


@dataclass
class TrialOutcome:
    study_name: str
    number: int
    state: str  # COMPLETE, PRUNED or FAIL
    value: float | None
    params: dict[str, Any]
    stop_reason: str
    best_epoch: int | None
    seconds: float | None
    error: str | None = None


@dataclass
class ConditionSummary:
    study_name: str
    states: Counter = field(default_factory=Counter)
    best_value: float | None = None
    best_params: dict[str, Any] = field(default_factory=dict)
    best_trial: int | None = None
    test: dict[str, Any] | None = None


class TrialProgress(Protocol):
    def epoch_start(self, epoch: int, steps: int) -> None: ...
    def step(self) -> None: ...
    def epoch_end(self, metrics: dict) -> None: ...
    def close(self) -> None: ...


class Reporter(Protocol):
    """How a run shows itself; the CLI implements it, tests may collect events."""

    def trial_progress(self, study_name: str, number: int, max_epochs: int) -> TrialProgress: ...
    def trial_end(self, outcome: TrialOutcome) -> None: ...


def quiet_optuna() -> None:
    """Keep Optuna's own logging and experimental/deprecation warnings out of the terminal."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module="optuna")


def make_sampler(spec: StudySpec, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    seed = spec.sampler.seed + seed_offset
    if spec.sampler.name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(
        seed=seed,
        multivariate=spec.sampler.multivariate,
        group=spec.sampler.multivariate,  # needed for conditional dimensions under multivariate
        n_startup_trials=spec.sampler.startup_trials,
        constant_liar=True,  # parallel workers don't all sample the same point
    )


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    p = spec.pruner
    if p.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.startup_trials, n_warmup_steps=p.warmup_epochs)
    if p.name == "percentile":
        return optuna.pruners.PercentilePruner(
            p.percentile, n_startup_trials=p.startup_trials, n_warmup_steps=p.warmup_epochs
        )
    if p.name == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=max(1, p.warmup_epochs), max_resource=spec.max_epochs
        )
    return optuna.pruners.NopPruner()


def slug(study_name: str) -> str:
    """A file-system name for a study: 'semi/labels=10%' -> 'labels-10pct'."""
    tail = study_name.split("/", 1)[1] if "/" in study_name else "all"
    return re.sub(r"[^A-Za-z0-9.]+", "-", tail.replace("%", "pct")).strip("-")


def best_weights_path(results_dir: Path, study_name: str) -> Path:
    """results/<spec>/<condition>-best.pt: the best trial's weights, copied out of the storage."""
    return Path(results_dir) / study_name.split("/", 1)[0] / f"{slug(study_name)}-best.pt"


def trial_log_path(results_dir: Path, study_name: str, number: int) -> Path:
    """results/<spec>/logs/<condition>-trial-N.log: the traceback of a trial that raised."""
    return Path(results_dir) / study_name.split("/", 1)[0] / "logs" / f"{slug(study_name)}-trial-{number}.log"


def _git_revision() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def data_config(spec: StudySpec, options: RunOptions) -> data.DataConfig:
    """The data a study trains on: the run's data config with the spec's pool_limit on top."""
    if spec.pool_limit is None:
        return options.data_config
    return replace(options.data_config, pool_limit=spec.pool_limit)


def load_splits(spec: StudySpec, options: RunOptions) -> data.Splits:
    return data.load_splits(data_config(spec, options), torch.device(options.device))


def fingerprint(spec: StudySpec, condition: dict[str, Any], options: RunOptions) -> dict[str, Any]:
    """Everything that gives a condition's trials their meaning, as JSON-ready values.

    The number of trials is left out on purpose: raising it continues the same study.
    """
    config = data_config(spec, options)
    record = {
        "condition": condition,
        "fixed": spec.fixed,
        "space": {name: asdict(dimension) for name, dimension in spec.space.items()},
        "max_epochs": spec.max_epochs,
        "batch_size": spec.batch_size,
        "patience": spec.patience,
        "metric": spec.metric,
        "pruner": asdict(spec.pruner),
        "sampler": asdict(spec.sampler),
        "data": {
            "pool_limit": config.pool_limit,
            "val_size": config.val_size,
            "split_seed": config.split_seed,
        },
    }
    return json.loads(json.dumps(record))  # tuples -> lists, as the storage gives them back


def fingerprint_changes(old: Any, new: Any, key: str = "") -> list[str]:
    """'key: old -> new' for each difference, e.g. 'space.lr.low: 0.0001 -> 0.001', 'space.tau added'."""
    comparable = isinstance(old, dict) and isinstance(new, dict) and (old.keys() & new.keys() or not old)
    if not comparable:  # a leaf, or a dimension that became another kind (a range turned into a list)
        return [] if old == new else [f"{key}: {old!r} -> {new!r}"]
    changes = []
    for name in sorted(old.keys() | new.keys()):
        inner = f"{key}.{name}" if key else str(name)
        if name not in old:
            changes.append(f"{inner} added")
        elif name not in new:
            changes.append(f"{inner} removed")
        else:
            changes += fingerprint_changes(old[name], new[name], inner)
    return changes


def _legacy_changes(study: optuna.Study, new: dict[str, Any]) -> list[str]:
    """A study from before fingerprints: compare what it did record, and its trials' distributions."""
    attrs = study.user_attrs
    recorded = {
        key: attrs[key]
        for key in (Attr.CONDITION, Attr.FIXED, Attr.MAX_EPOCHS, Attr.BATCH_SIZE)
        if key in attrs
    }
    changes = fingerprint_changes(recorded, {key: new[key] for key in recorded})
    for trial in study.get_trials(deepcopy=False):
        for name, distribution in trial.distributions.items():
            dimension = new["space"].get(name)
            if dimension is None:
                changes.append(f"space.{name} removed")
            elif _distribution_of(dimension) != distribution:
                changes.append(f"space.{name}: {distribution} -> {_distribution_of(dimension)}")
    return sorted(set(changes))


def _distribution_of(dimension: dict[str, Any]) -> optuna.distributions.BaseDistribution:
    """The distribution spec.suggest asks Optuna for, from a fingerprint's dimension."""
    if "choices" in dimension:
        return optuna.distributions.CategoricalDistribution(dimension["choices"])
    if dimension.get("integer"):
        return optuna.distributions.IntDistribution(
            int(dimension["low"]), int(dimension["high"]), log=dimension["log"]
        )
    return optuna.distributions.FloatDistribution(dimension["low"], dimension["high"], log=dimension["log"])


def archived_name(study_name: str, stamp: str) -> str:
    """'semi/labels=10%' -> 'semi@archived-<stamp>/labels=10%', which `fmsearch report` can read."""
    head, _, tail = study_name.partition("/")
    return f"{head}@archived-{stamp}" + (f"/{tail}" if tail else "")


def _snapshot(study: optuna.Study) -> list[tuple]:
    return [
        (t.number, t.state, t.values, t.params, t.user_attrs, t.system_attrs, t.intermediate_values)
        for t in study.get_trials(deepcopy=False)
    ]


def archive(rdb: optuna.storages.BaseStorage, study_name: str, stamp: str) -> str:
    """Copy a study under its archived name, check the copy trial by trial, then delete the original.

    Returns the archived name. Nothing is deleted unless the copy holds every trial unchanged.
    """
    target = archived_name(study_name, stamp)
    optuna.copy_study(from_study_name=study_name, from_storage=rdb, to_storage=rdb, to_study_name=target)
    original = optuna.load_study(study_name=study_name, storage=rdb)
    copy = optuna.load_study(study_name=target, storage=rdb)
    if _snapshot(copy) != _snapshot(original) or copy.user_attrs != original.user_attrs:
        raise StudyError(
            f"the copy of {study_name!r} as {target!r} differs from it: nothing was deleted; "
            f"delete {target!r} (optuna delete-study) and rerun"
        )
    copy.set_user_attr(Attr.ARCHIVED_FROM, study_name)
    optuna.delete_study(study_name=study_name, storage=rdb)
    return target


@dataclass
class Prepared:
    study_names: list[str]  # in condition order
    archived: dict[str, str] = field(default_factory=dict)  # old name -> archived name


def prepare(spec: StudySpec, options: RunOptions, archive_changed: bool = False) -> Prepared:
    """Create every condition's study, or check that its stored trials mean what the spec says.

    Runs before any data is loaded or any worker starts. A condition whose stored fingerprint
    differs raises StudyChanged naming the keys, unless `archive_changed`: then its trials are
    kept under an archived name (see `archive`) and the condition starts afresh.
    """
    rdb = storage.open_storage(options.storage, options.heartbeat_interval, options.grace_period)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    conditions = [(spec.study_name(c), c, fingerprint(spec, c, options)) for c in spec.condition_list()]
    changed = {}
    existing = set(optuna.get_all_study_names(storage=rdb))
    for name, _, new in conditions:
        if name not in existing:
            continue
        study = optuna.load_study(study_name=name, storage=rdb)
        if not study.get_trials(deepcopy=False):
            continue
        old = study.user_attrs.get(Attr.FINGERPRINT)
        changes = fingerprint_changes(old, new) if old is not None else _legacy_changes(study, new)
        if changes:
            changed[name] = (study, changes)
    if changed and not archive_changed:
        name, (study, changes) = next(iter(changed.items()))
        shown = "; ".join(changes[:5]) + (f"; and {len(changes) - 5} more" if len(changes) > 5 else "")
        raise StudyChanged(
            f"study {name!r} in {storage.mask(options.storage)} holds {len(study.trials)} trials run with "
            f"other settings ({shown}): they must not mix with new ones; give the study file a new name, "
            f"or rerun with --archive-changed to keep them as {archived_name(name, stamp)!r} and start afresh"
        )
    archived = {}
    for name, (study, _) in changed.items():
        fail_stale_trials(study)
        if any(t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False)):
            raise StudyError(
                f"study {name!r} has running trials: stop its workers (or wait "
                f"{options.grace_period} s for a dead one to be failed) before archiving it"
            )
        archived[name] = archive(rdb, name, stamp)
    for name, condition, new in conditions:
        study = optuna.create_study(
            storage=rdb,
            study_name=name,
            direction="maximize",
            sampler=make_sampler(spec),
            pruner=make_pruner(spec),
            load_if_exists=True,
        )
        if study.metric_names != [spec.metric]:
            study.set_metric_names([spec.metric])  # the dashboard names its axis val_accuracy
        attrs = {
            Attr.SPEC: spec.name,
            Attr.DESCRIPTION: spec.description,
            Attr.CONDITION: condition,
            Attr.FIXED: spec.fixed,
            Attr.METRIC: spec.metric,
            Attr.MAX_EPOCHS: spec.max_epochs,
            Attr.BATCH_SIZE: spec.batch_size,
            Attr.FINGERPRINT: new,
        }
        for key, value in json.loads(json.dumps(attrs)).items():
            if study.user_attrs.get(key) != value:
                study.set_user_attr(key, value)
    storage.DatabaseArtifactStore(rdb)  # its table, created once here rather than by racing workers
    rdb.engine.dispose()
    return Prepared([name for name, _, _ in conditions], archived)


class _Gate:
    """The storage's gate for one study, held from counting its trials until the new one exists.

    work() takes it; the objective gives it back as soon as its trial is in the storage.
    """

    def __init__(self, gate: storage.Gate, study_name: str):
        self.gate = gate
        self.study_name = study_name
        self.held = False

    def acquire(self) -> None:
        self.gate.acquire(self.study_name)
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.gate.release()


def _disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in DISK_FULL


class Objective:
    def __init__(
        self,
        spec: StudySpec,
        condition: dict[str, Any],
        splits: data.Splits,
        options: RunOptions,
        reporter: Reporter,
        gate: _Gate,
        study_name: str,
        artifacts: storage.DatabaseArtifactStore,
    ):
        self.spec = spec
        self.condition = condition
        self.splits = splits
        self.options = options
        self.reporter = reporter
        self.gate = gate
        self.study_name = study_name
        self.artifacts = artifacts
        # Workers on one CPU split its cores; a thread count the study file fixes is kept.
        self.thread_cap = max(1, (os.cpu_count() or 1) // options.jobs) if options.device == "cpu" else None
        device = splits.train_images.device
        self.meta = {
            "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
            "git_revision": _git_revision(),
            "torch_version": torch.__version__,
            "optuna_version": optuna.__version__,
            "worker": f"{socket.gethostname()}:{os.getpid()}",  # which machine and process ran it
        }

    def __call__(self, trial: optuna.Trial) -> float:
        self.gate.release()  # the trial now exists: other workers may count it
        try:
            return self._train(trial)
        except (optuna.TrialPruned, engine.DivergenceError):
            raise
        except KeyboardInterrupt:
            trial.set_user_attr(Attr.STOP_REASON, "interrupted")
            raise
        except Exception as error:
            if storage.is_fault(error):
                raise  # the storage itself failed: nothing can be recorded, the run stops
            if _disk_full(error):
                raise StudyError(
                    f"{self.study_name} #{trial.number}: cannot save its weights ({error.strerror}): "
                    "free disk space (the temporary folder and the storage's), then rerun; "
                    "finished trials are kept"
                ) from None
            raise self._crashed(trial, error) from error

    def _crashed(self, trial: optuna.Trial, error: Exception) -> TrialCrashed:
        """Record a trial's unexpected error: its one-line reason on the trial, its traceback in a log."""
        reason = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
        log = trial_log_path(self.options.results_dir, self.study_name, trial.number)
        try:
            storage.write_atomic(
                log, lambda path: path.write_text("".join(traceback.format_exception(error)))
            )
            reason += f" (traceback in {log})"
        except OSError:
            reason += " (its traceback could not be written under results/)"
        trial.set_user_attr(Attr.STOP_REASON, CRASHED)
        trial.set_user_attr(Attr.ERROR, reason)
        return TrialCrashed(reason)

    def _train(self, trial: optuna.Trial) -> float:
        config = suggest(trial, self.spec, self.condition, self.spec.max_epochs)
        for key, value in {**self.meta, Attr.CONFIG: asdict(config), Attr.SEED: config.seed}.items():
            trial.set_user_attr(key, value)
        progress = self.reporter.trial_progress(self.study_name, trial.number, self.spec.max_epochs)
        history: list[dict] = []

        # The pruner judges a pseudo-label trial only after its labeled-only warm-up plus the pruner's own.
        warmup = config.warmup_epochs if config.unlabeled == "pseudo" else 0

        def report_and_prune(epoch: int, metrics: dict) -> str | None:
            history.append(metrics)
            trial.report(metrics[self.spec.metric], epoch)
            trial.set_user_attr(Attr.HISTORY, history)  # written every epoch: a crash keeps the curve
            progress.epoch_end(metrics)
            judged = epoch - warmup >= self.spec.pruner.warmup_epochs
            return "pruned" if judged and trial.should_prune() else None

        subset = engine.make_subset(config, self.splits)
        run = speed.settle(config, self.splits.train_images.device, thread_cap=self.thread_cap)
        team = None
        if config.unlabeled == "distill":
            folder = self.options.results_dir / "teachers"
            team = teachers.build(config, self.splits, subset, folder, execution=run)
            cost = {"count": len(team.members), "seconds": team.seconds, "epochs": team.epochs}
            accuracy = {"val_accuracy": team.val_accuracy, "test_accuracy": team.test_accuracy}
            trial.set_user_attr("teachers", cost | accuracy)
        try:
            result = engine.fit(
                config,
                self.splits,
                subset=subset,
                teacher_probs=None if team is None else team.probs,
                hooks=[report_and_prune],
                progress=progress,
                execution=run,
            )
        except engine.DivergenceError as error:
            trial.set_user_attr(Attr.STOP_REASON, DIVERGED)
            trial.set_user_attr(Attr.ERROR, str(error))
            raise
        finally:
            progress.close()
        record = {
            Attr.STOP_REASON: result.stop_reason,
            Attr.BEST_EPOCH: result.best_epoch,
            Attr.SECONDS: result.seconds,
            Attr.EXECUTION: result.execution.record(),
            "images_per_second": statistics.median(h["images_per_second"] for h in result.history),
            "labeled_count": result.labeled_count,
        }
        for key, value in record.items():
            trial.set_user_attr(key, value)
        if result.stop_reason == "pruned":
            raise optuna.TrialPruned(f"pruned after epoch {len(result.history)}")
        value = result.best[self.spec.metric]
        complete = trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if all(value >= t.value for t in complete):  # the final best was best when it finished
            self._keep_weights(trial, result.best_state)
        return value

    def _keep_weights(self, trial: optuna.Trial, state: dict) -> None:
        """Store the best epoch's weights in the storage, as the trial's artifact weights.pt."""
        with tempfile.TemporaryDirectory(prefix="fmsearch-") as folder:
            path = Path(folder) / storage.WEIGHTS_FILE
            torch.save(state, path)
            upload_artifact(artifact_store=self.artifacts, file_path=str(path), study_or_trial=trial)


def outcome_of(study_name: str, trial: FrozenTrial) -> TrialOutcome:
    attrs = trial.user_attrs
    stop = attrs.get(Attr.STOP_REASON, "pruned" if trial.state == TrialState.PRUNED else "stale")
    return TrialOutcome(
        study_name=study_name,
        number=trial.number,
        state=trial.state.name,
        value=trial.value,
        params=trial.params,
        stop_reason=stop,
        best_epoch=attrs.get(Attr.BEST_EPOCH),
        seconds=attrs.get(Attr.SECONDS),
        error=attrs.get(Attr.ERROR),
    )


def work(
    spec: StudySpec,
    options: RunOptions,
    worker: int,
    reporter_factory: Callable[[int], Reporter],
    splits: data.Splits | None = None,
) -> None:
    """One worker: for each condition, run trials until the condition has spec.trials finished ones.

    Raises StudyError after MAX_CONSECUTIVE_CRASHES trials in a row raised an error.
    """
    quiet_optuna()
    storage.quiet_background_faults()
    splits = splits if splits is not None else load_splits(spec, options)
    rdb = storage.open_storage(options.storage, options.heartbeat_interval, options.grace_period)
    artifacts = storage.DatabaseArtifactStore(rdb)
    reporter = reporter_factory(worker)
    storage_gate = storage.Gate(rdb)
    crashes: list[str] = []  # this worker's trials in a row that raised
    for condition in spec.condition_list():
        name = spec.study_name(condition)
        # A distinct, resume-aware seed per worker, so workers and reruns don't repeat each other.
        done_before = len(optuna.load_study(study_name=name, storage=rdb).trials)
        study = optuna.load_study(
            study_name=name,
            storage=rdb,
            sampler=make_sampler(spec, seed_offset=1000 * worker + done_before),
            pruner=make_pruner(spec),
        )
        gate = _Gate(storage_gate, name)
        objective = Objective(spec, condition, splits, options, reporter, gate, name, artifacts)

        def finished_callback(study: optuna.Study, trial: FrozenTrial, name: str = name) -> None:
            outcome = outcome_of(name, trial)
            if outcome.stop_reason == CRASHED:
                crashes.append(f"{name} #{trial.number}: {outcome.error}")
            else:
                crashes.clear()
            reporter.trial_end(outcome)

        while True:
            gate.acquire()
            try:
                fail_stale_trials(study)  # a dead worker's RUNNING trial -> FAIL, and a WAITING retry
                trials = study.get_trials(deepcopy=False)
                finished = sum(map(is_finished, trials))
                states = Counter(t.state for t in trials)
                if finished >= spec.trials:
                    break
                start = states[TrialState.WAITING] > 0 or finished + states[TrialState.RUNNING] < spec.trials
                if start:
                    study.optimize(
                        objective,
                        n_trials=1,
                        catch=(engine.DivergenceError, TrialCrashed),
                        callbacks=[finished_callback],
                        gc_after_trial=False,
                    )
            finally:
                gate.release()
            if len(crashes) >= MAX_CONSECUTIVE_CRASHES:
                raise StudyError(
                    f"{len(crashes)} trials in a row raised an error, last {crashes[-1]}: fix the cause, "
                    "then rerun (failed trials do not count toward the study's trials)"
                )
            if not start:
                time.sleep(options.heartbeat_interval)  # others' trials are running: wait for them


def _die_with_parent() -> None:
    """On Linux, have the kernel SIGKILL this worker when its parent dies: a kill -9 leaves no orphan."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:  # not glibc Linux: workers are daemons, which covers every exit but kill -9
        return
    libc.prctl(1, signal.SIGKILL)  # 1 is PR_SET_PDEATHSIG


def _interrupt_once(signum, frame) -> None:
    """The first Ctrl-C stops the trial (Optuna marks it FAIL); later ones must not cut that short."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def _catch_interrupts() -> None:
    """Have Ctrl-C stop a worker's trial, unless the command started with SIGINT ignored.

    A shell without job control starts `fmsearch study ... &` with SIGINT ignored, and Python then
    leaves the parent deaf to it. A worker that caught it anyway would stop while its parent carried
    on, and the parent would report its workers' exit status 130 as a failure (exit 1, not 130).
    """
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, _interrupt_once)


def _worker(spec, options, worker, reporter_factory, errors) -> None:
    """A worker process: its error goes back to the parent as one line (a bug: its traceback)."""
    _die_with_parent()
    _catch_interrupts()
    try:
        work(spec, options, worker, reporter_factory)
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except (StudyError, StorageError, data.DataError) as error:
        errors.put((worker, str(error), None))
        raise SystemExit(1) from None
    except Exception as error:
        if storage.is_fault(error):
            errors.put((worker, storage.fault_message(error, options.storage), None))
        else:
            errors.put((worker, f"{type(error).__name__}: {error}", traceback.format_exc()[-20000:]))
        raise SystemExit(1) from None


def _run_workers(spec: StudySpec, options: RunOptions, reporter_factory: Callable[[int], Reporter]) -> None:
    context = multiprocessing.get_context("spawn")
    errors = context.SimpleQueue()
    workers = [
        context.Process(target=_worker, args=(spec, options, i, reporter_factory, errors), daemon=True)
        for i in range(options.jobs)
    ]
    for process in workers:
        process.start()
    try:
        for process in workers:
            process.join()
    except KeyboardInterrupt:
        for process in workers:  # a terminal's Ctrl-C reached them too; a `kill -INT` of this one did not
            if process.is_alive():
                os.kill(process.pid, signal.SIGINT)
        for process in workers:
            process.join(timeout=60)  # each marks its running trial FAIL, then exits
            if process.is_alive():
                process.kill()
                process.join()
        raise
    reported = []
    while not errors.empty():
        reported.append(errors.get())
    if reported:
        worker, message, trace = reported[0]
        if trace is not None:
            raise RuntimeError(f"worker {worker} raised:\n{trace}")
        raise StudyError(message)
    failed = [p.exitcode for p in workers if p.exitcode != 0]
    if failed:
        raise StudyError(f"{len(failed)} of {options.jobs} workers exited with {failed}: rerun to resume")


def evaluate_best(
    study: optuna.Study, splits: data.Splits, results_dir: Path, artifacts: storage.DatabaseArtifactStore
) -> dict[str, Any] | None:
    """Score the best trial once on the test set; store the result on the study. None if no trial.

    The weights come from the storage, so any machine that reaches it gets the same score.
    """
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not complete:
        return None
    best = study.best_trial
    previous = study.user_attrs.get(Attr.TEST)
    if previous and previous.get("trial") == best.number:
        return previous
    stored = [
        m for m in get_all_artifact_meta(best, storage=study._storage) if m.filename == storage.WEIGHTS_FILE
    ]
    if not stored:
        raise StudyError(
            f"{study.study_name}: its best trial #{best.number} has no weights in the storage (it ran "
            "before fmsearch kept them there): archive the study with --archive-changed and rerun it"
        )
    body = artifacts.open_reader(stored[-1].artifact_id).read()
    device = splits.test_images.device
    config = engine.TrainConfig(**best.user_attrs[Attr.CONFIG])
    model = build_model(config.arch, config.dropout).to(device)
    model.load_state_dict(torch.load(io.BytesIO(body), weights_only=True, map_location=device))
    run = speed.settle(config, device)
    evaluation = engine.evaluate(model, splits.test_images, splits.test_labels, splits.normalize, run)
    truth = splits.test_labels.cpu().numpy()
    matrix = confusion_matrix(truth, evaluation.predictions.numpy(), labels=list(range(len(data.CLASSES))))
    record = {
        "trial": best.number,
        "test_loss": evaluation.loss,
        "test_accuracy": evaluation.accuracy,
        "val_accuracy": best.value,
        "confusion": matrix.tolist(),
        "classes": list(data.CLASSES),
    }
    try:
        storage.write_bytes_atomic(best_weights_path(results_dir, study.study_name), body)
    except OSError as error:
        raise StudyError(
            f"cannot write {best_weights_path(results_dir, study.study_name)} ({error.strerror}): "
            "free disk space, then rerun; the weights stay in the storage"
        ) from None
    study.set_user_attr(Attr.TEST, record)
    return record


def summarize(study: optuna.Study) -> ConditionSummary:
    trials = study.get_trials(deepcopy=False)
    summary = ConditionSummary(study.study_name, Counter(t.state.name for t in trials))
    if any(t.state == TrialState.COMPLETE for t in trials):
        best = study.best_trial
        summary.best_value, summary.best_params, summary.best_trial = best.value, best.params, best.number
    summary.test = study.user_attrs.get(Attr.TEST)
    return summary


def representatives(spec: StudySpec, condition: dict[str, Any]) -> list[engine.TrainConfig]:
    """One config per unlabeled objective a condition's trials can use, through spec.suggest: each
    categorical dimension at its first choice, each range at its middle (geometric where log)."""
    values: dict[str, Any] = {}
    for name, dimension in spec.space.items():
        if isinstance(dimension, Categorical):
            values[name] = dimension.choices[0]
        else:
            middle = (
                (dimension.low * dimension.high) ** 0.5
                if dimension.log
                else (dimension.low + dimension.high) / 2
            )
            values[name] = round(middle) if dimension.integer else middle
    unlabeled = spec.space.get("unlabeled")
    objectives = unlabeled.choices if isinstance(unlabeled, Categorical) else (None,)
    configs = []
    for objective in objectives:
        chosen = values if objective is None else {**values, "unlabeled": objective}
        config = suggest(optuna.trial.FixedTrial(chosen), spec, condition)
        if config not in configs:  # an objective that doesn't apply here gives the same config
            configs.append(config)
    return configs


@dataclass
class ConditionCost:
    study_name: str
    epoch_seconds: dict[str, float]  # unlabeled objective -> measured seconds of one epoch
    teacher_seconds: float = 0.0  # training every teacher its trials can ask for, none cached


@dataclass
class Plan:
    """What a study costs at most on this machine: every trial runs every epoch, no teacher is cached."""

    trials: int
    max_epochs: int
    execution: speed.Execution
    conditions: list[ConditionCost]

    @property
    def max_seconds(self) -> float:
        return sum(
            self.trials * self.max_epochs * max(c.epoch_seconds.values()) + c.teacher_seconds
            for c in self.conditions
        )


def _teacher_seconds(
    config: engine.TrainConfig, splits: data.Splits, run: speed.Execution, archs: int
) -> float:
    """Training `config.teachers` teachers for each of `archs` architectures, and their logits."""
    cost = engine.time_epoch(teachers.recipe(config, 0), splits, run)
    images = len(splits.train_labels) + len(splits.val_labels) + len(splits.test_labels)
    logits = cost.validation * 2 * images / len(splits.val_labels)  # the image and its mirror
    return archs * config.teachers * (config.teacher_epochs * cost.seconds + logits)


def plan(spec: StudySpec, splits: data.Splits) -> Plan:
    """Time one epoch of each condition's configs on the path `fit` runs, with this machine's settings.

    Creates nothing; takes a few seconds per condition and objective.
    """
    conditions = []
    arch = spec.space.get("arch")
    archs = len(arch.choices) if isinstance(arch, Categorical) else 1
    device = splits.train_images.device
    for condition in spec.condition_list():
        cost = ConditionCost(spec.study_name(condition), {})
        for config in representatives(spec, condition):
            run = speed.settle(config, device)
            cost.epoch_seconds[config.unlabeled] = engine.time_epoch(config, splits, run).seconds
            if config.unlabeled == "distill":
                cost.teacher_seconds = _teacher_seconds(config, splits, run, archs)
        conditions.append(cost)
    return Plan(spec.trials, spec.max_epochs, speed.settle(engine.TrainConfig(), device), conditions)


def run(
    spec: StudySpec,
    options: RunOptions,
    reporter_factory: Callable[[int], Reporter],
    splits: data.Splits,
) -> list[ConditionSummary]:
    """Run every condition to spec.trials finished trials with `options.jobs` workers, then score the bests.

    `prepare` must have run. `splits` is the parent's data; with one job it is reused, with more
    each process loads its own.
    """
    if options.jobs == 1:
        work(spec, options, 0, reporter_factory, splits)
    else:
        _run_workers(spec, options, reporter_factory)
    rdb = storage.open_storage(options.storage)
    artifacts = storage.DatabaseArtifactStore(rdb)
    summaries = []
    for condition in spec.condition_list():
        study = optuna.load_study(study_name=spec.study_name(condition), storage=rdb)
        evaluate_best(study, splits, options.results_dir, artifacts)
        summaries.append(summarize(study))
    return summaries
