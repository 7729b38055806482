"""The committed golden run (tests/data/format_v1) must read back exactly."""

import os
import sys

import numpy as np
import pytest

import tensorvigil as tv

GOLDEN = os.path.join(os.path.dirname(__file__), "..", "data", "format_v1")
sys.path.insert(0, GOLDEN)
golden_tensors = __import__("make_golden").golden_tensors

RUN = os.path.join(GOLDEN, "run")


def test_golden_run_structure():
    run = tv.open(RUN)
    assert run.manifest["format"] == "tensorvigil-store"
    assert run.manifest["format_version"] == [1, 0]
    assert run.ranks() == [0, 1]
    assert run.steps(rank=0) == [0, 1, 2]
    assert run.steps() == [0]  # only step 0 was committed by every rank
    assert run.steps(mode="eval", rank=0) == [2]
    assert run.ended(0) and run.ended(1)
    assert set(run.tensor_names()) == set(golden_tensors(0))


@pytest.mark.parametrize("step", [0, 1, 2])
def test_golden_values_and_stats(step):
    run = tv.open(RUN)
    for name, want in golden_tensors(step).items():
        t = run.tensor(name)
        rec = t.record(step)
        want = np.asarray(want)
        assert tuple(rec.shape) == want.shape
        s = rec.stats
        ref = want.astype(np.float64).ravel()
        finite = ref[np.isfinite(ref)]
        assert s.numel == ref.size
        assert s.nan == int(np.isnan(ref).sum())
        assert s.posinf == int(np.isposinf(ref).sum())
        assert s.min == finite.min() and s.max == finite.max()
        assert s.mean == pytest.approx(finite.mean(), rel=1e-12, abs=1e-15)
        if name == "relu1/input":
            assert not rec.has_value
            continue
        got = t.value(step)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(
            got.reshape(-1).view(np.uint8), want.reshape(-1).view(np.uint8)
        )


def test_golden_histograms():
    s = tv.open(RUN).tensor("fc1.weight/grad").stats(1)
    ref = golden_tensors(1)["fc1.weight/grad"].astype(np.float64)
    counts, edges = np.histogram(ref, bins=8)
    np.testing.assert_array_equal(s.hist, counts)
    np.testing.assert_allclose(s.hist_edges, edges)
    assert int(np.sum(s.exp_hist)) == int(np.count_nonzero(ref))
