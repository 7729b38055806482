"""Training modes recorded with every saved step."""

from __future__ import annotations

import enum
from typing import Union

from .errors import InvalidArgumentError


class Mode(enum.IntEnum):
    """Mode of a step; the values are the on-disk codes (docs/FORMAT.md)."""

    TRAIN = 0
    EVAL = 1
    PREDICT = 2
    GLOBAL = 3

    def __str__(self) -> str:
        return self.name.lower()


ModeLike = Union[Mode, str, int]


def to_mode(m: ModeLike) -> Mode:
    """Parses "train" / "eval" / "predict" / "global", a :class:`Mode` or its integer code.

    Raises:
        InvalidArgumentError: for anything else.

    """
    if isinstance(m, Mode):
        return m
    if isinstance(m, str):
        try:
            return Mode[m.upper()]
        except KeyError:
            pass
    elif isinstance(m, int) and not isinstance(m, bool):
        try:
            return Mode(m)
        except ValueError:
            pass
    raise InvalidArgumentError(
        f"unknown mode {m!r}; expected 'train', 'eval', 'predict' or 'global'"
    )
