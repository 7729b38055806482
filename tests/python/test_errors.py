"""Every core error code maps to one Python class that is also a builtin."""

import os

import numpy as np
import pytest

import tensorvigil as tv
from tensorvigil import _core


@pytest.mark.parametrize(
    "code, cls, builtin",
    [
        (_core.ErrorCode.InvalidArgument, tv.InvalidArgumentError, ValueError),
        (_core.ErrorCode.NotFound, tv.NotFoundError, LookupError),
        (_core.ErrorCode.DataLoss, tv.DataCorruptionError, OSError),
        (_core.ErrorCode.Io, tv.StoreIOError, OSError),
        (_core.ErrorCode.Unsupported, tv.UnsupportedError, NotImplementedError),
        (_core.ErrorCode.FailedPrecondition, tv.FailedPreconditionError, RuntimeError),
    ],
)
def test_code_to_class(code, cls, builtin):
    with pytest.raises(cls, match="boom") as info:
        _core._raise_error(int(code), "[test] boom")
    assert isinstance(info.value, builtin)
    assert isinstance(info.value, tv.TensorVigilError)


def test_real_paths_raise_the_mapped_classes(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(tv.StoreIOError, match="cannot create"):
        tv.StoreWriter(str(blocker / "run"))
    with pytest.raises(tv.NotFoundError):
        _core.RunReader(str(tmp_path / "missing"))
    run = str(tmp_path / "run")
    with tv.StoreWriter(run) as w:
        w.write("a", 0, np.ones(10, np.float32))
        w.commit(0)
    shard = os.path.join(run, "rank-00000", "shard-00000000.tvs")
    with open(shard, "r+b") as f:
        f.write(b"NOTASHRD")
    with pytest.raises(tv.DataCorruptionError, match="not a tensorvigil shard"):
        tv.open(run)
