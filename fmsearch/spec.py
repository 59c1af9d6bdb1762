"""Study files: studies/NAME.toml -> a validated, frozen StudySpec, or one SpecError line.

A study file says which training parameters are fixed, which are conditions (each combination is
its own Optuna study) and which are searched. Every key is checked before anything trains.
"""

from __future__ import annotations

import itertools
import re
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from fmsearch.engine import MONITORS, OPTIMIZERS, SCHEDULES, UNLABELED, TrainConfig
from fmsearch.models import ARCHITECTURES

# Training parameters a study may fix, condition on or search, with their types and choices.
PARAMETERS: dict[str, type] = {
    "arch": str,
    "lr": float,
    "dropout": float,
    "optimizer": str,
    "schedule": str,
    "weight_decay": float,
    "labeled_fraction": float,
    "labeled_count": int,
    "unlabeled": str,
    "tau": float,
    "lambda_u": float,
    "debias": bool,
    "warmup_epochs": int,
    "augment": bool,
    "seed": int,
    "monitor": str,
    "amp": bool,
    "channels_last": bool,
    "compile": bool,
}
CHOICES: dict[str, tuple] = {
    "arch": tuple(sorted(ARCHITECTURES)),
    "optimizer": OPTIMIZERS,
    "schedule": SCHEDULES,
    "unlabeled": UNLABELED,
    "monitor": MONITORS,
}
# The order in which dimensions are suggested: a conditional one comes after what it depends on.
SUGGEST_ORDER = tuple(PARAMETERS)
PRUNERS = ("median", "percentile", "hyperband", "none")
SAMPLERS = ("tpe", "random")
METRICS = ("val_accuracy",)
TOP_LEVEL = {
    "description",
    "trials",
    "max_epochs",
    "batch_size",
    "patience",
    "metric",
    "pool_limit",
    "sampler",
    "pruner",
    "fixed",
    "conditions",
    "space",
}


# A study's name is its file's stem; it names folders under results/, so it cannot climb out of them.
STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class SpecError(ValueError):
    """A study file is wrong; the message names the file, the key and the fix."""


def is_semi(params: dict[str, Any]) -> bool:
    """True when some training labels are hidden."""
    return params.get("labeled_count") is not None or params.get("labeled_fraction", 1.0) < 1.0


def applies(name: str, params: dict[str, Any]) -> bool:
    """Whether a parameter means anything given those already chosen (conditional dimensions)."""
    if name in ("unlabeled", "warmup_epochs"):
        return is_semi(params)
    if name in ("tau", "lambda_u", "debias"):
        return is_semi(params) and params.get("unlabeled") == "pseudo"
    return True


@dataclass(frozen=True)
class Categorical:
    choices: tuple


@dataclass(frozen=True)
class Range:
    low: float
    high: float
    log: bool = False
    integer: bool = False


Dimension = Categorical | Range


@dataclass(frozen=True)
class PrunerSpec:
    name: str = "median"  # median, percentile, hyperband or none
    warmup_epochs: int = 2  # epochs before a trial may be pruned
    startup_trials: int = 3  # finished trials before pruning starts
    percentile: float = 25.0  # percentile pruner: keep trials above this percentile


@dataclass(frozen=True)
class SamplerSpec:
    name: str = "tpe"  # tpe or random
    seed: int = 0
    multivariate: bool = True  # TPE models the dimensions jointly
    startup_trials: int = 5  # random trials before TPE takes over


@dataclass(frozen=True)
class StudySpec:
    name: str
    path: Path
    description: str
    trials: int  # per condition
    max_epochs: int
    batch_size: int
    patience: int  # early stopping, epochs without a lower validation loss
    metric: str  # maximized
    pool_limit: int | None  # train on a slice of the pool (smoke runs)
    sampler: SamplerSpec
    pruner: PrunerSpec
    fixed: dict[str, Any]
    conditions: dict[str, tuple]
    space: dict[str, Dimension]

    def condition_list(self) -> list[dict[str, Any]]:
        """Every combination of the condition values, in file order."""
        keys = list(self.conditions)
        return [
            dict(zip(keys, values, strict=True)) for values in itertools.product(*self.conditions.values())
        ]

    def study_name(self, condition: dict[str, Any]) -> str:
        """The Optuna study name of one condition, e.g. 'semi/labels=10%'."""
        if not condition:
            return self.name
        return f"{self.name}/" + ",".join(condition_label(k, v) for k, v in condition.items())


