"""Labelled training scenarios for the built-in rules (detection-quality suite).

Each scenario is a real, small, deterministic PyTorch training run on CPU, captured with
:class:`tensorvigil.torch.Hook` (every step saved), either healthy or with exactly one injected
fault. Its metadata says which rule(s) must find the fault (with any non-default parameters) and
by which global step at the latest. ``tests/python/test_rule_scenarios.py`` checks the labels;
``tools/scenario_table.py`` prints the scenario x rule table of docs/rules/scenarios.md.

Data are synthetic (scikit-learn is not a dependency): a fixed random "teacher" labels Gaussian
features, 8x8 "digit" images are noisy class templates, token sequences carry their label in
token counts. Every scenario seeds torch itself and uses two torch threads.

Usage:
    >>> from scenarios import SCENARIOS
    >>> sc = SCENARIOS["dead_relu"]
    >>> sc.run("runs/dead_relu")                 # trains and captures
    >>> engine = tv.rules.RuleEngine("runs/dead_relu", sc.rules())
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import tensorvigil as tv

#: Collections read by the default rule set (healthy runs capture all of them).
DEFAULT_COLLECTIONS = (
    "weights",
    "biases",
    "gradients",
    "losses",
    "relu_input",
    "relu_output",
    "tanh_input",
    "sigmoid_input",
)


#: Torch intra-op threads while a scenario trains. One: these models are tiny, and on a
#: loaded two-core machine two OpenMP threads made the suite 3-5x slower (spin-waiting).
TORCH_THREADS = 1


@dataclass(frozen=True)
class Expect:
    """A rule that must fire (kind ``fired``) at a global step ``<= by_step``."""

    rule: str
    by_step: int
    params: dict = field(default_factory=dict)

    def make(self) -> Any:
        """A new instance of the rule with the scenario's parameters."""
        return tv.rules.get(self.rule, **self.params)

    @property
    def label(self) -> str:
        """``Rule`` or ``Rule(param=value, ...)``."""
        if not self.params:
            return self.rule
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{self.rule}({args})"


@dataclass(frozen=True)
class Scenario:
    """One labelled training run.

    Attributes:
        name: Registry key.
        fault: The injected fault in words (``"none"`` for healthy runs).
        fn: ``fn(run_dir, steps)`` trains and captures the run.
        steps: Default number of training steps (optimizer steps).
        expect: Rules that must fire, each by its step.
        healthy: Whether the default rule set must stay silent.
        defaults_detect: For faulty runs: whether at least one default rule must fire (false
            for data/output faults that only the data rules are meant to see).

    """

    name: str
    fault: str
    fn: Callable[[str, int], None]
    steps: int
    expect: tuple = ()
    healthy: bool = False
    defaults_detect: bool = True

    def run(self, run_dir: str, steps: Optional[int] = None, seed: int = 0) -> None:
        """Trains the scenario's model, capturing into ``run_dir`` (one torch thread).

        ``seed`` 0 is the labelled run; other values shift every seed of the scenario (model
        initialisation, data, batch order) for robustness checks.
        """
        global _SEED_OFFSET
        threads = torch.get_num_threads()
        torch.set_num_threads(TORCH_THREADS)
        _SEED_OFFSET = 7919 * int(seed)
        try:
            self.fn(run_dir, self.steps if steps is None else steps)
        finally:
            _SEED_OFFSET = 0
            torch.set_num_threads(threads)

    def rules(self) -> list:
        """New instances of the intended rules."""
        return [e.make() for e in self.expect]


SCENARIOS: dict[str, Scenario] = {}


def scenario(
    name: str,
    fault: str,
    *,
    steps: int = 60,
    expect: Sequence[Expect] = (),
    healthy: bool = False,
    defaults_detect: bool = True,
) -> Callable:
    """Registers a training function as a scenario."""

    def deco(fn: Callable[[str, int], None]) -> Callable[[str, int], None]:
        SCENARIOS[name] = Scenario(
            name, fault, fn, steps, tuple(expect), healthy, defaults_detect and not healthy
        )
        return fn

    return deco


# -- data -----------------------------------------------------------------------------------------


_SEED_OFFSET = 0


def _seed(seed: int) -> None:
    torch.manual_seed(seed + _SEED_OFFSET)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed + _SEED_OFFSET)


