"""Optuna glue: storage, one study per condition, the objective, workers, and the test evaluation.

The whole integration is in `Objective.__call__`: suggest a config through spec.suggest, hand
engine.fit an epoch hook that reports validation accuracy and asks the pruner, record what
happened as user attributes, and return the best epoch's value.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import re
import signal
import statistics
import subprocess
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import optuna
import torch
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.trial import FrozenTrial, TrialState
from sklearn.metrics import confusion_matrix

from fmsearch import data, engine, teachers
from fmsearch.errors import FmsearchError
from fmsearch.models import build_model
from fmsearch.spec import StudySpec, is_semi, suggest


class StudyError(FmsearchError):
    """A study cannot run as asked (bad storage URL, ...); the message says how to fix it."""


@dataclass(frozen=True)
class RunOptions:
    storage: str = "sqlite:///results/studies.db"
    trials: int | None = None  # per condition; None: the spec's
    jobs: int = 1  # worker processes
    device: str | None = None  # None: the best available
    epochs: int | None = None  # max epochs; None: the spec's
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


def open_storage(
    url: str, heartbeat_interval: int | None = None, grace_period: int | None = None
) -> RDBStorage:
    """RDB storage with a heartbeat: a trial whose process died is failed, then retried once."""
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": 120}}  # wait for other writers instead of "locked"
    retry = RetryHeartbeatStaleTrialCallback(max_retry=3) if heartbeat_interval else None
    try:
        return RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
            heartbeat_stale_trial_callback=retry,
        )
    except Exception as error:  # sqlalchemy raises many types for a bad URL or an absent driver
        raise StudyError(
            f"cannot open storage {url!r} ({type(error).__name__}: {str(error).splitlines()[0]}); "
            "use sqlite:///path.db or postgresql://user:pass@host/db (pip install -e .[postgres])"
        ) from None


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


def make_pruner(spec: StudySpec, max_epochs: int) -> optuna.pruners.BasePruner:
    p = spec.pruner
    if p.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.startup_trials, n_warmup_steps=p.warmup_epochs)
    if p.name == "percentile":
        return optuna.pruners.PercentilePruner(
            p.percentile, n_startup_trials=p.startup_trials, n_warmup_steps=p.warmup_epochs
        )
    if p.name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, p.warmup_epochs), max_resource=max_epochs)
    return optuna.pruners.NopPruner()


def slug(study_name: str) -> str:
    """A file-system name for a study: 'semi/labels=10%' -> 'labels-10pct'."""
    tail = study_name.split("/", 1)[1] if "/" in study_name else "all"
    return re.sub(r"[^A-Za-z0-9.]+", "-", tail.replace("%", "pct")).strip("-")


def is_finished(trial: FrozenTrial) -> bool:
    """Counts toward a condition's trials: complete, pruned, or failed by divergence (not by a crash)."""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return trial.state == TrialState.FAIL and trial.user_attrs.get("stop_reason") == "diverged"


def _git_revision() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def prepare(spec: StudySpec, options: RunOptions) -> list[str]:
    """Create the storage schema and every condition's study once, before any worker starts.

    Several processes creating a new SQLite file at once race on the schema; done here, they
    only ever load. Returns the study names in condition order.
    """
    storage = open_storage(options.storage)
    names = []
    max_epochs = options.epochs or spec.max_epochs
    for condition in spec.condition_list():
        name = spec.study_name(condition)
        study = optuna.create_study(
            storage=storage,
            study_name=name,
            direction="maximize",
            sampler=make_sampler(spec),
            pruner=make_pruner(spec, max_epochs),
            load_if_exists=True,
        )
        study.set_metric_names([spec.metric])  # the dashboard names its axis val_accuracy, not "Objective 0"
        attrs = {
            "spec": spec.name,
            "description": spec.description,
            "condition": condition,
            "fixed": spec.fixed,
            "metric": spec.metric,
            "max_epochs": max_epochs,
            "batch_size": spec.batch_size,
        }
        for key, value in attrs.items():
            if study.user_attrs.get(key) != value:
                study.set_user_attr(key, value)
        names.append(name)
    storage.engine.dispose()
    return names


