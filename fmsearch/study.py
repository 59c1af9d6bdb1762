"""Optuna glue: one study per condition, its objective, a worker's loop, the best trial's test score.

The integration is `Objective._train`: suggest a config through spec.suggest, run it through
runner.run with an epoch hook that reports the metric and asks the pruner, record what it returns
as user attributes, and return the best epoch's value. Beside it: lineage.py (what the stored
trials mean), workers.py (several processes), cost.py (what a study will cost).
"""

from __future__ import annotations

import functools
import io
import json
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import optuna
import torch
from optuna.storages import fail_stale_trials
from optuna.trial import FrozenTrial, TrialState

from fmsearch import data, engine, runner, semi, speed, storage, workers
from fmsearch.errors import StudyError
from fmsearch.lineage import fingerprint, settle_changes
from fmsearch.models import build_model
from fmsearch.spec import StudySpec, suggest
from fmsearch.storage import CRASHED, DIVERGED, INTERRUPTED, PRUNED, STALE, Attr, is_finished

MAX_CONSECUTIVE_CRASHES = 3  # a worker stops after this many trials in a row raised an error


class TrialCrashed(RuntimeError):
    """A trial raised an unexpected error; it is recorded on the trial and the study goes on."""


@dataclass(frozen=True)
class RunOptions:
    storage: str = storage.DEFAULT_URL
    jobs: int = 1  # worker processes
    device: torch.device = torch.device("cpu")  # resolved once by the caller (engine.resolve_device)
    results_dir: Path = Path("results")
    heartbeat_interval: int = 5  # seconds between a running trial's heartbeats
    grace_period: int = 20  # seconds without a heartbeat before a trial counts as dead
    data_config: data.DataConfig = field(default_factory=data.DataConfig)  # the spec's pool_limit on top
    deadline: float | None = None  # time.time() after which no trial starts (`fmsearch study --time`)

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", torch.device(self.device))  # "cpu" is taken as well

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.time() >= self.deadline

    def thread_cap(self) -> int | None:
        """Torch threads a worker may use: on the CPU, an equal share of its cores among the jobs (a
        thread count the study file fixes is kept; speed.settle); on a GPU, no cap."""
        return max(1, (os.cpu_count() or 1) // self.jobs) if self.device.type == "cpu" else None


@dataclass
class TrialOutcome:
    study_name: str
    number: int
    state: str  # COMPLETE, PRUNED or FAIL
    value: float | None
    params: dict[str, Any]
    stop_reason: str
    best_epoch: int | None
    error: str | None = None


@dataclass
class ConditionSummary:
    study_name: str
    states: Counter = field(default_factory=Counter)
    best_value: float | None = None
    best_params: dict[str, Any] = field(default_factory=dict)
    best_trial: int | None = None
    test: storage.BestTrialScore | None = None
    finished: int = 0  # the trials that count toward the study's (complete, pruned, diverged)


class TrialProgress(engine.Progress, Protocol):
    def epoch_end(self, metrics: dict) -> None: ...
    def close(self) -> None: ...


class Reporter(Protocol):
    """How a run shows itself; the CLI implements it, tests may collect events."""

    def trial_progress(self, study_name: str, number: int, max_epochs: int) -> TrialProgress: ...
    def trial_end(self, outcome: TrialOutcome) -> None: ...
    def warn(self, line: str) -> None: ...  # a problem the run goes on through


def make_sampler(spec: StudySpec, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    seed = (spec.sampler.seed + seed_offset) % 2**32  # numpy's seeds are 32-bit
    if spec.sampler.name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(
        seed=seed,
        multivariate=spec.sampler.multivariate,
        group=spec.sampler.multivariate,  # needed for conditional dimensions under multivariate
        n_startup_trials=spec.sampler.startup_trials,
        constant_liar=True,  # parallel workers don't all sample the same point
    )


def make_pruner(spec: StudySpec, condition: dict[str, Any]) -> optuna.pruners.BasePruner:
    """The spec's pruner. Its warm-up is judged by the objective (`_train`), which adds a pseudo-label
    trial's labeled-only epochs to it, so Optuna's own warm-up is left at 0."""
    p = spec.pruner
    if p.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.startup_trials)
    if p.name == "percentile":
        return optuna.pruners.PercentilePruner(p.percentile, n_startup_trials=p.startup_trials)
    if p.name == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=max(1, p.warmup_epochs), max_resource=spec.setting("max_epochs", condition)
        )
    return optuna.pruners.NopPruner()


def data_config(spec: StudySpec, options: RunOptions) -> data.DataConfig:
    """The data a study trains on: the run's data config with the spec's pool_limit and val_size on top."""
    limits = {"pool_limit": spec.pool_limit, "val_size": spec.val_size}
    return replace(options.data_config, **{k: v for k, v in limits.items() if v is not None})


