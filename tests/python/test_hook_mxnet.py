"""``tv.mxnet.Hook``: Gluon training captured in an MXNet 1.9.1 / NumPy 1.23 virtual environment.

MXNet's last release needs NumPy < 1.24, which the main environment (NumPy 2, pyarrow) cannot
have. So the training runs in a separate venv (``build/mxnet-venv``, or ``$TV_MXNET_VENV``;
created on first use with ``pip install mxnet==1.9.1 numpy==1.23.5``), importing tensorvigil
from a directory that holds only this environment's installed ``tensorvigil`` package (with
its built ``_core``), so neither NumPy 2 nor pyarrow is visible there. Reading the runs and
evaluating the rules happen here, in the main environment, on the same run directories.

The test skips only when ``pip install mxnet==1.9.1`` fails (no network, no wheel for this
platform or Python).
"""

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import tensorvigil as tv

pytestmark = pytest.mark.mxnet

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = Path(__file__).resolve().parent / "scripts"
VENV = Path(os.environ.get("TV_MXNET_VENV") or REPO / "build" / "mxnet-venv")
REQUIREMENTS = ["mxnet==1.9.1", "numpy==1.23.5"]
CHECK_IMPORT = "import mxnet, numpy; assert numpy.__version__ == '1.23.5', numpy.__version__"
POOR_INIT = "PoorWeightInitialization"


