"""The PyTorch hook: save configs, collections, modes, steps, stop requests, errors."""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

import tensorvigil as tv
from tensorvigil.hooks.base import read_stop_request, write_stop_request

torch = pytest.importorskip("torch")
nn = torch.nn


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def train(hook, model, opt, steps, *, eval_every=0, record=True):
    """A plain loop; returns {step: {"loss": float}} for train steps in hook step numbering."""
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(2))
    losses = []
    for i in range(steps):
        model.train()
        loss = nn.functional.cross_entropy(model(x), y)
        if record:
            hook.record_loss(loss)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if eval_every and (i + 1) % eval_every == 0:
            model.eval()
            with torch.no_grad():
                hook.record_loss(nn.functional.cross_entropy(model(x), y), name="eval")
    return losses


# -- SaveConfig ---------------------------------------------------------------------------------


def test_saveconfig_union_of_every_and_steps():
    cfg = tv.SaveConfig(every=5, steps=[1, 2, 23], start=10, end=30)
    saved = [s for s in range(40) if cfg.should_save(s)]
    assert saved == [1, 2, 10, 15, 20, 23, 25]


def test_saveconfig_defaults_and_per_mode():
    assert all(tv.SaveConfig().should_save(s) for s in range(5))
    assert [s for s in range(10) if tv.SaveConfig(steps=[3]).should_save(s)] == [3]
    cfg = tv.SaveConfig(every=4, eval=tv.SaveConfig(every=1), predict=tv.SaveConfig(steps=[0]))
    assert [s for s in range(6) if cfg.should_save(s, "train")] == [0, 4]
    assert [s for s in range(6) if cfg.should_save(s, "eval")] == list(range(6))
    assert [s for s in range(6) if cfg.should_save(s, tv.Mode.PREDICT)] == [0]


@pytest.mark.parametrize(
    "kwargs, text",
    [
        ({"every": 0}, "every must be >= 1"),
        ({"every": 1.5}, "every must be an integer"),
        ({"steps": [-1]}, "steps item must be >= 0"),
        ({"steps": "12"}, "steps must be a list"),
        ({"start": 5, "end": 5}, "end (5) must be greater than start (5)"),
        ({"train": 3}, "train must be a SaveConfig"),
    ],
)
def test_saveconfig_rejects_bad_values(kwargs, text):
    with pytest.raises(tv.InvalidArgumentError, match=text.replace("(", r"\(").replace(")", r"\)")):
        tv.SaveConfig(**kwargs)


def test_collection_and_hook_argument_errors(tmp_run):
    with pytest.raises(tv.InvalidArgumentError, match="unknown collection 'gradient'"):
        tv.torch.Hook(tmp_run, collections=["gradient"])
    with pytest.raises(tv.InvalidArgumentError, match="unknown kind"):
        tv.Collection("x", kinds=["weight"])
    with pytest.raises(tv.InvalidArgumentError, match="bad include regex"):
        tv.Collection("x", include=["("])
    with pytest.raises(tv.InvalidArgumentError, match="built-in name"):
        tv.torch.Hook(tmp_run, collections=[tv.Collection("weights", include=["fc"])])
    with pytest.raises(tv.InvalidArgumentError, match="ranks must be"):
        tv.torch.Hook(tmp_run, ranks="some")
    hook = tv.torch.Hook(tmp_run)
    with pytest.raises(tv.InvalidArgumentError, match="needs a torch.nn.Module"):
        hook.register(object())
    hook.register(mlp())
    with pytest.raises(tv.InvalidArgumentError, match="already registered"):
        hook.register(mlp())
    hook.close()


# -- what is saved ------------------------------------------------------------------------------


