#!/usr/bin/env python3
"""Store benchmark: tensorvigil's tensor store against common checkpoint formats.

One run prints (see benchmarks/README.md, section "bench_store.py"):

  0. the machine (CPU, cores, RAM, disk, load, library versions);
  1. the data: ~400 MB of model-like float32 tensors (fixed seed), gaussian with a per-tensor
     scale, plus the same tensors rounded to bfloat16 and widened back to float32;
  2. raw disk bandwidth: ``dd ... conv=fsync`` and a Python write + fsync of the data;
  3. per format: durable write throughput (MB/s of raw tensor bytes; the time includes the
     library's save, close and an fsync of every file written), on-disk size and ratio, and
     read-back throughput (every tensor back into memory), warm page cache and, where
     ``/proc/sys/vm/drop_caches`` is writable, cold;
  4. compression targets: encoder pipeline speed (write()+flush(), fsync off, nothing blocks)
     >= 1 GB/s on 2 threads, ratio within 2% of blosc2 zstd+shuffle clevel 1, raw-codec
     durable write >= 80% of dd;
  5. random access into a ~10 GB run: one tensor at one step (warm), and tv.open();
  6. statistics table: run.stats() over 1M (step, tensor) records, and tv.open() of that run;
  7. a summary of every target with PASS/MISS.

MB is 10**6 bytes throughout. Usage::

    python benchmarks/bench_store.py            # full run, ~5-10 min on 2 cores
    python benchmarks/bench_store.py --quick    # smoke test, < 1 min
    python benchmarks/bench_store.py --out /mnt/nvme/tv-bench --skip-big
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import numpy as np

MB = 1e6
GB = 1e9

# ----------------------------------------------------------------------------------------
# timing: a tiny local timer (wall and CPU of one block, each format needs its own setup and
# teardown per run, which _timing.timeit does not fit); _timing.machine_info labels the machine


class Timer:
    """Wall and process-CPU time (all threads) of a ``with`` block."""

    def __enter__(self) -> Timer:
        self.c0 = time.process_time()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.t0
        self.cpu = time.process_time() - self.c0


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def log(msg: str = "") -> None:
    print(msg, flush=True)


class Contention:
    """CPU time other processes used while a section ran (from /proc/stat minus this process),
    as a share of the whole machine: other work on the machine skews the timings."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, float]] = []
        self.cur: tuple | None = None

    @staticmethod
    def sample() -> tuple[float, float, float]:
        tck = os.sysconf("SC_CLK_TCK")
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
            busy = (sum(v[:8]) - v[3] - v[4]) / tck  # all but idle and iowait
        except (OSError, ValueError, IndexError):
            busy = float("nan")
        t = os.times()
        return time.perf_counter(), busy, t.user + t.system

    def section(self, name: str | None) -> None:
        now = self.sample()
        if self.cur is not None:
            cname, (w0, b0, s0) = self.cur
            wall = now[0] - w0
            other = max(0.0, (now[1] - b0) - (now[2] - s0))
            self.rows.append((cname, wall, other / max(1e-9, wall * (os.cpu_count() or 1))))
        self.cur = (name, now) if name is not None else None

    def report(self) -> None:
        self.section(None)
        log(
            "CPU used by OTHER processes while each section ran (share of all cores; > ~10% skews timings):"
        )
        log("  " + "; ".join(f"{n} {100 * f:.0f}% ({w:.0f} s)" for n, w, f in self.rows))


CONT = Contention()


# ----------------------------------------------------------------------------------------
# machine


def read_first(path: str, key: str) -> str:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def fs_type(path: str) -> str:
    best, typ = "", "?"
    try:
        real = os.path.realpath(path)
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 2 and (
                    real == parts[1] or real.startswith(parts[1].rstrip("/") + "/")
                ):
                    if len(parts[1]) >= len(best):
                        best, typ = parts[1], f"{parts[2]} on {parts[0]} ({parts[1]})"
    except OSError:
        pass
    return typ


def versions() -> str:
    out = [f"python {platform.python_version()}", f"numpy {np.__version__}"]
    for mod in (
        "tensorvigil",
        "torch",
        "safetensors",
        "h5py",
        "zarr",
        "numcodecs",
        "blosc2",
        "pyarrow",
    ):
        try:
            m = __import__(mod)
            out.append(f"{mod} {getattr(m, '__version__', '?')}")
        except Exception as e:  # noqa: BLE001 - report, do not fail
            out.append(f"{mod} missing ({type(e).__name__})")
    return ", ".join(out)


