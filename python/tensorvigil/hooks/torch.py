"""PyTorch capture: :class:`Hook` saves weights, gradients, activations, losses and more.

This is the only module of tensorvigil that imports torch at module level; it is loaded when
``tv.torch`` is first used.

Steps: a forward pass of the registered (root) module opens a new step when the previous one
is done: in train mode with a registered optimizer, after its ``opt.step()`` (so
gradient-accumulation micro-batches share a step); otherwise (no optimizer, eval, predict)
after each forward pass; and whenever the mode changes. After the first explicit
:meth:`Hook.step` call, only :meth:`Hook.step` ends steps. A step is committed (visible to
readers) when the next one opens, at :meth:`Hook.step`, or at :meth:`Hook.close`.

What is captured when (global step ``s``):

- ``weights`` / ``biases``: when step ``s`` opens, i.e. the values the forward pass of step
  ``s`` uses (after ``opt.step()`` of step ``s - 1``).
- ``gradients``: in the optimizer's step pre-hook, i.e. exactly what ``opt.step()`` uses
  (after every backward pass of the step, so accumulated gradients and DDP-averaged ones).
  Without a registered optimizer, at the end of the first backward pass of the step (the
  post-accumulate-grad hook).
- ``optimizer_variables``: after ``opt.step()`` (state such as ``exp_avg`` after the update,
  and the learning rate of each parameter group as ``lr/group<i>``).
- ``inputs`` / ``outputs`` and ``relu_*``/``tanh_*``/``sigmoid_*``: in module forward
  (pre-)hooks, the first call of a module in a step. Inputs are taken before the module runs,
  so in-place modules (``nn.ReLU(inplace=True)``) record their real input. Functional
  activations (``F.relu`` inside ``forward``) are not modules and are not seen: use
  ``nn.ReLU`` modules or :meth:`Hook.record_tensor`.
- ``losses`` / ``metrics`` / ``custom``: when :meth:`Hook.record_loss`,
  :meth:`Hook.record_scalar` or :meth:`Hook.record_tensor` is called.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

from ..errors import InvalidArgumentError, TrainingStopped
from ..modes import Mode, ModeLike, to_mode
from .base import CapturePlan, CaptureSession, Collection, SaveConfig, StepHook, guarded

logger = logging.getLogger("tensorvigil")

__all__ = ["Hook", "TrainingStopped"]

_ACTIVATION_TAGS: tuple[tuple[type, str], ...] = (
    (nn.ReLU, "relu"),
    (nn.ReLU6, "relu"),
    (nn.Tanh, "tanh"),
    (nn.Sigmoid, "sigmoid"),
)
_NO_TAGS: frozenset = frozenset()


def _torch_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return int(torch.distributed.get_rank())
    from .base import _detect_rank

    return _detect_rank()


def _unwrap(model: nn.Module) -> tuple[nn.Module, bool]:
    """The user's module inside DDP / torch.compile wrappers, and whether it is compiled."""
    compiled = False
    for _ in range(8):
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model, compiled = model._orig_mod, True
        elif isinstance(model, nn.parallel.DistributedDataParallel) or (
            type(model).__name__
            in ("DistributedDataParallel", "DataParallel", "FullyShardedDataParallel")
            and isinstance(getattr(model, "module", None), nn.Module)
        ):
            model = model.module
        else:
            break
    return model, compiled


def _flatten(value: Any, out: list) -> None:
    if isinstance(value, torch.Tensor):
        out.append(value)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _flatten(v, out)
    elif isinstance(value, dict):
        for v in value.values():
            _flatten(v, out)
    elif hasattr(value, "data") and isinstance(getattr(value, "data", None), torch.Tensor):
        out.append(value.data)  # e.g. PackedSequence


