"""Writing a run: :class:`StoreWriter` wraps the native per-rank stream writer."""

from __future__ import annotations

import datetime as _dt
import json
import operator
import os
from typing import Any, Optional, Sequence

import numpy as np

from .. import _core
from .._arrays import as_array
from ..errors import InvalidArgumentError, StoreIOError
from ..modes import ModeLike, to_mode
from .remote import is_remote

MANIFEST_NAME = "manifest.json"
_MODE_CODES = {"train": 0, "eval": 1, "predict": 2, "global": 3}
FORMAT_NAME = "tensorvigil-store"
FORMAT_VERSION = (1, 1)


def write_manifest(run_dir: str) -> None:
    """Creates ``run_dir`` and its manifest if they do not exist (atomic, idempotent)."""
    path = os.path.join(run_dir, MANIFEST_NAME)
    if os.path.exists(path):
        return
    os.makedirs(run_dir, exist_ok=True)
    doc = {
        "format": FORMAT_NAME,
        "format_version": list(FORMAT_VERSION),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "producer": f"tensorvigil {_core.__version__}",
    }
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


class StoreWriter:
    """Writes tensors and their statistics into one rank's stream of a run.

    Compression, checksums and I/O happen on native threads with the GIL released;
    :meth:`write` only copies the tensor. A step's tensors become visible to readers when
    :meth:`commit` is called for that step.

    Args:
        run_dir: Run directory; created with its manifest if missing. Or a run in object
            storage: ``s3://bucket/prefix``, a ``pyarrow.fs`` filesystem or ``(filesystem,
            path)``: the stream is staged locally and each shard is uploaded once it is sealed
            (``roll_seconds`` bounds how late a remote reader sees a step).
        rank: This process's rank (one stream per rank).
        codec: Codec for floating-point tensors: ``"shuffle-zstd"`` (default), ``"zstd"`` or
            ``"raw"``.
        level: zstd level.
        max_pending_bytes: Bound on memory held by writes not yet on disk.
        policy: ``"block"`` waits for space (loses nothing); ``"skip"`` drops raw payloads of a
            full step and keeps their statistics (the drop is recorded).
        roll_bytes: Shard size after which the next commit starts a new shard.
        roll_seconds: Shard age after which the next commit (or an idle timer) starts a new one
            (default 30 s; 5 s for object storage).
        threads: Native encoder threads.
        fsync: fsync shards when sealed and on close.
        tensor_index: Write a tensor index beside each sealed shard (FORMAT.md §3.8): readers
            then open the run from commits and names and read one tensor's records alone.
        staging_dir: Object storage only: the local staging directory (default
            ``$TV_STAGING_DIR`` or the temp directory, one folder per run URL).
        upload_interval: Object storage only: seconds between upload scans.

    Example:
        >>> with StoreWriter("runs/exp1") as w:
        ...     w.write("fc1.weight", 0, weights)
        ...     w.commit(0)

    """

    def __init__(
        self,
        run_dir: str,
        rank: int = 0,
        *,
        codec: str = "shuffle-zstd",
        level: int = 1,
        chunk_size: int = 1 << 20,
        max_pending_bytes: int = 512 << 20,
        policy: str = "block",
        roll_bytes: int = 256 << 20,
        roll_seconds: Optional[float] = None,
        threads: int = 2,
        fsync: bool = True,
        tensor_index: bool = True,
        staging_dir: Optional[str] = None,
        upload_interval: float = 1.0,
    ) -> None:
        if not isinstance(rank, int) or rank < 0:
            raise InvalidArgumentError(f"rank must be a non-negative int, got {rank!r}")
        self.url: Optional[str] = None
        self._uploader: Any = None
        if is_remote(run_dir):
            from .remote import stage_for_writing

            self._uploader = stage_for_writing(run_dir, rank, staging_dir, upload_interval)
            self.url = self._uploader.store.url
            run_dir = self._uploader.staging
            roll_seconds = 5.0 if roll_seconds is None else roll_seconds
        run_dir = os.fspath(run_dir)
        roll_seconds = 30.0 if roll_seconds is None else roll_seconds
        try:
            write_manifest(run_dir)
        except OSError as e:
            raise StoreIOError(f"[store_writer] cannot create run '{run_dir}': {e}") from e
        self.run_dir = run_dir
        self.rank = rank
        self._w = _core.StreamWriter(
            run_dir,
            rank,
            codec=codec,
            level=level,
            chunk_size=chunk_size,
            max_pending_bytes=max_pending_bytes,
            policy=policy,
            roll_bytes=roll_bytes,
            roll_seconds=roll_seconds,
            threads=threads,
            fsync=fsync,
            tensor_index=tensor_index,
        )
        if self._uploader is not None:
            self._uploader.start()

    def write(
        self,
        name: str,
        step: int,
        value: Any,
        *,
        mode: ModeLike = "train",
        mode_step: Optional[int] = None,
        stats_only: bool = False,
        hist_bins: int = 0,
        hist_range: Optional[Sequence[float]] = None,
        exp_hist: bool = False,
        codec: Optional[str] = None,
        stats: Optional[_core.Stats] = None,
    ) -> None:
        """Saves ``value`` (numpy array, torch tensor or scalar) as tensor ``name`` of ``step``.

        Args:
            name: Tensor name (UTF-8, 1 to 4096 bytes).
            step: Global step (>= 0).
            value: The tensor; copied before this returns.
            mode: ``"train"``, ``"eval"``, ``"predict"`` or ``"global"``.
            mode_step: Step within the mode (defaults to ``step``).
            stats_only: Store statistics only, not the values.
            hist_bins: Fixed-bin histogram size (0: none).
            hist_range: ``(lo, hi)`` of the histogram; default the tensor's finite range.
            exp_hist: Also store the exponent (log2) histogram.
            codec: Override the codec for this tensor.
            stats: Statistics computed elsewhere (e.g. on an accelerator, see
                :meth:`tensorvigil.Stats.from_parts`), stored instead of computing them here
                (``hist_bins``, ``hist_range`` and ``exp_hist`` are then ignored). With
                ``stats_only`` the values are never read: ``value`` only needs ``shape`` and
                ``dtype`` (a JAX array stays on its device; a ``jax.ShapeDtypeStruct`` will do).

        Raises:
            InvalidArgumentError: ``stats.numel`` is not the tensor's number of elements, or a
                bad name, step, mode, dtype or option.

        Example:
            >>> s = tv.Stats.from_parts(4, 0, 0, 0, 1, -1.0, 2.0, 0.5, 5.0, 4.0, 2.0)
            >>> w.write("w", 0, jax.ShapeDtypeStruct((2, 2), "float32"), stats_only=True, stats=s)

        """
        if type(step) is not int or step < 0:
            step = check_step(step)
        code = _MODE_CODES.get(mode) if isinstance(mode, str) else None
        if stats is not None and stats_only:
            shape, dtype = _shape_dtype(value)
            self._w.write_stats(
                name, step, shape, dtype, stats, int(to_mode(mode)) if code is None else code,
                mode_step,
            )
            return
        arr, override = as_array(value)
        # Positional call: pybind11's keyword matching costs several microseconds per call.
        self._w.write(
            name,
            step,
            arr,
            int(to_mode(mode)) if code is None else code,
            mode_step,
            stats_only,
            hist_bins,
            None if hist_range is None else tuple(hist_range),
            exp_hist,
            codec,
            override,
            stats,
        )

    def commit(
        self, step: int, *, mode: ModeLike = "train", mode_step: Optional[int] = None
    ) -> None:
        """Marks ``step`` complete: its tensors become visible to readers."""
        step = check_step(step)
        self._w.commit(step, int(to_mode(mode)), mode_step)
        if self._uploader is not None:
            self._uploader.notify()

    def flush(self, sync: bool = False) -> None:
        """Blocks until everything written so far is on disk (fsynced when ``sync``)."""
        self._w.flush(sync)

    def close(self) -> None:
        """Flushes, seals the stream and releases its lock. Idempotent.

        For object storage, then uploads what is left (see :class:`~.remote.Uploader`).
        """
        self._w.close()
        if self._uploader is not None:
            up, self._uploader = self._uploader, None
            up.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._w.closed

    def counters(self) -> dict:
        """Counters: tensors, commits, dropped payloads, bytes, shards, pending memory."""
        return self._w.counters()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _shape_dtype(value: Any) -> tuple[tuple[int, ...], str]:
    """``(shape, core dtype name)`` of ``value`` without reading its elements."""
    shape, dt = getattr(value, "shape", None), getattr(value, "dtype", None)
    if shape is None or dt is None:
        arr, override = as_array(value)  # a Python number or sequence: cheap to convert
        return arr.shape, override or arr.dtype.name
    name = str(dt)
    if name.startswith("torch."):
        return tuple(shape), name[len("torch."):]
    try:
        return tuple(int(d) for d in shape), np.dtype(dt).name
    except TypeError:
        raise InvalidArgumentError(f"unsupported dtype '{name}'") from None


def check_int(value: Any, what: str, minimum: int = 0) -> int:
    """Returns ``value`` as an int (not a bool), or raises InvalidArgumentError naming ``what``."""
    try:
        if isinstance(value, bool):
            raise TypeError
        v = operator.index(value)
    except TypeError:
        raise InvalidArgumentError(f"{what} must be an integer, got {value!r}") from None
    if v < minimum:
        raise InvalidArgumentError(f"{what} must be >= {minimum}, got {v}")
    return v


def check_step(step: Any) -> int:
    """Returns ``step`` as an int, or raises InvalidArgumentError unless it is an integer >= 0."""
    try:
        return check_int(step, "step")
    except InvalidArgumentError:
        raise InvalidArgumentError(f"step must be a non-negative integer, got {step!r}") from None
