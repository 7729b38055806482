"""The JAX hook: a jitted optax MLP on scikit-learn's digits, read back, a fault, errors."""

import logging

import numpy as np
import pytest

import tensorvigil as tv

jax = pytest.importorskip("jax", reason="JAX is not installed: pip install 'tensorvigil[jax]'")
optax = pytest.importorskip("optax", reason="optax is not installed: pip install optax")
jnp = jax.numpy
datasets = pytest.importorskip("sklearn.datasets")


@pytest.fixture(scope="module")
def digits():
    d = datasets.load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int32)
    return (
        jnp.asarray(x[:1024]),
        jnp.asarray(y[:1024]),
        jnp.asarray(x[1024:]),
        jnp.asarray(y[1024:]),
    )


def init_mlp(seed=0, hidden=32):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return {
        "params": {
            "Dense_0": {
                "kernel": jax.random.normal(k1, (64, hidden)) * (2 / 64) ** 0.5,
                "bias": jnp.zeros(hidden),
            },
            "Dense_1": {
                "kernel": jax.random.normal(k2, (hidden, 10)) * (1 / hidden) ** 0.5,
                "bias": jnp.zeros(10),
            },
        }
    }


def forward(variables, x):
    p = variables["params"]
    h = jax.nn.relu(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
    return h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]


def make_step(opt, loss_fn):
    @jax.jit
    def train_step(variables, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(variables, x, y)
        updates, opt_state = opt.update(grads, opt_state, variables)
        return optax.apply_updates(variables, updates), opt_state, loss, grads, updates

    return train_step


def xent(variables, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(forward(variables, x), y).mean()


@jax.jit
def accuracy(variables, x, y):
    return (forward(variables, x).argmax(-1) == y).mean()


def host(tree):
    return jax.tree_util.tree_map(lambda a: np.array(a), tree)


def test_jitted_optax_training_read_back(tmp_run, digits):
    x, y, xv, yv = digits
    opt = optax.adam(1e-2)
    variables = init_mlp()
    opt_state = opt.init(variables)
    train_step = make_step(opt, xent)
    hook = tv.jax.Hook(
        tmp_run, save=tv.SaveConfig(every=5, eval=tv.SaveConfig(every=1)), strict=True
    )
    expected = {}  # hook step -> host copies of what the step used and produced
    losses = []
    with hook:
        for i in range(30):
            b = slice((i * 64) % 1024, (i * 64) % 1024 + 64)
            new_vars, opt_state, loss, grads, updates = train_step(variables, opt_state, x[b], y[b])
            saving = hook.will_save()
            hook.save_step(
                params=variables, grads=grads, updates=updates, opt_state=opt_state, loss=loss
            )
            assert saving == (i % 5 == 0)
            if saving:
                expected[hook.current_step] = (
                    host(variables),
                    host(grads),
                    host(updates),
                    host(opt_state),
                    float(loss),
                )
            losses.append(float(loss))
            variables = new_vars
            if i % 10 == 9:
                acc = accuracy(variables, xv, yv)
                hook.save_step(loss=xent(variables, xv, yv), metrics={"accuracy": acc}, mode="eval")
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])  # it really trains
    assert float(acc) > 0.7

    run = tv.open(tmp_run)
    train_steps = run.steps(mode="train")
    assert train_steps == sorted(expected)
    assert len(train_steps) == 6 and len(run.steps(mode="eval")) == 3
    params = ["Dense_0.bias", "Dense_0.kernel", "Dense_1.bias", "Dense_1.kernel"]
    cols = run.collections()
    assert cols["weights"] == ["Dense_0.kernel", "Dense_1.kernel"]
    assert cols["biases"] == ["Dense_0.bias", "Dense_1.bias"]
    assert cols["gradients"] == [p + "/grad" for p in params]
    assert cols["metrics"] == ["metric/accuracy"]
    assert set(cols["optimizer_variables"]) == (
        {p + "/update" for p in params}
        | {p + "/0.mu" for p in params}
        | {p + "/0.nu" for p in params}
        | {"opt/0.count"}
    )
    for step, (v, g, u, st, loss) in expected.items():
        for layer in ("Dense_0", "Dense_1"):
            for leaf in ("kernel", "bias"):
                name = f"{layer}.{leaf}"
                np.testing.assert_array_equal(
                    run.tensor(name).value(step), v["params"][layer][leaf]
                )
                gv = g["params"][layer][leaf]
                np.testing.assert_array_equal(run.tensor(name + "/grad").value(step), gv)
                np.testing.assert_array_equal(
                    run.tensor(name + "/update").value(step), u["params"][layer][leaf]
                )
                np.testing.assert_array_equal(
                    run.tensor(name + "/0.mu").value(step), st[0].mu["params"][layer][leaf]
                )
                stats = run.tensor(name + "/grad").stats(step)
                assert stats.numel == gv.size and stats.nan == 0
                assert stats.l2 == pytest.approx(np.linalg.norm(gv.astype(np.float64)), rel=1e-6)
        assert int(run.tensor("opt/0.count").value(step)) == int(st[0].count)
        assert float(run.tensor("loss").value(step)) == pytest.approx(loss, rel=1e-6)
    eval_steps = run.steps(mode="eval")
    assert run.tensor("metric/accuracy").steps() == eval_steps
    assert float(run.tensor("metric/accuracy").value(eval_steps[-1])) == pytest.approx(float(acc))


