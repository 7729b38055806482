"""``tv.xgboost``: the XGBoost training callback (see :mod:`tensorvigil.hooks.xgboost`)."""

from .hooks.xgboost import (
    COLLECTIONS,
    DEFAULT_IMPORTANCE_TYPES,
    IMPORTANCE_TYPES,
    Hook,
    TrainingStopped,
    is_loss_metric,
)

__all__ = [
    "COLLECTIONS",
    "DEFAULT_IMPORTANCE_TYPES",
    "IMPORTANCE_TYPES",
    "Hook",
    "TrainingStopped",
    "is_loss_metric",
]
