"""The tensor store: per-rank streams of checksummed, compressed shard files.

See ``docs/FORMAT.md`` for the on-disk format.
"""

from .reader import Run, Tensor, open_run
from .writer import MANIFEST_NAME, StoreWriter

__all__ = ["MANIFEST_NAME", "Run", "StoreWriter", "Tensor", "open_run"]