@pytest.mark.parametrize("fault", [False, True])
def test_log_of_zero_fault_caught_by_rule(tmp_run, digits, fault):
    """A hand-written cross-entropy takes log(softmax): with over-scaled logits the softmax
    underflows to 0, log(0) = -inf and the gradients turn NaN. ExplodingTensor stops the run."""
    x, y, _, _ = digits
    scale = 1e4 if fault else 1.0

    def buggy_xent(variables, xb, yb):
        p = jax.nn.softmax(forward(variables, xb) * scale)
        return -jnp.mean(jnp.log(p[jnp.arange(yb.shape[0]), yb]))

    opt = optax.sgd(0.1)
    variables = init_mlp(seed=1)
    opt_state = opt.init(variables)
    train_step = make_step(opt, buggy_xent)
    hook = tv.jax.Hook(
        tmp_run,
        save=tv.SaveConfig(every=1),
        reductions_only=True,
        rules=[tv.rules.get("ExplodingTensor", collections=["gradients", "losses"])],
        on_finding="stop",
        strict=True,
    )
    steps = 0
    with pytest.raises(tv.TrainingStopped) if fault else _nothing():
        with hook:
            for i in range(40):
                b = slice(i * 16, i * 16 + 16)
                variables, opt_state, loss, grads, _ = train_step(variables, opt_state, x[b], y[b])
                hook.save_step(grads=grads, loss=loss)
                steps += 1
    fired = [f for f in hook.findings if f.fired]
    if not fault:
        assert steps == 40 and fired == []
        return
    assert steps < 40  # stopped early
    assert fired and fired[0].rule == "ExplodingTensor"
    assert any(n.endswith("/grad") or n == "loss" for n in fired[0].evidence["tensors"])
    run = tv.open(tmp_run)
    first = fired[0].step
    assert any(run.tensor(n).stats(first).nan > 0 for n in run.tensor_names(collection="gradients"))


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_collections_reductions_only_and_flax_names(tmp_run):
    variables = init_mlp()
    assert tv.jax.leaf_names(variables) == [
        "Dense_0.bias",
        "Dense_0.kernel",
        "Dense_1.bias",
        "Dense_1.kernel",
    ]
    assert tv.jax.leaf_names([jnp.ones(2), {"w": jnp.ones(1)}]) == ["0", "1.w"]
    hook = tv.jax.Hook(
        tmp_run,
        collections=[tv.Collection("first", include=r"^Dense_0\.", kinds=["weights", "gradients"])],
        save=tv.SaveConfig(every=1),
        reductions_only=True,
        strict=True,
    )
    grads = jax.tree_util.tree_map(lambda a: a * 2, variables)
    with hook:
        hook.save_step(params=variables, grads=grads, loss=1.5)
        hook.save_step(params={"bf16": jnp.ones((3, 3), jnp.bfloat16)}, mode="predict")
    run = tv.open(tmp_run)
    assert run.tensor_names() == ["Dense_0.bias/grad", "Dense_0.kernel", "Dense_0.kernel/grad"]
    st = run.tensor("Dense_0.kernel/grad").stats(0)
    assert st.sum == pytest.approx(float(jnp.sum(grads["params"]["Dense_0"]["kernel"])), rel=1e-5)
    assert not run.tensor("Dense_0.kernel").record(0).has_value
    assert run.steps(mode="predict") == []  # "first" selects no name of that step


