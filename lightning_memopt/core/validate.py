"""Checks of hyperparameters, shared by the methods' settings objects (one place; callbacks only translate)."""

from __future__ import annotations

import math
import numbers
import re
from typing import Any


def _number(value: Any, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}.") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}.")
    return v


def finite(value: Any, name: str) -> float:
    return _number(value, name)


def positive(value: Any, name: str) -> float:
    v = _number(value, name)
    if v <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}.")
    return v


def nonnegative(value: Any, name: str) -> float:
    v = _number(value, name)
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}.")
    return v


def unit_interval(value: Any, name: str) -> float:
    """``0 <= value < 1`` (betas, decay rates)."""
    v = _number(value, name)
    if not 0.0 <= v < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}.")
    return v


def optional_lr(value: Any, name: str = "lr") -> float | None:
    """None (keep the module's optimizer lr) or a finite number >= 0."""
    return None if value is None else nonnegative(value, name)


def optional_positive(value: Any, name: str) -> float | None:
    return None if value is None else positive(value, name)


def at_least(value: Any, low: int, name: str) -> int:
    # an integral float (YAML's 1e3) is taken; text, None or nan get this message, not int()'s
    whole = isinstance(value, numbers.Integral) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not whole or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
    return int(value)


def regex(pattern: Any, name: str) -> str:
    """A regular expression over module names (``target_pattern``, ``target_modules``)."""
    try:
        re.compile(pattern)
    except (re.error, TypeError) as err:
        raise ValueError(f"{name}={pattern!r} is not a regular expression: {err}.") from None
    return pattern
