"""Trains a small Gluon CNN under ``tv.mxnet.Hook`` (run in an MXNet 1.9.1 / NumPy 1.23 venv).

Usage: mxnet_train.py OUT_DIR INIT LR STEPS
  INIT: ``uniform`` (``mx.init.Uniform(1)``: every weight drawn from U(-1, 1)) or ``xavier``.

Writes the run into ``OUT_DIR/run`` and, for the steps in ``REF_STEPS``, reference arrays
taken independently of the hook into ``OUT_DIR/ref`` (``np.save`` files, listed with their
step and tensor name in ``OUT_DIR/ref/index.json``): the weights the forward pass used,
the gradients right before ``trainer.step``, the per-sample loss and two ReLU inputs
recomputed with plain operators (``conv1`` and the fused ``fc1`` activation). Prints one JSON
line describing the environment (NumPy and MXNet versions, whether pyarrow was imported).
"""

import importlib.util
import json
import os
import sys
import time

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon, nd
from mxnet.gluon import nn

import tensorvigil as tv

REF_STEPS = (0, 3)


class SmallCNN(gluon.HybridBlock):
    """Two conv + two max-pool layers, ReLU, two dense layers (the walkthrough's shape).

    ``relu1``/``relu2`` are ``nn.Activation`` blocks; ``fc1`` fuses its ReLU
    (``activation='relu'``), which Gluon holds as the child block ``fc1.act``.
    """

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        with self.name_scope():
            self.conv1 = nn.Conv2D(8, 3, padding=1, in_channels=1)
            self.relu1 = nn.Activation("relu")
            self.pool1 = nn.MaxPool2D(2)
            self.conv2 = nn.Conv2D(16, 3, padding=1, in_channels=8)
            self.relu2 = nn.Activation("relu")
            self.pool2 = nn.MaxPool2D(2)
            self.fc1 = nn.Dense(32, activation="relu", in_units=64)
            self.fc2 = nn.Dense(classes, in_units=32)

    def hybrid_forward(self, F, x):  # noqa: N803 - Gluon's signature
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        return self.fc2(self.fc1(F.flatten(x)))


def digit_images(n: int, classes: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """8x8 single-channel "digits": noisy, shifted class templates scaled to [-1, 1]."""
    rng = np.random.default_rng(seed)
    templates = np.random.default_rng(3000 + classes).random((classes, 8, 8)) > 0.6
    y = rng.integers(0, classes, n)
    imgs = templates[y].astype(np.float32)
    shifts = rng.integers(-1, 2, (n, 2))
    for i in range(n):
        imgs[i] = np.roll(imgs[i], tuple(shifts[i]), axis=(0, 1))
    imgs = np.clip(imgs + 0.3 * rng.random((n, 8, 8), dtype=np.float32), 0, 1)
    return ((imgs - 0.5) / 0.5)[:, None].astype(np.float32), y.astype(np.float32)


class Refs:
    """Reference arrays saved with ``np.save``; ``index.json`` maps each file to (step, name)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.index: dict[str, list] = {}
        os.makedirs(path, exist_ok=True)

    def save(self, step: int, name: str, value) -> None:
        arr = value.asnumpy() if hasattr(value, "asnumpy") else np.asarray(value)
        fname = f"{len(self.index):04d}.npy"
        np.save(os.path.join(self.path, fname), arr)
        self.index[fname] = [step, name]

    def close(self) -> None:
        with open(os.path.join(self.path, "index.json"), "w", encoding="utf-8") as f:
            json.dump(self.index, f, indent=1)


def main() -> None:
    out, init, lr, steps = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    mx.random.seed(7)
    np.random.seed(7)
    x_all, y_all = digit_images(2048)
    net = SmallCNN()
    if init == "uniform":
        net.initialize(mx.init.Uniform(1.0))
    elif init == "xavier":
        net.initialize(mx.init.Xavier(magnitude=2.24))
    else:
        raise SystemExit(f"unknown init {init!r}")
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": lr, "momentum": 0.9})
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    hook = tv.mxnet.Hook(
        os.path.join(out, "run"),
        collections=["weights", "biases", "gradients", "losses", "relu_input", "relu_output"],
        save=tv.SaveConfig(every=1),
        strict=True,
    )
    hook.register(net, trainer=trainer, loss=loss_fn)
    refs = Refs(os.path.join(out, "ref"))
    params = net._collect_params_with_prefix()
    batch = 64
    order = np.random.default_rng(1).permutation(len(x_all))
    losses = []
    t0 = time.perf_counter()
    with hook:
        for step in range(steps):
            idx = order[(step * batch) % len(order) :][:batch]
            x, y = nd.array(x_all[idx]), nd.array(y_all[idx])
            ref = step in REF_STEPS
            if ref:
                for name, p in params.items():
                    refs.save(step, name, p.data())
                # ReLU inputs recomputed with plain operators (independent of any hook).
                c1 = nd.Convolution(
                    x,
                    net.conv1.weight.data(),
                    net.conv1.bias.data(),
                    kernel=(3, 3),
                    pad=(1, 1),
                    num_filter=8,
                )
                refs.save(step, "relu1/input", c1)
            with autograd.record():
                out_ = net(x)
                loss = loss_fn(out_, y)
            loss.backward()
            if ref:
                refs.save(step, "loss", loss)
                for name, p in params.items():
                    if p.grad_req != "null":
                        refs.save(step, f"{name}/grad", p.grad())
                # Plain operators only: calling the blocks would run the hook's block hooks.
                h = nd.Pooling(nd.relu(c1), kernel=(2, 2), stride=(2, 2), pool_type="max")
                h = nd.Convolution(
                    h,
                    net.conv2.weight.data(),
                    net.conv2.bias.data(),
                    kernel=(3, 3),
                    pad=(1, 1),
                    num_filter=16,
                )
                h = nd.Pooling(nd.relu(h), kernel=(2, 2), stride=(2, 2), pool_type="max")
                f1 = nd.FullyConnected(
                    nd.flatten(h), net.fc1.weight.data(), net.fc1.bias.data(), num_hidden=32
                )
                refs.save(step, "fc1.act/input", f1)
            trainer.step(batch)
            losses.append(float(loss.mean().asscalar()))
    refs.close()
    info = {
        "numpy": np.__version__,
        "mxnet": mx.__version__,
        "pyarrow_imported": any(m.split(".")[0] == "pyarrow" for m in sys.modules),
        "pyarrow_installed": importlib.util.find_spec("pyarrow") is not None,
        "tensorvigil": os.path.dirname(tv.__file__),
        "losses": losses,
        "seconds": time.perf_counter() - t0,
    }
    print(json.dumps(info))


if __name__ == "__main__":
    main()
