"""The PyTorch hook on real training loops: what a run reads back is what the model used.

Each test trains a small model (CNN, MLP with gradient accumulation, transformer block, LSTM,
DDP on two processes, a compiled model, and loops that fail or exit abruptly) and compares the
tensors read back through ``tv.open`` with copies taken in the loop itself.
"""

import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import tensorvigil as tv
import tensorvigil.store.writer as tv_writer

torch = pytest.importorskip("torch")
nn = torch.nn

SCRIPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts")
EVERY_STEP = tv.SaveConfig(every=1)


# -- helpers --------------------------------------------------------------------------------------


def assert_saved(run, name, step, expected, rank=0):
    """The value of ``name`` at ``step`` equals ``expected`` exactly, as float32."""
    got = run.tensor(name).value(step, rank)
    exp = np.asarray(expected)
    assert got.dtype == np.float32, f"{name}@{step}: dtype {got.dtype}"
    assert got.shape == exp.shape, f"{name}@{step}: shape {got.shape} != {exp.shape}"
    np.testing.assert_array_equal(got, exp, err_msg=f"{name} at step {step} (rank {rank})")


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def grads(model):
    return {n + "/grad": p.grad.clone() for n, p in model.named_parameters()}


def clone_tree(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (tuple, list)):
        return type(value)(clone_tree(v) for v in value)
    return value


def rel_close(got, expected, rel=1e-6):
    return abs(got - expected) <= rel * max(abs(expected), 1e-30)


