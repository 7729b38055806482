"""Framework-neutral capture: save configs, collections, the error guard and the step session.

The framework modules (:mod:`tensorvigil.hooks.torch`, ...) only translate framework events
(forward passes, optimizer steps, losses) into calls on a :class:`CaptureSession`, which owns
the step counter, the decision of what to save, the writer and the run's side files.
"""

from __future__ import annotations

import atexit
import datetime as _dt
import functools
import json
import logging
import os
import re
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence, TypeVar, Union

from ..errors import InvalidArgumentError, StoreIOError, TrainingStopped
from ..modes import Mode, ModeLike, to_mode
from ..store.remote import is_remote
from ..store.writer import check_int

logger = logging.getLogger("tensorvigil")

#: Kinds of captured tensors. A collection selects tensors by kind (and name).
KINDS = (
    "weights",
    "biases",
    "gradients",
    "inputs",
    "outputs",
    "losses",
    "metrics",
    "optimizer_variables",
    "custom",
)

#: The collections a hook saves when ``collections`` is not given.
DEFAULT_COLLECTIONS = ("weights", "biases", "gradients", "losses", "metrics")

STOP_REQUEST_NAME = "stop_request.json"
_NO_TAGS: frozenset = frozenset()
_UNDECIDED = object()
COLLECTIONS_NAME = "collections.json"

_ModeKey = Union[Mode, str, int]


_check_int = check_int  # one integer check for the hooks and the store


