"""Reading a run: :func:`open_run` (``tv.open``) returns a :class:`Run`.

A run may be read while it is being written: :meth:`Run.refresh` and :meth:`Run.follow` pick
up newly committed steps. Only committed steps are ever visible.
"""

from __future__ import annotations

import bisect
import difflib
import json
import os
import re
import time
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence, Union

import numpy as np

from .. import _core
from ..errors import (
    DataCorruptionError,
    InvalidArgumentError,
    NotFoundError,
    StepNotAvailableError,
    TensorNotFoundError,
)
from ..modes import Mode, ModeLike, to_mode
from .remote import is_remote
from .writer import FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, check_step

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow


def open_run(path: Union[str, os.PathLike, Any], *, strict: bool = True) -> Run:
    """Opens a run directory for reading (also while it is being written).

    Args:
        path: The run directory given to the writer or hook; or a run in object storage
            (``s3://bucket/prefix``, a ``pyarrow.fs`` filesystem or ``(filesystem, path)``),
            read through a local cache with ranged reads (``$TV_CACHE_DIR``).
        strict: Raise :class:`DataCorruptionError` on corrupt shards. With ``False``, reading
            stops at the first corrupt frame of a shard and :attr:`Run.problems` lists it.

    Returns:
        A :class:`Run`.

    Raises:
        NotFoundError: ``path`` is not a tensorvigil run.
        DataCorruptionError: the manifest or a shard is corrupt (strict mode).

    Example:
        >>> run = tv.open("runs/exp1")
        >>> run.tensor("fc1.weight/grad").stats(10).l2

    """
    return Run(path, strict=strict)


def _read_manifest(path: str) -> dict:
    mpath = os.path.join(path, MANIFEST_NAME)
    if not os.path.isdir(path):
        raise NotFoundError(f"no run at '{path}': directory does not exist")
    try:
        with open(mpath, "rb") as f:
            raw = f.read(1 << 20)
    except FileNotFoundError:
        raise NotFoundError(
            f"'{path}' is not a tensorvigil run: {MANIFEST_NAME} is missing"
        ) from None
    try:
        doc = json.loads(raw.decode("utf-8"))
        if not isinstance(doc, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError) as e:
        raise DataCorruptionError(f"'{mpath}' is not valid JSON: {e}") from None
    if doc.get("format") != FORMAT_NAME:
        raise DataCorruptionError(f"'{mpath}' is not a {FORMAT_NAME} manifest")
    version = doc.get("format_version")
    if not (isinstance(version, list) and version and version[0] == FORMAT_VERSION[0]):
        raise DataCorruptionError(
            f"'{mpath}' has format version {version!r}; this reader supports {FORMAT_VERSION[0]}.x"
        )
    return doc