def teacher_data(
    n: int, dim: int = 20, classes: int = 4, seed: int = 0, noise: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian features labelled by a fixed random linear teacher (with label noise)."""
    g = _gen(seed)
    w = torch.randn(dim, classes, generator=_gen(1000 + classes * 31 + dim))
    x = torch.randn(n, dim, generator=g)
    logits = x @ w + noise * torch.randn(n, classes, generator=g)
    return x, logits.argmax(1)


def regression_data(n: int, dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian features and a smooth nonlinear target of unit scale."""
    g = _gen(seed)
    w = torch.randn(dim, 1, generator=_gen(2000 + dim)) / math.sqrt(dim)
    x = torch.randn(n, dim, generator=g)
    y = torch.sin(2.0 * (x @ w)) + 0.5 * (x @ w) + 0.05 * torch.randn(n, 1, generator=g)
    return x, y


def digit_images(n: int, classes: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """8x8 single-channel "digits": noisy, shifted class templates with values in [0, 1]."""
    g = _gen(seed)
    templates = (torch.rand(classes, 8, 8, generator=_gen(3000 + classes)) > 0.6).float()
    y = torch.randint(0, classes, (n,), generator=g)
    imgs = templates[y]
    shift = torch.randint(-1, 2, (n, 2), generator=g)
    for i in range(n):  # small translations, like handwriting
        imgs[i] = torch.roll(imgs[i], shifts=(int(shift[i, 0]), int(shift[i, 1])), dims=(0, 1))
    imgs = (imgs + 0.3 * torch.rand(n, 8, 8, generator=g)).clamp(0, 1)
    return imgs.unsqueeze(1), y


def token_data(
    n: int, length: int = 12, vocab: int = 16, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token sequences (ids 1..vocab-1); label: whether token 1 occurs more often than 2."""
    g = _gen(seed)
    x = torch.randint(1, vocab, (n, length), generator=g)
    y = ((x == 1).sum(1) > (x == 2).sum(1)).long()
    return x, y


class Batches:
    """Minibatches of a fixed data set in a seeded, reshuffled-every-epoch order."""

    def __init__(self, *tensors: torch.Tensor, batch: int, seed: int = 0) -> None:
        self.tensors = tensors
        self.batch = batch
        self.g = _gen(seed)
        self.order = torch.randperm(len(tensors[0]), generator=self.g)
        self.pos = 0

    def next(self) -> tuple:
        """The next minibatch (a tuple, one entry per tensor)."""
        n = len(self.tensors[0])
        if self.pos + self.batch > n:
            self.order = torch.randperm(n, generator=self.g)
            self.pos = 0
        idx = self.order[self.pos : self.pos + self.batch]
        self.pos += self.batch
        return tuple(t[idx] for t in self.tensors)


# -- training -------------------------------------------------------------------------------------


def make_hook(run_dir: str, collections: Sequence[str]) -> Any:
    """A strict hook saving every step of ``collections``."""
    return tv.torch.Hook(
        run_dir, collections=list(collections), save=tv.SaveConfig(every=1), strict=True
    )


def train(
    run_dir: str,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    batches: Batches,
    steps: int,
    loss_fn: Callable = F.cross_entropy,
    collections: Sequence[str] = DEFAULT_COLLECTIONS,
    *,
    transform: Optional[Callable[[int, tuple], tuple]] = None,
    forward: Optional[Callable[[nn.Module, torch.Tensor], torch.Tensor]] = None,
    record: Optional[Callable[[Any, int, tuple, torch.Tensor], None]] = None,
    eval_data: Optional[tuple] = None,
    eval_every: int = 0,
) -> None:
    """A plain training loop under a hook: forward, record loss, backward, step.

    Args:
        transform: ``transform(step, batch) -> batch`` (injects data faults).
        forward: ``forward(model, x) -> output`` (default ``model(x)``).
        record: ``record(hook, step, batch, output)`` records custom tensors or metrics.
        eval_data: ``(x, y)`` of a validation set, evaluated in eval mode every ``eval_every``
            training steps (its loss recorded in the eval step).

    """
    hook = make_hook(run_dir, collections)
    hook.register(model, optimizer=opt)
    fwd = forward or (lambda m, x: m(x))
    with hook:
        for step in range(steps):
            batch = batches.next()
            if transform is not None:
                batch = transform(step, batch)
            x, y = batch[0], batch[1]
            model.train()
            out = fwd(model, x)
            loss = loss_fn(out, y)
            hook.record_loss(loss)
            if record is not None:
                record(hook, step, batch, out)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if eval_every and (step + 1) % eval_every == 0 and eval_data is not None:
                model.eval()
                with torch.no_grad():
                    vx, vy = eval_data
                    hook.record_loss(loss_fn(fwd(model, vx), vy))


def mlp(dims: Sequence[int], act: Callable[[], nn.Module] = nn.ReLU) -> nn.Sequential:
    """Linear layers of ``dims`` with ``act`` modules between them."""
    layers: list = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def kaiming(model: nn.Module) -> nn.Module:
    """He initialisation for every Linear/Conv weight, zero biases."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return model


class SmallCNN(nn.Module):
    """Two conv + two max-pool layers, ReLU, two linear layers (the demo's model)."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(16 * 2 * 2, 32)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        return self.fc2(self.relu3(self.fc1(x.flatten(1))))


class SeqClassifier(nn.Module):
    """Embedding, one LSTM layer, linear head on the last hidden state."""

    def __init__(self, vocab: int = 16, emb: int = 16, hidden: int = 32, classes: int = 2):
        super().__init__()
        self.embedding = nn.Embedding(vocab, emb, padding_idx=0)
        self.lstm = nn.LSTM(emb, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, (h, _) = self.lstm(self.embedding(x))
        return self.head(h[-1])


class TinyTransformer(nn.Module):
    """Token + position embeddings, one pre-norm transformer encoder block, mean-pool head."""

    def __init__(self, vocab: int = 16, d: int = 32, length: int = 12, classes: int = 2):
        super().__init__()
        self.embedding = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.02 * torch.randn(length, d))
        self.block = nn.TransformerEncoderLayer(
            d, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True, norm_first=True
        )
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block(self.embedding(x) + self.pos)
        return self.head(self.norm(h).mean(1))


# == healthy runs =================================================================================


@scenario("healthy_mlp", "none (ReLU MLP, He init, Adam)", healthy=True)
def healthy_mlp(run_dir: str, steps: int) -> None:
    _seed(1)
    x, y = teacher_data(2048)
    model = kaiming(mlp([20, 64, 64, 4]))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    train(run_dir, model, opt, Batches(x, y, batch=64), steps)


@scenario("healthy_cnn", "none (small CNN on 8x8 digits, He init, Adam)", healthy=True)
def healthy_cnn(run_dir: str, steps: int) -> None:
    _seed(2)
    x, y = digit_images(2048)
    x = (x - 0.5) / 0.5
    model = SmallCNN()
    # He (Kaiming) initialisation, the usual one for ReLU layers. With PyTorch's default
    # (Kaiming-uniform with a = sqrt(5), a variance 3x smaller) the 32-unit fc1 layer of some
    # seeds really had 50-53 % of its ReLUs silent for every sample of 5 steps, which
    # DeadRelu (threshold_layer=50 %) rightly reported: that run was not healthy.
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    train(run_dir, model, opt, Batches(x, y, batch=64), steps)


@scenario("healthy_lstm", "none (embedding + LSTM sequence classifier, Adam)", healthy=True)
def healthy_lstm(run_dir: str, steps: int) -> None:
    _seed(3)
    x, y = token_data(2048)
    model = SeqClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(run_dir, model, opt, Batches(x, y, batch=64), steps)


@scenario("healthy_transformer", "none (one transformer encoder block, AdamW)", healthy=True)
def healthy_transformer(run_dir: str, steps: int) -> None:
    _seed(4)
    x, y = token_data(2048)
    model = TinyTransformer()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    train(run_dir, model, opt, Batches(x, y, batch=64), steps)


@scenario("healthy_tanh_mlp", "none (tanh MLP, Xavier init, SGD with momentum)", healthy=True)
def healthy_tanh_mlp(run_dir: str, steps: int) -> None:
    _seed(5)
    x, y = teacher_data(2048)
    model = mlp([20, 64, 64, 4], act=nn.Tanh)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight, gain=nn.init.calculate_gain("tanh"))
            nn.init.zeros_(m.bias)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train(run_dir, model, opt, Batches(x, y, batch=64), steps)


@scenario("healthy_regression", "none (ReLU MLP regression, MSE, Adam)", healthy=True)
def healthy_regression(run_dir: str, steps: int) -> None:
    _seed(6)
    x, y = regression_data(2048)
    model = mlp([16, 64, 64, 1])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    train(run_dir, model, opt, Batches(x, y, batch=64), steps, loss_fn=F.mse_loss)


# == faulty runs ==================================================================================


@scenario(
    "exploding_lr",
    "learning rate far too high (SGD lr=1.0 on a tanh MLP regression; loss reaches Inf/NaN)",
    steps=30,
    expect=[
        Expect("ExplodingTensor", 20),
        Expect("LossSpike", 20),
        Expect("LearningRateMismatch", 5),
    ],
)
def exploding_lr(run_dir: str, steps: int) -> None:
    _seed(11)
    x, y = regression_data(2048)
    model = mlp([16, 64, 64, 1], act=nn.Tanh)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    train(
        run_dir,
        model,
        opt,
        Batches(x, y, batch=64),
        steps,
        loss_fn=F.mse_loss,
        collections=list(DEFAULT_COLLECTIONS) + ["optimizer_variables"],
    )


@scenario(
    "vanishing_sigmoid",
    "deep sigmoid stack (10 Linear+Sigmoid layers, default init)",
    expect=[Expect("VanishingGradient", 1), Expect("GradientNormRatio", 1)],
)
def vanishing_sigmoid(run_dir: str, steps: int) -> None:
    _seed(12)
    x, y = teacher_data(2048)
    model = mlp([20] + [32] * 10 + [4], act=nn.Sigmoid)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train(run_dir, model, opt, Batches(x, y, batch=64), steps)


@scenario(
    "dead_relu",
    "ReLU biases initialised at -10 (every hidden ReLU outputs 0)",
    # DeadRelu accumulates activity over its window of 5 saved steps: first judged at step 4.
    expect=[Expect("DeadRelu", 4), Expect("DyingRelu", 0)],
)
def dead_relu(run_dir: str, steps: int) -> None:
    _seed(13)
    x, y = teacher_data(2048)
    model = mlp([20, 64, 64, 4])
    for m in list(model)[:-1]:
        if isinstance(m, nn.Linear):
            nn.init.constant_(m.bias, -10.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    train(run_dir, model, opt, Batches(x, y, batch=64), steps)


@scenario(
    "poor_init_uniform",
    "every weight drawn Uniform(-1, 1) (the demo's bad CNN, SGD lr=0.001)",
    expect=[Expect("PoorWeightInitialization", 9)],
)
def poor_init_uniform(run_dir: str, steps: int) -> None:
    _seed(14)
    x, y = digit_images(2048)
    x = (x - 0.5) / 0.5
    model = SmallCNN()
    for p in model.parameters():
        nn.init.uniform_(p, -1.0, 1.0)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    train(run_dir, model, opt, Batches(x, y, batch=64), steps)


@scenario(
    "lr_zero",
    "learning rate 0 (full-batch Adam, lr read as 0 from a config)",
    steps=30,
    expect=[
        Expect("UnchangedTensor", 2, {"collections": ["weights"]}),
        Expect("WeightUpdateRatio", 1),
        # the loss is flat up to float32 summation-order jitter (the batch is reshuffled), so
        # the first comparison (step 10) may see a 1e-7 "decrease"; the second one fires
        Expect("LossNotDecreasing", 20),
    ],
)
def lr_zero(run_dir: str, steps: int) -> None:
    _seed(15)
    x, y = teacher_data(256)
    model = kaiming(mlp([20, 64, 64, 4]))
    opt = torch.optim.Adam(model.parameters(), lr=0.0)
    train(run_dir, model, opt, Batches(x, y, batch=256), steps)


class DetachedNet(nn.Module):
    """Encoder + head; the bug: the head sees ``encoder(x).detach()``."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
        self.head = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).detach())


@scenario(
    "detached_graph",
    "encoder output detached before the head (encoder gets no gradient)",
    steps=30,
    expect=[
        Expect("UnchangedTensor", 2, {"collections": ["weights"]}),
        Expect("WeightUpdateRatio", 1),
    ],
)
def detached_graph(run_dir: str, steps: int) -> None:
    _seed(16)
    x, y = teacher_data(2048)
    model = kaiming(DetachedNet())
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    train(run_dir, model, opt, Batches(x, y, batch=64), steps)


@scenario(
    "zero_gradients",
    "torch.round() on the output inside the loss (every gradient is exactly 0)",
    steps=30,
    expect=[
        Expect("AllZero", 0, {"collections": ["gradients"]}),
        Expect("VanishingGradient", 0),
        Expect("UnchangedTensor", 2, {"collections": ["weights"]}),
    ],
)
def zero_gradients(run_dir: str, steps: int) -> None:
    _seed(17)
    x, y = teacher_data(2048, classes=2)
    model = kaiming(mlp([20, 64, 64, 1]))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)

    def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pred = torch.round(torch.sigmoid(out.squeeze(1)))  # the bug: a hard 0/1 decision
        return F.mse_loss(pred, target.float())

    train(run_dir, model, opt, Batches(x, y, batch=64), steps, loss_fn=loss_fn)