class _Gate:
    """Serializes 'count, then start a trial' across this run's workers, so none overshoots N.

    Held from the count until the new trial exists in storage; the objective releases it.
    """

    def __init__(self, lock):
        self.lock = lock
        self.held = False

    def acquire(self) -> None:
        self.held = self.lock.acquire(timeout=600)

    def release(self) -> None:
        if self.held:
            self.held = False
            self.lock.release()


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
    ):
        self.spec = spec
        self.condition = condition
        self.splits = splits
        self.options = options
        self.reporter = reporter
        self.gate = gate
        self.study_name = study_name
        self.weights_dir = options.results_dir / spec.name / "weights" / slug(study_name)
        device = splits.train_images.device
        self.meta = {
            "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
            "git_revision": _git_revision(),
            "torch_version": torch.__version__,
            "optuna_version": optuna.__version__,
        }

    def __call__(self, trial: optuna.Trial) -> float:
        self.gate.release()  # the trial now exists: other workers may count it
        max_epochs = self.options.epochs or self.spec.max_epochs
        config = suggest(trial, self.spec, self.condition, max_epochs)
        for key, value in {**self.meta, "config": asdict(config), "seed": config.seed}.items():
            trial.set_user_attr(key, value)
        progress = self.reporter.trial_progress(self.study_name, trial.number, max_epochs)
        history: list[dict] = []

        # The pruner judges a pseudo-label trial only after its labeled-only warm-up plus the pruner's own.
        warmup = config.warmup_epochs if config.unlabeled == "pseudo" else 0

        def report_and_prune(epoch: int, metrics: dict) -> str | None:
            history.append(metrics)
            trial.report(metrics[self.spec.metric], epoch)
            trial.set_user_attr("history", history)  # written every epoch: a crash keeps the curve
            progress.epoch_end(metrics)
            return (
                "pruned"
                if epoch - warmup >= self.spec.pruner.warmup_epochs and trial.should_prune()
                else None
            )

        subset = engine.make_subset(config, self.splits)
        team = None
        if config.unlabeled == "distill":
            team = teachers.build(config, self.splits, subset, self.options.results_dir / "teachers")
            trial.set_user_attr(
                "teachers",
                {
                    "count": len(team.members),
                    "seconds": team.seconds,
                    "epochs": team.epochs,
                    "val_accuracy": team.val_accuracy,
                    "test_accuracy": team.test_accuracy,
                },
            )
        try:
            result = engine.fit(
                config,
                self.splits,
                subset=subset,
                teacher_probs=None if team is None else team.probs,
                hooks=[report_and_prune],
                progress=progress,
            )
        except engine.DivergenceError as error:
            trial.set_user_attr("stop_reason", "diverged")
            trial.set_user_attr("error", str(error))
            raise
        finally:
            progress.close()
        record = {
            "stop_reason": result.stop_reason,
            "best_epoch": result.best_epoch,
            "seconds": result.seconds,
            "images_per_second": statistics.median(h["images_per_second"] for h in result.history),
            "labeled_count": result.labeled_count,
        }
        for key, value in record.items():
            trial.set_user_attr(key, value)
        if result.stop_reason == "pruned":
            raise optuna.TrialPruned(f"pruned after epoch {len(result.history)}")
        self.weights_dir.mkdir(parents=True, exist_ok=True)
        partial = self.weights_dir / f"trial-{trial.number}.pt.partial"
        torch.save(result.best_state, partial)
        partial.replace(self.weights_dir / f"trial-{trial.number}.pt")
        return result.best[self.spec.metric]


def outcome_of(study_name: str, trial: FrozenTrial) -> TrialOutcome:
    attrs = trial.user_attrs
    stop = attrs.get("stop_reason", "pruned" if trial.state == TrialState.PRUNED else "crashed")
    return TrialOutcome(
        study_name=study_name,
        number=trial.number,
        state=trial.state.name,
        value=trial.value,
        params=trial.params,
        stop_reason=stop,
        best_epoch=attrs.get("best_epoch"),
        seconds=attrs.get("seconds"),
        error=attrs.get("error"),
    )


