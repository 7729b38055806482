"""Statistics and capture of CUDA tensors on the GPU, without synchronising the device.

:func:`compute_stats_cuda` computes the full statistics record of many device tensors in one
fused kernel launch (a second launch only for fixed-bin histograms) on the caller's CUDA stream
and returns a :class:`PendingStats` at once; only the final records travel to the host.
:class:`GpuCapture` also copies raw tensors device-to-host through a bounded, reused pinned
staging ring on a side stream and hands everything to a :class:`~tensorvigil.StoreWriter` from a
native thread, in submission order.

Inputs: torch tensors (recognised by duck typing: ``data_ptr``, ``is_cuda``, ``dtype``), any
object with ``__cuda_array_interface__`` (float64/32/16), or any object with ``__dlpack__`` on
a CUDA device. Torch is never imported by this module and the native core does not link it.
Tensors must be C-contiguous (call ``.contiguous()`` first). Supported dtypes: float64,
float32, float16, bfloat16, float8_e4m3fn, float8_e5m2.

Without a CUDA build every entry point raises :class:`~tensorvigil.UnsupportedError` and
:func:`cuda_available` returns False.

Example:
    >>> import torch, tensorvigil as tv
    >>> from tensorvigil import cuda as tvc
    >>> params = [p for p in model.parameters()]
    >>> pending = tvc.compute_stats_cuda(params)   # returns at once
    >>> loss.backward()                             # the GPU keeps working
    >>> [s.l2 for s in pending.result()]            # waits for this job only

"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Sequence
from typing import Any, Optional

from . import _core
from ._core import Stats
from .errors import InvalidArgumentError
from .modes import ModeLike, to_mode

__all__ = ["GpuCapture", "PendingStats", "compute_stats_cuda", "cuda_available", "cuda_built"]

_TORCH_DTYPES = {
    "torch.float32": "float32",
    "torch.float64": "float64",
    "torch.float16": "float16",
    "torch.bfloat16": "bfloat16",
    "torch.float8_e4m3fn": "float8_e4m3fn",
    "torch.float8_e5m2": "float8_e5m2",
}
_TYPESTRS = {"<f4": "float32", "<f8": "float64", "<f2": "float16"}
_ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}
# DLPack (code, bits) -> dtype; fp8 codes from DLPack 1.1 (kDLFloat8_e4m3fn = 10, _e5m2 = 12).
_DLPACK_DTYPES = {
    (2, 64): "float64",
    (2, 32): "float32",
    (2, 16): "float16",
    (4, 16): "bfloat16",
    (10, 8): "float8_e4m3fn",
    (12, 8): "float8_e5m2",
}
_KDLCUDA = 2


def cuda_built() -> bool:
    """True when tensorvigil was built with ``TV_ENABLE_CUDA=ON``."""
    return bool(_core.cuda_built())


def cuda_available() -> bool:
    """True when the CUDA backend was built and a CUDA device is visible."""
    return bool(_core.cuda_available())


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


def _contiguous(shape: tuple[int, ...], strides: Optional[Sequence[int]], unit: int) -> bool:
    """Whether ``strides`` (in units of ``unit``) describe a C-contiguous layout."""
    if strides is None:
        return True
    expect = unit
    for d, s in zip(reversed(shape), reversed(list(strides))):
        if d != 1 and s != expect:
            return False
        expect *= d
    return True


def _from_dlpack(x: Any, keep: list) -> tuple[int, str, tuple[int, ...], int]:
    dev_type, dev_id = x.__dlpack_device__()
    if int(dev_type) != _KDLCUDA:
        raise InvalidArgumentError(f"expected a CUDA tensor, got a DLPack device type {dev_type}")
    capsule = x.__dlpack__()
    keep.append(capsule)
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype = ctypes.c_void_p
    get.argtypes = [ctypes.py_object, ctypes.c_char_p]
    t = _DLTensor.from_address(get(capsule, b"dltensor"))
    dtype = _DLPACK_DTYPES.get((t.dtype.code, t.dtype.bits))
    if dtype is None or t.dtype.lanes != 1:
        raise InvalidArgumentError(
            f"unsupported DLPack dtype (code {t.dtype.code}, {t.dtype.bits} bits)"
        )
    shape = tuple(int(t.shape[i]) for i in range(t.ndim))
    strides = None if not t.strides else [int(t.strides[i]) for i in range(t.ndim)]
    if not _contiguous(shape, strides, 1):
        raise InvalidArgumentError("non-contiguous DLPack tensor: make it contiguous first")
    return int(t.data or 0) + int(t.byte_offset), dtype, shape, int(dev_id)


_BY_TORCH_DTYPE: dict = {}  # torch.dtype object -> dtype name (filled on first use)


def _torch_spec(x: Any) -> Optional[tuple[int, str, tuple[int, ...], int]]:
    """Fast path for a contiguous CUDA torch tensor (hooks submit hundreds per step)."""
    dtype = _BY_TORCH_DTYPE.get(x.dtype)
    if dtype is None:
        dtype = _TORCH_DTYPES.get(str(x.dtype))
        if dtype is None:
            return None
        _BY_TORCH_DTYPE[x.dtype] = dtype
    if not x.is_cuda or not x.is_contiguous():
        return None
    return x.data_ptr(), dtype, tuple(x.shape), x.get_device()


def _spec(x: Any, keep: list) -> tuple[int, str, tuple[int, ...], int]:
    """``(data_ptr, dtype, shape, device)`` of a C-contiguous CUDA tensor."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        fast = _torch_spec(x)
        if fast is not None:
            return fast
    if hasattr(x, "data_ptr") and hasattr(x, "is_cuda") and hasattr(x, "dtype"):
        if not x.is_cuda:
            raise InvalidArgumentError(
                "expected a CUDA tensor, got one on the host: use tv.compute_stats for it"
            )
        dtype = _TORCH_DTYPES.get(str(x.dtype))
        if dtype is None:
            raise InvalidArgumentError(
                f"dtype {x.dtype} is not supported by the CUDA kernels "
                "(float64, float32, float16, bfloat16, float8_e4m3fn, float8_e5m2)"
            )
        if not x.is_contiguous():
            raise InvalidArgumentError(
                "non-contiguous CUDA tensor: pass t.contiguous() (a copy on the device)"
            )
        return int(x.data_ptr()), dtype, tuple(int(d) for d in x.shape), int(x.device.index or 0)
    cai = getattr(x, "__cuda_array_interface__", None)
    if cai is not None:
        dtype = _TYPESTRS.get(cai["typestr"])
        if dtype is None:
            raise InvalidArgumentError(
                f"__cuda_array_interface__ typestr {cai['typestr']!r} is not supported "
                "(<f8, <f4, <f2)"
            )
        shape = tuple(int(d) for d in cai["shape"])
        if not _contiguous(shape, cai.get("strides"), _ITEMSIZE[dtype]):
            raise InvalidArgumentError("non-contiguous CUDA array: make it contiguous first")
        device = getattr(getattr(x, "device", None), "id", 0)
        return int(cai["data"][0] or 0), dtype, shape, int(device or 0)
    if hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__"):
        return _from_dlpack(x, keep)
    raise InvalidArgumentError(
        f"expected a CUDA tensor (torch, __cuda_array_interface__ or DLPack), got "
        f"{type(x).__name__}"
    )


