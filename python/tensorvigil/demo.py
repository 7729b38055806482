"""The built-in demo: a poorly initialised CNN against a well initialised one.

The classic debugger walkthrough, on CPU and on a real data set that ships inside a package
(scikit-learn's 8x8 handwritten digits, no download). The same small CNN (two conv + two
max-pool layers, ReLU, two linear layers) is trained twice with capture and the default rules
running in-process:

- ``bad``: every weight drawn Uniform(-1, 1), biases zero, SGD with learning rate 0.001;
- ``good``: Kaiming-normal weights, biases zero, SGD with momentum, learning rate 0.02.

Weights, biases, gradients, ReLU inputs, losses and metrics are captured (full values, with a
64-bin histogram), the findings of each run are collected and an HTML report compares the two.
Needs ``torch`` and ``scikit-learn`` (``pip install "tensorvigil[demo]"``).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
from typing import Any, Callable, Optional

from .errors import InvalidArgumentError

#: The two runs of the demo: label -> (initialisation, learning rate, momentum).
RUNS: dict[str, tuple[str, float, float]] = {
    "bad": ("uniform", 0.001, 0.0),
    "good": ("kaiming", 0.02, 0.9),
}
BATCH = 64
EVAL_EVERY = 25
COLLECTIONS = ("weights", "biases", "gradients", "relu_input", "relu_output", "losses", "metrics")


@dataclasses.dataclass
class RunSummary:
    """What one demo run did and what the rules found."""

    label: str
    path: str
    init: str
    lr: float
    steps: int
    first_loss: float
    last_loss: float
    accuracy: float
    seconds: float
    findings: list[dict]

    def fired(self) -> dict[str, dict]:
        """The first finding of each rule that fired (not-applicable notes left out)."""
        first: dict[str, dict] = {}
        for f in self.findings:
            if f.get("kind", "fired") == "fired":
                first.setdefault(f["rule"], f)
        return first


@dataclasses.dataclass
class DemoResult:
    """Both runs of the demo and the report comparing them."""

    runs: dict[str, RunSummary]
    report: Optional[str]
    seconds: float

    def format(self) -> str:
        """A readable summary: per run, its training and its findings."""
        lines = []
        for r in self.runs.values():
            lines.append(
                f"[{r.label}] init={r.init} lr={r.lr}: loss {r.first_loss:.3f} -> "
                f"{r.last_loss:.3f} in {r.steps} steps, held-out accuracy "
                f"{100 * r.accuracy:.1f}% ({r.seconds:.1f} s)"
            )
            fired = r.fired()
            if not fired:
                lines.append("    no rule fired")
            for rule, first in fired.items():
                lines.append(f"    {rule} fired at step {first['step']}: {first['message']}")
            skipped = sorted({f["rule"] for f in r.findings if f.get("kind") == "not_applicable"})
            if skipped:
                lines.append(f"    (not applicable to this model: {', '.join(skipped)})")
        return "\n".join(lines)


def load_digits(seed: int = 0) -> tuple[Any, Any, Any, Any]:
    """scikit-learn's digits as float tensors in [0, 1]: ``(x_train, y_train, x_test, y_test)``.

    A fixed, seeded split: 1,497 training images and 300 held-out ones.
    """
    import torch
    from sklearn.datasets import load_digits as sk_load_digits

    data = sk_load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    test, train = order[:300], order[300:]
    return x[train], y[train], x[test], y[test]


def make_model(init: str) -> Any:
    """The demo CNN, initialised ``"uniform"`` (Uniform(-1, 1)) or ``"kaiming"``."""
    from torch import nn

    model = nn.Sequential()
    model.add_module("conv1", nn.Conv2d(1, 16, 3, padding=1))
    model.add_module("relu1", nn.ReLU())
    model.add_module("pool1", nn.MaxPool2d(2))
    model.add_module("conv2", nn.Conv2d(16, 32, 3, padding=1))
    model.add_module("relu2", nn.ReLU())
    model.add_module("pool2", nn.MaxPool2d(2))
    model.add_module("flatten", nn.Flatten())
    model.add_module("fc1", nn.Linear(32 * 2 * 2, 64))
    model.add_module("relu3", nn.ReLU())
    model.add_module("fc2", nn.Linear(64, 10))
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if init == "uniform":
                nn.init.uniform_(m.weight, -1.0, 1.0)
            elif init == "kaiming":
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            else:
                raise InvalidArgumentError(f"unknown demo initialisation '{init}'")
            nn.init.zeros_(m.bias)
    return model


def train_run(
    path: str,
    init: str,
    lr: float,
    momentum: float,
    steps: int,
    seed: int = 0,
    progress: Optional[Callable[[int, int], None]] = None,
    on_finding: Optional[Callable[[Any], None]] = None,
) -> tuple[float, float, float]:
    """Trains one demo run into ``path``; returns (first loss, last loss, held-out accuracy).

    ``on_finding(finding)`` is called on the rules thread when a rule fires during training.
    """
    import torch
    import torch.nn.functional as F

    from . import rules
    from . import torch as tv_torch
    from .hooks.base import SaveConfig

    torch.manual_seed(seed)
    # The badly initialised net drives softmax probabilities into subnormal floats, which
    # make CPU arithmetic ~10x slower; flushing them to zero changes no result that matters.
    flush = torch.set_flush_denormal(True)
    x, y, x_test, y_test = load_digits(seed)
    model = make_model(init)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    hook = tv_torch.Hook(
        path,
        collections=list(COLLECTIONS),
        save=SaveConfig(every=1),
        hist_bins=64,
        rules=rules.defaults(),
        on_finding=on_finding or (lambda finding: None),
    )
    hook.register(model, optimizer=opt)
    g = torch.Generator().manual_seed(seed)
    order, pos = torch.randperm(len(x), generator=g), 0
    losses: list[float] = []
    accuracy = 0.0
    with hook:
        for step in range(steps):
            if pos + BATCH > len(x):
                order, pos = torch.randperm(len(x), generator=g), 0
            idx = order[pos : pos + BATCH]
            pos += BATCH
            model.train()
            loss = F.cross_entropy(model(x[idx]), y[idx])
            hook.record_loss(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if (step + 1) % EVAL_EVERY == 0 or step == steps - 1:
                model.eval()
                with torch.no_grad():
                    out = model(x_test)
                    hook.record_loss(F.cross_entropy(out, y_test))
                    accuracy = float((out.argmax(1) == y_test).float().mean())
                    hook.record_scalar("accuracy", accuracy)
            if progress is not None:
                progress(step + 1, steps)
    if flush:
        torch.set_flush_denormal(False)
    return losses[0], sum(losses[-10:]) / len(losses[-10:]), accuracy


def _bar(label: str) -> Optional[Callable[[int, int], None]]:
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        filled = done * 30 // total
        sys.stderr.write(
            f"\r  training {label:<5} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total}"
        )
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show


def run_demo(
    out_dir: str,
    steps: int = 300,
    report: bool = True,
    seed: int = 0,
    live: Optional[Callable[[str, Any], None]] = None,
) -> DemoResult:
    """Trains both demo runs under ``out_dir`` (``bad/``, ``good/``) and writes ``report.html``.

    Existing ``bad`` and ``good`` runs under ``out_dir`` are replaced. ``live(label, finding)``
    is called (from the rules thread) as soon as a rule fires during training.

    Raises:
        InvalidArgumentError: ``steps`` is below 20 (too few for the rules to judge).

    """
    from .store.reader import open_run

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 20:
        raise InvalidArgumentError(f"demo steps must be an integer >= 20, got {steps!r}")
    t_start = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    summaries: dict[str, RunSummary] = {}
    for label, (init, lr, momentum) in RUNS.items():
        path = os.path.join(out_dir, label)
        if os.path.exists(path):
            shutil.rmtree(path)
        t0 = time.perf_counter()
        on_finding = None
        if live is not None:
            on_finding = (lambda lab: lambda finding: live(lab, finding))(label)
        first, last, acc = train_run(path, init, lr, momentum, steps, seed, _bar(label), on_finding)
        summaries[label] = RunSummary(
            label=label,
            path=path,
            init=init,
            lr=lr,
            steps=steps,
            first_loss=first,
            last_loss=last,
            accuracy=acc,
            seconds=time.perf_counter() - t0,
            findings=open_run(path).findings(),
        )
    report_path = None
    if report:
        from .report import write_report

        report_path = write_report(
            summaries["bad"].path,
            os.path.join(out_dir, "report.html"),
            compare=summaries["good"].path,
            labels=("bad: Uniform(-1, 1), lr 0.001", "good: Kaiming, lr 0.02"),
            title="tensorvigil demo: poorly vs well initialised CNN on digits",
        )
    return DemoResult(summaries, report_path, time.perf_counter() - t_start)
