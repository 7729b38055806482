"""Statistics computed elsewhere: Stats.from_parts validation and write(..., stats=...)."""

import math

import numpy as np
import pytest

import tensorvigil as tv
from tensorvigil import _core

NAN = math.nan


def parts(**over):
    p = dict(numel=6, nan=1, posinf=1, neginf=0, zeros=1, min=-1.0, max=2.0, mean=0.25,
             m2=4.75, abs_sum=4.0, abs_max=2.0)
    p.update(over)
    return p


def test_from_parts_fields_and_derived_values():
    s = tv.Stats.from_parts(**parts(), hist=[1, 0, 3], hist_lo=-1.0, hist_hi=2.0,
                            exp_hist=[0] * 127 + [2, 1] + [0] * 127)
    assert (s.numel, s.nan, s.posinf, s.neginf, s.zeros, s.finite) == (6, 1, 1, 0, 1, 4)
    assert (s.min, s.max, s.mean, s.m2, s.l1, s.abs_max) == (-1.0, 2.0, 0.25, 4.75, 4.0, 2.0)
    assert s.sum == 1.0 and s.var == pytest.approx(4.75 / 4)
    np.testing.assert_array_equal(s.hist, [1, 0, 3])
    np.testing.assert_array_equal(s.hist_edges, np.linspace(-1.0, 2.0, 4))
    assert s.exp_hist.sum() == 3
    empty = tv.Stats.from_parts(2, 2, 0, 0, 0, NAN, NAN, 0.0, 0.0, 0.0, 0.0)
    assert empty.finite == 0 and math.isnan(empty.min)


@pytest.mark.parametrize(
    "over, extra, match",
    [
        ({"nan": -1}, {}, "nan must be >= 0"),
        ({"numel": 1}, {}, r"nan \+ posinf \+ neginf .* exceeds numel 1"),
        ({"zeros": 5}, {}, r"zeros \(5\) exceeds the finite elements \(4\)"),
        ({"mean": NAN}, {}, "mean must be finite"),
        ({"min": 3.0}, {}, "min <= max"),
        ({"m2": -1.0}, {}, "m2 must be finite and >= 0"),
        ({"abs_max": math.inf}, {}, "abs_max must be finite"),
        ({"nan": 2, "posinf": 2, "neginf": 2, "zeros": 0}, {}, "must be NaN when there is no"),
        ({}, {"hist": [4]}, "hist needs hist_lo and hist_hi"),
        ({}, {"hist": [4], "hist_lo": 1.0, "hist_hi": 1.0}, "hist_lo < hist_hi"),
        ({}, {"hist": [4], "hist_lo": 0.0, "hist_hi": math.inf}, "must be finite"),
        ({}, {"hist": [3], "hist_lo": 0.0, "hist_hi": 1.0}, r"must equal the finite \w+ \(4\)"),
        ({}, {"hist": []}, "at least one bin"),
        ({}, {"hist_lo": 0.0}, "need a hist"),
        ({}, {"exp_hist": [0] * 10}, "256 entries"),
        ({}, {"exp_hist": [1] * 256}, "finite non-zero elements"),
    ],
)
def test_from_parts_rejects_inconsistent_records(over, extra, match):
    with pytest.raises(tv.InvalidArgumentError, match=match):
        tv.Stats.from_parts(**parts(**over), **extra)


def test_write_with_given_stats_round_trip(tmp_run):
    import ml_dtypes

    given = tv.Stats.from_parts(**parts(), hist=[1, 0, 3], hist_lo=-1.0, hist_hi=2.0)
    # Deliberately not the values' own statistics: the record must keep what was given.
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    with tv.StoreWriter(tmp_run, fsync=False) as w:
        w.write("vals", 0, values, stats=given)
        w.write("bf16_shape_only", 0, _ShapeOnly((3, 2), ml_dtypes.bfloat16), stats_only=True,
                stats=given)
        w._w.write_stats("core", 0, [6], "float16", given, 2, 7)
        with pytest.raises(tv.InvalidArgumentError, match="stats describe 6 elements but the "
                           "tensor has 5"):
            w.write("bad", 0, np.zeros(5, np.float32), stats=given)
        with pytest.raises(tv.InvalidArgumentError, match="describe 6 elements.*has 4"):
            w.write("bad", 0, _ShapeOnly((2, 2), np.float32), stats_only=True, stats=given)
        with pytest.raises(tv.InvalidArgumentError, match="negative dimension"):
            w._w.write_stats("bad", 0, [-6], "float32", given, 0, None)
        with pytest.raises(tv.InvalidArgumentError, match="dtype"):
            w._w.write_stats("bad", 0, [6], "complex64", given, 0, None)
        w.commit(0)
        w.commit(0, mode="predict", mode_step=7)
    run = tv.open(tmp_run)
    assert run.tensor_names() == ["bf16_shape_only", "core", "vals"]
    for name, dtype, shape in [("vals", "float32", (2, 3)), ("bf16_shape_only", "bfloat16", (3, 2)),
                               ("core", "float16", (6,))]:
        rec = run.tensor(name).record(0)
        assert (rec.dtype, rec.shape, rec.has_value) == (dtype, shape, name == "vals")
        st = rec.stats
        assert st.to_dict() == pytest.approx(given.to_dict(), nan_ok=True)
    np.testing.assert_array_equal(run.tensor("vals").value(0), values)
    assert run.tensor("core").record(0).mode_step == 7


class _ShapeOnly:
    """Has a shape and a dtype but no values: reading them would fail the test."""

    def __init__(self, shape, dtype):
        self.shape, self.dtype = shape, np.dtype(dtype)

    def __array__(self, *a, **k):
        raise AssertionError("the values were read")


def test_core_write_stats_is_stats_only(tmp_run):
    given = _core.Stats.from_parts(3, 0, 0, 0, 0, 1.0, 3.0, 2.0, 2.0, 6.0, 3.0)
    with tv.StoreWriter(tmp_run, fsync=False) as w:
        w.write("x", 0, np.array([7.0, 8.0, 9.0]), stats_only=True, stats=given)
        w.commit(0)
    rec = tv.open(tmp_run).tensor("x").record(0)
    assert not rec.has_value and rec.dtype == "float64"
    assert (rec.stats.mean, rec.stats.max) == (2.0, 3.0)
