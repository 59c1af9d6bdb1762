"""What a study will cost on this machine, printed before it starts (`fmsearch study`).

It times the path a trial runs, as bench.py does for the training epoch: one epoch of each
condition's configurations through engine.time_epoch, with this machine's speed settings, plus the
teachers a distill condition may train. The bound assumes every trial runs every epoch and no
teacher is cached, so a study that prunes, stops early or reuses teachers finishes sooner.
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