def subprocess_env(**extra):
    """Environment of a child process that imports this tensorvigil (not the installed one)."""
    env = dict(os.environ)
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(tv.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(script, args, log_path, *, stdout_pipe=False, **env):
    """Starts ``scripts/<script>``; its stderr (and stdout unless piped) goes to ``log_path``."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [sys.executable, os.path.join(SCRIPTS, script), *map(str, args)],
            env=subprocess_env(OMP_NUM_THREADS=1, **env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else log,
            stderr=log,
        )


def kill_all(procs):
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - a process that ignores SIGKILL
            pass
        if p.stdout is not None:
            p.stdout.close()


def wait_all(procs, timeout):
    """Waits until every process exited; as soon as one fails, or on timeout, kills the rest.

    Returns:
        The exit codes (the caller checks them and shows the logs).

    """
    deadline = time.monotonic() + timeout
    try:
        pending = list(procs)
        while pending:
            for p in list(pending):
                try:
                    p.wait(timeout=0.2)
                except subprocess.TimeoutExpired:
                    continue
                pending.remove(p)
                if p.returncode != 0:
                    pending.clear()  # the others may wait for it forever
                    break
            if pending and time.monotonic() > deadline:
                pytest.fail(f"child processes did not finish within {timeout} s (killed)")
    finally:
        kill_all(procs)
    return [p.returncode for p in procs]


def read_log(path):
    with open(path, "rb") as f:
        return f.read().decode(errors="replace")


def wait_for_line(proc, text, timeout, log_path):
    """Reads ``proc``'s stdout until a line equal to ``text``; fails on timeout or exit."""
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while True:
        lines = buf.split(b"\n")
        if any(line.decode(errors="replace").strip() == text for line in lines[:-1]):
            return
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"no line {text!r} from the child within {timeout} s; got {buf!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                proc.wait(timeout=30)
                pytest.fail(
                    f"child exited (rc={proc.returncode}) before printing {text!r}: {buf!r}\n"
                    f"{read_log(log_path)[-4000:]}"
                )
            buf += chunk


def cnn(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential()
    model.add_module("conv1", nn.Conv2d(1, 4, 3, padding=1))
    model.add_module("relu1", nn.ReLU(inplace=True))
    model.add_module("pool1", nn.MaxPool2d(2))
    model.add_module("conv2", nn.Conv2d(4, 6, 3, padding=1))
    model.add_module("relu2", nn.ReLU(inplace=True))
    model.add_module("pool2", nn.MaxPool2d(2))
    model.add_module("flat", nn.Flatten())
    model.add_module("fc", nn.Linear(6 * 2 * 2, 3))
    return model


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def batches(n, shape, classes, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(*shape, generator=g), torch.randint(0, classes, (shape[0],), generator=g))
        for _ in range(n)
    ]


def compile_or_skip(backend):
    """Skips unless torch.compile with ``backend`` works here (no tensorvigil involved)."""
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile is not available in this torch")
    try:
        torch._dynamo.reset()
        f = torch.compile(lambda x: (x * 2).sin(), backend=backend)
        f(torch.ones(3, requires_grad=True)).sum().backward()
    except Exception as e:  # noqa: BLE001 - any failure here is the environment's
        pytest.skip(
            f"torch.compile(backend={backend!r}) does not work here: "
            f"{type(e).__name__}: {str(e)[:200]}"
        )


# -- 1. CNN: weights, gradients, in-place ReLU inputs, loss ------------------------------------


def test_cnn_weights_gradients_relu_inputs_and_loss(tmp_run):
    model = cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    hook = tv.torch.Hook(
        tmp_run,
        collections=["weights", "biases", "gradients", "relu_input", "losses"],
        save=EVERY_STEP,
        strict=True,
    ).register(model, opt)
    relu_in = {}

    def keep_input(name):
        def pre_hook(module, args):
            relu_in.setdefault(name, []).append(args[0].detach().clone())

        return pre_hook

    for name in ("relu1", "relu2"):
        getattr(model, name).register_forward_pre_hook(keep_input(name))
    seen = []
    with hook:
        for x, y in batches(4, (8, 1, 8, 8), 3):
            out = model(x)
            exp = snapshot(model)
            loss = nn.functional.cross_entropy(out, y)
            hook.record_loss(loss)
            opt.zero_grad()
            loss.backward()
            exp.update(grads(model))
            exp["loss"] = np.float32(loss.item())
            seen.append(exp)
            opt.step()

    run = tv.open(tmp_run)
    assert run.steps() == [0, 1, 2, 3]
    assert run.ended()
    params = [n for n, _ in model.named_parameters()]
    assert run.tensor_names() == sorted(
        params + [n + "/grad" for n in params] + ["loss", "relu1/input", "relu2/input"]
    )
    assert run.collections()["relu_input"] == ["relu1/input", "relu2/input"]
    for s, exp in enumerate(seen):
        for name, value in exp.items():
            assert_saved(run, name, s, value.numpy() if torch.is_tensor(value) else value)
        for name in ("relu1", "relu2"):
            want = relu_in[name][s].numpy()
            assert (want < 0).any(), "the ReLU input must have negative values for this test"
            assert_saved(run, f"{name}/input", s, want)
    # The weights changed between steps (so equality above is not vacuous).
    assert not np.array_equal(run.tensor("fc.weight").value(0), run.tensor("fc.weight").value(3))


# -- 2. MLP with gradient accumulation and explicit steps -----------------------------------------


def test_gradient_accumulation_saves_the_accumulated_gradient(tmp_run):
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    hook = tv.torch.Hook(tmp_run, save=EVERY_STEP, strict=True).register(model, opt)
    micro = 3
    data = batches(4 * micro, (5, 6), 3)
    seen = []
    with hook:
        for s in range(4):
            exp = snapshot(model)
            opt.zero_grad()
            first_grad = None
            for k in range(micro):
                x, y = data[s * micro + k]
                loss = nn.functional.cross_entropy(model(x), y) / micro
                hook.record_loss(loss, name=f"micro{k}")
                exp[f"loss/micro{k}"] = np.float32(loss.item())
                loss.backward()
                if first_grad is None:
                    first_grad = model[0].weight.grad.clone()
            exp.update(grads(model))
            assert not torch.equal(first_grad, exp["0.weight/grad"])
            seen.append(exp)
            opt.step()
            hook.step()

    run = tv.open(tmp_run)
    assert run.steps() == [0, 1, 2, 3]  # one step per optimizer step, not per micro-batch
    for s, exp in enumerate(seen):
        for name, value in exp.items():
            assert_saved(run, name, s, value.numpy() if torch.is_tensor(value) else value)


# -- 3. Transformer block with a user collection (statistics only, every 2nd step) ---------------


def test_transformer_user_collection_stats_only_every_second_step(tmp_run):
    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(
        d_model=32, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    attn = tv.Collection(
        "attn",
        include=[r"self_attn"],
        kinds=("weights", "gradients", "outputs"),
        save=tv.SaveConfig(every=2),
        reductions_only=True,
    )
    hook = tv.torch.Hook(tmp_run, collections=[attn, "losses"], save=EVERY_STEP, strict=True)
    hook.register(model, opt)
    attn_out = []
    model.self_attn.register_forward_hook(lambda m, a, out: attn_out.append(clone_tree(out[0])))
    seen = []
    g = torch.Generator().manual_seed(3)
    with hook:
        for _ in range(5):
            x = torch.randn(4, 6, 32, generator=g)
            exp = snapshot(model)
            loss = model(x).pow(2).mean()
            hook.record_loss(loss)
            opt.zero_grad()
            loss.backward()
            exp.update(grads(model))
            exp["self_attn/output"] = attn_out[-1]
            exp["loss"] = torch.tensor(loss.item())
            seen.append(exp)
            opt.step()

    run = tv.open(tmp_run)
    assert run.steps() == [0, 1, 2, 3, 4]  # losses every step
    attn_params = [n for n, _ in model.named_parameters() if "self_attn" in n]
    assert len(attn_params) == 4
    # kinds= has no "biases": out_proj.bias is left out, its gradient (kind gradients) is not.
    want = [n for n in attn_params if n.endswith("weight")]
    want = sorted(want + [n + "/grad" for n in attn_params] + ["self_attn/output"])
    names = run.tensor_names(collection="attn")
    # Whether in_proj_bias is a bias is checked by test_attention_in_proj_bias_is_a_bias.
    assert [n for n in names if n != "self_attn.in_proj_bias"] == want
    assert run.tensor_names() == sorted(names + ["loss"])  # nothing outside the collection
    for name in names:
        t = run.tensor(name)
        assert t.steps() == [0, 2, 4], name
        for s in (0, 2, 4):
            rec = t.record(s)
            assert rec.has_value is False
            with pytest.raises(tv.NotFoundError, match="statistics only"):
                t.value(s)
            ref = seen[s][name].numpy().astype(np.float64)
            st = t.stats(s)
            assert rec.shape == ref.shape and st.numel == ref.size
            assert rel_close(st.mean, ref.mean()), (name, s, st.mean, ref.mean())
            assert rel_close(st.max, ref.max()), (name, s, st.max, ref.max())
            assert rel_close(st.min, ref.min()), (name, s, st.min, ref.min())
        with pytest.raises(tv.StepNotAvailableError):
            t.record(1)
    for s in range(5):
        assert_saved(run, "loss", s, seen[s]["loss"].numpy())


def test_attention_in_proj_bias_is_a_bias(tmp_run):
    # nn.MultiheadAttention names its bias "in_proj_bias": a bias, like "bias" and "bias_ih_l0".
    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, batch_first=True)
    hook = tv.torch.Hook(tmp_run, collections=["weights", "biases"], save=EVERY_STEP, strict=True)
    with hook.register(model):
        model(torch.randn(2, 3, 8))
    cols = tv.open(tmp_run).collections()
    biases = [n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1].endswith("bias")]
    assert "self_attn.in_proj_bias" in biases
    assert cols["biases"] == sorted(biases)
    assert cols["weights"] == sorted(n for n, _ in model.named_parameters() if n not in biases)


