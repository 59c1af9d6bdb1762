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
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field, replace

import optuna
from optuna.trial import TrialState

from fmsearch import data, engine, runner, storage
from fmsearch.spec import StudySpec
from fmsearch.storage import Attr


@dataclass
class Confirmed:
    """One condition's confirmation: its source trial and the test accuracy of each finished seed."""

    study_name: str
    source_trial: int
    test_accuracy: dict[int, float] = field(default_factory=dict)  # seed -> test accuracy

    def mean_sd(self) -> tuple[float, float, int]:
        values = list(self.test_accuracy.values())
        sd = statistics.stdev(values) if len(values) > 1 else float("nan")
        return statistics.mean(values), sd, len(values)


def seeds(config_seed: int, count: int) -> list[int]:
    """The confirmation seeds of a configuration searched on `config_seed`: never that seed."""
    return [(config_seed + k) % 2**32 for k in range(1, count + 1)]


def confirm(
    spec: StudySpec,
    rdb: optuna.storages.BaseStorage,
    splits: data.Splits,
    results_dir,
    log=lambda line: None,
    deadline: float | None = None,
) -> list[Confirmed]:
    """Rerun each finished search's best configuration on the missing confirmation seeds, starting no
    rerun after `deadline` (a time.time())."""
    confirmed = []
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
            study.tell(stale.number, state=TrialState.FAIL)  # a killed rerun: confirm runs in one process
        done = Confirmed(name, best.number, storage.confirmed_scores(searched, best.number))
        wanted = seeds(config.seed, spec.confirm.seeds)
        own = storage.BestTrialScore.of(searched)
        if storage.unselected(best) and own is not None and own.trial == best.number:
            done.test_accuracy[config.seed] = own.test_accuracy  # one of the seeds: nothing picked it
            wanted = wanted[:-1]
        for seed in wanted:
            if seed not in done.test_accuracy:
                if deadline is not None and time.time() >= deadline:
                    log("time budget reached: no rerun started after it; run the same command to resume")
                    return confirmed + [done]
                score = _rerun(study, replace(config, seed=seed), best.number, splits, results_dir)
                done.test_accuracy[seed] = score
                log(f"{name}: trial #{best.number} on seed {seed}: test_accuracy {score:.4f}")
        confirmed.append(done)
    return confirmed


def _rerun(study: optuna.Study, config, source_trial: int, splits: data.Splits, results_dir) -> float:
    """Train `config` once, as a trial of the confirmation study; its test accuracy."""
    trial = study.ask()
    trial.set_user_attr(Attr.SOURCE_TRIAL, source_trial)
    trial.set_user_attr(Attr.CONFIG, asdict(config))
    try:
        done = runner.run(config, splits, results_dir)  # with this machine's speed settings
    except BaseException:
        study.tell(trial, state=TrialState.FAIL)
        raise
    for key, value in done.record().items():
        trial.set_user_attr(key, value)
    test = engine.score_by_monitor(done.result, splits, config)[config.monitor]
    trial.set_user_attr(Attr.TEST, {key: test[key] for key in ("test_loss", "test_accuracy", "test_recall")})
    study.tell(trial, done.result.best["val_accuracy"])
    return test["test_accuracy"]
