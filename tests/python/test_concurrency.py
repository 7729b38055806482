"""Concurrency: one writer per rank stream (lock), readers and watchers never block the writer,
many concurrent readers of a live run see consistent steps."""

import json
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import tensorvigil as tv

PROBE = textwrap.dedent(
    """
    import sys, time, tensorvigil._core as core
    run = sys.argv[1]
    r = core.RunReader(run, True)
    print("probing", flush=True)
    end = time.monotonic() + float(sys.argv[2])
    n = 0
    while time.monotonic() < end:
        r.writer_alive(0)
        n += 1
    print(n)
    """
)


def test_two_writers_on_one_rank_are_refused_across_processes(tmp_run):
    code = (
        "import sys, time, tensorvigil as tv\nw = tv.StoreWriter(sys.argv[1])\n"
        "print('locked', flush=True)\ntime.sleep(120)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code, tmp_run], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(
            tv.FailedPreconditionError, match="another writer holds the stream of rank 0"
        ):
            tv.StoreWriter(tmp_run)
        tv.StoreWriter(tmp_run, rank=1).close()  # other ranks are independent
    finally:
        p.send_signal(signal.SIGKILL)  # the kernel releases the flock of a killed process
        p.wait(timeout=30)
        p.stdout.close()
    tv.StoreWriter(tmp_run).close()


def test_liveness_probes_of_readers_never_refuse_a_writer(tmp_run):
    tv.StoreWriter(tmp_run).close()
    probe = subprocess.Popen(
        [sys.executable, "-c", PROBE, tmp_run, "6"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert probe.stdout.readline().strip() == "probing"
        opened = 0
        end = time.monotonic() + 4
        while time.monotonic() < end:
            tv.StoreWriter(tmp_run, threads=1).close()  # must never see the reader's probe lock
            opened += 1
        probes = int(probe.communicate(timeout=60)[0])
    finally:
        probe.kill()
        probe.wait(timeout=30)
        probe.stdout.close()
    assert opened > 20 and probes > 1000


READER = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np
    import tensorvigil as tv
    run_dir = sys.argv[1]
    while True:
        try:
            run = tv.open(run_dir); break
        except tv.NotFoundError:
            time.sleep(0.01)
    seen, checks, last = 0, 0, -1
    end = time.monotonic() + 60
    while time.monotonic() < end:
        run.refresh()
        steps = run.steps()
        assert steps == list(range(len(steps))), "steps must form a prefix"
        assert len(steps) >= seen, "a committed step disappeared"
        seen = len(steps)
        if steps:
            s = steps[-1]
            for k in range(3):  # every tensor of a visible step is there, with its values
                v = run.tensor(f"t{k}").value(s)
                assert v.shape == (4096,) and (v == s * 10 + k).all(), (s, k)
                checks += 1
        if run.ended():
            break
        time.sleep(0.005)
    print(json.dumps({"steps": seen, "checks": checks}))
    """
)


def test_many_live_readers_see_consistent_steps_and_never_slow_the_writer(tmp_run):
    readers = [
        subprocess.Popen([sys.executable, "-c", READER, tmp_run], stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    # A watcher too: `tensorvigil watch` follows the run with the default rules.
    watch = subprocess.Popen(
        [sys.executable, "-m", "tensorvigil", "watch", tmp_run, "--timeout", "30"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        worst = 0.0
        with tv.StoreWriter(tmp_run, roll_bytes=64 << 10, roll_seconds=0.2, fsync=False) as w:
            for step in range(150):
                t0 = time.perf_counter()
                for k in range(3):
                    w.write(f"t{k}", step, np.full(4096, step * 10 + k, np.float32))
                w.commit(step)
                worst = max(worst, time.perf_counter() - t0)
                time.sleep(0.004)
        outs = [json.loads(r.communicate(timeout=120)[0]) for r in readers]
        watch.communicate(timeout=120)
    finally:
        for p in (*readers, watch):
            p.kill()
    for r in readers:
        assert r.returncode == 0
    assert all(o["steps"] == 150 and o["checks"] > 0 for o in outs), outs
    # write() only copies: readers take no lock the writer waits on, so even with 5 busy
    # processes on 2 cores no step takes long (it would take the readers' whole poll if they did).
    assert worst < 0.5, worst
