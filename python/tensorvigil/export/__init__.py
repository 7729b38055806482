"""Exports of a run to other tools' formats; the run stays the source of truth.

:func:`export_tensorboard` (and ``tensorvigil export RUN --tensorboard DIR``) writes TensorBoard
event files. The writer (``tensorboardX``) is imported only when an export runs; install it with
``pip install 'tensorvigil[tensorboard]'``.
"""

from __future__ import annotations

from .tensorboard import (
    DEFAULT_STATS,
    STATS,
    ExportResult,
    TensorBoardExporter,
    export_tensorboard,
)

__all__ = [
    "DEFAULT_STATS",
    "STATS",
    "ExportResult",
    "TensorBoardExporter",
    "export_tensorboard",
]
