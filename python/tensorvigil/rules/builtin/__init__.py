"""The built-in rules (catalogue and defaults: docs/RULES.md)."""

from __future__ import annotations

import difflib
from typing import Any

from ...errors import InvalidArgumentError
from ..base import Rule
from . import data, health, literature, ranks
from . import xgboost as _xgboost

REGISTRY: dict[str, type[Rule]] = {}
for _mod in (health, literature, data, ranks, _xgboost):
    for _name in _mod.__all__:
        REGISTRY[_name] = getattr(_mod, _name)

DEFAULT_RULES = (
    "VanishingGradient",
    "ExplodingTensor",
    "PoorWeightInitialization",
    "LossNotDecreasing",
    "WeightUpdateRatio",
    "DeadRelu",
    "SaturatedActivation",
    "LossSpike",
    "GradientNormRatio",
)


def default_rules() -> list[Rule]:
    """New instances of the default rule set."""
    return [REGISTRY[n]() for n in DEFAULT_RULES]


def make_rule(name: str, **params: Any) -> Rule:
    """The built-in rule ``name`` made with ``params``."""
    cls = REGISTRY.get(name)
    if cls is None:
        close = difflib.get_close_matches(name, list(REGISTRY), n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise InvalidArgumentError(
            f"unknown rule '{name}'.{hint} Built-in rules: {', '.join(sorted(REGISTRY))}"
        )
    try:
        return cls(**params)
    except TypeError as e:
        raise InvalidArgumentError(f"rule {name}: {e}") from None
