"""Exception classes of tensorvigil.

Every error raised by tensorvigil inherits :class:`TensorVigilError` and a builtin, so users can
catch either (``except ValueError`` catches :class:`InvalidArgumentError`). The native core maps
its error codes to these classes in one place (``python/bindings/bind_errors.cpp``).
"""

from __future__ import annotations


class TensorVigilError(Exception):
    """Base class of every tensorvigil error."""


class InvalidArgumentError(TensorVigilError, ValueError):
    """A caller passed a bad value (unknown dtype, negative step, non-contiguous array...)."""


class NotFoundError(TensorVigilError, LookupError):
    """A run, rank, step or tensor does not exist."""


class StepNotAvailableError(NotFoundError):
    """The requested step is not committed (yet) for this tensor/rank."""


class TensorNotFoundError(NotFoundError, KeyError):
    """No tensor of that name was captured."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DataCorruptionError(TensorVigilError, IOError):
    """Stored bytes are corrupt, truncated or not a tensorvigil file (checksum or layout)."""


class StoreIOError(TensorVigilError, OSError):
    """The operating system refused an I/O operation (permissions, disk full...)."""


class AccessDeniedError(TensorVigilError, PermissionError):
    """Storage refused the credentials or the permission (e.g. an S3 bucket's access denied)."""


class UnsupportedError(TensorVigilError, NotImplementedError):
    """A valid request that this build or platform cannot serve (e.g. CUDA when built without)."""


class FailedPreconditionError(TensorVigilError, RuntimeError):
    """The object is in the wrong state (writer closed, stream locked by another writer)."""


class TrainingStopped(TensorVigilError):
    """Raised by a capture hook at a step boundary after a stop was requested.

    A stop is requested by a rule whose action is "stop", by :meth:`request_stop` on the hook,
    or by a watcher process that writes ``stop_request.json`` into the run. The hook commits
    and flushes everything captured before raising, so no evidence is lost.
    """


_BY_CODE = {
    1: InvalidArgumentError,
    2: NotFoundError,
    3: DataCorruptionError,
    4: StoreIOError,
    5: UnsupportedError,
    6: FailedPreconditionError,
}


def _class_for_code(code: int) -> type[TensorVigilError]:
    return _BY_CODE.get(code, TensorVigilError)


__all__ = [
    "DataCorruptionError",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "NotFoundError",
    "StepNotAvailableError",
    "StoreIOError",
    "TensorNotFoundError",
    "TensorVigilError",
    "TrainingStopped",
    "UnsupportedError",
]