@dataclass(frozen=True)
class SaveConfig:
    """When to save: every ``every`` steps within ``[start, end)``, plus the listed ``steps``.

    Steps are counted per mode (the *mode step*: the 0-based count of train, eval or predict
    steps so far), so ``every=10`` saves train steps 0, 10, 20 ... and eval steps 0, 10 ...
    A step is saved when it is in ``steps`` (wherever it lies) **or** when
    ``start <= s < end`` and ``(s - start) % every == 0``. Without ``every`` and ``steps``
    every step of the window is saved.

    Args:
        every: Save every ``every``-th step of the window (``None``: only ``steps``).
        steps: Steps saved in any case.
        start: First step of the window.
        end: End of the window (exclusive); ``None``: no end.
        train: Overrides for train steps (a :class:`SaveConfig` without per-mode parts).
        eval: Overrides for eval steps.
        predict: Overrides for predict steps.

    Example:
        >>> cfg = tv.SaveConfig(every=100, steps=[0, 1, 2], eval=tv.SaveConfig(every=1))
        >>> cfg.should_save(200), cfg.should_save(1), cfg.should_save(7, "eval")
        (True, True, True)

    """

    every: Optional[int] = None
    steps: Sequence[int] = ()
    start: int = 0
    end: Optional[int] = None
    train: Optional[SaveConfig] = None
    eval: Optional[SaveConfig] = None
    predict: Optional[SaveConfig] = None
    _steps: frozenset = field(default=frozenset(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.every is not None:
            object.__setattr__(self, "every", _check_int(self.every, "SaveConfig.every", 1))
        if isinstance(self.steps, (str, bytes)) or not isinstance(self.steps, Iterable):
            raise InvalidArgumentError(
                f"SaveConfig.steps must be a list of steps, got {self.steps!r}"
            )
        steps = tuple(sorted({_check_int(s, "SaveConfig.steps item", 0) for s in self.steps}))
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "_steps", frozenset(steps))
        object.__setattr__(self, "start", _check_int(self.start, "SaveConfig.start", 0))
        if self.end is not None:
            end = _check_int(self.end, "SaveConfig.end", 0)
            if end <= self.start:
                raise InvalidArgumentError(
                    f"SaveConfig.end ({end}) must be greater than start ({self.start})"
                )
            object.__setattr__(self, "end", end)
        for m in ("train", "eval", "predict"):
            sub = getattr(self, m)
            if sub is None:
                continue
            if not isinstance(sub, SaveConfig):
                raise InvalidArgumentError(f"SaveConfig.{m} must be a SaveConfig, got {sub!r}")
            if sub.train or sub.eval or sub.predict:
                raise InvalidArgumentError(f"SaveConfig.{m} cannot itself have per-mode parts")

    def for_mode(self, mode: ModeLike) -> SaveConfig:
        """The config that applies to steps of ``mode`` (its override, or this one)."""
        m = to_mode(mode)
        sub = {Mode.TRAIN: self.train, Mode.EVAL: self.eval, Mode.PREDICT: self.predict}.get(m)
        return sub if sub is not None else self

    def should_save(self, step: int, mode: ModeLike = Mode.TRAIN) -> bool:
        """Whether mode step ``step`` of ``mode`` is saved."""
        cfg = self.for_mode(mode) if mode != Mode.TRAIN or self.train else self
        if step in cfg._steps:
            return True
        if step < cfg.start or (cfg.end is not None and step >= cfg.end):
            return False
        if cfg.every is None:
            return not cfg.steps
        return (step - cfg.start) % cfg.every == 0


@dataclass(frozen=True)
class _TensorKey:
    name: str
    kind: str
    tags: frozenset


class Collection:
    r"""A named set of captured tensors with its own save config.

    Built-in names (``weights``, ``biases``, ``gradients``, ``losses``, ``metrics``,
    ``inputs``, ``outputs``, ``relu_input``, ``relu_output``, ``tanh_input``, ``tanh_output``,
    ``sigmoid_input``, ``sigmoid_output``, ``optimizer_variables``, ``custom``, ``all``,
    ``default``) may be given as strings. A ``Collection`` with a built-in name and no
    ``include`` overrides that collection's save config, ``reductions_only`` or histogram.

    Args:
        name: Collection name (recorded in the run's ``collections.json``).
        include: Regular expressions searched in tensor names (``fc1.weight``,
            ``fc1.weight/grad``) and, for ``inputs``/``outputs``, module names (``encoder.0``).
        kinds: Kinds of tensors to consider (default: all kinds).
        save: Save config of this collection (default: the hook's).
        reductions_only: Store statistics only (default: the hook's).
        hist_bins: Fixed-bin histogram size stored with the statistics (default: the hook's).

    Example:
        >>> attn = tv.Collection("attn", include=[r"layers\.\d+\.attn"],
        ...                      kinds=("weights", "gradients", "outputs"),
        ...                      save=tv.SaveConfig(every=10), reductions_only=True)

    """

    def __init__(
        self,
        name: str,
        include: Union[str, Sequence[str]] = (),
        kinds: Optional[Sequence[str]] = None,
        *,
        save: Optional[SaveConfig] = None,
        reductions_only: Optional[bool] = None,
        hist_bins: Optional[int] = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError(f"collection name must be a non-empty string, got {name!r}")
        if isinstance(include, str):
            include = [include]
        self.name = name
        self.include = tuple(include)
        try:
            self._patterns = [re.compile(p) for p in self.include]
        except re.error as e:
            raise InvalidArgumentError(f"collection '{name}': bad include regex: {e}") from None
        if kinds is None:
            kinds = KINDS
        if isinstance(kinds, str):
            kinds = [kinds]
        bad = [k for k in kinds if k not in KINDS]
        if bad:
            raise InvalidArgumentError(
                f"collection '{name}': unknown kind(s) {bad}; known kinds: {', '.join(KINDS)}"
            )
        self.kinds = frozenset(kinds)
        if save is not None and not isinstance(save, SaveConfig):
            raise InvalidArgumentError(f"collection '{name}': save must be a SaveConfig")
        self.save = save
        self.reductions_only = None if reductions_only is None else bool(reductions_only)
        self.hist_bins = None if hist_bins is None else _check_int(hist_bins, "hist_bins", 0)

    def matches(self, key: _TensorKey, module: str = "") -> bool:
        """Whether the tensor ``key`` (of module ``module``) belongs to this collection."""
        if key.kind not in self.kinds:
            return False
        if not self._patterns:
            return True
        return any(p.search(key.name) or (module and p.search(module)) for p in self._patterns)

    def __repr__(self) -> str:
        return (
            f"Collection({self.name!r}, include={list(self.include)}, kinds={sorted(self.kinds)})"
        )


def _builtin(name: str, kinds: Sequence[str], tag: Optional[str] = None) -> Callable:
    kinds = frozenset(kinds)

    def pred(key: _TensorKey) -> bool:
        # Built-ins skip container modules (their outputs repeat their children's).
        return (
            key.kind in kinds and (tag is None or tag in key.tags) and "container" not in key.tags
        )

    pred.__name__ = name
    return pred


_BUILTINS: dict[str, Callable[[_TensorKey], bool]] = {
    "weights": _builtin("weights", ["weights"]),
    "biases": _builtin("biases", ["biases"]),
    "gradients": _builtin("gradients", ["gradients"]),
    "losses": _builtin("losses", ["losses"]),
    "metrics": _builtin("metrics", ["metrics"]),
    "inputs": _builtin("inputs", ["inputs"]),
    "outputs": _builtin("outputs", ["outputs"]),
    "relu_input": _builtin("relu_input", ["inputs"], "relu"),
    "relu_output": _builtin("relu_output", ["outputs"], "relu"),
    "tanh_input": _builtin("tanh_input", ["inputs"], "tanh"),
    "tanh_output": _builtin("tanh_output", ["outputs"], "tanh"),
    "sigmoid_input": _builtin("sigmoid_input", ["inputs"], "sigmoid"),
    "sigmoid_output": _builtin("sigmoid_output", ["outputs"], "sigmoid"),
    "optimizer_variables": _builtin("optimizer_variables", ["optimizer_variables"]),
    "custom": _builtin("custom", ["custom"]),
    "all": _builtin("all", KINDS),
}
BUILTIN_COLLECTIONS = tuple(_BUILTINS) + ("default",)


class _Coll:
    """A resolved collection: membership predicate plus effective settings."""

    __slots__ = ("name", "pred", "user", "save", "reductions_only", "hist_bins")

    def __init__(self, name, pred, user, save, reductions_only, hist_bins):
        self.name = name
        self.pred = pred
        self.user = user
        self.save = save
        self.reductions_only = reductions_only
        self.hist_bins = hist_bins


def _selects(c: _Coll, key: _TensorKey, module: str) -> bool:
    """Whether collection ``c`` selects the tensor ``key`` of module ``module``."""
    return c.user.matches(key, module) if c.user is not None else c.pred(key)


class CapturePlan:
    """Decides, per step and tensor, whether to save it and how (statistics only or values)."""

    def __init__(
        self,
        collections: Optional[Sequence[Union[str, Collection]]],
        save: SaveConfig,
        reductions_only: bool,
        hist_bins: int,
    ) -> None:
        if collections is None:
            collections = list(DEFAULT_COLLECTIONS)
        elif isinstance(collections, (str, Collection)):
            collections = [collections]
        names: list[str] = []
        overrides: dict[str, Collection] = {}
        user: list[Collection] = []
        for c in collections:
            if isinstance(c, str):
                if c not in BUILTIN_COLLECTIONS:
                    raise InvalidArgumentError(
                        f"unknown collection '{c}'; built-in collections: "
                        f"{', '.join(BUILTIN_COLLECTIONS)} (or pass a tv.Collection)"
                    )
                names.extend(DEFAULT_COLLECTIONS if c == "default" else [c])
            elif isinstance(c, Collection):
                if c.name in _BUILTINS and not c.include:
                    names.append(c.name)
                    overrides[c.name] = c
                elif c.name in BUILTIN_COLLECTIONS:
                    raise InvalidArgumentError(
                        f"collection '{c.name}' has a built-in name: omit include= to "
                        "override the built-in, or choose another name"
                    )
                else:
                    user.append(c)
            else:
                raise InvalidArgumentError(
                    f"collections must hold names or tv.Collection objects, got {c!r}"
                )
        self.colls: list[_Coll] = []
        seen = set()
        for n in names:
            if n in seen:
                continue
            seen.add(n)
            o = overrides.get(n)
            self.colls.append(
                self._resolve(n, _BUILTINS[n], None, o, save, reductions_only, hist_bins)
            )
        for c in user:
            if c.name in seen:
                raise InvalidArgumentError(f"collection '{c.name}' is given twice")
            seen.add(c.name)
            self.colls.append(self._resolve(c.name, None, c, c, save, reductions_only, hist_bins))
        self._members: dict[tuple, tuple[int, ...]] = {}
        self._active: list[Optional[tuple[bool, int]]] = [None] * len(self.colls)
        self.names_by_collection: dict[str, set[str]] = {}
        self._noted: set[str] = set()
        self.version = 0  # bumps when names_by_collection grows

    @staticmethod
    def _resolve(name, pred, user, override, save, reductions_only, hist_bins) -> _Coll:
        if override is not None:
            save = override.save or save
            if override.reductions_only is not None:
                reductions_only = override.reductions_only
            if override.hist_bins is not None:
                hist_bins = override.hist_bins
        return _Coll(name, pred, user, save, reductions_only, hist_bins)

    def could_want(
        self,
        kind: str,
        tags: frozenset = frozenset(),
        module: Optional[str] = None,
        name: str = "",
    ) -> bool:
        """Whether any collection could select a tensor of ``kind`` (for hook registration).

        Args:
            kind: Tensor kind.
            tags: Tags of the tensor (``relu``, ``container`` ...).
            module: Module the tensor belongs to, matched by user collections' regexes.
                ``None`` asks about the kind alone: a user collection of that kind could
                select some tensor of it, whatever its regexes.
            name: Tensor name, matched as well.

        """
        key = _TensorKey(name, kind, tags)
        if module is None:
            return any(
                kind in c.user.kinds if c.user is not None else c.pred(key) for c in self.colls
            )
        return any(_selects(c, key, module) for c in self.colls)

    def begin(self, mode: Mode, mode_step: int) -> bool:
        """Computes which collections save this step; returns whether any does."""
        any_active = False
        for i, c in enumerate(self.colls):
            if c.save.should_save(mode_step, mode):
                self._active[i] = (c.reductions_only, c.hist_bins)
                any_active = True
            else:
                self._active[i] = None
        return any_active

    def members(
        self, name: str, kind: str, tags: frozenset = frozenset(), module: str = ""
    ) -> tuple[int, ...]:
        """Indices of the collections ``name`` belongs to (cached)."""
        m = self._members.get((name, kind, tags, module))
        if m is None:
            key = _TensorKey(name, kind, tags)
            m = tuple(i for i, c in enumerate(self.colls) if _selects(c, key, module))
            self._members[(name, kind, tags, module)] = m
        return m

    def note_saved(self, name: str, kind: str, tags: frozenset, members: tuple[int, ...]) -> None:
        """Records a saved tensor's collections for ``collections.json``.

        Besides the hook's collections, every built-in collection that describes the tensor
        (``gradients``, ``relu_input`` ...) is recorded, so rules find gradients by collection
        even when the hook was asked for ``all`` or a user collection.
        """
        if name in self._noted:
            return
        self._noted.add(name)
        key = _TensorKey(name, kind, tags)
        for i in members:
            self.names_by_collection.setdefault(self.colls[i].name, set()).add(name)
        for cname, pred in _BUILTINS.items():
            if cname != "all" and pred(key):
                self.names_by_collection.setdefault(cname, set()).add(name)
        self.version += 1

    def decide(self, members: tuple[int, ...]) -> Optional[tuple[bool, int]]:
        """``None`` (skip) or ``(stats_only, hist_bins)`` for a tensor in ``members`` now.

        Values are stored when any active collection of the tensor wants them; the histogram
        is the largest one asked for.
        """
        stats_only = True
        bins = -1
        active = self._active
        for i in members:
            a = active[i]
            if a is not None:
                if not a[0]:
                    stats_only = False
                if a[1] > bins:
                    bins = a[1]
        if bins < 0:
            return None
        return stats_only, bins


# ---------------------------------------------------------------------------------------------
# Error guard


_F = TypeVar("_F", bound=Callable[..., Any])


def guarded(fn: _F) -> _F:
    """Wraps a framework-facing method of a hook: errors disable capture unless strict.

    The object must have a ``_session`` (:class:`CaptureSession`). :class:`TrainingStopped`
    always propagates (it is how a stop is delivered).
    """

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        s = self._session
        if s.disabled:
            return None
        try:
            return fn(self, *args, **kwargs)
        except TrainingStopped:
            raise
        except Exception as e:  # noqa: BLE001 - the guard's whole point
            s.fail(e, fn.__name__)
            return None

    return wrapper  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# Session


_LIVE: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_live_sessions() -> None:
    for s in list(_LIVE):
        try:
            s.close()
        except Exception:  # noqa: BLE001 - interpreter exit: report, never raise
            logger.exception("tensorvigil: closing a capture session at exit failed")


def _detect_rank() -> int:
    for var in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"):
        v = os.environ.get(var)
        if v is not None and v.strip().isdigit():
            return int(v)
    return 0


class SessionHook:
    """The verbs every framework hook shares; each delegates to the hook's ``_session``.

    Framework hooks subclass it, set ``self._session`` (a :class:`CaptureSession`) and override
    :meth:`_detach` (remove framework hooks and wrappers) and :meth:`_before_close` (capture
    what the last step still owes) where they need to.
    """

    _session: CaptureSession

    @property
    def mode(self) -> Mode:
        """Mode of the current step (or of the last one, between steps)."""
        return self._session.mode

    @property
    def current_step(self) -> int:
        """Global step being captured, or the last one (-1 before the first)."""
        return self._session.step

    @property
    def should_stop(self) -> bool:
        """Whether a stop was requested (by a rule, :meth:`request_stop` or a watcher)."""
        return self._session.should_stop

    def request_stop(self, reason: str = "stop requested") -> None:
        """Stops training at the next step boundary (raising :class:`TrainingStopped`)."""
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
        """Where the run is written: the directory, or the object-store URL."""
        s = self._session
        return s.out_dir if s.target is None else str(s.target)

    def flush(self) -> None:
        """Waits until everything captured so far is written."""
        self._session.flush()

    def _detach(self) -> None:
        """Removes the framework's hooks and wrappers (none by default)."""

    def _before_close(self) -> None:
        """Captures what the last step still owes before the session closes (nothing)."""

    def close(self) -> None:
        """Commits the current step, flushes, seals the stream and removes the hooks.

        Idempotent; also called at interpreter exit and by ``with hook:``. Errors are logged
        (raised with ``strict``).
        """
        self._detach()
        try:
            self._before_close()
            self._session.close()
        except Exception as e:  # noqa: BLE001 - never kill training unless strict
            if self._session.strict:
                raise
            logger.error("tensorvigil: closing the run failed: %s: %s", type(e).__name__, e)

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        s = self._session
        colls = [c.name for c in s.plan.colls]
        return f"{type(self).__name__}({self.out_dir!r}, step={s.step}, collections={colls})"


class StepHook(SessionHook):
    """A hook whose steps open from framework callbacks (PyTorch, MXNet).

    Forward, backward and optimizer callbacks open a step; so do the user's ``record_*`` calls
    when they come first.

    Subclasses define ``_begin()`` (open a step) and may convert values with
    :meth:`_as_scalar` (losses and metrics) and :meth:`_as_tensor` (custom tensors).
    """

    def _begin(self) -> None:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    @staticmethod
    def _as_scalar(value: Any) -> Any:
        return value

    @staticmethod
    def _as_tensor(value: Any) -> Any:
        return value

    def _ensure_step(self) -> None:
        if not self._session.step_open:
            self._begin()

    @guarded
    def record_loss(self, loss: Any, name: Optional[str] = None) -> None:
        """Saves a loss of the current step as ``loss`` (or ``loss/<name>``).

        Args:
            loss: A tensor of the framework (detached; CUDA tensors are not synchronised
                beyond the copy; a per-sample vector is stored as it is) or a number.
            name: Distinguishes several losses.

        """
        self._ensure_step()
        s = self._session
        if s.saving:
            s.save("loss" if name is None else f"loss/{name}", "losses", self._as_scalar(loss))

    @guarded
    def record_scalar(self, name: str, value: Any) -> None:
        """Saves a metric of the current step as ``metric/<name>``."""
        self._ensure_step()
        s = self._session
        if s.saving:
            s.save(f"metric/{name}", "metrics", self._as_scalar(value))

    @guarded
    def record_tensor(self, name: str, value: Any) -> None:
        """Saves any tensor of the current step under ``name`` (collection ``custom``).

        ``custom`` is saved when it is among the hook's collections (it is in ``all``) or a
        user collection with kind ``custom`` selects ``name``.
        """
        self._ensure_step()
        s = self._session
        if s.saving:
            s.save(name, "custom", self._as_tensor(value))


class CaptureSession:
    """Step bookkeeping and writing for one hook (one rank's stream of a run).

    Args:
        out_dir: Run directory.
        plan: What to save.
        strict: Raise hook errors instead of disabling capture.
        ranks: ``"all"`` (every rank writes its stream) or ``"zero"`` (only rank 0 writes).
        rank_fn: Returns this process's rank (called when the writer is first needed, so
            ``torch.distributed`` may be initialised after the hook is made).
        exp_hist: Store the exponent histogram with every statistics record.
        writer_options: Passed to :class:`tensorvigil.StoreWriter`.
        tensorboard_dir: Mirror what is captured into this TensorBoard directory while
            training runs (:class:`tensorvigil.export.tensorboard.TensorBoardMirror`).

    """

    def __init__(
        self,
        out_dir: Union[str, os.PathLike],
        plan: CapturePlan,
        *,
        strict: bool,
        ranks: str = "all",
        rank_fn: Callable[[], int] = _detect_rank,
        exp_hist: bool = False,
        writer_options: Optional[dict] = None,
        tensorboard_dir: Optional[Union[str, os.PathLike]] = None,
    ) -> None:
        if ranks not in ("all", "zero"):
            raise InvalidArgumentError(f"ranks must be 'all' or 'zero', got {ranks!r}")
        self._writer_options = dict(writer_options or {})
        self.target: Any = None
        if is_remote(out_dir):
            # Object storage: checked now (bad credentials or a missing bucket refuse before
            # training starts); the writer stages the stream locally and uploads it, and
            # collections, stop requests and in-process rules use the staging directory.
            from ..store.remote import check_target

            self.target = out_dir
            self._writer_options.setdefault(
                "staging_dir", check_target(out_dir, self._writer_options.get("staging_dir"))
            )
            out_dir = self._writer_options["staging_dir"]
        elif isinstance(out_dir, str) and "://" in out_dir:
            raise InvalidArgumentError(
                f"out_dir '{out_dir}': unsupported URL scheme; use a local directory, "
                "s3://bucket/prefix or a pyarrow.fs filesystem"
            )
        self.out_dir = os.fspath(out_dir)
        self.plan = plan
        self.strict = bool(strict)
        self.ranks = ranks
        self._rank_fn = rank_fn
        # Off unless asked for: measured, it multiplies the statistics' cost by ~2.7 on the CPU
        # kernels and adds a shared-memory atomic per element on the GPU.
        self.exp_hist = bool(exp_hist)
        self.exp_hist_gpu = bool(exp_hist)
        self._writer: Any = None
        self._writer_lock = threading.Lock()
        self.rank: Optional[int] = None
        self.disabled = False
        self.closed = False
        self._failed_once = False
        self.step = -1
        self.mode = Mode.TRAIN
        self.mode_step = -1
        self._mode_steps: dict[Mode, int] = {}
        self.step_open = False
        self._saving = False
        self._written: set[str] = set()
        self._wrote = False
        self._collections_version = -1
        self.stop_reason: Optional[str] = None
        self._stop_raised = False
        self._stop_checked = 0.0
        self._started = time.time()  # stop requests older than this belong to an earlier run
        self.gpu: Any = None  # GPU capture path, attached by the framework module when used
        self._rules: Optional[RulesThread] = None
        self._rule_spec: Optional[tuple] = None
        self._tb: Any = None  # TensorBoardMirror, started at the first commit
        self._tb_dir: Optional[str] = None
        if tensorboard_dir is not None:
            from ..export.tensorboard import check_available

            check_available()
            self._tb_dir = os.fspath(tensorboard_dir)
        _LIVE.add(self)

    # -- writer ----------------------------------------------------------------------------

    @property
    def capturing(self) -> bool:
        """False when this rank does not write (``ranks="zero"`` on other ranks) or is off."""
        if self.disabled or self.closed:
            return False
        if self.rank is None:
            self.rank = int(self._rank_fn())
        return self.ranks == "all" or self.rank == 0

    def writer(self) -> Any:
        """The rank's :class:`StoreWriter`, created on first use."""
        w = self._writer
        if w is None:
            with self._writer_lock:
                if self._writer is None:
                    from ..store.writer import StoreWriter

                    where = self.out_dir if self.target is None else self.target
                    self._writer = StoreWriter(where, self.rank or 0, **self._writer_options)
                w = self._writer
        return w

    # -- steps -----------------------------------------------------------------------------

    def begin_step(self, mode: Mode) -> None:
        """Ends the open step (committing it) and opens the next one in ``mode``.

        Raises:
            TrainingStopped: a stop was requested (raised once, before the new step opens).

        """
        if self.step_open:
            self.end_step()
        self._check_stop()
        self.step += 1
        self.mode = mode
        ms = self._mode_steps.get(mode, -1) + 1
        self._mode_steps[mode] = ms
        self.mode_step = ms
        self.step_open = True
        self._written.clear()
        self._wrote = False
        self._saving = self.capturing and self.plan.begin(mode, ms)

    def end_step(self) -> None:
        """Commits the open step if anything was saved in it."""
        if not self.step_open:
            return
        self.step_open = False
        if self._wrote:
            self._wrote = False
            if self._rule_spec is not None and self._rules is None and self.rank == 0:
                self._rules = RulesThread(self.out_dir, *self._rule_spec)
            # collections.json first: a reader that sees the commit also sees the names' collections
            if self.plan.version != self._collections_version:
                self.write_collections()
            if self.gpu is not None:
                self.gpu.commit(self.step, int(self.mode), self.mode_step)
            else:
                self.writer().commit(self.step, mode=self.mode, mode_step=self.mode_step)
            if self._rules is not None:
                self._rules.notify()
            if self._tb_dir is not None:
                if self._tb is None:
                    from ..export.tensorboard import TensorBoardMirror

                    self._tb = TensorBoardMirror(self.out_dir, self._tb_dir, self.rank or 0)
                self._tb.notify()

    @property
    def saving(self) -> bool:
        """Whether any collection saves the open step."""
        return self._saving and not self.disabled

    def _claim(
        self, name: str, kind: str, tags: frozenset, module: str, decided: Optional[dict] = None
    ) -> Optional[tuple]:
        """The save decision for ``name`` now, marking it written; ``None``: do not save.

        ``decided`` memoises decisions by collection membership within one batch (every
        parameter of a model shares a handful of memberships).
        """
        if not self._saving or name in self._written:
            return None
        plan = self.plan
        members = plan.members(name, kind, tags, module)
        if decided is None:
            d = plan.decide(members)
        else:
            d = decided.get(members, _UNDECIDED)
            if d is _UNDECIDED:
                d = decided[members] = plan.decide(members)
        if d is None:
            return None
        if name not in plan._noted:
            plan.note_saved(name, kind, tags, members)
        self._written.add(name)
        self._wrote = True
        return d

    def _write(self, name: str, value: Any, d: tuple) -> None:
        self.writer().write(
            name,
            self.step,
            value,
            mode=self.mode,
            mode_step=self.mode_step,
            stats_only=d[0],
            hist_bins=d[1],
            exp_hist=self.exp_hist,
        )

    def save(
        self,
        name: str,
        kind: str,
        value: Any,
        tags: frozenset = frozenset(),
        module: str = "",
    ) -> bool:
        """Saves ``value`` as ``name`` in the open step if a collection asks for it.

        A name is saved at most once per step (the first value wins). Returns whether it was
        saved.
        """
        d = self._claim(name, kind, tags, module)
        if d is None:
            return False
        if self.gpu is not None and getattr(value, "is_cuda", False):
            item = (name, _device_ready(value), *d)
            self.gpu.submit(self.step, self.mode, self.mode_step, [item], self.exp_hist_gpu)
        else:
            self._write(name, value, d)
        return True

    def save_many(self, entries: Sequence[tuple[str, str, Any]]) -> None:
        """Saves several ``(name, kind, value)`` at once: device tensors in one GPU launch.

        Hooks call this with every parameter (or gradient) of a model at every saved step.
        """
        if not self._saving:
            return
        gpu_items = []
        gpu = self.gpu
        decided: dict = {}
        for name, kind, value in entries:
            d = self._claim(name, kind, _NO_TAGS, "", decided)
            if d is None:
                continue
            if gpu is not None and getattr(value, "is_cuda", False):
                gpu_items.append((name, _device_ready(value), d[0], d[1]))
            else:
                self._write(name, value, d)
        if gpu_items:
            gpu.submit(self.step, self.mode, self.mode_step, gpu_items, self.exp_hist_gpu)

    def attach_rules(self, rules: Sequence[Any], on_finding: Any) -> None:
        """Evaluates ``rules`` on a background thread as steps are committed (rank 0 only).

        Args:
            rules: :class:`tensorvigil.Rule` objects.
            on_finding: ``"warn"`` (log), ``"stop"`` (log and stop training at the next step
                boundary) or a callable receiving each fired finding.

        """
        from ..rules import actions as A
        from ..rules.base import Rule

        rules = list(rules)
        for r in rules:
            if not isinstance(r, Rule):
                raise InvalidArgumentError(f"rules must hold tv.Rule objects, got {r!r}")
        acts: list = [A.Log()]
        if on_finding == "stop":
            acts.append(A.StopTraining(request=self.request_stop))
        elif callable(on_finding):
            acts.append(A.Callback(on_finding))
        elif on_finding != "warn":
            raise InvalidArgumentError(
                f"on_finding must be 'warn', 'stop' or a callable, got {on_finding!r}"
            )
        if rules:
            self._rule_spec = (rules, acts)

    @property
    def findings(self) -> list:
        """Findings of the in-process rules so far."""
        return list(self._rules.engine.findings) if self._rules and self._rules.engine else []

    # -- side files ------------------------------------------------------------------------

    def write_collections(self) -> None:
        """Writes ``collections.json`` (atomically) with every name seen so far."""
        self._collections_version = self.plan.version
        doc = {k: sorted(v) for k, v in self.plan.names_by_collection.items() if v}
        path = os.path.join(self.out_dir, COLLECTIONS_NAME)
        os.makedirs(self.out_dir, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(doc, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except OSError as e:  # e.g. a full disk: say which file, leave no temporary behind
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise StoreIOError(f"[capture] cannot write '{path}': {e.strerror or e}") from e

    def request_stop(self, reason: str, *, write_file: bool = True) -> None:
        """Asks training to stop at the next step boundary (also other ranks, via the run)."""
        if self.stop_reason is None:
            self.stop_reason = reason
        if write_file:
            write_stop_request(self.out_dir, reason)

    def _check_stop(self) -> None:
        if self._stop_raised:
            return
        if self.stop_reason is None:
            now = time.monotonic()
            if now - self._stop_checked >= 0.2:
                self._stop_checked = now
                req = read_stop_request(self.out_dir, self._started)
                if req is not None:
                    self.stop_reason = str(req.get("reason") or "stop requested")
        if self.stop_reason is not None:
            self._stop_raised = True
            if self._writer is not None and not self.disabled:
                self.flush()
            raise TrainingStopped(f"training stopped by tensorvigil: {self.stop_reason}")

    @property
    def should_stop(self) -> bool:
        """Whether a stop was requested (checks the run's stop request file)."""
        if self.stop_reason is None:
            req = read_stop_request(self.out_dir, self._started)
            if req is not None:
                self.stop_reason = str(req.get("reason") or "stop requested")
        return self.stop_reason is not None

    # -- lifecycle -------------------------------------------------------------------------

    def flush(self) -> None:
        """Waits until everything saved so far is written."""
        if self.gpu is not None:
            self.gpu.flush()
        if self._writer is not None:
            self._writer.flush()

    def fail(self, error: BaseException, where: str) -> None:
        """Handles a hook error: raise when strict, else log once and disable capture."""
        if self.strict:
            raise error
        self.disabled = True
        if not self._failed_once:
            self._failed_once = True
            logger.error(
                "tensorvigil: capture disabled after an error in %s (training continues; "
                "pass strict=True to raise instead): %s: %s",
                where,
                type(error).__name__,
                error,
                exc_info=error,
            )
        try:
            self._close_writer(commit_open=False)
        except Exception:  # noqa: BLE001 - already failed; keep what was committed
            pass

    def close(self) -> None:
        """Commits the open step, writes the side files and closes the writer. Idempotent."""
        if self.closed:
            return
        self.closed = True
        _LIVE.discard(self)
        self._close_writer(commit_open=not self.disabled)

    def _close_writer(self, commit_open: bool) -> None:
        try:
            if commit_open and self.step_open:
                self.end_step()
            self.step_open = False
            if (
                commit_open
                and self._writer is not None
                and (self.plan.version != self._collections_version)
            ):
                self.write_collections()
        finally:
            gpu, self.gpu = self.gpu, None
            try:
                if gpu is not None:
                    gpu.close()
            finally:
                try:
                    if self._writer is not None:
                        self._writer.close()
                finally:
                    try:
                        if self._rules is not None:
                            self._rules.close(final=commit_open)
                    finally:
                        tb, self._tb = self._tb, None
                        # after the rules' last pass, so their last findings are mirrored too
                        if tb is not None and tb.close(final=True) is not None and self.strict:
                            raise tb.error


def _device_ready(t: Any) -> Any:
    """A contiguous version of a device tensor (the GPU path reads its memory directly)."""
    if not t.is_contiguous():
        t = t.detach().contiguous()
    return t


class RulesThread:
    """Runs a :class:`~tensorvigil.rules.engine.RuleEngine` over the hook's own run.

    Woken after each commit (and polling every ``interval`` seconds, since commits reach the
    file on the writer's thread); a final pass at close evaluates the last steps.
    """

    def __init__(self, run_dir: str, rules: list, actions: list, interval: float = 0.25) -> None:
        self.run_dir = run_dir
        self.rules = rules
        self.actions = actions
        self.interval = interval
        self.engine: Any = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tv-rules", daemon=True)
        self._thread.start()

    def notify(self) -> None:
        """A step was committed."""
        self._wake.set()

    def _poll(self) -> None:
        if self.engine is None:
            from ..rules.engine import RuleEngine

            self.engine = RuleEngine(self.run_dir, self.rules, actions=self.actions)
        self.engine.poll()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self._poll()
            except Exception:  # noqa: BLE001 - rules never break training
                logger.exception("tensorvigil: in-process rule evaluation failed")

    def close(self, final: bool = True, timeout: float = 30.0) -> None:
        """Stops the thread; with ``final``, evaluates the steps committed last."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        if final:
            try:
                self._poll()
            except Exception:  # noqa: BLE001
                logger.exception("tensorvigil: final rule evaluation failed")


def write_stop_request(run_dir: str, reason: str, source: str = "hook") -> str:
    """Writes ``stop_request.json`` into a run: hooks of every rank stop at their next step.

    Args:
        run_dir: The run directory, or a run in object storage (``s3://...``): the hooks'
            uploaders poll the store for the request.
        reason: Why training should stop.
        source: Who asks (e.g. ``"rule LossSpike"``).

    Returns:
        The path (or object URL) written.

    """
    doc = {
        "reason": reason,
        "source": source,
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "pid": os.getpid(),
    }
    if is_remote(run_dir):
        from ..store.remote import open_store

        store = open_store(run_dir)
        store.put_bytes(STOP_REQUEST_NAME, json.dumps(doc).encode())
        return f"{store.url}/{STOP_REQUEST_NAME}"
    path = os.path.join(os.fspath(run_dir), STOP_REQUEST_NAME)
    tmp = f"{path}.{os.getpid()}.tmp"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f)
    os.replace(tmp, path)
    return path


def read_stop_request(run_dir: str, since: float = 0.0) -> Optional[dict]:
    """The run's stop request, or ``None``. An unreadable file still counts as a request.

    Args:
        run_dir: The run directory.
        since: Ignore a request file last modified before this time (seconds since the
            epoch): it was left by an earlier training of the same directory.

    """
    path = os.path.join(run_dir, STOP_REQUEST_NAME)
    try:
        if since and os.stat(path).st_mtime < since:
            return None
        with open(path, encoding="utf-8") as f:
            raw = f.read(1 << 16)
    except (FileNotFoundError, NotADirectoryError):  # no run directory: no request
        return None
    except OSError:
        return {"reason": f"stop requested ({path} unreadable)"}
    try:
        doc = json.loads(raw)
        return doc if isinstance(doc, dict) else {"reason": "stop requested"}
    except ValueError:
        return {"reason": "stop requested"}
