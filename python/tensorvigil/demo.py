"""The built-in demo: a small NumPy MLP trained with capture, then read back.

Two runs of the same network on the same synthetic data: one well initialised (He), one
initialised Uniform(-1, 1) with a tiny learning rate. Their captured gradient statistics show
the difference without any framework installed.
"""

from __future__ import annotations

import os

import numpy as np

from .store import StoreWriter, open_run


def _data(rng: np.random.Generator, n: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    # Two interleaved spirals: not linearly separable, learnable by a small MLP.
    t = rng.uniform(0.5, 3.5 * np.pi, n)
    label = rng.integers(0, 2, n)
    r = t / (3.5 * np.pi)
    angle = t + np.pi * label
    x = np.stack([r * np.cos(angle), r * np.sin(angle)], axis=1)
    x += rng.normal(0, 0.02, x.shape)
    return x.astype(np.float32), label


def _train(out_dir: str, init: str, lr: float, steps: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    x, y = _data(rng)
    sizes = [2, 64, 64, 64, 2]
    params = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        if init == "he":
            w = rng.normal(0, np.sqrt(2.0 / fan_in), (fan_in, fan_out))
        else:
            w = rng.uniform(-1.0, 1.0, (fan_in, fan_out))
        params[f"fc{i}.weight"] = w.astype(np.float32)
        params[f"fc{i}.bias"] = np.zeros(fan_out, np.float32)
    n_layers = len(sizes) - 1
    with StoreWriter(out_dir) as w:
        for step in range(steps):
            idx = rng.integers(0, len(x), 128)
            h, acts, pre = x[idx], [], []
            for i in range(n_layers):
                acts.append(h)
                z = h @ params[f"fc{i}.weight"] + params[f"fc{i}.bias"]
                pre.append(z)
                h = np.maximum(z, 0) if i < n_layers - 1 else z
            z = h - h.max(axis=1, keepdims=True)
            p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
            loss = float(-np.log(p[np.arange(len(idx)), y[idx]] + 1e-12).mean())
            g = p
            g[np.arange(len(idx)), y[idx]] -= 1
            g /= len(idx)
            grads = {}
            for i in reversed(range(n_layers)):
                grads[f"fc{i}.weight"] = acts[i].T @ g
                grads[f"fc{i}.bias"] = g.sum(axis=0)
                if i:
                    g = (g @ params[f"fc{i}.weight"].T) * (pre[i - 1] > 0)
            if step % 5 == 0 or step == steps - 1:
                for name, value in params.items():
                    w.write(name, step, value)
                    w.write(f"{name}/grad", step, grads[name].astype(np.float32))
                for i in range(n_layers - 1):
                    w.write(f"relu{i}/input", step, pre[i], stats_only=True)
                w.write("loss", step, np.float32(loss))
                w.commit(step)
            for name in params:
                params[name] -= lr * grads[name].astype(np.float32)


def run_demo(out_dir: str, steps: int = 200) -> str:
    """Trains the two demo runs under ``out_dir`` and returns a printable summary."""
    runs = {"good": ("he", 0.1), "bad": ("uniform", 0.001)}
    lines = []
    for label, (init, lr) in runs.items():
        path = os.path.join(out_dir, label)
        if os.path.exists(path):
            import shutil

            shutil.rmtree(path)
        _train(path, init, lr, steps)
        run = open_run(path)
        steps_saved = run.steps()
        first, last = steps_saved[0], steps_saved[-1]
        loss = run.tensor("loss")
        lines.append(
            f"[{label}] init={init} lr={lr}: loss {loss.stats(first).mean:.3f} -> "
            f"{loss.stats(last).mean:.3f} over {last + 1} steps"
        )
        table = run.stats(regex=r"relu\d/input", steps=[first])
        variances = dict(
            zip(map(str, table.column("tensor").to_pylist()), table.column("var").to_pylist())
        )
        ratio = max(variances.values()) / max(min(variances.values()), 1e-30)
        lines.append(
            f"    relu-input variance across layers at step {first}: max/min = {ratio:.1f}"
        )
        for name in ("fc0.weight/grad", "fc3.weight/grad"):
            s = run.tensor(name).stats(last)
            lines.append(
                f"    {name:<18} at step {last}: mean|g| = {s.l1 / s.numel:.3e}  std = {s.std:.3e}"
            )
    return "\n".join(lines)
