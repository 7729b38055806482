"""Validation of rule parameters, shared by every built-in rule module.

Each check raises :class:`~tensorvigil.errors.InvalidArgumentError` naming the rule, the
parameter, what was expected and the value given.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Any, Optional

from ...errors import InvalidArgumentError


def bad(rule: str, param: str, what: str, value: Any) -> InvalidArgumentError:
    """The error for parameter ``param`` of ``rule``: ``what`` it must be, and the value."""
    return InvalidArgumentError(f"{rule}: parameter {param} {what}, got {value!r}")


def number(
    rule: str,
    param: str,
    value: Any,
    *,
    lo: Optional[float] = None,
    lo_open: bool = False,
    hi: Optional[float] = None,
    hi_open: bool = False,
    integer: bool = False,
    optional: bool = False,
) -> Any:
    """A numeric parameter (``int`` with ``integer``, else ``float``; never a bool or NaN).

    Args:
        rule: Rule name (for the message).
        param: Parameter name.
        value: The value given.
        lo: Lower bound (inclusive unless ``lo_open``).
        lo_open: The lower bound is excluded.
        hi: Upper bound (inclusive unless ``hi_open``).
        hi_open: The upper bound is excluded.
        integer: An integer is required.
        optional: ``None`` is accepted (and returned).

    """
    if value is None and optional:
        return None
    ok_type = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, ok_type):
        raise bad(rule, param, "must be an integer" if integer else "must be a number", value)
    v: Any = int(value) if integer else float(value)
    if not integer and math.isnan(v):
        raise bad(rule, param, "must not be NaN", value)
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise bad(rule, param, f"must be {'>' if lo_open else '>='} {lo:g}", value)
    if hi is not None and (v >= hi if hi_open else v > hi):
        raise bad(rule, param, f"must be {'<' if hi_open else '<='} {hi:g}", value)
    return v


def regex(rule: str, param: str, value: Any, *, optional: bool = False) -> Optional[str]:
    """A regular-expression parameter (a non-empty string that compiles)."""
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise bad(rule, param, "must be a non-empty regular expression string", value)
    try:
        re.compile(value)
    except re.error as e:
        raise InvalidArgumentError(
            f"{rule}: parameter {param} is not a valid regular expression ({e}): {value!r}"
        ) from None
    return value
