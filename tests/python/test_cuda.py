"""CUDA statistics and GPU capture against the CPU kernels (tv.compute_stats on host copies).

Everything marked ``cuda`` skips without a CUDA build and device (conftest.py); the last test
runs in every build and checks the CPU-only build's UnsupportedError.
"""

import math

import numpy as np
import pytest

import tensorvigil as tv
from tensorvigil import _core
from tensorvigil import cuda as tvc

_HAS_GPU = bool(_core.cuda_available())


def _torch():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    return torch


def _assert_same(g, c):
    assert g.numel == c.numel
    assert (g.nan, g.posinf, g.neginf, g.zeros) == (c.nan, c.posinf, c.neginf, c.zeros)
    if math.isnan(c.min):
        assert math.isnan(g.min) and math.isnan(g.max)
    else:
        assert (g.min, g.max, g.abs_max) == (c.min, c.max, c.abs_max)
    scale = abs(c.mean) + (c.std if c.finite else 0.0)
    # float inputs: float partials over each 16-byte vector (<= 16 terms), then double
    assert g.mean == pytest.approx(c.mean, rel=0, abs=2e-6 * scale + 1e-300)
    assert g.m2 == pytest.approx(c.m2, rel=2e-6, abs=1e-300)
    assert g.l1 == pytest.approx(c.l1, rel=2e-6, abs=1e-300)
    if c.hist is None:
        assert g.hist is None
    else:
        np.testing.assert_array_equal(g.hist, c.hist)
        assert (g.hist_below, g.hist_above) == (c.hist_below, c.hist_above)
        np.testing.assert_array_equal(g.hist_edges, c.hist_edges)
    if c.exp_hist is None:
        assert g.exp_hist is None
    else:
        np.testing.assert_array_equal(g.exp_hist, c.exp_hist)


