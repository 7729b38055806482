#!/usr/bin/env python3
"""Many-rank benchmark: open a large multi-rank run and build one tensor's statistics table.

Target (clusters issue): a run of 256 ranks x 1,000 steps x 200 tensors of statistics, written
by a synthetic writer; opening it and building the statistics table of one tensor across all
ranks and steps takes <= 2 s locally; and how that grows with ranks and with steps.

1. **Write** (skipped when ``--dir`` already holds this layout): every rank's stream is written
   with the real C++ writer (``_core.StreamWriter.write_stats``: statistics only, no tensors),
   ``--procs`` processes in parallel. Shards roll every ``--steps-per-shard`` steps (as
   ``roll_seconds`` would roll them in a live run), and each sealed shard gets its tensor index.
   51.2 M records take about 29 GB of disk.
2. **Measure**, each in a fresh Python process, best of ``--rounds`` (page cache warm; the first
   round's time is printed too): ``run = tv.open(RUN)`` and ``run.stats(TENSOR)`` (a
   ``pyarrow.Table`` with one row per rank and step; pyarrow imported before the clock
   starts, its import time printed apart).
3. **Growth**: the same on runs of 32/64/128/256 ranks (symlinks to the first rank
   directories) and of 125/250/500/1,000 steps (symlinks to the first shards of each rank),
   as ratios to the smallest, from this one run.
4. **Baseline**: the reader without tensor indexes (``lazy=False``: every shard's own index
   is decoded, all records of all tensors) on ``--eager-ranks`` ranks, against the lazy reader
   on the same ranks, through the same native calls.

Usage::

    python benchmarks/bench_ranks.py                      # the target layout (~5 min to write)
    python benchmarks/bench_ranks.py --ranks 16 --steps 100 --tensors 50   # a quick look
    python benchmarks/bench_ranks.py --dir /data/tv-ranks --keep            # keep the files
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
import time
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from _timing import machine_info  # noqa: E402

KINDS = ("weight", "bias", "weight/grad", "bias/grad")


def tensor_names(n: int) -> list[str]:
    return [f"model.layers.{i // 4:03d}.proj.{KINDS[i % 4]}" for i in range(n)]


def shape_of(i: int) -> list[int]:
    return [1024, 1024] if i % 2 == 0 else [1024]


def bytes_per_step(names: list[str]) -> int:
    """Shard bytes one step adds: stats-only TENSOR frames (header, meta without histograms)
    and one COMMIT frame (FORMAT.md §4.3, §5.4, §5.5, §7.2)."""
    frames = sum(32 + 38 + len(n.encode()) + 8 * len(shape_of(i)) + 89 for i, n in enumerate(names))
    return frames + 32 + 32


def write_ranks(args: tuple) -> float:
    run, ranks, steps, ntensors, per_shard = args
    from tensorvigil import _core

    names = tensor_names(ntensors)
    shapes = [shape_of(i) for i in range(ntensors)]
    # A few statistics per tensor kind, varied by step, as a model's would be.
    variants = []
    for v in range(16):
        row = []
        for i in range(ntensors):
            numel = 1024 * 1024 if i % 2 == 0 else 1024
            scale = 0.02 * (1 + v / 16) * (1 + (i % 7) / 10)
            row.append(
                _core.Stats.from_parts(
                    numel=numel,
                    nan=0,
                    posinf=0,
                    neginf=0,
                    zeros=v,
                    min=-4 * scale,
                    max=4 * scale,
                    mean=scale / 100,
                    m2=numel * scale * scale,
                    abs_sum=numel * scale * 0.8,
                    abs_max=4 * scale,
                )
            )
        variants.append(row)
    # Roll right after the per_shard-th commit of each shard.
    roll = int(bytes_per_step(names) * (per_shard - 0.5))
    t0 = time.perf_counter()
    for rank in ranks:
        w = _core.StreamWriter(run, rank, roll_bytes=roll, roll_seconds=1e9, fsync=False, threads=1)
        write = w.write_stats
        for step in range(steps):
            stats = variants[(step + rank) % 16]
            for i in range(ntensors):
                write(names[i], step, shapes[i], "float32", stats[i])
            w.commit(step)
        w.close()
    return time.perf_counter() - t0


def generate(run: str, ranks: int, steps: int, ntensors: int, per_shard: int, procs: int) -> None:
    from tensorvigil.store.writer import write_manifest

    marker = os.path.join(run, "bench_ranks.json")
    layout = {"ranks": ranks, "steps": steps, "tensors": ntensors, "steps_per_shard": per_shard}
    if os.path.exists(marker) and json.load(open(marker)) == layout:
        print(f"reusing the run in {run}")
        return
    shutil.rmtree(run, ignore_errors=True)
    write_manifest(run)
    free = shutil.disk_usage(run).free
    need = ranks * steps * ntensors * 570
    if need > free * 0.9:
        sys.exit(f"about {need / 1e9:.0f} GB are needed in {run}, {free / 1e9:.0f} GB are free")
    print(
        f"writing {ranks} ranks x {steps} steps x {ntensors} tensors "
        f"({ranks * steps * ntensors / 1e6:.1f} M records, ~{need / 1e9:.0f} GB) "
        f"with {procs} processes ...",
        flush=True,
    )
    t0 = time.perf_counter()
    jobs = [(run, list(range(p, ranks, procs)), steps, ntensors, per_shard) for p in range(procs)]
    with get_context("fork").Pool(procs) as pool:
        pool.map(write_ranks, jobs)
    wall = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in Path(run).rglob("shard-*") if f.is_file())
    tvt = sum(f.stat().st_size for f in Path(run).rglob("shard-*.tvt"))
    print(
        f"  written in {wall:.0f} s ({ranks * steps * ntensors / wall / 1e6:.2f} M records/s); "
        f"{size / 1e9:.1f} GB, of which tensor indexes {tvt / 1e9:.1f} GB",
        flush=True,
    )
    # The last shard may be a small one holding the END frame alone (rolled at the last commit).
    nshards = len(
        [f for f in Path(run, "rank-00000").glob("shard-*.tvs") if f.stat().st_size > 4096]
    )
    want = -(-steps // per_shard)
    if nshards != want:
        sys.exit(f"rank 0 has {nshards} shards, expected {want}: the roll size estimate is off")
    with open(marker, "w") as f:
        json.dump(layout, f)


def subset(run: str, out: str, ranks: int, shards: int | None) -> str:
    """A run of the first `ranks` ranks (and, with `shards`, their first shards) by symlinks."""
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out)
    os.symlink(os.path.join(run, "manifest.json"), os.path.join(out, "manifest.json"))
    for r in range(ranks):
        name = f"rank-{r:05d}"
        src = os.path.join(run, name)
        if shards is None:
            os.symlink(src, os.path.join(out, name))
            continue
        os.makedirs(os.path.join(out, name))
        for seq in range(shards):
            for ext in ("tvs", "tvt"):
                f = f"shard-{seq:08d}.{ext}"
                os.symlink(os.path.join(src, f), os.path.join(out, name, f))
    return out


PROBE = r"""
import json, os, resource, sys, time
import pyarrow  # imported before the clock starts (its import time is reported apart)
import tensorvigil as tv
from tensorvigil import _core
path, name, mode = sys.argv[1], sys.argv[2], sys.argv[3]
out = {}
if mode == "api":
    t0 = time.perf_counter()
    run = tv.open(path)
    t1 = time.perf_counter()
    table = run.stats(name)
    t2 = time.perf_counter()
    out.update(open_s=t1 - t0, stats_s=t2 - t1, rows=table.num_rows,
               ranks=len(set(table.column("rank").to_pylist())),
               steps=len(set(table.column("step").to_pylist())))
