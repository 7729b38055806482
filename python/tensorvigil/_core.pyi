"""
tensorvigil native core: fused statistics and the tensor store.
"""
from __future__ import annotations
import collections.abc
import numpy
import numpy.typing
import typing
__all__: list[str] = ['CudaPendingStats', 'ErrorCode', 'GpuCapture', 'Record', 'RunReader', 'Stats', 'StreamWriter', 'compute_stats', 'compute_stats_many', 'cuda_available', 'cuda_built', 'cuda_compute_stats', 'fsck_check_shard', 'fsck_check_tensor_index', 'fsck_rewrite_tensor_index', 'fsck_write_sealed_copy', 'get_num_threads', 'set_num_threads']
class ErrorCode:
    """
    Categories of core errors (see docs/FORMAT.md).
    
    Members:
    
      InvalidArgument
    
      NotFound
    
      DataLoss
    
      Io
    
      Unsupported
    
      FailedPrecondition
    """
    DataLoss: typing.ClassVar[ErrorCode]
    FailedPrecondition: typing.ClassVar[ErrorCode]
    InvalidArgument: typing.ClassVar[ErrorCode]
    Io: typing.ClassVar[ErrorCode]
    NotFound: typing.ClassVar[ErrorCode]
    Unsupported: typing.ClassVar[ErrorCode]
    __members__: typing.ClassVar[dict[str, ErrorCode]]
    @typing.overload
    def __eq__(self, other: ErrorCode) -> bool:
        ...
    @typing.overload
    def __eq__(self, other: typing.Any) -> bool:
        ...
    def __getstate__(self) -> int:
        ...
    def __hash__(self) -> int:
        ...
    def __index__(self) -> int:
        ...
    def __init__(self, value: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def __int__(self) -> int:
        ...
    @typing.overload
    def __ne__(self, other: ErrorCode) -> bool:
        ...
    @typing.overload
    def __ne__(self, other: typing.Any) -> bool:
        ...
    def __repr__(self) -> str:
        ...
    def __setstate__(self, state: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def __str__(self) -> str:
        ...
    @property
    def name(self) -> str:
        ...
    @property
    def value(self) -> int:
        ...
class Stats:
    """
    Statistics of one tensor (or of several merged), from one fused pass.
    
    Moments, ``min`` and ``max`` cover finite elements only; NaN and +/-Inf are counted
    separately. Everything is accumulated in double precision. Records merge exactly with
    :meth:`merge` (Chan's parallel update), across chunks, steps or ranks.
    """
    @staticmethod
    def from_parts(numel: typing.SupportsInt | typing.SupportsIndex, nan: typing.SupportsInt | typing.SupportsIndex, posinf: typing.SupportsInt | typing.SupportsIndex, neginf: typing.SupportsInt | typing.SupportsIndex, zeros: typing.SupportsInt | typing.SupportsIndex, min: typing.SupportsFloat | typing.SupportsIndex, max: typing.SupportsFloat | typing.SupportsIndex, mean: typing.SupportsFloat | typing.SupportsIndex, m2: typing.SupportsFloat | typing.SupportsIndex, abs_sum: typing.SupportsFloat | typing.SupportsIndex, abs_max: typing.SupportsFloat | typing.SupportsIndex, hist: typing.Any = None, hist_lo: typing.Any = None, hist_hi: typing.Any = None, hist_below: typing.SupportsInt | typing.SupportsIndex = 0, hist_above: typing.SupportsInt | typing.SupportsIndex = 0, exp_hist: typing.Any = None) -> Stats:
        """
        A record from statistics computed elsewhere (e.g. on an accelerator), checked for consistency.
        
        Pass it to ``StoreWriter.write(..., stats=...)`` to store it instead of statistics computed
        from the values. The fields mean what the attributes of the same names mean.
        
        Args:
            numel, nan, posinf, neginf, zeros: Element counts (>= 0; nan + posinf + neginf <= numel,
                zeros <= the finite elements).
            min, max, mean, m2, abs_sum, abs_max: Over the finite elements; with none, min and max
                must be NaN and the others 0.
            hist: Fixed-bin histogram counts (1 to 4096 bins) or None.
            hist_lo, hist_hi: The histogram's range (finite, lo < hi); required with ``hist``.
            hist_below, hist_above: Finite elements outside the range; the histogram counts plus
                these must equal the finite elements.
            exp_hist: Exponent histogram (256 counts summing to the finite non-zero elements) or None.
        
        Returns:
            Stats.
        
        Raises:
            InvalidArgumentError: A negative or inconsistent count, a non-finite moment with finite
                elements, or a histogram without a valid range.
        
        Example:
            >>> s = tv.Stats.from_parts(4, 0, 0, 0, 1, -1.0, 2.0, 0.5, 5.0, 4.0, 2.0)
        """
    def __init__(self) -> None:
        """
        An empty record (identity for :meth:`merge`).
        """
    def __repr__(self) -> str:
        ...
    def merge(self, other: Stats) -> Stats:
        """
        Returns the statistics of the union of both records' elements.
        
        Args:
            other: Statistics of a disjoint set of elements.
        
        Returns:
            A new Stats; neither input changes.
        
        Raises:
            InvalidArgumentError: When both have histograms with different bins or ranges.
        
        Example:
            >>> a = tv.compute_stats(x[:100]); b = tv.compute_stats(x[100:])
            >>> a.merge(b).mean  # == tv.compute_stats(x).mean
        """
    def to_dict(self) -> dict:
        """
        Returns the statistics as a plain dict of Python numbers (and lists for histograms).
        
        Returns:
            dict with numel, nan, posinf, neginf, zeros, min, max, mean, var, std, sum, l1, l2,
            abs_max, finite, and hist/hist_edges/hist_below/hist_above/exp_hist when present.
        """
    @property
    def abs_max(self) -> float:
        """
        Largest |x| over finite elements.
        """
    @property
    def exp_hist(self) -> typing.Any:
        """
        Exponent histogram (numpy uint64, 256 entries) or None: entry k counts finite non-zero x with floor(log2|x|) == k - 127, clamped to [0, 255].
        """
    @property
    def finite(self) -> int:
        """
        Number of finite elements.
        """
    @property
    def hist(self) -> typing.Any:
        """
        Fixed-bin histogram counts (numpy uint64, ``bins`` entries) or None.
        """
    @property
    def hist_above(self) -> int:
        """
        Finite elements above the histogram range.
        """
    @property
    def hist_below(self) -> int:
        """
        Finite elements below the histogram range.
        """
    @property
    def hist_edges(self) -> typing.Any:
        """
        The ``bins + 1`` bin edges (numpy float64, as numpy.histogram) or None.
        """
    @property
    def l1(self) -> float:
        """
        L1 norm (sum of |x|) of finite elements.
        """
    @property
    def l2(self) -> float:
        """
        L2 norm of the finite elements.
        """
    @property
    def m2(self) -> float:
        """
        Sum of squared deviations from the mean (finite elements).
        """
    @property
    def max(self) -> float:
        """
        Largest finite element (NaN when there is none).
        """
    @property
    def mean(self) -> float:
        """
        Mean of the finite elements (0 when none).
        """
    @property
    def min(self) -> float:
        """
        Smallest finite element (NaN when there is none).
        """
    @property
    def nan(self) -> int:
        """
        Number of NaN elements.
        """
    @property
    def neginf(self) -> int:
        """
        Number of -Inf elements.
        """
    @property
    def numel(self) -> int:
        """
        Number of elements, NaN/Inf included.
        """
    @property
    def posinf(self) -> int:
        """
        Number of +Inf elements.
        """
    @property
    def std(self) -> float:
        """
        Population standard deviation.
        """
    @property
    def sum(self) -> float:
        """
        Sum of the finite elements.
        """
    @property
    def var(self) -> float:
        """
        Population variance (ddof=0) of the finite elements; NaN when none.
        """
    @property
    def zeros(self) -> int:
        """
        Number of elements equal to zero (either sign).
        """
class StreamWriter:
    """
    Append-only writer of one rank's stream of shard files.
    
    Statistics, compression and file I/O run on the writer's threads; ``write`` only copies the
    array (with the GIL released) and returns.
    
    Args:
        run_dir: Run directory (created if missing).
        rank: Rank whose stream this writer owns; one live writer per rank (file lock).
        codec: Default codec for floating-point tensors: "shuffle-zstd" (default), "zstd" or "raw".
        level: zstd level (negative is faster, larger).
        chunk_size: Raw bytes per independently compressed chunk.
        max_pending_bytes: Bound on memory held by writes not yet on disk.
        policy: "block" (wait for space, lose nothing) or "skip" (drop the payload, keep statistics).
        roll_bytes: Start a new shard after a step commit once the shard is this large.
        roll_seconds: ... or once it is this old.
        threads: Encoder threads.
        fsync: fsync shards when sealed and on close.
        tensor_index: Write a tensor index beside each sealed shard (FORMAT.md §3.8), so that a
            reader opens the run from its commits and names and reads one tensor's records alone.
    """
    def __init__(self, run_dir: str, rank: typing.SupportsInt | typing.SupportsIndex = 0, codec: str = 'shuffle-zstd', level: typing.SupportsInt | typing.SupportsIndex = 1, chunk_size: typing.SupportsInt | typing.SupportsIndex = 1048576, max_pending_bytes: typing.SupportsInt | typing.SupportsIndex = 536870912, policy: str = 'block', roll_bytes: typing.SupportsInt | typing.SupportsIndex = 268435456, roll_seconds: typing.SupportsFloat | typing.SupportsIndex = 30.0, threads: typing.SupportsInt | typing.SupportsIndex = 2, fsync: bool = True, tensor_index: bool = True) -> None:
        ...
    def close(self) -> None:
        """
        Flushes, seals the last shard, releases the lock. Idempotent.
        """
    def commit(self, step: typing.SupportsInt | typing.SupportsIndex, mode: typing.SupportsInt | typing.SupportsIndex = 0, mode_step: typing.SupportsInt | typing.SupportsIndex | None = None) -> None:
        """
        Marks ``step`` complete; readers see its tensors once this is on disk.
        """
    def counters(self) -> dict:
        """
        Counters: tensors, commits, dropped, raw/stored/file bytes, shards, pending bytes.
        """
    def flush(self, sync: bool = False) -> None:
        """
        Waits until everything submitted is written (and fsynced when ``sync``).
        """
    def write(self, name: str, step: typing.SupportsInt | typing.SupportsIndex, array: numpy.ndarray, mode: typing.SupportsInt | typing.SupportsIndex = 0, mode_step: typing.SupportsInt | typing.SupportsIndex | None = None, stats_only: bool = False, hist_bins: typing.SupportsInt | typing.SupportsIndex = 0, hist_range: tuple[typing.SupportsFloat | typing.SupportsIndex, typing.SupportsFloat | typing.SupportsIndex] | None = None, exp_hist: bool = False, codec: str | None = None, dtype: str = '', stats: Stats | None = None) -> None:
        """
        Enqueues one C-contiguous array as tensor ``name`` of ``step``.
        
        The array is copied before the call returns (unless ``stats_only``), so the caller may reuse
        it. ``dtype`` reinterprets same-sized elements (e.g. "bfloat16" for an int16 view).
        ``stats`` (a Stats of ``array.size`` elements, e.g. from ``Stats.from_parts``) is stored
        instead of statistics computed here; ``hist_bins``, ``hist_range`` and ``exp_hist`` are then
        ignored.
        """
    def write_stats(self, name: str, step: typing.SupportsInt | typing.SupportsIndex, shape: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex], dtype: str, stats: Stats, mode: typing.SupportsInt | typing.SupportsIndex = 0, mode_step: typing.SupportsInt | typing.SupportsIndex | None = None) -> None:
        """
        Enqueues a statistics-only record of tensor ``name`` of ``step`` from its shape,
        dtype name and statistics computed elsewhere; no values are needed.
        
        Raises InvalidArgumentError when ``stats.numel`` is not the number of elements of ``shape``.
        """
    @property
    def closed(self) -> bool:
        ...
    @property
    def path(self) -> str:
        ...
class Record:
    """
    Metadata and statistics of one stored tensor.
    """
    @property
    def codec(self) -> str:
        ...
    @property
    def dropped(self) -> bool:
        ...
    @property
    def dtype(self) -> str:
        ...
    @property
    def has_value(self) -> bool:
        ...
    @property
    def mode(self) -> int:
        ...
    @property
    def mode_step(self) -> int:
        ...
    @property
    def nbytes(self) -> int:
        ...
    @property
    def rank(self) -> int:
        ...
    @property
    def shape(self) -> tuple:
        ...
    @property
    def stats(self) -> Stats:
        ...
    @property
    def step(self) -> int:
        ...
    @property
    def stored_nbytes(self) -> int:
        ...
    @property
    def wall_time(self) -> float:
        ...
class RunReader:
    """
    Reader of a run directory (all ranks). Sees committed steps only; ``refresh`` picks up what
    writers appended since. ``strict=False`` lists corruption in ``problems`` instead of raising.
    """
    def __init__(self, run_dir: str, strict: bool = True, lazy: bool = True) -> None:
        """
        ``lazy``: sealed shards with a tensor index are opened from its directory (commits and names) and a tensor's records are read when a query first asks for it.
        """
    def commits(self, start: typing.SupportsInt | typing.SupportsIndex = 0) -> dict:
        """
        Committed steps as columns: rank, step, mode_step, mode, wall_time, num_tensors (commits from number ``start`` on, in the order the reader saw them).
        """
    def ended(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> bool:
        ...
    def name_id(self, arg0: str) -> int:
        ...
    def names(self) -> list[str]:
        ...
    def num_deferred_records(self) -> int:
        """
        Records of shards opened lazily that no query has loaded yet.
        """
    def num_records(self) -> int:
        ...
    def ranks(self) -> list[int]:
        ...
    def read(self, name: str, step: typing.SupportsInt | typing.SupportsIndex, rank: typing.SupportsInt | typing.SupportsIndex = 0, threads: typing.SupportsInt | typing.SupportsIndex = 2) -> numpy.ndarray:
        """
        Decodes the values of (name, step, rank) into a new numpy array.
        """
    def record(self, name: str, step: typing.SupportsInt | typing.SupportsIndex, rank: typing.SupportsInt | typing.SupportsIndex = 0) -> typing.Any:
        """
        The Record of (name, step, rank), or None.
        """
    def refresh(self) -> int:
        """
        Reads what was appended; returns the number of newly committed steps.
        """
    def row_columns(self, rows: typing.Annotated[numpy.typing.ArrayLike, numpy.uint64], columns: collections.abc.Sequence[str] = []) -> dict:
        """
        Columns (all when ``columns`` is empty) of the given rows, as ``stats_columns``.
        """
    def select_rows(self, name_ids: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex] = [], ranks: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex] = [], step_min: typing.SupportsInt | typing.SupportsIndex | None = None, step_max: typing.SupportsInt | typing.SupportsIndex | None = None, mode: typing.SupportsInt | typing.SupportsIndex = -1) -> numpy.typing.NDArray[numpy.uint64]:
        """
        Row numbers (in the reader's record table) of the selected records, in table order.
        
        They stay valid across ``refresh`` (rows are only appended, or replaced by a rewrite of the same
        tensor, step and rank); ``row_columns`` reads their columns.
        """
    def stats_columns(self, name_ids: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex] = [], ranks: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex] = [], step_min: typing.SupportsInt | typing.SupportsIndex | None = None, step_max: typing.SupportsInt | typing.SupportsIndex | None = None, mode: typing.SupportsInt | typing.SupportsIndex = -1) -> dict:
        """
        Statistics of the selected records as numpy columns (one row per record).
        """
    def value_location(self, name: str, step: typing.SupportsInt | typing.SupportsIndex, rank: typing.SupportsInt | typing.SupportsIndex = 0) -> typing.Any:
        """
        (shard path, frame offset, end offset) of the frame holding (name, step, rank), or None. Reading the value reads exactly these bytes.
        """
    def writer_alive(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> bool:
        ...
    @property
    def problems(self) -> list[str]:
        ...
class CudaPendingStats:
    """
    Statistics being computed on a CUDA stream (returned by ``cuda_compute_stats``).
    
    ``ready()`` polls the job's event; ``result()`` waits on that event only (never the whole
    device) with the GIL released and returns one Stats per tensor.
    """
    def ready(self) -> bool:
        """
        True when the results reached host memory.
        """
    def result(self) -> list[Stats]:
        """
        Waits for this job and returns a list of Stats, in input order.
        """
class GpuCapture:
    """
    Asynchronous capture of CUDA tensors into a StreamWriter (see tensorvigil.cuda.GpuCapture).
    
    Args:
        writer: The StreamWriter to write into; kept alive by this object, never closed by it.
        staging_bytes: Bound on the pinned host staging ring for raw payloads.
    """
    def __init__(self, writer: StreamWriter, staging_bytes: typing.SupportsInt | typing.SupportsIndex = 268435456) -> None:
        ...
    def close(self) -> None:
        """
        Flushes and stops the capture thread; does not close the writer. Idempotent.
        """
    def commit(self, step: typing.SupportsInt | typing.SupportsIndex, mode: typing.SupportsInt | typing.SupportsIndex, mode_step: typing.SupportsInt | typing.SupportsIndex) -> None:
        """
        Commits ``step`` after every item submitted before; non-blocking.
        """
    def counters(self) -> dict:
        """
        Counters: submits, tensors, copied_bytes, dropped, staging/pending/peak bytes.
        """
    def flush(self) -> None:
        """
        Waits until everything submitted is handed to the writer, then flushes it.
        """
    def submit(self, step: typing.SupportsInt | typing.SupportsIndex, mode: typing.SupportsInt | typing.SupportsIndex, mode_step: typing.SupportsInt | typing.SupportsIndex, items: collections.abc.Sequence[tuple[str, typing.SupportsInt | typing.SupportsIndex, str, collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex], typing.SupportsInt | typing.SupportsIndex, bool, typing.SupportsInt | typing.SupportsIndex]], exp_hist: bool = False, stream: typing.SupportsInt | typing.SupportsIndex = 0) -> None:
        """
        One fused statistics launch for ``items`` ``(name, data_ptr, dtype, shape, device, stats_only, hist_bins)`` and asynchronous copies of their payloads; never synchronises the device.
        """
