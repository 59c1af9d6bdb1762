"""How fmsearch words numbers in what it prints: durations and counts."""

from __future__ import annotations


def duration(seconds: float) -> str:
    """'45 s', '33 min', '2.5 h'."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def count(n: int, noun: str) -> str:
    """'1 seed', '3 seeds'."""
    return f"{n} {noun}{'s' if n != 1 else ''}"