# -- 4. LSTM: tuple outputs are flattened --------------------------------------------------------


class LstmNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(5, 7, batch_first=True)
        self.fc = nn.Linear(7, 2)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.fc(out[:, -1])


def test_lstm_tuple_output_is_flattened(tmp_run):
    torch.manual_seed(0)
    model = LstmNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = tv.torch.Hook(tmp_run, collections=["outputs", "losses"], save=EVERY_STEP, strict=True)
    hook.register(model, opt)
    outs = {"lstm": [], "fc": [], "model": []}
    model.lstm.register_forward_hook(lambda m, a, out: outs["lstm"].append(clone_tree(out)))
    model.fc.register_forward_hook(lambda m, a, out: outs["fc"].append(clone_tree(out)))
    model.register_forward_hook(lambda m, a, out: outs["model"].append(clone_tree(out)))
    g = torch.Generator().manual_seed(2)
    losses = []
    with hook:
        for _ in range(3):
            x = torch.randn(4, 6, 5, generator=g)
            loss = model(x).pow(2).sum()
            hook.record_loss(loss)
            losses.append(np.float32(loss.item()))
            opt.zero_grad()
            loss.backward()
            opt.step()

    run = tv.open(tmp_run)
    assert run.steps() == [0, 1, 2]
    assert run.tensor_names() == [
        "fc/output",
        "loss",
        "lstm/output",
        "lstm/output.1",
        "lstm/output.2",
        "model/output",
    ]
    for s in range(3):
        out, (h, c) = outs["lstm"][s]
        assert_saved(run, "lstm/output", s, out.numpy())
        assert_saved(run, "lstm/output.1", s, h.numpy())
        assert_saved(run, "lstm/output.2", s, c.numpy())
        assert_saved(run, "fc/output", s, outs["fc"][s].numpy())
        assert_saved(run, "model/output", s, outs["model"][s].numpy())
        assert_saved(run, "loss", s, losses[s])