class Run:
    """A captured run: ranks, committed steps, tensors, statistics.

    Use :func:`tensorvigil.open` to create one.
    """

    def __init__(self, path: Union[str, os.PathLike], *, strict: bool = True) -> None:
        self._mirror: Any = None
        if is_remote(path):
            from .remote import Mirror

            self._mirror = Mirror(path)
            path = self._mirror.path
        #: Where the run lives: the directory, or the object-store URL.
        self.url = os.fspath(path) if self._mirror is None else self._mirror.url
        self.path = os.fspath(path)
        self.manifest = _read_manifest(self.path)
        self._r = _core.RunReader(self.path, strict)

    # --- discovery -----------------------------------------------------------------------
    def refresh(self) -> int:
        """Reads what writers appended since; returns the number of newly committed steps."""
        if self._mirror is not None:
            self._mirror.sync()
        return self._r.refresh()

    def ranks(self) -> list[int]:
        """Ranks that wrote a stream into this run."""
        return list(self._r.ranks())

    def steps(
        self,
        mode: Optional[ModeLike] = None,
        rank: Optional[int] = None,
        rank_timeout: Optional[float] = None,
    ) -> list[int]:
        """Committed global steps, ascending.

        Args:
            mode: Only steps of this mode.
            rank: Only this rank's steps. By default a step counts when every rank committed it.
            rank_timeout: Ranks that are dead or stalled for this many seconds (see
                :meth:`rank_status`) no longer hold steps back: a step counts when every other
                rank committed it.

        """
        c = self._r.commits()
        sel = np.ones(len(c["step"]), dtype=bool)
        if mode is not None:
            sel &= c["mode"] == int(to_mode(mode))
        if rank is not None:
            sel &= c["rank"] == rank
            return sorted({int(s) for s in c["step"][sel]})
        ranks = self.live_ranks(rank_timeout) if rank_timeout is not None else self._r.ranks()
        if len(ranks) <= 1:
            return sorted({int(s) for s in c["step"][sel]})
        per_rank = [set(c["step"][sel & (c["rank"] == r)].tolist()) for r in ranks]
        return sorted(set.intersection(*per_rank))

    def step_modes(self) -> dict[int, Mode]:
        """Mode of every committed step (rank 0's view when ranks disagree)."""
        c = self._r.commits()
        out: dict[int, Mode] = {}
        for step, mode in zip(c["step"].tolist(), c["mode"].tolist()):
            out.setdefault(step, Mode(mode))
        return out

    def tensor_names(
        self, regex: Optional[str] = None, collection: Optional[str] = None
    ) -> list[str]:
        """Names of captured tensors, sorted; optionally filtered.

        Args:
            regex: Keep names matching this regular expression (``re.search``).
            collection: Keep names of this collection (from ``collections.json``, written by
                the hooks).

        """
        names = sorted(self._r.names())
        if collection is not None:
            members = self.collections().get(collection)
            if members is None:
                raise NotFoundError(
                    f"no collection '{collection}' in run '{self.path}'; "
                    f"available: {sorted(self.collections())}"
                )
            keep = set(members)
            names = [n for n in names if n in keep]
        if regex is not None:
            pat = _compile(regex)
            names = [n for n in names if pat.search(n)]
        return names

    def collections(self) -> dict[str, list[str]]:
        """Collections recorded by the capture hook: name -> tensor names."""
        path = os.path.join(self.path, "collections.json")
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
        except FileNotFoundError:
            return {}
        except ValueError as e:
            raise DataCorruptionError(f"'{path}' is not valid JSON: {e}") from None
        if not isinstance(doc, dict):
            raise DataCorruptionError(f"'{path}' must hold a JSON object")
        return {str(k): [str(x) for x in v] for k, v in doc.items() if isinstance(v, list)}

    @property
    def problems(self) -> list[str]:
        """Corruption met in non-strict mode, one line each."""
        return list(self._r.problems)

    def ended(self, rank: int = 0) -> bool:
        """True when the writer of ``rank`` closed its stream cleanly."""
        return self._r.ended(rank)

    def rank_status(self, timeout: float = 60.0) -> dict[int, dict]:
        """The state of each rank's writer, to tell a slow rank from a dead one.

        ``state`` is ``"ended"`` (closed cleanly), ``"live"`` (committing, or idle for less than
        ``timeout`` seconds), ``"stalled"`` (its writer holds the lock but committed nothing
        for ``timeout`` seconds while another rank committed later steps) or ``"dead"`` (not
        ended, no writer holds its lock and nothing committed for ``timeout`` seconds: the
        process exited or was killed). Also ``last_step`` (-1: none) and ``idle_s`` (seconds
        since its last commit). Writer liveness is probed through ``writer.lock`` (§3.6), so
        it is only known on local file systems; runs in object storage judge by time alone.
        """
        c = self._r.commits()
        now = time.time()
        newest = int(c["step"].max()) if len(c["step"]) else -1
        out: dict[int, dict] = {}
        for r in self._r.ranks():
            mine = c["rank"] == r
            last = int(c["step"][mine].max()) if mine.any() else -1
            idle = float(now - c["wall_time"][mine].max()) if mine.any() else float("inf")
            if self._r.ended(r):
                state = "ended"
            elif idle < timeout:
                state = "live"
            elif self._mirror is None and self._r.writer_alive(r):
                state = "stalled" if last < newest else "live"
            else:
                state = "dead"
            out[r] = {"state": state, "last_step": last, "idle_s": idle}
        return out

    def live_ranks(self, timeout: float = 60.0) -> list[int]:
        """Ranks that are neither dead nor stalled (:meth:`rank_status`)."""
        status = self.rank_status(timeout)
        return [r for r, s in status.items() if s["state"] in ("ended", "live")]

    # --- tensors -------------------------------------------------------------------------
    def tensor(self, name: str) -> Tensor:
        """The tensor called ``name``.

        Raises:
            TensorNotFoundError: no such tensor; the message suggests close names.

        """
        if self._r.name_id(name) < 0:
            self.refresh()
            if self._r.name_id(name) < 0:
                names = self._r.names()
                close = difflib.get_close_matches(name, names, n=5)
                hint = f" Did you mean: {', '.join(close)}?" if close else ""
                raise TensorNotFoundError(
                    f"no tensor '{name}' in run '{self.path}' ({len(names)} tensors).{hint}"
                )
        return Tensor(self, name)

    def stats(
        self,
        names: Optional[Union[str, Sequence[str]]] = None,
        *,
        regex: Optional[str] = None,
        collection: Optional[str] = None,
        steps: Optional[Union[range, Sequence[int], slice]] = None,
        ranks: Optional[Sequence[int]] = None,
        mode: Optional[ModeLike] = None,
    ) -> pyarrow.Table:
        """Statistics of many (rank, step, tensor) records as a ``pyarrow.Table``.

        Read from the shard indexes; no tensor payload is decompressed. Columns: ``tensor``
        (dictionary-encoded), ``rank``, ``step``, ``mode``, ``mode_step``, ``has_value``,
        ``numel``, ``nan``, ``posinf``, ``neginf``, ``zeros``, ``min``, ``max``, ``mean``,
        ``var``, ``std``, ``l1``, ``l2``, ``abs_max``, ``wall_time``.

        Args:
            names: A tensor name or list of names (default: all).
            regex: Keep tensors whose name matches.
            collection: Keep tensors of this collection.
            steps: A ``range``/``slice`` (contiguous bounds) or a list of steps.
            ranks: Keep these ranks.
            mode: Keep this mode.

        Example:
            >>> run.stats(collection="gradients", steps=range(0, 1000)).to_pandas()

        """
        import pyarrow as pa

        all_names = self._r.names()
        wanted: Optional[list[str]] = None
        if names is not None:
            wanted = [names] if isinstance(names, str) else list(names)
        if collection is not None or regex is not None:
            chosen = self.tensor_names(regex=regex, collection=collection)
            wanted = chosen if wanted is None else [n for n in wanted if n in set(chosen)]
        name_ids: list[int] = []
        if wanted is not None:
            name_ids = [i for i in (self._r.name_id(n) for n in wanted) if i >= 0]
            if not name_ids:
                return _empty_stats_table()
        step_min = step_max = None
        step_list = None
        if isinstance(steps, (range, slice)):
            if steps.step not in (None, 1):
                step_list = list(range(steps.start or 0, steps.stop, steps.step))
            else:
                step_min = steps.start
                step_max = None if steps.stop is None else steps.stop - 1
        elif steps is not None:
            step_list = [check_step(s) for s in steps]
            if step_list:
                step_min, step_max = min(step_list), max(step_list)
        cols = self._r.stats_columns(
            name_ids=name_ids,
            ranks=list(ranks) if ranks is not None else [],
            step_min=step_min,
            step_max=step_max,
            mode=-1 if mode is None else int(to_mode(mode)),
        )
        if step_list is not None:
            keep = np.isin(cols["step"], np.asarray(step_list, dtype=np.int64))
            cols = {k: v[keep] for k, v in cols.items()}
        tensor = pa.DictionaryArray.from_arrays(
            _arrow(cols.pop("name_id")), _arrow_strings(all_names)
        )
        names = ["tensor", *cols]
        return pa.Table.from_arrays([tensor, *(_arrow(v) for v in cols.values())], names=names)

    def follow(self, timeout: Optional[float] = 60.0, poll: float = 0.2) -> Iterator[int]:
        """Yields steps as they are committed by every rank.

        Stops when every rank's writer closed its stream, or after ``timeout`` seconds
        without a new step.

        Args:
            timeout: Seconds to wait for a new step; ``None`` waits until every rank's writer
                closed its stream.
            poll: Seconds between checks.

        """
        seen: set[int] = set()
        last_new = time.monotonic()
        while True:
            self.refresh()
            new = [s for s in self.steps() if s not in seen]
            for s in new:
                seen.add(s)
                yield s
            if new:
                last_new = time.monotonic()
            ranks = self.ranks()
            if ranks and all(self._r.ended(r) for r in ranks):
                self.refresh()
                rest = [s for s in self.steps() if s not in seen]
                yield from rest
                return
            if timeout is not None and time.monotonic() - last_new > timeout:
                return
            time.sleep(poll)

    def findings(self) -> list[dict]:
        """Rule findings recorded in the run, oldest first.

        From ``findings.jsonl`` and, for runs in object storage, the per-watcher
        ``findings.<producer>.jsonl`` objects (merged by time).
        """
        if self._mirror is not None:
            self._mirror.sync()
        names = ["findings.jsonl"]
        try:
            names += sorted(
                n
                for n in os.listdir(self.path)
                if n.startswith("findings.") and n.endswith(".jsonl") and n != "findings.jsonl"
            )
        except FileNotFoundError:
            pass
        out: list[dict] = []
        for name in names:
            try:
                # errors="replace": a line with bad UTF-8 fails to parse and is skipped (§3.5).
                with open(os.path.join(self.path, name), encoding="utf-8", errors="replace") as f:
                    for line in f:
                        line = line.strip()
                        if line:
                            try:
                                doc = json.loads(line)
                            except ValueError:
                                continue  # a torn last line from a crashed writer
                            if isinstance(doc, dict):
                                out.append(doc)
            except FileNotFoundError:
                pass
        if len(names) > 1:
            out.sort(key=lambda f: str(f.get("time", "")))
        return out

    def __repr__(self) -> str:
        return (
            f"Run({self.path!r}, ranks={self.ranks()}, steps={len(self.steps())}, "
            f"tensors={len(self._r.names())})"
        )


