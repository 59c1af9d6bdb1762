"""Study files: studies/NAME.toml -> a validated, frozen StudySpec, or one SpecError line.

A study file says which training parameters are fixed, which are conditions (each combination is
its own Optuna study) and which are searched. Every key is checked before anything trains.
"""

from __future__ import annotations

import itertools
import math
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fmsearch.config import TrainConfig
from fmsearch.errors import FmsearchError
from fmsearch.params import Param, param, parameters
from fmsearch.storage import study_name

# Training parameters a study may fix, condition on or search: TrainConfig's, less the run-level ones.
PARAMETERS: dict[str, Param] = {name: p for name, p in parameters(TrainConfig).items() if p.study}
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
    "val_size",
    "sampler",
    "pruner",
    "fixed",
    "conditions",
    "space",
    "confirm",
    "override",
}
# What an [[override]] may set for the conditions it matches: the top-level keys that must suit an
# objective (a distill student peaks late, so a patience that suits skip stops it early).
# Its `fixed` table sets training parameters for them, over the file's [fixed] (a budget's own lr), but
# none that decides which conditions exist or what they are.
OVERRIDABLE = ("max_epochs", "patience")
DEFINES_CONDITIONS = ("labeled_fraction", "labeled_count", "unlabeled")


# A study's name is its file's stem; it names folders under results/, so it cannot climb out of them.
STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class SpecError(FmsearchError):
    """A study file is wrong; the message names the file, the key and the fix."""


def is_semi(params: dict[str, Any]) -> bool:
    """True when some training labels are hidden."""
    return params.get("labeled_count") is not None or params.get("labeled_fraction", 1.0) < 1.0


def applies(name: str, params: dict[str, Any]) -> bool:
    """Whether a parameter means anything given those already chosen (conditional dimensions)."""
    declared = PARAMETERS[name]
    if declared.objectives:
        unlabeled = params.get("unlabeled", PARAMETERS["unlabeled"].default)
        return is_semi(params) and unlabeled in declared.objectives
    return is_semi(params) if declared.semi else True


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
    name: str = param("median", "the pruner", choices=PRUNERS)
    warmup_epochs: int = param(2, "epochs before a trial may be pruned", low=0)
    startup_trials: int = param(3, "finished trials before pruning starts", low=0)
    percentile: float = param(
        25.0, "percentile pruner: keep trials above this percentile", low=0.0, high=100.0
    )


@dataclass(frozen=True)
class SamplerSpec:
    name: str = param("tpe", "the sampler", choices=SAMPLERS)
    seed: int = param(0, "the sampler's seed", low=0, high=2**32 - 1)
    multivariate: bool = param(True, "TPE models the dimensions jointly")
    startup_trials: int = param(5, "random trials before TPE takes over", low=0)


@dataclass(frozen=True)
class ConfirmSpec:
    """The search's last step: each condition's best configuration trained again on new seeds."""

    seeds: int = param(3, "seeds the best configuration is trained again on, each scored once on test", low=0)


@dataclass(frozen=True)
class Override:
    """An [[override]] table: settings of its own for the conditions whose values match `when`."""

    when: dict[str, Any]
    settings: dict[str, int]  # of OVERRIDABLE
    fixed: dict[str, Any] = field(default_factory=dict)  # training parameters over the file's [fixed]

    def matches(self, condition: dict[str, Any]) -> bool:
        return all(condition.get(key) == value for key, value in self.when.items())


