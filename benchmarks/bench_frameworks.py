"""Capture overhead per framework: training with the tensorvigil hook vs the same training without.

One function per framework (``bench_<name>(args) -> list[Row]``), chosen with
``--framework`` (default: every framework whose package is installed). Each function times
the no-hook baseline and the hooked configurations in the same run, interleaved round by round
(so drifting machine load hits both alike), and reports the best of ``--repeat`` rounds and the
ratio to the baseline.

    python benchmarks/bench_frameworks.py                      # all installed frameworks
    python benchmarks/bench_frameworks.py --framework xgboost --repeat 5

Every number is labelled with the machine that produced it (``machine_info``).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import machine_info  # noqa: E402


@dataclass
class Row:
    framework: str
    config: str
    best_s: float
    median_s: float
    baseline_s: float
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.best_s / self.baseline_s


def _interleaved(configs: dict[str, Callable[[], None]], repeat: int, warmup: int = 1) -> dict:
    """Runs every config once per round, ``warmup`` untimed rounds then ``repeat`` timed."""
    times: dict[str, list[float]] = {k: [] for k in configs}
    for r in range(warmup + repeat):
        for name, fn in configs.items():
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(dt)
    return times


def _rows(framework: str, times: dict, baseline: str, notes: dict) -> list[Row]:
    import statistics

    base = min(times[baseline])
    return [
        Row(framework, k, min(v), statistics.median(v), base, notes.get(k, ""))
        for k, v in times.items()
    ]


# -- XGBoost ----------------------------------------------------------------------------------------


def bench_xgboost(args: argparse.Namespace) -> list[Row]:
    """200 boosting rounds on a synthetic 20,000 x 50 binary task, eval set of 5,000 rows."""
    import numpy as np
    import xgboost as xgb

    import tensorvigil as tv

    rng = np.random.default_rng(0)
    n, d = 20_000, 50
    x = rng.normal(size=(n + 5_000, d)).astype(np.float32)
    w = rng.normal(size=d)
    logits = x @ w * 0.3 + np.sin(x[:, 0] * 2) + x[:, 1] * x[:, 2]
    y = (logits + rng.logistic(size=len(x)) > 0).astype(np.float32)
    dtr = xgb.DMatrix(x[:n], label=y[:n])
    dva = xgb.DMatrix(x[n:], label=y[n:])
    params = {
        "objective": "binary:logistic",
        "eval_metric": "logloss",
        "max_depth": 6,
        "eta": 0.1,
        "tree_method": "hist",
        "seed": 0,
    }
    if args.threads:
        params["nthread"] = args.threads
    rounds = args.rounds
    evals = [(dtr, "train"), (dva, "validation")]
    root = tempfile.mkdtemp(prefix="tv-bench-xgb-")
    counter = [0]

    def train(make_hook: Callable[[str], object] = None) -> None:
        callbacks = []
        if make_hook is not None:
            counter[0] += 1
            out = os.path.join(root, f"run{counter[0]}")
            callbacks.append(make_hook(out))
        xgb.train(params, dtr, rounds, evals=evals, verbose_eval=False, callbacks=callbacks)
        if callbacks:
            shutil.rmtree(out, ignore_errors=True)

    configs = {
        "no hook": lambda: train(),
        "hook (defaults)": lambda: train(
            lambda out: tv.xgboost.Hook(out, data={"validation": dva})
        ),
        "hook (all every iteration)": lambda: train(
            lambda out: tv.xgboost.Hook(
                out,
                save=tv.SaveConfig(every=1),
                data={"validation": dva},
                importance_types=tv.xgboost.IMPORTANCE_TYPES,
            )
        ),
        "hook + XGBoost rules": lambda: train(
            lambda out: tv.xgboost.Hook(
                out,
                data={"validation": dva},
                rules=[
                    tv.rules.get("FeatureImportanceOverweight"),
                    tv.rules.get("TreeDepth"),
                    tv.rules.get("LossNotDecreasing"),
                    tv.rules.get("ClassImbalance"),
                    tv.rules.get("Confusion", start_step=10),
                ],
                on_finding=lambda f: None,
            )
        ),
    }
    notes = {
        "hook (defaults)": "metrics every iteration; importance (3 types), trees, "
        "labels/predictions of the eval set every 10th",
        "hook (all every iteration)": "everything every iteration, all 5 importance types",
        "hook + XGBoost rules": "defaults + 5 rules on the in-process thread",
    }
    try:
        times = _interleaved(configs, args.repeat)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    label = f"xgboost {xgb.__version__}, {rounds} rounds, nthread={args.threads or 'all'}"
    return [
        Row(r.framework, r.config, r.best_s, r.median_s, r.baseline_s, r.note or label)
        for r in _rows("xgboost", times, "no hook", notes)
    ]


# -- JAX ---------------------------------------------------------------------------------------


def bench_jax(args: argparse.Namespace) -> list[Row]:
    """A jitted optax (Adam) MLP 784-256-256-10 on synthetic data, batch 128, --steps steps."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import tensorvigil as tv

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(args.steps, 128, 784)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 10, size=(args.steps, 128)))
    sizes = [784, 256, 256, 10]
    keys = jax.random.split(jax.random.PRNGKey(0), len(sizes) - 1)
    params0 = {
        f"Dense_{i}": {
            "kernel": jax.random.normal(k, (a, b)) * (2 / a) ** 0.5,
            "bias": jnp.zeros(b),
        }
        for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:]))
    }
    opt = optax.adam(1e-3)

    def loss_fn(p, xb, yb):
        h = xb
        for i in range(len(sizes) - 1):
            h = h @ p[f"Dense_{i}"]["kernel"] + p[f"Dense_{i}"]["bias"]
            if i < len(sizes) - 2:
                h = jax.nn.relu(h)
        return optax.softmax_cross_entropy_with_integer_labels(h, yb).mean()

    @jax.jit
    def train_step(p, st, xb, yb):
        loss, g = jax.value_and_grad(loss_fn)(p, xb, yb)
        u, st = opt.update(g, st, p)
        return optax.apply_updates(p, u), st, loss, g, u

    root = tempfile.mkdtemp(prefix="tv-bench-jax-")

    def loop(hook=None) -> None:
        p, st = params0, opt.init(params0)
        for i in range(args.steps):
            new_p, st, loss, g, u = train_step(p, st, x[i], y[i])
            if hook is not None:
                hook.save_step(params=p, grads=g, updates=u, opt_state=st, loss=loss)
            p = new_p
        jax.block_until_ready(p)

    hooks = {
        "hook (defaults)": tv.jax.Hook(os.path.join(root, "a")),
        "hook (every step)": tv.jax.Hook(os.path.join(root, "b"), save=tv.SaveConfig(every=1)),
        "hook (every step, stats)": tv.jax.Hook(
            os.path.join(root, "c"), save=tv.SaveConfig(every=1), reductions_only=True
        ),
        "hook (every step, stats, device)": tv.jax.Hook(
            os.path.join(root, "d"), save=tv.SaveConfig(every=1), reductions_only=True,
            device_stats=True,
        ),
        "hook (every step, stats, host)": tv.jax.Hook(
            os.path.join(root, "e"), save=tv.SaveConfig(every=1), reductions_only=True,
            device_stats=False,
        ),
        "hook (every step, device)": tv.jax.Hook(
            os.path.join(root, "f"), save=tv.SaveConfig(every=1), device_stats=True
        ),
    }
    configs = {"no hook": lambda: loop()}
    for name, h in hooks.items():
        configs[name] = lambda h=h: loop(h)
    notes = {
        "hook (defaults)": "every 10th step: params, grads, updates, Adam mu/nu, loss (values)",
        "hook (every step)": "the same every step",
        "hook (every step, stats)": "every step, statistics only",
        "hook (every step, stats, device)": "the same, statistics computed by XLA on the device "
        "(device_stats=True)",
        "hook (every step, stats, host)": "the same, native statistics on the host "
        "(device_stats=False)",
        "hook (every step, device)": "every step with values, statistics on the device",
    }
    try:
        times = _interleaved(configs, args.repeat)
    finally:
        for h in hooks.values():
            h.close()
        shutil.rmtree(root, ignore_errors=True)
    label = f"jax {jax.__version__} ({jax.default_backend()}), {args.steps} steps"
    return [
        Row(r.framework, r.config, r.best_s, r.median_s, r.baseline_s, (r.note + "; " + label))
        for r in _rows("jax", times, "no hook", notes)
    ]