def _resolve_stream(stream: Optional[int], tensors: Sequence[Any], device: int) -> int:
    """The caller's stream: explicit, torch's current stream, the array interface's, or 0."""
    if stream is not None:
        return int(stream)
    torch = sys.modules.get("torch")
    if torch is not None and any(type(t).__module__.startswith("torch") for t in tensors):
        return int(torch.cuda.current_stream(device).cuda_stream)
    for t in tensors:
        cai = getattr(t, "__cuda_array_interface__", None)
        if isinstance(cai, dict) and cai.get("stream") is not None:
            return int(cai["stream"])
    return 0


class PendingStats:
    """Statistics being computed on the GPU; returned by :func:`compute_stats_cuda`.

    Example:
        >>> p = compute_stats_cuda([w, b])
        >>> p.ready()       # never blocks
        False
        >>> p.result()[0].mean

    """

    def __init__(self, native: Any) -> None:
        self._native = native
        self._result: Optional[list[Stats]] = None

    def ready(self) -> bool:
        """True when the records have reached host memory (polls this job's event)."""
        return self._result is not None or bool(self._native.ready())

    def result(self) -> list[Stats]:
        """Waits for this job only (never the whole device) and returns its records.

        Returns:
            list[Stats]: one record per input tensor, in order (the class of
            :func:`tensorvigil.compute_stats`).

        """
        if self._result is None:
            self._result = list(self._native.result())
        return self._result


