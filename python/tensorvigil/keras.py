"""``tv.keras``: the Keras 3 capture callback (see :mod:`tensorvigil.hooks.keras`)."""

from .hooks.keras import Hook, TrainingStopped

__all__ = ["Hook", "TrainingStopped"]