def load_splits(spec: StudySpec, options: RunOptions) -> data.Splits:
    return data.load_splits(data_config(spec, options), options.device)


def prepare(spec: StudySpec, options: RunOptions, archive_changed: bool = False) -> dict[str, str]:
    """Create every condition's study, or check that its stored trials mean what the spec says.

    Runs before any worker starts. A condition whose stored fingerprint
    differs raises StudyChanged naming the keys, unless `archive_changed`: then its trials are
    kept under an archived name (see `archive`) and the condition starts afresh.
    """
    rdb = storage.open_storage(options.storage, options.heartbeat_interval, options.grace_period)
    config = data_config(spec, options)
    fingerprints = {spec.study_name(c): fingerprint(spec, c, config) for c in spec.condition_list()}
    archived = settle_changes(rdb, fingerprints, options.storage, options.grace_period, archive_changed)
    for name, new in fingerprints.items():
        study = optuna.create_study(
            storage=rdb,
            study_name=name,
            direction="maximize",
            load_if_exists=True,  # each worker loads it with its own sampler and pruner
        )
        if study.metric_names != [spec.metric]:
            study.set_metric_names([spec.metric])  # the dashboard names its axis val_accuracy
        attrs = {Attr.DESCRIPTION: spec.description, Attr.FINGERPRINT: new}  # the settings live in `new`
        for key, value in json.loads(json.dumps(attrs)).items():
            if study.user_attrs.get(key) != value:
                study.set_user_attr(key, value)
    storage.DatabaseArtifactStore(rdb)  # its table, created once here rather than by racing workers
    rdb.engine.dispose()
    return archived


def trials_left(spec: StudySpec, options: RunOptions) -> dict[str, int]:
    """Per condition's study, the trials still to run before it has spec.trials finished ones."""
    rdb = storage.open_storage(options.storage, options.heartbeat_interval, options.grace_period)
    left = {}
    for condition in spec.condition_list():
        name = spec.study_name(condition)
        trials = optuna.load_study(study_name=name, storage=rdb).get_trials(deepcopy=False)
        left[name] = max(0, spec.trials - sum(map(is_finished, trials)))
    rdb.engine.dispose()
    return left


@dataclass
class Objective:
    """One condition's objective for study.optimize: a trial is one configuration run to its end."""

    spec: StudySpec
    condition: dict[str, Any]
    splits: data.Splits
    options: RunOptions
    reporter: Reporter
    gate: storage.Gate  # held by work() until the trial exists
    study_name: str
    artifacts: storage.DatabaseArtifactStore
    running: int | None = None  # the number of the trial this worker runs now
    warned: set[int] = field(default_factory=set)  # trials whose heartbeat trouble was reported

    def __post_init__(self) -> None:
        self.thread_cap = self.options.thread_cap()
        self.meta = runner.provenance(self.splits.train_images.device)

    def __call__(self, trial: optuna.Trial) -> float:
        self.gate.release()  # the trial now exists: other workers may count it
        self.running = trial.number
        try:
            return self._train(trial)
        except (optuna.TrialPruned, engine.DivergenceError, optuna.exceptions.UpdateFinishedTrialError):
            raise  # the last: another worker failed this trial as stale (see _next_trial)
        except KeyboardInterrupt:
            trial.set_user_attr(Attr.STOP_REASON, INTERRUPTED)
            raise
        except Exception as error:
            if storage.is_fault(error):
                raise  # the storage itself failed: nothing can be recorded, the run stops
            if isinstance(error, OSError) and error.errno in storage.DISK_FULL:
                raise StudyError(
                    f"{self.study_name} #{trial.number}: cannot save its weights ({error.strerror}): "
                    "free disk space (the temporary folder and the storage's), then rerun; "
                    "finished trials are kept"
                ) from None
            raise self._crashed(trial, error) from error

    def _crashed(self, trial: optuna.Trial, error: Exception) -> TrialCrashed:
        """Record a trial's unexpected error: its one-line reason on the trial, its traceback in a log."""
        reason = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
        reason += storage.keep_traceback(self.options.results_dir, self.study_name, trial.number, error)
        trial.set_user_attr(Attr.STOP_REASON, CRASHED)
        trial.set_user_attr(Attr.ERROR, reason)
        return TrialCrashed(reason)

    def _train(self, trial: optuna.Trial) -> float:
        config = suggest(trial, self.spec, self.condition)
        for key, value in {**self.meta, Attr.CONFIG: asdict(config)}.items():
            trial.set_user_attr(key, value)
        progress = self.reporter.trial_progress(self.study_name, trial.number, config.epochs)
        history: list[dict] = []

        # The pruner judges a pseudo-label trial only after its labeled-only warm-up plus the pruner's own.
        warmup = semi.warmup_epochs(config)

        def report_and_prune(epoch: int, metrics: dict) -> str | None:
            history.append(metrics)
            trial.report(metrics[self.spec.metric], epoch)
            trial.set_user_attr(Attr.HISTORY, history)  # written every epoch: a crash keeps the curve
            trouble = storage.heartbeat_trouble(trial)  # said once a trial: it keeps beating
            if trouble and trial.number not in self.warned:
                self.warned.add(trial.number)
                self.reporter.warn(f"{self.study_name} #{trial.number}: {trouble}")
            progress.epoch_end(metrics)
            judged = epoch - warmup >= self.spec.pruner.warmup_epochs
            return PRUNED if judged and trial.should_prune() else None

        execution = speed.settle(config, self.splits.train_images.device, thread_cap=self.thread_cap)
        try:
            done = runner.run(
                config,
                self.splits,
                self.options.results_dir,
                hooks=[report_and_prune],
                progress=progress,
                execution=execution,
                on_teachers=lambda team: trial.set_user_attr(Attr.TEACHER_TEAM, runner.teachers_record(team)),
            )
        except engine.DivergenceError as error:
            trial.set_user_attr(Attr.STOP_REASON, DIVERGED)
            trial.set_user_attr(Attr.ERROR, str(error))
            raise
        finally:
            progress.close()
        for key, value in done.record().items():
            if key not in (Attr.CONFIG, Attr.HISTORY):  # both written already
                trial.set_user_attr(key, value)
        result = done.result
        if result.stop_reason == PRUNED:
            raise optuna.TrialPruned(f"pruned after epoch {len(result.history)}")
        value = result.best[self.spec.metric]
        complete = trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if all(value >= t.value for t in complete):  # the final best was best when it finished
            storage.keep_weights(self.artifacts, trial, result.best_state)
        return value


