"""Training-health rules (tensorvigil.rules.builtin.health) on synthetic and real runs."""

import json
import os
import time

import numpy as np
import pytest

import tensorvigil as tv
from tensorvigil.rules import RuleEngine
from tensorvigil.rules.builtin import health as H


def write_run(path, steps, collections=None, *, exp_hist=False, hist_bins=0, stats_only=()):
    """Writes a run: ``steps`` is a list of dicts name -> value, or (mode, mode_step, dict)."""
    with tv.StoreWriter(path, fsync=False) as w:
        for s, item in enumerate(steps):
            mode, ms, tensors = item if isinstance(item, tuple) else ("train", s, item)
            for name, value in tensors.items():
                w.write(
                    name,
                    s,
                    value,
                    mode=mode,
                    mode_step=ms,
                    exp_hist=exp_hist,
                    hist_bins=hist_bins,
                    stats_only=name in stats_only,
                )
            w.commit(s, mode=mode, mode_step=ms)
    if collections is not None:
        with open(os.path.join(path, "collections.json"), "w") as f:
            json.dump(collections, f)
    return path


def fired(run, rule):
    out = RuleEngine(run, [rule], record=False).poll()
    errors = [f for f in out if f.kind == "error"]
    assert not errors, errors[0].message
    return [f for f in out if f.fired]


def steps_of(findings):
    return [f.step for f in findings]


R = np.random.default_rng(7)


def normal(scale, shape=(8, 8)):
    return (R.standard_normal(shape) * scale).astype(np.float32)


GRADS = {"gradients": ["fc1.weight/grad", "fc2.weight/grad"], "weights": ["fc1.weight"]}


# -- VanishingGradient ----------------------------------------------------------------------------


def test_vanishing_gradient_fires_on_edges(tmp_run):
    scales = [1e-2, 1e-2, 1e-2, 1e-9, 1e-9, 1e-9, 1e-2, 1e-9]
    steps = [{"fc1.weight/grad": normal(s), "fc2.weight/grad": normal(1e-2)} for s in scales]
    write_run(tmp_run, steps, GRADS)
    f = fired(tmp_run, H.VanishingGradient())
    assert steps_of(f) == [3, 7]  # once when it starts, again after it cleared
    ev = f[0].evidence
    assert ev["threshold"] == 1e-7 and ev["tensors"] == ["fc1.weight/grad"]
    assert ev["mean_abs"]["fc1.weight/grad"] < 1e-7
    assert f[0].severity == "warning" and "fc1.weight/grad" in f[0].message


def test_vanishing_gradient_silent_and_fallback_without_collections(tmp_run, tmp_path):
    write_run(tmp_run, [{"fc1.weight/grad": normal(1e-3)} for _ in range(5)], GRADS)
    assert fired(tmp_run, H.VanishingGradient()) == []
    # No collections.json: gradients are found by their "/grad" names.
    other = str(tmp_path / "nocoll")
    write_run(other, [{"fc1.weight/grad": normal(1e-9), "fc1.weight": normal(1e-9)}])
    f = fired(other, H.VanishingGradient())
    assert steps_of(f) == [0] and f[0].evidence["tensors"] == ["fc1.weight/grad"]


def test_engine_feeds_steps_incrementally(tmp_run):
    rule = H.VanishingGradient(threshold=1e-5)
    w = tv.StoreWriter(tmp_run, fsync=False)
    with open(os.path.join(tmp_run, "collections.json"), "w") as fh:
        json.dump(GRADS, fh)
    engine = RuleEngine(tmp_run, [rule], record=False)
    try:
        for s in range(3):
            w.write("fc1.weight/grad", s, normal(1e-2))
            w.commit(s)
        w.flush()
        assert engine.poll() == []
        for s in range(3, 6):
            w.write("fc1.weight/grad", s, normal(1e-8))
            w.commit(s)
        w.flush()
        assert steps_of(engine.poll()) == [3]
        assert engine.poll() == []
        assert engine.steps_evaluated == 6
    finally:
        w.close()


# -- ExplodingTensor ------------------------------------------------------------------------------


