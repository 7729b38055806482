"""MXNet Gluon capture: :class:`Hook` saves weights, gradients, block inputs/outputs and losses.

This is the only module of tensorvigil that imports mxnet; it is loaded when ``tv.mxnet`` is
first used. It works with the last Apache MXNet release (``mxnet==1.9.1``, which needs
``numpy<1.24``): capture needs neither pyarrow nor NumPy 2, so a run written from an MXNet
environment is read and checked from any other one.

Steps: a forward pass of the registered (root) block opens a new step when the previous one
is done: in train mode with a registered ``gluon.Trainer``, after its ``trainer.step()`` (or
``trainer.update()``); otherwise (no trainer, eval, predict) after each forward pass; and
whenever the mode changes. The mode follows ``autograd.is_training()`` at the forward pass
(``with autograd.record():`` is train, a forward pass outside it is eval) unless
:meth:`Hook.set_mode` sets it. After the first explicit :meth:`Hook.step` call, only
:meth:`Hook.step` ends steps. A step is committed (visible to readers) when the next one
opens, at :meth:`Hook.step`, or at :meth:`Hook.close`.

What is captured when (global step ``s``):

- ``weights`` / ``biases``: when step ``s`` opens, i.e. the values the forward pass of step
  ``s`` uses (after ``trainer.step()`` of step ``s - 1``). Names are Gluon's structural names
  (``conv1.weight``, ``0.bias``: the keys of ``save_parameters``). Parameters whose shape is
  still deferred (``Dense(32)`` without ``in_units``) are taken right after the first forward
  pass that initialises them. Parameters named ``*bias*`` are biases, every other one
  (BatchNorm ``gamma``/``beta``/``running_*`` included) a weight.
- ``gradients``: in a wrapper of the registered trainer's ``step``/``update``, right before
  it runs: ``param.grad()`` after ``autograd.backward`` and before the update. MXNet's
  ``backward`` of a per-sample loss vector sums over the batch; ``trainer.step(batch_size)``
  divides by ``batch_size`` only inside the update, so the stored gradient is the sum. On
  several devices the first device's gradient is taken (before the kvstore reduces it).
  Without a registered trainer, gradients are taken when a train step ends.
- ``optimizer_variables``: after ``trainer.step()``: the learning rate as ``lr/group0``
  (``lr/opt<i>/group0`` for a second trainer) and the updater's state per parameter
  (``fc1.weight/mean`` and ``/var`` for Adam, ``/momentum`` for SGD and NAG, ``/state<i>``
  otherwise). With ``update_on_kvstore`` the state lives in the kvstore and is not seen.
- ``inputs`` / ``outputs`` and ``relu_*``/``tanh_*``/``sigmoid_*``: in Gluon forward
  (pre-)hooks, the first call of a block in a step. Activations are found as
  ``nn.Activation`` blocks (``act_type`` ``relu``, ``tanh``, ``sigmoid``). A layer built with
  ``activation='relu'`` (``nn.Dense``, ``nn.Conv2D`` ...) holds such a block as its child
  ``act``, so its relu input is ``fc1.act/input`` (the layer's pre-activation) and
  ``fc1/output`` is the activated output. Activations called as operators inside
  ``hybrid_forward`` (``F.relu(x)``) are not blocks and are not seen: use ``nn.Activation``
  blocks or :meth:`Hook.record_tensor`. Inside a hybridized block (``net.hybridize()``) Gluon
  runs a cached graph and calls no child hooks: only the inputs/outputs of the registered
  block itself are captured then, and the hook logs it once.
- ``losses``: when :meth:`Hook.record_loss` is called, or the output of loss blocks passed as
  ``register(..., loss=loss_fn)`` (e.g. ``gluon.loss.SoftmaxCrossEntropyLoss``) each time they
  run. A per-sample loss vector is stored as it is; rules read its mean.
- ``metrics`` / ``custom``: when :meth:`Hook.record_scalar` or :meth:`Hook.record_tensor` is
  called.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

try:
    from mxnet import autograd, gluon, nd
except (ImportError, AttributeError) as e:  # AttributeError: NumPy >= 1.24 (np.bool removed)
    raise ImportError(
        f"tv.mxnet needs Apache MXNet 1.9.1 with NumPy < 1.24 ({type(e).__name__}: {e}); "
        'install both in their own environment: pip install mxnet==1.9.1 "numpy==1.23.5"'
    ) from e

from ..errors import InvalidArgumentError, TrainingStopped
from ..modes import Mode, ModeLike, to_mode
from .base import (
    CapturePlan,
    CaptureSession,
    Collection,
    SaveConfig,
    StepHook,
    _detect_rank,
    guarded,
)

logger = logging.getLogger("tensorvigil")

__all__ = ["Hook", "TrainingStopped"]

#: ``nn.Activation`` act_types tagged for the ``relu_*``/``tanh_*``/``sigmoid_*`` collections.
_ACTIVATION_TAGS = frozenset(("relu", "tanh", "sigmoid"))
#: Names of the parts of an updater's state, by optimizer class (lower case).
_STATE_NAMES = {
    "adam": ("mean", "var"),
    "adamw": ("mean", "var"),
    "sgd": ("momentum",),
    "nag": ("momentum",),
    "signum": ("momentum",),
    "adagrad": ("history",),
    "rmsprop": ("n", "g", "delta"),
    "adadelta": ("acc_g", "acc_delta"),
}


class _Host:
    """An NDArray converted to numpy (``asnumpy``) only when the writer takes it."""

    __slots__ = ("arr",)

    def __init__(self, arr: Any) -> None:
        self.arr = arr

    def __array__(self, dtype: Any = None, copy: Any = None) -> Any:
        a = self.arr.asnumpy()
        return a if dtype is None else a.astype(dtype, copy=False)


def _value(v: Any) -> Any:
    """A saveable value: NDArrays (``mx.nd`` and ``mx.np``) wrapped, numbers as float64."""
    if isinstance(v, nd.NDArray):
        return _Host(v)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return np.asarray(v, dtype=np.float64)
    return v


def _flatten(value: Any, out: list) -> None:
    # NDArrays only: while Gluon traces a hybridized block, child hooks see Symbols.
    if isinstance(value, nd.NDArray):
        out.append(value)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _flatten(v, out)
    elif isinstance(value, dict):
        for v in value.values():
            _flatten(v, out)


def _activation_tag(block: Any) -> Optional[str]:
    if isinstance(block, gluon.nn.Activation):
        act = str(getattr(block, "_act_type", ""))
        return act if act in _ACTIVATION_TAGS else None
    return None


def _named_blocks(block: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """``(dotted name, block)`` of ``block`` and its descendants (each block once)."""
    out: list[tuple[str, Any]] = []
    seen: set[int] = set()

    def walk(name: str, b: Any) -> None:
        if id(b) in seen:
            return
        seen.add(id(b))
        out.append((name, b))
        for cname, child in b._children.items():
            walk(f"{name}.{cname}" if name else str(cname), child)

    walk(prefix, block)
    return out


def _data(p: Any) -> Any:
    """The parameter's value on its first device, or ``None`` while its init is deferred."""
    try:
        return p.list_data()[0]
    except RuntimeError:  # DeferredInitializationError, or not initialised yet
        return None