TAKEN = (
    "another worker failed it as stale (this worker went longer than the grace period without a "
    "heartbeat: paused, or its heartbeat writes failed); its result is dropped and the trial retried"
)


def outcome_of(study_name: str, trial: FrozenTrial) -> TrialOutcome:
    attrs = trial.user_attrs
    stop = attrs.get(Attr.STOP_REASON, PRUNED if trial.state == TrialState.PRUNED else STALE)
    return TrialOutcome(
        study_name=study_name,
        number=trial.number,
        state=trial.state.name,
        value=trial.value,
        params=trial.params,
        stop_reason=stop,
        best_epoch=attrs.get(Attr.BEST_EPOCH),
        error=attrs.get(Attr.ERROR),
    )


def work(
    spec: StudySpec,
    options: RunOptions,
    worker: int,
    reporter_factory: Callable[[int], Reporter],
    splits: data.Splits | None = None,
    rdb: optuna.storages.RDBStorage | None = None,
) -> None:
    """One worker: run trials until every condition has spec.trials finished ones, or the time is up.

    The conditions take turns, a trial each, so a study stopped by its time budget (`options.deadline`)
    has given each the same share. No trial starts after the deadline; a running one finishes.
    `splits` and `rdb` are the caller's where it runs in the same process, else loaded and opened here.
    Raises StudyError after MAX_CONSECUTIVE_CRASHES trials in a row raised an error.
    """
    storage.quiet_optuna()
    storage.quiet_background_faults()
    splits = splits if splits is not None else load_splits(spec, options)
    rdb = rdb or storage.open_storage(options.storage, options.heartbeat_interval, options.grace_period)
    artifacts = storage.DatabaseArtifactStore(rdb)
    reporter = reporter_factory(worker)
    crashes: list[str] = []  # this worker's trials in a row that raised

    def finished_callback(study: optuna.Study, trial: FrozenTrial) -> None:
        outcome = outcome_of(study.study_name, trial)
        if outcome.stop_reason == CRASHED:
            crashes.append(f"{study.study_name} #{trial.number}: {outcome.error}")
        else:
            crashes.clear()
        reporter.trial_end(outcome)

    turns = []  # (study, gate, objective) per condition still short of its trials
    for condition in spec.condition_list():
        name = spec.study_name(condition)
        offset = storage.join(rdb, name)
        sampler = make_sampler(spec, seed_offset=offset)
        pruner = make_pruner(spec, condition)
        study = optuna.load_study(study_name=name, storage=rdb, sampler=sampler, pruner=pruner)
        gate = storage.Gate(rdb, name)
        objective = Objective(spec, condition, splits, options, reporter, gate, name, artifacts)
        objective.meta[Attr.SAMPLER_SEED] = (spec.sampler.seed + offset) % 2**32
        turns.append((study, gate, objective))
    while turns and not options.out_of_time():
        steps = []
        for study, gate, objective in list(turns):
            if options.out_of_time():
                return
            step = _next_trial(study, gate, spec.trials, objective, finished_callback)
            if step == "done":
                turns.remove((study, gate, objective))
            steps.append(step)
            if len(crashes) >= MAX_CONSECUTIVE_CRASHES:
                raise StudyError(
                    f"{len(crashes)} trials in a row raised an error, last {crashes[-1]}: fix the cause, "
                    "then rerun (failed trials do not count toward the study's trials)"
                )
        if "ran" not in steps and turns:
            time.sleep(options.heartbeat_interval)  # others' trials are running: wait for them


