"""Checks of ``tv.mxnet.Hook`` that need MXNet in-process (run in the MXNet 1.9.1 venv).

Usage: mxnet_checks.py OUT_DIR

Each ``check_<name>`` trains a small Gluon model under the hook in ``OUT_DIR/<name>`` (its run
in ``run``, reference arrays in ``ref``, see :class:`mxnet_train.Refs`) and returns details;
an exception marks the check failed. Prints one JSON object ``{"checks": {name: {"ok": ...,
...}}, "env": {...}}`` on the last line. The pytest side (``test_hook_mxnet.py``) asserts on
the details and reads the runs from its own environment.
"""

import importlib.util
import json
import logging
import os
import sys
import traceback

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon, nd
from mxnet.gluon import nn
from mxnet_train import Refs, SmallCNN, digit_images

import tensorvigil as tv

OUT = sys.argv[1]


class _Records(logging.Handler):
    """Collects the tensorvigil logger's records."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> "_Records":
        logging.getLogger("tensorvigil").addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger("tensorvigil").removeHandler(self)


def _dir(name: str) -> str:
    path = os.path.join(OUT, name)
    os.makedirs(path, exist_ok=True)
    return path


def _mlp(init: mx.init.Initializer = None, in_units: int = 6) -> nn.HybridSequential:
    net = nn.HybridSequential()
    net.add(nn.Dense(8, activation="relu", in_units=in_units), nn.Dense(3, in_units=8))
    net.initialize(init or mx.init.Xavier())
    return net


def _data(n: int = 32, d: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.float32) + (x[:, 1] > 0)
    return nd.array(x), nd.array(y)


LOSS = gluon.loss.SoftmaxCrossEntropyLoss()


def _train_step(net, trainer, x, y, hook=None):
    with autograd.record():
        loss = LOSS(net(x), y)
    if hook is not None:
        hook.record_loss(loss)
    loss.backward()
    trainer.step(x.shape[0])
    return float(loss.mean().asscalar())


# -- checks -------------------------------------------------------------------------------------


def check_bad_arguments():
    d = os.path.join(_dir("bad_arguments"), "run")
    net = _mlp()
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1})
    cases = {
        "save": lambda: tv.mxnet.Hook(d, save=5),
        "collections": lambda: tv.mxnet.Hook(d, collections=["weight"]),
        "ranks": lambda: tv.mxnet.Hook(d, ranks="some"),
        "url": lambda: tv.mxnet.Hook("ftp://host/run"),
        "on_finding": lambda: tv.mxnet.Hook(d, on_finding="explode"),
        "writer_options": lambda: tv.mxnet.Hook(d, writer_options=[("level", 3)]),
        "block": lambda: tv.mxnet.Hook(d).register(object()),
        "trainer": lambda: tv.mxnet.Hook(d).register(net, trainer="sgd"),
        "loss": lambda: tv.mxnet.Hook(d).register(net, loss=lambda a, b: a),
        "same_trainer_twice": lambda: tv.mxnet.Hook(d).register(net, trainer=[trainer, trainer]),
        "registered_twice": lambda: tv.mxnet.Hook(d).register(net).register(net),
    }
    out = {}
    for label, fn in cases.items():
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - reported to the test
            out[label] = {
                "type": type(e).__name__,
                "is_value_error": isinstance(e, ValueError),
                "is_tv_error": isinstance(e, tv.TensorVigilError),
                "message": str(e),
            }
        else:
            out[label] = {"type": None}
    # A failed register() leaves the trainer unwrapped.
    out["trainer_untouched"] = "step" not in vars(trainer) and "update" not in vars(trainer)
    return out


def check_nonstrict_writer_failure():
    base = _dir("nonstrict_writer_failure")
    blocker = os.path.join(base, "not_a_dir")
    with open(blocker, "w") as f:
        f.write("a file where the run directory should be\n")
    x, y = _data()
    result = {}
    for strict in (False, True):
        net = _mlp()
        trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.5})
        w0 = net[0].weight.data().asnumpy()
        hook = tv.mxnet.Hook(blocker, save=tv.SaveConfig(every=1), strict=strict)
        hook.register(net, trainer=trainer, loss=LOSS)
        losses = []
        raised = None
        with _Records() as logs:
            try:
                for _ in range(5):
                    losses.append(_train_step(net, trainer, x, y, hook))
            except Exception as e:  # noqa: BLE001
                raised = type(e).__name__
            finally:
                try:
                    hook.close()
                except Exception as e:  # noqa: BLE001 - strict: the first error is reported
                    raised = raised or type(e).__name__
        result["strict" if strict else "nonstrict"] = {
            "steps_trained": len(losses),
            "losses": losses,
            "weights_changed": bool(np.any(net[0].weight.data().asnumpy() != w0)),
            "disabled": hook.disabled,
            "raised": raised,
            "errors_logged": sum(r.levelno >= logging.ERROR for r in logs.records),
        }
    return result


def check_nonstrict_midway_failure():
    run = os.path.join(_dir("nonstrict_midway_failure"), "run")
    net = _mlp()
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.5})
    hook = tv.mxnet.Hook(run, save=tv.SaveConfig(every=1))
    hook.register(net, trainer=trainer, loss=LOSS)
    x, y = _data()
    losses = []
    with _Records() as logs, hook:
        for step in range(7):
            if step == 3:

                def boom(*args, **kwargs):
                    raise RuntimeError("injected writer failure")

                hook._session.writer().write = boom
            losses.append(_train_step(net, trainer, x, y, hook))
    return {
        "steps_trained": len(losses),
        "loss_decreased": losses[-1] < losses[0],
        "disabled": hook.disabled,
        "errors_logged": sum(r.levelno >= logging.ERROR for r in logs.records),
        "message": next((r.getMessage() for r in logs.records if r.levelno >= logging.ERROR), ""),
    }


def check_modes():
    run = os.path.join(_dir("modes"), "run")
    net = _mlp()
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1})
    hook = tv.mxnet.Hook(
        run, collections=["weights", "losses"], save=tv.SaveConfig(every=1), strict=True
    )
    hook.register(net, trainer=trainer, loss=LOSS)
    x, y = _data()
    seen = []
    with hook:
        for _ in range(3):
            _train_step(net, trainer, x, y)
            seen.append([hook.current_step, str(hook.mode)])
        for _ in range(2):
            LOSS(net(x), y)  # outside autograd.record(): eval
            seen.append([hook.current_step, str(hook.mode)])
        for _ in range(2):
            _train_step(net, trainer, x, y)
            seen.append([hook.current_step, str(hook.mode)])
        hook.set_mode("predict")
        net(x)
        seen.append([hook.current_step, str(hook.mode)])
        hook.set_mode(None)
    return {
        "seen": seen,
        "trainer_restored": "step" not in vars(trainer) and "update" not in vars(trainer),
        "hooks_removed": not net._forward_pre_hooks and not net._forward_hooks,
    }


def check_save_config():
    run = os.path.join(_dir("save_config"), "run")
    net = _mlp()
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1})
    hook = tv.mxnet.Hook(
        run,
        collections=["weights", tv.Collection("gradients", save=tv.SaveConfig(every=4))],
        save=tv.SaveConfig(every=3, steps=[1], eval=tv.SaveConfig(every=1)),
        strict=True,
    )
    hook.register(net, trainer=trainer)
    x, y = _data()
    with hook:
        for _ in range(8):
            _train_step(net, trainer, x, y)
        for _ in range(2):
            net(x)
    return {}


def check_block_io():
    run = os.path.join(_dir("block_io"), "run")
    net = SmallCNN()
    net.initialize(mx.init.Xavier())
    trainer = gluon.Trainer(net.collect_params(), "adam", {"learning_rate": 0.01})
    hook = tv.mxnet.Hook(
        run,
        collections=["inputs", "outputs", "relu_input", "relu_output"],
        save=tv.SaveConfig(every=1),
        strict=True,
    )
    hook.register(net, trainer=trainer)
    x, y = digit_images(16)
    with hook:
        for _ in range(2):
            _train_step(net, trainer, nd.array(x), nd.array(y))
    return {}


def check_hybridized():
    run = os.path.join(_dir("hybridized"), "run")
    net = SmallCNN()
    net.initialize(mx.init.Xavier())
    net.hybridize()
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1})
    hook = tv.mxnet.Hook(
        run,
        collections=["weights", "gradients", "losses", "relu_input", "inputs"],
        save=tv.SaveConfig(every=1),
        strict=True,
    )
    hook.register(net, trainer=trainer, loss=LOSS)
    x, y = digit_images(16)
    with _Records() as logs, hook:
        for _ in range(2):
            _train_step(net, trainer, nd.array(x), nd.array(y))
    return {"warnings": [r.getMessage() for r in logs.records if r.levelno == logging.WARNING]}


def check_deferred_init():
    base = _dir("deferred_init")
    net = nn.HybridSequential()
    net.add(nn.Dense(16, activation="relu"), nn.Dense(3))  # no in_units: shapes deferred
    net.initialize(mx.init.Uniform(0.5))
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1})
    hook = tv.mxnet.Hook(os.path.join(base, "run"), save=tv.SaveConfig(every=1), strict=True)
    hook.register(net, trainer=trainer, loss=LOSS)
    refs = Refs(os.path.join(base, "ref"))
    x, y = _data()
    params = net._collect_params_with_prefix()
    with hook:
        for step in range(2):
            with autograd.record():
                loss = LOSS(net(x), y)
            for name, p in params.items():  # after the forward pass, before the update
                refs.save(step, name, p.data())
            loss.backward()
            trainer.step(x.shape[0])
    refs.close()
    return {}


def check_no_trainer():
    base = _dir("no_trainer")
    net = _mlp()
    hook = tv.mxnet.Hook(os.path.join(base, "run"), save=tv.SaveConfig(every=1), strict=True)
    hook.register(net, loss=LOSS)
    refs = Refs(os.path.join(base, "ref"))
    x, y = _data()
    params = net._collect_params_with_prefix()
    with hook:
        for step in range(3):
            with autograd.record():
                loss = LOSS(net(x), y)
            loss.backward()
            for name, p in params.items():
                refs.save(step, name + "/grad", p.grad())
                p.set_data(p.data() - 0.01 * p.grad())
    refs.close()
    return {}


def check_optimizer_state():
    base = _dir("optimizer_state")
    net = _mlp()
    trainer = gluon.Trainer(net.collect_params(), "adam", {"learning_rate": 0.01})
    hook = tv.mxnet.Hook(
        os.path.join(base, "run"),
        collections=["optimizer_variables"],
        save=tv.SaveConfig(every=1),
        strict=True,
    )
    hook.register(net, trainer=trainer)
    refs = Refs(os.path.join(base, "ref"))
    x, y = _data()
    names = {id(p): n for n, p in net._collect_params_with_prefix().items()}
    with hook:
        for step in range(2):
            _train_step(net, trainer, x, y)
            for i, (mean, var) in trainer._updaters[0].states.items():
                name = names[id(trainer._params[i])]
                refs.save(step, name + "/mean", mean)
                refs.save(step, name + "/var", var)
    refs.close()
    return {}


def check_record_api():
    run = os.path.join(_dir("record_api"), "run")
    net = _mlp()
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1})
    hook = tv.mxnet.Hook(
        run, collections=["losses", "metrics", "custom"], save=tv.SaveConfig(every=1), strict=True
    )
    hook.register(net, trainer=trainer)
    x, y = _data()
    with hook:
        for step in range(2):
            with autograd.record():
                out = net(x)
                loss = LOSS(out, y)
            hook.record_loss(loss.mean())
            hook.record_loss(0.25 * step, name="aux")
            hook.record_scalar("accuracy", 0.5 + step)
            hook.record_tensor("logits", out)
            hook.record_tensor("numpy_array", np.arange(4, dtype=np.int32) + step)
            loss.backward()
            trainer.step(x.shape[0])
    return {}


def check_stop():
    run = os.path.join(_dir("stop"), "run")
    net = _mlp()
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1})
    hook = tv.mxnet.Hook(run, save=tv.SaveConfig(every=1), strict=True)
    hook.register(net, trainer=trainer, loss=LOSS)
    x, y = _data()
    steps_done = 0
    stopped = None
    with hook:
        try:
            for step in range(10):
                if step == 3:
                    hook.request_stop("enough")
                _train_step(net, trainer, x, y)
                steps_done += 1
        except tv.mxnet.TrainingStopped as e:
            stopped = str(e)
    return {"steps_done": steps_done, "stopped": stopped, "should_stop": hook.should_stop}


def check_inprocess_rules():
    """Rules on the hook's background thread also run here (NumPy 1.23, no pyarrow)."""
    run = os.path.join(_dir("inprocess_rules"), "run")
    net = SmallCNN()
    net.initialize(mx.init.Uniform(1.0))
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.001})
    seen = []
    hook = tv.mxnet.Hook(
        run,
        collections=["gradients", "losses", "relu_input"],
        save=tv.SaveConfig(every=1),
        rules=[tv.rules.get("PoorWeightInitialization")],
        on_finding=seen.append,
        strict=True,
    )
    hook.register(net, trainer=trainer, loss=LOSS)
    x, y = digit_images(640)
    with hook:
        for step in range(10):
            sl = slice(64 * step, 64 * step + 64)
            _train_step(net, trainer, nd.array(x[sl]), nd.array(y[sl]))
    return {
        "findings": [[f.rule, f.step, f.kind] for f in hook.findings],
        "callback": [f.rule for f in seen],
    }


CHECKS = {
    name[len("check_") :]: fn for name, fn in sorted(globals().items()) if name.startswith("check_")
}


def main() -> None:
    mx.random.seed(3)
    np.random.seed(3)
    results = {}
    for name, fn in CHECKS.items():
        try:
            results[name] = {"ok": True, **(fn() or {})}
        except Exception:  # noqa: BLE001 - reported to the test
            results[name] = {"ok": False, "error": traceback.format_exc()}
    env = {
        "numpy": np.__version__,
        "mxnet": mx.__version__,
        "pyarrow_imported": any(m.split(".")[0] == "pyarrow" for m in sys.modules),
        "pyarrow_installed": importlib.util.find_spec("pyarrow") is not None,
        "torch_imported": "torch" in sys.modules,
        "tensorvigil": os.path.dirname(tv.__file__),
    }
    print(json.dumps({"checks": results, "env": env}))


if __name__ == "__main__":
    main()