def _tail(text: str, n: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on ``path`` (pytest-xdist workers share one venv)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _stamp() -> Path:
    return VENV / "tensorvigil-requirements.txt"


def _works(python: Path) -> bool:
    """Whether the venv was completed for ``REQUIREMENTS`` (stamped after its import check)."""
    try:
        return python.exists() and _stamp().read_text().split() == REQUIREMENTS
    except OSError:
        return False


def _create_venv() -> Path:
    """The venv's python, creating the venv when missing or broken. Skips if pip fails."""
    python = VENV / "bin" / "python"
    with _locked(VENV.parent / (VENV.name + ".lock")):
        if _works(python):
            return python
        t0 = time.monotonic()
        r = subprocess.run(
            [sys.executable, "-m", "venv", "--clear", str(VENV)], capture_output=True, text=True
        )
        if r.returncode == 0:
            pip = [str(python), "-m", "pip"]
        else:  # no ensurepip (Debian without python3-venv): this environment's pip installs
            r2 = subprocess.run(
                [sys.executable, "-m", "venv", "--clear", "--without-pip", str(VENV)],
                capture_output=True,
                text=True,
            )
            assert r2.returncode == 0, f"cannot create a venv at {VENV}:\n{r.stderr}{r2.stderr}"
            pip = [sys.executable, "-m", "pip", "--python", str(python)]
        r = subprocess.run(
            [*pip, "install", "--disable-pip-version-check", "-q", *REQUIREMENTS],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if r.returncode != 0:
            pytest.skip(
                f"MXNet cannot be installed here (`pip install {' '.join(REQUIREMENTS)}` "
                f"into {VENV} failed):\n{_tail(r.stdout + r.stderr)}"
            )
        r = subprocess.run([str(python), "-s", "-c", CHECK_IMPORT], capture_output=True, text=True)
        assert r.returncode == 0, (
            "mxnet==1.9.1 installed but does not import (it needs libgomp1 and libquadmath0: "
            f"bash tools/install-deps.sh --test):\n{_tail(r.stderr)}"
        )
        _stamp().write_text("\n".join(REQUIREMENTS) + "\n")
        print(f"created {VENV} in {time.monotonic() - t0:.1f} s")
        return python


@pytest.fixture(scope="module")
def venv_python():
    return _create_venv()


@pytest.fixture(scope="module")
def venv_env(tmp_path_factory):
    """Environment of the venv's processes: tensorvigil visible, nothing else of this env."""
    pkg_parent = tmp_path_factory.mktemp("tv-only")
    src = Path(tv.__file__).resolve().parent
    try:
        (pkg_parent / "tensorvigil").symlink_to(src, target_is_directory=True)
    except OSError:
        import shutil

        shutil.copytree(src, pkg_parent / "tensorvigil")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(PYTHONPATH=str(pkg_parent), PYTHONNOUSERSITE="1", OMP_NUM_THREADS="1")
    env["MXNET_CPU_WORKER_NTHREADS"] = "1"
    return env, pkg_parent


@pytest.fixture(scope="module")
def results(venv_python, venv_env, tmp_path_factory):
    """Runs the training script (Uniform(1) and Xavier) and the checks script concurrently."""
    env, _ = venv_env
    out = tmp_path_factory.mktemp("mxnet")
    jobs = {
        "uniform": ["mxnet_train.py", str(out / "uniform"), "uniform", "0.001", "30"],
        "xavier": ["mxnet_train.py", str(out / "xavier"), "xavier", "0.1", "30"],
        "checks": ["mxnet_checks.py", str(out / "checks")],
    }
    procs = {
        name: subprocess.Popen(
            [str(venv_python), "-s", str(SCRIPTS / args[0]), *args[1:]],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, args in jobs.items()
    }
    res = {"dir": out}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, f"{name} failed (exit {p.returncode}):\n{_tail(stderr, 40)}"
        res[name] = json.loads(stdout.strip().splitlines()[-1])
    return res


def _refs(ref_dir: Path):
    """``(step, name, array)`` of the reference arrays a script saved with ``np.save``."""
    index = json.loads((ref_dir / "index.json").read_text())
    for fname, (step, name) in sorted(index.items()):
        yield step, name, np.load(ref_dir / fname)


def _check(results, name):
    c = results["checks"]["checks"][name]
    assert c["ok"], c.get("error")
    return c, results["dir"] / "checks" / name


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "tensorvigil", *args], capture_output=True, text=True, timeout=120
    )


# -- the environment ----------------------------------------------------------------------------


def test_capture_runs_with_numpy_1_23_and_without_pyarrow(results, venv_env):
    _, pkg_parent = venv_env
    for job in ("uniform", "xavier"):
        info = results[job]
        assert info["numpy"] == "1.23.5" and info["mxnet"] == "1.9.1"
        assert not info["pyarrow_installed"] and not info["pyarrow_imported"]
        assert Path(info["tensorvigil"]) == pkg_parent / "tensorvigil"
    env = results["checks"]["env"]
    assert env["numpy"] == "1.23.5"
    assert not env["pyarrow_imported"] and not env["torch_imported"]


def test_import_error_names_the_install_recipe():
    try:
        import mxnet  # noqa: F401
    except (ImportError, AttributeError):
        pass
    else:
        pytest.skip("mxnet imports in this environment")
    with pytest.raises(ImportError, match=r'mxnet==1\.9\.1 "numpy==1\.23\.5"'):
        tv.mxnet.Hook  # noqa: B018


# -- the walkthrough: Uniform(1) vs Xavier ------------------------------------------------------


@pytest.mark.parametrize("job", ["uniform", "xavier"])
def test_read_back_equals_what_training_saw(results, job):
    run = tv.open(results["dir"] / job / "run")
    assert run.steps() == list(range(30))
    compared = set()
    for step, name, ref in _refs(results["dir"] / job / "ref"):
        got = run.tensor(name).value(step)
        assert got.dtype == ref.dtype and got.shape == ref.shape, name
        np.testing.assert_array_equal(got, ref, err_msg=f"{name} at step {step}")
        compared.add(name)
    params = {
        f"{layer}.{p}" for layer in ("conv1", "conv2", "fc1", "fc2") for p in ("weight", "bias")
    }
    assert compared == params | {f"{p}/grad" for p in params} | {
        "loss",
        "relu1/input",
        "fc1.act/input",
    }
    colls = run.collections()
    assert sorted(colls["relu_input"]) == ["fc1.act/input", "relu1/input", "relu2/input"]
    assert sorted(colls["relu_output"]) == ["fc1.act/output", "relu1/output", "relu2/output"]
    assert colls["losses"] == ["loss"]
    # the per-sample loss vector: its mean is the loss the script printed
    losses = results[job]["losses"]
    assert run.tensor("loss").stats(29).mean == pytest.approx(losses[29], rel=1e-5)


def test_poor_init_rules_fire_on_uniform_not_on_xavier(results):
    uniform, xavier = (str(results["dir"] / j / "run") for j in ("uniform", "xavier"))
    r = _cli("check", uniform, "--rules", POOR_INIT, "--json")
    assert r.returncode == 1, r.stdout + r.stderr
    found = [json.loads(line) for line in r.stdout.splitlines() if '"rule"' in line]
    fired = [f for f in found if f["kind"] == "fired"]
    assert fired and {f["rule"] for f in fired} == {POOR_INIT}
    assert fired[0]["evidence"]["check"] == "activation_variance"
    assert fired[0]["evidence"]["ratio"] > 100  # Uniform(1): variance grows layer by layer
    assert fired[0]["step"] < 10
    r = _cli("check", xavier, "--rules", POOR_INIT, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    # The well-initialised run is healthy for the whole default rule set, and it learns.
    r = _cli("check", xavier, "--rules", "default")
    assert r.returncode == 0, r.stdout + r.stderr
    losses = results["xavier"]["losses"]
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])
    # The same verdicts through the Python API.
    eng = tv.rules.RuleEngine(uniform, [tv.rules.get(POOR_INIT)], record=False)
    assert [f.rule for f in eng.poll() if f.fired] == [POOR_INIT]
    eng = tv.rules.RuleEngine(xavier, tv.rules.defaults(), record=False)
    assert [f for f in eng.poll() if f.fired] == []


