"""``tv.jax``: the JAX capture hook (see :mod:`tensorvigil.hooks.jax`)."""

from .hooks.jax import Hook, TrainingStopped, leaf_names

__all__ = ["Hook", "TrainingStopped", "leaf_names"]