def test_exploding_tensor_fires_on_nan_as_error(tmp_run):
    bad = normal(1.0)
    bad[0, 0] = np.nan
    steps = [{"fc1.weight": normal(1.0), "loss": 1.0} for _ in range(2)]
    steps += [{"fc1.weight": bad, "loss": 1.0}, {"fc1.weight": bad, "loss": np.inf}]
    write_run(tmp_run, steps, {"weights": ["fc1.weight"], "losses": ["loss"]})
    f = fired(tmp_run, H.ExplodingTensor())
    assert steps_of(f) == [2, 3]
    assert f[0].severity == "error"
    assert f[0].evidence["counts"]["fc1.weight"]["nan"] == 1
    assert f[1].evidence["tensors"] == ["loss"]  # fc1.weight still NaN: not repeated
    assert steps_of(fired(tmp_run, H.ExplodingTensor(only_nan=True))) == [2]
    assert steps_of(fired(tmp_run, H.ExplodingTensor(collections=["losses"]))) == [3]
    assert steps_of(fired(tmp_run, H.ExplodingTensor(tensor_regex=r"^fc"))) == [2]


def test_exploding_tensor_silent(tmp_run):
    write_run(tmp_run, [{"fc1.weight": normal(1e6), "loss": 1e30} for _ in range(3)])
    assert fired(tmp_run, H.ExplodingTensor()) == []


# -- PoorWeightInitialization ---------------------------------------------------------------------

PWI_COLL = {
    "relu_input": ["relu1/input", "relu2/input"],
    "gradients": ["fc1.weight/grad"],
    "losses": ["loss"],
}


def test_poor_weight_initialization_variance_and_loss(tmp_run):
    steps = [
        {
            "relu1/input": normal(1.0, (16, 8)),
            "relu2/input": normal(40.0, (16, 8)),
            "fc1.weight/grad": normal(0.1),
            "loss": 2.0,
        }
        for s in range(12)
    ]
    write_run(tmp_run, steps, PWI_COLL)
    f = fired(tmp_run, H.PoorWeightInitialization())
    checks = {x.evidence["check"]: x for x in f}
    assert set(checks) == {"activation_variance", "loss"}
    # The ratio must exceed the threshold at a majority of the first steps=10 steps: 6 of 6.
    assert checks["activation_variance"].step == 5
    assert checks["activation_variance"].evidence["ratio"] > 10
    assert checks["activation_variance"].evidence["steps_above"] == 6
    assert checks["loss"].step == 9  # patience=5: mean of losses 5..9 vs mean of 0..4


def test_poor_weight_initialization_noise_aware_and_minority(tmp_run):
    # Variance ratio above the threshold at 4 of the first 10 steps only; a noisy loss that
    # does not drop between two windows by noise; one small quiet gradient tensor.
    steps = [
        {
            "relu1/input": normal(1.0, (16, 8)),
            "relu2/input": normal(40.0 if s < 4 else 1.5, (16, 8)),
            "fc1.weight/grad": normal(0.1, (16, 16)),
            "fc1.bias/grad": normal(1e-6, (16,)),
            "loss": 2.0 - 0.01 * s + (0.3 if s % 3 == 0 else 0.0),
        }
        for s in range(12)
    ]
    write_run(
        tmp_run,
        steps,
        {**PWI_COLL, "gradients": ["fc1.weight/grad", "fc1.bias/grad"]},
        exp_hist=True,
    )
    assert fired(tmp_run, H.PoorWeightInitialization()) == []


def test_poor_weight_initialization_gradient_spread(tmp_run):
    # Tiny gradients with rare large outliers: max-min is large, the exponent histogram
    # still proves the 5th-95th percentile spread below the range.
    g = normal(1e-6, (100, 10))
    g[0, :5] = 1.0
    write_run(
        tmp_run, [{"fc1.weight/grad": g, "fc2.weight/grad": normal(0.1)}], GRADS, exp_hist=True
    )
    f = fired(tmp_run, H.PoorWeightInitialization())
    assert steps_of(f) == [0]
    assert f[0].evidence["tensors"] == ["fc1.weight/grad"]
    assert f[0].evidence["method"]["fc1.weight/grad"] == "exp_hist"
    # Fixed-bin histogram path.
    other = tmp_run + "_hist"
    write_run(other, [{"fc1.weight/grad": g}], GRADS, hist_bins=4096)
    f = fired(other, H.PoorWeightInitialization())
    assert f and f[0].evidence["method"]["fc1.weight/grad"] == "histogram"
    # Without any histogram only max-min can prove it: stays silent (conservative).
    other = tmp_run + "_plain"
    write_run(other, [{"fc1.weight/grad": g}], GRADS)
    assert fired(other, H.PoorWeightInitialization()) == []