def _mixed(torch, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    out = []
    sizes = [0, 1, 7, 1000, 65537, 300001, (1 << 20) + 3]
    for dt in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for n in sizes:
            x = torch.randn(n, device="cuda", generator=g, dtype=torch.float32) * 3 + 0.5
            if n > 10:
                x[3] = float("nan")
                x[5] = float("inf")
                x[8] = float("-inf")
                x[9] = 0.0
            out.append(x.to(dt))
    for name in ("float8_e4m3fn", "float8_e5m2"):
        dt = getattr(torch, name, None)
        if dt is not None:
            out.append(torch.randn(4099, device="cuda", generator=g).to(dt))
    out.append(torch.ones(1_000_003, device="cuda"))  # constant: exact mean, zero variance
    out.append(torch.randn(64, 128, device="cuda", generator=g))  # 2-d
    return out


def _host(t):
    return t.detach().cpu()


@pytest.mark.cuda
@pytest.mark.parametrize(
    "kw",
    [{}, {"exp_hist": True}, {"hist_bins": 64}, {"hist_bins": 100, "hist_range": (-2.0, 3.0)}],
)
def test_matches_cpu_on_mixed_dtypes(kw):
    torch = _torch()
    xs = _mixed(torch)
    got = tvc.compute_stats_cuda(xs, **kw).result()
    assert len(got) == len(xs)
    for g, x in zip(got, xs):
        _assert_same(g, tv.compute_stats(_host(x), **kw))


@pytest.mark.cuda
def test_pending_is_async_and_idempotent():
    torch = _torch()
    x = torch.randn(1 << 22, device="cuda")
    p = tvc.compute_stats_cuda([x, x[: 1 << 10]])
    assert isinstance(p.ready(), bool)
    a = p.result()
    assert p.ready()
    assert p.result() is a
    assert isinstance(a[0], tv.Stats)
    assert a[1].numel == 1024


@pytest.mark.cuda
def test_explicit_stream_and_side_stream_ordering():
    torch = _torch()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        x = torch.zeros(1 << 20, device="cuda")
        x.add_(2.0)
        p = tvc.compute_stats_cuda([x])  # torch's current stream: s
    assert p.result()[0].mean == 2.0
    y = torch.full((10,), 3.0, device="cuda")
    assert tvc.compute_stats_cuda([y], stream=s.cuda_stream).result()[0].mean == 3.0


@pytest.mark.cuda
def test_rejects_bad_inputs():
    torch = _torch()
    x = torch.randn(8, 8, device="cuda")
    with pytest.raises(tv.InvalidArgumentError):
        tvc.compute_stats_cuda([x.t()])
    with pytest.raises(tv.InvalidArgumentError):
        tvc.compute_stats_cuda([torch.ones(3, dtype=torch.int32, device="cuda")])
    with pytest.raises(tv.InvalidArgumentError):
        tvc.compute_stats_cuda([torch.ones(3)])


@pytest.mark.cuda
def test_cuda_array_interface_and_dlpack():
    torch = _torch()

    class Cai:
        def __init__(self, t):
            self.t = t
            self.__cuda_array_interface__ = t.__cuda_array_interface__

    class Dl:
        def __init__(self, t):
            self.t = t

        def __dlpack__(self, **kw):
            return self.t.__dlpack__()

        def __dlpack_device__(self):
            return self.t.__dlpack_device__()

    x = torch.randn(5000, device="cuda")
    b = torch.randn(333, device="cuda").to(torch.bfloat16)
    got = tvc.compute_stats_cuda([Cai(x), Dl(x), Dl(b)]).result()
    ref = tv.compute_stats(_host(x))
    _assert_same(got[0], ref)
    _assert_same(got[1], ref)
    _assert_same(got[2], tv.compute_stats(_host(b)))


def _train_like(torch, writer, steps, stats_only, staging=64 << 20):
    g = torch.Generator(device="cuda").manual_seed(1)
    ws = {
        "fc1.weight": torch.randn(256, 128, device="cuda", generator=g),
        "fc1.bias": torch.randn(256, device="cuda", generator=g).to(torch.bfloat16),
        "fc2.weight": torch.randn(10, 256, device="cuda", generator=g).to(torch.float16),
    }
    expected = {}
    with tvc.GpuCapture(writer, staging_bytes=staging) as cap:
        for step in range(steps):
            items = [(n, t, stats_only, 16) for n, t in ws.items()]
            cap.submit(step, 0, step, items, exp_hist=True)
            expected[step] = {n: _host(t).clone() for n, t in ws.items()}
            cap.commit(step, "train", step)
            for t in ws.values():
                t.mul_(0.5).add_(1.0)  # in place on the stream: must not race the copies
        cap.flush()
        counters = cap.counters()
    return expected, counters


@pytest.mark.cuda
def test_capture_end_to_end(tmp_run):
    torch = _torch()
    w = tv.StoreWriter(tmp_run, fsync=False)
    expected, counters = _train_like(torch, w, 4, stats_only=False)
    w.close()
    assert counters["submits"] == 4 and counters["tensors"] == 12
    assert counters["copied_bytes"] > 0 and counters["dropped"] == 0
    run = tv.open(tmp_run)
    assert list(run.steps()) == [0, 1, 2, 3]
    for step, tensors in expected.items():
        for name, host in tensors.items():
            t = run.tensor(name)
            val = t.value(step)
            ref = host.float().numpy() if host.dtype == torch.bfloat16 else host.numpy()
            np.testing.assert_array_equal(np.asarray(val, dtype=ref.dtype), ref)
            _assert_same(t.stats(step), tv.compute_stats(host, hist_bins=16, exp_hist=True))


@pytest.mark.cuda
def test_capture_stats_only_and_commit_order(tmp_run):
    torch = _torch()
    w = tv.StoreWriter(tmp_run, fsync=False)
    expected, counters = _train_like(torch, w, 3, stats_only=True)
    w.close()
    assert counters["copied_bytes"] == 0
    run = tv.open(tmp_run)
    assert list(run.steps()) == [0, 1, 2]
    for step, tensors in expected.items():
        for name, host in tensors.items():
            _assert_same(
                run.tensor(name).stats(step), tv.compute_stats(host, hist_bins=16, exp_hist=True)
            )


@pytest.mark.cuda
def test_capture_skip_policy_drops_payload_keeps_stats(tmp_run):
    torch = _torch()
    w = tv.StoreWriter(tmp_run, fsync=False, policy="skip")
    big = torch.randn(1 << 20, device="cuda")  # 4 MiB > 1 MiB of staging
    small = torch.randn(100, device="cuda")
    with tvc.GpuCapture(w, staging_bytes=1 << 20) as cap:
        cap.submit(0, 0, 0, [("big", big, False, 0), ("small", small, False, 0)])
        cap.commit(0)
        cap.flush()
        assert cap.counters()["dropped"] == 1
    assert w.counters()["dropped"] == 1
    w.close()
    run = tv.open(tmp_run)
    rec = run.tensor("big")
    _assert_same(rec.stats(0), tv.compute_stats(_host(big)))
    np.testing.assert_array_equal(run.tensor("small").value(0), _host(small).numpy())


@pytest.mark.cuda
def test_capture_block_policy_waits_for_staging(tmp_run):
    torch = _torch()
    w = tv.StoreWriter(tmp_run, fsync=False)
    xs = [torch.randn(100_000, device="cuda") for _ in range(6)]  # 400 KB each, 1 MiB ring
    with tvc.GpuCapture(w, staging_bytes=1 << 20) as cap:
        cap.submit(0, 0, 0, [(f"x{i}", x, False, 0) for i, x in enumerate(xs)])
        big = torch.randn(1 << 19, device="cuda")  # 2 MiB > ring: one-off buffer
        cap.submit(0, 0, 0, [("big", big, False, 0)])
        cap.commit(0)
    w.close()
    run = tv.open(tmp_run)
    for i, x in enumerate(xs):
        np.testing.assert_array_equal(run.tensor(f"x{i}").value(0), _host(x).numpy())
    np.testing.assert_array_equal(run.tensor("big").value(0), _host(big).numpy())


@pytest.mark.cuda
@pytest.mark.parametrize("reductions_only", [False, True])
def test_torch_hook_on_gpu_uses_device_statistics(tmp_run, reductions_only):
    """The PyTorch hook on a CUDA model: GPU path, values and statistics equal the CPU's."""
    torch = _torch()
    nn = torch.nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4)).cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    hook = tv.torch.Hook(
        tmp_run,
        collections=["weights", "biases", "gradients", "losses", "relu_output"],
        save=tv.SaveConfig(),
        reductions_only=reductions_only,
        strict=True,
    ).register(model, opt)
    x = torch.randn(16, 32, device="cuda")
    y = torch.randint(0, 4, (16,), device="cuda")
    seen = {}
    with hook:
        for s in range(3):
            seen[("0.weight", s)] = model[0].weight.detach().cpu().clone()
            loss = nn.functional.cross_entropy(model(x), y)
            hook.record_loss(loss)
            opt.zero_grad()
            loss.backward()
            seen[("2.weight/grad", s)] = model[2].weight.grad.detach().cpu().clone()
            seen[("loss", s)] = loss.detach().cpu().clone()
            opt.step()
        assert hook._session.gpu is not None, "the hook did not take the GPU path"
    run = tv.open(tmp_run)
    assert run.steps() == [0, 1, 2]
    for (name, s), ref in seen.items():
        t = run.tensor(name)
        # CUDA tensors: no exponent histogram unless asked for; the loss went through the GPU too
        _assert_same(t.stats(s), tv.compute_stats(ref.numpy()))
        if reductions_only:
            assert not t.record(s).has_value
        else:
            np.testing.assert_array_equal(t.value(s), ref.numpy())
    assert "1/output" in run.tensor_names(collection="relu_output")


@pytest.mark.skipif(_HAS_GPU, reason="checks the CPU-only build's errors")
def test_cpu_build_raises_unsupported(tmp_run):
    if _core.cuda_built():
        pytest.skip("CUDA build without a device")
    assert tvc.cuda_available() is False
    with pytest.raises(tv.UnsupportedError, match="built without CUDA.*TV_ENABLE_CUDA=ON"):
        tvc.compute_stats_cuda([])
    with tv.StoreWriter(tmp_run) as w:
        with pytest.raises(tv.UnsupportedError, match="TV_ENABLE_CUDA=ON"):
            tvc.GpuCapture(w)