def load_splits(spec: StudySpec, options: RunOptions, device: torch.device) -> data.Splits:
    config = options.data_config
    if spec.pool_limit is not None:
        config = replace(config, pool_limit=spec.pool_limit)
    return data.load_splits(config, device)


def work(
    spec: StudySpec,
    options: RunOptions,
    worker: int,
    lock,
    reporter_factory: Callable[[int], Reporter],
    splits: data.Splits | None = None,
) -> None:
    """One worker: for each condition, run trials until the condition has N finished ones."""
    quiet_optuna()
    device = engine.resolve_device(options.device)
    if device.type == "cpu" and options.jobs > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // options.jobs))  # split the cores
    splits = splits if splits is not None else load_splits(spec, options, device)
    storage = open_storage(options.storage, options.heartbeat_interval, options.grace_period)
    reporter = reporter_factory(worker)
    target = options.trials or spec.trials
    max_epochs = options.epochs or spec.max_epochs
    gate = _Gate(lock)
    for condition in spec.condition_list():
        name = spec.study_name(condition)
        # A distinct, resume-aware seed per worker, so workers and reruns don't repeat each other.
        done_before = len(optuna.load_study(study_name=name, storage=storage).trials)
        study = optuna.load_study(
            study_name=name,
            storage=storage,
            sampler=make_sampler(spec, seed_offset=1000 * worker + done_before),
            pruner=make_pruner(spec, max_epochs),
        )
        objective = Objective(spec, condition, splits, options, reporter, gate, name)

        def finished_callback(study: optuna.Study, trial: FrozenTrial, name: str = name) -> None:
            reporter.trial_end(outcome_of(name, trial))

        while True:
            gate.acquire()
            try:
                fail_stale_trials(study)  # a dead worker's RUNNING trial -> FAIL, and a WAITING retry
                trials = study.get_trials(deepcopy=False)
                finished = sum(map(is_finished, trials))
                states = Counter(t.state for t in trials)
                if finished >= target:
                    break
                start = states[TrialState.WAITING] > 0 or finished + states[TrialState.RUNNING] < target
                if start:
                    study.optimize(
                        objective,
                        n_trials=1,
                        catch=(engine.DivergenceError,),
                        callbacks=[finished_callback],
                        gc_after_trial=False,
                    )
            finally:
                gate.release()
            if not start:
                time.sleep(options.heartbeat_interval)  # others' trials are running: wait for them