def test_poor_weight_initialization_silent_on_good_init(tmp_run):
    steps = [
        {
            "relu1/input": normal(1.0, (16, 8)),
            "relu2/input": normal(1.5, (16, 8)),
            "fc1.weight/grad": normal(0.05),
            "loss": 2.0 - 0.1 * s,
        }
        for s in range(12)
    ]
    write_run(tmp_run, steps, PWI_COLL, exp_hist=True)
    assert fired(tmp_run, H.PoorWeightInitialization()) == []


# -- SaturatedActivation / DeadRelu ---------------------------------------------------------------


def test_saturated_activation(tmp_run):
    sat = normal(1.0, (32, 16))
    sat[:, :12] = 20.0  # 12 of 16 units always outside the tanh band
    steps = [
        {"tanh1/input": normal(1.0, (32, 16)), "sig1/input": np.full((32, 16), -20.0)},
        {"tanh1/input": sat, "sig1/input": np.full((32, 16), -20.0)},
    ]
    coll = {"tanh_input": ["tanh1/input"], "sigmoid_input": ["sig1/input"]}
    write_run(tmp_run, steps, coll)
    rule = H.SaturatedActivation()
    assert rule.needs.values
    f = fired(tmp_run, rule)
    assert steps_of(f) == [1]  # -20 is inside the sigmoid band (-23, 17)
    assert f[0].evidence["tensors"] == ["tanh1/input"]
    assert f[0].evidence["inactive_percent"]["tanh1/input"] == pytest.approx(75.0)


def test_saturated_activation_silent(tmp_run):
    write_run(
        tmp_run,
        [{"tanh1/input": normal(3.0, (32, 16))} for _ in range(3)],
        {"tanh_input": ["tanh1/input"]},
    )
    assert fired(tmp_run, H.SaturatedActivation()) == []


def test_dead_relu(tmp_run):
    dead = np.maximum(normal(1.0, (32, 16)), 0)
    dead[:, :12] = 0.0
    steps = [
        {"relu1/output": np.maximum(normal(1.0, (32, 16)), 0)},
        {"relu1/output": dead},
        {"relu1/output": dead},
    ]
    write_run(tmp_run, steps, {"relu_output": ["relu1/output"]})
    f = fired(tmp_run, H.DeadRelu(window=1))
    assert steps_of(f) == [1]
    assert f[0].evidence["inactive_percent"]["relu1/output"] == pytest.approx(75.0)
    assert f[0].evidence["threshold_layer"] == 50.0
    # Stricter layer threshold: silent.
    assert fired(tmp_run, H.DeadRelu(threshold_layer=80.0, window=1)) == []
    # Default window of 5 saved steps: a layer is judged on the activity of 5 steps.
    other = tmp_run + "_window"
    write_run(other, [{"relu1/output": dead} for _ in range(6)], {"relu_output": ["relu1/output"]})
    f = fired(other, H.DeadRelu())
    assert steps_of(f) == [4] and f[0].evidence["window"] == 5


def test_dead_relu_window_accumulates_sparse_activity(tmp_run):
    # 12 of 16 units are silent in most batches but each fires in some batch of the window:
    # judged step by step the layer flaps, accumulated over 5 steps it is alive.
    steps = []
    for s in range(10):
        x = np.maximum(normal(1.0, (32, 16)), 0)
        x[:, :12] = 0.0
        x[:4, (s % 4) * 3 : (s % 4) * 3 + 3] = 1.0
        steps.append({"relu1/output": x})
    write_run(tmp_run, steps, {"relu_output": ["relu1/output"]})
    assert fired(tmp_run, H.DeadRelu(window=1))
    assert fired(tmp_run, H.DeadRelu()) == []


def test_dead_relu_silent_and_regex_without_collections(tmp_run):
    steps = [{"block.relu_output": np.maximum(normal(1.0, (32, 16)), 0)} for _ in range(3)]
    write_run(tmp_run, steps)
    assert fired(tmp_run, H.DeadRelu()) == []