def _grad(p: Any) -> Any:
    if p.grad_req == "null":
        return None
    try:
        return p.list_grad()[0]
    except RuntimeError:
        return None


class Hook(StepHook):
    """Captures an MXNet Gluon model's tensors into a tensorvigil run while it trains.

    The options are those of :class:`tensorvigil.torch.Hook`.

    Args:
        out_dir: Run directory (created if missing; one stream per rank inside it).
        collections: Names of built-in collections and/or :class:`tensorvigil.Collection`
            objects (default ``weights``, ``biases``, ``gradients``, ``losses``, ``metrics``).
        save: When to save (default every 10th step of each mode); collections may override.
        reductions_only: Store statistics only, no tensor values (collections may override).
        rules: Rules evaluated during training on a background thread of rank 0 (e.g.
            ``tv.rules.defaults()``); findings go to the run's ``findings.jsonl``.
        on_finding: ``"warn"`` (log each finding), ``"stop"`` (log, then raise
            :class:`TrainingStopped` at the next step boundary) or a callable(finding).
        strict: Raise errors from the hook instead of logging once and disabling capture.
        ranks: ``"all"``: every rank writes its own stream; ``"zero"``: only rank 0 writes.
            The rank comes from ``RANK`` (or MPI/Slurm variables, as set by Horovod).
        hist_bins: Fixed-bin histogram stored with each tensor's statistics (0: none).
        exp_hist: Store the exponent (log2) histogram with each record.
        codec: Codec for float tensors (``"shuffle-zstd"``, ``"zstd"``, ``"raw"``).
        max_pending_bytes: Bound on host memory held by saves not yet on disk.
        policy: When that bound is reached: ``"block"`` (wait) or ``"skip"`` (keep only the
            statistics of the tensor; the drop is counted).
        writer_options: Further :class:`tensorvigil.StoreWriter` options.

    Example:
        >>> hook = tv.mxnet.Hook("runs/exp1", collections=["weights", "gradients", "losses",
        ...                      "relu_input"], save=tv.SaveConfig(every=10))
        >>> hook.register(net, trainer=trainer)
        >>> with hook:
        ...     for x, y in loader:
        ...         with autograd.record():
        ...             loss = loss_fn(net(x), y)
        ...         hook.record_loss(loss)
        ...         loss.backward()
        ...         trainer.step(x.shape[0])

    """

    def __init__(
        self,
        out_dir: Union[str, os.PathLike],
        collections: Optional[Sequence[Union[str, Collection]]] = None,
        save: Optional[SaveConfig] = None,
        reductions_only: bool = False,
        rules: Optional[Sequence[Any]] = None,
        on_finding: Any = "warn",
        *,
        strict: bool = False,
        ranks: str = "all",
        hist_bins: int = 0,
        exp_hist: bool = False,
        codec: str = "shuffle-zstd",
        max_pending_bytes: int = 512 << 20,
        policy: str = "block",
        writer_options: Optional[dict] = None,
    ) -> None:
        if save is None:
            save = SaveConfig(every=10)
        elif not isinstance(save, SaveConfig):
            raise InvalidArgumentError(f"save must be a tv.SaveConfig, got {save!r}")
        if writer_options is not None and not isinstance(writer_options, dict):
            raise InvalidArgumentError(f"writer_options must be a dict, got {writer_options!r}")
        plan = CapturePlan(collections, save, bool(reductions_only), int(hist_bins))
        # As for the torch hook: no fsync by default (a killed process loses no committed step).
        opts = {"fsync": False, "codec": codec}
        opts.update(writer_options or {})
        opts.update(max_pending_bytes=max_pending_bytes, policy=policy)
        self._session = CaptureSession(
            out_dir,
            plan,
            strict=strict,
            ranks=ranks,
            rank_fn=_detect_rank,
            exp_hist=exp_hist,
            writer_options=opts,
        )
        self._session.attach_rules(rules or [], on_finding)
        self._handles: list[Any] = []
        self._restore: list[Callable[[], None]] = []
        self._root: Any = None
        self._params: list[tuple[str, Any, str]] = []
        self._param_names: dict[int, str] = {}
        self._pending: list[tuple[str, Any, str]] = []
        self._trainers: list[Any] = []
        self._containers: list[Any] = []
        self._io_blocks = 0
        self._hybrid_warned = False
        self._want_grads = False
        self._want_opt_state = False
        self._mode_override: Optional[Mode] = None
        self._manual = False
        self._forwards = 0
        self._opt_steps = 0

    # -- registration ----------------------------------------------------------------------

    def register(
        self,
        block: Any,
        trainer: Union[Any, Sequence[Any], None] = None,
        loss: Union[Any, Sequence[Any], None] = None,
    ) -> Hook:
        """Attaches the hook to ``block`` (and its trainer, for gradients and its state).

        Args:
            block: The model, a ``gluon.Block`` (``HybridSequential``, a custom
                ``HybridBlock`` ...). Initialise it before or after; deferred shapes are fine.
            trainer: The ``gluon.Trainer`` (or several) updating the model: its ``step`` and
                ``update`` methods (of this instance only) are wrapped so that gradients are
                taken right before the update. :meth:`close` restores them.
            loss: Loss block(s) (``gluon.loss.Loss``) whose outputs are saved as losses
                (``loss``, or ``loss/<i>`` for the i-th of several).

        Returns:
            The hook, for chaining.

        Raises:
            InvalidArgumentError: ``block``, ``trainer`` or ``loss`` has the wrong type, or the
                hook is already registered.

        """
        if not isinstance(block, gluon.Block):
            raise InvalidArgumentError(
                f"register() needs an mxnet.gluon.Block, got {type(block).__name__}"
            )
        if self._root is not None:
            raise InvalidArgumentError("this hook is already registered with a block")
        trainers = self._as_list(trainer, gluon.Trainer, "trainer", "an mxnet.gluon.Trainer")
        losses = self._as_list(loss, gluon.Block, "loss", "an mxnet.gluon.Block")
        if len({id(t) for t in trainers}) != len(trainers):
            raise InvalidArgumentError("the same trainer is given twice")
        self._root = block
        plan = self._session.plan
        seen: set[int] = set()
        for name, p in block._collect_params_with_prefix().items():
            if id(p) in seen:  # shared parameters: the first name
                continue
            seen.add(id(p))
            kind = "biases" if "bias" in name.rsplit(".", 1)[-1] else "weights"
            self._params.append((name, p, kind))
            self._param_names[id(p)] = name
        self._handles.append(block.register_forward_pre_hook(self._on_root_forward))
        self._handles.append(block.register_forward_hook(self._on_root_forward_done))
        self._want_grads = plan.could_want("gradients")
        self._want_opt_state = plan.could_want("optimizer_variables")
        for i, t in enumerate(trainers):
            self._wrap_trainer(t, i)
        self._trainers = trainers
        for i, lb in enumerate(losses):
            name = "loss" if len(losses) == 1 else f"loss/{i}"
            self._handles.append(lb.register_forward_hook(self._make_loss_hook(name)))
        for bname, b in _named_blocks(block):
            tag = _activation_tag(b)
            tags = {tag} if tag else set()
            # A layer whose only children are activations (Dense(activation='relu') holds
            # one as ``act``) is a leaf: its inputs/outputs are not its children's.
            if bname and any(_activation_tag(c) is None for c in b._children.values()):
                tags.add("container")
            if b._children:
                self._containers.append(b)
            ftags = frozenset(tags)
            label = bname or "model"
            want_in = plan.could_want("inputs", ftags, bname, f"{label}/input")
            want_out = plan.could_want("outputs", ftags, bname, f"{label}/output")
            if want_in:
                self._handles.append(
                    b.register_forward_pre_hook(self._make_io_hook(label, ftags, bname, "input"))
                )
            if want_out:
                self._handles.append(
                    b.register_forward_hook(self._make_io_hook(label, ftags, bname, "output"))
                )
            if (want_in or want_out) and bname:
                self._io_blocks += 1
        return self

    @staticmethod
    def _as_list(value: Any, cls: type, what: str, expected: str) -> list:
        if value is None:
            return []
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        for v in items:
            if not isinstance(v, cls):
                raise InvalidArgumentError(f"{what} must be {expected}, got {type(v).__name__}")
        return items

    def _wrap_trainer(self, trainer: Any, index: int) -> None:
        """Wraps ``trainer.step`` and ``trainer.update`` of this instance."""
        for method in ("step", "update"):
            orig = getattr(trainer, method)
            had_own = method in vars(trainer)

            def wrapper(*args: Any, _orig: Callable = orig, **kwargs: Any) -> Any:
                self._before_update(trainer)
                out = _orig(*args, **kwargs)
                self._after_update(trainer, index)
                return out

            functools.update_wrapper(wrapper, orig)
            setattr(trainer, method, wrapper)

            def restore(t: Any = trainer, m: str = method, o: Any = orig, own: bool = had_own):
                if own:
                    setattr(t, m, o)
                else:
                    vars(t).pop(m, None)

            self._restore.append(restore)

    # -- framework events ------------------------------------------------------------------

    @guarded
    def _on_root_forward(self, block: Any, args: Any) -> None:
        if not self._session.step_open:
            self._begin()
        elif not self._manual and self._step_done():
            self._begin()
        self._forwards += 1

    @guarded
    def _on_root_forward_done(self, block: Any, args: Any, out: Any) -> None:
        if self._pending:  # parameters initialised by this first forward pass
            s = self._session
            pending, self._pending = self._pending, []
            if s.saving:
                entries = []
                for name, p, kind in pending:
                    d = _data(p)
                    if d is not None:
                        entries.append((name, kind, _Host(d)))
                s.save_many(entries)

    def _next_mode(self) -> Mode:
        if self._mode_override is not None:
            return self._mode_override
        return Mode.TRAIN if autograd.is_training() else Mode.EVAL

    def _step_done(self) -> bool:
        """Whether a forward pass now starts a new step (automatic steps)."""
        mode = self._next_mode()
        if mode != self._session.mode:
            return True
        if self._trainers and mode == Mode.TRAIN:
            return self._opt_steps > 0
        return self._forwards > 0

    def _begin(self) -> None:
        s = self._session
        self._grads_at_step_end()
        mode = self._next_mode()
        self._forwards = 0
        self._opt_steps = 0
        s.begin_step(mode)
        self._check_hybridized()
        self._pending = []
        if s.saving:
            entries = []
            for name, p, kind in self._params:
                d = _data(p)
                if d is None:
                    self._pending.append((name, p, kind))
                else:
                    entries.append((name, kind, _Host(d)))
            s.save_many(entries)

    def _check_hybridized(self) -> None:
        if self._hybrid_warned or not self._io_blocks:
            return
        active = [b for b in self._containers if getattr(b, "_active", False)]
        if active:
            self._hybrid_warned = True
            logger.warning(
                "tensorvigil: the model is hybridized; Gluon runs a cached graph and calls no "
                "hooks of the blocks inside it, so their inputs/outputs are not captured "
                "(weights, gradients, optimizer state, losses and the registered block's own "
                "inputs/outputs are). Call hybridize(False) to capture them."
            )

    def _grads_at_step_end(self) -> None:
        """Without a trainer: the gradients of a train step when it ends."""
        s = self._session
        if self._trainers or not self._want_grads or not s.step_open:
            return
        if s.mode == Mode.TRAIN and s.saving:
            self._save_grads()

    def _save_grads(self) -> None:
        entries = []
        for name, p, _ in self._params:
            g = _grad(p)
            if g is not None:
                entries.append((name + "/grad", "gradients", _Host(g)))
        self._session.save_many(entries)

    _as_scalar = staticmethod(_value)
    _as_tensor = staticmethod(_value)

    @guarded
    def _before_update(self, trainer: Any) -> None:
        self._ensure_step()
        self._opt_steps += 1
        if self._session.saving and self._want_grads:
            self._save_grads()

    @guarded
    def _after_update(self, trainer: Any, index: int) -> None:
        s = self._session
        if not (s.saving and self._want_opt_state):
            return
        prefix = "lr/" if index == 0 else f"lr/opt{index}/"
        s.save(f"{prefix}group0", "optimizer_variables", _value(float(trainer.learning_rate)))
        optimizer = trainer.optimizer
        names = _STATE_NAMES.get(type(optimizer).__name__.lower(), ())
        tparams = trainer._params
        for updater in trainer._updaters[:1]:  # one updater per device; the first device's
            for i, state in updater.states.items():
                if not isinstance(i, int) or i >= len(tparams):
                    continue
                pname = self._param_names.get(id(tparams[i]))
                if pname is None:
                    continue
                parts: list = []
                _flatten(state, parts)
                for k, arr in enumerate(parts):
                    if len(parts) == len(names):
                        key = names[k]
                    else:
                        key = "state" if len(parts) == 1 else f"state{k}"
                    s.save(f"{pname}/{key}", "optimizer_variables", _Host(arr))

    def _make_io_hook(self, label: str, tags: frozenset, bname: str, which: str) -> Callable:
        kind = "inputs" if which == "input" else "outputs"
        base = f"{label}/{which}"

        if which == "input":

            def hook(block: Any, args: Any) -> None:
                self._save_io(base, kind, tags, bname, args)

        else:

            def hook(block: Any, args: Any, output: Any) -> None:
                self._save_io(base, kind, tags, bname, output)

        return hook

    @guarded
    def _save_io(self, base: str, kind: str, tags: frozenset, bname: str, value: Any) -> None:
        s = self._session
        if not s.saving:
            return
        flat: list = []
        _flatten(value, flat)
        for i, t in enumerate(flat):
            s.save(base if i == 0 else f"{base}.{i}", kind, _Host(t), tags, bname)

    def _make_loss_hook(self, name: str) -> Callable:
        def hook(block: Any, args: Any, output: Any) -> None:
            self._loss_block_ran(name, output)

        return hook

    @guarded
    def _loss_block_ran(self, name: str, output: Any) -> None:
        self._ensure_step()
        s = self._session
        if s.saving:
            s.save(name, "losses", _value(output))

    # -- user API ----------------------------------------------------------------------------

    @guarded
    def step(self) -> None:
        """Ends the current step (committing it) and opens the next.

        Calling it switches the hook to explicit steps: forward passes no longer open steps.

        Raises:
            TrainingStopped: a stop was requested.

        """
        self._manual = True
        self._ensure_step()
        self._grads_at_step_end()
        self._session.end_step()

    def set_mode(self, mode: Optional[ModeLike]) -> None:
        """Sets the mode of the next steps (``"train"``, ``"eval"``, ``"predict"``).

        ``None`` goes back to following ``autograd.is_training()``.
        """
        self._mode_override = None if mode is None else to_mode(mode)

    def _detach(self) -> None:
        for h in self._handles:
            h.detach()
        self._handles.clear()
        for restore in self._restore:
            restore()
        self._restore.clear()

    def _before_close(self) -> None:
        if not self._session.disabled and not self._session.closed:
            self._grads_at_step_end_guarded()

    @guarded
    def _grads_at_step_end_guarded(self) -> None:
        self._grads_at_step_end()
