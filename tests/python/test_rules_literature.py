"""Rules from the research literature: firing, silence, edge-triggering, parameters, end to end."""

import json
import math
import os

import numpy as np
import pytest
from rule_helpers import fired, run_rule, steps_of

import tensorvigil as tv
from tensorvigil.rules.builtin.literature import (
    DyingRelu,
    GradientNormRatio,
    LearningRateMismatch,
    LossSpike,
    OscillatingLoss,
    SlowConvergence,
    UnnormalizedInput,
    WrongOutputActivation,
)


def write_run(path, steps, collections, mode="train"):
    """Writes ``steps`` (a list of {name: value}) as steps 0.. and ``collections.json``."""
    with tv.StoreWriter(path) as w:
        for s, tensors in enumerate(steps):
            for name, value in tensors.items():
                w.write(name, s, value, mode=mode)
            w.commit(s, mode=mode)
    with open(os.path.join(path, "collections.json"), "w", encoding="utf-8") as f:
        json.dump(collections, f)
    return path


def vec(norm, n=16, rng=None):
    """A vector with the given L2 norm."""
    v = np.ones(n) if rng is None else rng.standard_normal(n)
    return (v / np.linalg.norm(v) * norm).astype(np.float32)


# -- GradientNormRatio --------------------------------------------------------------------------

# Model order differs from alphabetical order: the first layer sorts last.
GRADS = ["z_in.weight", "z_in.bias", "mid.weight", "a_out.weight", "a_out.bias"]
GRAD_COLLECTIONS = {
    "weights": ["a_out.weight", "mid.weight", "z_in.weight"],
    "biases": ["a_out.bias", "z_in.bias"],
    "gradients": sorted(n + "/grad" for n in GRADS),
}


def grad_step(first, last, mid=1.0):
    norms = {"z_in.weight": first, "z_in.bias": 1.0, "mid.weight": mid, "a_out.weight": last}
    norms["a_out.bias"] = 1e-12  # a tiny bias must not count as the last layer
    return {n + "/grad": vec(norms[n]) for n in GRADS}


def test_gradient_norm_ratio_fires_vanishing_and_exploding_once_each(tmp_run):
    firsts = [1.0, 1.0, 1.0, 1e-6, 1e-6, 1.0, 100.0, 100.0, 1.0, 100.0]
    write_run(tmp_run, [grad_step(f, 1.0) for f in firsts], GRAD_COLLECTIONS)
    found = fired(run_rule(tmp_run, GradientNormRatio()))
    assert [(f.step, f.message.split(":")[0]) for f in found] == [
        (3, "vanishing gradients"),
        (6, "exploding gradients"),
        (9, "exploding gradients"),
    ]
    ev = found[0].evidence
    assert ev["first_layer"] == "z_in.weight/grad" and ev["last_layer"] == "a_out.weight/grad"
    assert ev["ratio"] == pytest.approx(1e-6, rel=1e-4)
    assert ev["vanish_ratio"] == 1e-3 and ev["vanish_first"] == 1e-4
    assert found[1].evidence["explode_ratio"] == 70 and found[1].severity == "warning"


def test_gradient_norm_ratio_silent_on_healthy_run(tmp_run, rng):
    steps = [grad_step(rng.uniform(0.5, 5), rng.uniform(0.5, 5)) for _ in range(30)]
    write_run(tmp_run, steps, GRAD_COLLECTIONS)
    assert fired(run_rule(tmp_run, GradientNormRatio())) == []


def test_gradient_norm_ratio_small_ratio_with_large_first_norm_is_not_vanishing(tmp_run):
    write_run(tmp_run, [grad_step(1e-2, 1e3)], GRAD_COLLECTIONS)  # ratio 1e-5, first 1e-2
    assert fired(run_rule(tmp_run, GradientNormRatio())) == []


def test_gradient_norm_ratio_not_applicable_without_gradients(tmp_run):
    write_run(tmp_run, [{"loss": 1.0}], {"losses": ["loss"]})
    (f,) = run_rule(tmp_run, GradientNormRatio())
    assert f.kind == "not_applicable" and "gradients" in f.message


# -- DyingRelu ----------------------------------------------------------------------------------


def zero_grads(frac, n=100):
    g = np.ones(n, dtype=np.float32)
    g[: int(frac * n)] = 0.0
    return {"fc1.weight/grad": g, "fc2.weight/grad": np.ones(n, dtype=np.float32) * (frac < 0.5)}


def test_dying_relu_fires_when_zero_fraction_reached(tmp_run):
    fracs = [0.1, 0.2, 0.9, 0.95, 0.1, 0.9]
    write_run(
        tmp_run,
        [zero_grads(f) for f in fracs],
        {"gradients": ["fc1.weight/grad", "fc2.weight/grad"]},
    )
    found = fired(run_rule(tmp_run, DyingRelu()))
    assert steps_of(found) == [2, 5]
    ev = found[0].evidence
    assert ev["zero_fraction"] == pytest.approx(0.95) and ev["zero_grad_fraction"] == 0.7
    assert ev["tensors"][0]["name"] == "fc2.weight/grad"


