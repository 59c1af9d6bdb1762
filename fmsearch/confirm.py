"""Confirmation: each condition's best configuration trained again on seeds the search never used.

A search picks its best trial on one seed, and that pick is optimistic. `confirm` reruns the best
configuration of every condition on `[confirm] seeds` new seeds (seed + 1, seed + 2, ...), scores each
rerun once on the test set, and keeps the reruns as trials of a study of their own in the same storage,
'<spec>@confirm/<condition>', where the dashboard and the report read them. A rerun never repeats a
finished seed: raising the seeds, or running again after a kill, runs only the missing ones. If the
search's best trial changes, its reruns start afresh beside the old ones, which name their source.
A condition whose search is short of its trials is left until the search ends (its best may still
change), and no rerun starts after a time budget's deadline. Where a condition searched nothing, its
one trial was not chosen from others and is not optimistic: it counts as the first of the seeds.
Several workers (`fmsearch confirm --jobs N`) share the reruns, each claiming the next missing seed
under the confirmation study's gate, the longest reruns first.
"""

from __future__ import annotations

import functools
import os
import statistics
import time
from dataclasses import asdict, dataclass, field, replace

import optuna
from optuna.trial import TrialState

from fmsearch import data, engine, runner, speed, storage, workers
from fmsearch.config import TrainConfig
from fmsearch.spec import StudySpec
from fmsearch.storage import Attr
from fmsearch.study import RunOptions, load_splits


@dataclass
class Confirmed:
    """One condition's confirmation: its source trial and the test accuracy of each finished seed."""

    study_name: str
    source_trial: int
    test_accuracy: dict[int, float] = field(default_factory=dict)  # seed -> test accuracy

    def mean_sd(self) -> tuple[float, float, int]:
        """Mean, sd and n of the finished seeds (nan where too few for one)."""
        values = list(self.test_accuracy.values())
        mean = statistics.mean(values) if values else float("nan")
        sd = statistics.stdev(values) if len(values) > 1 else float("nan")
        return mean, sd, len(values)


def seeds(config_seed: int, count: int) -> list[int]:
    """The confirmation seeds of a configuration searched on `config_seed`: never that seed."""
    return [(config_seed + k) % 2**32 for k in range(1, count + 1)]


def silent(line: str) -> None:
    """The default log: says nothing (a function, so that it reaches worker processes)."""


@dataclass(frozen=True)
class Target:
    """A condition ready to confirm: its search's best trial, that trial's configuration, and the seeds
    to rerun it on (all of them, finished or not)."""

    study_name: str
    source_trial: int
    config: TrainConfig
    seeds: tuple[int, ...]
    own: dict[int, float]  # a trial that searched nothing: its own seed and test score (one of the seeds)
    seconds: float  # how long the search's trial took: the longest reruns are started first


def targets(spec: StudySpec, rdb: optuna.storages.BaseStorage, log=silent) -> list[Target]:
    """The conditions whose search has ended, in the spec's order; a line for each that has not.

    A rerun still RUNNING in a confirmation study is a killed one (a confirmation runs under one
    command at a time), so it is failed here, before any worker starts.
    """
    found = []
    for condition in spec.condition_list():
        name = spec.study_name(condition)
        searched = optuna.load_study(study_name=name, storage=rdb)
        trials = searched.get_trials(deepcopy=False)
        best = storage.best_trial(trials)
        if best is None:
            log(f"{name}: no finished trial to confirm yet")
            continue
        finished = sum(map(storage.is_finished, trials))
        if finished < spec.trials:
            log(
                f"{name}: its search has {finished} of {spec.trials} finished trials, and its best may "
                f"still change: confirmed once the search ends (`fmsearch study {spec.name}` resumes it)"
            )
            continue
        config = runner.stored_config(name, best)
        study = optuna.create_study(
            study_name=storage.confirm_name(name), storage=rdb, direction="maximize", load_if_exists=True
        )
        for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            study.tell(stale.number, state=TrialState.FAIL)
        own_score = storage.BestTrialScore.of(searched)
        own = {}
        if storage.unselected(best) and own_score is not None and own_score.trial == best.number:
            own = {config.seed: own_score.test_accuracy}  # one of the seeds: nothing picked it
        wanted = seeds(config.seed, spec.confirm.seeds - len(own))
        took = (best.datetime_complete - best.datetime_start).total_seconds() if best.datetime_complete else 0
        found.append(Target(name, best.number, config, tuple(wanted), own, took))
    return found