@dataclass(frozen=True)
class StudySpec:
    name: str
    path: Path
    description: str
    trials: int  # per condition
    max_epochs: int
    batch_size: int
    patience: int  # early stopping: epochs without a better value of the monitor (the metric)
    metric: str  # maximized
    pool_limit: int | None  # train on a slice of the pool (smoke runs)
    val_size: int | None  # images held out for validation (None: data.DataConfig's 10,000)
    sampler: SamplerSpec
    pruner: PrunerSpec
    fixed: dict[str, Any]
    conditions: dict[str, tuple]
    space: dict[str, Dimension]
    confirm: ConfirmSpec = ConfirmSpec()  # not in the fingerprint: raising its seeds resumes
    overrides: tuple[Override, ...] = ()

    def condition_list(self) -> list[dict[str, Any]]:
        """Every combination of the condition values, in file order, less the keys that mean nothing in
        it: `unlabeled` under full labels, so [1.0, 0.1] x [skip, distill] is three conditions, not four."""
        keys, found = list(self.conditions), []
        for values in itertools.product(*self.conditions.values()):
            combination = dict(zip(keys, values, strict=True))
            given = {**self.fixed, **combination}
            condition = {k: v for k, v in combination.items() if applies(k, given)}
            if condition not in found:
                found.append(condition)
        return found

    def fixed_for(self, condition: dict[str, Any]) -> dict[str, Any]:
        """The fixed training parameters of one condition: the file's [fixed], then its [[override]]'s."""
        fixed = dict(self.fixed)
        for override in self.overrides:
            if override.matches(condition):
                fixed.update(override.fixed)
        return fixed

    def setting(self, name: str, condition: dict[str, Any]) -> Any:
        """max_epochs or patience for one condition: its [[override]]'s where one matches, else the file's."""
        for override in self.overrides:
            if name in override.settings and override.matches(condition):
                return override.settings[name]
        return getattr(self, name)

    def searches_nothing(self, condition: dict[str, Any]) -> bool:
        """No [space] dimension applies in this condition: its one run was picked from nothing, so its
        own test score counts as a confirmation seed. A trial it ran has no distributions
        (storage.unselected reads the same from the storage, where the report and `confirm` look)."""
        params = {**self.fixed_for(condition), **condition}
        return not any(applies(name, params) for name in self.space)

    def study_name(self, condition: dict[str, Any]) -> str:
        """The Optuna study name of one condition, e.g. 'semi/labels=10%'."""
        return study_name(self.name, ",".join(condition_label(k, v) for k, v in condition.items()))

    def overridden(self, trials: int | None = None, max_epochs: int | None = None) -> StudySpec:
        """The command line's `--trials` and `--epochs` folded in, checked as the file's own are."""
        for flag, value in (("--trials", trials), ("--epochs", max_epochs)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise SpecError(f"{flag} {value!r}: give a whole number of at least 1")
        changed = replace(self, trials=trials or self.trials, max_epochs=max_epochs or self.max_epochs)
        if max_epochs:  # the command line's --epochs caps every condition, overridden ones included
            overrides = [replace(o, settings={k: v for k, v in o.settings.items() if k != "max_epochs"})
                         for o in self.overrides]  # fmt: skip
            changed = replace(changed, overrides=tuple(o for o in overrides if o.settings or o.fixed))
        _check_something_is_searched(changed, flag="--trials" if trials else None)
        return changed


def condition_label(key: str, value: Any) -> str:
    """'labels=10%' for a fraction, 'labels=500' for a count, else 'key=value' ('unlabeled=distill')."""
    if key == "labeled_fraction":
        return f"labels={value * 100:g}%"
    if key == "labeled_count":
        return f"labels={value}"
    return f"{key}={value}"


def _fail(path: Path, key: str, problem: str, fix: str) -> SpecError:
    return SpecError(f"{path}: {key}: {problem}; {fix}")


def _typed(path: Path, key: str, declared: Param, value: Any) -> Any:
    """`value` if it has its parameter's type (an int becomes a float where one is due)."""
    if not declared.type_ok(value):
        raise _fail(path, key, f"{value!r} is not {declared.type_text()}", f"write {declared.type_text()}")
    return float(value) if declared.type is float else value


def _check_value(path: Path, key: str, declared: Param, value: Any, what: str = "value") -> Any:
    """`value` if its parameter's declaration accepts it: type, then choices, then range."""
    value = _typed(path, key, declared, value)
    if declared.choices and value not in declared.choices:
        raise _fail(path, key, f"unknown {what} {value!r}", f"choose from {list(declared.choices)}")
    if declared.type in (int, float) and not math.isfinite(value):
        raise _fail(path, key, f"{value!r} is not a finite number", f"write a number for {declared.name}")
    if declared.type in (int, float) and not declared.in_range(value):
        raise _fail(
            path, key, f"{value!r} is out of range", f"{declared.name} must be {declared.range_text()}"
        )
    return value


def _values(path: Path, key: str, name: str, raw: list) -> tuple:
    """A condition's values or a categorical dimension's choices: each valid, none repeated."""
    values = tuple(_check_value(path, key, PARAMETERS[name], v) for v in raw)
    repeated = next((v for i, v in enumerate(values) if v in values[:i]), None)
    if repeated is not None:
        raise _fail(path, key, f"{repeated!r} is listed twice", "list each value once")
    return values


def _check_param_name(path: Path, key: str, name: str) -> None:
    if name not in PARAMETERS:
        raise _fail(path, key, "unknown parameter", f"use one of {sorted(PARAMETERS)}")


def _dimension(path: Path, name: str, raw: Any) -> Dimension:
    key = f"space.{name}"
    if isinstance(raw, list):
        if not raw:
            raise _fail(path, key, "empty list", "list at least one value")
        return Categorical(_values(path, key, name, raw))
    if not isinstance(raw, dict):
        raise _fail(
            path, key, f"{raw!r} is neither a list nor a range", "write [a, b] or {low = .., high = ..}"
        )
    unknown = set(raw) - {"low", "high", "log"}
    if unknown:
        raise _fail(path, key, f"unknown range key {sorted(unknown)[0]!r}", "use low, high and log")
    declared = PARAMETERS[name]
    if declared.type not in (int, float):
        raise _fail(path, key, "a range needs a numeric parameter", "list the choices instead")
    if "low" not in raw or "high" not in raw:
        raise _fail(path, key, "a range needs both low and high", "write {low = .., high = ..}")
    low, high = (_typed(path, f"{key}.{end}", declared, raw[end]) for end in ("low", "high"))
    log = raw.get("log", False)
    if not isinstance(log, bool):
        raise _fail(path, key, f"log = {log!r} is not a boolean", "write log = true or log = false")
    if not low < high:
        raise _fail(path, key, f"low {low} is not below high {high}", "swap them or widen the range")
    if log and low <= 0:
        raise _fail(path, key, f"a log range needs low > 0, got {low}", "raise low or drop log")
    for end, value in (("low", low), ("high", high)):
        _check_value(path, f"{key}.{end}", declared, value)
    return Range(low, high, log, integer=declared.type is int)


def _section(path: Path, raw: dict, key: str) -> dict:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise _fail(path, key, "must be a table", f"write [{key}]")
    return value


def _dataclass_from(path: Path, key: str, cls: type, raw: dict):
    known = parameters(cls)
    for name, value in raw.items():
        if name not in known:
            raise _fail(path, f"{key}.{name}", "unknown key", f"use one of {sorted(known)}")
        _check_value(path, f"{key}.{name}", known[name], value, what=key)
    return cls(**raw)


def _positive_int(path: Path, raw: dict, key: str, default: int | None) -> int | None:
    value = raw.get(key, default)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _fail(path, key, f"{value!r} is not a positive integer", "write a whole number of at least 1")
    return value


def _run_level(path: Path, raw: dict, key: str, field: str) -> int:
    """A top-level key that sets a TrainConfig field for every trial: its default and its rule are
    that field's (max_epochs is `epochs`), declared once in config.py."""
    declared = parameters(TrainConfig)[field]
    return _check_value(path, key, declared, raw.get(key, declared.default))


def _val_size(path: Path, raw: dict) -> int | None:
    """At least one validation image per class, and a training pool left over of the 60,000."""
    value = _positive_int(path, raw, "val_size", None)
    if value is not None and not 10 <= value <= 50_000:
        raise _fail(path, "val_size", f"{value} is out of range", "hold out between 10 and 50000 images")
    return value


def _read(path: Path) -> dict:
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as error:
        raise SpecError(
            f"{path}: cannot read ({error.strerror}); check the study name under studies/"
        ) from None
    except UnicodeDecodeError as error:
        raise SpecError(
            f"{path}: not UTF-8 text (byte {error.object[error.start]:#04x} at offset {error.start}); "
            "save the file as UTF-8"
        ) from None
    return _toml(path, text)


def _toml(path: Path, text: str) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise SpecError(f"{path}: not valid TOML ({error}); fix the syntax") from None


def _parameter_sections(path: Path, raw: dict) -> tuple[dict, dict, dict]:
    """[fixed], [conditions] and [space], each value checked by its TrainConfig declaration."""
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

    fixed = {name: _check_value(path, f"fixed.{name}", PARAMETERS[name], v) for name, v in fixed_raw.items()}
    conditions: dict[str, tuple] = {}
    for name, values in conditions_raw.items():
        key = f"conditions.{name}"
        if not isinstance(values, list) or not values:
            raise _fail(path, key, "must be a non-empty list", f"write {name} = [value, ...]")
        conditions[name] = _values(path, key, name, values)
    space = {name: _dimension(path, name, dim) for name, dim in space_raw.items()}
    return fixed, conditions, space


def _check_something_is_searched(spec: StudySpec, flag: str | None = None) -> None:
    """More than one trial per condition needs a dimension that applies there, or all are the same.

    `flag` names the command-line option that set the trials, where one did.
    """
    if spec.trials == 1:
        return
    fix = f"drop {flag} or give it 1" if flag else "add a dimension to [space] or set trials = 1"
    if not spec.space:
        raise _fail(spec.path, "space", f"empty, so all {spec.trials} trials would be identical", fix)
    for condition in spec.condition_list():
        if spec.searches_nothing(condition):
            raise _fail(
                spec.path,
                "space",
                f"no dimension applies in {spec.study_name(condition)}, so its {spec.trials} trials "
                "would be identical",
                fix,
            )


def parse(path: Path, text: str | None = None) -> StudySpec:
    """Read and validate a study file; raises SpecError with a one-line message."""
    path = Path(path)
    if not STUDY_NAME.fullmatch(path.stem):
        raise SpecError(
            f"{path}: {path.stem!r} is not a study name (it names the folder under results/): "
            "name the file like semi.toml, with letters, digits, '-', '_' or '.', not starting with '.'"
        )
    raw = _read(path) if text is None else _toml(path, text)
    for key in raw:
        if key not in TOP_LEVEL:
            raise _fail(path, key, "unknown key", f"use one of {sorted(TOP_LEVEL)}")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise _fail(path, "description", "must be a string", 'write description = "..."')
    metric = raw.get("metric", "val_accuracy")
    if metric not in METRICS:
        raise _fail(path, "metric", f"unsupported metric {metric!r}", f"use one of {list(METRICS)}")
    fixed, conditions, space = _parameter_sections(path, raw)
    spec = StudySpec(
        name=path.stem,
        path=path,
        description=description,
        trials=_positive_int(path, raw, "trials", 20),
        max_epochs=_run_level(path, raw, "max_epochs", "epochs"),
        batch_size=_run_level(path, raw, "batch_size", "batch_size"),
        patience=_run_level(path, raw, "patience", "patience"),
        metric=metric,
        pool_limit=_positive_int(path, raw, "pool_limit", None),
        val_size=_val_size(path, raw),
        sampler=_dataclass_from(path, "sampler", SamplerSpec, _section(path, raw, "sampler")),
        pruner=_dataclass_from(path, "pruner", PrunerSpec, _section(path, raw, "pruner")),
        fixed=fixed,
        conditions=conditions,
        space=space,
        confirm=_dataclass_from(path, "confirm", ConfirmSpec, _section(path, raw, "confirm")),
    )
    spec = replace(spec, overrides=_overrides(spec, raw.get("override", [])))
    _check_distinct_study_names(spec)
    _check_something_is_searched(spec)
    return spec


def _overrides(spec: StudySpec, raw: Any) -> tuple[Override, ...]:
    """[[override]] tables: each matches some condition by condition values, and sets OVERRIDABLE keys."""
    path = spec.path
    if not isinstance(raw, list) or not all(isinstance(table, dict) for table in raw):
        raise _fail(path, "override", "must be tables", "write [[override]] with when = {...} and settings")
    overrides = []
    for index, table in enumerate(raw):
        key = f"override[{index}]"
        unknown = sorted(set(table) - {"when", "fixed", *OVERRIDABLE})
        if unknown:
            raise _fail(
                path, f"{key}.{unknown[0]}", "unknown key", f"use when, fixed and {', '.join(OVERRIDABLE)}"
            )
        when = table.get("when")
        if not isinstance(when, dict) or not when:
            raise _fail(path, f"{key}.when", "missing or empty", 'write when = { unlabeled = "distill" }')
        for name, value in when.items():
            if name not in spec.conditions:
                raise _fail(
                    path, f"{key}.when.{name}", "not a condition", f"use one of {list(spec.conditions)}"
                )
            if value not in spec.conditions[name]:
                raise _fail(
                    path, f"{key}.when.{name}", f"{value!r} is not one of its conditions",
                    f"choose from {list(spec.conditions[name])}",
                )  # fmt: skip
        settings = {
            name: _check_value(path, f"{key}.{name}", parameters(TrainConfig)[FIELD_OF[name]], table[name])
            for name in OVERRIDABLE
            if name in table
        }
        fixed = _override_fixed(spec, key, table.get("fixed", {}))
        if not settings and not fixed:
            raise _fail(path, key, "sets nothing", f"give it {', '.join(OVERRIDABLE)} or a fixed table")
        override = Override(when, settings, fixed)
        if not any(override.matches(c) for c in spec.condition_list()):
            raise _fail(path, f"{key}.when", f"{when} matches no condition", "match a condition's values")
        for earlier in overrides:
            shared = (set(earlier.settings) & set(settings)) | {
                f"fixed.{name}" for name in set(earlier.fixed) & set(fixed)
            }
            both = [c for c in spec.condition_list() if earlier.matches(c) and override.matches(c)]
            if shared and both:
                raise _fail(
                    path, key, f"sets {sorted(shared)[0]} for {spec.study_name(both[0])} as an earlier "
                    "[[override]] does", "make the two when tables match different conditions",
                )  # fmt: skip
        overrides.append(override)
    return tuple(overrides)


def _override_fixed(spec: StudySpec, key: str, raw: Any) -> dict[str, Any]:
    """An [[override]]'s fixed table, each value checked as [fixed]'s are."""
    path = spec.path
    if not isinstance(raw, dict):
        raise _fail(path, f"{key}.fixed", "must be a table", "write fixed = { lr = 0.002 }")
    fixed = {}
    for name, value in raw.items():
        where = f"{key}.fixed.{name}"
        _check_param_name(path, where, name)
        if name in spec.conditions or name in DEFINES_CONDITIONS:
            raise _fail(path, where, "decides what the conditions are", "set it in [conditions] or [fixed]")
        if name in spec.space:
            raise _fail(path, where, "is searched in [space]", "search it or fix it, not both")
        fixed[name] = _check_value(path, where, PARAMETERS[name], value)
    return fixed


FIELD_OF = {"max_epochs": "epochs", "patience": "patience"}  # the TrainConfig field each top-level key sets


def _check_distinct_study_names(spec: StudySpec) -> None:
    """Two conditions whose names print alike (0.1 and 0.1000001 are both "labels=10%") would share
    one Optuna study: one would never run, and its fingerprint would disagree with its trials."""
    seen: dict[str, dict[str, Any]] = {}
    for condition in spec.condition_list():
        name = spec.study_name(condition)
        if name in seen:
            raise _fail(
                spec.path,
                "conditions",
                f"{seen[name]} and {condition} are both named {name!r}",
                "make the values differ in the name's precision, or keep one",
            )
        seen[name] = condition


def suggest(trial, spec: StudySpec, condition: dict[str, Any]) -> TrainConfig:
    """The search space's one door: [space] -> trial.suggest_* -> a TrainConfig.

    Fixed values and the condition come first; a dimension is suggested only where it applies
    (e.g. tau only for pseudo-label runs), under the spec's own parameter name. The monitor, which
    picks the best epoch and drives early stopping, is the study's metric unless fixed.
    """
    params: dict[str, Any] = {"monitor": spec.metric, **spec.fixed_for(condition), **condition}
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
        epochs=spec.setting("max_epochs", condition),
        batch_size=spec.batch_size,
        patience=spec.setting("patience", condition),
    )


def find(name: str, studies_dir: Path) -> Path:
    """studies/NAME.toml, or a SpecError listing the studies that exist."""
    path = Path(name) if name.endswith(".toml") else Path(studies_dir) / f"{name}.toml"
    if not path.exists():
        known = sorted(p.stem for p in Path(studies_dir).glob("*.toml"))
        raise SpecError(f"{path}: no such study file; choose one of {known} or write {path}")
    return path
