"""The rule model: :class:`Rule`, :class:`Needs`, :class:`Finding` and the per-step views.

A rule declares what it needs and evaluates one committed step at a time through a
:class:`StepView`; it reads only through the reader (statistics from the shard indexes, values
only when it declared ``values=True``) and never imports a training framework. The engine
(:mod:`tensorvigil.rules.engine`) feeds steps in order and keeps each rule object alive, so a
rule keeps its own state between steps in attributes.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import numpy as np

from ..errors import InvalidArgumentError
from ..modes import Mode

if TYPE_CHECKING:  # pragma: no cover
    from ..store.reader import Run

SEVERITIES = ("info", "warning", "error")

#: Columns of a :class:`StatsBatch` (statistics of many tensors at one step).
STAT_COLUMNS = (
    "numel",
    "nan",
    "posinf",
    "neginf",
    "zeros",
    "min",
    "max",
    "mean",
    "var",
    "std",
    "l1",
    "l2",
    "abs_max",
)


@dataclass(frozen=True)
class Needs:
    """What a rule reads.

    Args:
        collections: Collections the rule inspects; when none of them has any tensor in the
            run, the rule reports itself ``not_applicable`` once instead of silently passing.
        regex: Alternatively, a regular expression that must match some tensor name.
        values: Whether the rule reads raw tensor values (not only statistics).
        modes: Modes of the steps the rule wants (default: every mode).

    """

    collections: Sequence[str] = ()
    regex: Optional[str] = None
    values: bool = False
    modes: Optional[Sequence[Mode]] = None


@dataclass
class Finding:
    """A rule's result at a step.

    ``kind`` is ``"fired"`` (the rule's condition holds), ``"not_applicable"`` (the run lacks
    what the rule needs) or ``"error"`` (the rule raised; it is then disabled).
    """

    rule: str
    step: int
    message: str
    severity: str = "warning"
    mode: str = "train"
    mode_step: int = -1
    evidence: dict = field(default_factory=dict)
    kind: str = "fired"
    time: str = field(default_factory=lambda: _now_iso())

    @property
    def fired(self) -> bool:
        """Whether this is a real finding (not ``not_applicable`` or a rule error)."""
        return self.kind == "fired"

    def to_json(self) -> dict:
        """A JSON-serialisable dict (the line written to ``findings.jsonl``)."""
        return {
            "rule": self.rule,
            "step": self.step,
            "mode": self.mode,
            "mode_step": self.mode_step,
            "severity": self.severity,
            "kind": self.kind,
            "message": self.message,
            "evidence": _jsonable(self.evidence),
            "time": self.time,
        }

    def __str__(self) -> str:
        return f"[{self.severity}] {self.rule} at step {self.step} ({self.mode}): {self.message}"


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        f = float(x)
        return f if np.isfinite(f) else str(f)
    if isinstance(x, Mode):
        return str(x)
    if x is None or isinstance(x, (str, int, bool)):
        return x
    return str(x)


class StatsBatch:
    """Statistics of several tensors (and ranks) at one step, as numpy columns.

    Columns are sliced from the engine's query lazily, on first access.

    Attributes:
        names: Tensor name of each row.
        name_id: The run's id of each name (an index into the run's name table).
        rank: Rank of each row.
        step, mode, mode_step, wall_time: Record metadata of each row.
        numel, nan, posinf, neginf, zeros, min, max, mean, var, std, l1, l2, abs_max: The
            statistics columns (see :class:`tensorvigil.Stats`).
        has_value: Whether the values were stored.

    """

    def __init__(
        self,
        names: Optional[Sequence[str]],
        cols: dict,
        lo: int = 0,
        hi: Optional[int] = None,
        name_table: Optional[Sequence[str]] = None,
    ) -> None:
        self._all = cols
        self._lo = lo
        self._hi = len(cols["rank"]) if hi is None else hi
        self._names = None if names is None else list(names)
        self._name_table = name_table

    def _col(self, key: str) -> np.ndarray:
        v = self._all[key][self._lo : self._hi]
        self.__dict__[key] = v  # later accesses skip __getattr__
        return v

    def __getattr__(self, key: str) -> np.ndarray:
        if key.startswith("_") or key not in self._all:
            raise AttributeError(key)
        return self._col(key)

    @property
    def names(self) -> list[str]:
        """Tensor name of each row."""
        if self._names is None:
            table = self._name_table
            self._names = [table[i] for i in self.name_id.tolist()]
        return self._names

    @property
    def columns(self) -> list[str]:
        """Names of the numpy columns."""
        return list(self._all)

    def __len__(self) -> int:
        return self._hi - self._lo

    def __iter__(self):
        """Iterates over ``(name, rank, row)`` with ``row`` a dict of the statistics."""
        keys = [k for k in self._all if k != "name_id"]
        cols = {k: getattr(self, k) for k in keys}
        for i, n in enumerate(self.names):
            yield n, int(cols["rank"][i]), {k: cols[k][i].item() for k in keys}

    def where(self, mask: np.ndarray) -> StatsBatch:
        """The rows where ``mask`` is true."""
        idx = np.flatnonzero(mask)
        cols = {k: getattr(self, k)[idx] for k in self._all}
        names = None if self._names is None else [self._names[i] for i in idx]
        return StatsBatch(names, cols, name_table=self._name_table)

    def mean_abs(self) -> np.ndarray:
        """Mean absolute value of the finite elements of each row (``l1 / finite``)."""
        finite = self.numel - self.nan - self.posinf - self.neginf
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(finite > 0, self.l1 / np.maximum(finite, 1), np.nan)

    def __repr__(self) -> str:
        return f"StatsBatch({len(self)} rows)"


class StepView:
    """One committed step of a run, as a rule sees it.

    Attributes:
        step: Global step.
        mode: Mode of the step.
        mode_step: Step within the mode.
        run: The :class:`tensorvigil.Run` being checked.

    """

    def __init__(
        self, run: Run, step: int, mode: Mode, mode_step: int, batch: StatsBatch, engine: Any
    ) -> None:
        self.run = run
        self.step = step
        self.mode = mode
        self.mode_step = mode_step
        self._batch = batch
        self._engine = engine
        self._index: Optional[dict] = None

    @property
    def ranks(self) -> list[int]:
        """Ranks with records at this step."""
        return sorted({int(r) for r in self._batch.rank})

    def names(self, collection: Optional[str] = None, regex: Optional[str] = None) -> list[str]:
        """Names of the tensors saved at this step (optionally of a collection / matching)."""
        return sorted(set(self.batch(collection=collection, regex=regex).names))

    def batch(
        self,
        collection: Optional[Union[str, Sequence[str]]] = None,
        regex: Optional[str] = None,
        rank: Optional[int] = None,
        names: Optional[Sequence[str]] = None,
    ) -> StatsBatch:
        """Statistics of the tensors at this step, filtered, as numpy columns.

        Args:
            collection: A collection name or several (union).
            regex: Keep names matching (``re.search``).
            rank: Keep one rank.
            names: Keep these names.

        """
        b = self._batch
        if collection is None and regex is None and rank is None and names is None:
            return b
        keep = np.ones(len(b), dtype=bool)
        if rank is not None:
            keep &= b.rank == rank
        if collection is not None or regex is not None:
            keep &= self._engine.name_mask(collection, regex)[b.name_id]
        if names is not None:
            allowed = set(names)
            keep &= np.fromiter((n in allowed for n in b.names), dtype=bool, count=len(b))
        return b.where(keep)

    def has(self, name: str, rank: int = 0) -> bool:
        """Whether ``name`` was saved at this step by ``rank``."""
        return (name, rank) in self._rows()

    def stats(self, name: str, rank: int = 0) -> Any:
        """Full :class:`tensorvigil.Stats` of ``name`` (with histograms, when stored)."""
        return self.run.tensor(name).stats(self.step, rank)

    def value(self, name: str, rank: int = 0) -> np.ndarray:
        """The saved values of ``name`` (rules that read values declare ``values=True``)."""
        return self.run.tensor(name).value(self.step, rank)

    def row(self, name: str, rank: int = 0) -> Optional[dict]:
        """The statistics row of ``name`` as a dict, or ``None`` when it was not saved."""
        i = self._rows().get((name, rank))
        if i is None:
            return None
        b = self._batch
        return {k: getattr(b, k)[i].item() for k in b.columns if k != "name_id"}

    def _rows(self) -> dict:
        if self._index is None:
            b = self._batch
            self._index = {(n, int(r)): i for i, (n, r) in enumerate(zip(b.names, b.rank))}
        return self._index

    def __repr__(self) -> str:
        return f"StepView(step={self.step}, mode={self.mode}, tensors={len(self._batch)})"


class StepBlock:
    """Consecutive committed steps of one mode and one layout (for :meth:`Rule.fast_forward`).

    Every step of a block has the same rows (tensor names and ranks, in the same order), so a
    statistics column is a 2-D array ``(steps, rows)``: ``block.l1[k, j]`` is the ``l1`` of
    row ``j`` at the ``k``-th step of the block.

    Attributes:
        steps: Global step of each step of the block (ascending).
        mode: Mode of every step of the block.
        mode_steps: Step within the mode of each step.
        names: Tensor name of each row.
        rank: Rank of each row (1-D).

    """

    def __init__(
        self,
        engine: Any,
        cols: dict,
        base: int,
        width: int,
        steps: np.ndarray,
        mode: Mode,
        mode_steps: np.ndarray,
        names: list,
    ) -> None:
        self._engine = engine
        self._all = cols
        self._base = base
        self.width = width
        self.steps = steps
        self.mode = mode
        self.mode_steps = mode_steps
        self.names = names
        self._views: dict = {}

    def __len__(self) -> int:
        return len(self.steps)

    def column(self, key: str) -> np.ndarray:
        """Statistics column ``key`` as a ``(steps, rows)`` array (a view, do not modify)."""
        v = self.__dict__.get(key)
        if v is None:
            n, w = len(self.steps), self.width
            v = self._all[key][self._base : self._base + n * w].reshape(n, w)
            self.__dict__[key] = v
        return v

    def __getattr__(self, key: str) -> np.ndarray:
        if key.startswith("_") or key not in self._all:
            raise AttributeError(key)
        if key == "rank":
            v = self._all["rank"][self._base : self._base + self.width]
            self.__dict__["rank"] = v
            return v
        return self.column(key)

    def finite(self) -> np.ndarray:
        """Finite element count of each row at each step (``numel - nan - posinf - neginf``)."""
        v = self.__dict__.get("_finite")
        if v is None:
            v = self.numel - self.nonfinite()
            self.__dict__["_finite"] = v
        return v

    def nonfinite(self) -> np.ndarray:
        """NaN and infinity count of each row at each step."""
        v = self.__dict__.get("_nonfinite")
        if v is None:
            v = self.nan + self.posinf + self.neginf
            self.__dict__["_nonfinite"] = v
        return v

    def view(self, k: int) -> StepView:
        """The :class:`StepView` of the ``k``-th step of the block (as ``evaluate`` gets it)."""
        v = self._views.get(k)
        if v is None:
            lo = self._base + k * self.width
            batch = StatsBatch(self.names, self._all, lo, lo + self.width)
            engine = self._engine
            v = StepView(
                engine.run, int(self.steps[k]), self.mode, int(self.mode_steps[k]), batch, engine
            )
            if len(self._views) > 64:
                self._views.clear()
            self._views[k] = v
        return v

    def __repr__(self) -> str:
        return (
            f"StepBlock(steps {int(self.steps[0])}..{int(self.steps[-1])}, {self.mode}, "
            f"{len(self)} steps x {self.width} rows)"
        )


class Rule:
    """Base class of rules. Subclasses set :attr:`needs` and implement :meth:`evaluate`.

    Parameters are keyword arguments of ``__init__``; the engine calls :meth:`evaluate` for
    every committed step in order (skipping steps whose mode is not in ``needs.modes``) and
    keeps the object between steps, so a rule may keep state in attributes.

    Example:
        >>> class BigLoss(tv.Rule):
        ...     needs = tv.Needs(collections=["losses"])
        ...     def evaluate(self, step):
        ...         b = step.batch(collection="losses")
        ...         if len(b) and b.max.max() > 100:
        ...             return self.finding(step, "loss above 100", {"loss": b.max.max()})

    """

    needs: Needs = Needs()
    severity: str = "warning"

    def __init__(self, **params: Any) -> None:
        if params:
            raise InvalidArgumentError(
                f"{type(self).__name__} got unknown parameter(s): {', '.join(sorted(params))}"
            )

    @property
    def name(self) -> str:
        """The rule's name (its class name)."""
        return type(self).__name__

    def evaluate(self, step: StepView) -> Union[Finding, Sequence[Finding], None]:
        """Checks one step; returns a finding (or several) when the condition holds."""
        raise NotImplementedError(f"{self.name} does not implement evaluate()")

    def fast_forward(self, block: StepBlock, start: int) -> int:
        """Optional fast path: skips the steps of ``block`` at which nothing can be found.

        Returns the index (``>= start``) of the first step of the block from ``start`` on at
        which the engine must call :meth:`evaluate`, or ``len(block)``. For every step skipped
        the rule must leave its state exactly as :meth:`evaluate` would have left it after
        returning no finding (updating it itself when :meth:`evaluate` would have). The default
        skips nothing.
        """
        return start

    def finding(
        self,
        step: StepView,
        message: str,
        evidence: Optional[dict] = None,
        severity: Optional[str] = None,
    ) -> Finding:
        """Builds a fired :class:`Finding` of this rule at ``step``."""
        return Finding(
            rule=self.name,
            step=step.step,
            mode=str(step.mode),
            mode_step=step.mode_step,
            message=message,
            severity=severity or self.severity,
            evidence=dict(evidence or {}),
        )

    def params(self) -> dict:
        """The rule's parameters (public attributes set in ``__init__``)."""
        return {
            k: v
            for k, v in vars(self).items()
            if not k.startswith("_") and k not in ("needs", "severity")
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{self.name}({args})"
