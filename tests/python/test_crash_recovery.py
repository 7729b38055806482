"""A writer process killed with SIGKILL leaves every committed step readable."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import tensorvigil as tv

CHILD = textwrap.dedent(
    """
    import sys, numpy as np, tensorvigil as tv
    run = sys.argv[1]
    w = tv.StoreWriter(run, roll_bytes=256 << 10, fsync=False)
    step = 0
    while True:
        for k in range(4):
            w.write(f"layer{k}", step, np.full(5000 + k, step * 10 + k, dtype=np.float32))
        w.commit(step)
        if step % 3 == 2:
            w.flush()
            print(step, flush=True)
        step += 1
    """
)


def _expected(step: int, k: int) -> np.ndarray:
    return np.full(5000 + k, step * 10 + k, dtype=np.float32)


@pytest.mark.parametrize("trial", range(8))
def test_sigkill_keeps_committed_steps(tmp_run, trial):
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, tmp_run], stdout=subprocess.PIPE, text=True
    )
    flushed = -1
    deadline = time.monotonic() + 60
    # Let it run for a trial-dependent number of flushes, then kill it mid-flight.
    while flushed < 2 + 7 * trial and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        flushed = int(line)
    time.sleep(0.003 * trial)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    assert flushed >= 2, "the writer never got going"

    run = tv.open(tmp_run)
    assert not run.ended()
    steps = run.steps()
    assert steps == list(range(len(steps))), "committed steps must form a prefix"
    assert len(steps) >= flushed + 1, f"lost committed steps: have {len(steps)}, flushed {flushed}"
    for step in (steps[0], steps[len(steps) // 2], steps[-1]):
        for k in range(4):
            np.testing.assert_array_equal(run.tensor(f"layer{k}").value(step), _expected(step, k))
    table = run.stats()
    assert table.num_rows == 4 * len(steps)

    # A restarted writer appends after the torn shard; everything stays readable.
    with tv.StoreWriter(tmp_run) as w:
        w.write("layer0", 10_000, _expected(10_000, 0))
        w.commit(10_000)
    run = tv.open(tmp_run)
    assert run.steps()[-1] == 10_000
    assert run.ended()
    np.testing.assert_array_equal(run.tensor("layer0").value(steps[-1]), _expected(steps[-1], 0))


def test_reader_in_other_process_sees_live_steps(tmp_run):
    reader = textwrap.dedent(
        """
        import sys, tensorvigil as tv, time
        deadline = time.monotonic() + 60
        while True:
            try:
                run = tv.open(sys.argv[1]); break
            except tv.NotFoundError:
                if time.monotonic() > deadline: raise
                time.sleep(0.05)
        seen = list(run.follow(timeout=30, poll=0.02))
        print(",".join(map(str, seen)))
        """
    )
    os.makedirs(tmp_run)
    proc = subprocess.Popen(
        [sys.executable, "-c", reader, tmp_run], stdout=subprocess.PIPE, text=True
    )
    with tv.StoreWriter(tmp_run) as w:
        for step in range(20):
            w.write("x", step, np.full(100, step, dtype=np.float32))
            w.commit(step)
            w.flush()
            time.sleep(0.01)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert out.strip() == ",".join(str(s) for s in range(20))