def confirm(
    spec: StudySpec,
    rdb: optuna.storages.BaseStorage,
    splits: data.Splits,
    options: RunOptions,
    log=silent,
) -> list[Confirmed]:
    """Rerun each finished search's best configuration on the missing confirmation seeds, with
    `options.jobs` workers and starting no rerun after `options.deadline`; then each condition's
    scores, read from the storage.

    With one job the caller's `splits` and `rdb` serve; with more, each worker process loads its own
    and takes an equal share of the CPU's cores, as a search's workers do.
    """
    ready = targets(spec, rdb, log)
    if options.jobs == 1:
        work(ready, rdb, splits, options.results_dir, log, options.deadline)
    elif ready:
        workers.run(functools.partial(_worker, spec, ready, options, log), options.jobs, options.storage)
    confirmed = []
    for target in ready:
        searched = optuna.load_study(study_name=target.study_name, storage=rdb)
        scores = {**target.own, **storage.confirmed_scores(searched, target.source_trial)}
        confirmed.append(Confirmed(target.study_name, target.source_trial, scores))
    return confirmed


def work(
    ready: list[Target],
    rdb: optuna.storages.BaseStorage,
    splits: data.Splits,
    results_dir,
    log=silent,
    deadline: float | None = None,
    thread_cap: int | None = None,
) -> None:
    """Take the next missing rerun, longest first, train it, and go on until none is left (or the
    deadline has passed). Claiming a seed is serialized by the confirmation study's gate, so workers
    sharing the reruns never train the same seed twice."""
    by_length = sorted(ready, key=lambda t: t.seconds, reverse=True)
    while True:
        claims = (_claim(rdb, target, deadline, splits.train_images.device) for target in by_length)
        claimed = next((c for c in claims if c is not None), None)
        if claimed is None:
            return
        if claimed == LATE:
            log("time budget reached: no rerun started after it; run the same command to resume")
            return
        target, study, trial, config = claimed
        execution = speed.settle(config, splits.train_images.device, thread_cap=thread_cap)
        score = _rerun(study, trial, config, splits, results_dir, execution)
        rerun = f"{target.study_name}: trial #{target.source_trial} on seed {config.seed}"
        log(f"{rerun}: test_accuracy {score:.4f}")


LATE = "late"  # _claim: a seed is missing, but the deadline has passed


def _claim(rdb: optuna.storages.BaseStorage, target: Target, deadline: float | None, device):
    """Under the gate, the next seed of `target` that no rerun has finished or is running, as a new
    trial of the confirmation study that names it: (target, study, trial, config). None when no seed
    is missing; LATE when one is but the deadline has passed."""
    name = storage.confirm_name(target.study_name)
    with storage.Gate(rdb, name):
        searched = optuna.load_study(study_name=target.study_name, storage=rdb)
        taken = set(storage.confirmed_scores(searched, target.source_trial))
        study = optuna.load_study(study_name=name, storage=rdb)
        for running in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if running.user_attrs.get(Attr.SOURCE_TRIAL) == target.source_trial:
                taken.add(running.user_attrs[Attr.CONFIG]["seed"])
        missing = [seed for seed in target.seeds if seed not in taken]
        if not missing:
            return None
        if deadline is not None and time.time() >= deadline:
            return LATE
        config = replace(target.config, seed=missing[0])
        trial = study.ask()
        trial.set_user_attr(Attr.SOURCE_TRIAL, target.source_trial)
        trial.set_user_attr(Attr.CONFIG, asdict(config))  # the seed it claims, before the gate opens
        for key, value in runner.provenance(device).items():  # which worker, code and torch, as a trial's
            trial.set_user_attr(key, value)
        return target, study, trial, config


def _worker(spec: StudySpec, ready: list[Target], options: RunOptions, log, worker: int) -> None:
    """One of `options.jobs` worker processes: its own data and storage connection, its share of the
    cores."""
    storage.quiet_optuna()
    rdb = storage.open_storage(options.storage)
    splits = load_splits(spec, options)
    thread_cap = max(1, (os.cpu_count() or 1) // options.jobs) if options.device.type == "cpu" else None
    work(ready, rdb, splits, options.results_dir, log, options.deadline, thread_cap)


def _rerun(
    study: optuna.Study, trial: optuna.Trial, config, splits: data.Splits, results_dir, execution
) -> float:
    """Train `config` once, as the claimed trial of the confirmation study; its test accuracy."""
    try:
        done = runner.run(config, splits, results_dir, execution=execution)
    except BaseException:
        study.tell(trial, state=TrialState.FAIL)
        raise
    for key, value in done.record().items():
        trial.set_user_attr(key, value)
    test = engine.score_by_monitor(done.result, splits, config)[config.monitor]
    trial.set_user_attr(Attr.TEST, {key: test[key] for key in ("test_loss", "test_accuracy", "test_recall")})
    study.tell(trial, done.result.best["val_accuracy"])
    return test["test_accuracy"]