def condition_label(key: str, value: Any) -> str:
    if key == "labeled_fraction":
        return f"labels={value * 100:g}%"
    return f"{key}={value}"


def _fail(path: Path, key: str, problem: str, fix: str) -> SpecError:
    return SpecError(f"{path}: {key}: {problem}; {fix}")


def _check_type(path: Path, key: str, name: str, value: Any) -> Any:
    expected = PARAMETERS[name]
    ok = isinstance(value, expected) and not (expected is not bool and isinstance(value, bool))
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise _fail(path, key, f"{value!r} is not a {expected.__name__}", f"write a {expected.__name__}")
    if name in CHOICES and value not in CHOICES[name]:
        raise _fail(path, key, f"unknown value {value!r}", f"choose from {list(CHOICES[name])}")
    return value


def _check_param_name(path: Path, key: str, name: str) -> None:
    if name not in PARAMETERS:
        raise _fail(path, key, "unknown parameter", f"use one of {sorted(PARAMETERS)}")


def _dimension(path: Path, name: str, raw: Any) -> Dimension:
    key = f"space.{name}"
    if isinstance(raw, list):
        if not raw:
            raise _fail(path, key, "empty list", "list at least one value")
        return Categorical(tuple(_check_type(path, key, name, v) for v in raw))
    if not isinstance(raw, dict):
        raise _fail(
            path, key, f"{raw!r} is neither a list nor a range", "write [a, b] or {low = .., high = ..}"
        )
    unknown = set(raw) - {"low", "high", "log"}
    if unknown:
        raise _fail(path, key, f"unknown range key {sorted(unknown)[0]!r}", "use low, high and log")
    if PARAMETERS[name] not in (int, float):
        raise _fail(path, key, "a range needs a numeric parameter", "list the choices instead")
    if "low" not in raw or "high" not in raw:
        raise _fail(path, key, "a range needs both low and high", "write {low = .., high = ..}")
    low, high = (_check_type(path, key, name, raw[b]) for b in ("low", "high"))
    log = raw.get("log", False)
    if not isinstance(log, bool):
        raise _fail(path, key, f"log = {log!r} is not a boolean", "write log = true or log = false")
    if not low < high:
        raise _fail(path, key, f"low {low} is not below high {high}", "swap them or widen the range")
    if log and low <= 0:
        raise _fail(path, key, f"a log range needs low > 0, got {low}", "raise low or drop log")
    return Range(low, high, log, integer=PARAMETERS[name] is int)


def _section(path: Path, raw: dict, key: str) -> dict:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise _fail(path, key, "must be a table", f"write [{key}]")
    return value


def _dataclass_from(path: Path, key: str, cls: type, raw: dict, allowed_names: tuple | None):
    known = {f.name: f for f in fields(cls)}
    values = {}
    for name, value in raw.items():
        if name not in known:
            raise _fail(path, f"{key}.{name}", "unknown key", f"use one of {sorted(known)}")
        default = getattr(cls(), name)
        if type(value) is not type(default) and not (isinstance(default, float) and type(value) is int):
            raise _fail(path, f"{key}.{name}", f"{value!r} is not a {type(default).__name__}", "fix the type")
        values[name] = value
    result = cls(**values)
    if allowed_names is not None and result.name not in allowed_names:
        raise _fail(
            path, f"{key}.name", f"unknown {key} {result.name!r}", f"choose from {list(allowed_names)}"
        )
    return result


def _positive_int(path: Path, raw: dict, key: str, default: int | None) -> int | None:
    value = raw.get(key, default)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _fail(path, key, f"{value!r} is not a positive integer", "write a whole number of at least 1")
    return value