def test_default_collections_every_step_and_names(tmp_run):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = tv.torch.Hook(tmp_run, save=tv.SaveConfig(every=1), strict=True).register(model, opt)
    with hook:
        losses = train(hook, model, opt, 4)
    run = tv.open(tmp_run)
    assert run.steps() == [0, 1, 2, 3]
    names = run.tensor_names()
    assert names == sorted(
        ["0.weight", "0.bias", "2.weight", "2.bias", "loss"]
        + ["0.weight/grad", "0.bias/grad", "2.weight/grad", "2.bias/grad"]
    )
    assert run.tensor("loss").value(2) == pytest.approx(losses[2], rel=1e-6)
    cols = run.collections()
    assert cols["weights"] == ["0.weight", "2.weight"]
    assert cols["biases"] == ["0.bias", "2.bias"]
    assert cols["gradients"] == ["0.bias/grad", "0.weight/grad", "2.bias/grad", "2.weight/grad"]
    assert run.tensor_names(collection="losses") == ["loss"]
    assert run.ended()


def test_weights_are_those_the_step_used_and_gradients_those_the_optimizer_used(tmp_run):
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    hook = tv.torch.Hook(tmp_run, save=tv.SaveConfig(every=1), strict=True).register(model, opt)
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 0])
    seen_w, seen_g = [], []
    with hook:
        for _ in range(3):
            seen_w.append(model[0].weight.detach().clone())
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            seen_g.append(model[0].weight.grad.clone())
            opt.step()
    t_w, t_g = tv.open(tmp_run).tensor("0.weight"), tv.open(tmp_run).tensor("0.weight/grad")
    for s in range(3):
        np.testing.assert_array_equal(t_w.value(s), seen_w[s].numpy())
        np.testing.assert_array_equal(t_g.value(s), seen_g[s].numpy())
    assert not np.array_equal(t_w.value(0), t_w.value(1))


def test_modes_and_mode_steps(tmp_run):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = tv.torch.Hook(
        tmp_run,
        collections=["losses"],
        save=tv.SaveConfig(every=2, eval=tv.SaveConfig(every=1)),
        strict=True,
    ).register(model, opt)
    with hook:
        train(hook, model, opt, 6, eval_every=2)
    run = tv.open(tmp_run)
    # global steps: t0 t1 e2 t3 t4 e5 t6 t7 e8; train mode steps 0..5, eval mode steps 0..2
    assert run.steps(mode="train") == [0, 3, 6]  # mode steps 0, 2, 4
    assert run.steps(mode="eval") == [2, 5, 8]
    rec = run.tensor("loss/eval").record(5)
    assert (rec.mode, rec.mode_step) == (tv.Mode.EVAL, 1)
    assert run.tensor("loss").record(6).mode_step == 4


def test_set_mode_predict_and_back(tmp_run):
    model = mlp()
    hook = tv.torch.Hook(tmp_run, collections=["outputs"], save=tv.SaveConfig(), strict=True)
    hook.register(model)
    with hook:
        model(torch.randn(2, 6))
        hook.set_mode("predict")
        model(torch.randn(2, 6))
        model(torch.randn(2, 6))
        hook.set_mode(None)
        model.eval()
        model(torch.randn(2, 6))
    run = tv.open(tmp_run)
    assert run.steps(mode="train") == [0]
    assert run.steps(mode="predict") == [1, 2]
    assert run.steps(mode="eval") == [3]
    assert run.tensor("model/output").record(2).mode_step == 1


def test_collection_override_and_reductions_only(tmp_run):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = tv.torch.Hook(
        tmp_run,
        collections=[
            "weights",
            tv.Collection("gradients", save=tv.SaveConfig(every=3), reductions_only=True),
            tv.Collection("first", include=[r"^0\."], kinds=["optimizer_variables", "weights"]),
        ],
        save=tv.SaveConfig(every=2),
        strict=True,
    ).register(model, opt)
    with hook:
        train(hook, model, opt, 7, record=False)
    run = tv.open(tmp_run)
    assert run.tensor("0.weight").steps() == [0, 2, 4, 6]
    g = run.tensor("2.weight/grad")
    assert g.steps() == [0, 3, 6]
    assert g.record(3).has_value is False
    assert g.stats(3).numel == 24
    with pytest.raises(tv.TensorVigilError):
        g.value(3)
    assert run.collections()["first"] == ["0.weight"]  # SGD without momentum has no state


