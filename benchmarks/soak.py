"""Soak test (not in CI): capture a model every step for a long time while a watcher and a
reader poll the live run; report throughput and memory over time.

* trainer (this process): an MLP (~3.2 M parameters) trained with ``tv.torch.Hook`` saving
  weights, biases, gradients and the loss at **every** step (~24 MiB of tensors a step);
* watcher: ``tensorvigil watch RUN`` (default rules) in a subprocess;
* reader: a subprocess that refreshes the run, checks the steps form a prefix and reads the
  newest value of every tensor, in a loop.

Every minute (or --report-s) it prints: steps/s of training, MB/s captured, the trainer's
RSS, the reader's RSS, the writer's pending bytes and the reader's checks so far. At the end:
the spread of per-interval throughput (min/median/max), RSS growth, fsck of the run.

Usage: python benchmarks/soak.py [--minutes 30] [--report-s 60] [--out DIR] [--save-every N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import machine_info  # noqa: E402

READER = textwrap.dedent(
    """
    import json, sys, time
    import tensorvigil as tv
    run = None
    while run is None:
        try:
            run = tv.open(sys.argv[1])
        except tv.NotFoundError:
            time.sleep(0.1)
    checks = 0
    seen = 0
    while True:
        run.refresh()
        steps = run.steps()
        every = int(sys.argv[2])
        assert steps == list(range(0, every * len(steps), every)), "steps must form a prefix"
        assert len(steps) >= seen
        seen = len(steps)
        if steps:
            for name in run.tensor_names():
                run.tensor(name).value(steps[-1])
                checks += 1
        print(json.dumps({"steps": seen, "checks": checks}), flush=True)
        if run.ended():
            break
        time.sleep(0.5)
    """
)


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def main(argv=None) -> int:
    """Runs the soak; returns the exit status (1 if a check failed)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--report-s", type=float, default=60.0)
    ap.add_argument("--out", help="run directory (default: a temporary one, deleted)")
    ap.add_argument(
        "--save-every",
        type=int,
        default=1,
        help="save every N-th step (default 1; ~110 MB/s of capture at 1 on 2 cores, so a "
        "30-minute soak at 1 needs ~200 GB of disk: use 10 on smaller disks)",
    )
    args = ap.parse_args(argv)

    import torch

    import tensorvigil as tv
    from tensorvigil.store.fsck import fsck

    torch.set_num_threads(1)
    tmp = None
    run_dir = args.out or os.path.join(tmp := tempfile.mkdtemp(prefix="tv-soak-"), "run")
    nn = torch.nn
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(512, 2048), nn.ReLU(), nn.Linear(2048, 1024), nn.ReLU(), nn.Linear(1024, 10)
    )
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    nparams = sum(p.numel() for p in model.parameters())
    hook = tv.torch.Hook(
        run_dir, save=tv.SaveConfig(every=args.save_every), max_pending_bytes=256 << 20
    )
    hook.register(model, optimizer=opt)
    x = torch.randn(64, 512)
    y = torch.randint(0, 10, (64,))

    print(f"# {machine_info()}", flush=True)
    print(
        f"# model {nparams} parameters, ~{2 * nparams * 4 / 2**20:.1f} MiB captured per saved "
        f"step, every {args.save_every} step(s)",
        flush=True,
    )
    watcher = reader = None
    intervals = []
    rss_series = []
    reader_state = {"steps": 0, "checks": 0}
    ok = True
    try:
        with hook:
            step = 0
            t_end = time.monotonic() + args.minutes * 60
            t_last, s_last = time.monotonic(), 0
            while time.monotonic() < t_end:
                loss = nn.functional.cross_entropy(model(x), y)
                hook.record_loss(loss)
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
                if step == 2:  # the run exists now: start the pollers
                    watcher = subprocess.Popen(
                        [sys.executable, "-m", "tensorvigil", "watch", run_dir, "--timeout", "30"],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                    reader = subprocess.Popen(
                        [sys.executable, "-c", READER, run_dir, str(args.save_every)],
                        stdout=subprocess.PIPE,
                        text=True,
                    )
                    os.set_blocking(reader.stdout.fileno(), False)
                now = time.monotonic()
                if now - t_last >= args.report_s:
                    if reader is not None:
                        for line in (reader.stdout.read() or "").splitlines():
                            reader_state = json.loads(line)
                    sps = (step - s_last) / (now - t_last)
                    w = hook._session.writer()
                    c = w.counters()
                    row = {
                        "t_min": round((now - (t_end - args.minutes * 60)) / 60, 2),
                        "steps": step,
                        "steps_per_s": round(sps, 2),
                        "MB_per_s": round(sps / args.save_every * 2 * nparams * 4 / 1e6, 1),
                        "trainer_rss_MiB": round(_rss(os.getpid()) / 2**20, 1),
                        "reader_rss_MiB": round(_rss(reader.pid) / 2**20, 1) if reader else 0,
                        "watcher_rss_MiB": round(_rss(watcher.pid) / 2**20, 1) if watcher else 0,
                        "pending_MiB": round(c["pending_bytes"] / 2**20, 1),
                        "peak_pending_MiB": round(c["peak_pending_bytes"] / 2**20, 1),
                        "reader_steps": reader_state["steps"],
                        "reader_checks": reader_state["checks"],
                    }
                    print(json.dumps(row), flush=True)
                    intervals.append(sps)
                    rss_series.append(row["trainer_rss_MiB"])
                    t_last, s_last = now, step
        if reader is not None:
            os.set_blocking(reader.stdout.fileno(), True)
            out, _ = reader.communicate(timeout=300)
            lines = out.splitlines()
            if lines:
                reader_state = json.loads(lines[-1])
            saved = len(range(0, step, args.save_every))
            ok &= reader.returncode == 0 and reader_state["steps"] == saved
        rep = fsck(run_dir, verify_values=False)
        ok &= rep.clean
        run = tv.open(run_dir)
        ok &= run.steps() == list(range(0, step, args.save_every))
        summary = {
            "minutes": args.minutes,
            "steps": step,
            "steps_per_s": {
                "min": round(min(intervals), 2) if intervals else None,
                "median": round(statistics.median(intervals), 2) if intervals else None,
                "max": round(max(intervals), 2) if intervals else None,
            },
            "trainer_rss_MiB": {
                "first": rss_series[0] if rss_series else None,
                "last": rss_series[-1] if rss_series else None,
                "max": max(rss_series) if rss_series else None,
            },
            "reader_ok": reader is not None and reader.returncode == 0,
            "reader_checks": reader_state["checks"],
            "fsck_clean": rep.clean,
            "ok": bool(ok),
        }
        print(json.dumps(summary), flush=True)
    finally:
        for p in (watcher, reader):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        if reader is not None and reader.stdout:
            reader.stdout.close()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