def _raise_error(code: typing.SupportsInt | typing.SupportsIndex, message: str) -> None:
    """
    Raises the Python exception of a core error code (tests the translator).
    """
def compute_stats(arr: typing.Any, hist_bins: typing.SupportsInt | typing.SupportsIndex = 0, hist_range: typing.Any = None, exp_hist: bool = False, dtype: typing.Any = None, num_threads: typing.SupportsInt | typing.SupportsIndex = 0) -> Stats:
    """
    Statistics of a C-contiguous numpy array in one fused pass (GIL released).
    
    Args:
        arr: C-contiguous numpy array of a supported dtype.
        hist_bins: Fixed-bin histogram size (0: none, at most 4096).
        hist_range: (lo, hi) of the histogram; None: [min, max] of the finite values.
        exp_hist: Also fill the exponent (log2) histogram.
        dtype: Reinterpret the elements as this dtype name (same item size), e.g. "bfloat16"
            for a torch bfloat16 tensor viewed as int16.
        num_threads: 0: the library default (get_num_threads()), 1: the calling thread only.
    
    Returns:
        Stats.
    
    Raises:
        InvalidArgumentError: Unsupported dtype, non-contiguous array, bad histogram options.
    """
def compute_stats_many(arrs: collections.abc.Sequence, hist_bins: typing.SupportsInt | typing.SupportsIndex = 0, hist_range: typing.Any = None, exp_hist: bool = False, dtypes: typing.Any = None, num_threads: typing.SupportsInt | typing.SupportsIndex = 0) -> list[Stats]:
    """
    Statistics of many numpy arrays; threads work across and within arrays (GIL released).
    
    Args:
        arrs: Sequence of C-contiguous numpy arrays.
        hist_bins: Fixed-bin histogram size for every array (0: none).
        hist_range: (lo, hi) shared by every array; None: each array's own [min, max].
        exp_hist: Also fill the exponent histograms.
        dtypes: None, or one dtype override (or None) per array.
        num_threads: 0: the library default, 1: the calling thread only.
    
    Returns:
        list[Stats] in the order of ``arrs``.
    """
