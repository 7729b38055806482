"""TensorBoard export of a run: statistics as scalars, stored histograms, findings as text.

The run stays the source of truth; the export is a view of it that can be brought up to date
at any time. Layout of the TensorBoard directory (one TensorBoard *run* per rank and mode)::

    DIR/rank0/train/events.out.tfevents...   rank 0, train steps
    DIR/rank0/eval/events.out.tfevents...    rank 0, eval steps
    DIR/rank0/tensorvigil_export.json        what was exported so far (for incremental export)
    DIR/rank1/train/...

Tags are ``<group>/<tensor>/<statistic>`` (``gradients/fc1.weight/l2``,
``weights/conv1.weight/mean``); losses and metrics are one scalar each (``losses/loss``,
``metrics/accuracy``); histograms are ``<group>/<tensor>/hist``; rule findings are text entries
``findings/<rule>`` at their step (rank 0 only). See ``docs/TENSORBOARD.md``.

Exports are incremental: the state file keeps the last exported step of every mode (and how
many findings were exported), so running the export again appends only what is new. The
event writer is ``tensorboardX`` (imported when an export runs); with the ``crc32c`` package
installed it checksums records natively.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import numpy as np

from ..errors import (
    DataCorruptionError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnsupportedError,
)
from ..modes import Mode, to_mode

if TYPE_CHECKING:  # pragma: no cover
    from ..store.reader import Run

logger = logging.getLogger("tensorvigil")

#: Name of the per-rank state file that makes exports incremental.
STATE_NAME = "tensorvigil_export.json"
#: Lock file held by an exporter while it writes a rank's directory.
LOCK_NAME = ".tensorvigil_export.lock"
STATE_FORMAT = "tensorvigil-tensorboard-export"
STATE_VERSION = 1

#: Statistics that can be exported as scalars (``*_frac`` are fractions of ``numel``).
STATS = (
    "mean",
    "std",
    "min",
    "max",
    "l2",
    "nan_frac",
    "inf_frac",
    "zero_frac",
    "var",
    "l1",
    "abs_max",
    "numel",
)
#: Statistics exported by default.
DEFAULT_STATS = STATS[:8]
#: Where histograms come from: ``auto`` (stored histogram, else computed from the stored
#: values), ``stored`` (stored histograms only), ``values`` (same as ``auto``), ``none``.
HISTOGRAM_SOURCES = ("auto", "stored", "values", "none")
#: Step axis of the events: the global step, or the step within the mode.
STEP_AXES = ("global", "mode")

# A tensor's tag group is the first of these collections it belongs to, then its user
# collections (sorted), then ``all``.
_GROUP_ORDER = (
    "losses",
    "metrics",
    "gradients",
    "weights",
    "biases",
    "optimizer_variables",
    "relu_input",
    "relu_output",
    "tanh_input",
    "tanh_output",
    "sigmoid_input",
    "sigmoid_output",
    "inputs",
    "outputs",
    "custom",
)
_SCALAR_GROUPS = ("losses", "metrics")
_FINDING_KINDS = ("fired", "error")
_WRITER_HINT = (
    "TensorBoard export needs the tensorboardX package (and crc32c for speed): "
    "pip install 'tensorvigil[tensorboard]'"
)
_file_counter = iter(range(1 << 62))
_file_counter_lock = threading.Lock()


def check_available() -> None:
    """Raises :class:`UnsupportedError` when the TensorBoard writer is not installed."""
    import importlib.util
    import sys

    mod = sys.modules.get("tensorboardX", False)
    if mod is None or (mod is False and importlib.util.find_spec("tensorboardX") is None):
        raise UnsupportedError(_WRITER_HINT)


class _Protos:
    """The writer and protobuf classes of tensorboardX, imported on first use."""

    _loaded: Optional[_Protos] = None

    def __init__(self) -> None:
        try:
            from tensorboardX.event_file_writer import EventsWriter
            from tensorboardX.proto import (
                event_pb2,
                plugin_text_pb2,
                summary_pb2,
                tensor_pb2,
                tensor_shape_pb2,
            )
        except ImportError as e:
            raise UnsupportedError(f"{_WRITER_HINT} ({e})") from None
        self.EventsWriter = EventsWriter
        self.Event = event_pb2.Event
        self.Summary = summary_pb2.Summary
        self.Value = summary_pb2.Summary.Value
        self.HistogramProto = summary_pb2.HistogramProto
        self.SummaryMetadata = summary_pb2.SummaryMetadata
        self.TensorProto = tensor_pb2.TensorProto
        self.TensorShapeProto = tensor_shape_pb2.TensorShapeProto
        self.text_content = plugin_text_pb2.TextPluginData(version=0).SerializeToString()

    @classmethod
    def get(cls) -> _Protos:
        if cls._loaded is None:
            cls._loaded = cls()
        return cls._loaded


# ---------------------------------------------------------------------------------------------
# Options


def parse_steps(steps: Any) -> tuple[int, Optional[int]]:
    """A step window ``[lo, hi)`` from ``None``, ``"A:B"``, ``range``, ``slice`` or ``(A, B)``.

    Args:
        steps: ``None`` (all steps); ``"A:B"``, ``"A:"`` or ``":B"`` (``B`` exclusive, as a
            Python slice); a ``range``/``slice`` with step 1; or a pair ``(A, B)`` where ``B``
            may be ``None``.

    Returns:
        ``(lo, hi)`` with ``hi`` ``None`` when open.

    Raises:
        InvalidArgumentError: anything else, negative bounds or ``B <= A``.

    """
    if steps is None:
        return 0, None
    lo: Any
    hi: Any
    if isinstance(steps, str):
        a, sep, b = steps.partition(":")
        if not sep:
            raise InvalidArgumentError(f"steps must look like A:B, A: or :B, got {steps!r}")
        try:
            lo = int(a) if a.strip() else 0
            hi = int(b) if b.strip() else None
        except ValueError:
            raise InvalidArgumentError(
                f"steps must look like A:B with integers, got {steps!r}"
            ) from None
    elif isinstance(steps, (range, slice)):
        if steps.step not in (None, 1):
            raise InvalidArgumentError(f"steps must be contiguous (step 1), got {steps!r}")
        lo = 0 if steps.start is None else steps.start
        hi = steps.stop
    elif isinstance(steps, tuple) and len(steps) == 2:
        lo = 0 if steps[0] is None else steps[0]
        hi = steps[1]
    else:
        raise InvalidArgumentError(
            f"steps must be 'A:B', a range, a slice or a pair (A, B), got {steps!r}"
        )
    for v in (lo, hi):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer))):
            raise InvalidArgumentError(f"step bounds must be integers, got {steps!r}")
    if lo < 0 or (hi is not None and hi <= lo):
        raise InvalidArgumentError(f"bad step window {steps!r}: need 0 <= A < B")
    return int(lo), None if hi is None else int(hi)


def _check_choice(value: Any, what: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise InvalidArgumentError(f"{what} must be one of {', '.join(choices)}; got {value!r}")
    return str(value)


def _tag_label(group: str, name: str) -> str:
    if group == "gradients" and name.endswith("/grad"):
        return name[: -len("/grad")]
    if group == "metrics" and name.startswith("metric/"):
        return name[len("metric/") :]
    return name


def _guess_group(name: str) -> str:
    """Group of a tensor in a run without ``collections.json`` (written without a hook)."""
    if name == "loss" or name.startswith("loss/"):
        return "losses"
    if name.startswith("metric/"):
        return "metrics"
    if name.endswith("/grad"):
        return "gradients"
    return "tensors"


def _primary_group(colls: Sequence[str]) -> str:
    for g in _GROUP_ORDER:
        if g in colls:
            return g
    user = sorted(c for c in colls if c not in ("all", "default"))
    return user[0] if user else "all"


def _tensor_groups(
    names: Sequence[str], colls: dict[str, list[str]], selected: Optional[Sequence[str]]
) -> dict[str, str]:
    """Tag group of every tensor to export (``selected`` restricts to those collections)."""
    if selected is not None:
        missing = [c for c in selected if c not in colls]
        if missing:
            raise NotFoundError(
                f"no collection(s) {', '.join(repr(c) for c in missing)} in the run; "
                f"available: {sorted(colls) or 'none (the run has no collections.json)'}"
            )
    if not colls:
        return {n: _guess_group(n) for n in names}
    member_of: dict[str, list[str]] = {}
    for c, members in colls.items():
        if selected is not None and c not in selected:
            continue
        for n in members:
            member_of.setdefault(n, []).append(c)
    out: dict[str, str] = {}
    for n in names:
        cs = member_of.get(n)
        if cs:
            out[n] = _primary_group(cs)
        elif selected is None:
            out[n] = _guess_group(n)
    return out


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if not n:
            out.append(b)
            return bytes(out)
        out.append(b | 0x80)


def _simple_value_prefix(tag: str) -> bytes:
    """Bytes of ``Summary.value`` entry ``{tag, simple_value}`` up to the 4 float bytes.

    ``Summary.value`` is field 1 (length-delimited); in ``Summary.Value``, ``tag`` is field 1
    (string) and ``simple_value`` field 2 (fixed32 float, key 0x15).
    """
    t = tag.encode("utf-8")
    inner = b"\x0a" + _varint(len(t)) + t + b"\x15"
    return b"\x0a" + _varint(len(inner) + 4) + inner


@dataclass
class _Tags:
    """Tags of one tensor: the base (``group/tensor``) and the encoded scalar prefixes."""

    base: str
    prefixes: list[bytes]


# ---------------------------------------------------------------------------------------------
# Results


@dataclass
class ExportResult:
    """What one export call wrote.

    Attributes:
        logdir: The TensorBoard directory.
        events: Step events written (one per rank, mode and step).
        records: Tensor records exported (tensor x step x rank).
        scalars: Scalar values written.
        histograms: Histograms written.
        findings: Findings written as text.
        seconds: Wall time of the export.
        files: Event files created by this call.

    """

    logdir: str
    events: int = 0
    records: int = 0
    scalars: int = 0
    histograms: int = 0
    findings: int = 0
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)

    @property
    def records_per_second(self) -> float:
        """Tensor records (steps x tensors) exported per second."""
        return self.records / self.seconds if self.seconds > 0 else 0.0

    def add(self, other: ExportResult) -> None:
        """Adds the counts of ``other`` (another call into the same directory)."""
        self.events += other.events
        self.records += other.records
        self.scalars += other.scalars
        self.histograms += other.histograms
        self.findings += other.findings
        self.seconds += other.seconds
        self.files.extend(other.files)

    def __str__(self) -> str:
        return (
            f"{self.events} step events ({self.records} tensor records, {self.scalars} scalars, "
            f"{self.histograms} histograms, {self.findings} findings) to {self.logdir} in "
            f"{self.seconds:.2f} s ({self.records_per_second:,.0f} records/s)"
        )


# ---------------------------------------------------------------------------------------------
# Files


def _lock(path: str) -> Optional[int]:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock
        return None
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise FailedPreconditionError(
            f"'{os.path.dirname(path)}' is being written by another TensorBoard export "
            "(a hook's tensorboard_dir mirror or a running `tensorvigil export`); "
            "wait for it to finish or export into another directory"
        ) from None
    return fd


def _unlock(fd: Optional[int]) -> None:
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock


def _event_files(dirpath: str) -> list[str]:
    try:
        return sorted(f for f in os.listdir(dirpath) if f.startswith("events.out.tfevents."))
    except FileNotFoundError:
        return []


def _wait_for_later_name(dirpath: str) -> None:
    """Waits until a new event file's name sorts after the directory's existing ones.

    TensorBoard reads a run's event files in name order and a live TensorBoard only moves on
    to names after the current one; names start with the creation second, so a second file
    made within the same second (by another process) could sort first.
    """
    newest = -1
    for f in _event_files(dirpath):
        part = f.split(".")[3] if f.count(".") >= 3 else ""
        if part.isdigit():
            newest = max(newest, int(part))
    deadline = time.monotonic() + 2.5  # a clock set back by more than this: give up waiting
    while int(time.time()) <= newest and time.monotonic() < deadline:
        time.sleep(max(0.01, min(0.2, newest + 1 - time.time())))


def _atomic_json(path: str, doc: dict) -> None:
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


class _RankDir:
    """One rank's directory: its lock, state and open event files (one per mode)."""

    def __init__(self, path: str, run_id: str, run_path: str, options: dict) -> None:
        self.path = path
        os.makedirs(path, exist_ok=True)
        self.lock = _lock(os.path.join(path, LOCK_NAME))
        try:
            self.state = self._load_state(run_id, run_path, options)
        except BaseException:
            _unlock(self.lock)
            raise
        self.writers: dict[str, Any] = {}

    def _load_state(self, run_id: str, run_path: str, options: dict) -> dict:
        path = os.path.join(self.path, STATE_NAME)
        fresh = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "run": run_path,
            "run_id": run_id,
            "options": options,
            "last_step": {},
            "findings": [],
        }
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
        except FileNotFoundError:
            return fresh
        except ValueError as e:
            raise DataCorruptionError(
                f"'{path}' is not valid JSON ({e}); pass overwrite=True (--overwrite) to "
                "export afresh"
            ) from None
        if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
            raise DataCorruptionError(f"'{path}' is not a tensorvigil export state file")
        if doc.get("version") != STATE_VERSION:
            raise DataCorruptionError(
                f"'{path}' has state version {doc.get('version')!r}; this exporter writes "
                f"{STATE_VERSION}. Pass overwrite=True (--overwrite) to export afresh"
            )
        if doc.get("run_id") != run_id:
            raise InvalidArgumentError(
                f"'{self.path}' holds an export of another run ({doc.get('run')!r}); export "
                "into another directory or pass overwrite=True (--overwrite)"
            )
        old = doc.get("options") or {}
        diff = [k for k in options if old.get(k) != options[k]]
        if diff:
            detail = "; ".join(f"{k}: was {old.get(k)!r}, now {options[k]!r}" for k in diff)
            raise InvalidArgumentError(
                f"'{self.path}' was exported with other options ({detail}); use the same "
                "options, another directory, or overwrite=True (--overwrite)"
            )
        last = doc.get("last_step")
        if not isinstance(last, dict) or not isinstance(doc.get("findings"), list):
            raise DataCorruptionError(f"'{path}' lacks last_step/findings")
        doc["run"] = run_path
        return doc

    def save_state(self) -> None:
        _atomic_json(os.path.join(self.path, STATE_NAME), self.state)

    def writer(self, mode: str, protos: _Protos, result: ExportResult) -> Any:
        w = self.writers.get(mode)
        if w is None:
            d = os.path.join(self.path, mode)
            os.makedirs(d, exist_ok=True)
            _wait_for_later_name(d)
            with _file_counter_lock:
                n = next(_file_counter)
            w = protos.EventsWriter(os.path.join(d, "events"), f".{os.getpid()}.{n}.tv")
            self.writers[mode] = w
            result.files.append(w._file_name)
        return w

    def flush(self) -> None:
        for w in self.writers.values():
            w.flush()

    def close(self) -> None:
        try:
            for w in self.writers.values():
                w.close()
        finally:
            self.writers.clear()
            _unlock(self.lock)
            self.lock = None


