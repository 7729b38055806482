"""Fused tensor statistics: one pass per tensor, threads across and within tensors.

Every statistic (counts of NaN/±Inf/zeros, min, max, mean, variance, L1, L2, max |x|, and
optionally a fixed-bin and an exponent histogram) comes from a single read of the tensor,
accumulated in double precision and mergeable across chunks, steps and ranks. The work runs in
the native core with the GIL released.

Accepted inputs: numpy arrays of float64/32/16, int8/16/32/64, uint8 and bool, ml_dtypes
bfloat16/float8 arrays, Python scalars and (nested) lists, and torch tensors. Torch is never
imported by this module: a tensor is recognised by its type, detached, and moved to host
memory with ``.cpu()`` (a device-to-host copy for CUDA tensors; statistics computed on the
GPU come with the CUDA backend). Non-contiguous arrays are copied to a contiguous buffer first.

Example:
    >>> import numpy as np, tensorvigil as tv
    >>> s = tv.compute_stats(np.array([1.0, 2.0, np.nan]), hist_bins=4)
    >>> s.numel, s.nan, s.mean, s.hist.tolist()
    (3, 1, 1.5, [1, 0, 0, 1])

"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Optional

from . import _core
from ._arrays import as_array
from ._core import Stats

__all__ = ["Stats", "compute_stats", "compute_stats_many", "get_num_threads", "set_num_threads"]


def _range_arg(hist_range: Optional[Sequence[float]]) -> Optional[tuple[float, float]]:
    if hist_range is None:
        return None
    lo, hi = hist_range
    return float(lo), float(hi)


def compute_stats(
    x: Any,
    hist_bins: int = 0,
    hist_range: Optional[Sequence[float]] = None,
    exp_hist: bool = False,
    num_threads: int = 0,
) -> Stats:
    """Computes the statistics of one tensor in a single fused pass.

    Args:
        x: A numpy array (any layout), an ml_dtypes bfloat16/float8 array, a torch tensor
            (CPU, or CUDA: copied to host), or a Python scalar or list.
        hist_bins: Number of equal-width histogram bins (0: no histogram; at most 4096).
        hist_range: ``(lo, hi)`` of the histogram with ``lo < hi``; ``None`` uses the
            ``[min, max]`` of the finite values (numpy.histogram's rule, including
            ``[v - 0.5, v + 0.5]`` when all values equal ``v``; ``[0, 1]`` when there is no
            finite value). Values outside the range are counted in ``hist_below`` and
            ``hist_above``.
        exp_hist: Also fill ``exp_hist``: 256 counts of ``floor(log2|x|) + 127`` (clamped)
            over finite non-zero values.
        num_threads: Threads to use; 0 means the library default (:func:`get_num_threads`).

    Returns:
        Stats: ``numel nan posinf neginf zeros min max mean var std sum l1 l2 abs_max``,
        plus ``hist``/``hist_edges``/``exp_hist`` when requested. Moments cover finite values.

    Raises:
        InvalidArgumentError: unsupported dtype (complex, object, strings...), bad histogram
            options (``hist_bins`` outside [0, 4096], ``lo >= hi`` or non-finite range).

    Example:
        >>> s = compute_stats(np.random.randn(1000).astype(np.float32), hist_bins=64)
        >>> s.hist.sum() + s.hist_below + s.hist_above == s.finite
        True

    """
    arr, override = as_array(x)
    # Positional: pybind11's keyword matching costs microseconds, and this is called per tensor.
    return _core.compute_stats(
        arr,
        int(hist_bins),
        _range_arg(hist_range),
        bool(exp_hist),
        override or None,
        int(num_threads),
    )


def compute_stats_many(
    xs: Iterable[Any],
    hist_bins: int = 0,
    hist_range: Optional[Sequence[float]] = None,
    exp_hist: bool = False,
    num_threads: int = 0,
) -> list[Stats]:
    """Computes the statistics of many tensors, one fused pass each, in one parallel call.

    Small tensors are spread over the threads one per task; large ones are split into chunks
    whose partial statistics merge exactly. The result does not depend on the thread count.

    Args:
        xs: Tensors, each accepted by :func:`compute_stats`.
        hist_bins: Histogram bins for every tensor (0: none).
        hist_range: ``(lo, hi)`` shared by every tensor; ``None``: each tensor's own range.
        exp_hist: Also fill the exponent histograms.
        num_threads: Threads to use; 0 means the library default.

    Returns:
        list[Stats]: one record per input, in order.

    Raises:
        InvalidArgumentError: as :func:`compute_stats`.

    Example:
        >>> stats = compute_stats_many([p.grad for p in model.parameters()])
        >>> [s.l2 for s in stats]

    """
    arrays = []
    overrides = []
    for x in xs:
        arr, override = as_array(x)
        arrays.append(arr)
        overrides.append(override or None)
    return _core.compute_stats_many(
        arrays,
        hist_bins=int(hist_bins),
        hist_range=_range_arg(hist_range),
        exp_hist=bool(exp_hist),
        dtypes=overrides,
        num_threads=int(num_threads),
    )


def get_num_threads() -> int:
    """Returns the default number of threads of the statistics kernels.

    Returns:
        int: initially ``min(os.cpu_count(), 8)``.

    """
    return int(_core.get_num_threads())


def set_num_threads(n: int) -> None:
    """Sets the default number of threads of the statistics kernels.

    Args:
        n: Threads to use, the calling thread included; 0 restores the default.

    Example:
        >>> set_num_threads(2)

    """
    _core.set_num_threads(int(n))
