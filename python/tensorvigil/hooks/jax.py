"""JAX capture: :class:`Hook` saves parameter, gradient, update and optimizer-state pytrees.

This is the only module of tensorvigil that imports jax at module level; it is loaded when
``tv.jax`` is first used. optax is never imported: its states are ordinary pytrees.

JAX training steps are pure functions, usually under :func:`jax.jit`, so the hook does not
reach into the step. The step returns the arrays of interest (gradients, updates, the new
optimizer state, the loss) and the Python loop hands them to :meth:`Hook.save_step` at the
step boundary, outside the trace. Each call is one step, committed before it returns.

Names come from the pytrees' key paths (:func:`jax.tree_util.tree_flatten_with_path`), with
the components joined by dots: ``{"Dense_0": {"kernel": w}}`` gives ``Dense_0.kernel``
(a top-level ``{"params": ...}`` wrapper, as Flax returns, is dropped):

- ``params``: ``Dense_0.kernel`` (kind ``weights``; a last component containing ``bias``, or
  ``b`` as in Haiku, is a ``biases`` tensor).
- ``grads``: ``Dense_0.kernel/grad`` (``gradients``).
- ``updates``: ``Dense_0.kernel/update`` (``optimizer_variables``), the change the optimizer
  applies (``optax.apply_updates`` adds it).
- ``opt_state``: a leaf whose path ends with a parameter's path is named after that
  parameter, ``Dense_0.kernel/0.mu`` (Adam's first moment inside ``optax.chain``'s first
  state); other leaves are ``opt/<path>`` (``opt/0.count``) (``optimizer_variables``).
- ``outputs``: ``<path>/output`` (``outputs``), e.g. Flax ``capture_intermediates``.
- ``loss``: ``loss``, or ``loss/<name>`` for a dict; ``metrics``: ``metric/<name>``;
  ``tensors``: ``<path>`` (``custom``).

Where the statistics are computed: on the CPU backend a JAX array already lives in host
memory; the hook hands the native core a zero-copy view and the fused single-pass statistics
read it in place (nothing is copied for a statistics-only record). Arrays on an accelerator are
first copied to the host, all of a step's leaves at once (``copy_to_host_async`` on every leaf,
then one gather), because the store writer computes the record itself. A step that is not
saved costs a few microseconds and never waits for the device.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Optional, Sequence, Union

import jax
import numpy as np

from ..errors import InvalidArgumentError, TrainingStopped
from ..modes import Mode, ModeLike, to_mode
from .base import (
    DEFAULT_COLLECTIONS,
    CapturePlan,
    CaptureSession,
    Collection,
    SaveConfig,
    guarded,
)

logger = logging.getLogger("tensorvigil")

__all__ = ["Hook", "TrainingStopped", "leaf_names"]

#: The collections :class:`Hook` saves when ``collections`` is not given: the default ones
#: plus ``optimizer_variables`` (the updates and optimizer state you pass are saved).
JAX_DEFAULT_COLLECTIONS = (*DEFAULT_COLLECTIONS, "optimizer_variables")

_tu = jax.tree_util


def _key_str(k: Any) -> str:
    if isinstance(k, _tu.DictKey):
        return str(k.key)
    if isinstance(k, _tu.SequenceKey):
        return str(k.idx)
    if isinstance(k, _tu.GetAttrKey):
        return str(k.name)
    if isinstance(k, _tu.FlattenedIndexKey):
        return str(k.key)
    return str(k).strip(".[]'\"")


def _flatten(tree: Any) -> tuple[list[tuple[str, ...]], list[Any], Any, bool]:
    """``(paths, leaves, treedef, wrapped)``; each path a tuple of component strings.

    ``wrapped``: the tree was Flax's ``{"params": {...}}`` wrapper, dropped from the paths.
    """
    pairs, treedef = _tu.tree_flatten_with_path(tree)
    paths = [tuple(_key_str(k) for k in path) for path, _ in pairs]
    leaves = [leaf for _, leaf in pairs]
    wrapped = _flax_wrapped(tree, paths)
    if wrapped:
        paths = [p[1:] for p in paths]
    return paths, leaves, treedef, wrapped


def _flax_wrapped(tree: Any, paths: list[tuple[str, ...]]) -> bool:
    """Whether ``tree`` is Flax's ``{"params": {...}}`` wrapper (dropped from names)."""
    return bool(
        paths
        and isinstance(tree, Mapping)
        and len(tree) == 1
        and "params" in tree
        and all(len(p) > 1 for p in paths)
    )