def parse(path: Path, text: str | None = None) -> StudySpec:
    """Read and validate a study file; raises SpecError with a one-line message."""
    path = Path(path)
    if not STUDY_NAME.fullmatch(path.stem):
        raise SpecError(
            f"{path}: {path.stem!r} is not a study name (it names the folder under results/): "
            "name the file like semi.toml, with letters, digits, '-', '_' or '.', not starting with '.'"
        )
    try:
        text = path.read_text() if text is None else text
    except OSError as error:
        raise SpecError(
            f"{path}: cannot read ({error.strerror}); check the study name under studies/"
        ) from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise SpecError(f"{path}: not valid TOML ({error}); fix the syntax") from None

    for key in raw:
        if key not in TOP_LEVEL:
            raise _fail(path, key, "unknown key", f"use one of {sorted(TOP_LEVEL)}")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise _fail(path, "description", "must be a string", 'write description = "..."')
    metric = raw.get("metric", "val_accuracy")
    if metric not in METRICS:
        raise _fail(path, "metric", f"unsupported metric {metric!r}", f"use one of {list(METRICS)}")

    fixed_raw, conditions_raw, space_raw = (_section(path, raw, k) for k in ("fixed", "conditions", "space"))
    seen: dict[str, str] = {}
    for section, table in (("fixed", fixed_raw), ("conditions", conditions_raw), ("space", space_raw)):
        for name in table:
            _check_param_name(path, f"{section}.{name}", name)
            if name in seen:
                raise _fail(
                    path, f"{section}.{name}", f"also set in [{seen[name]}]", "keep it in one section"
                )
            seen[name] = section

    fixed = {name: _check_type(path, f"fixed.{name}", name, v) for name, v in fixed_raw.items()}
    conditions: dict[str, tuple] = {}
    for name, values in conditions_raw.items():
        key = f"conditions.{name}"
        if not isinstance(values, list) or not values:
            raise _fail(path, key, "must be a non-empty list", f"write {name} = [value, ...]")
        conditions[name] = tuple(_check_type(path, key, name, v) for v in values)
    space = {name: _dimension(path, name, dim) for name, dim in space_raw.items()}

    spec = StudySpec(
        name=path.stem,
        path=path,
        description=description,
        trials=_positive_int(path, raw, "trials", 20),
        max_epochs=_positive_int(path, raw, "max_epochs", 15),
        batch_size=_positive_int(path, raw, "batch_size", 64),
        patience=_positive_int(path, raw, "patience", 3),
        metric=metric,
        pool_limit=_positive_int(path, raw, "pool_limit", None),
        sampler=_dataclass_from(path, "sampler", SamplerSpec, _section(path, raw, "sampler"), SAMPLERS),
        pruner=_dataclass_from(path, "pruner", PrunerSpec, _section(path, raw, "pruner"), PRUNERS),
        fixed=fixed,
        conditions=conditions,
        space=space,
    )
    # Every fixed/condition value must make a valid TrainConfig (ranges such as dropout < 1).
    for condition in spec.condition_list():
        try:
            TrainConfig(**{**fixed, **condition})
        except ValueError as error:
            raise _fail(path, "fixed/conditions", str(error), "fix the value") from None
    return spec


def suggest(trial, spec: StudySpec, condition: dict[str, Any], max_epochs: int | None = None) -> TrainConfig:
    """The search space's one door: [space] -> trial.suggest_* -> a TrainConfig.

    Fixed values and the condition come first; a dimension is suggested only where it applies
    (e.g. tau only for pseudo-label runs), under the spec's own parameter name.
    """
    params: dict[str, Any] = {**spec.fixed, **condition}
    for name in SUGGEST_ORDER:
        dimension = spec.space.get(name)
        if dimension is None or not applies(name, params):
            continue
        if isinstance(dimension, Categorical):
            params[name] = trial.suggest_categorical(name, list(dimension.choices))
        elif dimension.integer:
            params[name] = trial.suggest_int(name, int(dimension.low), int(dimension.high), log=dimension.log)
        else:
            params[name] = trial.suggest_float(name, dimension.low, dimension.high, log=dimension.log)
    return TrainConfig(
        **params,
        epochs=max_epochs or spec.max_epochs,
        batch_size=spec.batch_size,
        patience=spec.patience,
    )


def find(name: str, studies_dir: Path) -> Path:
    """studies/NAME.toml, or a SpecError listing the studies that exist."""
    path = Path(name) if name.endswith(".toml") else Path(studies_dir) / f"{name}.toml"
    if not path.exists():
        known = sorted(p.stem for p in Path(studies_dir).glob("*.toml"))
        raise SpecError(f"{path}: no such study file; choose one of {known} or write {path}")
    return path


def upper_bound_epochs(spec: StudySpec, trials: int, max_epochs: int) -> int:
    """Epochs the study would cost if every trial ran to max epochs."""
    return len(spec.condition_list()) * trials * max_epochs