def _remove_export(logdir: str) -> None:
    """Deletes what an earlier export wrote into ``logdir`` (event files and state only)."""
    if not os.path.isdir(logdir):
        return
    for rank_dir in sorted(os.listdir(logdir)):
        rpath = os.path.join(logdir, rank_dir)
        if not (rank_dir.startswith("rank") and rank_dir[4:].isdigit() and os.path.isdir(rpath)):
            continue
        fd = _lock(os.path.join(rpath, LOCK_NAME))
        try:
            for m in Mode:
                mdir = os.path.join(rpath, str(m))
                for f in _event_files(mdir):
                    os.remove(os.path.join(mdir, f))
            state = os.path.join(rpath, STATE_NAME)
            if os.path.exists(state):
                os.remove(state)
        finally:
            _unlock(fd)


# ---------------------------------------------------------------------------------------------
# Exporter


class TensorBoardExporter:
    """Writes a run's statistics, histograms and findings as TensorBoard event files.

    Keeps its event files open between :meth:`export` calls, so a long-lived exporter (the
    hook's mirror) writes one file per rank and mode; every call appends only the steps
    committed since the last one.

    Args:
        run: A :class:`tensorvigil.Run` or the run directory.
        logdir: TensorBoard directory (created if missing).
        collections: Export only tensors of these collections (default: every tensor).
        steps: Step window ``"A:B"``, ``range``, ``slice`` or ``(A, B)`` (B exclusive).
        ranks: Export only these ranks (default: every rank of the run).
        stats: Statistics exported as scalars per tensor (see :data:`STATS`).
        histograms: ``"auto"`` (the stored fixed-bin histogram, else one computed from the
            stored values), ``"stored"`` (stored histograms only: no payload is read),
            ``"values"`` (same as ``auto``) or ``"none"``.
        hist_bins: Bins of histograms computed from values.
        step_axis: ``"global"`` (the global step, default) or ``"mode"`` (the step within its
            mode) as the TensorBoard step.
        findings: Export rule findings (``findings.jsonl``) as text on rank 0.
        overwrite: Delete an earlier export's event files and state in ``logdir`` first.

    Raises:
        UnsupportedError: tensorboardX is not installed.
        InvalidArgumentError: a bad option, or ``logdir`` holds an export of another run or
            with other ``collections``/``stats``/``step_axis``.
        FailedPreconditionError: another exporter is writing ``logdir``.

    Example:
        >>> with TensorBoardExporter("runs/exp1", "tb/exp1") as ex:
        ...     print(ex.export())

    """

    def __init__(
        self,
        run: Union[Run, str, os.PathLike],
        logdir: Union[str, os.PathLike],
        *,
        collections: Optional[Union[str, Sequence[str]]] = None,
        steps: Any = None,
        ranks: Optional[Sequence[int]] = None,
        stats: Sequence[str] = DEFAULT_STATS,
        histograms: str = "auto",
        hist_bins: int = 30,
        step_axis: str = "global",
        findings: bool = True,
        overwrite: bool = False,
    ) -> None:
        from ..store.reader import Run as _Run

        check_available()  # the writer itself is imported when the first event is written
        self.run = run if isinstance(run, _Run) else _Run(run)
        self.logdir = os.fspath(logdir)
        if isinstance(collections, str):
            collections = [c for c in (p.strip() for p in collections.split(",")) if c]
        self.collections = None if collections is None else list(dict.fromkeys(collections))
        if self.collections is not None and not self.collections:
            raise InvalidArgumentError("collections names no collection")
        self.lo, self.hi = parse_steps(steps)
        if ranks is not None:
            ranks = [int(r) for r in ranks]
            if any(r < 0 for r in ranks):
                raise InvalidArgumentError(f"ranks must be >= 0, got {ranks}")
        self.ranks = ranks
        if isinstance(stats, str):
            stats = [s for s in (p.strip() for p in stats.split(",")) if s]
        bad = [s for s in stats if s not in STATS]
        if bad or not stats:
            raise InvalidArgumentError(
                f"unknown statistic(s) {bad or stats!r}; choose from {', '.join(STATS)}"
            )
        self.stats = tuple(dict.fromkeys(stats))
        self.histograms = _check_choice(histograms, "histograms", HISTOGRAM_SOURCES)
        if (
            isinstance(hist_bins, bool)
            or not isinstance(hist_bins, int)
            or not (1 <= hist_bins <= 4096)
        ):
            raise InvalidArgumentError(
                f"hist_bins must be an integer in 1..4096, got {hist_bins!r}"
            )
        self.hist_bins = hist_bins
        self.step_axis = _check_choice(step_axis, "step_axis", STEP_AXES)
        self.findings = bool(findings)
        if os.path.exists(self.logdir) and not os.path.isdir(self.logdir):
            raise InvalidArgumentError(f"TensorBoard directory '{self.logdir}' is a file")
        self._run_id = str(self.run.manifest.get("created") or os.path.realpath(self.run.path))
        self._options = {
            "collections": None if self.collections is None else sorted(self.collections),
            "stats": list(self.stats),
            "step_axis": self.step_axis,
        }
        if overwrite:
            _remove_export(self.logdir)
        self._dirs: dict[int, _RankDir] = {}
        self._tags: dict[tuple[int, bool], _Tags] = {}
        self._groups: dict[str, str] = {}
        self._groups_key: Any = None
        self.closed = False

    @property
    def _protos(self) -> _Protos:
        return _Protos.get()

    # -- public ------------------------------------------------------------------------------

    def export(self) -> ExportResult:
        """Appends every step committed since the last call (or the last export into logdir).

        Returns:
            What was written.

        """
        if self.closed:
            raise FailedPreconditionError("this TensorBoard exporter is closed")
        t0 = time.perf_counter()
        result = ExportResult(self.logdir)
        run = self.run
        run.refresh()
        names = run._r.names()
        self._update_groups(names)
        present = run.ranks()
        # A rank not written yet is exported by a later call.
        ranks = present if self.ranks is None else [r for r in self.ranks if r in present]
        name_ids = [i for i, n in enumerate(names) if n in self._groups]
        commits = run._r.commits()
        for rank in ranks:
            rdir = self._rank_dir(rank)
            if name_ids:
                self._export_rank(rank, rdir, names, name_ids, commits, result)
            if rank == 0 and self.findings:
                self._export_findings(rdir, result)
            rdir.flush()
            rdir.save_state()
        result.seconds = time.perf_counter() - t0
        return result

    def close(self) -> None:
        """Flushes and closes the event files and releases the directory. Idempotent."""
        if self.closed:
            return
        self.closed = True
        dirs, self._dirs = self._dirs, {}
        err: Optional[BaseException] = None
        for d in dirs.values():
            try:
                d.close()
            except Exception as e:  # noqa: BLE001 - close every directory, then report
                err = err or e
        if err is not None:
            raise err

    def __enter__(self) -> TensorBoardExporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------

    def _rank_dir(self, rank: int) -> _RankDir:
        d = self._dirs.get(rank)
        if d is None:
            d = _RankDir(
                os.path.join(self.logdir, f"rank{rank}"),
                self._run_id,
                os.path.abspath(self.run.path),
                self._options,
            )
            self._dirs[rank] = d
        return d

    def _update_groups(self, names: list[str]) -> None:
        path = os.path.join(self.run.path, "collections.json")
        try:
            st = os.stat(path)
            key: Any = (len(names), st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            key = (len(names), None)
        if key == self._groups_key:
            return
        groups = _tensor_groups(names, self.run.collections(), self.collections)
        # A tensor keeps its first group (and so its tags) for the exporter's lifetime.
        for n, g in groups.items():
            self._groups.setdefault(n, g)
        self._groups_key = key

    def _tags_for(self, name_id: int, name: str, scalar: bool) -> _Tags:
        key = (name_id, scalar)
        tags = self._tags.get(key)
        if tags is None:
            group = self._groups[name]
            base = f"{group}/{_tag_label(group, name)}"
            names = [base] if scalar else [f"{base}/{s}" for s in self.stats]
            tags = _Tags(base, [_simple_value_prefix(t) for t in names])
            self._tags[key] = tags
        return tags

    def _stat_matrix(self, cols: dict, names: list[str]) -> np.ndarray:
        """The exported statistics of every row as float32, shape (rows, len(stats)).

        Rows of single-element losses and metrics hold their value in column 0.
        """
        numel = cols["numel"].astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            derived = {
                "nan_frac": cols["nan"] / numel,
                "inf_frac": (cols["posinf"] + cols["neginf"]) / numel,
                "zero_frac": cols["zeros"] / numel,
                "numel": numel,
            }
            m = np.empty((len(numel), len(self.stats)), dtype="<f4")
            for k, s in enumerate(self.stats):
                m[:, k] = derived[s] if s in derived else cols[s]
            value = np.where(
                cols["nan"] > 0,
                math.nan,
                np.where(
                    cols["posinf"] > 0,
                    math.inf,
                    np.where(cols["neginf"] > 0, -math.inf, cols["mean"]),
                ),
            )
            scalar_ids = [i for i, n in enumerate(names) if self._groups.get(n) in _SCALAR_GROUPS]
            scalar = (numel == 1) & np.isin(cols["name_id"], scalar_ids)
            m[:, 0] = np.where(scalar, value, m[:, 0])
        return m

    def _export_rank(
        self,
        rank: int,
        rdir: _RankDir,
        names: list[str],
        name_ids: list[int],
        commits: dict,
        result: ExportResult,
    ) -> None:
        r = self.run._r
        last = rdir.state["last_step"]
        sel = commits["rank"] == rank
        modes = sorted({int(m) for m in commits["mode"][sel].tolist()})
        all_ids = len(name_ids) == len(names)
        for mode_code in modes:
            mode = str(Mode(mode_code))
            done = int(last.get(mode, -1))
            msel = sel & (commits["mode"] == mode_code)
            newest = int(commits["step"][msel].max())
            lo = max(done + 1, self.lo)
            hi = newest if self.hi is None else min(newest, self.hi - 1)
            if lo > hi:
                continue
            cols = r.stats_columns(
                name_ids=[] if all_ids else name_ids,
                ranks=[rank],
                step_min=lo,
                step_max=hi,
                mode=mode_code,
            )
            n = len(cols["step"])
            if n:
                order = np.lexsort((cols["name_id"], cols["step"]))
                cols = {k: v[order] for k, v in cols.items()}
                self._write_rows(rdir, mode, rank, names, cols, result)
            # Every committed step up to hi is done, with or without selected tensors in it.
            last[mode] = hi

    def _write_rows(
        self,
        rdir: _RankDir,
        mode: str,
        rank: int,
        names: list[str],
        cols: dict,
        result: ExportResult,
    ) -> None:
        # The scalar values of a step are encoded straight into Summary bytes from
        # pre-encoded per-tag prefixes (the protobuf runtime parses and checks them): a
        # protobuf object per scalar costs ~3x more, on the hook's mirror thread too.
        P = self._protos
        r = self.run._r
        writer = rdir.writer(mode, P, result)
        nstats = len(self.stats)
        raw = self._stat_matrix(cols, names).tobytes()
        chunks = [raw[k : k + 4] for k in range(0, len(raw), 4)]
        nid = cols["name_id"].tolist()
        steps = cols["step"].tolist()
        tb_steps = (cols["mode_step"] if self.step_axis == "mode" else cols["step"]).tolist()
        wall = cols["wall_time"].tolist()
        numel = cols["numel"].tolist()
        has_value = cols["has_value"].tolist()
        groups = self._groups
        hist_mode = self.histograms
        n = len(steps)
        start = 0
        while start < n:
            step = steps[start]
            end = start
            while end < n and steps[end] == step:
                end += 1
            prefixes: list[bytes] = []
            values: list[bytes] = []
            histos = []
            wt = 0.0
            for i in range(start, end):
                name = names[nid[i]]
                scalar = numel[i] == 1 and groups[name] in _SCALAR_GROUPS
                tags = self._tags_for(nid[i], name, scalar)
                prefixes += tags.prefixes
                c = i * nstats
                values += chunks[c : c + len(tags.prefixes)]
                if not scalar and hist_mode != "none" and numel[i] > 1:
                    h = self._histogram(r, name, step, rank, has_value[i])
                    if h is not None:
                        histos.append((f"{tags.base}/hist", h))
                if wall[i] > wt:
                    wt = wall[i]
            parts: list[Optional[bytes]] = [None] * (2 * len(prefixes))
            parts[0::2] = prefixes
            parts[1::2] = values
            ev = P.Event(wall_time=wt, step=tb_steps[start])
            ev.summary.MergeFromString(b"".join(parts))  # type: ignore[arg-type]
            for tag, h in histos:
                ev.summary.value.add(tag=tag, histo=h)
            writer.write_event(ev)
            result.scalars += len(prefixes)
            result.histograms += len(histos)
            result.events += 1
            result.records += end - start
            start = end

    def _histogram(self, r: Any, name: str, step: int, rank: int, has_value: bool) -> Any:
        rec = r.record(name, step, rank)
        st = rec.stats if rec is not None else None
        if st is None or st.hist is None:
            if self.histograms == "stored" or not has_value:
                return None
            from ..stats import compute_stats

            st = compute_stats(r.read(name, step, rank), hist_bins=self.hist_bins)
        return histogram_proto(st, self._protos.HistogramProto)

    def _export_findings(self, rdir: _RankDir, result: ExportResult) -> None:
        done_keys = rdir.state["findings"]
        done = set(done_keys)
        P = self._protos
        for f in self.run.findings():
            if f.get("kind", "fired") not in _FINDING_KINDS:
                continue
            key = _finding_key(f)
            if key in done:
                continue
            step = f.get("step")
            if (
                not isinstance(step, int)
                or step < self.lo
                or (self.hi is not None and step >= self.hi)
            ):
                continue
            try:
                mode = str(to_mode(f.get("mode", "train")))
            except InvalidArgumentError:
                mode = "train"
            tb_step = step
            ms = f.get("mode_step")
            if self.step_axis == "mode" and isinstance(ms, int) and ms >= 0:
                tb_step = ms
            value = P.Value(
                tag=f"findings/{f.get('rule', 'rule')}",
                metadata=P.SummaryMetadata(
                    plugin_data=P.SummaryMetadata.PluginData(
                        plugin_name="text", content=P.text_content
                    )
                ),
                tensor=P.TensorProto(
                    dtype="DT_STRING",
                    string_val=[finding_markdown(f).encode("utf-8")],
                    tensor_shape=P.TensorShapeProto(dim=[P.TensorShapeProto.Dim(size=1)]),
                ),
            )
            wt = time.time()
            writer = rdir.writer(mode, P, result)
            writer.write_event(
                P.Event(wall_time=wt, step=tb_step, summary=P.Summary(value=[value]))
            )
            result.findings += 1
            done.add(key)
            done_keys.append(key)


def _finding_key(f: dict) -> str:
    """Identity of a finding in the state file (findings of several files merge by time)."""
    return f"{f.get('rule')}|{f.get('step')}|{f.get('mode')}|{f.get('time')}"


def finding_markdown(f: dict) -> str:
    """The text of a finding as shown in TensorBoard's Text tab (Markdown)."""
    kind = f.get("kind", "fired")
    head = f"**{f.get('severity', 'warning')}** `{f.get('rule', '?')}`"
    if kind != "fired":
        head += f" ({kind})"
    where = f"step {f.get('step')} ({f.get('mode', 'train')}"
    if isinstance(f.get("mode_step"), int) and f["mode_step"] >= 0:
        where += f", mode step {f['mode_step']}"
    text = f"{head} at {where}): {f.get('message', '')}"
    evidence = f.get("evidence")
    if evidence:
        body = json.dumps(evidence, indent=1, sort_keys=True, default=str)
        if len(body) > 4000:
            body = body[:4000] + "\n..."
        text += "\n\n" + "\n".join("    " + line for line in body.splitlines())
    return text


def histogram_proto(st: Any, HistogramProto: Any) -> Any:
    """TensorBoard's ``HistogramProto`` for a stored fixed-bin histogram, or ``None``.

    Bins outside the first and last non-empty ones are dropped; elements below and above the
    histogram range become one bucket each. TensorBoard reads bucket ``i`` as
    ``(bucket_limit[i-1], bucket_limit[i]]`` with the first starting at ``min`` and the last
    ending at ``max``, so the buckets are exact.

    Args:
        st: A :class:`tensorvigil.Stats` with a fixed-bin histogram.
        HistogramProto: The protobuf class to build.

    """
    counts = st.hist
    finite = st.finite
    if counts is None or finite == 0:
        return None
    edges = st.hist_edges
    nz = counts.nonzero()[0]
    limits: list[float] = []
    buckets: list[int] = []
    below, above = st.hist_below, st.hist_above
    if below:
        limits.append(float(edges[0]))
        buckets.append(below)
    if len(nz):
        a, b = int(nz[0]), int(nz[-1]) + 1
        limits += edges[a + 1 : b + 1].tolist()
        buckets += counts[a:b].tolist()
    vmax = st.max
    if above:
        limits.append(vmax)
        buckets.append(above)
    return HistogramProto(
        min=st.min,
        max=vmax,
        num=finite,
        sum=st.sum,
        sum_squares=st.l2**2,
        bucket_limit=limits,
        bucket=buckets,
    )


def export_tensorboard(
    run: Union[Run, str, os.PathLike],
    logdir: Union[str, os.PathLike],
    **options: Any,
) -> ExportResult:
    """Exports (or brings up to date) a TensorBoard view of a run.

    Args:
        run: A :class:`tensorvigil.Run` or the run directory.
        logdir: TensorBoard directory; point ``tensorboard --logdir`` at it.
        **options: :class:`TensorBoardExporter` options (``collections``, ``steps``,
            ``ranks``, ``stats``, ``histograms``, ``hist_bins``, ``step_axis``, ``findings``,
            ``overwrite``).

    Returns:
        What was written. Running it again appends only steps committed since.

    Example:
        >>> from tensorvigil.export import export_tensorboard
        >>> export_tensorboard("runs/exp1", "tb/exp1", collections=["gradients", "losses"])

    """
    with TensorBoardExporter(run, logdir, **options) as ex:
        return ex.export()


# ---------------------------------------------------------------------------------------------
# Live mirror for the capture hooks


class TensorBoardMirror:
    """Exports a hook's own rank to TensorBoard on a background thread while it trains.

    Woken after each commit (commits reach the file on the writer's thread, so it also polls),
    it exports at most every ``interval`` seconds, reading the run like any reader: the
    training thread only pays for the wake-up. Histograms come from stored histograms only (no
    payload is decoded while training). An error stops the mirror and is logged once; it is
    kept in :attr:`error` (the session raises it at close when strict).

    Args:
        run_dir: The hook's run directory.
        logdir: TensorBoard directory.
        rank: The hook's rank.
        interval: Least seconds between two exports.

    """

    def __init__(self, run_dir: str, logdir: str, rank: int, interval: float = 1.0) -> None:
        self.run_dir = run_dir
        self.logdir = logdir
        self.rank = rank
        self.interval = interval
        self.error: Optional[BaseException] = None
        self.exported = ExportResult(logdir)
        self._exporter: Optional[TensorBoardExporter] = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tv-tensorboard", daemon=True)
        self._thread.start()

    def notify(self) -> None:
        """A step was committed."""
        self._wake.set()

    def _export(self) -> None:
        if self._exporter is None:
            self._exporter = TensorBoardExporter(
                self.run_dir, self.logdir, ranks=[self.rank], histograms="stored"
            )
        self.exported.add(self._exporter.export())

    def _fail(self, e: BaseException) -> None:
        if self.error is None:
            self.error = e
            logger.error(
                "tensorvigil: TensorBoard mirror to '%s' stopped after an error (training "
                "continues; the run is intact, export it later with `tensorvigil export`): "
                "%s: %s",
                self.logdir,
                type(e).__name__,
                e,
                exc_info=e,
            )

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self._export()
            except Exception as e:  # noqa: BLE001 - the mirror never breaks training
                self._fail(e)
                return
            self._stop.wait(self.interval)

    def close(self, final: bool = True, timeout: float = 60.0) -> Optional[BaseException]:
        """Stops the thread; with ``final``, exports the last steps. Flushes the files.

        Returns:
            The error that stopped the mirror, if any.

        """
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():  # an export pass is stuck (e.g. a hung file system)
            self._fail(TimeoutError(f"TensorBoard mirror did not stop within {timeout} s"))
            return self.error
        try:
            if final and self.error is None:
                self._export()
        except Exception as e:  # noqa: BLE001
            self._fail(e)
        finally:
            if self._exporter is not None:
                try:
                    self._exporter.close()
                except Exception as e:  # noqa: BLE001
                    self._fail(e)
        return self.error


__all__ = [
    "DEFAULT_STATS",
    "HISTOGRAM_SOURCES",
    "STATS",
    "STEP_AXES",
    "ExportResult",
    "TensorBoardExporter",
    "TensorBoardMirror",
    "check_available",
    "export_tensorboard",
    "finding_markdown",
    "histogram_proto",
    "parse_steps",
]
