"""CUDA statistics and GPU capture: tensorvigil's fused kernels against torch baselines.

Prints, in one run on one GPU:
  1. the device read bandwidth (torch.sum over 1 GiB of float32, best of several);
  2. for a GPT-2-small-like set (144 tensors, ~85M params) and a 1.3B-like set (288 tensors,
     ~1.2B params), in float32 and bfloat16: torch op by op per tensor (min, max, mean, std,
     norm, isnan.sum, isinf.sum, (x == 0).sum, abs().max), torch._foreach_norm, and
     tensorvigil.cuda.compute_stats_cuda (GPU time between CUDA events, and wall time including
     result()), with ratios;
  3. a GPT-2-small-like training loop (torch transformer, bf16 autocast) with and without a
     capture of all parameter and gradient statistics every step (one GpuCapture.submit per
     step into a StoreWriter): the step-time overhead.

Targets: set (b) >= 80% of the read bandwidth; set (a) <= 2x _foreach_norm time; capture
overhead <= 3% of the step time. ``--quick`` shrinks everything for a smoke run.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _timing import machine_info  # noqa: E402


def gpu_time(torch, fn, repeat=10, warmup=2):
    """Best and median GPU milliseconds of fn() between CUDA events on the current stream."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return min(times), statistics.median(times)


def wall_time(torch, fn, repeat=10, warmup=2):
    """Best wall-clock milliseconds of fn() (which must wait for its own results)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times)


def model_set(torch, layers, d, dtype, seed=0):
    """GPT-2-style tensors: 12 per layer (2 layer norms, qkv, proj, fc, fc-proj, biases)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    shapes = []
    for _ in range(layers):
        shapes += [
            (d,),
            (d,),
            (d, 3 * d),
            (3 * d,),
            (d, d),
            (d,),
            (d,),
            (d,),
            (d, 4 * d),
            (4 * d,),
            (4 * d, d),
            (d,),
        ]
    return [(torch.randn(s, device="cuda", generator=g) * 0.02).to(dtype) for s in shapes]


