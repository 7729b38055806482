"""Resource faults: a full disk, I/O errors and a slow disk never cost training or committed data.

ENOSPC comes from a real 2 MiB tmpfs (needs mount permission: root in a container or CI VM;
skipped otherwise). EIO and the slow disk come from the writer's test-only fault injection,
``TENSORVIGIL_FAULTS`` (docs/RELIABILITY.md), read when a writer is created.
"""

import json
import logging
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import tensorvigil as tv
from tensorvigil.store.fsck import fsck

torch = pytest.importorskip("torch")
nn = torch.nn


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs mounted for the test."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {r.stderr.strip()}")
    try:
        yield str(mnt)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _model():
    torch.manual_seed(0)
    # ~130 KiB of float32 parameters (~260 KiB saved per step with the gradients): the 2 MiB
    # disk fills after a few saved steps.
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64))


def _train(hook, steps=40):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    hook.register(model, optimizer=opt)
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    done = 0
    with hook:
        for _ in range(steps):
            loss = (model(x) ** 2).mean()
            hook.record_loss(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
    return done


def _errors(caplog):
    return [r for r in caplog.records if r.name == "tensorvigil" and r.levelno >= logging.ERROR]


def _check_committed(run_dir):
    """Every committed step reads back with finite values; nothing corrupt is reported."""
    run = tv.open(run_dir)
    steps = run.steps()
    for name in run.tensor_names():
        t = run.tensor(name)
        for s in t.steps():
            assert np.isfinite(np.asarray(t.value(s), dtype=np.float64)).all()
    rep = fsck(run_dir)
    assert not rep.problems
    assert all(s.state in ("ok", "unsealed", "empty") and not s.problems for s in rep.shards), (
        rep.to_json()
    )
    return steps


def test_disk_full_training_continues_error_reported_once(small_disk, caplog):
    run_dir = os.path.join(small_disk, "run")
    hook = tv.torch.Hook(run_dir, save=tv.SaveConfig(every=1), codec="raw")
    with caplog.at_level(logging.ERROR, logger="tensorvigil"):
        assert _train(hook) == 40  # training ran to the end
    errs = _errors(caplog)
    assert len(errs) == 1, [e.getMessage() for e in errs]
    msg = errs[0].getMessage()
    assert "No space left on device" in msg and small_disk in msg, msg
    steps = _check_committed(run_dir)
    assert 1 <= len(steps) < 40 and steps == list(range(len(steps)))


def test_disk_full_strict_stops_training_with_typed_error(small_disk):
    run_dir = os.path.join(small_disk, "run")
    hook = tv.torch.Hook(run_dir, save=tv.SaveConfig(every=1), codec="raw", strict=True)
    with pytest.raises(tv.StoreIOError, match="No space left on device"):
        _train(hook)
    steps = _check_committed(run_dir)
    assert steps == list(range(len(steps))) and len(steps) >= 1


def test_injected_io_error_training_continues(tmp_run, monkeypatch, caplog):
    monkeypatch.setenv("TENSORVIGIL_FAULTS", "fail_after_bytes=1500000,errno=EIO")
    hook = tv.torch.Hook(tmp_run, save=tv.SaveConfig(every=1), codec="raw")
    with caplog.at_level(logging.ERROR, logger="tensorvigil"):
        assert _train(hook) == 40
    errs = _errors(caplog)
    assert len(errs) == 1
    msg = errs[0].getMessage()
    assert "Input/output error" in msg and os.path.join(tmp_run, "rank-00000", "shard-") in msg, msg
    monkeypatch.delenv("TENSORVIGIL_FAULTS")
    steps = _check_committed(tmp_run)
    assert 1 <= len(steps) < 40


def test_injected_io_error_strict_raises(tmp_run, monkeypatch):
    monkeypatch.setenv("TENSORVIGIL_FAULTS", "fail_after_bytes=100000,errno=EIO")
    w = tv.StoreWriter(tmp_run, codec="raw")
    with pytest.raises(tv.StoreIOError, match="Input/output error"):
        for step in range(100):
            w.write("x", step, np.full(10000, step, np.float32))
            w.commit(step)
            w.flush()
    with pytest.raises(tv.StoreIOError):  # close reports it too, and releases the lock
        w.close()
    monkeypatch.delenv("TENSORVIGIL_FAULTS")
    tv.StoreWriter(tmp_run).close()
    run = tv.open(tmp_run)
    for s in run.steps():
        np.testing.assert_array_equal(run.tensor("x").value(s), np.full(10000, s, np.float32))


def test_bad_fault_spec_is_a_clear_error(tmp_run, monkeypatch):
    monkeypatch.setenv("TENSORVIGIL_FAULTS", "fail_after=12")
    with pytest.raises(tv.InvalidArgumentError, match="TENSORVIGIL_FAULTS item 'fail_after=12'"):
        tv.StoreWriter(tmp_run)


MEMORY_CHILD = textwrap.dedent(
    """
    import json, os, sys, threading, time
    import numpy as np
    import tensorvigil as tv

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    run, limit, policy = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    x = np.random.default_rng(0).standard_normal(1 << 20).astype(np.float32)  # 4 MiB
    w = tv.StoreWriter(run, max_pending_bytes=limit, policy=policy, codec="raw", fsync=False)
    base = rss()
    peak = [base]
    stop = threading.Event()
    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)
    t = threading.Thread(target=sample); t.start()
    t0 = time.perf_counter()
    for step in range(12):
        for k in range(4):
            x[0] = step * 10 + k
            w.write(f"t{k}", step, x)
        w.commit(step)
    loop_s = time.perf_counter() - t0
    peak_pool = w.counters()["pool_bytes"]
    w.close()
    stop.set(); t.join()
    c = w.counters()
    print(json.dumps({"base": base, "peak": peak[0], "loop_s": loop_s,
                      "peak_pending": c["peak_pending_bytes"], "dropped": c["dropped"],
                      "pool_at_end_of_loop": peak_pool}))
    """
)


def _memory_child(run_dir, limit, policy, delay_ms):
    env = dict(os.environ, TENSORVIGIL_FAULTS=f"delay_ms={delay_ms}")
    r = subprocess.run(
        [sys.executable, "-c", MEMORY_CHILD, run_dir, str(limit), policy],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


#: Stated margin over max_pending_bytes: buffer rounding (64 KiB per buffer), the writer's
#: frame batch and thread stacks, zstd contexts and allocator slack.
MEMORY_MARGIN = 24 << 20


def test_slow_disk_block_policy_bounds_memory(tmp_path):
    limit = 16 << 20
    out = _memory_child(str(tmp_path / "run"), limit, "block", delay_ms=40)
    assert out["dropped"] == 0
    assert out["peak_pending"] <= limit
    assert out["peak"] - out["base"] <= limit + MEMORY_MARGIN, out
    # 48 writes of 4 MiB through a 16 MiB window on a slow disk: the loop had to wait.
    assert out["loop_s"] > 0.2
    run = tv.open(str(tmp_path / "run"))
    assert run.steps() == list(range(12))
    assert run.tensor("t3").value(11)[0] == 113


def test_slow_disk_skip_policy_keeps_speed_and_records_drops(tmp_path):
    limit = 8 << 20
    block = _memory_child(str(tmp_path / "block"), limit, "block", delay_ms=60)
    skip = _memory_child(str(tmp_path / "skip"), limit, "skip", delay_ms=60)
    assert skip["dropped"] > 0 and block["dropped"] == 0
    assert skip["loop_s"] < block["loop_s"] / 3, (skip, block)
    assert skip["peak"] - skip["base"] <= limit + MEMORY_MARGIN
    run = tv.open(str(tmp_path / "skip"))
    assert run.steps() == list(range(12))  # every step committed, none lost
    dropped = kept = 0
    for k in range(4):
        t = run.tensor(f"t{k}")
        for s in t.steps():
            assert t.stats(s).numel == 1 << 20
            try:
                v = t.value(s)
            except tv.NotFoundError as e:
                assert "dropped" in str(e)
                dropped += 1
            else:
                assert v[0] == s * 10 + k
                kept += 1
    assert dropped == skip["dropped"] and kept + dropped == 48
    table = run.stats()
    assert table.num_rows == 48  # statistics of dropped payloads are recorded


def test_writer_lock_released_when_writer_process_is_killed(tmp_run):
    code = textwrap.dedent(
        """
        import sys, time, tensorvigil as tv
        w = tv.StoreWriter(sys.argv[1])
        print("locked", flush=True)
        time.sleep(120)
        """
    )
    p = subprocess.Popen([sys.executable, "-c", code, tmp_run], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(
            tv.FailedPreconditionError, match="another writer holds the stream of rank 0"
        ):
            tv.StoreWriter(tmp_run)
        with pytest.raises(tv.FailedPreconditionError):
            tv.torch.Hook(tmp_run, strict=True)._session.writer()
    finally:
        p.kill()
        p.wait(timeout=30)
        p.stdout.close()
    deadline = time.monotonic() + 10
    while True:  # the kernel drops the flock when the process is gone
        try:
            tv.StoreWriter(tmp_run).close()
            break
        except tv.FailedPreconditionError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