# -- WeightUpdateRatio ----------------------------------------------------------------------------


def test_weight_update_ratio_small_and_large(tmp_run):
    w0 = normal(1.0)
    steps = [
        {"fc1.weight": w0},
        {"fc1.weight": w0},
        {"fc1.weight": w0 * 1.01},
        {"fc1.weight": w0 * 100},
    ]
    write_run(tmp_run, steps, {"weights": ["fc1.weight"]})
    f = fired(tmp_run, H.WeightUpdateRatio())
    assert steps_of(f) == [1, 3]
    assert f[0].evidence["ratio"]["fc1.weight"] == 0.0 and "too small" in f[0].message
    assert f[1].evidence["ratio"]["fc1.weight"] == pytest.approx(98.99 / 1.01, rel=1e-5)


def test_weight_update_ratio_silent_and_num_steps(tmp_run):
    w0 = normal(1.0)
    steps = [{"fc1.weight": w0 * (1 + 1e-3 * s)} for s in range(4)]
    write_run(tmp_run, steps, {"weights": ["fc1.weight"]})
    assert fired(tmp_run, H.WeightUpdateRatio()) == []
    # Saved steps 0 and 3 only, unchanged: too far apart for num_steps=2.
    other = tmp_run + "_sparse"
    write_run(other, [{"fc1.weight": w0}, {}, {}, {"fc1.weight": w0}], {"weights": ["fc1.weight"]})
    assert fired(other, H.WeightUpdateRatio(num_steps=2)) == []
    assert steps_of(fired(other, H.WeightUpdateRatio())) == [3]


# -- TensorVariance / AllZero ---------------------------------------------------------------------


def test_tensor_variance(tmp_run):
    steps = [{"a": normal(1.0), "b": normal(1.0)}, {"a": normal(100.0), "b": normal(1e-4)}]
    write_run(tmp_run, steps)
    f = fired(tmp_run, H.TensorVariance(max_threshold=10.0, min_threshold=1e-3))
    assert steps_of(f) == [1] and sorted(f[0].evidence["tensors"]) == ["a", "b"]
    assert fired(tmp_run, H.TensorVariance(tensor_regex="^a$", max_threshold=1e5)) == []


def test_all_zero(tmp_run):
    steps = [{"fc1.weight/grad": normal(1.0)}, {"fc1.weight/grad": np.zeros((8, 8))}]
    write_run(tmp_run, steps, GRADS)
    f = fired(tmp_run, H.AllZero(collections="gradients"))
    assert steps_of(f) == [1] and f[0].evidence["zero_percent"]["fc1.weight/grad"] == 100.0
    half = tmp_run + "_half"
    x = normal(1.0)
    x[:4] = 0
    write_run(half, [{"fc1.weight/grad": x}], GRADS)
    assert fired(half, H.AllZero(collections=["gradients"])) == []
    assert steps_of(fired(half, H.AllZero(tensor_regex="grad", threshold=50))) == [0]


# -- UnchangedTensor ------------------------------------------------------------------------------


def test_unchanged_tensor(tmp_run):
    a, b = normal(1.0), normal(1.0)
    vals = [a, a, a, a, b, b, b]
    write_run(tmp_run, [{"fc1.weight": v} for v in vals], {"weights": ["fc1.weight"]})
    f = fired(tmp_run, H.UnchangedTensor(collections=["weights"]))
    assert steps_of(f) == [2, 6]
    assert f[0].evidence["tensors"] == ["fc1.weight"] and f[0].evidence["num_steps"] == 3


def test_unchanged_tensor_silent_and_same_stats_different_values(tmp_run):
    a = normal(1.0)
    # A permutation has identical statistics: only the values tell it changed.
    vals = [a, a[::-1].copy(), a, a[::-1].copy()]
    write_run(tmp_run, [{"w": v} for v in vals])
    assert fired(tmp_run, H.UnchangedTensor(tensor_regex="^w$")) == []
    assert steps_of(fired(tmp_run, H.UnchangedTensor(tensor_regex="^w$", rtol=10, atol=10))) == [2]


# -- losses ---------------------------------------------------------------------------------------

LOSSES = {"losses": ["loss", "loss/eval"]}