def test_optimizer_variables_and_learning_rates(tmp_run):
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    hook = tv.torch.Hook(
        tmp_run, collections=["optimizer_variables"], save=tv.SaveConfig(), strict=True
    ).register(model, opt)
    with hook:
        x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 0])
        for _ in range(3):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        final = opt.state[model[0].weight]["exp_avg"].clone()
    run = tv.open(tmp_run)
    assert [run.tensor("lr/group0").value(s) for s in range(3)] == pytest.approx(
        [0.01, 0.005, 0.0025]
    )
    np.testing.assert_array_equal(run.tensor("0.weight/exp_avg").value(2), final.numpy())
    assert "0.weight/exp_avg_sq" in run.tensor_names(collection="optimizer_variables")


def test_metrics_custom_and_histograms(tmp_run):
    model = mlp()
    hook = tv.torch.Hook(
        tmp_run,
        collections=["metrics", "custom", "weights"],
        save=tv.SaveConfig(),
        hist_bins=16,
        exp_hist=True,
        strict=True,
    ).register(model)
    with hook:
        for i in range(2):
            model(torch.randn(2, 6))
            hook.record_scalar("accuracy", 0.5 + i / 10)
            hook.record_tensor("embedding", torch.arange(6.0).reshape(2, 3) * (i + 1))
    run = tv.open(tmp_run)
    assert run.tensor("metric/accuracy").value(1) == pytest.approx(0.6)
    np.testing.assert_array_equal(
        run.tensor("embedding").value(1), np.arange(6.0).reshape(2, 3) * 2
    )
    st = run.tensor("0.weight").stats(0)
    assert len(st.hist) == 16 and sum(st.hist) == 48
    assert st.exp_hist is not None and sum(st.exp_hist) == 48


def test_activation_collections_by_module_type(tmp_run):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 4),
        nn.ReLU(),
        nn.Linear(4, 4),
        nn.Tanh(),
        nn.Sequential(nn.Linear(4, 4), nn.Sigmoid()),
    )
    hook = tv.torch.Hook(
        tmp_run,
        collections=["relu_input", "relu_output", "tanh_input", "sigmoid_input"],
        save=tv.SaveConfig(),
        strict=True,
    ).register(model)
    x = torch.randn(3, 4)
    with hook:
        model(x)
    run = tv.open(tmp_run)
    assert run.tensor_names() == ["1/input", "1/output", "3/input", "4.1/input"]
    expected = model[0](x)
    np.testing.assert_array_equal(run.tensor("1/input").value(0), expected.detach().numpy())
    np.testing.assert_array_equal(
        run.tensor("1/output").value(0), torch.relu(expected).detach().numpy()
    )
    assert run.collections()["relu_input"] == ["1/input"]


def test_builtin_inputs_outputs_skip_containers_but_user_collections_do_not(tmp_run):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.Linear(4, 2))
    hook = tv.torch.Hook(
        tmp_run,
        collections=["outputs", tv.Collection("block", include=[r"^0$"], kinds=["inputs"])],
        save=tv.SaveConfig(),
        strict=True,
    ).register(model)
    with hook:
        model(torch.randn(3, 4))
    names = tv.open(tmp_run).tensor_names()
    assert names == ["0.0/output", "0.1/output", "0/input", "1/output", "model/output"]


# -- steps ---------------------------------------------------------------------------------------


def test_explicit_steps_share_forward_passes(tmp_run):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = tv.torch.Hook(
        tmp_run, collections=["losses", "outputs"], save=tv.SaveConfig(), strict=True
    ).register(model, opt)
    with hook:
        for _ in range(3):
            for _micro in range(2):
                loss = model(torch.randn(2, 6)).sum()
                hook.record_loss(loss)
                loss.backward()
            opt.step()
            opt.zero_grad()
            hook.step()
    run = tv.open(tmp_run)
    assert run.steps() == [0, 1, 2]
    assert hook.current_step == 2


def test_no_optimizer_gradients_from_backward(tmp_run):
    model = mlp()
    hook = tv.torch.Hook(tmp_run, collections=["gradients"], save=tv.SaveConfig(), strict=True)
    hook.register(model)
    with hook:
        for _ in range(2):
            model.zero_grad()
            model(torch.randn(3, 6)).sum().backward()
            expected = model[2].weight.grad.clone()
    np.testing.assert_array_equal(
        tv.open(tmp_run).tensor("2.weight/grad").value(1), expected.numpy()
    )