def machine_report(out_dir: str) -> None:
    import tensorvigil as tv

    du = shutil.disk_usage(out_dir)
    mem = read_first("/proc/meminfo", "MemTotal")
    try:
        aff = len(os.sched_getaffinity(0))
    except AttributeError:
        aff = os.cpu_count()
    log("== machine")
    log(
        f"cpu       : {read_first('/proc/cpuinfo', 'model name')}; {os.cpu_count()} logical cores ({aff} usable)"
    )
    log(f"memory    : {mem}")
    log(f"kernel    : {platform.platform()}")
    log(
        f"out dir   : {out_dir}: {fs_type(out_dir)}; {du.free / GB:.1f} GB free of {du.total / GB:.1f} GB"
    )
    log(f"load avg  : {' '.join(f'{x:.2f}' for x in os.getloadavg())} (1/5/15 min) at start")
    log(f"versions  : {versions()}")
    log(f"tensorvigil from {os.path.dirname(tv.__file__)}")
    try:  # the shared label of benchmarks/_timing.py, when it is there
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from _timing import machine_info

        log("shared    : " + machine_info().replace("\n", "; "))
    except ImportError:
        pass


# ----------------------------------------------------------------------------------------
# data


def make_model_tensors(total_bytes: int, seed: int) -> list[tuple[str, np.ndarray]]:
    """Model-like float32 tensors: per layer a weight matrix with log-uniform size
    (1K..4M elements), N(0, s) with a per-tensor s around 0.02, a bias N(0, s/4); every 4th
    layer also a norm weight 1 + N(0, 0.02) and a norm bias. Total >= total_bytes."""
    rng = np.random.default_rng(seed)
    out: list[tuple[str, np.ndarray]] = []
    total, layer = 0, 0
    cols_choices = np.array([64, 128, 256, 512, 768, 1024, 2048, 4096])
    while total < total_bytes:
        numel = int(np.exp(rng.uniform(np.log(1_000), np.log(4_000_000))))
        cols = int(rng.choice(cols_choices[cols_choices <= max(64, numel // 4)]))
        rows = max(1, numel // cols)
        scale = float(0.02 * np.exp(rng.normal(0.0, 0.5)))
        w = rng.standard_normal((rows, cols), dtype=np.float32)
        w *= np.float32(scale)
        b = rng.standard_normal(rows, dtype=np.float32)
        b *= np.float32(scale / 4)
        out += [(f"layers.{layer}.weight", w), (f"layers.{layer}.bias", b)]
        total += w.nbytes + b.nbytes
        if layer % 4 == 0:
            g = rng.standard_normal(cols, dtype=np.float32)
            g *= np.float32(0.02)
            g += np.float32(1.0)
            nb = rng.standard_normal(cols, dtype=np.float32)
            nb *= np.float32(0.01)
            out += [(f"layers.{layer}.norm.weight", g), (f"layers.{layer}.norm.bias", nb)]
            total += g.nbytes + nb.nbytes
        layer += 1
    return out


def bf16_rounded(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 (round to nearest even) -> float32, as a bf16-trained weight cast up."""
    u = a.view(np.uint32)
    r = (u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) & np.uint32(0xFFFF0000)
    return r.view(np.float32)


def nbytes_of(items: list[tuple[str, np.ndarray]]) -> int:
    return sum(a.nbytes for _, a in items)


def subset(items: list[tuple[str, np.ndarray]], max_bytes: int) -> list[tuple[str, np.ndarray]]:
    """Every k-th tensor so that the subset has about max_bytes (keeps the size mix)."""
    total = nbytes_of(items)
    if total <= max_bytes:
        return items
    k = int(np.ceil(total / max_bytes))
    return items[::k]


# ----------------------------------------------------------------------------------------
# files


def fsync_tree(path: str) -> None:
    """fsyncs every file under path (or path itself) and their directories."""
    if os.path.isfile(path):
        paths, dirs = [path], [os.path.dirname(path) or "."]
    else:
        paths, dirs = [], [path]
        for root, dnames, fnames in os.walk(path):
            paths += [os.path.join(root, f) for f in fnames]
            dirs += [os.path.join(root, d) for d in dnames]
    for p in paths + dirs:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def tree_bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def fresh_dir(path: str) -> str:
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


def drop_caches() -> bool:
    """Drops the page cache (needs root; sync first). False when not permitted."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def can_drop_caches() -> bool:
    return os.access("/proc/sys/vm/drop_caches", os.W_OK) and drop_caches()


# ----------------------------------------------------------------------------------------
# raw disk bandwidth


def dd_bandwidth(out_dir: str, nbytes: int) -> float:
    path = os.path.join(out_dir, "dd.bin")
    count = max(1, int(np.ceil(nbytes / (16 << 20))))
    try:
        p = subprocess.run(
            ["dd", "if=/dev/zero", f"of={path}", "bs=16M", f"count={count}", "conv=fsync"],
            capture_output=True,
            text=True,
            check=True,
        )
        # "419430400 bytes (419 MB, 400 MiB) copied, 1.94701 s, 215 MB/s"
        m = re.search(r"^(\d+) bytes.*copied, ([\d.,]+) s", p.stderr, re.M)
        if not m:
            raise RuntimeError(f"cannot parse dd output: {p.stderr!r}")
        return int(m.group(1)) / float(m.group(2).replace(",", ".")) / MB
    finally:
        if os.path.exists(path):
            os.remove(path)


def python_write_fsync(out_dir: str, items: list[tuple[str, np.ndarray]]) -> float:
    path = os.path.join(out_dir, "py.bin")
    try:
        with Timer() as t:
            with open(path, "wb", buffering=0) as f:
                for _, a in items:
                    f.write(memoryview(a).cast("B"))
                os.fsync(f.fileno())
        return nbytes_of(items) / t.wall / MB
    finally:
        os.remove(path)


# ----------------------------------------------------------------------------------------
# formats: write(path, items) and read(path, names) -> {name: ndarray}


def tv_write(codec: str) -> Callable:
    def write(path: str, items: list[tuple[str, np.ndarray]]) -> None:
        import tensorvigil as tv

        w = tv.StoreWriter(path, codec=codec, fsync=True)
        for n, a in items:
            w.write(n, 0, a)
        w.commit(0)
        w.close()

    return write


def tv_read(path: str, names: list[str]) -> dict:
    import tensorvigil as tv

    run = tv.open(path)
    return {n: run.tensor(n).value(0) for n in names}


def st_write(path: str, items) -> None:
    from safetensors.numpy import save_file

    save_file(dict(items), os.path.join(path, "model.safetensors"))


def st_read(path: str, names) -> dict:
    from safetensors.numpy import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def npz_write(compressed: bool) -> Callable:
    def write(path: str, items) -> None:
        (np.savez_compressed if compressed else np.savez)(
            os.path.join(path, "model.npz"), **dict(items)
        )

    return write


def npz_read(path: str, names) -> dict:
    with np.load(os.path.join(path, "model.npz")) as z:
        return {n: z[n] for n in names}


def h5_write(**kw: Any) -> Callable:
    def write(path: str, items) -> None:
        import h5py

        with h5py.File(os.path.join(path, "model.h5"), "w") as f:
            for n, a in items:
                f.create_dataset(n, data=a, **kw)

    return write


def h5_read(path: str, names) -> dict:
    import h5py

    with h5py.File(os.path.join(path, "model.h5"), "r") as f:
        return {n: f[n][()] for n in names}


def zarr_chunks(shape: tuple) -> tuple:
    """About 1M elements (4 MB) per chunk, split along the first axis."""
    if len(shape) == 1:
        return (min(shape[0], 1 << 20),)
    inner = int(np.prod(shape[1:]))
    return (max(1, min(shape[0], (1 << 20) // max(1, inner))),) + tuple(shape[1:])


def zarr_write(path: str, items) -> None:
    import zarr
    from zarr.codecs import BloscCodec

    g = zarr.open_group(store=os.path.join(path, "model.zarr"), mode="w", zarr_format=3)
    for n, a in items:
        arr = g.create_array(
            name=n,
            shape=a.shape,
            dtype=a.dtype,
            chunks=zarr_chunks(a.shape),
            compressors=BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", typesize=4),
        )
        arr[...] = a


def zarr_read(path: str, names) -> dict:
    import zarr

    g = zarr.open_group(store=os.path.join(path, "model.zarr"), mode="r")
    return {n: g[n][...] for n in names}


def torch_write(path: str, items) -> None:
    import torch

    torch.save({n: torch.from_numpy(a) for n, a in items}, os.path.join(path, "model.pt"))


def torch_read(path: str, names) -> dict:
    import torch

    d = torch.load(os.path.join(path, "model.pt"), weights_only=True)
    return {n: t.numpy() for n, t in d.items()}


# (label, write, read, subset_bytes or None, note)
def formats(full_bytes: int, quick: bool) -> list[tuple]:
    slow_subset = None if quick else 64 * 10**6
    return [
        (
            "tv shuffle-zstd (default)",
            tv_write("shuffle-zstd"),
            tv_read,
            None,
            "level 1, 2 threads, fsync=True",
        ),
        ("tv zstd", tv_write("zstd"), tv_read, None, "level 1"),
        ("tv raw", tv_write("raw"), tv_read, None, "no compression (CRC-32C + stats only)"),
        ("safetensors", st_write, st_read, None, "safetensors.numpy save_file/load_file"),
        ("np.savez", npz_write(False), npz_read, None, "zip, stored"),
        (
            "np.savez_compressed",
            npz_write(True),
            npz_read,
            slow_subset,
            "zip deflate (zlib level 6)",
        ),
        ("h5py", h5_write(), h5_read, None, "contiguous, uncompressed"),
        (
            "h5py lzf+shuffle",
            h5_write(compression="lzf", shuffle=True, chunks=True),
            h5_read,
            None,
            "auto chunks",
        ),
        (
            "zarr3 blosc zstd1+shuffle",
            zarr_write,
            zarr_read,
            None,
            "BloscCodec(zstd, clevel=1, shuffle), 4 MB chunks",
        ),
        ("torch.save", torch_write, torch_read, None, "torch.load(weights_only=True)"),
    ]


def bench_format(label, write, read, items, base_dir, cold: bool) -> dict:
    path = fresh_dir(os.path.join(base_dir, re.sub(r"[^A-Za-z0-9]+", "_", label)))
    nbytes = nbytes_of(items)
    names = [n for n, _ in items]
    gc.collect()
    with Timer() as tw:
        write(path, items)
        fsync_tree(path)
    size = tree_bytes(path)
    res = {"label": label, "raw": nbytes, "write_s": tw.wall, "write_cpu": tw.cpu, "size": size}
    with Timer() as tr:
        got = read(path, names)
    res["read_s"] = tr.wall
    ok = len(got) == len(items) and all(np.array_equal(got[n], a) for n, a in items)
    res["ok"] = ok
    del got
    if cold and drop_caches():
        gc.collect()
        with Timer() as tc:
            got = read(path, names)
        res["cold_s"] = tc.wall
        del got
    shutil.rmtree(path, ignore_errors=True)
    return res


def print_format_table(rows: list[dict], dd: float) -> None:
    log(
        f"{'format':28s} {'data MB':>8s} {'write MB/s':>10s} {'%dd':>5s} {'cpu s':>6s} {'disk MB':>8s} "
        f"{'ratio':>6s} {'read warm MB/s':>14s} {'read cold MB/s':>14s}  ok"
    )
    for r in rows:
        cold = f"{r['raw'] / r['cold_s'] / MB:14.0f}" if "cold_s" in r else f"{'-':>14s}"
        log(
            f"{r['label']:28s} {r['raw'] / MB:8.1f} {r['raw'] / r['write_s'] / MB:10.0f} "
            f"{100 * r['raw'] / r['write_s'] / MB / dd:5.0f} {r['write_cpu']:6.2f} {r['size'] / MB:8.1f} "
            f"{r['raw'] / r['size']:6.3f} {r['raw'] / r['read_s'] / MB:14.0f} {cold}  {'yes' if r['ok'] else 'NO'}"
        )


# ----------------------------------------------------------------------------------------
# compression targets


def tv_pipeline(items, base_dir: str, codec: str, reps: int) -> dict:
    """write() of every tensor + flush(), fsync off, max_pending larger than the data so that
    nothing blocks on the disk: the encoder pipeline (copy, stats, shuffle+zstd, CRC, and the
    write() into the page cache). Best of reps."""
    import tensorvigil as tv

    nbytes = nbytes_of(items)
    best: dict = {}
    walls = []
    for _ in range(reps):
        path = fresh_dir(os.path.join(base_dir, f"pipe_{codec}"))
        w = tv.StoreWriter(
            path,
            codec=codec,
            fsync=False,
            max_pending_bytes=4 * nbytes + (64 << 20),
            roll_bytes=1 << 40,
            roll_seconds=3600,
        )
        gc.collect()
        with Timer() as t:
            for n, a in items:
                w.write(n, 0, a)
            w.flush()
        w.commit(0)
        w.close()
        c = w.counters()
        walls.append(t.wall)
        if not best or t.wall < best["wall"]:
            best = {
                "wall": t.wall,
                "cpu": t.cpu,
                "raw": c["raw_bytes"],
                "stored": c["stored_bytes"],
                "file": c["file_bytes"],
            }
        shutil.rmtree(path, ignore_errors=True)
    best["median_wall"] = statistics.median(walls)
    best["mbps"] = nbytes / best["wall"] / MB
    return best


def blosc2_bench(items, reps: int, split: bool = True) -> dict:
    """blosc2.compress2 of every tensor, zstd clevel 1 + byte shuffle, 2 threads, default
    blocksize. split=True is blosc2's default for this setting (each shuffled byte plane of a
    block is a separate zstd stream); split=False compresses the shuffled block as one stream."""
    import blosc2

    kw = dict(
        codec=blosc2.Codec.ZSTD,
        clevel=1,
        filters=[blosc2.Filter.SHUFFLE],
        typesize=4,
        nthreads=2,
        splitmode=blosc2.SplitMode.AUTO_SPLIT if split else blosc2.SplitMode.NEVER_SPLIT,
    )
    blosc2.compress2(items[0][1], **kw)  # warm-up
    best: dict = {}
    for _ in range(reps):
        gc.collect()
        stored = 0
        with Timer() as t:
            for _, a in items:
                stored += len(blosc2.compress2(a, **kw))
        if not best or t.wall < best["wall"]:
            best = {"wall": t.wall, "cpu": t.cpu, "stored": stored}
    nbytes = nbytes_of(items)
    best["ratio"] = nbytes / best["stored"]
    best["mbps"] = nbytes / best["wall"] / MB
    # decompression speed, one pass
    frames = [blosc2.compress2(a, **kw) for _, a in items]
    with Timer() as t:
        for f in frames:
            blosc2.decompress2(f, nthreads=2)
    best["dec_mbps"] = nbytes / t.wall / MB
    return best


def compression_section(items, base_dir: str, reps: int, title: str) -> dict:
    nbytes = nbytes_of(items)
    log(f"-- {title}: {len(items)} tensors, {nbytes / MB:.1f} MB (best of {reps})")
    sz = tv_pipeline(items, base_dir, "shuffle-zstd", reps)
    zs = tv_pipeline(items, base_dir, "zstd", reps)
    rw = tv_pipeline(items, base_dir, "raw", reps)
    bl = blosc2_bench(items, reps)
    bl1 = blosc2_bench(items, 1, split=False)
    # The pure encoder cost: CPU seconds of the shuffle-zstd pipeline minus the raw pipeline
    # (same copy, statistics, CRC and write; raw skips shuffle+zstd). Per core, and x2 cores.
    enc_cpu = max(1e-9, sz["cpu"] - rw["cpu"])
    enc_core = nbytes / enc_cpu / MB
    sz["ratio"] = sz["raw"] / sz["stored"]
    zs["ratio"] = zs["raw"] / zs["stored"]
    log(f"{'':34s} {'MB/s':>8s} {'cpu s':>6s} {'ratio':>7s}  note")
    log(
        f"{'tv shuffle-zstd pipeline':34s} {sz['mbps']:8.0f} {sz['cpu']:6.2f} {sz['ratio']:7.4f}  "
        f"write()+flush(), fsync off; median {nbytes / sz['median_wall'] / MB:.0f} MB/s; "
        f"file ratio {sz['raw'] / sz['file']:.4f}"
    )
    log(f"{'tv zstd pipeline':34s} {zs['mbps']:8.0f} {zs['cpu']:6.2f} {zs['ratio']:7.4f}")
    log(
        f"{'tv raw pipeline':34s} {rw['mbps']:8.0f} {rw['cpu']:6.2f} {1.0:7.4f}  copy + stats + CRC + write only"
    )
    log(
        f"{'tv shuffle+zstd encode, 1 core':34s} {enc_core:8.0f} {enc_cpu:6.2f} {'':7s}  "
        f"estimated: CPU(shuffle-zstd) - CPU(raw); x2 cores = {2 * enc_core:.0f} MB/s"
    )
    log(
        f"{'blosc2 zstd1+shuffle, 2 threads':34s} {bl['mbps']:8.0f} {bl['cpu']:6.2f} {bl['ratio']:7.4f}  "
        f"compress2 per tensor, default blocksize and splitmode (per-byte-plane streams); "
        f"decompress {bl['dec_mbps']:.0f} MB/s"
    )
    log(
        f"{'blosc2 same, NEVER_SPLIT':34s} {bl1['mbps']:8.0f} {bl1['cpu']:6.2f} {bl1['ratio']:7.4f}  "
        f"one zstd stream per shuffled block (no byte-plane split)"
    )
    return {"sz": sz, "zs": zs, "raw": rw, "blosc2": bl, "enc_core": enc_core}


# ----------------------------------------------------------------------------------------
# random access in a big run


def big_section(args, base_dir: str, results: dict, cold_ok: bool) -> None:
    import tensorvigil as tv

    want = int(args.big_gb * GB)
    per_tensor = 1 << 20  # float32 elements: 4 MB
    n_big, n_small, small_numel = 50, 10, 1024
    per_step = n_big * per_tensor * 4 + n_small * small_numel * 4
    free = shutil.disk_usage(base_dir).free
    room = int((free - 2 * GB) * 0.8)  # keep 2 GB and a margin
    if want > room:
        log(
            f"!! only {free / GB:.1f} GB free in {base_dir}: scaling the big run from {want / GB:.1f} GB "
            f"down to {max(room, 0) / GB:.1f} GB"
        )
        want = max(room, 0)
    steps = max(1, want // per_step)
    if want < per_step:
        log("!! not enough disk for the big run; skipped")
        return
    rng = np.random.default_rng(args.seed + 1)
    big = []
    for i in range(n_big):
        a = rng.standard_normal(per_tensor, dtype=np.float32)
        a *= np.float32(0.02 * np.exp(rng.normal(0, 0.5)))
        big.append((f"block.{i}.weight", a.reshape(1024, 1024)))
    small = [
        (f"block.{i}.scale", rng.standard_normal(small_numel, dtype=np.float32))
        for i in range(n_small)
    ]
    path = fresh_dir(os.path.join(base_dir, "big_run"))
    log(
        f"-- writing {steps} steps x ({n_big} x 4 MB + {n_small} x 4 KB) = {steps * per_step / GB:.2f} GB raw, "
        f"codec shuffle-zstd (default), fsync=True (the same tensors every step)"
    )
    w = tv.StoreWriter(path, fsync=True)
    with Timer() as t:
        for s in range(steps):
            for n, a in big:
                w.write(n, s, a)
            for n, a in small:
                w.write(n, s, a)
            w.commit(s)
        w.close()
    c = w.counters()
    log(
        f"   write: {t.wall:.1f} s, {steps * per_step / t.wall / MB:.0f} MB/s raw (sustained, durable at close), "
        f"{c['file_bytes'] / GB:.2f} GB on disk in {c['shards']} shards, ratio {c['raw_bytes'] / c['stored_bytes']:.4f}"
    )
    results["big_write_mbps"] = steps * per_step / t.wall / MB
    del big, small
    gc.collect()

    opens = []
    for _ in range(5):
        with Timer() as to:
            run = tv.open(path)
        opens.append(to.wall)
    results["big_open_s"] = statistics.median(opens)
    log(
        f"   tv.open(): median {1e3 * statistics.median(opens):.1f} ms of 5 (warm), "
        f"{len(run.steps())} steps, {len(run.tensor_names())} tensors"
    )

    rnd = random.Random(args.seed)
    n_pairs = 50 if args.quick else 200
    pairs_big = [
        (f"block.{rnd.randrange(n_big)}.weight", rnd.randrange(steps)) for _ in range(n_pairs)
    ]
    pairs_small = [
        (f"block.{rnd.randrange(n_small)}.scale", rnd.randrange(steps)) for _ in range(n_pairs)
    ]

    def time_reads(pairs, reps=1, run=run) -> list[float]:
        out = []
        for _ in range(reps):
            for n, s in pairs:
                t0 = time.perf_counter()
                v = run.tensor(n).value(s)
                out.append(time.perf_counter() - t0)
                del v
        return out

    time_reads(pairs_big)  # warm-up: the page cache and the reader's allocations
    time_reads(pairs_small)
    lb = time_reads(pairs_big, 2)
    ls = time_reads(pairs_small, 2)
    results["ra_big_med_ms"] = 1e3 * statistics.median(lb)
    results["ra_big_p90_ms"] = 1e3 * pct(lb, 0.9)
    results["ra_small_med_ms"] = 1e3 * statistics.median(ls)
    log(
        f"   read one 4 MB tensor at one step (warm, {len(lb)} reads of {n_pairs} random pairs): "
        f"median {1e3 * statistics.median(lb):.2f} ms, p90 {1e3 * pct(lb, 0.9):.2f} ms "
        f"({4.194304 / statistics.median(lb):.0f} MB/s)"
    )
    log(
        f"   read one 4 KB tensor at one step (warm): median {1e3 * statistics.median(ls):.3f} ms, "
        f"p90 {1e3 * pct(ls, 0.9):.3f} ms"
    )
    if cold_ok and drop_caches():
        with Timer() as to:
            run = tv.open(path)
        cold = time_reads(pairs_big[:20])
        log(
            f"   cold (after drop_caches): tv.open() {1e3 * to.wall:.1f} ms; 4 MB reads median "
            f"{1e3 * statistics.median(cold):.2f} ms, p90 {1e3 * pct(cold, 0.9):.2f} ms"
        )
    del run
    shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------------------
# statistics table


def stats_section(args, base_dir: str, results: dict) -> None:
    import tensorvigil as tv

    steps, ntens = (50, 200) if args.quick else (1000, 1000)
    path = fresh_dir(os.path.join(base_dir, "stats_run"))
    vals = [np.random.default_rng(i).standard_normal(8, dtype=np.float32) for i in range(ntens)]
    names = [f"model.layer{i // 4}.t{i % 4}/grad" for i in range(ntens)]
    log(
        f"-- writing {steps} steps x {ntens} tensors = {steps * ntens:,} records, stats_only=True, "
        f"8-element float32 arrays, fsync=True"
    )
    w = tv.StoreWriter(path, fsync=True)
    with Timer() as t:
        for s in range(steps):
            for n, v in zip(names, vals):
                w.write(n, s, v, stats_only=True)
            w.commit(s)
        w.close()
    nrec = steps * ntens
    c = w.counters()
    results["stats_write_us"] = 1e6 * t.wall / nrec
    log(
        f"   write: {t.wall:.1f} s = {1e6 * t.wall / nrec:.1f} us/record wall, {1e6 * t.cpu / nrec:.1f} us/record CPU; "
        f"{c['file_bytes'] / MB:.1f} MB in {c['shards']} shards"
    )
    opens = []
    for _ in range(3):
        with Timer() as to:
            run = tv.open(path)
        opens.append(to.wall)
    results["stats_open_s"] = statistics.median(opens)
    log(f"   tv.open(): median {statistics.median(opens):.3f} s of 3 (warm)")
    run.stats()  # pyarrow import and first-touch
    ts = []
    for _ in range(3):
        with Timer() as tt:
            tab = run.stats()
        ts.append(tt.wall)
    assert tab.num_rows == nrec, (tab.num_rows, nrec)
    results["stats_s"] = min(ts)
    results["stats_rows"] = tab.num_rows
    log(
        f"   run.stats(): {tab.num_rows:,} rows x {tab.num_columns} columns, best {min(ts):.3f} s, "
        f"median {statistics.median(ts):.3f} s of 3"
    )
    with Timer() as tt:
        tab2 = run.stats(names=names[:10], steps=range(steps // 2, steps))
    log(
        f"   run.stats(10 tensors, last half of the steps): {tab2.num_rows:,} rows in {1e3 * tt.wall:.1f} ms"
    )
    del run, tab, tab2
    shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--out", default="/tmp/tv-bench", help="bench output directory (default /tmp/tv-bench)"
    )
    ap.add_argument("--quick", action="store_true", help="tiny sizes; a smoke test in < 1 min")
    ap.add_argument("--skip-big", action="store_true", help="skip the ~10 GB random-access run")
    ap.add_argument("--big-gb", type=float, default=10.0, help="size of the random-access run (GB)")
    ap.add_argument("--data-mb", type=float, default=400.0, help="size of the format data set (MB)")
    ap.add_argument("--no-bf16", action="store_true", help="skip the bf16-rounded data set")
    ap.add_argument("--no-drop-caches", action="store_true", help="never drop the page cache")
    ap.add_argument("--seed", type=int, default=20240601)
    args = ap.parse_args()
    if args.quick:
        args.data_mb = min(args.data_mb, 16.0)
        args.big_gb = min(args.big_gb, 0.25)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    t_start = time.perf_counter()
    try:
        import torch

        torch.set_num_threads(2)
    except ImportError:
        pass
    import tensorvigil as tv  # noqa: F401 - fail early when it is not installed

    log(
        f"# bench_store.py {'--quick ' if args.quick else ''}— {time.strftime('%Y-%m-%d %H:%M:%S')}"
    )
    machine_report(out)
    cold_ok = not args.no_drop_caches and can_drop_caches()
    log(
        f"page cache: {'droppable: cold reads are measured after drop_caches' if cold_ok else 'not droppable: warm reads only'}"
    )
    results: dict = {}

    # 1. data
    CONT.section("data")
    with Timer() as t:
        data = make_model_tensors(int(args.data_mb * MB), args.seed)
    nbytes = nbytes_of(data)
    sizes = np.array([a.size for _, a in data])
    log("\n== 1. data")
    log(
        f"gaussian f32: {len(data)} tensors, {nbytes / MB:.1f} MB, numel {sizes.min():,}..{sizes.max():,} "
        f"(median {int(np.median(sizes)):,}; weights 1K..4M, biases and norms smaller); weights N(0, s), s = 0.02*lognormal(0, 0.5); biases N(0, s/4); "
        f"norm weights 1+N(0, 0.02); seed {args.seed}; generated in {t.wall:.1f} s"
    )
    bf16 = None
    if not args.no_bf16:
        bf16 = [(n, bf16_rounded(a)) for n, a in data]
        log(
            "bf16-rounded f32: the same tensors rounded to bfloat16 (nearest even) and widened back to f32 "
            "(the low 16 bits of every value are zero, as for bf16-trained weights saved as f32)"
        )

    # 2. disk
    CONT.section("disk")
    log("\n== 2. raw disk write bandwidth (same directory, data size)")
    dds = [dd_bandwidth(out, nbytes) for _ in range(3)]
    dd = max(dds)
    pyw = python_write_fsync(out, data)
    results["dd"] = dd
    log(
        f"dd if=/dev/zero bs=16M conv=fsync: {' / '.join(f'{x:.0f}' for x in dds)} MB/s (best {dd:.0f} MB/s is the reference)"
    )
    log(
        f"python write()+fsync of the tensor bytes: {pyw:.0f} MB/s "
        "(the virtual disk's fsync rate varies a lot between runs: compare best with best)"
    )

    # 3. formats
    CONT.section("formats")
    log("\n== 3. formats, gaussian f32 data")
    log(
        "write = save + close + fsync of every file written (durable), MB/s of raw tensor bytes; "
        "read = every tensor back into memory (numpy), warm = page cache holds the files just written"
        + (
            "; cold = after drop_caches"
            if cold_ok
            else "; cold not measured (drop_caches not permitted)"
        )
    )
    rows = []
    for label, w, r, sub, note in formats(nbytes, args.quick):
        items = subset(data, sub) if sub else data
        res = bench_format(label, w, r, items, out, cold_ok)
        res["note"] = note + (
            f"; measured on a {nbytes_of(items) / MB:.0f} MB subset (slow)"
            if items is not data
            else ""
        )
        rows.append(res)
        log(f"   {label}: done ({res['write_s'] + res['read_s']:.1f} s)")
    print_format_table(rows, dd)
    for r in rows:
        log(f"   {r['label']:28s} {r['note']}")
    results["formats"] = rows
    tv_raw = next(r for r in rows if r["label"] == "tv raw")
    raw_runs = [tv_raw["raw"] / tv_raw["write_s"] / MB]
    for _ in range(2):
        path = fresh_dir(os.path.join(out, "tv_raw_again"))
        with Timer() as t:
            tv_write("raw")(path, data)
            fsync_tree(path)
        raw_runs.append(nbytes / t.wall / MB)
        shutil.rmtree(path, ignore_errors=True)
    results["tv_raw_write"] = max(raw_runs)
    log(
        f"tv raw durable write, 3 runs: {' / '.join(f'{x:.0f}' for x in raw_runs)} MB/s "
        f"(best {max(raw_runs):.0f} is compared with the best dd)"
    )

    # 4. compression
    CONT.section("compression")
    log(
        "\n== 4. compression (encoder without the disk; the tensorvigil pipeline also computes the fused "
        "statistics of every tensor on its 2 threads)"
    )
    reps = 2 if args.quick else 3
    comp = compression_section(data, out, reps, "gaussian f32")
    results["comp"] = comp
    if bf16 is not None:
        comp16 = compression_section(bf16, out, reps, "bf16-rounded f32")
        results["comp16"] = comp16
        log("-- bf16-rounded f32 on disk (durable write, as in section 3)")
        rows16 = []
        for label, w, r, _sub, _note in formats(nbytes, args.quick):
            if label.startswith(("tv shuffle", "tv zstd", "zarr", "h5py lzf")):
                rows16.append(bench_format(label, w, r, bf16, out, False))
        print_format_table(rows16, dd)
        del bf16
    gc.collect()

    # 5. big run
    CONT.section("random access")
    log("\n== 5. random access")
    if args.skip_big:
        log("skipped (--skip-big)")
    else:
        big_section(args, out, results, cold_ok)

    # 6. stats
    CONT.section("stats table")
    log("\n== 6. statistics table")
    stats_section(args, out, results)

    # 7. summary
    log("\n== summary (targets)")
    CONT.report()
    tgt = []
    sz = comp["sz"]
    tgt.append(
        (
            "encode pipeline shuffle-zstd >= 1000 MB/s (2 threads, incl. stats)",
            sz["mbps"] >= 1000,
            f"{sz['mbps']:.0f} MB/s = {sz['mbps'] / 1000:.2f}x target",
        )
    )
    enc2 = 2 * comp["enc_core"]
    tgt.append(
        (
            "encode only shuffle+zstd >= 1000 MB/s (2 cores, CPU-time estimate)",
            enc2 >= 1000,
            f"{enc2:.0f} MB/s = {enc2 / 1000:.2f}x target",
        )
    )
    rel = sz["ratio"] / comp["blosc2"]["ratio"]
    tgt.append(
        (
            "ratio within 2% of blosc2 zstd1+shuffle (gaussian)",
            rel >= 0.98,
            f"{sz['ratio']:.4f} vs {comp['blosc2']['ratio']:.4f} = {100 * (rel - 1):+.2f}%",
        )
    )
    if "comp16" in results:
        c16 = results["comp16"]
        rel16 = c16["sz"]["ratio"] / c16["blosc2"]["ratio"]
        tgt.append(
            (
                "ratio within 2% of blosc2 zstd1+shuffle (bf16-rounded)",
                rel16 >= 0.98,
                f"{c16['sz']['ratio']:.4f} vs {c16['blosc2']['ratio']:.4f} = {100 * (rel16 - 1):+.2f}%",
            )
        )
        tgt.append(
            (
                "encode pipeline >= 1000 MB/s (bf16-rounded)",
                c16["sz"]["mbps"] >= 1000,
                f"{c16['sz']['mbps']:.0f} MB/s",
            )
        )
    frac = results["tv_raw_write"] / dd
    tgt.append(
        (
            "tv raw durable write >= 80% of dd",
            frac >= 0.8,
            f"{results['tv_raw_write']:.0f} vs {dd:.0f} MB/s = {100 * frac:.0f}%",
        )
    )
    if "ra_big_med_ms" in results:
        tgt.append(
            (
                "read one 4 MB tensor at one step, warm, median <= 2 ms",
                results["ra_big_med_ms"] <= 2,
                f"median {results['ra_big_med_ms']:.2f} ms, p90 {results['ra_big_p90_ms']:.2f} ms "
                f"(4 KB tensor: {results['ra_small_med_ms']:.3f} ms); tv.open() {1e3 * results['big_open_s']:.0f} ms",
            )
        )
    tgt.append(
        (
            f"run.stats() of {results['stats_rows']:,} rows <= 0.5 s",
            results["stats_s"] <= 0.5,
            f"{results['stats_s']:.3f} s = {results['stats_s'] / 0.5:.2f}x budget; tv.open() {results['stats_open_s']:.3f} s",
        )
    )
    for name, ok, detail in tgt:
        log(f"{'PASS' if ok else 'MISS'}  {name:70s} {detail}")
    log(f"info  stats_only write cost: {results['stats_write_us']:.1f} us/record")
    bad = [r["label"] for r in rows if not r["ok"]]
    if bad:
        log(f"!! read-back mismatch: {', '.join(bad)}")
    log(
        f"\nload avg at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; total {time.perf_counter() - t_start:.0f} s"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