@scenario(
    "frozen_layer",
    "a hidden layer left frozen (requires_grad=False) after a fine-tuning script",
    steps=30,
    expect=[
        Expect("UnchangedTensor", 2, {"collections": ["weights"]}),
        Expect("WeightUpdateRatio", 1),
    ],
)
def frozen_layer(run_dir: str, steps: int) -> None:
    _seed(18)
    x, y = teacher_data(2048)
    model = kaiming(mlp([20, 64, 64, 64, 4]))
    model[2].requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    train(run_dir, model, opt, Batches(x, y, batch=64), steps)


@scenario(
    "nan_log0",
    "hand-written binary cross-entropy takes log(0) where the sigmoid saturates to 1.0",
    steps=30,
    expect=[Expect("ExplodingTensor", 0), Expect("LossSpike", 0)],
)
def nan_log0(run_dir: str, steps: int) -> None:
    _seed(19)
    x, y = teacher_data(2048, classes=2)
    model = kaiming(mlp([20, 64, 64, 1]))
    with torch.no_grad():
        model[-1].weight.mul_(20.0)  # confident logits, as after some training
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)

    def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(out.squeeze(1))
        t = target.float()
        return -(t * torch.log(p) + (1 - t) * torch.log(1 - p)).mean()  # no eps, no clamp

    train(run_dir, model, opt, Batches(x, y, batch=64), steps, loss_fn=loss_fn)


