#!/usr/bin/env python3
"""TensorBoard export benchmark: ``tensorvigil export --tensorboard`` vs writing from the loop.

Measures, in one run on one machine:

1. a stored run of STEPS x TENSORS statistics records (default 1,000 x 100; statistics only,
   written with the store; a second run also stores 30-bin histograms);
2. ``export_tensorboard(run, dir)``: the 8 default statistics of every tensor as scalars
   (800 scalars per step), reported as steps x tensors per second; then the same with the
   stored histograms (``histograms="stored"``);
3. baseline: the same scalars written with ``torch.utils.tensorboard.SummaryWriter.add_scalar``
   one call per scalar, as a training loop does (values taken from the same run, so both write
   identical data), timed until ``close()`` returns; with histograms, plus
   ``add_histogram_raw`` from the same stored bins;
4. incremental export: 100 more steps appended, then one more export (what re-running costs);
5. the hook mirror: a small training loop with ``tv.torch.Hook`` (statistics only) with and
   without ``tensorboard_dir``, median step time (the mirror runs on a background thread).

Usage::

    python benchmarks/bench_tensorboard.py            # ~2-4 min on 2 cores
    python benchmarks/bench_tensorboard.py --quick    # 100 steps
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _timing import machine_info  # noqa: E402

import tensorvigil as tv  # noqa: E402
from tensorvigil.export.tensorboard import DEFAULT_STATS, export_tensorboard  # noqa: E402


def tensor_names(n: int) -> list[str]:
    out = []
    for i in range((n + 3) // 4):
        out += [
            f"layer{i}.weight",
            f"layer{i}.bias",
            f"layer{i}.weight/grad",
            f"layer{i}.bias/grad",
        ]
    return out[:n]


def write_run(path: str, names: list[str], start: int, stop: int, hist_bins: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    base = {n: rng.normal(0, 0.05, (32, 32)).astype(np.float32) for n in names}
    w = tv.StoreWriter(path, rank=0)
    try:
        for s in range(start, stop):
            for n in names:
                w.write(n, s, base[n] * (1.0 + 1e-3 * s), stats_only=True, hist_bins=hist_bins)
            w.commit(s)
    finally:
        w.close()


def baseline_rows(run_path: str):
    """Per step: [(tag, [8 values]), ...] from the stored statistics, as the loop would have them."""
    run = tv.open(run_path)
    t = run.stats().to_pydict()
    steps: dict[int, list] = {}
    for i, name in enumerate(t["tensor"]):
        numel = t["numel"][i]
        vals = {
            "nan_frac": t["nan"][i] / numel,
            "inf_frac": (t["posinf"][i] + t["neginf"][i]) / numel,
            "zero_frac": t["zeros"][i] / numel,
        }
        row = [vals.get(s, t[s][i] if s in t else 0.0) for s in DEFAULT_STATS]
        group = "gradients" if name.endswith("/grad") else "weights"
        steps.setdefault(t["step"][i], []).append((f"{group}/{name}", row, t["wall_time"][i]))
    return steps


def baseline_hists(run_path: str, names: list[str], steps: list[int]):
    run = tv.open(run_path)
    out = {}
    for s in steps:
        for n in names:
            st = run.tensor(n).stats(s)
            out[(s, n)] = st
    return out


def run_baseline(logdir: str, steps: dict, hists=None) -> float:
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(logdir)  # constructing it may import TensorFlow: not timed
    t0 = time.perf_counter()
    for step, rows in steps.items():
        for tag, vals, wall in rows:
            for s, v in zip(DEFAULT_STATS, vals):
                w.add_scalar(f"{tag}/{s}", v, step, walltime=wall)
            if hists is not None:
                st = hists[(step, tag.split("/", 1)[1])]
                w.add_histogram_raw(
                    f"{tag}/hist",
                    min=st.min,
                    max=st.max,
                    num=st.finite,
                    sum=st.sum,
                    sum_squares=st.l2**2,
                    bucket_limits=st.hist_edges[1:].tolist(),
                    bucket_counts=st.hist.tolist(),
                    global_step=step,
                    walltime=wall,
                )
    w.close()
    return time.perf_counter() - t0


def timed_export(run_path: str, logdir: str, **kw):
    shutil.rmtree(logdir, ignore_errors=True)
    t0 = time.perf_counter()
    res = export_tensorboard(run_path, logdir, **kw)
    return time.perf_counter() - t0, res


def mirror_overhead(tmp: str, steps: int) -> tuple[float, float, float]:
    """Median train-step time without and with the mirror; mirror export seconds per step."""
    import torch
    from torch import nn

    torch.set_num_threads(1)  # less spinning under load: the step times are less noisy
    mirror_cost = []

    def loop(tb_dir):
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Sequential(nn.Linear(64, 64), nn.ReLU()) for _ in range(12)])
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        run = tempfile.mkdtemp(dir=tmp)
        hook = tv.torch.Hook(
            run,
            collections=["weights", "biases", "gradients", "losses"],
            save=tv.SaveConfig(every=1),
            reductions_only=True,
            tensorboard_dir=tb_dir,
        )
        hook.register(model, optimizer=opt)
        x = torch.randn(32, 64)
        times = []
        mirror = None
        with hook:
            for _ in range(steps):
                t0 = time.perf_counter()
                loss = model(x).pow(2).mean()
                hook.record_loss(loss)
                opt.zero_grad()
                loss.backward()
                opt.step()
                times.append(time.perf_counter() - t0)
                mirror = mirror or hook._session._tb
        if mirror is not None:
            mirror_cost.append(mirror.exported.seconds / max(1, mirror.exported.events))
        return statistics.median(times[5:])

    loop(None)  # warm-up
    without, with_tb = [], []
    for i in range(3):  # interleaved, best median of each: other load on the machine skews both
        without.append(loop(None))
        with_tb.append(loop(os.path.join(tmp, f"mirror_tb{i}")))
    return min(without), min(with_tb), statistics.median(mirror_cost)


def export_benchmarks(args, names, n_rec, tmp) -> None:
    """Export vs baseline, with and without histograms, and an incremental export."""
    run = os.path.join(tmp, "run")
    run_h = os.path.join(tmp, "run_hist")
    t0 = time.perf_counter()
    write_run(run, names, 0, args.steps, hist_bins=0)
    write_run(run_h, names, 0, args.steps, hist_bins=30)
    print(
        f"\nwrote 2 runs of {args.steps} steps x {len(names)} tensors in "
        f"{time.perf_counter() - t0:.1f} s"
    )

    # warm-up (imports, page cache) on a small export
    export_tensorboard(run, os.path.join(tmp, "warm"), steps=(0, 5), histograms="none")

    t_exp, res = timed_export(run, os.path.join(tmp, "tb"), histograms="none")
    t_exp_h, res_h = timed_export(run_h, os.path.join(tmp, "tb_h"), histograms="stored")
    assert res.records == n_rec and res_h.histograms == n_rec

    rows = baseline_rows(run)
    hists = baseline_hists(run_h, names, list(rows))
    from torch.utils.tensorboard import SummaryWriter

    SummaryWriter(os.path.join(tmp, "warm_base")).close()  # its imports, not timed
    t_base = run_baseline(os.path.join(tmp, "base"), rows)
    t_base_h = run_baseline(os.path.join(tmp, "base_h"), rows, hists)
    tf_loaded = "tensorflow" in sys.modules

    # incremental: 100 more steps, then one more export into the same directory
    write_more = os.path.join(tmp, "inc")
    write_run(write_more, names, 0, args.steps, hist_bins=0)
    export_tensorboard(write_more, os.path.join(tmp, "tb_inc"), histograms="none")
    # a new writer appends to the run's stream, as a resumed training would
    more = 100
    w = tv.StoreWriter(write_more, rank=0)
    rng = np.random.default_rng(1)
    for s in range(args.steps, args.steps + more):
        for n in names:
            w.write(n, s, rng.normal(0, 0.05, (32, 32)).astype(np.float32), stats_only=True)
        w.commit(s)
    w.close()
    t0 = time.perf_counter()
    inc = export_tensorboard(write_more, os.path.join(tmp, "tb_inc"), histograms="none")
    t_inc = time.perf_counter() - t0
    assert inc.events == more, inc

    scal = n_rec * len(DEFAULT_STATS)
    print(f"\n{'':44} {'seconds':>8} {'steps x tensors/s':>18} {'scalars/s':>11}")

    def line(label, t, extra=""):
        print(f"{label:44} {t:8.2f} {n_rec / t:18,.0f} {scal / t:11,.0f} {extra}")

    line("tensorvigil export (scalars)", t_exp)
    line("SummaryWriter.add_scalar (same scalars)", t_base)
    line("tensorvigil export (scalars + stored hists)", t_exp_h)
    line("add_scalar + add_histogram_raw", t_base_h)
    print(f"\nratio, scalars only:        export is {t_base / t_exp:.1f}x faster")
    print(f"ratio, with histograms:     export is {t_base_h / t_exp_h:.1f}x faster")
    print(
        f"incremental export of {more} new steps after {args.steps}: {t_inc * 1e3:.0f} ms "
        f"({more * len(names) / t_inc:,.0f} records/s)"
    )
    sizes = {
        k: sum(
            os.path.getsize(os.path.join(dp, f))
            for dp, _, fs in os.walk(os.path.join(tmp, k))
            for f in fs
            if f.startswith("events.")
        )
        for k in ("tb", "base")
    }
    print(
        f"event bytes: export {sizes['tb'] / 1e6:.1f} MB, baseline {sizes['base'] / 1e6:.1f} MB"
        f" (one event per step vs one per scalar)"
    )
    print(f"TensorFlow imported by the baseline's writer: {tf_loaded}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--tensors", type=int, default=100)
    ap.add_argument("--quick", action="store_true", help="100 steps")
    ap.add_argument("--no-mirror", action="store_true", help="skip the hook mirror loop")
    ap.add_argument("--mirror-only", action="store_true", help="only the hook mirror loop")
    args = ap.parse_args()
    if args.quick:
        args.steps = 100
    print(machine_info())
    try:
        import crc32c  # noqa: F401

        print("crc32c: native (tensorboardX checksums records in C)")
    except ImportError:
        print("crc32c: not installed (tensorboardX falls back to a pure-Python CRC)")
    print(f"load average: {os.getloadavg()}")
    names = tensor_names(args.tensors)
    n_rec = args.steps * len(names)
    tmp = tempfile.mkdtemp(prefix="tv-bench-tb-")
    try:
        if not args.mirror_only:
            export_benchmarks(args, names, n_rec, tmp)
        if not args.no_mirror:
            a, b, per_step = mirror_overhead(tmp, 200 if not args.quick else 60)
            print(
                f"\nhook loop (12 layers, 49 tensors, stats only, every step, 1 torch thread): "
                f"median step {a * 1e3:.2f} ms without mirror, {b * 1e3:.2f} ms with "
                f"tensorboard_dir ({(b / a - 1) * 100:+.1f}%); the mirror thread spent "
                f"{per_step * 1e3:.2f} ms per exported step"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