def cuda_available() -> bool:
    """
    True when the CUDA backend was built and a CUDA device is visible.
    """
def cuda_built() -> bool:
    """
    True when tensorvigil was built with TV_ENABLE_CUDA=ON.
    """
def cuda_compute_stats(tensors: collections.abc.Sequence[tuple[typing.SupportsInt | typing.SupportsIndex, str, collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex], typing.SupportsInt | typing.SupportsIndex]], hist_bins: typing.SupportsInt | typing.SupportsIndex = 0, hist_range: tuple[typing.SupportsFloat | typing.SupportsIndex, typing.SupportsFloat | typing.SupportsIndex] | None = None, exp_hist: bool = False, stream: typing.SupportsInt | typing.SupportsIndex = 0) -> CudaPendingStats:
    """
    Enqueues the statistics of CUDA tensors on ``stream`` (one fused launch) and returns at once.
    
    Args:
        tensors: ``(data_ptr, dtype, shape, device)`` tuples of C-contiguous device tensors, all on
            one device (dtype: float64, float32, float16, bfloat16, float8_e4m3fn, float8_e5m2).
        hist_bins: Fixed-bin histogram size (0: none).
        hist_range: ``(lo, hi)``, or None for each tensor's finite ``[min, max]``.
        exp_hist: Also fill the exponent histograms.
        stream: ``cudaStream_t`` as an int (0 default, 1 legacy, 2 per-thread default).
    
    Returns:
        CudaPendingStats.
    """