SPIKE_STEP = 30


@scenario(
    "loss_spike",
    f"one corrupted batch at step {SPIKE_STEP} (targets in the wrong unit, x1000)",
    expect=[Expect("LossSpike", SPIKE_STEP)],
)
def loss_spike(run_dir: str, steps: int) -> None:
    _seed(20)
    x, y = regression_data(2048)
    model = mlp([16, 64, 64, 1])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def corrupt(step: int, batch: tuple) -> tuple:
        bx, by = batch
        return (bx, by * 1000.0) if step == SPIKE_STEP else (bx, by)

    train(
        run_dir,
        model,
        opt,
        Batches(x, y, batch=64),
        steps,
        loss_fn=F.mse_loss,
        transform=corrupt,
    )


@scenario(
    "overfit_tiny_data",
    "training set of 32 samples for a wide MLP (validated every 2 steps on 512 samples)",
    expect=[Expect("Overfit", 40)],
    defaults_detect=False,
)
def overfit_tiny_data(run_dir: str, steps: int) -> None:
    _seed(21)
    x, y = teacher_data(32, seed=1, noise=2.0)
    vx, vy = teacher_data(512, seed=2, noise=2.0)
    model = kaiming(mlp([20, 256, 256, 4]))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    train(
        run_dir,
        model,
        opt,
        Batches(x, y, batch=32),
        steps,
        eval_data=(vx, vy),
        eval_every=2,
    )