def test_loss_not_decreasing(tmp_run):
    write_run(tmp_run, [{"loss": 1.0} for _ in range(25)], LOSSES)
    f = fired(tmp_run, H.LossNotDecreasing())
    assert steps_of(f) == [10]
    assert f[0].evidence["losses"]["loss"]["drop_percent"] == 0.0
    assert f[0].evidence["mode"] == "train"


def test_loss_not_decreasing_noise_aware(tmp_run):
    # Decreasing loss with mini-batch noise: one window mean sits above the previous one by
    # noise (0.36 -> 0.37), not by a significant amount: silent.
    rng = np.random.default_rng(3)
    losses = [1.0 / (1 + 0.1 * s) + 0.06 * rng.standard_normal() for s in range(60)]
    write_run(tmp_run, [{"loss": v} for v in losses], LOSSES)
    assert fired(tmp_run, H.LossNotDecreasing()) == []
    # A clear rise counts, and patience requires consecutive checks.
    other = tmp_run + "_rise"
    write_run(other, [{"loss": 1.0 + 0.05 * s + 0.01 * (s % 2)} for s in range(40)], LOSSES)
    # (the first check compares with one loss, whose noise is the window's spread: a rise
    # of 0.28 against a spread of 0.15 is not significant; the next window's is)
    assert steps_of(fired(other, H.LossNotDecreasing())) == [20]
    assert steps_of(fired(other, H.LossNotDecreasing(patience=2))) == [30]
    # significance=0 is the plain comparison of window means.
    f = fired(tmp_run, H.LossNotDecreasing(significance=0.0))
    assert all(x.evidence["significance"] == 0.0 for x in f)