def _die_with_parent() -> None:
    """On Linux, have the kernel SIGKILL this worker when its parent dies: a kill -9 leaves no orphan."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:  # not glibc Linux: workers are daemons, which covers every exit but kill -9
        return
    libc.prctl(1, signal.SIGKILL)  # 1 is PR_SET_PDEATHSIG


def _worker(spec, options, worker, lock, reporter_factory) -> None:
    _die_with_parent()
    work(spec, options, worker, lock, reporter_factory)


def evaluate_best(
    study: optuna.Study, spec: StudySpec, splits: data.Splits, results_dir: Path
) -> dict[str, Any] | None:
    """Score the best trial once on the test set; store the result on the study. None if no trial."""
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not complete:
        return None
    best = study.best_trial
    previous = study.user_attrs.get("test")
    if previous and previous.get("trial") == best.number:
        return previous
    name_slug = slug(study.study_name)
    weights = results_dir / spec.name / "weights" / name_slug / f"trial-{best.number}.pt"
    if not weights.exists():
        raise StudyError(f"{weights} is missing: rerun the study so trial {best.number} can be scored")
    config = engine.TrainConfig(**best.user_attrs["config"])
    model = build_model(config.arch, config.dropout).to(splits.test_images.device)
    model.load_state_dict(torch.load(weights, weights_only=True, map_location=splits.test_images.device))
    evaluation = engine.evaluate(model, splits.test_images, splits.test_labels, splits.normalize)
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
    study.set_user_attr("test", record)
    best_copy = results_dir / spec.name / f"{name_slug}-best.pt"
    best_copy.write_bytes(weights.read_bytes())
    return record


def summarize(study: optuna.Study) -> ConditionSummary:
    trials = study.get_trials(deepcopy=False)
    summary = ConditionSummary(study.study_name, Counter(t.state.name for t in trials))
    if any(t.state == TrialState.COMPLETE for t in trials):
        best = study.best_trial
        summary.best_value, summary.best_params, summary.best_trial = best.value, best.params, best.number
    summary.test = study.user_attrs.get("test")
    return summary


def estimate_epoch_seconds(spec: StudySpec, splits: data.Splits, batch_size: int) -> float:
    """Measured seconds for one epoch of the plain CNN on this device, an upper bound for the spec.

    Times 12 training steps after 3 warm-up steps plus one validation pass; pseudo-label steps
    cost about 1.4 labeled steps (a no-grad weak pass and a strong pass).
    """
    config = engine.TrainConfig(batch_size=batch_size)
    model = build_model(config.arch, config.dropout).to(splits.train_images.device)
    optimizer = torch.optim.Adam(model.parameters())
    images, labels = splits.train_images[:batch_size], splits.train_labels[:batch_size]
    device = images.device

    def steps(n: int) -> None:
        for _ in range(n):
            loss = torch.nn.functional.cross_entropy(model(splits.normalize(images)), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    steps(3)
    started = time.perf_counter()
    steps(12)
    step_seconds = (time.perf_counter() - started) / 12
    started = time.perf_counter()
    engine.evaluate(model, splits.val_images, splits.val_labels, splits.normalize)
    val_seconds = time.perf_counter() - started
    factor = 1.4 if any(is_semi({**spec.fixed, **c}) for c in spec.condition_list()) else 1.0
    return len(splits.train_labels) / batch_size * step_seconds * factor + val_seconds


@dataclass
class Plan:
    study_names: list[str]
    trials: int
    max_epochs: int
    epoch_seconds: float
    device: str

    @property
    def max_seconds(self) -> float:
        return len(self.study_names) * self.trials * self.max_epochs * self.epoch_seconds


def plan(spec: StudySpec, options: RunOptions, splits: data.Splits) -> Plan:
    """Create the studies and measure what the run costs at most."""
    names = prepare(spec, options)
    seconds = estimate_epoch_seconds(spec, splits, spec.batch_size)
    return Plan(
        names,
        options.trials or spec.trials,
        options.epochs or spec.max_epochs,
        seconds,
        str(splits.train_images.device),
    )


def run(
    spec: StudySpec,
    options: RunOptions,
    reporter_factory: Callable[[int], Reporter],
    splits: data.Splits,
) -> list[ConditionSummary]:
    """Run every condition to N finished trials with `options.jobs` workers, then score the bests.

    `splits` is the parent's data; with one job it is reused, with more each process loads its own.
    The storage and the studies are created (or found) here, before any worker starts.
    """
    prepare(spec, options)
    if options.jobs == 1:
        work(spec, options, 0, threading.Lock(), reporter_factory, splits)
    else:
        context = multiprocessing.get_context("spawn")
        lock = context.Lock()
        workers = [
            context.Process(target=_worker, args=(spec, options, i, lock, reporter_factory), daemon=True)
            for i in range(options.jobs)
        ]
        for process in workers:
            process.start()
        for process in workers:
            process.join()
        failed = [p.exitcode for p in workers if p.exitcode != 0]
        if failed:
            raise StudyError(f"{len(failed)} of {options.jobs} workers exited with {failed}: rerun to resume")
    storage = open_storage(options.storage)
    summaries = []
    for condition in spec.condition_list():
        study = optuna.load_study(study_name=spec.study_name(condition), storage=storage)
        evaluate_best(study, spec, splits, options.results_dir)
        summaries.append(summarize(study))
    return summaries