def leaf_names(tree: Any, root: str = "params") -> list[str]:
    """The names the hook gives the leaves of ``tree``, in flattening order.

    Args:
        tree: Any pytree.
        root: Name of a tree that is a single array (no key path).

    Returns:
        One dotted name per leaf (``Dense_0.kernel``).

    Example:
        >>> tv.jax.leaf_names({"Dense_0": {"kernel": w, "bias": b}})
        ['Dense_0.bias', 'Dense_0.kernel']

    """
    paths = _flatten(tree)[0]
    return [".".join(p) if p else root for p in paths]


def _is_bias(path: tuple[str, ...]) -> bool:
    last = path[-1] if path else ""
    return "bias" in last or last == "b"


def _jax_rank() -> int:
    if jax.process_count() > 1:
        return int(jax.process_index())
    from .base import _detect_rank

    return _detect_rank()


class Hook:
    """Captures the pytrees of a JAX (optax, Flax, Haiku ...) training loop into a run.

    Call :meth:`save_step` once per training (or eval) step, outside :func:`jax.jit`, with the
    arrays the jitted step returned. The hook decides from its save config whether the step is
    saved; a step that is not saved is not touched (no device synchronisation).

    Args:
        out_dir: Run directory (created if missing; one stream per process inside it).
        collections: Names of built-in collections and/or :class:`tensorvigil.Collection`
            objects (default ``weights``, ``biases``, ``gradients``, ``optimizer_variables``,
            ``losses``, ``metrics``).
        save: When to save (default every 10th step of each mode); collections may override.
        reductions_only: Store statistics only, no tensor values (collections may override).
        rules: Rules evaluated during training on a background thread of process 0 (e.g.
            ``tv.rules.defaults()``); findings go to the run's ``findings.jsonl``.
        on_finding: ``"warn"`` (log each finding), ``"stop"`` (log, then raise
            :class:`TrainingStopped` from the next :meth:`save_step`) or a callable(finding).
        strict: Raise errors from the hook instead of logging once and disabling capture.
        ranks: ``"all"``: every process writes its own stream; ``"zero"``: only process 0.
        hist_bins: Fixed-bin histogram stored with each tensor's statistics (0: none).
        exp_hist: Store the exponent (log2) histogram with each record.
        codec: Codec for float tensors (``"shuffle-zstd"``, ``"zstd"``, ``"raw"``).
        max_pending_bytes: Bound on host memory held by saves not yet on disk.
        policy: When that bound is reached: ``"block"`` or ``"skip"`` (keep statistics only).
        writer_options: Further :class:`tensorvigil.StoreWriter` options.

    Example:
        >>> hook = tv.jax.Hook("runs/exp1", save=tv.SaveConfig(every=10))
        >>> for x, y in batches:
        ...     new_params, opt_state, loss, grads, updates = train_step(params, opt_state, x, y)
        ...     hook.save_step(params=params, grads=grads, updates=updates, loss=loss)
        ...     params = new_params
        >>> hook.close()

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
        if collections is None:
            collections = list(JAX_DEFAULT_COLLECTIONS)
        plan = CapturePlan(collections, save, bool(reductions_only), int(hist_bins))
        opts = {"fsync": False, "codec": codec}  # as the torch hook: see its comment
        opts.update(writer_options or {})
        opts.update(max_pending_bytes=max_pending_bytes, policy=policy)
        self._session = CaptureSession(
            out_dir,
            plan,
            strict=strict,
            ranks=ranks,
            rank_fn=_jax_rank,
            exp_hist=exp_hist,
            writer_options=opts,
        )
        self._session.attach_rules(rules or [], on_finding)
        # Names per tree structure, computed once: {(role, treedef): [(name, kind), ...]}.
        self._names: dict[tuple, list[tuple[str, str]]] = {}
        self._param_paths: dict[tuple[str, ...], str] = {}
        self._params_wrapped = False

    # -- user API ----------------------------------------------------------------------------

    @guarded
    def save_step(
        self,
        *,
        params: Any = None,
        grads: Any = None,
        updates: Any = None,
        opt_state: Any = None,
        loss: Any = None,
        metrics: Optional[Mapping[str, Any]] = None,
        outputs: Any = None,
        tensors: Any = None,
        mode: ModeLike = Mode.TRAIN,
    ) -> None:
        """Records one step: opens it, saves what the save config asks for, commits it.

        Every argument is optional; pass what the step produced. Call it outside
        :func:`jax.jit` (with concrete arrays, not tracers).

        Args:
            params: Parameter pytree the step used (the values its forward pass saw, as the
                PyTorch hook records them). If the jitted step donates its parameter buffers,
                pass the returned (updated) parameters instead.
            grads: Gradient pytree (same structure as ``params``).
            updates: The optimizer's updates (``opt.update(grads, state, params)[0]``).
            opt_state: Optimizer state pytree (after the update).
            loss: The loss: a scalar array or number, or a dict of named losses.
            metrics: ``{name: scalar}``; saved as ``metric/<name>``.
            outputs: Activations pytree (e.g. Flax ``capture_intermediates``).
            tensors: Any other pytree, saved by path name in the ``custom`` collection.
            mode: ``"train"`` (default), ``"eval"`` or ``"predict"``.

        Raises:
            TrainingStopped: a stop was requested (by a rule with ``on_finding="stop"``,
                :meth:`request_stop` or ``tensorvigil`` watchers).
            InvalidArgumentError: (``strict=True`` only; otherwise capture turns off) a value
                is a tracer (called inside ``jax.jit``) or not an array.

        """
        s = self._session
        s.begin_step(to_mode(mode))
        try:
            if not s.saving:
                return
            entries: list[tuple[str, str, Any]] = []
            if params is not None:
                self._add_tree(entries, "params", params, "", "weights")
            if grads is not None:
                self._add_tree(entries, "grads", grads, "/grad", "gradients")
            if updates is not None:
                self._add_tree(entries, "updates", updates, "/update", "optimizer_variables")
            if opt_state is not None:
                self._add_opt_state(entries, opt_state)
            if outputs is not None:
                self._add_tree(entries, "outputs", outputs, "/output", "outputs")
            if tensors is not None:
                self._add_tree(entries, "tensors", tensors, "", "custom")
            if loss is not None:
                if isinstance(loss, Mapping):
                    for k, v in loss.items():
                        entries.append((f"loss/{k}", "losses", v))
                else:
                    entries.append(("loss", "losses", loss))
            if metrics is not None:
                if not isinstance(metrics, Mapping):
                    raise InvalidArgumentError(
                        f"metrics must be a dict of name -> scalar, got {type(metrics).__name__}"
                    )
                for k, v in metrics.items():
                    entries.append((f"metric/{k}", "metrics", v))
            plan = s.plan
            entries = [e for e in entries if plan.decide(plan.members(e[0], e[1])) is not None]
            s.save_many(_to_host(entries))
        finally:
            s.end_step()

    def will_save(self, mode: ModeLike = Mode.TRAIN) -> bool:
        """Whether the next :meth:`save_step` of ``mode`` saves anything.

        Lets a loop skip work that only the capture needs (e.g. returning activations).
        """
        s = self._session
        if not s.capturing:
            return False
        m = to_mode(mode)
        ms = s._mode_steps.get(m, -1) + 1
        return any(c.save.should_save(ms, m) for c in s.plan.colls)

    @property
    def mode(self) -> Mode:
        """Mode of the last step."""
        return self._session.mode

    @property
    def current_step(self) -> int:
        """Global step last recorded (-1 before the first)."""
        return self._session.step

    @property
    def should_stop(self) -> bool:
        """Whether a stop was requested (by a rule, :meth:`request_stop` or a watcher)."""
        return self._session.should_stop

    def request_stop(self, reason: str = "stop requested") -> None:
        """Stops training at the next :meth:`save_step` (raising :class:`TrainingStopped`)."""
        self._session.request_stop(reason)

    @property
    def findings(self) -> list:
        """Findings raised so far by the hook's in-process rules."""
        return self._session.findings

    @property
    def disabled(self) -> bool:
        """True after a hook error turned capture off (non-strict mode)."""
        return self._session.disabled

    @property
    def out_dir(self) -> str:
        """The run directory."""
        return self._session.out_dir

    def flush(self) -> None:
        """Waits until everything captured so far is written."""
        self._session.flush()

    def close(self) -> None:
        """Flushes and seals the stream; runs the rules' final pass. Idempotent."""
        try:
            self._session.close()
        except Exception as e:  # noqa: BLE001 - never kill training unless strict
            if self._session.strict:
                raise
            logger.error("tensorvigil: closing the run failed: %s: %s", type(e).__name__, e)

    def __enter__(self) -> Hook:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        s = self._session
        return f"Hook({s.out_dir!r}, step={s.step}, collections={[c.name for c in s.plan.colls]})"

    # -- naming ------------------------------------------------------------------------------

    def _names_for(
        self,
        role: str,
        paths: list[tuple[str, ...]],
        treedef: Any,
        suffix: str,
        kind: str,
        wrapped: bool,
    ) -> list[tuple[str, str]]:
        key = (role, treedef)
        names = self._names.get(key)
        if names is None:
            names = []
            for p in paths:
                base = ".".join(p) if p else role
                k = "biases" if kind == "weights" and _is_bias(p) else kind
                names.append((base + suffix, k))
            self._names[key] = names
            if role == "params":
                self._param_paths = {p: ".".join(p) for p in paths if p}
                self._params_wrapped = wrapped
        return names

    def _add_tree(self, entries: list, role: str, tree: Any, suffix: str, kind: str) -> None:
        paths, leaves, treedef, wrapped = _flatten(tree)
        names = self._names_for(role, paths, treedef, suffix, kind, wrapped)
        for (name, k), leaf in zip(names, leaves):
            entries.append((name, k, leaf))

    def _add_opt_state(self, entries: list, opt_state: Any) -> None:
        paths, leaves, treedef, _ = _flatten(opt_state)
        key = ("opt_state", treedef, len(self._param_paths))
        names = self._names.get(key)
        if names is None:
            names = [(self._opt_name(p), "optimizer_variables") for p in paths]
            self._names[key] = names
        for (name, k), leaf in zip(names, leaves):
            if leaf is not None:
                entries.append((name, k, leaf))

    def _opt_name(self, path: tuple[str, ...]) -> str:
        # The longest suffix of the state path that is a parameter's path names the leaf:
        # (0, mu, Dense_0, kernel) -> Dense_0.kernel/0.mu
        for i in range(len(path)):
            pname = self._param_paths.get(path[i:])
            if pname is not None:
                prefix = path[:i]
                if self._params_wrapped and prefix and prefix[-1] == "params":
                    prefix = prefix[:-1]  # (0, mu, params, Dense_0, kernel): Flax's wrapper
                return f"{pname}/{'.'.join(prefix) or 'state'}"
        return "opt/" + (".".join(path) if path else "state")