def test_loss_not_decreasing_silent_and_prefers_eval(tmp_run):
    write_run(tmp_run, [{"loss": 1.0 / (s + 1)} for s in range(25)], LOSSES)
    assert fired(tmp_run, H.LossNotDecreasing()) == []
    # Eval steps (mode step 0..) with a flat loss; train loss decreases: eval is used.
    other = tmp_run + "_eval"
    steps = []
    for s in range(30):
        if s % 2:
            steps.append(("eval", s // 2, {"loss": 0.5}))
        else:
            steps.append(("train", s // 2, {"loss": 1.0 / (s + 1)}))
    write_run(other, steps, LOSSES)
    f = fired(other, H.LossNotDecreasing())
    assert steps_of(f) == [21] and f[0].mode == "eval"
    assert fired(other, H.LossNotDecreasing(mode="train")) == []


def test_overfit_eval_mode_and_named_eval_loss(tmp_run):
    steps = []
    for s in range(12):
        if s % 4 == 3:
            steps.append(("eval", s // 4, {"loss": 1.5}))
        else:
            steps.append(("train", s, {"loss": 1.0}))
    write_run(tmp_run, steps, LOSSES)
    f = fired(tmp_run, H.Overfit())
    assert steps_of(f) == [3]
    assert f[0].evidence["ratio"] == pytest.approx(0.5)
    assert steps_of(fired(tmp_run, H.Overfit(start_step=4, patience=2))) == [11]
    # "loss/eval" recorded in train-mode steps.
    other = tmp_run + "_named"
    write_run(other, [{"loss": 1.0, "loss/eval": 1.0 + 0.04 * s} for s in range(6)], LOSSES)
    assert steps_of(fired(other, H.Overfit())) == [3]


def test_overfit_silent(tmp_run):
    write_run(tmp_run, [{"loss": 1.0, "loss/val": 1.05} for _ in range(6)])
    assert fired(tmp_run, H.Overfit()) == []


def test_overtraining(tmp_run):
    write_run(tmp_run, [{"loss": 1.0 - 0.01 * s} for s in range(8)], LOSSES)
    f = fired(tmp_run, H.Overtraining())
    assert steps_of(f) == [5] and "training" in f[0].evidence
    write_run(tmp_run + "_ok", [{"loss": 5.0 - 0.2 * s} for s in range(20)], LOSSES)
    assert fired(tmp_run + "_ok", H.Overtraining()) == []


# -- StalledTraining ------------------------------------------------------------------------------


def test_stalled_training_gap_and_check_idle(tmp_run):
    with tv.StoreWriter(tmp_run, fsync=False) as w:
        for s in range(4):
            if s == 2:
                time.sleep(0.6)
            w.write("loss", s, 1.0)
            w.commit(s)
    rule = H.StalledTraining(threshold=0.4)
    f = fired(tmp_run, rule)
    assert steps_of(f) == [2] and f[0].evidence["idle_seconds"] > 0.4
    assert f[0].evidence["previous_step"] == 1
    # The run ended cleanly: idle time is not a stall.
    assert rule.check_idle(time.time() + 100) is None


def test_stalled_training_check_idle_live(tmp_run):
    w = tv.StoreWriter(tmp_run, fsync=False)
    try:
        for s in range(3):
            w.write("loss", s, 1.0)
            w.commit(s)
        w.flush()
        rule = H.StalledTraining(threshold=60, stop_training_on_fire=True)
        assert fired(tmp_run, rule) == []
        assert rule.check_idle() is None  # just committed
        f = rule.check_idle(time.time() + 120)
        assert f is not None and f.step == 2 and f.fired and f.evidence["idle_seconds"] > 60
        assert rule.check_idle(time.time() + 240) is None  # once per idle period
        assert os.path.exists(os.path.join(tmp_run, "stop_request.json"))
    finally:
        w.close()


# -- SimilarAcrossRuns ----------------------------------------------------------------------------


def test_similar_across_runs(tmp_path):
    a = [normal(1.0) for _ in range(4)]
    b = [x.copy() for x in a]
    b[2] = a[2][::-1].copy()  # same statistics, other values
    b[3] = a[3] * 2
    r1 = write_run(str(tmp_path / "r1"), [{"w": x, "loss": 1.0} for x in a])
    r2 = write_run(str(tmp_path / "r2"), [{"w": x, "loss": 1.0} for x in b])
    f = fired(r1, H.SimilarAcrossRuns(other=r2))
    assert steps_of(f) == [2]  # step 3 still differs: not repeated
    assert f[0].evidence["differences"]["w"]["stat"] == "values"
    rule = H.SimilarAcrossRuns(other=tv.open(r2), tensor_regex="^w$")
    assert steps_of(fired(r1, rule)) == [2]
    assert fired(r1, H.SimilarAcrossRuns(other=r1)) == []


def test_similar_across_runs_stats_only(tmp_path):
    r1 = write_run(str(tmp_path / "r1"), [{"w": np.ones(4)}], stats_only={"w"})
    r2 = write_run(str(tmp_path / "r2"), [{"w": np.full(4, 1.5)}], stats_only={"w"})
    f = fired(r1, H.SimilarAcrossRuns(other=r2))
    assert steps_of(f) == [0] and f[0].evidence["differences"]["w"]["stat"] == "min"


# -- parameters -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls, kwargs, param",
    [
        (H.VanishingGradient, {"threshold": "small"}, "threshold"),
        (H.ExplodingTensor, {"tensor_regex": "("}, "tensor_regex"),
        (H.ExplodingTensor, {"collections": [1]}, "collections"),
        (H.PoorWeightInitialization, {"activation_inputs_regex": "[a"}, "activation_inputs_regex"),
        (H.PoorWeightInitialization, {"patience": 0}, "patience"),
        (H.SaturatedActivation, {"threshold_tanh": (1, -1)}, "threshold_tanh"),
        (H.SaturatedActivation, {"tensor_regex": "*"}, "tensor_regex"),
        (H.DeadRelu, {"threshold_layer": 150}, "threshold_layer"),
        (H.WeightUpdateRatio, {"num_steps": 0}, "num_steps"),
        (H.WeightUpdateRatio, {"small_threshold": 20.0}, "small_threshold"),
        (H.TensorVariance, {"max_threshold": 1.0, "tensor_regex": "("}, "tensor_regex"),
        (H.TensorVariance, {}, "max_threshold"),
        (H.AllZero, {}, "tensor_regex or collections"),
        (H.AllZero, {"collections": "weights", "threshold": -1}, "threshold"),
        (H.UnchangedTensor, {"collections": ["weights"], "num_steps": 1}, "num_steps"),
        (H.UnchangedTensor, {"tensor_regex": "(("}, "tensor_regex"),
        (H.LossNotDecreasing, {"mode": "sideways"}, "mode"),
        (H.Overfit, {"patience": 0}, "patience"),
        (H.Overtraining, {"delta": -1}, "delta"),
        (H.StalledTraining, {"threshold": 0}, "threshold"),
        (H.SimilarAcrossRuns, {}, "other"),
        (H.SimilarAcrossRuns, {"other": "/nonexistent/run"}, "other"),
    ],
)
def test_invalid_parameters_name_the_parameter(cls, kwargs, param):
    with pytest.raises(tv.InvalidArgumentError, match=param):
        cls(**kwargs)


def test_defaults_and_all():
    assert len(H.__all__) == 14
    assert H.VanishingGradient().threshold == 1e-7
    p = H.PoorWeightInitialization().params()
    assert p == {
        "activation_inputs_regex": ".*relu_input",
        "threshold": 10.0,
        "distribution_range": 0.001,
        "patience": 5,
        "steps": 10,
        "min_elements": 100,
        "significance": 2.0,
    }
    s = H.SaturatedActivation()
    assert s.threshold_tanh == (-9.4999, 9.4999) and s.threshold_sigmoid == (-23, 16.99999)
    assert H.LossNotDecreasing().mode is None and H.StalledTraining().threshold == 1800
    values = {n for n in H.__all__ if getattr(H, n).needs.values}
    assert values == {
        "SaturatedActivation",
        "DeadRelu",
        "WeightUpdateRatio",
        "UnchangedTensor",
        "SimilarAcrossRuns",
    }
    assert H.UnchangedTensor(collections="weights").needs.values
    with pytest.raises(TypeError):
        H.VanishingGradient(treshold=1)


def test_not_applicable_when_collection_missing(tmp_run):
    write_run(tmp_run, [{"x": np.ones(3)}], {"weights": ["x"]})
    out = RuleEngine(tmp_run, [H.DeadRelu(), H.VanishingGradient()], record=False).poll()
    assert sorted((f.rule, f.kind) for f in out) == [
        ("DeadRelu", "not_applicable"),
        ("VanishingGradient", "not_applicable"),
    ]


# -- real PyTorch training ------------------------------------------------------------------------


def _train(run_dir, *, lr, steps, nan_at=None, collections=("weights", "gradients", "losses")):
    torch = pytest.importorskip("torch")
    nn = torch.nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 10, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    hook = tv.torch.Hook(
        run_dir, collections=list(collections), save=tv.SaveConfig(every=1), strict=True
    )
    hook.register(model, optimizer=opt)
    with hook:
        for i in range(steps):
            if nan_at is not None and i == nan_at:
                with torch.no_grad():
                    model[0].weight[0, 0] = float("nan")
            loss = nn.functional.cross_entropy(model(x), y)
            hook.record_loss(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return run_dir


def test_torch_lr_zero_fires_unchanged_tensor(tmp_run):
    _train(tmp_run, lr=0.0, steps=5)
    f = fired(tmp_run, H.UnchangedTensor(collections=["weights"]))
    assert steps_of(f) == [2]
    assert set(f[0].evidence["tensors"]) == {"0.weight", "2.weight"}
    assert steps_of(fired(tmp_run, H.WeightUpdateRatio())) == [1]


def test_torch_nan_injection_fires_exploding_tensor(tmp_run):
    _train(tmp_run, lr=0.1, steps=6, nan_at=3)
    f = fired(tmp_run, H.ExplodingTensor())
    # Step 3 saves the NaN weight and loss; at step 4 the NaN has spread to the other tensors.
    assert steps_of(f)[0] == 3 and f[0].severity == "error"
    assert "0.weight" in f[0].evidence["tensors"] and "loss" in f[0].evidence["tensors"]


def test_torch_healthy_run_is_silent(tmp_run):
    _train(
        tmp_run,
        lr=0.1,
        steps=40,
        collections=("weights", "gradients", "losses", "relu_input", "relu_output"),
    )
    rules = [
        H.VanishingGradient(),
        H.ExplodingTensor(),
        H.PoorWeightInitialization(),
        H.LossNotDecreasing(),
        H.WeightUpdateRatio(),
        H.DeadRelu(),
        H.SaturatedActivation(),
        H.UnchangedTensor(collections=["weights"]),
    ]
    out = RuleEngine(tmp_run, rules, record=False).poll()
    assert [f for f in out if f.kind != "not_applicable"] == []
