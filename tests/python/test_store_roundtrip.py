import os

import ml_dtypes
import numpy as np
import pytest

import tensorvigil as tv


def test_roundtrip_dtypes_codecs_and_stats(tmp_run, rng):
    arrays = {
        "f64": rng.standard_normal((7, 3)),
        "f32": rng.standard_normal((64, 33)).astype(np.float32),
        "f16": rng.standard_normal(1000).astype(np.float16),
        "bf16": rng.standard_normal((10, 10)).astype(ml_dtypes.bfloat16),
        "e4m3": rng.standard_normal(50).astype(ml_dtypes.float8_e4m3fn),
        "e5m2": rng.standard_normal(50).astype(ml_dtypes.float8_e5m2),
        "i8": rng.integers(-100, 100, 99, dtype=np.int8),
        "i16": rng.integers(-1000, 1000, 99, dtype=np.int16),
        "i32": rng.integers(-(10**6), 10**6, (3, 3, 3), dtype=np.int32),
        "i64": rng.integers(-(10**12), 10**12, 5, dtype=np.int64),
        "u8": rng.integers(0, 255, 300, dtype=np.uint8),
        "bool": rng.random(77) > 0.5,
        "scalar": np.float32(3.5),
        "empty": np.zeros((0, 4), np.float32),
    }
    with tv.StoreWriter(tmp_run) as w:
        for step in range(3):
            for codec in ("raw", "zstd", "shuffle-zstd"):
                for name, a in arrays.items():
                    w.write(f"{codec}/{name}", step, a, codec=codec)
            w.commit(step)
    run = tv.open(tmp_run)
    assert run.steps() == [0, 1, 2]
    assert run.ranks() == [0]
    assert len(run.tensor_names()) == 3 * len(arrays)
    for codec in ("raw", "zstd", "shuffle-zstd"):
        for name, a in arrays.items():
            t = run.tensor(f"{codec}/{name}")
            assert t.steps() == [0, 1, 2]
            got = t.value(2)
            assert got.dtype == np.asarray(a).dtype
            assert got.shape == np.shape(a)
            np.testing.assert_array_equal(
                got.reshape(-1).view(np.uint8), np.asarray(a).reshape(-1).view(np.uint8)
            )
            s = t.stats(1)
            ref = np.asarray(a, dtype=np.float64)
            assert s.numel == ref.size
            if ref.size:
                assert s.max == pytest.approx(float(ref.max()))
                assert s.mean == pytest.approx(float(ref.mean()), rel=1e-9, abs=1e-12)


def test_torch_tensors_roundtrip(tmp_run):
    torch = pytest.importorskip("torch")
    x = torch.randn(32, 16)
    xb = torch.randn(8, 8, dtype=torch.bfloat16)
    nc = torch.randn(10, 20).t()  # non-contiguous
    with tv.StoreWriter(tmp_run) as w:
        w.write("x", 0, x)
        w.write("xb", 0, xb)
        w.write("nc", 0, nc)
        w.write("loss", 0, torch.tensor(0.25))
        w.commit(0)
    run = tv.open(tmp_run)
    np.testing.assert_array_equal(run.tensor("x").value(0), x.numpy())
    back = run.tensor("xb").value(0)
    assert back.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(back.astype(np.float32), xb.float().numpy())
    np.testing.assert_array_equal(run.tensor("nc").value(0), nc.numpy())
    assert run.tensor("loss").stats(0).mean == 0.25


def test_stats_table_without_payloads(tmp_run, rng):
    pa = pytest.importorskip("pyarrow")
    w = tv.StoreWriter(tmp_run)
    for step in range(10):
        for i in range(5):
            w.write(
                f"layer{i}.weight",
                step,
                rng.standard_normal(100).astype(np.float32) * (i + 1),
                stats_only=(i == 4),
            )
        w.write("loss", step, np.float32(1.0 / (step + 1)), mode="train" if step < 8 else "eval")
        w.commit(step, mode="train" if step < 8 else "eval")
    w.close()
    run = tv.open(tmp_run)
    t = run.stats()
    assert isinstance(t, pa.Table)
    assert t.num_rows == 60
    t = run.stats(regex=r"layer\d\.weight", steps=range(2, 5))
    assert t.num_rows == 15
    assert set(t.column("step").to_pylist()) == {2, 3, 4}
    df = t.to_pandas() if _has_pandas() else None
    if df is not None:
        assert set(df["tensor"].astype(str)) == {f"layer{i}.weight" for i in range(5)}
    loss = run.stats("loss", mode="eval")
    assert loss.column("step").to_pylist() == [8, 9]
    assert loss.column("mean").to_pylist() == pytest.approx([1 / 9, 1 / 10])
    assert run.stats(["nope"]).num_rows == 0
    assert run.stats(steps=[1, 7]).num_rows == 12
    stats_only = run.stats("layer4.weight")
    assert not any(stats_only.column("has_value").to_pylist())
    assert run.steps(mode="eval") == [8, 9]
    with pytest.raises(tv.NotFoundError, match="statistics only"):
        run.tensor("layer4.weight").value(3)