def bench_set(torch, tvc, label, xs, bw_gbps, repeat):
    nbytes = sum(x.numel() * x.element_size() for x in xs)
    nparams = sum(x.numel() for x in xs)

    def op_by_op():
        out = []
        for x in xs:
            xf = x
            out += [
                xf.min(),
                xf.max(),
                xf.mean(dtype=torch.float32),
                xf.float().std(),
                torch.linalg.vector_norm(xf, dtype=torch.float32),
                torch.isnan(xf).sum(),
                torch.isinf(xf).sum(),
                (xf == 0).sum(),
                xf.abs().max(),
            ]
        return out

    def foreach():
        return torch._foreach_norm(xs)

    def tv_launch():
        return tvc.compute_stats_cuda(xs)

    def tv_full():
        return tvc.compute_stats_cuda(xs).result()

    t_op, _ = gpu_time(torch, op_by_op, repeat=max(3, repeat // 3))
    t_fe, _ = gpu_time(torch, foreach, repeat=repeat)
    t_tv, t_tv_med = gpu_time(torch, tv_launch, repeat=repeat)
    w_tv = wall_time(torch, tv_full, repeat=repeat)
    tv_bw = nbytes / (t_tv * 1e-3) / 1e9
    print(f"\n[{label}] {len(xs)} tensors, {nparams / 1e6:.1f}M params, {nbytes / 2**20:.0f} MiB")
    print(f"  torch op by op (9 ops/tensor) : {t_op:9.3f} ms")
    print(
        f"  torch._foreach_norm           : {t_fe:9.3f} ms  ({nbytes / (t_fe * 1e-3) / 1e9:7.1f} GB/s)"
    )
    print(
        f"  tensorvigil (GPU, events)     : {t_tv:9.3f} ms  ({tv_bw:7.1f} GB/s, median {t_tv_med:.3f} ms)"
    )
    print(f"  tensorvigil (wall, +result()) : {w_tv:9.3f} ms")
    print(
        f"  ratios: tv/read-bandwidth = {tv_bw / bw_gbps:.1%}, tv time / _foreach_norm = "
        f"{t_tv / t_fe:.2f}x, torch op-by-op / tv = {t_op / t_tv:.1f}x"
    )
    return {"bw_frac": tv_bw / bw_gbps, "vs_foreach": t_tv / t_fe}


def check_correctness(torch, tv, tvc):
    x = torch.randn(1 << 20, device="cuda")
    x[7] = float("nan")
    g = tvc.compute_stats_cuda([x]).result()[0]
    c = tv.compute_stats(x.cpu())
    # moments: float partials per 16-byte vector, then double: within 2e-6 of the CPU's
    ok = (
        (g.nan, g.min, g.max) == (c.nan, c.min, c.max)
        and math.isclose(g.mean, c.mean, rel_tol=0, abs_tol=2e-6 * (abs(c.mean) + c.std))
        and math.isclose(g.m2, c.m2, rel_tol=2e-6)
    )
    print(f"  sanity vs CPU kernels: {'ok' if ok else 'MISMATCH'}")


def training_overhead(torch, tv, tvc, quick):
    """Step time of a GPT-2-small-like transformer with and without statistics capture."""
    import torch.nn as nn

    d, layers, heads, seq, batch, vocab = (
        (256, 2, 4, 128, 4, 1000) if quick else (768, 12, 12, 512, 8, 50257)
    )

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(vocab, d)
            self.pos = nn.Parameter(torch.zeros(seq, d))
            layer = nn.TransformerEncoderLayer(
                d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True, activation="gelu"
            )
            self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.ln = nn.LayerNorm(d)
            self.head = nn.Linear(d, vocab, bias=False)
            self.head.weight = self.emb.weight
            self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq))

        def forward(self, idx):
            h = self.emb(idx) + self.pos
            h = self.blocks(h, mask=self.mask, is_causal=True)
            return self.head(self.ln(h))

    torch.manual_seed(0)
    model = GPT().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randint(0, vocab, (batch, seq), device="cuda")
    y = torch.randint(0, vocab, (batch, seq), device="cuda")
    named = list(model.named_parameters())
    nparams = sum(p.numel() for _, p in named)

    def step(cap, s):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        if cap is not None:
            items = [(n, p, True, 0) for n, p in named]
            items += [(n + "/grad", p.grad, True, 0) for n, p in named]
            cap.submit(s, 0, s, items)
            cap.commit(s, 0, s)
        opt.step()
        opt.zero_grad(set_to_none=True)

    n_steps = 5 if quick else 20
    with tempfile.TemporaryDirectory() as tmp:
        w = tv.StoreWriter(os.path.join(tmp, "run"), fsync=False)
        cap = tvc.GpuCapture(w)
        s = 0
        for _ in range(3):  # warm-up both paths (allocator, cuBLAS, staging, pools)
            step(None, s)
            step(cap, s)
            s += 1
        base, capt = [], []
        for _rep in range(3):  # alternate blocks so drift hits both
            for mode, acc in ((None, base), (cap, capt)):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(n_steps):
                    step(mode, s)
                    s += 1
                torch.cuda.synchronize()
                acc.append((time.perf_counter() - t0) / n_steps * 1e3)
        cap.flush()
        cap.close()
        counters = w.counters()
        w.close()
    # The same loop captured by the PyTorch hook (weights, biases, gradients: statistics of
    # every step, on the device), registered for each timed block and closed after it.
    hooked = []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(3):
            hook = tv.torch.Hook(
                os.path.join(tmp, f"run{rep}"),
                collections=["weights", "biases", "gradients"],
                save=tv.SaveConfig(),
                reductions_only=True,
                strict=True,
                writer_options={"fsync": False},
            ).register(model, opt)
            step(None, s)  # first step: writer, capture thread, staging
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(n_steps):
                step(None, s)
                s += 1
            torch.cuda.synchronize()
            hooked.append((time.perf_counter() - t0) / n_steps * 1e3)
            if rep == 2:  # where does the hook's time go? (host side, 10 steps)
                import cProfile
                import pstats

                prof = cProfile.Profile()
                torch.cuda.synchronize()
                prof.enable()
                for _ in range(10):
                    step(None, s)
                    s += 1
                torch.cuda.synchronize()
                prof.disable()
                print("\n  host profile of 10 hooked steps (tottime):")
                pstats.Stats(prof).sort_stats("tottime").print_stats(14)
            hook.close()
    th = min(hooked)
    tb, tc = min(base), min(capt)
    print(f"\n[training loop] {nparams / 1e6:.1f}M params, batch {batch}x{seq}, bf16 autocast")
    print(f"  step without capture : {tb:8.2f} ms (blocks {', '.join(f'{t:.2f}' for t in base)})")
    print(f"  step with capture    : {tc:8.2f} ms (blocks {', '.join(f'{t:.2f}' for t in capt)})")
    print(
        f"  overhead             : {(tc / tb - 1):+.2%} "
        f"({2 * len(named)} tensors/step, writer wrote {counters['tensors']} records)"
    )
    print(
        f"  step with tv.torch.Hook: {th:8.2f} ms (blocks {', '.join(f'{t:.2f}' for t in hooked)})"
    )
    print(f"  hook overhead        : {(th / tb - 1):+.2%}")
    return max(tc / tb - 1, th / tb - 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, smoke run")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--skip-training", action="store_true")
    args = ap.parse_args()
    try:
        import torch
    except ImportError:
        print("bench_cuda: torch is not installed; nothing to measure")
        return 0
    import tensorvigil as tv
    from tensorvigil import cuda as tvc

    print(machine_info())
    if not torch.cuda.is_available() or not tvc.cuda_available():
        print("bench_cuda: needs a CUDA device and tensorvigil built with TV_ENABLE_CUDA=ON")
        return 0
    p = torch.cuda.get_device_properties(0)
    print(
        f"GPU: {p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB; "
        f"torch CUDA {torch.version.cuda}"
    )
    check_correctness(torch, tv, tvc)

    n = (64 << 20) // 4 if args.quick else (1 << 30) // 4
    big = torch.empty(n, device="cuda").normal_()
    t_sum, _ = gpu_time(torch, lambda b=big: b.sum(), repeat=args.repeat)
    bw = n * 4 / (t_sum * 1e-3) / 1e9
    print(f"\nread bandwidth (torch.sum over {n * 4 / 2**30:.2f} GiB float32): {bw:.1f} GB/s")
    del big

    results = {}
    sets = [("a", "GPT-2-small-like", 2 if args.quick else 12, 768)]
    sets.append(("b", "1.3B-like", 2 if args.quick else 24, 2048))
    for key, name, layers, d in sets:
        for dtype in (torch.float32, torch.bfloat16):
            xs = model_set(torch, layers, d, dtype)
            label = f"({key}) {name}, {str(dtype).replace('torch.', '')}"
            results[(key, str(dtype))] = bench_set(torch, tvc, label, xs, bw, args.repeat)
            del xs
            torch.cuda.empty_cache()

    overhead = None
    if not args.skip_training:
        overhead = training_overhead(torch, tv, tvc, args.quick)

    print("\nsummary (targets):")
    for dt in ("torch.float32", "torch.bfloat16"):
        rb, ra = results[("b", dt)], results[("a", dt)]
        print(
            f"  {dt:15s} set (b) bandwidth {rb['bw_frac']:.1%} (>= 80%): "
            f"{'PASS' if rb['bw_frac'] >= 0.8 else 'MISS'}; set (a) vs _foreach_norm "
            f"{ra['vs_foreach']:.2f}x (<= 2x): {'PASS' if ra['vs_foreach'] <= 2 else 'MISS'}"
        )
    if overhead is not None:
        print(
            f"  training capture overhead (worst of direct API and hook) {overhead:+.2%} (<= 3%): "
            f"{'PASS' if overhead <= 0.03 else 'MISS'}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