def test_steps_not_saved_are_not_committed(tmp_run):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = tv.torch.Hook(tmp_run, save=tv.SaveConfig(steps=[1, 4]), strict=True)
    with hook.register(model, opt):
        train(hook, model, opt, 6)
    assert tv.open(tmp_run).steps() == [1, 4]


# -- stop -----------------------------------------------------------------------------------------


def test_request_stop_raises_at_next_step_boundary(tmp_run):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = tv.torch.Hook(tmp_run, save=tv.SaveConfig(), strict=True).register(model, opt)
    done = []
    with pytest.raises(tv.TrainingStopped, match="loss exploded"), hook:
        for i in range(10):
            loss = model(torch.randn(2, 6)).sum()
            hook.record_loss(loss)
            loss.backward()
            opt.step()
            done.append(i)
            if i == 2:
                hook.request_stop("loss exploded")
                assert hook.should_stop
    assert done == [0, 1, 2]
    run = tv.open(tmp_run)
    assert run.steps() == [0, 1, 2]  # everything captured before the stop is committed
    assert read_stop_request(tmp_run)["reason"] == "loss exploded"


def test_stop_request_file_from_another_process(tmp_run):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = tv.torch.Hook(tmp_run, save=tv.SaveConfig(), strict=True).register(model, opt)
    code = (
        "import sys; from tensorvigil.hooks.base import write_stop_request;"
        "write_stop_request(sys.argv[1], 'watcher: vanishing gradient', source='watcher')"
    )
    with pytest.raises(tv.TrainingStopped, match="vanishing gradient"), hook:
        for i in range(50):
            model(torch.randn(2, 6)).sum().backward()
            opt.step()
            if i == 1:
                subprocess.run([sys.executable, "-c", code, tmp_run], check=True, timeout=60)
    assert tv.open(tmp_run).steps()[-1] >= 1


def test_stale_stop_request_of_an_earlier_training_is_ignored(tmp_run):
    write_stop_request(tmp_run, "old")
    past = os.path.getmtime(os.path.join(tmp_run, "stop_request.json")) - 60
    os.utime(os.path.join(tmp_run, "stop_request.json"), (past, past))
    model = mlp()
    hook = tv.torch.Hook(tmp_run, save=tv.SaveConfig(), strict=True).register(model)
    with hook:
        for _ in range(3):
            model(torch.randn(2, 6))
        assert not hook.should_stop
    assert tv.open(tmp_run).steps() == [0, 1, 2]


# -- failures -------------------------------------------------------------------------------------


def test_non_strict_error_logs_once_and_training_continues(tmp_run, caplog):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = tv.torch.Hook(tmp_run, collections=["custom", "losses"], save=tv.SaveConfig())
    hook.register(model, opt)
    with caplog.at_level(logging.ERROR, logger="tensorvigil"), hook:
        for i in range(4):
            loss = model(torch.randn(2, 6)).sum()
            hook.record_loss(loss)
            if i == 1:
                hook.record_tensor("bad", torch.zeros(2, dtype=torch.complex64))
                hook.record_tensor("bad2", torch.zeros(2, dtype=torch.complex64))
            loss.backward()
            opt.step()
    assert hook.disabled
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "capture disabled" in errors[0].getMessage()
    assert "complex" in errors[0].getMessage()
    assert tv.open(tmp_run).steps() == [0]  # step 1 failed before its commit


def test_strict_error_propagates(tmp_run):
    model = mlp()
    hook = tv.torch.Hook(tmp_run, collections=["custom"], save=tv.SaveConfig(), strict=True)
    hook.register(model)
    with pytest.raises(tv.InvalidArgumentError, match="complex"), hook:
        model(torch.randn(2, 6))
        hook.record_tensor("bad", torch.zeros(2, dtype=torch.complex64))


def test_collections_json_is_valid_json_while_training(tmp_run):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = tv.torch.Hook(tmp_run, save=tv.SaveConfig(), strict=True).register(model, opt)
    train(hook, model, opt, 3)
    with open(os.path.join(tmp_run, "collections.json")) as f:
        assert "gradients" in json.load(f)
    hook.close()
    hook.close()  # idempotent


