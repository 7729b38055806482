"""Fused statistics vs. op-by-op NumPy / torch, and vs. the machine's read bandwidth.

Prints, in one run:
  (c) the streaming read bandwidth of this machine (the best of several pure-read measures);
  then for (1) a model-like set of 300 float32 tensors (1K..4M elements, ~100M in all),
  (2) one 256 MiB float32 tensor and (3) the same 256 MiB as bfloat16 and as float16:
  tensorvigil with 2 threads (no histogram, 64-bin histogram with a fixed and an automatic
  range, exponent histogram); (a) NumPy computing the same statistics op by op; (b) torch op by
  op (the smdebug-style baseline; skipped without torch). GB/s counts the input's bytes.

Then (4) the per-call cost for small tensors (a training hook's biases, scalars and losses):
tv.compute_stats on 8- and 4096-element float32 arrays, the native binding alone
(tensorvigil._core, no Python-side conversion), and compute_stats_many on 1000 tiny arrays.

Targets (PASS/MISS): >= 50x NumPy; >= 70% of read bandwidth without histogram; >= 25% with a
64-bin histogram; bfloat16/float16 >= 50% of read bandwidth (bytes); small tensors: a
compute_stats call on 8 elements <= 2 us, compute_stats_many of 1000 tiny arrays <= 2 ms.
The load average is printed at the start and the end: other processes skew every number.

Usage: python benchmarks/bench_stats.py [--quick] [--threads 2] [--small]
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import timeit as _timeit
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import machine_info, timeit  # noqa: E402

import tensorvigil as tv  # noqa: E402

try:
    import ml_dtypes
except ImportError:  # pragma: no cover
    ml_dtypes = None

MiB = 1 << 20


# ---------------------------------------------------------------------------------------------
# Read bandwidth


def read_bandwidth(nbytes: int, threads: int, repeat: int) -> dict[str, float]:
    """GB/s of pure reads: NumPy reductions that release the GIL, one Python thread per core.

    np.max over a uint8/int64 view is a SIMD loop that is limited by memory, not arithmetic;
    the best of them is the machine's read bandwidth as far as NumPy can tell.
    """
    buf = np.ones(nbytes // 8, np.int64)  # touched, so the pages exist

    def split_run(fn):
        parts = np.array_split(buf.view(np.uint8), threads)

        def run():
            ts = [threading.Thread(target=fn, args=(p,)) for p in parts]
            for t in ts:
                t.start()
            for t in ts:
                t.join()

        return run

    out = {
        f"np.max(uint8 view), {threads} threads": timeit(
            split_run(lambda p: np.max(p)), repeat
        ).gbps(buf.nbytes),
        f"np.max(int64 view), {threads} threads": timeit(
            split_run(lambda p: np.max(p.view(np.int64))), repeat
        ).gbps(buf.nbytes),
        "np.add.reduce(float32), 1 thread": timeit(
            lambda: np.add.reduce(buf.view(np.float32)), repeat
        ).gbps(buf.nbytes),
    }
    return out


# ---------------------------------------------------------------------------------------------
# Baselines: the same statistics, one operation at a time


def numpy_stats(x: np.ndarray, shortcut: bool = False) -> tuple:
    """The statistics op by op. shortcut: skip the finite filter when there is no NaN/Inf."""
    if x.dtype != np.float32 and x.dtype != np.float64:
        x = x.astype(np.float32)  # numpy has no fast bf16/f16 loops
    nan = int(np.isnan(x).sum())
    inf = np.isinf(x)
    posinf = int((inf & (x > 0)).sum())
    neginf = int(inf.sum()) - posinf
    zeros = int((x == 0).sum())
    fin = x if (shortcut and not (nan or posinf or neginf)) else x[np.isfinite(x)]
    if fin.size == 0:
        return nan, posinf, neginf, zeros
    mn, mx = np.nanmin(fin), np.nanmax(fin)
    mean = fin.mean(dtype=np.float64)
    var = fin.var(dtype=np.float64)
    a = np.abs(fin)
    return nan, posinf, neginf, zeros, mn, mx, mean, var, a.sum(dtype=np.float64), a.max()


def torch_stats(t) -> tuple:
    import torch

    nan = int(torch.isnan(t).sum())
    inf = torch.isinf(t)
    posinf = int((inf & (t > 0)).sum())
    neginf = int(inf.sum()) - posinf
    zeros = int((t == 0).sum())
    fin = t[torch.isfinite(t)]
    if fin.numel() == 0:
        return nan, posinf, neginf, zeros
    d = fin.double()
    var, mean = torch.var_mean(d, correction=0)
    a = fin.abs()
    return (nan, posinf, neginf, zeros, fin.min(), fin.max(), mean, var, a.double().sum(), a.max())


# ---------------------------------------------------------------------------------------------


def model_like_sizes(n_tensors: int, total: int, rng: np.random.Generator) -> list[int]:
    lo, hi = 1_000, 4_000_000
    s = np.exp(rng.uniform(np.log(lo), np.log(hi), n_tensors))
    s = np.clip(s * (total / s.sum()), lo, hi)
    return [int(v) for v in s]


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def load_avg() -> str:
    try:
        one, five, fifteen = os.getloadavg()
        return f"load average {one:.2f} {five:.2f} {fifteen:.2f}"
    except OSError:  # pragma: no cover
        return "load average n/a"


def per_call(fn, number: int, repeat: int = 7) -> float:
    """Best seconds per call of fn over `repeat` runs of `number` calls."""
    fn()
    return min(_timeit.repeat(fn, number=number, repeat=repeat)) / number


def small_tensors(threads: int) -> list[tuple[str, str, bool]]:
    """(4) Per-call cost for tiny tensors; returns (target, measured, ok) rows."""
    from tensorvigil import _core

    print(f"(4) small tensors (float32, no histogram, default threads = {tv.get_num_threads()})")
    x8 = np.ones(8, np.float32)
    x4k = np.random.default_rng(1).standard_normal(4096).astype(np.float32)
    rows = {
        "tv.compute_stats, 8 elements": per_call(lambda: tv.compute_stats(x8), 20_000),
        "tv.compute_stats, 4096 elements": per_call(lambda: tv.compute_stats(x4k), 20_000),
        "_core.compute_stats (binding only), 8": per_call(
            lambda: _core.compute_stats(x8, 0, None, False, None, 0), 20_000
        ),
        "_core.compute_stats (binding only), 4096": per_call(
            lambda: _core.compute_stats(x4k, 0, None, False, None, 0), 20_000
        ),
        "np.add.reduce, 8 elements (reference)": per_call(lambda: np.add.reduce(x8), 20_000),
    }
    tiny = [np.full(1 + i % 16, i, np.float32) for i in range(1000)]
    many = {
        "tv.compute_stats_many, 1000 tiny": per_call(lambda: tv.compute_stats_many(tiny), 20, 5),
        f"tv.compute_stats_many, 1000 tiny, {threads} thr": per_call(
            lambda: tv.compute_stats_many(tiny, num_threads=threads), 20, 5
        ),
        "_core.compute_stats_many, 1000 tiny": per_call(
            lambda: _core.compute_stats_many(tiny), 20, 5
        ),
        "1000 x tv.compute_stats, tiny": per_call(
            lambda: [tv.compute_stats(t) for t in tiny], 5, 5
        ),
    }
    for name, t in rows.items():
        print(f"    {name:<44s} {t * 1e6:8.2f} us")
    for name, t in many.items():
        print(f"    {name:<44s} {t * 1e6:8.1f} us  ({t * 1e9 / 1000:6.0f} ns per tensor)")
    print()
    t8 = rows["tv.compute_stats, 8 elements"]
    c8 = rows["_core.compute_stats (binding only), 8"]
    tm = many["tv.compute_stats_many, 1000 tiny"]
    return [
        ("tv.compute_stats, 8 elements <= 2 us", f"{t8 * 1e6:.2f} us", t8 <= 2e-6),
        ("_core.compute_stats, 8 elements <= 2 us", f"{c8 * 1e6:.2f} us", c8 <= 2e-6),
        ("compute_stats_many, 1000 tiny <= 2 ms", f"{tm * 1e3:.2f} ms", tm <= 2e-3),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small smoke run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--small", action="store_true", help="only the small-tensor section (4)")
    args = ap.parse_args()
    threads = args.threads
    quick = args.quick
    rep = 2 if quick else 5
    base_rep = 1 if quick else 2
    big_bytes = (16 if quick else 256) * MiB
    n_tensors, total = (30, 5_000_000) if quick else (300, 100_000_000)

    print("== tensorvigil fused statistics benchmark" + (" (--quick)" if quick else ""))
    print(machine_info())
    print(f"tensorvigil threads: {threads}")
    print(f"start: {load_avg()} ({os.cpu_count()} CPUs)\n")
    if args.small:
        for target, got, ok in small_tensors(threads):
            print(f"  {verdict(ok)}  {'(4) small tensors':<26s} {target:<40s} {got}")
        print(f"end: {load_avg()}")
        return 0

    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:
        torch = None

    rng = np.random.default_rng(0)
    x32 = rng.standard_normal(big_bytes // 4, dtype=np.float32)
    x32 *= 0.02  # all data ~ N(0, 0.02): weight-like
    cases = []
    sizes = model_like_sizes(n_tensors, total, rng)
    model = [rng.standard_normal(n, dtype=np.float32) * 0.02 for n in sizes]
    mib = big_bytes // MiB
    title = f"(1) model-like set: {len(model)} float32 tensors, {sum(sizes) / 1e6:.1f}M elements"
    cases.append((title, model, "f32"))
    cases.append((f"(2) one float32 tensor, {mib} MiB", [x32], "f32"))
    if ml_dtypes is not None:
        xb = (rng.standard_normal(big_bytes // 2, dtype=np.float32) * 0.02).astype(
            ml_dtypes.bfloat16
        )
        cases.append((f"(3a) one bfloat16 tensor, {mib} MiB", [xb], "bf16"))
    xh = (rng.standard_normal(big_bytes // 2, dtype=np.float32) * 0.02).astype(np.float16)
    cases.append((f"(3b) one float16 tensor, {mib} MiB", [xh], "f16"))

    # (c) bandwidth: NumPy pure reads, and our kernel's best case (float32, no histogram).
    bw = read_bandwidth(big_bytes, threads, rep + 2)
    ours_best = timeit(lambda: tv.compute_stats(x32, num_threads=threads), rep).gbps(x32.nbytes)
    print("(c) streaming read bandwidth")
    for k, v in bw.items():
        print(f"    {k:<40s} {v:6.1f} GB/s")
    print(f"    {'tensorvigil stats, float32, no hist':<40s} {ours_best:6.1f} GB/s")
    read_bw = max(max(bw.values()), ours_best)
    print(f"    => read bandwidth so far: {read_bw:.1f} GB/s (the best of the above)\n")

    measured = []  # (title, kind, nbytes, rows) for the verdicts, made at the end
    for title, xs, kind in cases:
        nbytes = sum(x.nbytes for x in xs)
        print(title + f"  [{nbytes / MiB:.0f} MiB]")

        def run(xs=xs, **kw):
            return lambda: tv.compute_stats_many(xs, num_threads=threads, **kw)

        rows = {
            "tensorvigil, no histogram": timeit(run(), rep),
            "tensorvigil, 64-bin hist, fixed range": timeit(
                run(hist_bins=64, hist_range=(-0.1, 0.1)), rep
            ),
            "tensorvigil, 64-bin hist, auto range": timeit(run(hist_bins=64), rep),
            "tensorvigil, exponent hist": timeit(run(exp_hist=True), rep),
        }
        t_np = timeit(lambda xs=xs: [numpy_stats(x) for x in xs], base_rep, warmup=0)
        rows["(a) NumPy op by op"] = t_np
        t_np2 = timeit(lambda xs=xs: [numpy_stats(x, True) for x in xs], base_rep, warmup=0)
        rows["(a') NumPy op by op, no finite filter"] = t_np2
        if torch is not None:
            if kind == "bf16":
                ts = [torch.from_numpy(x.view(np.int16)).view(torch.bfloat16) for x in xs]
            else:
                ts = [torch.from_numpy(x) for x in xs]
            rows["(b) torch op by op"] = timeit(
                lambda ts=ts: [torch_stats(t) for t in ts], base_rep, warmup=0
            )
        for name, t in rows.items():
            extra = ""
            if name.startswith("tensorvigil"):
                extra = f"  {t_np.best / t.best:6.1f}x (a)  {t_np2.best / t.best:6.1f}x (a')"
            print(
                f"    {name:<40s} {t.gbps(nbytes):7.2f} GB/s  ({t.best * 1e3:8.1f} ms best, "
                f"{t.median * 1e3:8.1f} ms median){extra}"
            )
        if kind == "f32":  # our best case bounds the read bandwidth from below, too
            read_bw = max(read_bw, rows["tensorvigil, no histogram"].gbps(nbytes))
        measured.append((title, kind, nbytes, rows))
        print()

    small = small_tensors(threads)

    print(f"== targets (read bandwidth {read_bw:.1f} GB/s: the best read rate seen in this run;")
    print("   (a) = NumPy op by op with the finite filter x[np.isfinite(x)] always applied,")
    print("   (a') = NumPy without it when the data has no NaN/Inf; both are listed)")
    for title, kind, nbytes, rows in measured:
        short = title.split(":")[0].split(",")[0]
        plain = rows["tensorvigil, no histogram"]
        checks = []
        for base in ("(a) NumPy op by op", "(a') NumPy op by op, no finite filter"):
            x = rows[base].best / plain.best
            checks.append((f">= 50x {base.split(' ')[0]} NumPy", f"{x:.0f}x", x >= 50))
        frac = plain.gbps(nbytes) / read_bw
        if kind == "f32":
            checks.append((">= 70% read BW, no hist", f"{100 * frac:.0f}%", frac >= 0.70))
            for label in ("fixed", "auto"):
                t = rows[f"tensorvigil, 64-bin hist, {label} range"]
                f = t.gbps(nbytes) / read_bw
                checks.append(
                    (f">= 25% read BW, 64-bin ({label} range)", f"{100 * f:.0f}%", f >= 0.25)
                )
        else:
            checks.append((">= 50% read BW (bytes), no hist", f"{100 * frac:.0f}%", frac >= 0.50))
        for target, got, ok in checks:
            print(f"  {verdict(ok)}  {short:<26s} {target:<40s} {got}")
    for target, got, ok in small:
        print(f"  {verdict(ok)}  {'(4) small tensors':<26s} {target:<40s} {got}")
    print(f"end: {load_avg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
