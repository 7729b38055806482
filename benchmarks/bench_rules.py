#!/usr/bin/env python3
"""Rules benchmark: the default rule set over a large statistics-only run.

Measures (targets of the rules issue):

1. a stored run of 10,000 steps x 301 tensors (75 layers: weight, bias and their gradients,
   plus the loss), statistics only, written with the store;
2. ``RuleEngine(run, tv.rules.defaults()).poll()`` over the whole run (open + evaluate):
   target <= 2 s. Repeated ``--repeat`` times on the same files (page cache warm); the best,
   the spread and the process CPU time are printed (the CPU time shows how much of a slow
   wall time is other processes on a shared machine);
3. incremental evaluation: 200 more steps appended one at a time, one ``poll()`` after each:
   target <= 1 ms per new step (median; p95 printed);
4. baseline A: the same checks done the way a trial API without a statistics index works,
   loading every tensor's statistics one call at a time (``run.tensor(n).stats(step)``), on the
   first 200 steps, extrapolated per step;
5. baseline B: smdebug 1.0.34 (in ``build/smdebug-venv``, see bench_capture.py). The same
   layout is written as an smdebug run (``--smdebug-steps`` steps, default 100: smdebug
   writes one event per tensor and reduction, about 1 s of CPU per step of this layout, so a
   10,000-step run would take hours to write)
   with smdebug's own FileWriter and the reductions its hook would save; then the checks of the
   default rules are done through ``smdebug.trials.create_trial(path).tensor(name)
   .reduction_value(step, ...)`` on ``--smdebug-probe`` steps and extrapolated per step. What
   smdebug cannot do (no NaN/Inf counts, no element counts) is printed with the result.

Usage::

    python benchmarks/bench_rules.py            # a few minutes on 2 cores
    python benchmarks/bench_rules.py --quick    # 1,000 steps
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
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

REPO = Path(__file__).resolve().parent.parent
SMD_PYTHON = REPO / "build" / "smdebug-venv" / "bin" / "python"
LAYERS = 75


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


def base_tensors(names, rng, shape=(64, 64)) -> dict[str, np.ndarray]:
    return {n: rng.normal(0, 0.05, shape).astype(np.float32) for n, _ in names}


def loss_at(s: int) -> float:
    return float(np.float32(2.0 * np.exp(-s / 2000) + 0.1))


def write_steps(w, names, start, stop, base):
    for s in range(start, stop):
        for n, _ in names:
            # statistics only: the record stores statistics of a slowly changing tensor
            w.write(n, s, base[n] * (1.0 + 1e-3 * s), stats_only=True)
        w.write("loss", s, np.float32(loss_at(s)))
        w.commit(s)


def spread(xs: list[float]) -> str:
    return f"best {min(xs):.3f} s, median {statistics.median(xs):.3f} s, worst {max(xs):.3f} s"


# ----------------------------------------------------------------------------------------------
# smdebug (runs in the smdebug venv: python bench_rules.py --smdebug-worker DIR)


def smdebug_worker(out: str, steps: int, probe: int) -> dict:
    """Writes an smdebug run of the benchmark's layout and times the default rules' checks."""
    from smdebug.core.collection_manager import CollectionManager
    from smdebug.core.modes import ModeKeys
    from smdebug.core.reductions import get_reduction_tensor_name
    from smdebug.core.writer import FileWriter
    from smdebug.trials import create_trial

    names = layer_names(LAYERS)
    base = base_tensors(names, np.random.default_rng(0))
    # The reductions smdebug's hook saves for a ReductionConfig with these lists; each scales
    # linearly with the tensor (variance quadratically), so they are computed once.
    reds = [("min", False), ("max", False), ("mean", False), ("std", False), ("l1", False)]
    reds += [("l2", False), ("max", True), ("mean", True), ("variance", False)]

    def reduce(x: np.ndarray) -> dict:
        x64 = x.astype(np.float64)
        return {
            ("min", False): x64.min(),
            ("max", False): x64.max(),
            ("mean", False): x64.mean(),
            ("std", False): x64.std(),
            ("variance", False): x64.var(),
            ("l1", False): np.abs(x64).sum(),
            ("l2", False): np.sqrt((x64 * x64).sum()),
            ("max", True): np.abs(x64).max(),
            ("mean", True): np.abs(x64).mean(),
        }

    base_red = {n: reduce(base[n]) for n, _ in names}
    shutil.rmtree(out, ignore_errors=True)
    cm = CollectionManager()
    for n, c in names:
        cm.get(c).add_tensor_name(n)
    cm.get("losses").add_tensor_name("loss")
    cm.set_num_workers(1)
    cm.export(out, "worker_0_collections.json")
    t0 = time.perf_counter()
    for s in range(steps):
        w = FileWriter(trial_dir=out, step=s, worker="worker_0")
        c = 1.0 + 1e-3 * s
        for n, _ in names:
            for (r, a), v in base_red[n].items():
                v = v * c * c if r == "variance" else v * c
                w.write_tensor(
                    tdata=np.asarray(v, dtype=np.float32),
                    tname=get_reduction_tensor_name(n, r, a, remove_colon_index=True),
                    mode=ModeKeys.TRAIN,
                    mode_step=s,
                )
        w.write_tensor(
            tdata=np.asarray(loss_at(s), dtype=np.float32),
            tname="loss",
            mode=ModeKeys.TRAIN,
            mode_step=s,
        )
        w.close()
    open(os.path.join(out, "training_job_end.ts"), "w").close()
    t_write = time.perf_counter() - t0

    t0 = time.perf_counter()
    trial = create_trial(out)
    have = trial.steps()
    t_open = time.perf_counter() - t0
    grads = [n for n, c in names if c == "gradients"]
    weight_grads = [n for n in grads if n.endswith("weight/grad")]
    params = [n for n, c in names if c != "gradients"]
    first, last = weight_grads[0], weight_grads[-1]
    fired = 0
    losses: list[float] = []
    top = -np.inf
    t0 = time.perf_counter()
    for s in range(min(probe, len(have))):
        # VanishingGradient: mean |g| of every gradient (smdebug: abs mean reduction).
        for n in grads:
            if trial.tensor(n).reduction_value(s, "mean", abs=True) < 1e-7:
                fired += 1
        # ExplodingTensor: smdebug stores no NaN/Inf counts: non-finite min or max.
        for n in grads + params:
            t = trial.tensor(n)
            if not (
                np.isfinite(t.reduction_value(s, "min"))
                and np.isfinite(t.reduction_value(s, "max"))
            ):
                fired += 1
        # GradientNormRatio: l2 of the first and the last weight gradient.
        n1 = trial.tensor(first).reduction_value(s, "l2")
        nl = trial.tensor(last).reduction_value(s, "l2")
        if nl > 0 and not 1e-3 <= n1 / nl <= 70:
            fired += 1
        # LossSpike, LossNotDecreasing (and PoorWeightInitialization's loss check): the loss.
        v = float(trial.tensor("loss").value(s))
        if not np.isfinite(v) or v >= 1e3 or (top > 0 and v > 10 * top):
            fired += 1
        top = max(top, v)
        losses.append(v)
        # PoorWeightInitialization: gradient spread (max - min) in the first 10 steps.
        if s < 10:
            for n in grads:
                t = trial.tensor(n)
                _ = t.reduction_value(s, "max") - t.reduction_value(s, "min")
    t_check = time.perf_counter() - t0
    import smdebug

    return {
        "smdebug": smdebug.__version__,
        "steps": steps,
        "probe": min(probe, len(have)),
        "write_s": t_write,
        "open_s": t_open,
        "check_s": t_check,
        "fired": fired,
        "lookups_per_step": len(grads) + 2 * len(grads + params) + 3,
    }


def run_smdebug(root: str, steps: int, probe: int) -> dict:
    if not SMD_PYTHON.exists():
        return {"error": f"{SMD_PYTHON} does not exist (create it: benchmarks/bench_capture.py)"}
    out = os.path.join(root, "smdebug-run")
    cmd = [str(SMD_PYTHON), __file__, "--smdebug-worker", out, "--steps", str(steps)]
    cmd += ["--smdebug-probe", str(probe)]
    env = dict(os.environ, PYTHONWARNINGS="ignore", SMDEBUG_LOG_LEVEL="error")
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=env)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
    if r.returncode != 0 or not lines:
        tail = (r.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": f"smdebug worker failed: {tail}"}
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--out", default=None, help="keep the run here (reused when present)")
    ap.add_argument("--repeat", type=int, default=3, help="whole-run evaluations")
    ap.add_argument("--no-smdebug", action="store_true")
    ap.add_argument("--smdebug-steps", type=int, default=100)
    ap.add_argument("--smdebug-probe", type=int, default=50)
    ap.add_argument("--smdebug-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.smdebug_worker:
        res = smdebug_worker(args.smdebug_worker, args.steps or 1000, args.smdebug_probe)
        print(json.dumps(res))
        return

    from _timing import machine_info

    import tensorvigil as tv
    from tensorvigil.rules.engine import RuleEngine

    steps = args.steps or (1000 if args.quick else 10_000)
    names = layer_names(LAYERS)
    ntensors = len(names) + 1
    root = args.out or tempfile.mkdtemp(prefix="tv-bench-rules-")
    run_dir = os.path.join(root, "run")
    print(machine_info())
    print(f"\nrun: {steps} steps x {ntensors} tensors (statistics only) in {run_dir}")

    base = base_tensors(names, np.random.default_rng(0))
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    w = tv.StoreWriter(run_dir, fsync=False)
    write_steps(w, names, 0, steps, base)
    w.flush()
    cols: dict[str, list[str]] = {}
    for n, c in names:
        cols.setdefault(c, []).append(n)
    cols["losses"] = ["loss"]
    with open(os.path.join(run_dir, "collections.json"), "w") as f:
        json.dump(cols, f)
    print(f"written in {time.perf_counter() - t0:.1f} s ({steps * ntensors:,} records)")

    # 2. whole run (the writer is still open: the last shard is read by scanning, as live)
    totals, opens, evals, cpus = [], [], [], []
    engine = None
    for _ in range(max(1, args.repeat)):
        engine = None
        t0, c0 = time.perf_counter(), time.process_time()
        engine = RuleEngine(run_dir, tv.rules.defaults(), record=False)
        t_open = time.perf_counter() - t0
        findings = engine.poll()
        totals.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        opens.append(t_open)
        evals.append(totals[-1] - t_open)
    assert engine is not None
    fired = [f for f in findings if f.fired]
    t_total = min(totals)
    print(
        f"\ndefault rules over the whole run ({engine.steps_evaluated} steps, "
        f"{len(fired)} fired, {len(findings) - len(fired)} notes), {len(totals)} rounds:\n"
        f"  total {spread(totals)}\n  open  {spread(opens)}\n  eval  {spread(evals)}\n"
        f"  process CPU time {spread(cpus)}\n"
        f"  best: {t_total / max(engine.steps_evaluated, 1) * 1e6:.1f} us/step"
    )

    # 3. incremental
    per_step, cpu_step = [], []
    for s in range(steps, steps + 200):
        write_steps(w, names, s, s + 1, base)
        w.flush()
        c0 = time.thread_time()
        t0 = time.perf_counter()
        engine.poll()
        per_step.append(time.perf_counter() - t0)
        cpu_step.append(time.thread_time() - c0)
    w.close()
    med = statistics.median(per_step) * 1e3
    p95 = sorted(per_step)[int(0.95 * len(per_step))] * 1e3
    print(
        f"incremental: median {med:.3f} ms per new step, p95 {p95:.3f} ms (200 steps); "
        f"CPU time of the polling thread: median {statistics.median(cpu_step) * 1e3:.3f} ms"
    )

    # 4. baseline A: per-tensor statistics calls (how a trial API without an index works)
    run = tv.open(run_dir)
    probe = 200
    t0 = time.perf_counter()
    for s in range(probe):
        for n, _ in names:
            st = run.tensor(n).stats(s)
            _ = st.l1 / max(st.numel, 1)
    per_step_base = (time.perf_counter() - t0) / probe
    print(
        f"baseline A (tensorvigil, one stats() call per tensor-step, {probe} steps): "
        f"{per_step_base * 1e3:.2f} ms/step -> {per_step_base * steps:.1f} s for {steps} steps"
    )

    # 5. baseline B: smdebug's trial API
    smd = None
    if not args.no_smdebug:
        smd = run_smdebug(root, args.smdebug_steps, args.smdebug_probe)
        if "error" in smd:
            print(f"baseline B (smdebug): not measured: {smd['error']}")
            smd = None
        else:
            smd_step = smd["check_s"] / max(smd["probe"], 1)
            print(
                f"baseline B (smdebug {smd['smdebug']} trial API): run of {smd['steps']} steps "
                f"written in {smd['write_s']:.1f} s with smdebug's FileWriter; create_trial + "
                f"steps() {smd['open_s']:.2f} s; the default rules' checks "
                f"({smd['lookups_per_step']} reduction_value/value calls per step) on "
                f"{smd['probe']} steps: {smd_step * 1e3:.1f} ms/step -> "
                f"{smd_step * steps:.0f} s for {steps} steps (+ open, which grows with the run)"
            )
            print(
                "  smdebug cannot do everything the rules do from statistics: it stores no "
                "NaN/Inf counts (ExplodingTensor is approximated by a non-finite min or max, "
                "which misses NaN when min/max skip it) and no element counts (VanishingGradient's "
                "min_elements and the finite-count mean cannot be applied); WeightUpdateRatio, "
                "DeadRelu and SaturatedActivation need values, stored by neither run."
            )

    target_total = 2.0 * steps / 10_000
    print("\nsummary")
    print(
        f"  whole run {t_total:.3f} s (best of {len(totals)}) vs target {target_total:.2f} s: "
        f"{'PASS' if t_total <= target_total else 'MISS'}"
    )
    print(f"  incremental {med:.3f} ms/step vs 1 ms: {'PASS' if med <= 1.0 else 'MISS'}")
    print(f"  speed-up vs per-tensor stats() calls: {per_step_base * steps / t_total:.1f}x")
    if smd is not None:
        smd_step = smd["check_s"] / max(smd["probe"], 1)
        ratio = smd_step / (t_total / max(engine.steps_evaluated, 1))
        print(
            f"  speed-up vs smdebug's trial API (per step, checks only, smdebug extrapolated "
            f"from {smd['probe']} steps of a {smd['steps']}-step run): {ratio:.0f}x"
        )
    if not args.out:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
