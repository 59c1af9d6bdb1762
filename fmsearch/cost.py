"""What a study will cost on this machine, printed before it starts (`fmsearch study`).

It times the path a trial runs, as bench.py does for the training epoch: one epoch of each
condition's configurations through engine.time_epoch, with this machine's speed settings, plus the
teachers a distill condition may train, then the confirmation reruns. The bound assumes every trial
runs every epoch and no teacher is cached, so a study that prunes, stops early or reuses teachers
finishes sooner.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna

from fmsearch import data, engine, speed, teachers
from fmsearch.spec import Categorical, StudySpec, suggest


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
    max_epochs: int
    trials: int  # still to run: a resumed study costs what is left
    epoch_seconds: dict[str, float]  # unlabeled objective -> measured seconds of one epoch; {}: none left
    team_seconds: float = 0.0  # training one team of teachers (one architecture, one seed)
    teams: int = 0  # the teams its search can ask for: one per architecture (or per trial), none cached
    own_seed: bool = False  # nothing searched here: its one run counts as a seed (spec.searches_nothing)

    def search_seconds(self) -> float:
        if not self.trials:
            return 0.0
        epochs = self.trials * self.max_epochs * max(self.epoch_seconds.values())
        return epochs + self.teams * self.team_seconds

    def reruns(self, seeds: int) -> int:
        """The confirmation runs of `seeds` seeds: less the search's own run where it counts as one."""
        return max(seeds - self.own_seed, 0)

    def confirm_seconds(self, seeds: int) -> float:
        """The best configuration's reruns of `seeds` seeds: a distill rerun trains its own seed's team."""
        if not self.trials:
            return 0.0  # searched already: `fmsearch confirm` reruns only the seeds it lacks
        team = self.team_seconds if self.teams else 0.0
        return self.reruns(seeds) * (self.max_epochs * max(self.epoch_seconds.values()) + team)


@dataclass
class Plan:
    """What a study costs at most on this machine: every trial runs every epoch, no teacher is cached."""

    confirm_seeds: int
    execution: speed.Execution
    conditions: list[ConditionCost]

    @property
    def search_seconds(self) -> float:
        return sum(c.search_seconds() for c in self.conditions)

    @property
    def confirm_seconds(self) -> float:
        return sum(c.confirm_seconds(self.confirm_seeds) for c in self.conditions)

    @property
    def max_seconds(self) -> float:
        return self.search_seconds + self.confirm_seconds


def _team_seconds(config: engine.TrainConfig, splits: data.Splits, run: speed.Execution) -> float:
    """Training the `teachers.count(config)` teachers of one architecture and one seed, and their logits."""
    cost = engine.time_epoch(teachers.recipe(config, 0), splits, run)
    images = len(splits.train_labels) + len(splits.val_labels) + len(splits.test_labels)
    logits = cost.validation * 2 * images / len(splits.val_labels)  # the image and its mirror
    return teachers.count(config) * (config.teacher_epochs * cost.seconds + logits)


def plan(spec: StudySpec, splits: data.Splits, left: dict[str, int] | None = None) -> Plan:
    """Time one epoch of each condition's configs on the path `fit` runs, with this machine's settings.

    `left`: trials still to run per study name (default: all of them); a condition with none left is
    not timed. Creates nothing; takes a few seconds per condition and objective.
    """
    conditions = []
    arch = spec.space.get("arch")
    archs = len(arch.choices) if isinstance(arch, Categorical) else 1
    device = splits.train_images.device
    for condition in spec.condition_list():
        name = spec.study_name(condition)
        trials = spec.trials if left is None else left.get(name, spec.trials)
        cost = ConditionCost(
            name, spec.setting("max_epochs", condition), trials, {}, own_seed=spec.searches_nothing(condition)
        )
        for config in representatives(spec, condition) if trials else ():
            run = speed.settle(config, device)
            cost.epoch_seconds[config.unlabeled] = engine.time_epoch(config, splits, run).seconds
            if teachers.count(config):
                # Teachers that train as the student does differ with every searched training setting.
                own = config.teacher_recipe == "student" and set(teachers.STUDENT_TRAINING) & set(spec.space)
                cost.team_seconds, cost.teams = _team_seconds(config, splits, run), trials if own else archs
        conditions.append(cost)
    execution = speed.settle(engine.TrainConfig(), device)
    return Plan(spec.confirm.seeds, execution, conditions)
