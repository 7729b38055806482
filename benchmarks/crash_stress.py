"""Crash-safety stress: SIGKILL a writer at random moments, many times, and check every trial.

Each trial starts a writer process on a run directory (several trials share a run, so later
writers continue after crashed ones, as a restarted job does), lets it write for a random time
(up to --max-ms after it is ready; shards roll every 64 KiB so kills land in every phase:
mid-frame, mid-index, mid-rename-free roll, mid-close), kills it with SIGKILL and then checks:

* every step the writer had reported as flushed is visible, and the visible steps of each
  writer form a prefix of what it wrote;
* every visible value is exactly what was written (values encode their step and tensor);
* ``tensorvigil fsck`` finds nothing corrupt (only unsealed shards, torn tails), and after
  ``fsck --repair`` the run reads the same and fsck is clean.

Usage: python benchmarks/crash_stress.py [--trials 200] [--seed 0] [--max-ms 400]
Prints one line per failed trial and a JSON summary; exit 1 if any trial failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np

import tensorvigil as tv
from tensorvigil.store.fsck import fsck

CHILD = textwrap.dedent(
    """
    import sys, numpy as np, tensorvigil as tv
    run, base, close_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    w = tv.StoreWriter(run, roll_bytes=64 << 10, roll_seconds=0.05, fsync=False)
    print("ready", flush=True)
    step = base
    while True:
        for k in range(3):
            n = 500 + 700 * k + (step % 7) * 50
            w.write(f"t{k}", step, np.full(n, step * 10 + k, dtype=np.float32 if k < 2 else np.int64))
        w.commit(step)
        if step % 4 == 3:
            w.flush()
            print(step, flush=True)
        step += 1
        if step - base == close_at:
            w.close()  # killed during or after a clean close in some trials
            print("closed", flush=True)
            sys.exit(0)
    """
)


def _expected(step: int, k: int) -> np.ndarray:
    n = 500 + 700 * k + (step % 7) * 50
    return np.full(n, step * 10 + k, dtype=np.float32 if k < 2 else np.int64)


def _check(run_dir: str, writers: list) -> list:
    """Returns a list of problems (empty when the trial passed)."""
    errs = []
    run = tv.open(run_dir)
    steps = set(run.steps())
    for base, flushed in writers:
        mine = sorted(s for s in steps if base <= s < base + 1_000_000)
        if mine != list(range(base, base + len(mine))):
            errs.append(f"writer at {base}: visible steps are not a prefix: {mine[:5]}...")
        if flushed is not None and (not mine or mine[-1] < flushed):
            errs.append(f"writer at {base}: flushed step {flushed} is not visible")
    names = set(run.tensor_names())  # empty when the first writer died before its first commit
    for k in range(3):
        if f"t{k}" not in names:
            if steps:
                errs.append(f"t{k} missing although steps are committed")
            continue
        t = run.tensor(f"t{k}")
        for s in t.steps():
            v = t.value(s)
            if not np.array_equal(v, _expected(s, k)):
                errs.append(f"t{k} step {s}: wrong value")
    rep = fsck(run_dir)
    bad = [s for s in rep.shards if s.state not in ("ok", "unsealed", "empty") or s.problems]
    if rep.problems or bad:
        errs.append(f"fsck: {rep.problems} {[(s.path, s.state, s.problems) for s in bad]}")
    return errs


def main(argv=None) -> int:
    """Runs the trials; returns the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-ms", type=float, default=400.0)
    ap.add_argument("--per-run", type=int, default=4, help="trials (writers) per run directory")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    tmp = tempfile.mkdtemp(prefix="tv-crash-")
    survived = failed = repaired_runs = 0
    torn = 0
    t_start = time.monotonic()
    try:
        run_dir, writers = None, []

        def finish_run() -> None:
            nonlocal failed, repaired_runs
            rep = fsck(run_dir, repair=True)
            repaired_runs += bool(rep.repaired)
            errs = _check(run_dir, writers)
            if errs or not fsck(run_dir).clean:
                failed += 1
                print(f"after repair of {run_dir}: {errs}", flush=True)
            shutil.rmtree(run_dir)

        for trial in range(args.trials):
            if trial % args.per_run == 0:
                if run_dir is not None:
                    finish_run()
                run_dir, writers = os.path.join(tmp, f"run{trial}"), []
            base = trial * 1_000_000
            close_at = int(rng.integers(5, 200)) if rng.random() < 0.2 else 10**9
            p = subprocess.Popen(
                [sys.executable, "-c", CHILD, run_dir, str(base), str(close_at)],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert p.stdout.readline().strip() == "ready"
            os.set_blocking(p.stdout.fileno(), False)
            time.sleep(float(rng.random()) * args.max_ms / 1000)
            p.send_signal(signal.SIGKILL)
            p.wait()
            os.set_blocking(p.stdout.fileno(), True)
            out = p.stdout.read().split()
            p.stdout.close()
            nums = [int(x) for x in out if x.isdigit()]
            writers.append((base, nums[-1] if nums else None))
            try:
                errs = _check(run_dir, writers)
            except tv.TensorVigilError as e:
                errs = [f"{type(e).__name__}: {e}"]
            if errs:
                failed += 1
                print(f"trial {trial}: FAILED: {errs}", flush=True)
            else:
                survived += 1
            torn += sum(s.state == "unsealed" for s in fsck(run_dir, verify_values=False).shards)
        if run_dir is not None:
            finish_run()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary = {
        "trials": args.trials,
        "survived": survived,
        "failed": failed,
        "unsealed_shards_seen": torn,
        "runs_repaired_by_fsck": repaired_runs,
        "seconds": round(time.monotonic() - t_start, 1),
    }
    print(json.dumps(summary))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