# -- 5. DistributedDataParallel on two processes --------------------------------------------------


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """Two gloo ranks train twice: runs ``all`` (ranks="all") and ``zero`` (ranks="zero").

    Both variants run in one launch (one process group) to pay the start of two torch processes
    once. Returns ``{variant: (run_dir, [expected of rank 0, expected of rank 1])}``.
    """
    out = tmp_path_factory.mktemp("ddp")
    port = free_port()
    logs = [out / f"rank{r}.log" for r in (0, 1)]
    env = dict(WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    procs = [
        spawn("torch_ddp_train.py", [out], logs[r], RANK=r, LOCAL_RANK=r, **env) for r in (0, 1)
    ]
    for r, rc in enumerate(wait_all(procs, 120)):
        assert rc == 0, f"rank {r} failed (rc={rc}):\n{read_log(logs[r])[-4000:]}"
    return {
        v: (str(out / v), [dict(np.load(out / f"{v}-rank{r}.npz")) for r in (0, 1)])
        for v in ("all", "zero")
    }


DDP_PARAMS = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]


def test_ddp_two_ranks_all(ddp_runs):
    run_dir, expected = ddp_runs["all"]
    run = tv.open(run_dir)
    assert run.ranks() == [0, 1]
    assert run.steps() == [0, 1, 2]
    assert run.ended(0) and run.ended(1)
    names = sorted(DDP_PARAMS + [p + "/grad" for p in DDP_PARAMS] + ["loss"])
    assert run.tensor_names() == names  # not "module.fc1.weight"
    assert sorted(expected[0]) == sorted(f"{n}@{s}" for n in names for s in range(3))
    for key in expected[0]:
        name, step = key.rsplit("@", 1)
        for r in (0, 1):
            assert_saved(run, name, int(step), expected[r][key], rank=r)
        a, b = (run.tensor(name).value(int(step), rank=r) for r in (0, 1))
        if name == "loss":
            assert a != b  # each rank trains on its own data ...
        else:
            np.testing.assert_array_equal(a, b)  # ... but DDP syncs weights and gradients