def test_dying_relu_silent_on_dense_gradients(tmp_run):
    write_run(
        tmp_run,
        [zero_grads(0.3) for _ in range(10)],
        {"gradients": ["fc1.weight/grad", "fc2.weight/grad"]},
    )
    assert fired(run_rule(tmp_run, DyingRelu())) == []


# -- LossSpike ----------------------------------------------------------------------------------


def test_loss_spike_fires_on_jump_nan_and_absolute(tmp_run):
    losses = [2.0, 1.5, 1.2, 30.0, 25.0, 1.0, math.nan, math.nan, 1.0, 2000.0, math.inf]
    write_run(tmp_run, [{"loss": v} for v in losses], {"losses": ["loss"]})
    found = fired(run_rule(tmp_run, LossSpike()))
    assert [(f.step, f.severity) for f in found] == [
        (3, "warning"),
        (6, "error"),
        (9, "warning"),
        (10, "error"),
    ]
    assert found[0].evidence["largest_before"] == 2.0 and found[0].evidence["factor"] == 10.0
    assert found[1].evidence["nan"] == 1 and "NaN" in found[1].message
    assert found[2].evidence["absolute"] == 1e3 and found[2].evidence["value"] == 2000.0
    assert "infinite" in found[3].message


def test_loss_spike_silent_on_decreasing_and_noisy_loss(tmp_run, rng):
    losses = [2.0 / (1 + 0.1 * s) * rng.uniform(0.8, 1.2) for s in range(50)]
    write_run(
        tmp_run,
        [{"loss": v, "loss/eval": v * 1.1} for v in losses],
        {"losses": ["loss", "loss/eval"]},
    )
    assert fired(run_rule(tmp_run, LossSpike())) == []


def test_loss_spike_first_step_is_never_a_jump(tmp_run):
    write_run(tmp_run, [{"loss": 500.0}], {"losses": ["loss"]})
    assert fired(run_rule(tmp_run, LossSpike())) == []


# -- OscillatingLoss ----------------------------------------------------------------------------


def test_oscillating_loss_fires_on_zigzag(tmp_run):
    losses = [1.0 + 0.2 * (s % 2) for s in range(60)]
    write_run(tmp_run, [{"loss": v} for v in losses], {"losses": ["loss"]})
    found = fired(run_rule(tmp_run, OscillatingLoss()))
    assert steps_of(found) == [49]  # 5 windows of 10 steps complete at step 49
    ev = found[0].evidence
    assert ev["swinging_share"] == 1.0 and ev["swing"] == 0.03 and ev["fraction"] == 0.2


def test_oscillating_loss_silent_on_monotone_decrease(tmp_run):
    losses = [2.0 / (1 + 0.05 * s) for s in range(100)]
    write_run(tmp_run, [{"loss": v} for v in losses], {"losses": ["loss"]})
    assert fired(run_rule(tmp_run, OscillatingLoss())) == []


# -- SlowConvergence ----------------------------------------------------------------------------


def test_slow_convergence_fires_when_metric_stalls_low(tmp_run, rng):
    acc = [0.3 + rng.uniform(-0.002, 0.002) for _ in range(100)]
    write_run(tmp_run, [{"metric/accuracy": a} for a in acc], {"metrics": ["metric/accuracy"]})
    found = fired(run_rule(tmp_run, SlowConvergence(total_steps=100)))
    assert steps_of(found) == [39]  # judged from step 30; 4 window means complete at step 39
    ev = found[0].evidence
    assert ev["metric"] == "metric/accuracy" and ev["best_gain"] < 0.01 and ev["latest"] < 0.6


def test_slow_convergence_silent_when_metric_improves(tmp_run):
    acc = [0.2 + 0.007 * s for s in range(100)]
    write_run(tmp_run, [{"metric/accuracy": a} for a in acc], {"metrics": ["metric/accuracy"]})
    assert fired(run_rule(tmp_run, SlowConvergence(total_steps=100))) == []


def test_slow_convergence_needs_total_steps(tmp_run):
    write_run(tmp_run, [{"metric/accuracy": 0.1}] * 3, {"metrics": ["metric/accuracy"]})
    (f,) = run_rule(tmp_run, SlowConvergence())
    assert f.kind == "not_applicable" and "total_steps" in f.message


# -- LearningRateMismatch -----------------------------------------------------------------------

LR_COLLECTIONS = {
    "weights": ["fc1.weight", "fc2.weight"],
    "biases": ["fc1.bias"],
    "gradients": ["fc1.bias/grad", "fc1.weight/grad", "fc2.weight/grad"],
    "optimizer_variables": ["lr/group0"],
}


