"""Rules: detect a failing training run from its captured statistics, while it trains.

Example:
    >>> import tensorvigil as tv
    >>> engine = tv.rules.RuleEngine("runs/exp1", tv.rules.defaults())
    >>> for finding in engine.poll():
    ...     print(finding)

"""

from __future__ import annotations

from typing import Any

from . import actions
from .base import Finding, Needs, Rule, StatsBatch, StepBlock, StepView
from .engine import RuleEngine, evaluate_run


def defaults() -> list[Rule]:
    """The default rule set: safe on any deep-learning run (a healthy run fires none).

    VanishingGradient, ExplodingTensor, PoorWeightInitialization, LossNotDecreasing,
    WeightUpdateRatio, DeadRelu, SaturatedActivation, LossSpike and GradientNormRatio, with
    their default parameters. Rules whose tensors are not captured report themselves
    ``not_applicable`` once.
    """
    from .builtin import default_rules

    return default_rules()


def available() -> list[str]:
    """Names of the built-in rules."""
    from .builtin import REGISTRY

    return sorted(REGISTRY)


def get(name: str, **params: Any) -> Rule:
    """Creates the built-in rule ``name`` with ``params``.

    Raises:
        InvalidArgumentError: unknown rule (the message lists close names) or parameter.

    """
    from .builtin import make_rule

    return make_rule(name, **params)


__all__ = [
    "Finding",
    "Needs",
    "Rule",
    "RuleEngine",
    "StatsBatch",
    "StepBlock",
    "StepView",
    "actions",
    "available",
    "defaults",
    "evaluate_run",
    "get",
]