def test_errors_inside_jit_and_bad_values(tmp_run, caplog):
    hook = tv.jax.Hook(tmp_run, save=tv.SaveConfig(every=1), strict=True)

    @jax.jit
    def traced(w):
        hook.save_step(params={"w": w})
        return w * 2

    with pytest.raises(tv.InvalidArgumentError, match="traced value.*inside jax.jit"):
        traced(jnp.ones(3))
    with pytest.raises(tv.InvalidArgumentError, match="cannot save 'loss'.*got str"):
        hook.save_step(loss="high")
    with pytest.raises(tv.InvalidArgumentError, match="metrics must be a dict"):
        hook.save_step(metrics=[1.0])
    with pytest.raises(tv.InvalidArgumentError, match="unknown mode"):
        hook.save_step(loss=1.0, mode="training")
    with pytest.raises(tv.InvalidArgumentError, match="save must be a tv.SaveConfig"):
        tv.jax.Hook(tmp_run, save=10)
    hook.close()

    # Not strict: the error is logged once, capture turns off and training goes on.
    lenient = tv.jax.Hook(tmp_run + "2", save=tv.SaveConfig(every=1))

    @jax.jit
    def traced2(w):
        lenient.save_step(params={"w": w})
        return w * 2

    with caplog.at_level(logging.ERROR, logger="tensorvigil"):
        out = traced2(jnp.ones(3))
    assert float(out.sum()) == 6.0 and lenient.disabled
    assert "capture disabled" in caplog.text
    lenient.save_step(loss=1.0)  # a no-op now
    lenient.close()


# -- statistics computed on the device (forced on the CPU backend) ----------------------------


def _step_tree(seed=0):
    """Leaves that exercise the device statistics: NaN/Inf/zeros, > 4096 elements (blocked
    sums), a constant, bfloat16, float16, an empty leaf and an integer counter."""
    rng = np.random.default_rng(seed)
    big = rng.normal(0.5, 2.0, size=(37, 129)).astype(np.float32)
    big[0, :3] = [np.nan, np.inf, -np.inf]
    big[1, :5] = 0.0
    return {
        "big": jnp.asarray(big),
        "bf16": jnp.asarray(rng.normal(size=(64, 33)), jnp.bfloat16),
        "f16": jnp.asarray(rng.normal(-3.0, 0.1, size=(500,)), jnp.float16),
        "const": jnp.full((7,), 2.5, jnp.float32),
        "empty": jnp.zeros((0, 4), jnp.float32),
        "count": jnp.asarray(3, jnp.int32),
    }


def _assert_stats_close(dev, ref, name):
    # Counts, min, max and abs_max are exact. The device sums run in float32 (blocked, ~sqrt(n)
    # partials): for these <= 5k-element tensors the relative error is a few 1e-7; 1e-5
    # leaves a margin of ~30x. The mean is compared relative to |mean| + std (the scale its
    # rounding error has). Histogram bins may differ only for an element within a float32
    # rounding of a bin edge: none of these random values is, so the counts must match.
    for f in ("numel", "nan", "posinf", "neginf", "zeros", "finite"):
        assert getattr(dev, f) == getattr(ref, f), (name, f)
    if ref.finite == 0:
        assert np.isnan(dev.min) and np.isnan(dev.max) and dev.mean == 0 and dev.l1 == 0
    else:
        assert (dev.min, dev.max, dev.abs_max) == (ref.min, ref.max, ref.abs_max), name
        scale = abs(ref.mean) + ref.std
        assert abs(dev.mean - ref.mean) <= 1e-5 * scale, name
        assert dev.var == pytest.approx(ref.var, rel=1e-5, abs=1e-12), name
        assert dev.l1 == pytest.approx(ref.l1, rel=1e-5), name
    assert (dev.hist_edges is None) == (ref.hist_edges is None), name
    if ref.hist is not None:
        np.testing.assert_array_equal(dev.hist_edges, ref.hist_edges)
        np.testing.assert_array_equal(dev.hist, ref.hist)
    np.testing.assert_array_equal(dev.exp_hist, ref.exp_hist)