def test_in_process_rules_run_in_the_mxnet_environment(results):
    c, d = _check(results, "inprocess_rules")
    fired = [f for f in c["findings"] if f[2] == "fired"]
    assert [f[0] for f in fired] == [POOR_INIT] and fired[0][1] < 10
    assert c["callback"] == [POOR_INIT]
    recorded = [f for f in tv.open(d / "run").findings() if f["kind"] == "fired"]
    assert [f["rule"] for f in recorded] == [POOR_INIT]


# -- hook behaviour -----------------------------------------------------------------------------


BAD_ARGUMENTS = {
    "save": "save must be a tv.SaveConfig",
    "collections": "unknown collection 'weight'",
    "ranks": "ranks must be",
    "url": "out_dir 'ftp://host/run'",
    "on_finding": "on_finding must be",
    "writer_options": "writer_options must be a dict",
    "block": "register() needs an mxnet.gluon.Block, got object",
    "trainer": "trainer must be an mxnet.gluon.Trainer, got str",
    "loss": "loss must be an mxnet.gluon.Block, got function",
    "same_trainer_twice": "the same trainer is given twice",
    "registered_twice": "already registered",
}


@pytest.mark.parametrize("case", sorted(BAD_ARGUMENTS))
def test_bad_arguments_raise_typed_errors(results, case):
    c, _ = _check(results, "bad_arguments")
    err = c[case]
    assert err["type"] == "InvalidArgumentError", err
    assert err["is_value_error"] and err["is_tv_error"]
    assert BAD_ARGUMENTS[case] in err["message"]
    assert c["trainer_untouched"]


def test_hook_error_never_kills_training(results):
    c, _ = _check(results, "nonstrict_writer_failure")
    ns = c["nonstrict"]  # the run directory is a file: the writer cannot be created
    assert ns["steps_trained"] == 5 and ns["weights_changed"] and ns["raised"] is None
    assert ns["disabled"] and ns["errors_logged"] == 1
    assert ns["losses"][-1] < ns["losses"][0]
    assert c["strict"]["raised"] == "StoreIOError" and c["strict"]["steps_trained"] == 0
    # A failure in the middle of training: capture stops, committed steps stay readable.
    c, d = _check(results, "nonstrict_midway_failure")
    assert c["steps_trained"] == 7 and c["loss_decreased"] and c["disabled"]
    assert c["errors_logged"] == 1 and "injected writer failure" in c["message"]
    run = tv.open(d / "run")
    assert run.steps() == [0, 1, 2]
    assert run.tensor("0.weight/grad").value(2).shape == (8, 6)


def test_modes_follow_autograd_training(results):
    c, d = _check(results, "modes")
    expect = ["train"] * 3 + ["eval"] * 2 + ["train"] * 2 + ["predict"]
    assert c["seen"] == [[i, m] for i, m in enumerate(expect)]
    run = tv.open(d / "run")
    assert [str(m) for m in run.step_modes().values()] == expect
    assert run.steps(mode="eval") == [3, 4]
    mode_steps = [run.tensor("0.weight").record(s).mode_step for s in range(8)]
    assert mode_steps == [0, 1, 2, 0, 1, 3, 4, 0]
    assert run.tensor("loss").steps() == list(range(7))  # no loss in the predict step
    assert c["trainer_restored"] and c["hooks_removed"]