def lr_step(lr, grad_scale):
    out = {"lr/group0": lr}
    for n in ("fc1.weight", "fc1.bias", "fc2.weight"):
        out[n] = vec(3.0 if n != "fc1.bias" else 1e-9)
        out[n + "/grad"] = vec(3.0 * grad_scale)
    return out


def test_learning_rate_mismatch_fires_high_and_low(tmp_run):
    steps = [lr_step(10.0, 1.0), lr_step(10.0, 1.0), lr_step(0.01, 0.1), lr_step(1e-3, 1e-4)]
    write_run(tmp_run, steps, LR_COLLECTIONS)
    found = fired(run_rule(tmp_run, LearningRateMismatch()))
    assert [(f.step, f.message.split(":")[0]) for f in found] == [
        (0, "learning rate too large"),
        (3, "learning rate too small"),
    ]
    assert found[0].evidence["relative_update"] == pytest.approx(10.0, rel=1e-5)
    assert found[1].evidence["relative_update"] == pytest.approx(1e-7, rel=1e-4)
    assert found[1].evidence["low"] == 1e-5 and found[0].evidence["high"] == 0.1


def test_learning_rate_mismatch_silent_in_band(tmp_run):
    write_run(
        tmp_run, [lr_step(0.01, 0.1) for _ in range(10)] + [lr_step(0.0, 0.1)], LR_COLLECTIONS
    )
    assert fired(run_rule(tmp_run, LearningRateMismatch())) == []


def test_learning_rate_mismatch_not_applicable_without_weights(tmp_run):
    write_run(tmp_run, [{"lr/group0": 0.1}], {"optimizer_variables": ["lr/group0"]})
    (f,) = run_rule(tmp_run, LearningRateMismatch())
    assert f.kind == "not_applicable" and "weights" in f.message


# -- UnnormalizedInput --------------------------------------------------------------------------

IO_COLLECTIONS = {
    "inputs": ["fc1/input", "fc2/input", "model/input"],
    "outputs": ["fc1/output", "fc2/output", "model/output"],
}


def io_step(x, hidden_scale=1.0):
    h = np.maximum(x @ np.ones((x.shape[1], 8), np.float32), 0) * hidden_scale
    out = h @ np.ones((8, 2), np.float32) / 100
    return {
        "model/input": x,
        "fc1/input": x,
        "fc1/output": h,
        "fc2/input": h,
        "fc2/output": out,
        "model/output": out,
    }


def test_unnormalized_input_fires_on_raw_inputs_and_large_hidden(tmp_run, rng):
    x = rng.uniform(-1, 1, (8, 4)).astype(np.float32)
    steps = [io_step(x), io_step(x * 1000), io_step(x * 1000), io_step(x), io_step(x, 100.0)]
    write_run(tmp_run, steps, IO_COLLECTIONS)
    found = fired(run_rule(tmp_run, UnnormalizedInput()))
    msgs = [(f.step, f.message.split(":")[0]) for f in found]
    # x*1000 also makes fc1/output large; fc1/input (== model/input) is not reported as hidden
    assert msgs == [
        (1, "inputs are not normalised"),
        (1, "hidden activations are large"),
        (4, "hidden activations are large"),
    ]
    assert found[0].evidence["tensors"][0]["name"] == "model/input"
    assert found[0].evidence["bound"] == 1.0
    hidden = {t["name"] for t in found[2].evidence["tensors"]}
    assert hidden == {"fc1/output", "fc2/input"}


def test_unnormalized_input_silent_on_normalised_inputs_and_integer_tokens(tmp_run, rng):
    x = rng.uniform(-1, 1, (8, 4)).astype(np.float32)
    steps = [dict(io_step(x), **{"model/input.1": np.arange(50)}) for _ in range(5)]
    colls = dict(IO_COLLECTIONS, inputs=IO_COLLECTIONS["inputs"] + ["model/input.1"])
    write_run(tmp_run, steps, colls)
    assert fired(run_rule(tmp_run, UnnormalizedInput())) == []


# -- WrongOutputActivation ----------------------------------------------------------------------


def test_wrong_output_activation_fires_on_sigmoid_outputs(tmp_run, rng):
    logits = rng.standard_normal((16, 5)).astype(np.float32)
    sig = 1 / (1 + np.exp(-logits))
    soft = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    steps = [{"model/output": soft}, {"model/output": sig}, {"model/output": sig}]
    write_run(tmp_run, steps, {"outputs": ["model/output"]})
    found = fired(run_rule(tmp_run, WrongOutputActivation()))
    assert steps_of(found) == [1]
    ev = found[0].evidence
    assert ev["rows"] == 16 and ev["rows_off"] > 8 and ev["tolerance"] == 0.1
    assert abs(ev["worst_row_sum"] - 1) > 0.1