def _has_pandas():
    try:
        import pandas  # noqa: F401
    except ImportError:
        return False
    return True


def test_live_reader_follows_writer(tmp_run):
    w = tv.StoreWriter(tmp_run)
    w.write("a", 0, np.arange(10, dtype=np.float32))
    w.commit(0)
    w.flush()
    run = tv.open(tmp_run)
    assert run.steps() == [0]
    w.write("a", 1, np.arange(10, dtype=np.float32) + 1)
    w.flush()
    assert run.refresh() == 0  # written, not committed
    with pytest.raises(tv.StepNotAvailableError, match="nearest saved steps: \\[0\\]"):
        run.tensor("a").value(1)
    w.commit(1)
    w.flush()
    np.testing.assert_array_equal(run.tensor("a").value(1), np.arange(10, dtype=np.float32) + 1)
    assert not run.ended()
    w.close()
    assert list(run.follow(timeout=5)) == [0, 1]
    assert run.ended()


def test_typed_errors(tmp_run, tmp_path):
    with pytest.raises(tv.NotFoundError, match="no run"):
        tv.open(str(tmp_path / "missing"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(tv.NotFoundError, match="manifest.json is missing"):
        tv.open(str(tmp_path / "empty"))
    w = tv.StoreWriter(tmp_run)
    with pytest.raises(ValueError, match="step must be a non-negative integer"):
        w.write("a", -1, np.zeros(3))
    with pytest.raises(tv.InvalidArgumentError, match="unsupported dtype"):
        w.write("a", 0, np.zeros(3, dtype=np.complex64))
    with pytest.raises(tv.InvalidArgumentError, match="unsupported dtype"):
        w.write("a", 0, np.array(["x", "y"]))
    with pytest.raises(tv.InvalidArgumentError, match="unknown codec 'lz4'"):
        w.write("a", 0, np.zeros(3), codec="lz4")
    with pytest.raises(tv.InvalidArgumentError, match="unknown mode"):
        w.write("a", 0, np.zeros(3), mode="training")
    with pytest.raises(tv.InvalidArgumentError, match="name"):
        w.write("", 0, np.zeros(3))
    with pytest.raises(tv.InvalidArgumentError, match="policy"):
        tv.StoreWriter(tmp_run + "2", policy="drop")
    with pytest.raises(tv.FailedPreconditionError, match="another writer"):
        tv.StoreWriter(tmp_run)
    w.write("a", 0, np.zeros(3))
    w.commit(0)
    w.close()
    with pytest.raises(tv.FailedPreconditionError, match="closed"):
        w.write("a", 1, np.zeros(3))
    run = tv.open(tmp_run)
    with pytest.raises(tv.TensorNotFoundError, match="Did you mean: a"):
        run.tensor("aa")
    with pytest.raises(KeyError):
        run.tensor("zzz")
    with pytest.raises(LookupError, match="no committed step 5"):
        run.tensor("a").value(5)
    with pytest.raises(ValueError):
        run.tensor("a").value(-2)


def test_writer_counters_and_compression(tmp_run, rng):
    weights = (rng.standard_normal(1 << 18) * 0.02).astype(np.float32)
    with tv.StoreWriter(tmp_run) as w:
        w.write("w", 0, weights)
        w.commit(0)
        w.flush()
        c = w.counters()
    assert c["tensors"] == 1 and c["commits"] == 1
    assert c["stored_bytes"] < 0.95 * c["raw_bytes"]
    assert c["pending_bytes"] == 0


def test_concurrent_readers_and_refresh_in_threads(tmp_run):
    import threading

    w = tv.StoreWriter(tmp_run)
    w.write("x", 0, np.zeros(1000, np.float32))
    w.commit(0)
    w.flush()
    run = tv.open(tmp_run)
    errors = []
    done = threading.Event()

    def reader():
        try:
            while not done.is_set():
                run.refresh()
                steps = run.steps()
                last = steps[-1]
                np.testing.assert_array_equal(
                    run.tensor("x").value(last), np.full(1000, last, np.float32)
                )
                assert run.stats("x").num_rows >= len(steps)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for step in range(1, 200):
        w.write("x", step, np.full(1000, step, np.float32))
        w.commit(step)
        if step % 10 == 0:
            w.flush()
    w.close()
    done.set()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    run.refresh()
    assert run.steps() == list(range(200))
