"""tensorvigil: an open, self-hosted debugger for machine-learning training.

Capture tensors and fused statistics while a model trains, store them in a crash-safe,
checksummed format, and read them back (also while training runs).

``import tensorvigil`` is light: it loads the native core and NumPy only; torch, pyarrow and
matplotlib are imported when a feature needs them.

Example:
    >>> import tensorvigil as tv
    >>> with tv.StoreWriter("runs/exp1") as w:
    ...     w.write("w", 0, np.ones(3)); w.commit(0)
    >>> tv.open("runs/exp1").tensor("w").stats(0).mean
    1.0

"""

from __future__ import annotations

from . import _core
from .errors import (
    AccessDeniedError,
    DataCorruptionError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    StepNotAvailableError,
    StoreIOError,
    TensorNotFoundError,
    TensorVigilError,
    TrainingStopped,
    UnsupportedError,
)
from .hooks.base import Collection, SaveConfig
from .modes import Mode
from .rules.base import Finding, Needs, Rule, StepView
from .stats import Stats, compute_stats, compute_stats_many, get_num_threads, set_num_threads
from .store import Run, StoreWriter, Tensor
from .store import open_run as open

__version__: str = _core.__version__

_LAZY_MODULES = ("torch", "mxnet", "jax", "keras", "xgboost", "cuda", "rules", "plot", "report")


def __getattr__(name: str):
    # tv.torch (and other framework modules) load on first use, so `import tensorvigil` stays light.
    if name in _LAZY_MODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'tensorvigil' has no attribute '{name}'")


__all__ = [
    "AccessDeniedError",
    "Collection",
    "DataCorruptionError",
    "FailedPreconditionError",
    "Finding",
    "InvalidArgumentError",
    "Mode",
    "Needs",
    "Rule",
    "NotFoundError",
    "Run",
    "SaveConfig",
    "Stats",
    "StepNotAvailableError",
    "StepView",
    "StoreIOError",
    "StoreWriter",
    "Tensor",
    "TensorNotFoundError",
    "TensorVigilError",
    "TrainingStopped",
    "UnsupportedError",
    "__version__",
    "compute_stats",
    "compute_stats_many",
    "get_num_threads",
    "open",
    "set_num_threads",
]