def test_wrong_output_activation_silent_on_softmax_logits_and_binary(tmp_run, rng):
    logits = rng.standard_normal((16, 5)).astype(np.float32)
    soft = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    binary = 1 / (1 + np.exp(-logits[:, :1]))
    steps = [{"model/output": soft}, {"model/output": logits}, {"model/output": binary}]
    write_run(tmp_run, steps, {"outputs": ["model/output"]})
    assert fired(run_rule(tmp_run, WrongOutputActivation())) == []


def test_wrong_output_activation_declares_values():
    r = WrongOutputActivation()
    assert r.needs.values and r.needs.regex == r"^model/output(\.\d+)?$"
    assert "needs" not in r.params()
    assert all(not cls().needs.values for cls in (GradientNormRatio, LossSpike, DyingRelu))


# -- parameters ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls, kwargs, param",
    [
        (GradientNormRatio, {"vanish_ratio": 0}, "vanish_ratio"),
        (GradientNormRatio, {"vanish_first": -1}, "vanish_first"),
        (GradientNormRatio, {"explode_ratio": "70"}, "explode_ratio"),
        (GradientNormRatio, {"explode_ratio": 1e-4}, "explode_ratio"),
        (DyingRelu, {"zero_grad_fraction": 1.5}, "zero_grad_fraction"),
        (LossSpike, {"factor": 0.5}, "factor"),
        (LossSpike, {"absolute": math.nan}, "absolute"),
        (OscillatingLoss, {"swing": 0}, "swing"),
        (OscillatingLoss, {"fraction": 2}, "fraction"),
        (OscillatingLoss, {"window": 2}, "window"),
        (SlowConvergence, {"total_steps": 0}, "total_steps"),
        (SlowConvergence, {"after_fraction": 1.2}, "after_fraction"),
        (SlowConvergence, {"metric_regex": "("}, "metric_regex"),
        (LearningRateMismatch, {"low": 1, "high": 0.5}, "high"),
        (LearningRateMismatch, {"low": -1}, "low"),
        (UnnormalizedInput, {"bound": 0}, "bound"),
        (UnnormalizedInput, {"hidden_mean": True}, "hidden_mean"),
        (WrongOutputActivation, {"tolerance": -0.1}, "tolerance"),
        (WrongOutputActivation, {"tensor_regex": "[a"}, "tensor_regex"),
    ],
)
def test_invalid_parameters_name_the_parameter(cls, kwargs, param):
    with pytest.raises(tv.InvalidArgumentError, match=param):
        cls(**kwargs)


def test_defaults_and_unknown_parameter():
    assert GradientNormRatio().params() == {
        "vanish_ratio": 1e-3,
        "vanish_first": 1e-4,
        "explode_ratio": 70,
    }
    assert LossSpike().params() == {"factor": 10.0, "absolute": 1e3}
    assert DyingRelu().zero_grad_fraction == 0.7
    assert (LearningRateMismatch().low, LearningRateMismatch().high) == (1e-5, 1e-1)
    assert (UnnormalizedInput().bound, UnnormalizedInput().hidden_mean) == (1.0, 10)
    with pytest.raises(tv.InvalidArgumentError, match="factr"):
        tv.rules.get("LossSpike", factr=2)


# -- end to end: a real PyTorch training --------------------------------------------------------


def test_end_to_end_torch_faults_fire_their_rules(tmp_path):
    torch = pytest.importorskip("torch")
    nn = torch.nn

    def train(run, lr, scale):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        x = torch.rand(32, 6, generator=torch.Generator().manual_seed(1)) * 2 - 1
        y = torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(2))
        hook = tv.torch.Hook(
            run,
            collections=["weights", "gradients", "losses", "inputs", "optimizer_variables"],
            save=tv.SaveConfig(every=1),
            strict=True,
        )
        hook.register(model, optimizer=opt)
        with hook:
            for _ in range(12):
                loss = nn.functional.cross_entropy(model(x * scale), y)
                hook.record_loss(loss)
                opt.zero_grad()
                loss.backward()
                opt.step()
        rules = [LossSpike(), UnnormalizedInput(), GradientNormRatio()]
        return fired(tv.rules.RuleEngine(run, rules, record=False).poll())

    healthy = train(str(tmp_path / "healthy"), 0.1, 1.0)
    assert healthy == []
    faulty = train(str(tmp_path / "faulty"), 10.0, 1000.0)
    names = {f.rule for f in faulty}
    assert {"LossSpike", "UnnormalizedInput"} <= names, [str(f) for f in faulty]
    inputs = [f for f in faulty if f.rule == "UnnormalizedInput"][0]
    assert inputs.step == 0 and inputs.evidence["tensors"][0]["name"] == "model/input"
