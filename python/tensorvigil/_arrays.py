"""Conversion of user values (numpy, torch, scalars) to arrays the native core accepts.

Torch is never imported here: a tensor is recognised by its type's module, so importing
tensorvigil stays light.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import InvalidArgumentError

# torch dtypes numpy cannot hold, viewed as same-sized integers and tagged for the core.
_TORCH_REINTERPRET = {
    "torch.bfloat16": ("int16", "bfloat16"),
    "torch.float8_e4m3fn": ("uint8", "float8_e4m3fn"),
    "torch.float8_e5m2": ("uint8", "float8_e5m2"),
}


def is_torch_tensor(x: Any) -> bool:
    """True when ``x`` is a ``torch.Tensor`` (checked without importing torch)."""
    return type(x).__module__.startswith("torch") and hasattr(x, "detach") and hasattr(x, "dtype")


def as_array(x: Any) -> tuple[np.ndarray, str]:
    """Returns ``(array, dtype_override)``: the value as an array the core accepts.

    The array is C-contiguous; ``dtype_override`` is the core dtype name to reinterpret it as
    ("" when the numpy dtype is the real one).

    Torch tensors are detached and moved to host memory (a copy for CUDA tensors);
    bfloat16/float8 tensors are viewed as integers without a copy.

    Raises:
        InvalidArgumentError: for values that are not numeric arrays.

    """
    if type(x) is np.ndarray and x.dtype.kind in "fiub" and x.flags.c_contiguous:
        return x, ""  # the common case first: hooks convert many small arrays per step
    if is_torch_tensor(x):
        t = x.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if not t.is_contiguous():
            t = t.contiguous()
        key = str(t.dtype)
        if key in _TORCH_REINTERPRET:
            import torch  # already imported by the caller's program

            view_as, override = _TORCH_REINTERPRET[key]
            return t.view(getattr(torch, view_as)).numpy(), override
        if t.dtype.is_complex:
            raise InvalidArgumentError(
                f"unsupported dtype '{key}': complex tensors are not supported"
            )
        try:
            return t.numpy(), ""
        except TypeError as e:  # e.g. quantized or unsigned types numpy lacks
            raise InvalidArgumentError(f"unsupported torch dtype '{key}': {e}") from None
    if isinstance(x, np.ndarray):
        arr = x
    else:
        try:
            arr = np.asarray(x)
        except Exception as e:  # noqa: BLE001 - any conversion failure is a bad argument
            raise InvalidArgumentError(
                f"cannot convert {type(x).__name__} to an array: {e}"
            ) from None
    if arr.dtype.kind not in "fiub" and arr.dtype.name not in (
        "bfloat16",
        "float8_e4m3fn",
        "float8_e5m2",
    ):
        raise InvalidArgumentError(
            f"unsupported dtype '{arr.dtype}': expected a float, integer or bool array"
        )
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    return arr, ""