def test_ddp_two_ranks_zero_writes_rank_zero_only(ddp_runs):
    run_dir, expected = ddp_runs["zero"]
    run = tv.open(run_dir)
    assert run.ranks() == [0]
    assert run.steps() == [0, 1, 2]
    assert run.ended(0)
    names = sorted(DDP_PARAMS + [p + "/grad" for p in DDP_PARAMS] + ["loss"])
    assert run.tensor_names() == names
    for key, value in expected[0].items():
        name, step = key.rsplit("@", 1)
        assert_saved(run, name, int(step), value)
    assert "fc1.weight/grad@2" in expected[1]  # rank 1 did train, with its hook
    with pytest.raises(tv.NotFoundError, match="no rank 1"):
        run.tensor("fc1.weight").record(0, rank=1)


# -- 6. torch.compile ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "backend",
    [
        "aot_eager",
        pytest.param(
            "inductor",
            marks=[
                pytest.mark.slow,  # a cold inductor compile takes ~25 s on 2 cores
                # torch's own code warns while inductor compiles:
                pytest.mark.filterwarnings(
                    "ignore:.*torch.jit.script_method.* is deprecated:DeprecationWarning"
                ),
            ],
        ),
    ],
)
def test_compiled_model_weights_gradients_loss_and_outputs_warning(tmp_run, backend, caplog):
    compile_or_skip(backend)
    model = mlp()
    compiled = torch.compile(model, backend=backend)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    hook = tv.torch.Hook(
        tmp_run,
        collections=["weights", "biases", "gradients", "losses", "outputs"],
        save=EVERY_STEP,
        strict=True,
    )
    with caplog.at_level(logging.WARNING, logger="tensorvigil"):
        hook.register(compiled, opt)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "compiled" in warnings[0].getMessage()
    assert "not captured" in warnings[0].getMessage()
    seen = []
    with hook:
        for x, y in batches(3, (8, 6), 3):
            exp = snapshot(model)
            loss = nn.functional.cross_entropy(compiled(x), y)
            hook.record_loss(loss)
            opt.zero_grad()
            loss.backward()
            exp.update(grads(model))
            exp["loss"] = torch.tensor(loss.item())
            seen.append(exp)
            opt.step()
    run = tv.open(tmp_run)
    assert run.steps() == [0, 1, 2]
    assert not run.tensor_names(regex="/output")
    params = [n for n, _ in model.named_parameters()]
    assert run.tensor_names() == sorted(params + [n + "/grad" for n in params] + ["loss"])
    for s, exp in enumerate(seen):
        for name, value in exp.items():
            assert_saved(run, name, s, value.numpy())


# -- 7. exit paths ---------------------------------------------------------------------------------


def test_exception_mid_step_keeps_committed_and_partial_step(tmp_run):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = tv.torch.Hook(tmp_run, save=EVERY_STEP, strict=True).register(model, opt)
    seen = []
    with pytest.raises(RuntimeError, match="data loader broke"), hook:
        for s, (x, y) in enumerate(batches(6, (8, 6), 3)):
            exp = snapshot(model)
            loss = nn.functional.cross_entropy(model(x), y)
            hook.record_loss(loss)
            exp["loss"] = torch.tensor(loss.item())
            seen.append(exp)
            if s == 3:
                raise RuntimeError("data loader broke")
            opt.zero_grad()
            loss.backward()
            seen[-1].update(grads(model))
            opt.step()
    run = tv.open(tmp_run)
    assert run.ended()
    assert run.steps() == [0, 1, 2, 3]
    assert run.tensor("0.weight/grad").steps() == [0, 1, 2]  # step 3 never got to backward
    assert run.tensor("0.weight").steps() == [0, 1, 2, 3]
    for s, exp in enumerate(seen):
        for name, value in exp.items():
            assert_saved(run, name, s, value.numpy())


