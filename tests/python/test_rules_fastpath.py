"""The block fast path (Rule.fast_forward) finds exactly what step-by-step evaluation finds.

A run with healthy stretches and every kind of trouble the default rules see from statistics
(NaN and Inf, vanishing and exploding gradients, a loss spike, a plateau), eval steps between
train steps (blocks split by mode), a tensor that appears later (blocks split by layout) and
several ranks, is evaluated twice: with the rules' ``fast_forward`` and with it replaced by
the base class's (which skips nothing, so ``evaluate`` sees every step). The findings must be
identical, in one poll and in many.
"""

import json

import numpy as np
import pytest

import tensorvigil as tv
from tensorvigil.rules import Rule
from tensorvigil.rules.builtin import REGISTRY

LAYERS = 4


def _write(path, steps, ranks=(0,)):
    rng = np.random.default_rng(7)
    names = []
    for i in range(LAYERS):
        names += [(f"l{i}.weight", "weights", (32, 16)), (f"l{i}.bias", "biases", (16,))]
        names += [
            (f"l{i}.weight/grad", "gradients", (32, 16)),
            (f"l{i}.bias/grad", "gradients", (16,)),
        ]
    base = {n: rng.normal(0, 0.05, shape).astype(np.float32) for n, _, shape in names}
    writers = {r: tv.StoreWriter(path, rank=r, fsync=False) for r in ranks}
    for s in range(steps):
        mode = "eval" if s % 25 == 24 else "train"
        for w in writers.values():
            for n, _, _ in names:
                x = base[n] * (1.0 + 0.01 * np.sin(s / 7.0)) + rng.normal(0, 1e-3, base[n].shape)
                x = x.astype(np.float32)
                if n.endswith("/grad"):
                    if 60 <= s < 70:
                        x = x * 1e-9  # vanishing
                    if n == "l0.weight/grad" and 120 <= s < 126:
                        x = x * 1e4  # first layer explodes against the last
                    if n == "l2.bias/grad" and s in (40, 41, 90):
                        x = x.copy()
                        x[3] = np.nan if s != 90 else np.inf
                w.write(n, s, x, mode=mode, stats_only=True)
            if s >= 150:  # a tensor that appears later: another layout
                w.write("extra", s, rng.normal(size=8).astype(np.float32), mode=mode)
            loss = 2.0 * np.exp(-s / 40.0) + 0.1 + rng.normal(0, 0.002)
            if 170 <= s < 230:
                loss = 0.3  # plateau: LossNotDecreasing
            if s == 200:
                loss = 40.0  # spike
            w.write("loss", s, np.float32(loss), mode=mode)
            w.commit(s, mode=mode)
    for w in writers.values():
        w.close()
    cols: dict = {}
    for n, c, _ in names:
        cols.setdefault(c, []).append(n)
    cols["losses"] = ["loss"]
    with open(f"{path}/collections.json", "w") as f:
        json.dump(cols, f)


def _rules():
    return tv.rules.defaults() + [
        tv.rules.get("LossNotDecreasing", patience=2, num_steps=5),
        tv.rules.get("LossNotDecreasing", mode="eval", num_steps=3),
        tv.rules.get("ExplodingTensor", only_nan=True),
    ]


def _key(findings):
    return [
        (
            f.rule,
            f.step,
            f.mode,
            f.mode_step,
            f.kind,
            f.severity,
            f.message,
            json.dumps(f.to_json()["evidence"]),
        )
        for f in findings
    ]


def _slow(monkeypatch):
    for cls in REGISTRY.values():
        for klass in cls.__mro__:
            if "fast_forward" in vars(klass) and klass is not Rule:
                monkeypatch.setattr(klass, "fast_forward", Rule.fast_forward)


@pytest.mark.parametrize("ranks", [(0,), (0, 1)])
def test_fast_path_matches_step_by_step(tmp_path, monkeypatch, ranks):
    path = str(tmp_path / "run")
    _write(path, 260, ranks)
    fast = tv.rules.RuleEngine(path, _rules(), record=False).poll()
    with monkeypatch.context() as m:
        _slow(m)
        slow = tv.rules.RuleEngine(path, _rules(), record=False).poll()
    assert _key(fast) == _key(slow)
    fired = {f.rule for f in fast if f.fired}
    # The run really exercises the rules (the comparison is not between two empty lists).
    assert {"ExplodingTensor", "VanishingGradient", "GradientNormRatio", "LossSpike"} <= fired
    assert "LossNotDecreasing" in fired


def test_fast_path_matches_when_polled_in_pieces(tmp_path, monkeypatch):
    path = str(tmp_path / "run")
    _write(path, 260)
    whole = tv.rules.RuleEngine(path, _rules(), record=False).poll()
    engine = tv.rules.RuleEngine(path, _rules(), record=False)
    engine.chunk_rows = 500  # many chunks, blocks cut at arbitrary steps
    assert _key(engine.poll()) == _key(whole)
    with monkeypatch.context() as m:
        _slow(m)
        slow = tv.rules.RuleEngine(path, _rules(), record=False)
        slow.chunk_rows = 777
        assert _key(slow.poll()) == _key(whole)