def test_device_stats_match_native_and_skip_transfers(tmp_path, monkeypatch):
    from jax._src.array import ArrayImpl

    from tensorvigil.hooks import jax as tvjax

    fetched, converted = [], []
    real_fetch, real_array = tvjax._fetch, ArrayImpl.__array__

    def spy_fetch(arrays):
        fetched.extend(a.shape for a in arrays)
        return real_fetch(arrays)

    def spy_array(self, *a, **k):
        converted.append(self.shape)
        return real_array(self, *a, **k)

    monkeypatch.setattr(tvjax, "_fetch", spy_fetch)
    monkeypatch.setattr(ArrayImpl, "__array__", spy_array)
    colls = [
        tv.Collection("stats", include=r"^(big|bf16|f16|const|empty|count)$", reductions_only=True),
        tv.Collection("vals", include=r"/grad$"),
    ]
    runs = {}
    for device in (True, False):
        out = str(tmp_path / f"dev{device}")
        hook = tv.jax.Hook(
            out, collections=colls, save=tv.SaveConfig(every=1), hist_bins=16, exp_hist=True,
            device_stats=device, strict=True,
        )
        fetched.clear()
        converted.clear()
        with hook:
            for step in range(2):
                tree = _step_tree(step)
                hook.save_step(tensors=tree, grads={"g": tree["big"][:20] * 2})
        if device:
            # Only the integer counter (host path) and the gradient (values kept) were read.
            assert sorted(fetched) == [(), (), (20, 129), (20, 129)]
            # The gather of results converts only the small stacked arrays, no leaf.
            leaf_shapes = {(37, 129), (64, 33), (500,), (7,), (0, 4)}
            assert converted and not leaf_shapes & set(converted)
        runs[device] = tv.open(out)
    dev, ref = runs[True], runs[False]
    assert dev.tensor_names() == ref.tensor_names() == sorted(
        ["big", "bf16", "f16", "const", "empty", "count", "g/grad"]
    )
    for name in ref.tensor_names():
        for step in (0, 1):
            rd, rr = dev.tensor(name).record(step), ref.tensor(name).record(step)
            assert (rd.dtype, rd.shape, rd.has_value) == (rr.dtype, rr.shape, rr.has_value)
            _assert_stats_close(rd.stats, rr.stats, name)
    assert dev.tensor("bf16").record(0).dtype == "bfloat16"
    assert not dev.tensor("big").record(0).has_value
    np.testing.assert_array_equal(
        dev.tensor("g/grad").value(1), ref.tensor("g/grad").value(1)
    )


def test_device_stats_nan_gradient_fires_exploding_tensor(tmp_run):
    hook = tv.jax.Hook(
        tmp_run,
        save=tv.SaveConfig(every=1),
        reductions_only=True,
        rules=[tv.rules.get("ExplodingTensor", collections=["gradients"])],
        on_finding="stop",
        device_stats=True,
        strict=True,
    )
    grads = {"Dense_0": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)}}
    with pytest.raises(tv.TrainingStopped), hook:
        for step in range(20):
            if step == 3:
                grads = {"Dense_0": {"kernel": grads["Dense_0"]["kernel"].at[2, 1].set(jnp.nan),
                                     "bias": grads["Dense_0"]["bias"]}}
            hook.save_step(grads=grads)
    fired = [f for f in hook.findings if f.fired]
    assert fired and fired[0].rule == "ExplodingTensor" and fired[0].step >= 3
    st = tv.open(tmp_run).tensor("Dense_0.kernel/grad").stats(3)
    assert (st.nan, st.finite, st.max) == (1, 31, 1.0)


def test_device_stats_option_is_checked(tmp_run):
    with pytest.raises(tv.InvalidArgumentError, match="device_stats must be 'auto', True or False"):
        tv.jax.Hook(tmp_run, device_stats="gpu")
    with pytest.raises(tv.InvalidArgumentError, match="device_stats"):
        tv.jax.Hook(tmp_run, device_stats=1)