class Tensor:
    """One named tensor of a run, across steps and ranks."""

    def __init__(self, run: Run, name: str) -> None:
        self.run = run
        self.name = name

    def steps(self, mode: Optional[ModeLike] = None, rank: int = 0) -> list[int]:
        """Committed steps at which this tensor was saved by ``rank``."""
        cols = self.run._r.stats_columns(
            name_ids=[self.run._r.name_id(self.name)],
            ranks=[rank],
            mode=-1 if mode is None else int(to_mode(mode)),
        )
        return sorted(set(cols["step"].tolist()))

    def record(self, step: int, rank: int = 0) -> Any:
        """Metadata of the saved tensor at ``step`` (shape, dtype, codec, stats...).

        Raises:
            StepNotAvailableError: not saved at that step; the message names the nearest steps.

        """
        step = check_step(step)
        rec = self.run._r.record(self.name, step, rank)
        if rec is None:
            self.run.refresh()
            rec = self.run._r.record(self.name, step, rank)
        if rec is None:
            if rank not in self.run.ranks():
                raise NotFoundError(
                    f"no rank {rank} in run '{self.run.path}'; ranks: {self.run.ranks()}"
                )
            raise StepNotAvailableError(
                f"tensor '{self.name}' has no committed step {step} on rank {rank}; "
                f"{_nearby(self.steps(rank=rank), step)}"
            )
        return rec

    def value(self, step: int, rank: int = 0) -> np.ndarray:
        """The saved values at ``step`` as a numpy array (bfloat16/float8 via ``ml_dtypes``).

        Raises:
            StepNotAvailableError: not saved at that step.
            NotFoundError: only statistics were saved at that step.
            DataCorruptionError: the stored bytes fail their checksum.

        """
        self.record(step, rank)
        if self.run._mirror is not None:  # object storage: fetch the frame's bytes first
            loc = self.run._r.value_location(self.name, check_step(step), rank)
            if loc is not None:
                self.run._mirror.ensure(*loc)
        return self.run._r.read(self.name, check_step(step), rank)

    def stats(self, step: int, rank: int = 0) -> _core.Stats:
        """Statistics stored with the tensor at ``step`` (no payload is read)."""
        return self.record(step, rank).stats

    def __repr__(self) -> str:
        return f"Tensor({self.name!r})"


