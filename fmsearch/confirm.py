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
A rerun keeps its trial's precision: bf16 autocast changes the arithmetic, not only the speed, so
where the trial let the machine choose (`amp` unset), its reruns run as it ran, even on a machine
that would choose otherwise; the other execution settings are this machine's choice.
Several workers (`fmsearch confirm --jobs N`, on one machine or more) share the reruns, each claiming
the next missing seed under the confirmation study's gate, the longest reruns first; a rerun sends
heartbeats while it trains, so a rerun whose process died is failed and its seed claimed again.
"""

from __future__ import annotations

import functools
import statistics
import uuid
from dataclasses import asdict, dataclass, field, replace

import optuna
from optuna.storages import fail_stale_trials
from optuna.trial import TrialState

from fmsearch import data, engine, runner, speed, storage, words, workers
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

    def text(self) -> str:
        """'test_accuracy 0.9039 ± 0.0035 (n=3)'; one seed has no spread, and says so."""
        mean, sd, n = self.mean_sd()
        if not n:
            return "no seed has finished yet"
        spread = f"± {sd:.4f} (n={n})" if n > 1 else "(n=1, a single run: no spread yet)"
        return f"test_accuracy {mean:.4f} {spread}"


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
    """The conditions whose search has ended, in the spec's order (each with its confirmation study,
    created here); a line for each that has not."""
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
        if config.amp is None:  # the precision the trial ran in, whatever this machine would choose
            config = replace(config, amp=best.user_attrs.get(Attr.EXECUTION, {}).get("amp"))
        optuna.create_study(
            study_name=storage.confirm_name(name), storage=rdb, direction="maximize", load_if_exists=True
        )
        own_score = storage.BestTrialScore.of(searched)
        own = {}
        if storage.unselected(best) and own_score is not None and own_score.trial == best.number:
            own = {config.seed: own_score.test_accuracy}  # one of the seeds: nothing picked it
        wanted = seeds(config.seed, spec.confirm.seeds - len(own))
        took = (best.datetime_complete - best.datetime_start).total_seconds() if best.datetime_complete else 0
        found.append(Target(name, best.number, config, tuple(wanted), own, took))
    return found


LATE = "time budget reached: no rerun started after it; run the same command to resume"


def confirm(
    spec: StudySpec,
    rdb: optuna.storages.BaseStorage,
    splits: data.Splits,
    options: RunOptions,
    log=silent,
) -> list[Confirmed]:
    """Rerun each finished search's best configuration on the missing confirmation seeds, with up to
    `options.jobs` workers and starting no rerun after `options.deadline`; then each condition's
    scores, read from the storage.

    With one job the caller's `splits` serve; with more, each worker process loads its own and takes
    an equal share of the CPU's cores, as a search's workers do, and `log` runs in the workers (it
    must pickle: `print` does).
    """
    ready = targets(spec, rdb, log)
    command = uuid.uuid4().hex  # the seeds this command has failed are not claimed by it again
    beating = _beating_storage(options)
    for target in ready:
        with storage.Gate(beating, storage.confirm_name(target.study_name)):
            _fail_dead(beating, target)
    left = sum(len(_missing(beating, target, command)) for target in ready)
    jobs = 0 if options.out_of_time() else min(options.jobs, left)  # no worker without a rerun to start
    if jobs == 1:
        work(ready, splits, options, command, log)
    elif jobs > 1:
        target = functools.partial(_worker, spec, ready, replace(options, jobs=jobs), command, log)
        workers.run(target, jobs, options.storage)
    if options.out_of_time() and any(_missing(beating, target, command) for target in ready):
        log(LATE)
    confirmed = []
    for target in ready:
        searched = optuna.load_study(study_name=target.study_name, storage=rdb)
        scores = {**target.own, **storage.confirmed_scores(searched, target.source_trial)}
        confirmed.append(Confirmed(target.study_name, target.source_trial, scores))
    return confirmed


def _beating_storage(options: RunOptions) -> storage.Storage:
    """The storage with the run's heartbeat, and without a retry: a dead rerun's seed is claimed again."""
    return storage.open_storage(
        options.storage, options.heartbeat_interval, options.grace_period, retry=False
    )


def work(ready: list[Target], splits: data.Splits, options: RunOptions, command: str, log=silent) -> None:
    """Take the next missing rerun, longest first, train it, and go on until none is left or the
    deadline has passed.

    Claiming a seed is serialized by the confirmation study's gate, so workers sharing the reruns, on
    this machine or others, never train the same seed at once. A rerun runs as a search trial does,
    through `study.optimize`: it beats while it trains, and one whose process died stops, so the next
    claim fails it and its seed is free again.
    """
    rdb = _beating_storage(options)
    by_length = sorted(ready, key=lambda t: t.seconds, reverse=True)
    while not options.out_of_time():
        runs = (_claim_and_run(rdb, target, command, splits, options, log) for target in by_length)
        done = next((d for d in runs if d is not None), None)
        if done is None:
            return
        target, seed, score = done
        log(f"{target.study_name}: trial #{target.source_trial} on seed {seed}: test_accuracy {score:.4f}")


def _fail_dead(rdb: storage.Storage, target: Target) -> None:
    """Fail the target's reruns whose process died (call under its confirmation study's gate)."""
    study = optuna.load_study(study_name=storage.confirm_name(target.study_name), storage=rdb)
    fail_stale_trials(study)  # their heartbeat stopped over the grace period ago
    storage.fail_heartbeatless_trials(study)  # they never sent one (killed at once, or older code)


def _missing(rdb: optuna.storages.BaseStorage, target: Target, command: str) -> list[int]:
    """The seeds of `target` that no rerun has finished, is running, or (in this command) has failed."""
    searched = optuna.load_study(study_name=target.study_name, storage=rdb)
    taken = set(storage.confirmed_scores(searched, target.source_trial))
    study = optuna.load_study(study_name=storage.confirm_name(target.study_name), storage=rdb)
    for rerun in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.FAIL)):
        attrs = rerun.user_attrs
        mine = rerun.state == TrialState.RUNNING or attrs.get(Attr.COMMAND) == command
        if mine and attrs.get(Attr.SOURCE_TRIAL) == target.source_trial:
            taken.add(attrs.get(Attr.CONFIG, {}).get("seed"))
    return [seed for seed in target.seeds if seed not in taken]


def _claim_and_run(
    rdb: storage.Storage, target: Target, command: str, splits: data.Splits, options: RunOptions, log=silent
) -> tuple[Target, int, float] | None:
    """Under the gate, fail the reruns whose process died and claim the next missing seed of `target`
    as a new trial that names it; the gate opens once it does, a line says so, and the rerun trains.
    (target, seed, test accuracy), or None where no seed is missing."""
    name = storage.confirm_name(target.study_name)
    gate = storage.Gate(rdb, name)
    gate.acquire()
    try:
        _fail_dead(rdb, target)
        missing = _missing(rdb, target, command)
        if not missing:
            return None
        config = replace(target.config, seed=missing[0])
        device = splits.train_images.device
        scores: dict[str, float] = {}

        def rerun(trial: optuna.Trial) -> float:
            trial.set_user_attr(Attr.CONFIG, asdict(config))  # the seed it claims, before the gate opens
            trial.set_user_attr(Attr.SOURCE_TRIAL, target.source_trial)
            trial.set_user_attr(Attr.COMMAND, command)
            for key, value in runner.provenance(device).items():  # its worker, code and torch
                trial.set_user_attr(key, value)
            gate.release()
            took = f" (its own run took {words.duration(target.seconds)})" if target.seconds else ""
            log(f"{target.study_name}: trial #{target.source_trial} on seed {config.seed}: started{took}")
            return _train(trial, config, splits, options, scores)

        optuna.load_study(study_name=name, storage=rdb).optimize(rerun, n_trials=1, gc_after_trial=False)
        return target, config.seed, scores["test_accuracy"]
    finally:
        gate.release()  # the rerun opened it once its trial existed; this is for the rest


def _worker(
    spec: StudySpec, ready: list[Target], options: RunOptions, command: str, log, worker: int
) -> None:
    """One of `options.jobs` worker processes: its own data and storage connection."""
    storage.quiet_optuna()
    work(ready, load_splits(spec, options), options, command, log)


def _train(trial: optuna.Trial, config, splits: data.Splits, options: RunOptions, scores: dict) -> float:
    """Train `config` once as the claimed trial, record it and its test score (into `scores` too); its
    validation accuracy, the trial's value. Optuna fails the trial if this raises or is stopped."""
    execution = speed.settle(config, splits.train_images.device, thread_cap=options.thread_cap())
    done = runner.run(config, splits, options.results_dir, execution=execution)
    for key, value in done.record().items():
        trial.set_user_attr(key, value)
    test = engine.score_by_monitor(done.result, splits, config)[config.monitor]
    scores.update({key: test[key] for key in ("test_loss", "test_accuracy", "test_recall")})
    trial.set_user_attr(Attr.TEST, scores)
    return done.result.best["val_accuracy"]