def _record_labels(hook: Any, step: int, batch: tuple, out: torch.Tensor) -> None:
    hook.record_tensor("labels", batch[1])
    hook.record_tensor("predictions", out.detach().argmax(1))


@scenario(
    "class_imbalance",
    "labels 97% class 0 / 3% class 1 (no reweighting or resampling)",
    steps=30,
    expect=[Expect("ClassImbalance", 10)],
    defaults_detect=False,
)
def class_imbalance(run_dir: str, steps: int) -> None:
    _seed(22)
    g = _gen(22)
    n = 2048
    y = (torch.rand(n, generator=g) < 0.03).long()
    x = torch.randn(n, 20, generator=g) + 0.5 * y.unsqueeze(1).float()
    model = kaiming(mlp([20, 64, 2]))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    train(
        run_dir,
        model,
        opt,
        Batches(x, y, batch=64),
        steps,
        collections=list(DEFAULT_COLLECTIONS) + ["custom"],
        record=_record_labels,
    )


@scenario(
    "unnormalized_inputs",
    "raw pixel values 0..255 fed to the CNN (no scaling to [-1, 1])",
    steps=30,
    expect=[Expect("UnnormalizedInput", 0), Expect("CheckInputImages", 10)],
    defaults_detect=False,
)
def unnormalized_inputs(run_dir: str, steps: int) -> None:
    _seed(23)
    x, y = digit_images(2048)
    x = torch.round(255.0 * x)
    model = SmallCNN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    train(
        run_dir,
        model,
        opt,
        Batches(x, y, batch=64),
        steps,
        collections=list(DEFAULT_COLLECTIONS) + ["inputs", "custom"],
        record=lambda hook, step, batch, out: hook.record_tensor("input_image", batch[0]),
    )