def _to_host(entries: list[tuple[str, str, Any]]) -> list[tuple[str, str, Any]]:
    """The entries with every value as a NumPy array (zero-copy for CPU-backend arrays).

    Accelerator arrays start their device-to-host copies together before any is waited on.
    """
    remote = []
    for _, _, v in entries:
        if isinstance(v, jax.core.Tracer):
            raise InvalidArgumentError(
                "save_step() got a traced value: it was called inside jax.jit/grad/vmap. "
                "Call it in the Python training loop with the arrays the jitted step returns"
            )
        if isinstance(v, jax.Array) and not _on_cpu(v):
            remote.append(v)
    for v in remote:
        v.copy_to_host_async()
    out = []
    for name, kind, v in entries:
        if isinstance(v, jax.Array):
            arr = np.asarray(v)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            arr = np.asarray(v, dtype=np.float64)
        elif isinstance(v, (np.ndarray, np.generic)):
            arr = np.asarray(v)
        else:
            raise InvalidArgumentError(
                f"cannot save '{name}': expected a JAX or NumPy array or a number, "
                f"got {type(v).__name__}"
            )
        out.append((name, kind, arr))
    return out


def _on_cpu(x: Any) -> bool:
    try:
        return all(d.platform == "cpu" for d in x.devices())
    except Exception:  # noqa: BLE001 - deleted or exotic arrays: take the generic path
        return False