def check_expected_steps(run, expected_dir, steps):
    for s in steps:
        with np.load(os.path.join(expected_dir, f"step{s}.npz")) as exp:
            for name in exp.files:
                assert_saved(run, name, s, exp[name])


def test_unclosed_hook_is_closed_at_interpreter_exit(tmp_run, tmp_path):
    log = tmp_path / "child.log"
    proc = spawn("torch_exit_train.py", [tmp_run, tmp_path, "atexit"], log)
    assert wait_all([proc], 60) == [0], read_log(log)[-4000:]
    assert "step 4 done\n" in read_log(log)
    run = tv.open(tmp_run)
    assert run.ended()
    assert run.steps() == [0, 1, 2, 3, 4]
    check_expected_steps(run, tmp_path, range(5))
    assert "0.weight/grad" in run.collections()["gradients"]


def test_sigkill_keeps_the_committed_steps(tmp_run, tmp_path):
    log = tmp_path / "child.log"
    proc = spawn("torch_exit_train.py", [tmp_run, tmp_path, "kill"], log, stdout_pipe=True)
    try:
        wait_for_line(proc, "step 3 done", 60, log)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        kill_all([proc])
    assert proc.returncode == -signal.SIGKILL
    run = tv.open(tmp_run)
    assert not run.ended()
    steps = run.steps()
    assert steps[:3] == [0, 1, 2]
    assert steps == list(range(len(steps)))
    check_expected_steps(run, tmp_path, steps)


# -- 8. hook failures: non-strict keeps training, strict raises ----------------------------------


def failing_write_at(monkeypatch, bad_step):
    real = tv_writer.StoreWriter.write

    def write(self, name, step, value, **kwargs):
        if step == bad_step:
            raise OSError(f"injected write failure at step {step}")
        return real(self, name, step, value, **kwargs)

    monkeypatch.setattr(tv_writer.StoreWriter, "write", write)


def train_mlp(model, hook, steps=5):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if hook is not None:
        hook.register(model, opt)
    for x, y in batches(steps, (8, 6), 3):
        loss = nn.functional.cross_entropy(model(x), y)
        if hook is not None:
            hook.record_loss(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def test_non_strict_write_failure_disables_capture_and_training_continues(
    tmp_run, monkeypatch, caplog
):
    failing_write_at(monkeypatch, 2)
    hook = tv.torch.Hook(tmp_run, save=EVERY_STEP, strict=False)
    with caplog.at_level(logging.ERROR, logger="tensorvigil"), hook:
        trained = train_mlp(mlp(), hook)
    assert hook.disabled
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert "capture disabled" in errors[0].getMessage()
    assert "injected write failure at step 2" in errors[0].getMessage()
    reference = train_mlp(mlp(), None)  # the hook's failure changed nothing in training
    for (n, p), (_, q) in zip(trained.named_parameters(), reference.named_parameters()):
        assert torch.equal(p, q), n
    run = tv.open(tmp_run)
    assert run.steps() == [0, 1]


def test_strict_write_failure_propagates_to_the_training_loop(tmp_run, monkeypatch):
    failing_write_at(monkeypatch, 2)
    hook = tv.torch.Hook(tmp_run, save=EVERY_STEP, strict=True)
    done = []
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook.register(model, opt)
    with pytest.raises(OSError, match="injected write failure at step 2"), hook:
        for x, y in batches(5, (8, 6), 3):
            loss = nn.functional.cross_entropy(model(x), y)
            hook.record_loss(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
            done.append(loss.item())
    assert len(done) == 2  # the forward pass opening step 2 raised
    assert not hook.disabled
    assert tv.open(tmp_run).steps()[:2] == [0, 1]