@scenario(
    "saturated_tanh",
    "tanh MLP fed raw sensor readings around 1000 (un-standardised features)",
    steps=30,
    expect=[Expect("SaturatedActivation", 0)],
)
def saturated_tanh(run_dir: str, steps: int) -> None:
    _seed(24)
    x, y = teacher_data(2048, dim=8)
    x = 1000.0 + 100.0 * x  # readings in raw units
    model = mlp([8, 64, 64, 4], act=nn.Tanh)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    train(run_dir, model, opt, Batches(x, y, batch=64), steps)


@scenario(
    "wrong_output_activation",
    "sigmoid output layer for 4 exclusive classes (probabilities do not sum to 1)",
    steps=30,
    expect=[Expect("WrongOutputActivation", 0)],
    defaults_detect=False,
)
def wrong_output_activation(run_dir: str, steps: int) -> None:
    _seed(25)
    x, y = teacher_data(2048)
    model = nn.Sequential(kaiming(mlp([20, 64, 4])), nn.Sigmoid())
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)

    def loss_fn(p: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.nll_loss(torch.log(p.clamp_min(1e-7)), target)

    train(
        run_dir,
        model,
        opt,
        Batches(x, y, batch=64),
        steps,
        loss_fn=loss_fn,
        collections=list(DEFAULT_COLLECTIONS) + ["outputs"],
    )


@scenario(
    "padded_sequences",
    "sequences of 4-10 tokens padded to length 64 (85% padding tokens)",
    steps=30,
    expect=[Expect("NLPSequenceRatio", 0)],
    defaults_detect=False,
)
def padded_sequences(run_dir: str, steps: int) -> None:
    _seed(26)
    g = _gen(26)
    n, length = 1024, 64
    x, y = token_data(n, length=10)
    lens = torch.randint(4, 11, (n,), generator=g)
    padded = torch.zeros(n, length, dtype=torch.long)
    for i in range(n):
        padded[i, : lens[i]] = x[i, : lens[i]]
    y = ((padded == 1).sum(1) > (padded == 2).sum(1)).long()
    model = SeqClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(
        run_dir,
        model,
        opt,
        Batches(padded, y, batch=64),
        steps,
        collections=list(DEFAULT_COLLECTIONS) + ["inputs"],
    )


def _record_accuracy(hook: Any, step: int, batch: tuple, out: torch.Tensor) -> None:
    hook.record_scalar("accuracy", (out.detach().argmax(1) == batch[1]).float().mean())


@scenario(
    "lr_too_small",
    "learning rate 1e-6 for SGD (about 10^4 times too small)",
    expect=[
        Expect("LearningRateMismatch", 0),
        Expect("SlowConvergence", 45, {"total_steps": 60}),
    ],
    defaults_detect=False,
)
def lr_too_small(run_dir: str, steps: int) -> None:
    _seed(27)
    x, y = teacher_data(2048)
    model = kaiming(mlp([20, 64, 64, 4]))
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)
    train(
        run_dir,
        model,
        opt,
        Batches(x, y, batch=64),
        steps,
        collections=list(DEFAULT_COLLECTIONS) + ["optimizer_variables", "metrics"],
        record=_record_accuracy,
    )


@scenario(
    "oscillating_loss",
    "SGD with momentum 0.99 at lr 0.05 on a regression (under-damped, loss swings)",
    expect=[Expect("OscillatingLoss", 59)],
    # OscillatingLoss is not a default rule; the default loss checks are noise-aware and
    # rightly treat swings around a flat level as noise rather than "not decreasing".
    defaults_detect=False,
)
def oscillating_loss(run_dir: str, steps: int) -> None:
    _seed(28)
    x, y = regression_data(2048)
    model = kaiming(mlp([16, 64, 1]))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.99)
    train(
        run_dir,
        model,
        opt,
        Batches(x, y, batch=256),
        steps,
        loss_fn=F.mse_loss,
        collections=list(DEFAULT_COLLECTIONS) + ["optimizer_variables"],
    )


HEALTHY = [s for s in SCENARIOS.values() if s.healthy]
FAULTY = [s for s in SCENARIOS.values() if not s.healthy]
