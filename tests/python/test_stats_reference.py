"""Fused statistics against NumPy float64 references (hypothesis property tests)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import tensorvigil as tv
from tensorvigil.errors import InvalidArgumentError

ml_dtypes = pytest.importorskip("ml_dtypes")

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Every dtype accumulates in double (float32/float16/bfloat16 elements are widened exactly before
# any sum), so moments match the float64 reference to ~1e-11, the mean relative to |mean| + std.
RTOL = 1e-11


def _as_f64(a: np.ndarray) -> np.ndarray:
    return np.asarray(a).astype(np.float64).ravel()


def _tol(a: np.ndarray) -> float:
    return RTOL


def _auto_range(fin: np.ndarray) -> tuple[float, float]:
    if fin.size == 0:
        return 0.0, 1.0
    lo, hi = float(fin.min()), float(fin.max())
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    return lo, hi


def check_against_numpy(s, a, hist_bins=0, hist_range=None, exp_hist=False):
    x = _as_f64(a)
    fin = x[np.isfinite(x)]
    rtol = _tol(a)
    assert s.numel == x.size
    assert s.nan == int(np.isnan(x).sum())
    assert s.posinf == int(np.isposinf(x).sum())
    assert s.neginf == int(np.isneginf(x).sum())
    assert s.zeros == int((x == 0).sum())
    assert s.finite == fin.size
    if fin.size == 0:
        assert math.isnan(s.min) and math.isnan(s.max) and math.isnan(s.var)
        assert s.mean == 0.0 and s.l1 == 0.0 and s.abs_max == 0.0
    else:
        assert s.min == fin.min() and s.max == fin.max()
        assert s.abs_max == np.abs(fin).max()
        with np.errstate(over="ignore", invalid="ignore"):
            mean = fin.mean()
            # Shifted by one element so that |mean| >> std does not cost the reference digits.
            var = (fin - fin[fin.size // 2]).var()
            l1 = np.abs(fin).sum()
            l2 = np.sqrt(np.sum(fin * fin))
        scale = float(np.abs(fin).max())
        if np.isfinite(mean):
            assert s.mean == pytest.approx(mean, rel=rtol, abs=rtol * scale)
        if np.isfinite(var):
            assert s.var == pytest.approx(var, rel=10 * rtol, abs=1e-300)
            assert s.std == pytest.approx(np.sqrt(var), rel=10 * rtol, abs=1e-300)
        else:  # numpy overflowed: so may we, but never to a small finite number
            assert not math.isfinite(s.var) or s.var > 1e300
        if np.isfinite(l1):
            assert s.l1 == pytest.approx(l1, rel=rtol)
        if np.isfinite(l2):
            assert s.l2 == pytest.approx(l2, rel=10 * rtol, abs=1e-300)
        assert s.sum == pytest.approx(s.mean * fin.size)
    if hist_bins:
        lo, hi = hist_range if hist_range is not None else _auto_range(fin)
        assert s.hist.dtype == np.uint64
        try:
            with np.errstate(all="ignore"):
                np.testing.assert_array_equal(s.hist_edges, np.linspace(lo, hi, hist_bins + 1))
                counts, _ = np.histogram(fin, bins=hist_bins, range=(lo, hi))
        except ValueError:  # numpy refuses ranges it cannot split (too narrow or too wide)
            assert int(s.hist.sum()) + s.hist_below + s.hist_above == fin.size
        else:
            np.testing.assert_array_equal(s.hist, counts)
        assert s.hist_below == int((fin < lo).sum())
        assert s.hist_above == int((fin > hi).sum())
    else:
        assert s.hist is None and s.hist_edges is None
    if exp_hist:
        nz = fin[fin != 0]
        e = np.clip(np.frexp(nz)[1] - 1 + 127, 0, 255)
        np.testing.assert_array_equal(s.exp_hist, np.bincount(e, minlength=256))
    else:
        assert s.exp_hist is None


# ---------------------------------------------------------------------------------------------
# Strategies

NUMPY_DTYPES = ["float64", "float32", "float16", "int8", "int16", "int32", "int64", "uint8", "bool"]
shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=24)


@st.composite
def arrays(draw):
    kind = draw(st.sampled_from(NUMPY_DTYPES + ["bfloat16", "float8_e4m3fn"]))
    shape = draw(shapes)
    if kind in ("bfloat16", "float8_e4m3fn"):
        base = draw(hnp.arrays(np.float32, shape, elements=st.floats(-400, 400, width=32)))
        a = base.astype(getattr(ml_dtypes, kind))
    elif kind.startswith("float"):
        width = {"float64": 64, "float32": 32, "float16": 16}[kind]
        elements = st.floats(allow_nan=True, allow_infinity=True, width=width)
        style = draw(st.sampled_from(["any", "normal", "offset", "zeros"]))
        if style == "any":
            a = draw(hnp.arrays(kind, shape, elements=elements))
        else:
            n = int(np.prod(shape))
            seed = draw(st.integers(0, 2**32 - 1))
            r = np.random.default_rng(seed)
            if style == "zeros":
                v = np.zeros(n)
            elif style == "normal":
                v = r.standard_normal(n) * draw(st.sampled_from([1e-3, 1.0, 1e3]))
            else:  # |mean| >> std
                v = 1e4 + r.standard_normal(n)
            a = v.astype(kind).reshape(shape)
            if n and draw(st.booleans()):
                specials = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0]).astype(kind)
                idx = r.integers(0, n, size=min(n, 5))
                a.reshape(-1)[idx] = r.choice(specials, size=idx.size)
    else:
        a = draw(hnp.arrays(kind, shape))
    if a.ndim >= 1 and a.shape[0] > 2 and draw(st.booleans()):
        a = a[::2]  # non-contiguous view
    return a


# ---------------------------------------------------------------------------------------------
# Properties


@SETTINGS
@given(arrays())
def test_moments_and_counts(a):
    check_against_numpy(tv.compute_stats(a), a)


@SETTINGS
@given(arrays(), st.integers(1, 70), st.booleans())
def test_auto_range_histogram(a, bins, exp):
    s = tv.compute_stats(a, hist_bins=bins, exp_hist=exp)
    check_against_numpy(s, a, hist_bins=bins, exp_hist=exp)


@SETTINGS
@given(
    arrays(),
    st.integers(1, 4096),
    st.floats(-500, 500).flatmap(lambda lo: st.tuples(st.just(lo), st.floats(lo + 1e-3, lo + 900))),
)
def test_fixed_range_histogram(a, bins, rng):
    s = tv.compute_stats(a, hist_bins=bins, hist_range=rng, exp_hist=True)
    check_against_numpy(s, a, hist_bins=bins, hist_range=rng, exp_hist=True)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from(["float32", "float64", "float16", "bfloat16"]))
def test_merge_equals_concatenation(seed, dtype):
    r = np.random.default_rng(seed)
    x = (r.standard_normal(int(r.integers(0, 3000))) * 3 + 1).astype(
        getattr(ml_dtypes, dtype) if dtype == "bfloat16" else dtype
    )
    cut = int(r.integers(0, x.size + 1))
    kw = dict(hist_bins=16, hist_range=(-5.0, 7.0), exp_hist=True)
    whole = tv.compute_stats(x, **kw)
    merged = tv.compute_stats(x[:cut], **kw).merge(tv.compute_stats(x[cut:], **kw))
    assert merged.numel == whole.numel and merged.zeros == whole.zeros
    assert merged.min == whole.min or (math.isnan(merged.min) and math.isnan(whole.min))
    rel = RTOL
    assert merged.mean == pytest.approx(whole.mean, rel=rel, abs=rel)
    if whole.finite:
        assert merged.var == pytest.approx(whole.var, rel=rel)
    np.testing.assert_array_equal(merged.hist, whole.hist)
    np.testing.assert_array_equal(merged.exp_hist, whole.exp_hist)
    check_against_numpy(merged, x, hist_bins=16, hist_range=(-5.0, 7.0), exp_hist=True)


# ---------------------------------------------------------------------------------------------
# Fixed cases


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_large_chunked_tensor(dtype):
    r = np.random.default_rng(7)
    x = (r.standard_normal(700_001) * 2 - 0.5).astype(
        getattr(ml_dtypes, dtype) if dtype == "bfloat16" else dtype
    )
    x[::9973] = np.nan
    x[5::20011] = np.inf
    s = tv.compute_stats(x, hist_bins=64, exp_hist=True)
    check_against_numpy(s, x, hist_bins=64, exp_hist=True)
    single = tv.compute_stats(x, hist_bins=64, exp_hist=True, num_threads=1)
    assert single.mean == s.mean and single.var == s.var  # thread count never changes results
    np.testing.assert_array_equal(single.hist, s.hist)


def _float_dtype(name):
    return getattr(ml_dtypes, name) if name == "bfloat16" else np.dtype(name)


def _assert_float64_moments(s, a, rtol):
    """mean/var/l1/l2 of ``s`` against NumPy float64 (mean relative to |mean| + std)."""
    x = _as_f64(a)
    x = x[np.isfinite(x)]
    mean = x.mean()
    var = x.var()
    scale = abs(mean) + math.sqrt(var)
    assert abs(s.mean - mean) <= rtol * scale, (s.mean, mean)
    assert s.var == pytest.approx(var, rel=rtol, abs=1e-300)
    assert s.l1 == pytest.approx(np.abs(x).sum(), rel=rtol)
    assert s.l2 == pytest.approx(np.sqrt(np.sum(x * x)), rel=rtol)


@settings(max_examples=150, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.sampled_from(["float32", "float16", "bfloat16"]),
    st.sampled_from(["zero_mean", "normal", "large_mean", "huge_mean", "positive"]),
    hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=70),
)
def test_float_inputs_match_float64(seed, dtype, style, shape):
    """float32/16/bf16 moments equal NumPy float64 on the same values to ~1e-11."""
    r = np.random.default_rng(seed)
    n = int(np.prod(shape))
    scale = 10.0 ** r.uniform(-3, 3)
    if style == "zero_mean":
        v = r.standard_normal(n) * scale
        v -= v.mean()
    elif style == "normal":
        v = r.standard_normal(n) * scale + r.standard_normal() * scale
    elif style == "large_mean":  # |mean| / std = 1e4
        v = 1e4 + r.standard_normal(n)
    elif style == "huge_mean":  # |mean| / std = 1e7
        v = -3e6 + r.standard_normal(n) * 0.3
    else:
        v = r.standard_normal(n) ** 2 * scale
    with np.errstate(over="ignore"):
        a = v.astype(_float_dtype(dtype)).reshape(shape)
    if not np.isfinite(_as_f64(a)).any():
        return
    _assert_float64_moments(tv.compute_stats(a), a, RTOL)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("n", [1, 8, 15, 16, 17, 4095, 4096, 4097, 262_145, 1_000_003])
def test_float_inputs_match_float64_sizes(dtype, n):
    """Every kernel path (16-element loop, masked rest, scalar tail, blocks, chunks)."""
    r = np.random.default_rng(n)
    for v in (r.standard_normal(n) * 0.02, 1e4 + r.standard_normal(n), r.standard_normal(n) + 3):
        a = v.astype(_float_dtype(dtype))
        _assert_float64_moments(tv.compute_stats(a), a, RTOL)
        _assert_float64_moments(tv.compute_stats(a, num_threads=1), a, RTOL)


def test_float32_small_tensor_accuracy_example():
    """The example from the accuracy report: 1000 float32 values, |mean| >> std."""
    r = np.random.default_rng(0)
    a = (r.standard_normal(1000).astype(np.float32) * 10 + 1000).astype(np.float32)
    _assert_float64_moments(tv.compute_stats(a), a, RTOL)
    assert tv.compute_stats(a).mean == pytest.approx(a.astype(np.float64).mean(), rel=1e-14)


def test_many_tiny_tensors_match_single():
    r = np.random.default_rng(5)
    xs = [r.standard_normal(int(k)).astype(np.float32) for k in r.integers(0, 20, 1000)]
    many = tv.compute_stats_many(xs)
    assert len(many) == len(xs)
    for x, s in zip(xs, many):
        one = tv.compute_stats(x)
        assert s.numel == one.numel and s.mean == one.mean and s.m2 == one.m2
        assert s.l1 == one.l1


def test_huge_and_tiny_magnitudes():
    r = np.random.default_rng(3)
    for scale, dtype in [
        (1e300, "float64"),
        (1e150, "float64"),
        (1e36, "float32"),
        (1e-30, "float32"),
        (1e-300, "float64"),
        (6e4, "float16"),
    ]:
        with np.errstate(over="ignore"):  # float16 overflows to inf on purpose
            x = (r.standard_normal(5000) * scale).astype(dtype)
        check_against_numpy(tv.compute_stats(x, exp_hist=True), x, exp_hist=True)
    big = np.full(1000, 1e300)
    s = tv.compute_stats(big)
    assert s.mean == 1e300 and s.var == 0.0


def test_empty_and_scalar():
    s = tv.compute_stats(np.zeros((0, 3), np.float32), hist_bins=4, exp_hist=True)
    assert s.numel == 0 and math.isnan(s.min) and s.hist.tolist() == [0, 0, 0, 0]
    np.testing.assert_array_equal(s.hist_edges, np.linspace(0, 1, 5))
    assert s.exp_hist.sum() == 0
    s = tv.compute_stats(np.float32(2.5))
    assert s.numel == 1 and s.mean == 2.5 and s.var == 0.0
    assert tv.compute_stats(7).max == 7 and tv.compute_stats(True).mean == 1.0
    assert tv.compute_stats([[1, 2], [3, 4]]).mean == 2.5


def test_all_nan_and_all_zero():
    s = tv.compute_stats(np.full(100, np.nan, np.float32), hist_bins=3)
    assert s.nan == 100 and s.finite == 0 and math.isnan(s.std) and s.l2 == 0.0
    assert s.hist.sum() == 0
    z = tv.compute_stats(np.zeros(1000, np.float16), hist_bins=3, exp_hist=True)
    assert z.zeros == 1000 and z.l2 == 0.0 and z.hist.tolist() == [0, 1000, 0]
    assert z.exp_hist.sum() == 0


def test_float8_inputs():
    x = np.arange(256, dtype=np.uint8)
    for name in ("float8_e4m3fn", "float8_e5m2"):
        a = x.view(getattr(ml_dtypes, name))
        check_against_numpy(tv.compute_stats(a, hist_bins=10, exp_hist=True), a, 10, None, True)


def test_many_matches_single():
    r = np.random.default_rng(11)
    xs = [r.standard_normal(int(n)).astype(np.float32) for n in r.integers(0, 50_000, 30)]
    xs += [np.float64(3.0), np.arange(10, dtype=np.int32), np.ones(5, ml_dtypes.bfloat16)]
    many = tv.compute_stats_many(xs, hist_bins=8, exp_hist=True)
    assert len(many) == len(xs)
    for x, s in zip(xs, many):
        one = tv.compute_stats(x, hist_bins=8, exp_hist=True)
        assert s.numel == one.numel and s.mean == one.mean and s.var == pytest.approx(one.var)
        check_against_numpy(s, x, hist_bins=8, exp_hist=True)
    assert tv.compute_stats_many([]) == []


def test_stats_object():
    s = tv.compute_stats(np.array([1.0, -2.0, 3.0]), hist_bins=2)
    d = s.to_dict()
    assert d["numel"] == 3 and d["l1"] == 6.0 and d["hist"] == [1, 2]
    assert "Stats(numel=3" in repr(s)
    assert isinstance(s, tv.Stats)
    with pytest.raises(AttributeError):
        s.mean = 1.0
    empty = tv.Stats()
    assert empty.merge(s).numel == 3 and s.numel == 3
    other = tv.compute_stats(np.array([1.0]), hist_bins=3)
    with pytest.raises(InvalidArgumentError):
        s.merge(other)


def test_num_threads_setting():
    n = tv.get_num_threads()
    assert n >= 1
    tv.set_num_threads(1)
    assert tv.get_num_threads() == 1
    tv.set_num_threads(0)
    assert tv.get_num_threads() == n


@pytest.mark.parametrize(
    "bad",
    [
        np.ones(3, np.complex64),
        np.array([object(), 1], dtype=object),
        np.array(["a", "b"]),
        "text",
        np.ones(3, np.uint16),
    ],
)
def test_bad_dtype_raises(bad):
    with pytest.raises(InvalidArgumentError):
        tv.compute_stats(bad)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(hist_bins=-1),
        dict(hist_bins=4097),
        dict(hist_bins=4, hist_range=(1.0, 1.0)),
        dict(hist_bins=4, hist_range=(2.0, 1.0)),
        dict(hist_bins=4, hist_range=(0.0, float("inf"))),
    ],
)
def test_bad_options_raise(kwargs):
    with pytest.raises(InvalidArgumentError):
        tv.compute_stats(np.ones(3), **kwargs)
    with pytest.raises(ValueError):  # InvalidArgumentError is a ValueError
        tv.compute_stats_many([np.ones(3)], **kwargs)


# ---------------------------------------------------------------------------------------------
# Torch inputs (skipped without torch)


def test_torch_tensors():
    torch = pytest.importorskip("torch")
    t = torch.randn(1000, 7) * 3
    t[0, 0] = float("nan")
    s = tv.compute_stats(t, hist_bins=32, exp_hist=True)
    check_against_numpy(s, t.numpy(), hist_bins=32, exp_hist=True)
    b = t.to(torch.bfloat16)
    sb = tv.compute_stats(b, hist_bins=32)
    ref = b.float().numpy().astype(ml_dtypes.bfloat16)
    check_against_numpy(sb, ref, hist_bins=32)
    nc = t.t()  # non-contiguous
    check_against_numpy(tv.compute_stats(nc), nc.contiguous().numpy())
    w = torch.nn.Parameter(torch.ones(4))  # requires grad: detached, not an error
    assert tv.compute_stats(w * 2).mean == 2.0
    many = tv.compute_stats_many([t, b, torch.zeros(0)])
    assert [m.numel for m in many] == [7000, 7000, 0]