# -- Keras 3 -------------------------------------------------------------------------------------


def bench_keras(args: argparse.Namespace) -> list[Row]:
    """``model.fit`` of an MLP 784-256-256-10 (SGD), batch 128, --steps batches per round.

    The backend is ``--keras-backend`` (default: ``KERAS_BACKEND`` or tensorflow); Keras reads
    it once per process, so run the script once per backend.
    """
    if "keras" not in sys.modules:
        os.environ["KERAS_BACKEND"] = args.keras_backend or os.environ.get(
            "KERAS_BACKEND", "tensorflow"
        )
    import keras
    import numpy as np

    import tensorvigil as tv

    rng = np.random.default_rng(0)
    n = args.steps * 128
    x = rng.normal(size=(n, 784)).astype(np.float32)
    y = rng.integers(0, 10, size=n).astype(np.int32)

    def model():
        keras.utils.set_random_seed(0)
        m = keras.Sequential(
            [
                keras.Input((784,)),
                keras.layers.Dense(256, activation="relu"),
                keras.layers.Dense(256, activation="relu"),
                keras.layers.Dense(10),
            ]
        )
        m.compile(
            optimizer=keras.optimizers.SGD(0.01),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        return m

    root = tempfile.mkdtemp(prefix="tv-bench-keras-")
    hooks = {
        "hook (defaults)": tv.keras.Hook(os.path.join(root, "a")),
        "hook (every step)": tv.keras.Hook(os.path.join(root, "b"), save=tv.SaveConfig(every=1)),
        "hook (every step, +outputs)": tv.keras.Hook(
            os.path.join(root, "c"), collections=["default", "outputs"], save=tv.SaveConfig(every=1)
        ),
        # saves the first step of the first round only: what the hook costs on unsaved steps
        "hook (unsaved steps)": tv.keras.Hook(
            os.path.join(root, "d"), save=tv.SaveConfig(every=1 << 40)
        ),
    }

    class NullBatchCallback(keras.callbacks.Callback):
        """Keras' own cost of any per-batch callback (logs converted to NumPy every batch)."""

        def on_train_batch_begin(self, batch, logs=None):
            pass

        def on_train_batch_end(self, batch, logs=None):
            pass

    hooks["empty batch callback"] = NullBatchCallback()
    models = {name: model() for name in ["no hook", *hooks]}

    def fit(name: str) -> None:
        cb = [hooks[name]] if name in hooks else []
        models[name].fit(x, y, batch_size=128, epochs=1, shuffle=False, verbose=0, callbacks=cb)

    configs = {name: (lambda name=name: fit(name)) for name in models}
    notes = {
        "empty batch callback": "a callback with empty batch methods: the floor of any hook",
        "hook (defaults)": "every 10th batch: weights, grads, loss, metrics (train-step wrapper)",
        "hook (every step)": "the same every batch",
        "hook (every step, +outputs)": "every batch, also layer outputs"
        + (" (turns XLA off)" if keras.backend.backend() == "tensorflow" else ""),
        "hook (unsaved steps)": "no batch saved (but the first): compare with the empty callback",
    }
    try:
        times = _interleaved(configs, args.repeat)
    finally:
        for h in hooks.values():
            if isinstance(h, tv.keras.Hook):
                h.close()
        shutil.rmtree(root, ignore_errors=True)
    label = f"keras {keras.__version__} on {keras.backend.backend()}, {args.steps} batches"
    return [
        Row(r.framework, r.config, r.best_s, r.median_s, r.baseline_s, (r.note + "; " + label))
        for r in _rows("keras", times, "no hook", notes)
    ]


#: framework name -> (module that must be installed, benchmark function)
FRAMEWORKS: dict[str, tuple[str, Callable[[argparse.Namespace], list[Row]]]] = {
    "xgboost": ("xgboost", bench_xgboost),
    "jax": ("optax", bench_jax),
    "keras": ("keras", bench_keras),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--framework", action="append", choices=sorted(FRAMEWORKS),
                   help="framework to benchmark (repeatable; default: all installed)")
    p.add_argument("--repeat", type=int, default=3, help="timed rounds (best of)")
    p.add_argument("--rounds", type=int, default=200, help="XGBoost boosting rounds")
    p.add_argument("--threads", type=int, default=0, help="framework threads (0: default)")
    p.add_argument("--steps", type=int, default=200, help="JAX / Keras training steps per round")
    p.add_argument("--keras-backend", choices=["tensorflow", "torch", "jax"],
                   help="Keras backend (default: KERAS_BACKEND or tensorflow)")
    args = p.parse_args(argv)
    names = args.framework or [
        k for k, (mod, _) in FRAMEWORKS.items() if importlib.util.find_spec(mod) is not None
    ]
    print(machine_info())
    print()
    print(f"{'framework':<10} {'config':<28} {'best s':>8} {'median s':>9} {'ratio':>7}  note")
    for name in names:
        mod, fn = FRAMEWORKS[name]
        if importlib.util.find_spec(mod) is None:
            print(f"{name:<10} skipped: {mod} is not installed")
            continue
        for r in fn(args):
            print(f"{r.framework:<10} {r.config:<28} {r.best_s:>8.3f} {r.median_s:>9.3f} "
                  f"{r.ratio:>6.3f}x  {r.note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