else:  # native reader, lazy or eager
    t0 = time.perf_counter()
    r = _core.RunReader(path, True, mode == "lazy")
    t1 = time.perf_counter()
    cols = r.stats_columns(name_ids=[r.name_id(name)])
    t2 = time.perf_counter()
    out.update(open_s=t1 - t0, stats_s=t2 - t1, rows=len(cols["step"]))
out["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
"""


def evict(path: str) -> None:
    """Drops the run's files from the page cache (POSIX_FADV_DONTNEED; no root needed)."""
    for root, _dirs, files in os.walk(path, followlinks=True):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def probe(path: str, name: str, mode: str, rounds: int, cold: bool = False) -> dict:
    results = []
    for _ in range(rounds):
        if cold:
            evict(path)
        p = subprocess.run(
            [sys.executable, "-c", PROBE, path, name, mode],
            capture_output=True,
            text=True,
            check=False,
        )
        if p.returncode != 0:
            sys.exit(f"probe failed on {path}:\n{p.stderr}")
        results.append(json.loads(p.stdout))
    totals = [r["open_s"] + r["stats_s"] for r in results]
    best = results[totals.index(min(totals))]
    return {
        **best,
        "total_s": min(totals),
        "median_s": statistics.median(totals),
        "first_s": totals[0],
    }


def pyarrow_import_s() -> float:
    code = "import time; t = time.perf_counter(); import pyarrow; print(time.perf_counter() - t)"
    return min(
        float(
            subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, check=True
            ).stdout
        )
        for _ in range(3)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=256)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--tensors", type=int, default=200)
    ap.add_argument("--steps-per-shard", type=int, default=125)
    ap.add_argument("--procs", type=int, default=2, help="writer processes")
    ap.add_argument("--rounds", type=int, default=3, help="fresh processes per measurement")
    ap.add_argument(
        "--eager-ranks",
        type=int,
        default=32,
        help="ranks for the baseline without tensor indexes (0: skip)",
    )
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "tv-bench-ranks"))
    ap.add_argument("--keep", action="store_true", help="keep the written run")
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--cold-only", action="store_true", help="measure the target layout only")
    args = ap.parse_args()
    if args.steps % args.steps_per_shard:
        sys.exit("--steps must be a multiple of --steps-per-shard")

    print(machine_info())
    os.makedirs(args.dir, exist_ok=True)
    run = os.path.join(args.dir, "run")
    generate(run, args.ranks, args.steps, args.tensors, args.steps_per_shard, args.procs)
    name = tensor_names(args.tensors)[args.tensors // 2]
    print(f"tensor: {name}; pyarrow import (not in the times below): {pyarrow_import_s():.3f} s")
    report: dict = {"layout": vars(args), "tensor": name}

    def show(label: str, r: dict) -> None:
        print(
            f"  {label:<24} open {r['open_s']:.3f} s + stats {r['stats_s']:.3f} s = "
            f"{r['total_s']:.3f} s (median {r['median_s']:.3f}, first {r['first_s']:.3f}); "
            f"{r['rows']:,} rows, RSS {r['rss_mb']:.0f} MB",
            flush=True,
        )

    print("\nTarget: tv.open(run) + run.stats(tensor), best of", args.rounds)
    full = probe(run, name, "api", args.rounds)
    show(f"{args.ranks} ranks x {args.steps} steps", full)
    assert full["rows"] == args.ranks * args.steps, full
    verdict = "PASS" if full["total_s"] <= 2.0 else "MISS"
    print(f"  target <= 2 s: {verdict}")
    report["target"] = full
    cold = probe(run, name, "api", args.rounds, cold=True)
    show("cold page cache", cold)
    print("  (every file of the run dropped from the page cache before each round)")
    report["target_cold"] = cold

    if args.cold_only:
        return
    sub = os.path.join(args.dir, "subsets")

    def growth(what: str, sizes: list[int], full_size: int, make) -> list:
        """Measures each size (the full one is `full`); prints times and ratios to the first."""
        out = []
        for n in sizes:
            r = full if n == full_size else probe(make(n), name, "api", args.rounds)
            out.append((n, r))
            show(f"{n} {what}", r)
        n0, r0 = out[0]
        for n, r in out:
            print(
                f"    {n:>5} {what}: x{n / n0:<5.3g} -> x{r['total_s'] / r0['total_s']:.2f} time "
                f"(open x{r['open_s'] / r0['open_s']:.2f}, stats x{r['stats_s'] / r0['stats_s']:.2f})"
            )
        return out

    def quarters(n: int) -> list[int]:
        return sorted({max(1, n // 8), max(1, n // 4), max(1, n // 2), n})

    print("\nGrowth with ranks (all steps):")
    growth_r = growth(
        "ranks",
        quarters(args.ranks),
        args.ranks,
        lambda n: subset(run, os.path.join(sub, f"r{n}"), n, None),
    )
    print("\nGrowth with steps (all ranks):")
    per = args.steps_per_shard
    growth_s = growth(
        "steps",
        [k * per for k in quarters(args.steps // per)],
        args.steps,
        lambda s: subset(run, os.path.join(sub, f"s{s}"), args.ranks, s // per),
    )
    report["growth_ranks"] = growth_r
    report["growth_steps"] = growth_s

    if args.eager_ranks:
        n = min(args.eager_ranks, args.ranks)
        path = run if n == args.ranks else subset(run, os.path.join(sub, f"r{n}"), n, None)
        print(
            f"\nBaseline: native reader on {n} ranks x {args.steps} steps, with and without "
            "tensor indexes"
        )
        lazy = probe(path, name, "lazy", args.rounds)
        eager = probe(path, name, "eager", 1 if n > 64 else args.rounds)
        show("lazy (tensor indexes)", lazy)
        show("eager (shard indexes)", eager)
        print(
            f"  lazy is {eager['total_s'] / lazy['total_s']:.0f}x faster "
            f"and uses {eager['rss_mb'] / lazy['rss_mb']:.1f}x less memory"
        )
        report["baseline"] = {"ranks": n, "lazy": lazy, "eager": eager}

    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    shutil.rmtree(sub, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
