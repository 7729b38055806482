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

Where the statistics are computed (``device_stats``): on the CPU backend a JAX array already
lives in host memory; the hook hands the native core a zero-copy view and the fused
single-pass statistics read it in place, exactly (double-precision accumulation). Floating
point arrays on an accelerator get their statistics on the device: one jitted function over
all of the step's leaves (counts, finite min/max, two-pass mean and M2, L1, max |x|, and the
histograms asked for), and only those small results are copied back. A statistics-only record
then never transfers the tensor; a record with values transfers the values but skips the host
statistics pass. Integer and bool leaves (step counters) and NumPy values take the host path.
A step that is not saved costs a few microseconds and never waits for the device.

Accuracy of the device statistics: counts, ``min``, ``max`` and ``abs_max`` are exact. Sums
are accumulated in float32 (float64 for float64 leaves) as blocked sums (about sqrt(n)
elements per partial sum), so ``mean``, ``m2`` (two passes: mean first, then squared
deviations) and ``abs_sum`` carry a relative error of a few float32 ulps times sqrt(n) at
worst, typically ~1e-7. Histogram bins are assigned in float32: an element within a float32
rounding of a bin edge may land in the neighbouring bin (numpy semantics otherwise; the range
is the finite [min, max], widened by 0.5 each side when min == max, as the native statistics).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import InvalidArgumentError, TrainingStopped
from ..modes import Mode, ModeLike, to_mode
from .base import (
    DEFAULT_COLLECTIONS,
    CapturePlan,
    CaptureSession,
    Collection,
    SaveConfig,
    SessionHook,
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


class Hook(SessionHook):
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
        device_stats: Where the statistics of floating-point JAX arrays are computed:
            ``"auto"`` (default): on the device for arrays on an accelerator, by the native
            core in place for CPU-backend arrays; ``True``: on the device for every JAX array
            (on the CPU backend too: XLA's reductions, float32 accumulation); ``False``: always
            by the native core after copying to the host (exact). See the module docs for the
            accuracy of device statistics.
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
        device_stats: Union[str, bool] = "auto",
        writer_options: Optional[dict] = None,
    ) -> None:
        if not (isinstance(device_stats, bool) or device_stats == "auto"):
            raise InvalidArgumentError(
                f"device_stats must be 'auto', True or False, got {device_stats!r}"
            )
        self._device_stats = device_stats
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
            _check_values(entries)
            host = entries
            if self._device_stats is not False:
                forced = self._device_stats is True
                dev = [e for e in entries if _device_eligible(e[2], forced)]
                if dev:
                    host = [e for e in entries if not _device_eligible(e[2], forced)]
                    _save_device(s, dev)
            s.save_many(_to_host(host))
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

    def request_stop(self, reason: str = "stop requested") -> None:
        """Stops training at the next :meth:`save_step` (raising :class:`TrainingStopped`)."""
        self._session.request_stop(reason)

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


def _check_values(entries: list[tuple[str, str, Any]]) -> None:
    for _, _, v in entries:
        if isinstance(v, jax.core.Tracer):
            raise InvalidArgumentError(
                "save_step() got a traced value: it was called inside jax.jit/grad/vmap. "
                "Call it in the Python training loop with the arrays the jitted step returns"
            )


def _fetch(arrays: list[Any]) -> list[np.ndarray]:
    """Host copies of JAX arrays: every device-to-host copy starts before any is waited on.

    CPU-backend arrays are returned as zero-copy views. Every transfer of a saved tensor's
    values goes through here (tests count them).
    """
    for v in arrays:
        if not _on_cpu(v):
            v.copy_to_host_async()
    return [np.asarray(v) for v in arrays]


def _to_host(entries: list[tuple[str, str, Any]]) -> list[tuple[str, str, Any]]:
    """The entries with every value as a NumPy array (zero-copy for CPU-backend arrays).

    Accelerator arrays start their device-to-host copies together before any is waited on.
    """
    fetched = iter(_fetch([v for _, _, v in entries if isinstance(v, jax.Array)]))
    out = []
    for name, kind, v in entries:
        if isinstance(v, jax.Array):
            arr = next(fetched)
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


# -- statistics on the device ------------------------------------------------------------------

_SUM_BLOCK_MIN = 4096  # below this many elements one reduction is accurate enough


def _device_eligible(v: Any, forced: bool) -> bool:
    """Whether the statistics of ``v`` are computed on its device."""
    if not isinstance(v, jax.Array):
        return False
    try:
        if not jnp.issubdtype(v.dtype, jnp.floating):
            return False  # integer/bool leaves (step counters): exact on the host
    except TypeError:
        return False
    return forced or not _on_cpu(v)


def _blocked_sum(v: Any) -> Any:
    """Sum of a 1-d array as about sqrt(n) partial sums of about sqrt(n) elements each.

    The rounding error grows with the longest serial accumulation; this bounds it by
    ~2 sqrt(n) additions whatever order XLA reduces in.
    """
    n = v.shape[0]
    if n <= _SUM_BLOCK_MIN:
        return jnp.sum(v)
    block = 1 << ((n - 1).bit_length() + 1) // 2
    rows = -(-n // block)
    v = jnp.pad(v, (0, rows * block - n))
    return jnp.sum(jnp.sum(v.reshape(rows, block), axis=1))


def _leaf_stats(x: Any, bins: int, exp_hist: bool) -> tuple:
    """Traced statistics of one leaf: (counts[4] int32, floats[6], hist[bins], exp[256])."""
    acc = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
    x = jnp.ravel(x).astype(acc)
    i32 = jnp.int32
    fin = jnp.isfinite(x)
    inf = jnp.array(jnp.inf, acc)
    nan = jnp.sum(jnp.isnan(x), dtype=i32)
    posinf = jnp.sum(x == inf, dtype=i32)
    neginf = jnp.sum(x == -inf, dtype=i32)
    zeros = jnp.sum(x == 0, dtype=i32)
    nfin = x.shape[0] - nan - posinf - neginf
    xf = jnp.where(fin, x, 0)
    mn = jnp.min(jnp.where(fin, x, inf), initial=inf)
    mx = jnp.max(jnp.where(fin, x, -inf), initial=-inf)
    mean = _blocked_sum(xf) / jnp.maximum(nfin, 1).astype(acc)
    d = jnp.where(fin, x - mean, 0)
    m2 = _blocked_sum(d * d)
    ax = jnp.abs(xf)
    abs_sum = _blocked_sum(ax)
    abs_max = jnp.max(ax, initial=0)
    counts = jnp.stack([nan, posinf, neginf, zeros])
    floats = jnp.stack([mn, mx, mean, m2, abs_sum, abs_max])
    hist = None
    if bins:
        # numpy.histogram over [min, max]; halves keep (x - lo) and (hi - lo) from overflowing.
        lo2, hi2 = mn * 0.5, mx * 0.5
        t = (x * 0.5 - lo2) / (hi2 - lo2) * bins
        idx = jnp.clip(jnp.floor(t), 0, bins - 1).astype(i32)
        idx = jnp.where(mn == mx, bins // 2, idx)  # the range widened by 0.5 each side
        idx = jnp.where(fin, idx, bins)
        hist = jnp.zeros(bins + 1, i32).at[idx].add(1)[:bins]
    exp = None
    if exp_hist:
        # The exponent field: floor(log2|x|) + 127 for normal floats, 0 for subnormals.
        if acc == jnp.float64:
            e = (jax.lax.bitcast_convert_type(x, jnp.uint64) >> 52) & 0x7FF
            k = jnp.clip(e.astype(i32) - 1023 + 127, 0, 255)
        else:
            k = ((jax.lax.bitcast_convert_type(x, jnp.uint32) >> 23) & 0xFF).astype(i32)
        k = jnp.where(fin & (x != 0), k, 256)
        exp = jnp.zeros(257, i32).at[k].add(1)[:256]
    return counts, floats, hist, exp


@functools.partial(jax.jit, static_argnames=("bins", "exp_hist"))
def _stats_kernel(leaves: list, bins: tuple, exp_hist: bool) -> tuple:
    """Statistics of every leaf in one program; results stacked into a few small arrays."""
    per = [_leaf_stats(x, b, exp_hist) for x, b in zip(leaves, bins)]
    wide = any(f.dtype == jnp.float64 for _, f, _, _ in per)
    ft = jnp.float64 if wide else jnp.float32
    counts = jnp.stack([c for c, _, _, _ in per])
    floats = jnp.stack([f.astype(ft) for _, f, _, _ in per])
    hists = [h for _, _, h, _ in per if h is not None]
    hist = jnp.concatenate(hists) if hists else jnp.zeros(0, jnp.int32)
    exp = jnp.stack([e for _, _, _, e in per]) if exp_hist else jnp.zeros((0, 256), jnp.int32)
    return counts, floats, hist, exp


def _host_stats(
    numel: int, counts: np.ndarray, floats: np.ndarray, bins: int, hist: Any, exp: Any
) -> Any:
    """The Stats record of one leaf from the kernel's results."""
    from .. import _core

    nan, posinf, neginf, zeros = (int(c) for c in counts)
    fin = numel - nan - posinf - neginf
    mn, mx, mean, m2, abs_sum, abs_max = (float(f) for f in floats)
    if fin == 0:
        mn = mx = float("nan")
        mean = m2 = abs_sum = abs_max = 0.0
    kw: dict = {}
    if bins:
        if fin == 0:
            lo, hi = 0.0, 1.0
        elif mn == mx:
            lo, hi = mn - 0.5, mx + 0.5
        else:
            lo, hi = mn, mx
        kw = {"hist": hist, "hist_lo": lo, "hist_hi": hi}
    if exp is not None:
        kw["exp_hist"] = exp
    return _core.Stats.from_parts(
        numel, nan, posinf, neginf, zeros, mn, mx, mean, m2, abs_sum, abs_max, **kw
    )


def _save_device(s: CaptureSession, entries: list[tuple[str, str, Any]]) -> None:
    """Saves ``entries`` (JAX float arrays) with statistics computed on their devices.

    Statistics-only records never copy the tensor to the host; the others copy only values.
    """
    claimed = []
    decided: dict = {}
    for name, kind, v in entries:
        d = s._claim(name, kind, frozenset(), "", decided)
        if d is not None:
            claimed.append((name, v, bool(d[0]), int(d[1])))
    if not claimed:
        return
    exp_hist = bool(s.exp_hist)
    groups: dict = {}  # one program per set of devices (normally one)
    for item in claimed:
        groups.setdefault(frozenset(item[1].devices()), []).append(item)
    launched = []
    for items in groups.values():
        bins = tuple(b for _, _, _, b in items)
        out = _stats_kernel([v for _, v, _, _ in items], bins=bins, exp_hist=exp_hist)
        launched.append((items, out))
    # Value copies start while the statistics run; then one gather of the small results.
    with_values = [v for _, v, stats_only, _ in claimed if not stats_only]
    values = iter(_fetch(with_values))
    results = jax.device_get([out for _, out in launched])
    w = s.writer()
    for (items, _), (counts, floats, hist, exp) in zip(launched, results):
        off = 0
        for i, (name, v, stats_only, b) in enumerate(items):
            h = hist[off : off + b] if b else None
            off += b
            st = _host_stats(v.size, counts[i], floats[i], b, h, exp[i] if exp_hist else None)
            w.write(
                name,
                s.step,
                v if stats_only else next(values),
                mode=s.mode,
                mode_step=s.mode_step,
                stats_only=stats_only,
                stats=st,
            )