def test_save_configs_per_mode_and_collection(results):
    _, d = _check(results, "save_config")
    run = tv.open(d / "run")
    # hook: train every 3rd mode step plus step 1, every eval step; gradients every 4th
    assert run.tensor("0.weight").steps() == [0, 1, 3, 6, 8, 9]
    assert run.tensor("0.weight").steps(mode="eval") == [8, 9]
    assert run.tensor("0.weight/grad").steps() == [0, 4]
    assert run.steps() == [0, 1, 3, 4, 6, 8, 9]


def test_block_inputs_outputs_and_fused_relu(results):
    _, d = _check(results, "block_io")
    run = tv.open(d / "run")
    layers = ["conv1", "relu1", "pool1", "conv2", "relu2", "pool2", "fc1", "fc1.act", "fc2"]
    assert run.tensor_names() == sorted(
        f"{b}/{w}" for b in [*layers, "model"] for w in ("input", "output")
    )
    v = {n: run.tensor(n).value(1) for n in run.tensor_names()}
    assert v["model/input"].shape == (16, 1, 8, 8) and v["model/output"].shape == (16, 10)
    np.testing.assert_array_equal(v["conv1/output"], v["relu1/input"])
    np.testing.assert_array_equal(v["relu1/output"], np.maximum(v["relu1/input"], 0))
    np.testing.assert_array_equal(v["fc1.act/output"], np.maximum(v["fc1.act/input"], 0))
    np.testing.assert_array_equal(v["fc1/output"], v["fc1.act/output"])  # Dense(activation=)
    np.testing.assert_array_equal(v["fc2/input"], v["fc1/output"])
    colls = run.collections()
    assert sorted(colls["relu_input"]) == ["fc1.act/input", "relu1/input", "relu2/input"]
    assert "fc1/input" in colls["inputs"]  # a layer holding only its activation is a leaf


def test_hybridized_model_keeps_parameters_and_warns(results):
    c, d = _check(results, "hybridized")
    assert any("hybridized" in w for w in c["warnings"])
    run = tv.open(d / "run")
    names = set(run.tensor_names())
    assert {"model/input", "loss", "conv1.weight", "conv1.weight/grad"} <= names
    assert not any(n.startswith(("relu", "conv1/")) for n in names)


def test_deferred_shapes_are_captured_after_the_first_forward(results):
    _, d = _check(results, "deferred_init")
    run = tv.open(d / "run")
    n = 0
    for step, name, ref in _refs(d / "ref"):
        np.testing.assert_array_equal(run.tensor(name).value(step), ref, err_msg=name)
        n += 1
    assert n == 8 and run.tensor("0.weight").value(0).shape == (16, 6)


def test_gradients_without_a_trainer(results):
    _, d = _check(results, "no_trainer")
    run = tv.open(d / "run")
    n = 0
    for step, name, ref in _refs(d / "ref"):
        np.testing.assert_array_equal(run.tensor(name).value(step), ref, err_msg=name)
        n += 1
    assert n == 12 and run.steps() == [0, 1, 2]


def test_optimizer_state_and_learning_rate(results):
    _, d = _check(results, "optimizer_state")
    run = tv.open(d / "run")
    n = 0
    for step, name, ref in _refs(d / "ref"):
        np.testing.assert_array_equal(run.tensor(name).value(step), ref, err_msg=name)
        n += 1
    assert n == 16
    assert float(run.tensor("lr/group0").value(1)) == pytest.approx(0.01)
    assert sorted(run.collections()["optimizer_variables"])[-1] == "lr/group0"


def test_record_loss_scalar_and_tensor(results):
    _, d = _check(results, "record_api")
    run = tv.open(d / "run")
    assert [float(run.tensor("loss/aux").value(s)) for s in (0, 1)] == [0.0, 0.25]
    assert [float(run.tensor("metric/accuracy").value(s)) for s in (0, 1)] == [0.5, 1.5]
    np.testing.assert_array_equal(run.tensor("numpy_array").value(1), np.arange(1, 5))
    assert run.tensor("numpy_array").value(1).dtype == np.int32
    assert run.tensor("logits").value(0).shape == (32, 3)
    assert run.tensor("loss").value(0).shape in ((), (1,))  # loss.mean(): one value
    assert run.collections()["custom"] == ["logits", "numpy_array"]


def test_stop_request_raises_training_stopped(results):
    c, d = _check(results, "stop")
    assert c["steps_done"] == 3 and "enough" in c["stopped"] and c["should_stop"]
    assert tv.open(d / "run").steps() == [0, 1, 2]