def compute_stats_cuda(
    tensors: Sequence[Any],
    *,
    hist_bins: int = 0,
    hist_range: Optional[Sequence[float]] = None,
    exp_hist: bool = False,
    stream: Optional[int] = None,
) -> PendingStats:
    """Enqueues the statistics of many CUDA tensors in one fused launch; returns at once.

    The work is ordered on ``stream`` after everything already queued there, so the tensors'
    current values are measured; results match :func:`tensorvigil.compute_stats` on host copies
    (counts, min/max and histograms exactly, moments to ~1e-12 relative).

    Args:
        tensors: C-contiguous CUDA tensors on one device (torch, ``__cuda_array_interface__``
            or DLPack), of mixed sizes and dtypes.
        hist_bins: Fixed-bin histogram size for every tensor (0: none; at most 4096).
        hist_range: ``(lo, hi)`` shared by every tensor; ``None`` uses each tensor's finite
            ``[min, max]`` (computed on the device, no host round trip).
        exp_hist: Also fill the exponent (log2) histograms.
        stream: ``cudaStream_t`` as an int. Default: torch's current stream for torch tensors,
            else the ``__cuda_array_interface__`` stream, else the default stream.

    Returns:
        PendingStats: ``result()`` waits for this job's event and returns ``list[Stats]``.

    Raises:
        UnsupportedError: tensorvigil was built without CUDA.
        InvalidArgumentError: a host tensor, a non-contiguous tensor, an unsupported dtype,
            tensors on several devices, or bad histogram options.

    Example:
        >>> p = compute_stats_cuda([p.grad for p in model.parameters()], exp_hist=True)
        >>> norms = [s.l2 for s in p.result()]

    """
    keep: list = []
    specs = [_spec(t, keep) for t in tensors] if _core.cuda_built() else []
    rng = None if hist_range is None else (float(hist_range[0]), float(hist_range[1]))
    device = specs[0][3] if specs else 0
    s = _resolve_stream(stream, tensors, device) if specs else int(stream or 0)
    native = _core.cuda_compute_stats(specs, int(hist_bins), rng, bool(exp_hist), s)
    return PendingStats(native)


class GpuCapture:
    """Captures CUDA tensors (statistics, and optionally raw values) into a StoreWriter.

    Each :meth:`submit` is one fused statistics launch on the caller's stream; raw payloads are
    copied device-to-host on a side stream into a pinned staging ring of ``staging_bytes``
    (allocated on the first payload, then reused), and the caller's stream waits on the GPU for
    those copies so later in-place updates cannot race them. A native thread waits on the
    events and writes records in submission order; the training thread never synchronises the
    device. When staging is full the writer's policy applies: ``block`` waits for space,
    ``skip`` drops the payload, keeps the statistics and counts the drop in the writer's
    ``dropped`` counter.

    Args:
        writer: A :class:`tensorvigil.StoreWriter` (kept alive; :meth:`close` does not close
            it).
        staging_bytes: Bound on pinned host memory for payloads in flight.

    Raises:
        UnsupportedError: tensorvigil was built without CUDA.

    Example:
        >>> w = tv.StoreWriter("runs/exp1")
        >>> cap = GpuCapture(w)
        >>> items = [(n, p, True, 0) for n, p in model.named_parameters()]
        >>> cap.submit(step, 0, step, items)
        >>> cap.commit(step, 0, step)
        >>> cap.close(); w.close()

    """

    def __init__(self, writer: Any, *, staging_bytes: int = 256 << 20) -> None:
        self._writer = writer
        native_writer = getattr(writer, "_w", writer)
        self._c = _core.GpuCapture(native_writer, int(staging_bytes))

    def submit(
        self,
        step: int,
        mode: ModeLike,
        mode_step: int,
        items: Sequence[tuple[str, Any, bool, int]],
        exp_hist: bool = False,
        stream: Optional[int] = None,
    ) -> None:
        """Enqueues the statistics (and payloads) of ``items`` for ``step``; non-blocking.

        Args:
            step: Global step (>= 0).
            mode: ``"train"``/``"eval"``/``"predict"``/``"global"`` or its code 0..3.
            mode_step: Step within the mode.
            items: ``(name, tensor, stats_only, hist_bins)`` tuples; ``stats_only=False``
                also stores the values.
            exp_hist: Also store exponent histograms.
            stream: The caller's stream as an int (default: torch's current stream).

        Raises:
            InvalidArgumentError: bad tensors (see :func:`compute_stats_cuda`) or step.
            Any error of the capture thread (e.g. StoreIOError), re-raised here.

        """
        keep: list = []
        specs = []
        tensors = []
        for name, t, stats_only, bins in items:
            p, dtype, shape, dev = _spec(t, keep)
            specs.append((name, p, dtype, shape, dev, stats_only, bins))
            tensors.append(t)
        s = _resolve_stream(stream, tensors, specs[0][4] if specs else 0)
        self._c.submit(int(step), int(to_mode(mode)), int(mode_step), specs, bool(exp_hist), s)

    def commit(self, step: int, mode: ModeLike = "train", mode_step: Optional[int] = None) -> None:
        """Commits ``step`` after every item submitted before this call; non-blocking."""
        self._c.commit(int(step), int(to_mode(mode)), int(step if mode_step is None else mode_step))

    def flush(self) -> None:
        """Waits until everything submitted is handed to the writer, then flushes the writer."""
        self._c.flush()

    def close(self) -> None:
        """Flushes and stops the capture thread (the writer stays open). Idempotent."""
        self._c.close()

    def counters(self) -> dict:
        """Counters: submits, tensors, copied_bytes, dropped, staging/pending/peak bytes."""
        return self._c.counters()

    def __enter__(self) -> GpuCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