def test_import_tensorvigil_does_not_import_torch_until_tv_torch():
    code = (
        "import sys, tensorvigil as tv; assert 'torch' not in sys.modules;"
        "tv.SaveConfig(every=2); tv.Collection('a', include=['x']);"
        "assert 'torch' not in sys.modules; tv.torch.Hook; assert 'torch' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# -- in-process rules ---------------------------------------------------------------------------


class LossAbove(tv.Rule):
    needs = tv.Needs(collections=["losses"])

    def __init__(self, limit):
        self.limit = limit

    def evaluate(self, step):
        b = step.batch(collection="losses")
        if len(b) and b.max.max() > self.limit:
            return self.finding(step, f"loss above {self.limit}", {"loss": b.max.max()})
        return None


class Broken(tv.Rule):
    def evaluate(self, step):
        raise RuntimeError("bug in a custom rule")


def test_in_process_rule_stops_training(tmp_run):
    import time

    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = tv.torch.Hook(
        tmp_run,
        collections=["losses"],
        save=tv.SaveConfig(),
        rules=[Broken(), LossAbove(100.0)],
        on_finding="stop",
        strict=True,
    ).register(model, opt)
    fired_at = None
    deadline = time.monotonic() + 60
    with pytest.raises(tv.TrainingStopped, match="LossAbove fired at step"), hook:
        for i in range(100000):
            assert time.monotonic() < deadline, "the stop never came"
            loss = model(torch.randn(2, 6)).sum() * 0 + (1000.0 if i >= 5 else 1.0)
            hook.record_loss(loss)
            opt.step()
            if i >= 5 and fired_at is None:
                fired_at = i
            time.sleep(0.005)
    kinds = {(f.rule, f.kind) for f in hook.findings}
    assert ("Broken", "error") in kinds and ("LossAbove", "fired") in kinds
    recorded = tv.open(tmp_run).findings()
    first = next(f for f in recorded if f["rule"] == "LossAbove")
    assert first["step"] == 5 and first["evidence"]["loss"] == 1000.0
    assert any(f["rule"] == "Broken" and "bug in a custom rule" in f["message"] for f in recorded)


def test_on_finding_callback_and_bad_value(tmp_run):
    with pytest.raises(tv.InvalidArgumentError, match="on_finding"):
        tv.torch.Hook(tmp_run, on_finding="shout")
    seen = []
    model = mlp()
    hook = tv.torch.Hook(
        tmp_run,
        collections=["losses"],
        save=tv.SaveConfig(),
        rules=[LossAbove(0.5)],
        on_finding=seen.append,
        strict=True,
    ).register(model)
    with hook:
        for i in range(3):
            model(torch.randn(2, 6))
            hook.record_loss(float(i))
    assert [f.step for f in seen] == [1, 2]  # evaluated at the latest at close


def test_user_collections_of_optimizer_state_and_backward_gradients(tmp_run):
    # A regex-selected user collection alone must make the hook watch the optimizer state,
    # and (without an optimizer) the backward pass.
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    hook = tv.torch.Hook(
        tmp_run,
        collections=[tv.Collection("first", include=[r"^0\."], kinds=["optimizer_variables"])],
        save=tv.SaveConfig(),
        strict=True,
    ).register(model, opt)
    with hook:
        train(hook, model, opt, 2, record=False)
    assert tv.open(tmp_run).tensor_names() == [
        "0.bias/exp_avg",
        "0.bias/exp_avg_sq",
        "0.weight/exp_avg",
        "0.weight/exp_avg_sq",
    ]
    other = os.path.join(os.path.dirname(tmp_run), "no-opt")
    model = mlp()
    hook = tv.torch.Hook(
        other,
        collections=[tv.Collection("g2", include=[r"^2\.weight"], kinds=["gradients"])],
        save=tv.SaveConfig(),
        strict=True,
    ).register(model)
    with hook:
        model(torch.randn(3, 6)).sum().backward()
    assert tv.open(other).tensor_names() == ["2.weight/grad"]