def fsck_check_shard(path: str, rank: typing.SupportsInt | typing.SupportsIndex = -1, seq: typing.SupportsInt | typing.SupportsIndex = -1, verify_values: bool = True) -> dict:
    """
    Scans one shard file and verifies every checksum (docs/RELIABILITY.md).
    
    Args:
        path: Shard file.
        rank: Rank its path names (-1: do not check the header against it).
        seq: Seq its path names (-1: do not check).
        verify_values: Also read and decode every tensor payload.
    
    Returns:
        A dict: ``index_state`` ("sealed", "absent", "footer_damaged", "index_corrupt" or "none"),
        ``scan_end``, frame counts, ``commit_end`` (the offset a repair keeps up to),
        ``committed_steps`` and ``problems`` (a list of ``(offset, message)``).
    
    Raises:
        StoreIOError: the file cannot be read.
    """
def fsck_check_tensor_index(shard_path: str, rank: typing.SupportsInt | typing.SupportsIndex, seq: typing.SupportsInt | typing.SupportsIndex) -> tuple[str, str]:
    """
    Compares a shard's tensor index (``shard-N.tvt``) with what its INDEX frame gives.
    
    Returns:
        ``(state, message)``: state is "ok", "absent", "corrupt", "stale" or "orphan" (the shard
        is not sealed).
    
    Raises:
        DataCorruptionError: the shard's own index is corrupt.
    """