def _next_trial(
    study: optuna.Study, gate: storage.Gate, wanted: int, objective: Objective, callback: Callable
) -> str:
    """Under the gate, count the study's finished trials and run one more if they are too few.

    Returns "done" (enough have finished), "ran", or "wait" (running trials may make up the rest).
    """
    gate.acquire()
    try:
        fail_stale_trials(study)  # a dead worker's RUNNING trial -> FAIL, and a WAITING retry
        storage.fail_heartbeatless_trials(study)  # ... and one never beat
        trials = study.get_trials(deepcopy=False)
        finished = sum(map(is_finished, trials))
        states = Counter(t.state for t in trials)
        if finished >= wanted:
            return "done"
        if states[TrialState.WAITING] == 0 and finished + states[TrialState.RUNNING] >= wanted:
            return "wait"
        try:
            study.optimize(
                objective,
                n_trials=1,
                catch=(engine.DivergenceError, TrialCrashed),
                callbacks=[callback],
                gc_after_trial=False,
            )
        except (optuna.exceptions.UpdateFinishedTrialError, AssertionError, ValueError):
            taken = next((t for t in study.get_trials(deepcopy=False) if t.number == objective.running), None)
            if taken is None or taken.state != TrialState.FAIL:
                raise
            objective.reporter.trial_end(
                replace(outcome_of(objective.study_name, taken), stop_reason=STALE, error=TAKEN)
            )
        return "ran"
    finally:
        gate.release()  # the objective gave it back once its trial existed; this is for the rest


def evaluate_best(
    study: optuna.Study, splits: data.Splits, results_dir: Path, artifacts: storage.DatabaseArtifactStore
) -> storage.BestTrialScore | None:
    """Score the best trial once on the test set; store the result on the study. None if no trial.

    The weights come from the storage, so any machine that reaches it gets the same score, and each
    copies them to its results folder, also where another machine scored them first.
    """
    best = storage.best_trial(study.get_trials(deepcopy=False))
    if best is None:
        return None
    body = storage.kept_weights(artifacts, study, best)
    if body is not None:
        storage.keep_best_weights(body, storage.best_weights_path(results_dir, study.study_name))
    previous = storage.BestTrialScore.of(study)
    if previous and previous.trial == best.number:
        return previous  # scored already; an imported study (transfer.py) keeps the score, not the weights
    if body is None:
        raise StudyError(
            f"{study.study_name}: its best trial #{best.number} has no weights in the storage (it ran "
            "before fmsearch kept them there): archive the study with --archive-changed and rerun it"
        )
    device = splits.test_images.device
    config = runner.stored_config(study.study_name, best)
    model = build_model(config.arch, config.dropout).to(device)
    model.load_state_dict(torch.load(io.BytesIO(body), weights_only=True, map_location=device))
    run = speed.settle(config, device)
    evaluation = engine.evaluate(model, splits.test_images, splits.test_labels, splits.normalize, run)
    score = storage.BestTrialScore(
        trial=best.number,
        val_accuracy=best.value,
        test_loss=evaluation.loss,
        test_accuracy=evaluation.accuracy,
        confusion=engine.confusion(evaluation, splits.test_labels),
        classes=list(data.CLASSES),
    )
    score.save(study)
    return score


def summarize(study: optuna.Study) -> ConditionSummary:
    trials = study.get_trials(deepcopy=False)
    summary = ConditionSummary(study.study_name, Counter(t.state.name for t in trials))
    summary.finished = sum(map(is_finished, trials))
    best = storage.best_trial(trials)
    if best is not None:
        summary.best_value, summary.best_params, summary.best_trial = best.value, best.params, best.number
    summary.test = storage.BestTrialScore.of(study)
    return summary


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
        rdb = storage.open_storage(options.storage, options.heartbeat_interval, options.grace_period)
        work(spec, options, 0, reporter_factory, splits, rdb)
    else:  # each worker process opens its own; the parent opens it once they are done
        target = functools.partial(work, spec, options, reporter_factory=reporter_factory)
        workers.run(target, options.jobs, options.storage)
        rdb = storage.open_storage(options.storage)
    artifacts = storage.DatabaseArtifactStore(rdb)
    summaries = []
    for condition in spec.condition_list():
        study = optuna.load_study(study_name=spec.study_name(condition), storage=rdb)
        evaluate_best(study, splits, options.results_dir, artifacts)
        summaries.append(summarize(study))
    return summaries