class Hook(StepHook):
    """Captures a PyTorch model's tensors into a tensorvigil run while it trains.

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
        hist_bins: Fixed-bin histogram stored with each tensor's statistics (0: none).
        exp_hist: Store the exponent (log2) histogram with each record (off by default: it
            makes the statistics ~2.7x dearer on the CPU and costs an atomic per element on
            the GPU).
        codec: Codec for float tensors (``"shuffle-zstd"``, ``"zstd"``, ``"raw"``).
        max_pending_bytes: Bound on host memory held by saves not yet on disk.
        policy: When that bound is reached: ``"block"`` (wait, lose nothing) or ``"skip"``
            (drop the values of the tensor, keep its statistics; the drop is counted).
        writer_options: Further :class:`tensorvigil.StoreWriter` options (``level``,
            ``roll_bytes``, ``roll_seconds``, ``threads``, ``fsync`` (default ``False`` for
            hooks: a killed training process loses no committed step; an OS crash may)).
        tensorboard_dir: Also mirror what is captured into this TensorBoard directory while
            training runs (``DIR/rank<R>/<mode>``; see ``docs/TENSORBOARD.md``). A background
            thread exports each committed step from the run; it needs
            ``pip install 'tensorvigil[tensorboard]'``.

    Example:
        >>> hook = tv.torch.Hook("runs/exp1", collections=["weights", "gradients", "losses"],
        ...                      save=tv.SaveConfig(every=10))
        >>> hook.register(model, optimizer=opt)
        >>> with hook:
        ...     for x, y in loader:
        ...         loss = loss_fn(model(x), y)
        ...         hook.record_loss(loss)
        ...         opt.zero_grad(); loss.backward(); opt.step()

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
        tensorboard_dir: Optional[Union[str, os.PathLike]] = None,
    ) -> None:
        if save is None:
            save = SaveConfig(every=10)
        elif not isinstance(save, SaveConfig):
            raise InvalidArgumentError(f"save must be a tv.SaveConfig, got {save!r}")
        plan = CapturePlan(collections, save, bool(reductions_only), int(hist_bins))
        # Hooks do not fsync by default: a crash of the training process loses no committed
        # step (the data is in the page cache); only an OS crash could. fsync on a slow disk
        # stalls training through the pending-bytes bound.
        opts = {"fsync": False, "codec": codec}
        opts.update(writer_options or {})
        opts.update(max_pending_bytes=max_pending_bytes, policy=policy)
        self._session = CaptureSession(
            out_dir,
            plan,
            strict=strict,
            ranks=ranks,
            rank_fn=_torch_rank,
            exp_hist=exp_hist,
            writer_options=opts,
            tensorboard_dir=tensorboard_dir,
        )
        self._session.attach_rules(rules or [], on_finding)
        self._handles: list[Any] = []
        self._root: Optional[nn.Module] = None
        self._params: list[tuple[str, nn.Parameter, str]] = []
        self._param_names: dict[int, str] = {}
        self._optimizers: list[torch.optim.Optimizer] = []
        self._mode_override: Optional[Mode] = None
        self._manual = False
        self._forwards = 0
        self._opt_steps = 0
        self._gpu_checked = False

    # -- registration ----------------------------------------------------------------------

    def register(
        self,
        model: nn.Module,
        optimizer: Union[torch.optim.Optimizer, Sequence[torch.optim.Optimizer], None] = None,
    ) -> Hook:
        """Attaches the hook to ``model`` (and its optimizer, for gradients and its state).

        ``model`` may be wrapped in ``DistributedDataParallel`` or ``torch.compile``; names
        are those of the wrapped module (``fc1.weight``, not ``module.fc1.weight``). For a
        compiled model, module inputs/outputs are not captured (hooks inside a compiled graph
        would break it); everything else is.

        Returns:
            The hook, for chaining.

        Raises:
            InvalidArgumentError: ``model`` is not an ``nn.Module`` or the hook is registered.

        """
        if not isinstance(model, nn.Module):
            raise InvalidArgumentError(
                f"register() needs a torch.nn.Module, got {type(model).__name__}"
            )
        if self._root is not None:
            raise InvalidArgumentError("this hook is already registered with a model")
        if optimizer is None:
            optimizers: list = []
        elif isinstance(optimizer, torch.optim.Optimizer):
            optimizers = [optimizer]
        else:
            optimizers = list(optimizer)
            for o in optimizers:
                if not isinstance(o, torch.optim.Optimizer):
                    raise InvalidArgumentError(
                        f"optimizer must be a torch.optim.Optimizer, got {o!r}"
                    )
        inner, compiled = _unwrap(model)
        self._root = model
        self._inner = inner
        plan = self._session.plan
        for name, p in inner.named_parameters():
            # "bias", "bias_ih_l0", "in_proj_bias" ... are biases; everything else a weight
            kind = "biases" if "bias" in name.rsplit(".", 1)[-1] else "weights"
            self._params.append((name, p, kind))
            self._param_names[id(p)] = name
        self._handles.append(model.register_forward_pre_hook(self._on_root_forward))
        self._optimizers = optimizers
        want_opt_state = plan.could_want("optimizer_variables")
        for o in optimizers:
            self._handles.append(o.register_step_pre_hook(self._on_opt_pre_step))
            if want_opt_state:  # else skip the per-step walk over the optimizer state
                self._handles.append(o.register_step_post_hook(self._on_opt_post_step))
        if not optimizers and plan.could_want("gradients"):
            for name, p, _ in self._params:
                if p.requires_grad:
                    self._handles.append(
                        p.register_post_accumulate_grad_hook(self._make_grad_hook(name))
                    )
        skipped = []
        for mname, m in inner.named_modules():
            tags = {tag for cls, tag in _ACTIVATION_TAGS if isinstance(m, cls)}
            label = mname or "model"
            if mname and any(True for _ in m.children()):
                tags.add("container")  # built-in collections take leaves and the root only
            tags = frozenset(tags)
            want_in = plan.could_want("inputs", tags, mname, f"{label}/input")
            want_out = plan.could_want("outputs", tags, mname, f"{label}/output")
            if not (want_in or want_out):
                continue
            if compiled:
                skipped.append(label)
                continue
            if want_in:
                self._handles.append(
                    m.register_forward_pre_hook(self._make_io_hook(label, tags, mname, "input"))
                )
            if want_out:
                self._handles.append(
                    m.register_forward_hook(self._make_io_hook(label, tags, mname, "output"))
                )
        if skipped:
            logger.warning(
                "tensorvigil: the model is compiled (torch.compile); module inputs/outputs of "
                "%d module(s) are not captured (%s%s). Weights, gradients, optimizer state, "
                "losses and recorded tensors are.",
                len(skipped),
                ", ".join(skipped[:5]),
                ", ..." if len(skipped) > 5 else "",
            )
        return self

    # -- framework events ------------------------------------------------------------------

    @guarded
    def _on_root_forward(self, module: nn.Module, args: Any) -> None:
        if not self._session.step_open:
            self._begin()
        elif not self._manual and self._step_done():
            self._begin()
        self._forwards += 1

    def _next_mode(self) -> Mode:
        if self._mode_override is not None:
            return self._mode_override
        root = self._root
        return Mode.TRAIN if (root is None or root.training) else Mode.EVAL

    def _step_done(self) -> bool:
        """Whether a forward pass now starts a new step (automatic steps).

        A train step ends with its optimizer step, so gradient-accumulation micro-batches
        share one step; without an optimizer, and in eval/predict, every forward pass is one
        step. A change of mode also starts a new step.
        """
        mode = self._next_mode()
        if mode != self._session.mode:
            return True
        if self._optimizers and mode == Mode.TRAIN:
            return self._opt_steps > 0
        return self._forwards > 0

    def _begin(self) -> None:
        s = self._session
        mode = self._next_mode()
        self._forwards = 0
        self._opt_steps = 0
        s.begin_step(mode)
        if s.saving:
            self._check_gpu()
            s.save_many([(name, kind, p) for name, p, kind in self._params])

    def _check_gpu(self) -> None:
        if self._gpu_checked:
            return
        self._gpu_checked = True
        if not any(p.is_cuda for _, p, _ in self._params):
            return
        from .. import cuda as tv_cuda

        if tv_cuda.cuda_available():
            self._session.gpu = tv_cuda.GpuCapture(self._session.writer())
        else:
            logger.info(
                "tensorvigil: CUDA tensors are copied to the host for statistics (this build "
                "has no CUDA kernels; reinstall with TV_ENABLE_CUDA=ON for on-device statistics)"
            )

    @staticmethod
    def _as_scalar(value: Any) -> Any:
        return _scalar(value)

    @guarded
    def _on_opt_pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._ensure_step()
        s = self._session
        self._opt_steps += 1
        if not s.saving:
            return
        s.save_many(
            [
                (name + "/grad", "gradients", p.grad)
                for name, p, _ in self._params
                if p.grad is not None
            ]
        )

    @guarded
    def _on_opt_post_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        s = self._session
        if not s.saving:
            return
        idx = self._optimizers.index(optimizer) if len(self._optimizers) > 1 else 0
        prefix = "lr/" if idx == 0 else f"lr/opt{idx}/"
        for gi, group in enumerate(optimizer.param_groups):
            lr = group.get("lr")
            if lr is not None:
                s.save(f"{prefix}group{gi}", "optimizer_variables", _scalar(lr))
        for p, state in optimizer.state.items():
            pname = self._param_names.get(id(p))
            if pname is None or not isinstance(state, dict):
                continue
            for key, v in state.items():
                if key == "step" or not isinstance(v, torch.Tensor):
                    continue
                s.save(f"{pname}/{key}", "optimizer_variables", v)

    def _make_grad_hook(self, name: str) -> Callable:
        gname = name + "/grad"

        def grad_hook(p: torch.Tensor) -> None:
            self._grad_ready(gname, p)

        return grad_hook

    @guarded
    def _grad_ready(self, gname: str, p: torch.Tensor) -> None:
        self._ensure_step()
        if p.grad is not None:
            self._session.save(gname, "gradients", p.grad)

    def _make_io_hook(self, label: str, tags: frozenset, mname: str, which: str) -> Callable:
        kind = "inputs" if which == "input" else "outputs"
        base = f"{label}/{which}"

        if which == "input":

            def hook(module: nn.Module, args: Any) -> None:
                self._save_io(base, kind, tags, mname, args)

        else:

            def hook(module: nn.Module, args: Any, output: Any) -> None:
                self._save_io(base, kind, tags, mname, output)

        return hook

    @guarded
    def _save_io(self, base: str, kind: str, tags: frozenset, mname: str, value: Any) -> None:
        s = self._session
        if not s.saving:
            return
        if isinstance(value, torch.Tensor):
            s.save(base, kind, value, tags, mname)
            return
        flat: list = []
        _flatten(value, flat)
        for i, t in enumerate(flat):
            s.save(base if i == 0 else f"{base}.{i}", kind, t, tags, mname)

    # -- user API ----------------------------------------------------------------------------

    @guarded
    def step(self) -> None:
        """Ends the current step (committing it) and opens the next.

        Calling it switches the hook to explicit steps: forward passes no longer open steps,
        so several forward passes (e.g. gradient accumulation) can share one step.

        Raises:
            TrainingStopped: a stop was requested.

        """
        self._manual = True
        self._ensure_step()
        self._session.end_step()

    def set_mode(self, mode: Optional[ModeLike]) -> None:
        """Sets the mode of the next steps (``"train"``, ``"eval"``, ``"predict"``).

        ``None`` goes back to following ``model.training``.
        """
        self._mode_override = None if mode is None else to_mode(mode)

    def _detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _scalar(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        import numpy as np

        return np.asarray(value, dtype=np.float64)
    return value