def _nearby(steps: list[int], step: int) -> str:
    if not steps:
        return "it was never saved on this rank"
    i = bisect.bisect_left(steps, step)
    near = steps[max(0, i - 2) : i + 2]
    return f"nearest saved steps: {near} (of {len(steps)}, {steps[0]}..{steps[-1]})"


def _compile(regex: str) -> re.Pattern:
    try:
        return re.compile(regex)
    except re.error as e:
        raise InvalidArgumentError(f"bad regular expression {regex!r}: {e}") from None


# pyarrow.array() and pyarrow.table() import pandas when it is installed (to recognise its
# types): half a second on the first statistics query. Arrays built from their buffers do not.
def _arrow(v: np.ndarray) -> Any:
    """A pyarrow array over a 1-d numpy column (numbers, or bool as a bitmap), without a copy."""
    import pyarrow as pa

    v = np.ascontiguousarray(v)
    if v.dtype == np.bool_:
        data = pa.py_buffer(np.packbits(v, bitorder="little"))
        return pa.Array.from_buffers(pa.bool_(), len(v), [None, data])
    return pa.Array.from_buffers(pa.from_numpy_dtype(v.dtype), len(v), [None, pa.py_buffer(v)])


def _arrow_strings(items: Sequence[str]) -> Any:
    import pyarrow as pa

    encoded = [s.encode("utf-8") for s in items]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int32)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    data = pa.py_buffer(b"".join(encoded))
    return pa.Array.from_buffers(pa.string(), len(encoded), [None, pa.py_buffer(offsets), data])


def _empty_stats_table() -> Any:
    import pyarrow as pa

    u64 = ["numel", "nan", "posinf", "neginf", "zeros"]
    f64 = ["min", "max", "mean", "var", "std", "l1", "l2", "abs_max", "wall_time"]
    fields = [
        pa.field("tensor", pa.dictionary(pa.int32(), pa.string())),
        pa.field("rank", pa.uint32()),
        pa.field("step", pa.int64()),
        pa.field("mode", pa.uint8()),
        pa.field("mode_step", pa.int64()),
        pa.field("has_value", pa.bool_()),
    ]
    fields += [pa.field(n, pa.uint64()) for n in u64] + [pa.field(n, pa.float64()) for n in f64]
    return pa.schema(fields).empty_table()


__all__ = ["Run", "Tensor", "open_run"]
