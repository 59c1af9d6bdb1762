"""A parameter declared once, on its dataclass field: type, default, valid values, help, scope.

`param()` puts a `Param` in a field's metadata; `parameters(cls)` completes it from the field's name,
annotation and default. From that one declaration come TrainConfig's own check, the study file's
validation (spec.py), which dimensions apply in a trial (spec.applies) and `fmsearch train`'s flags.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from fmsearch.errors import ConfigError


@dataclass(frozen=True)
class Param:
    """What one parameter takes and means. Bounds are inclusive unless `low_open`/`high_open`."""

    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple = ()
    objectives: tuple[str, ...] = ()  # meaningful only for these `unlabeled` objectives (semi runs)
    recipe: bool = False  # how distill's targets are made: read by teachers.build, not the objective
    semi: bool = False  # means something only when some training labels are hidden
    study: bool = True  # False: a study sets it from a top-level key (max_epochs, batch_size, patience)
    name: str = ""  # the rest is filled in by `parameters` from the field
    type: type = object
    default: Any = None
    optional: bool = False  # None is a valid value (it means "unset")

    def type_ok(self, value: Any) -> bool:
        if isinstance(value, bool) or self.type is bool:
            return isinstance(value, bool) and self.type is bool
        return isinstance(value, self.type) or (self.type is float and isinstance(value, int))

    def in_range(self, value: float) -> bool:
        """Within the bounds; NaN and the infinities never are (NaN compares false with everything)."""
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def type_text(self) -> str:
        """'a float', 'an int', 'a str' or 'a bool'."""
        name = self.type.__name__
        return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"

    def range_text(self) -> str:
        """The valid range in words: 'positive', 'at least 1', 'in [0, 1)'."""
        low, high = _number(self.low), _number(self.high)
        if self.high is not None and self.low is not None:
            return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        if self.low is not None:
            if self.low == 0:
                return "positive" if self.low_open else "non-negative"
            return f"above {low}" if self.low_open else f"at least {low}"
        if self.high is not None:
            return f"below {high}" if self.high_open else f"at most {high}"
        return "any number"

    def expected(self, value: Any) -> str | None:
        """What `value` should have been ('a float', 'one of [...]', 'in [0, 1)'); None if it is valid."""
        if value is None and self.optional:
            return None
        if not self.type_ok(value):
            return self.type_text()
        if self.choices and value not in self.choices:
            return f"one of {list(self.choices)}"
        if self.type in (int, float) and not math.isfinite(value):
            return "a finite number"
        if self.type in (int, float) and not self.in_range(value):
            return self.range_text()
        return None


def _number(value: float | None) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def flag(name: str) -> str:
    """The command-line flag of a parameter: 'batch_size' -> '--batch-size'."""
    return "--" + name.replace("_", "-")


def param(default: Any, help: str, **rule: Any) -> Any:
    """A dataclass field that declares its parameter: `lr: float = param(1e-3, "learning rate", low=0)`."""
    return field(default=default, metadata={"param": Param(help, **rule)})


@functools.cache
def parameters(cls: type) -> dict[str, Param]:
    """Every `param()` field of a dataclass, in field order, completed with name, type and default."""
    hints = typing.get_type_hints(cls)
    found = {}
    for f in dataclasses.fields(cls):
        if "param" not in f.metadata:
            continue
        kind, optional = hints[f.name], False
        if isinstance(kind, types.UnionType):  # `int | None`
            (kind,) = [a for a in typing.get_args(kind) if a is not type(None)]
            optional = True
        found[f.name] = dataclasses.replace(
            f.metadata["param"], name=f.name, type=kind, default=f.default, optional=optional
        )
    return found


def check(instance: Any) -> None:
    """Raise ConfigError naming the first field of `instance` whose value its declaration refuses."""
    for p in parameters(type(instance)).values():
        value = getattr(instance, p.name)
        expected = p.expected(value)
        if expected is not None:
            raise ConfigError(f"{p.name} must be {expected}, got {value!r}")
