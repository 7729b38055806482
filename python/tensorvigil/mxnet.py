"""``tv.mxnet``: the MXNet Gluon capture hook (see :mod:`tensorvigil.hooks.mxnet`)."""

from .hooks.mxnet import Hook, TrainingStopped

__all__ = ["Hook", "TrainingStopped"]
