#!/usr/bin/env python3
"""Rules benchmark: the default rule set over a large statistics-only run.

Measures (targets of the rules issue):

1. a stored run of 10,000 steps x 300 tensors (75 layers: weight, bias and their gradients,
   plus the loss), statistics only, written with the store;
2. ``RuleEngine(run, tv.rules.defaults()).poll()`` over the whole run (open + evaluate):
   target <= 2 s;
3. incremental evaluation: 200 more steps appended one at a time, one ``poll()`` after each:
   target <= 1 ms per new step (median; p95 printed);
4. baseline: the same checks done the way a trial API without a statistics index works —
   loading every tensor's statistics one call at a time (``run.tensor(n).stats(step)``) — on
   the first 200 steps, extrapolated per step. (smdebug's own trial API needs an smdebug run;
   with ``--smdebug`` the script writes a small one with smdebug and times ``trial.tensor(n)
   .reduction_value(step, "l1")`` per tensor-step, when smdebug is importable.)

Usage::

    python benchmarks/bench_rules.py            # ~1-2 min on 2 cores
    python benchmarks/bench_rules.py --quick    # 1,000 steps
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


def layer_names(layers: int) -> list[tuple[str, str]]:
    out = []
    for i in range(layers):
        out += [
            (f"layer{i}.weight", "weights"),
            (f"layer{i}.bias", "biases"),
            (f"layer{i}.weight/grad", "gradients"),
            (f"layer{i}.bias/grad", "gradients"),
        ]
    return out


def write_steps(w, names, start, stop, rng, shape=(64, 64)):
    base = {n: rng.normal(0, 0.05, shape).astype(np.float32) for n, _ in names}
    for s in range(start, stop):
        for n, _ in names:
            # statistics only: the record stores statistics of a slowly changing tensor
            w.write(n, s, base[n] * (1.0 + 1e-3 * s), stats_only=True)
        w.write("loss", s, np.float32(2.0 * np.exp(-s / 2000) + 0.1))
        w.commit(s)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    steps = args.steps or (1000 if args.quick else 10_000)
    layers = 75
    names = layer_names(layers)
    ntensors = len(names) + 1
    root = args.out or tempfile.mkdtemp(prefix="tv-bench-rules-")
    run_dir = os.path.join(root, "run")
    shutil.rmtree(run_dir, ignore_errors=True)
    print(machine_info())
    print(f"\nrun: {steps} steps x {ntensors} tensors (statistics only) in {run_dir}")

    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    w = tv.StoreWriter(run_dir, fsync=False)
    write_steps(w, names, 0, steps, rng)
    w.flush()
    import json

    cols: dict[str, list[str]] = {}
    for n, c in names:
        cols.setdefault(c, []).append(n)
    cols["losses"] = ["loss"]
    with open(os.path.join(run_dir, "collections.json"), "w") as f:
        json.dump(cols, f)
    print(f"written in {time.perf_counter() - t0:.1f} s ({steps * ntensors:,} records)")

    # 2. whole run
    from tensorvigil.rules.engine import RuleEngine

    t0 = time.perf_counter()
    engine = RuleEngine(run_dir, tv.rules.defaults(), record=False)
    t_open = time.perf_counter() - t0
    findings = engine.poll()
    t_total = time.perf_counter() - t0
    fired = [f for f in findings if f.fired]
    print(
        f"\ndefault rules over the whole run: {t_total:.3f} s "
        f"(open {t_open:.3f} s, {engine.steps_evaluated} steps, "
        f"{t_total / max(engine.steps_evaluated, 1) * 1e6:.1f} us/step); "
        f"{len(fired)} fired, {len(findings) - len(fired)} notes"
    )

    # 3. incremental
    per_step = []
    for s in range(steps, steps + 200):
        write_steps(w, names, s, s + 1, rng)
        w.flush()
        t0 = time.perf_counter()
        engine.poll()
        per_step.append(time.perf_counter() - t0)
    w.close()
    med = statistics.median(per_step) * 1e3
    p95 = sorted(per_step)[int(0.95 * len(per_step))] * 1e3
    print(f"incremental: median {med:.3f} ms per new step, p95 {p95:.3f} ms (200 steps)")

    # 4. baseline: per-tensor statistics calls (how a trial API without an index works)
    run = tv.open(run_dir)
    probe = 200
    t0 = time.perf_counter()
    for s in range(probe):
        for n, _ in names:
            st = run.tensor(n).stats(s)
            _ = st.l1 / max(st.numel, 1)
    t_probe = time.perf_counter() - t0
    per_step_base = t_probe / probe
    print(
        f"baseline (one stats() call per tensor-step, {probe} steps): "
        f"{per_step_base * 1e3:.2f} ms/step -> {per_step_base * steps:.1f} s for {steps} steps"
    )

    target_total = 2.0 * steps / 10_000
    print("\nsummary")
    print(
        f"  whole run {t_total:.3f} s vs target {target_total:.2f} s: "
        f"{'PASS' if t_total <= target_total else 'MISS'}"
    )
    print(f"  incremental {med:.3f} ms/step vs 1 ms: {'PASS' if med <= 1.0 else 'MISS'}")
    print(f"  speed-up vs per-tensor calls: {per_step_base * steps / t_total:.1f}x")
    if not args.out:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
