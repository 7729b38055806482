"""``tv.torch``: the PyTorch capture hook (see :mod:`tensorvigil.hooks.torch`)."""

from .hooks.torch import Hook, TrainingStopped

__all__ = ["Hook", "TrainingStopped"]