def fsck_rewrite_tensor_index(shard_path: str, rank: typing.SupportsInt | typing.SupportsIndex, seq: typing.SupportsInt | typing.SupportsIndex) -> bool:
    """
    Rewrites a sealed shard's tensor index from its INDEX frame (atomically), or removes it when the shard is not sealed. Returns True when a file was written.
    """
def fsck_write_sealed_copy(path: str, upto: typing.SupportsInt | typing.SupportsIndex, out_path: str) -> int:
    """
    Writes ``out_path``: bytes ``[0, upto)`` of the shard, a rebuilt index and a footer.
    
    The source is not modified; ``out_path`` must not exist and is fsynced.
    
    Args:
        path: Shard file.
        upto: A frame boundary found by :func:`fsck_check_shard` (its ``commit_end``).
        out_path: New file.
    
    Returns:
        The size of the new file.
    
    Raises:
        InvalidArgumentError: ``upto`` is not a boundary of valid frames.
        StoreIOError: on OS errors (``out_path`` exists, disk full ...).
    """
def get_num_threads() -> int:
    """
    Default number of threads of the reductions (initially min(hardware threads, 8)).
    """
def set_num_threads(n: typing.SupportsInt | typing.SupportsIndex) -> None:
    """
    Sets the default number of threads of the reductions.
    
    Args:
        n: Threads to use (the caller included); 0 restores the default.
    """
__version__: str = '0.1.0'
