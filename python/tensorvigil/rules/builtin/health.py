"""Training-health rules for deep learning (catalogue: RULES.md, details: docs/rules/health.md).

Every rule here is *edge-triggered*: it reports a condition once when it starts to hold for a
key (a tensor, a layer, a loss series) and again only after the condition has cleared for that
key, so a run that stays broken yields one finding, not one per step. One finding may cover
several tensors; its evidence lists them with their values and the thresholds.

Rules read the statistics columns of a step (:meth:`StepView.batch`) vectorised; only the rules
marked *values* in the catalogue (SaturatedActivation, DeadRelu, WeightUpdateRatio,
UnchangedTensor, and SimilarAcrossRuns when both runs stored values) read raw tensors, and
only the tensors they inspect.

Tensor selection (``tensor_regex=`` / ``collections=``): a tensor is inspected when it belongs
to one of the collections **or** matches the regular expression (``re.search``), the union, as
in SageMaker Debugger. Rules with a built-in default collection (gradients, weights, losses,
relu/tanh/sigmoid inputs/outputs) fall back to a name pattern when the run has no
``collections.json`` (a run written with :class:`tensorvigil.StoreWriter` directly).
"""

from __future__ import annotations

import itertools
import math
import os
import re
import time
import weakref
from typing import Any, Optional, Sequence, Union

import numpy as np

from ...errors import InvalidArgumentError, NotFoundError
from ...modes import Mode, to_mode
from ..base import Finding, Needs, Rule, StatsBatch, StepBlock, StepView
from ._params import bad as _bad
from ._params import number as _number
from ._params import regex as _regex
from .literature import _Edge

__all__ = [
    "AllZero",
    "DeadRelu",
    "ExplodingTensor",
    "LossNotDecreasing",
    "Overfit",
    "Overtraining",
    "PoorWeightInitialization",
    "SaturatedActivation",
    "SimilarAcrossRuns",
    "StalledTraining",
    "TensorVariance",
    "UnchangedTensor",
    "VanishingGradient",
    "WeightUpdateRatio",
]

#: Name patterns used when the run has no ``collections.json`` (names the hooks write).
_GRAD_RE = r"/grad$"
_WEIGHT_RE = r"^[^/]*weight$"
_LOSS_RE = r"^loss"
#: Loss names that hold a validation loss even in a train-mode step (``loss/eval`` ...).
_VAL_NAME = re.compile(r"(?:^|/)(?:eval|val|valid|validation|test)$")
#: Exponent-histogram layout (cpp/include/tensorvigil/stats/stats.h).
_EXP_BIAS = 127
_MAX_LISTED = 5


# -- parameter checks -----------------------------------------------------------------------------


def _collections(rule: str, param: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple, set, frozenset)) or not all(
        isinstance(c, str) and c for c in value
    ):
        raise _bad(rule, param, "must be a collection name or a list of names", value)
    return tuple(value)


def _band(rule: str, param: str, value: Any) -> tuple[float, float]:
    try:
        lo, hi = value
    except (TypeError, ValueError):
        raise _bad(rule, param, "must be a (low, high) pair", value) from None
    lo = _number(rule, param, lo)
    hi = _number(rule, param, hi)
    if not lo < hi:
        raise _bad(rule, param, "must satisfy low < high", value)
    return (lo, hi)


def _percent(rule: str, param: str, value: Any) -> float:
    v = _number(rule, param, value, lo=0.0)
    if v > 100.0:
        raise _bad(rule, param, "must be a percentage in [0, 100]", value)
    return v


# -- selection ------------------------------------------------------------------------------------

# (names list object of the current step's batch, its layout id): the rules of one step share
# it; the layout id numbers distinct name sequences, so selections are cached per layout
# without hashing every name once per rule and step.
_LAYOUT: tuple = (None, -1)
_LAYOUT_IDS: dict = {}
_LAYOUT_COUNTER = itertools.count()


def _layout_id(b: StatsBatch) -> int:
    global _LAYOUT
    cached = _LAYOUT
    if cached[0] is b.names:
        return cached[1]
    key = tuple(b.names)
    lid = _LAYOUT_IDS.get(key)
    if lid is None:
        if len(_LAYOUT_IDS) > 4096:
            _LAYOUT_IDS.clear()
        lid = _LAYOUT_IDS[key] = next(_LAYOUT_COUNTER)  # never reused, even after a clear
    _LAYOUT = (b.names, lid)
    return lid


def _collection_sets(step: StepView, collections: Sequence[str]) -> list[set]:
    # StepView has no public accessor for the engine's collection map; batch(collection=...)
    # would re-filter every name of every step in Python (see docs/rules/health.md).
    engine = getattr(step, "_engine", None)
    get = getattr(engine, "collection_names", None)
    if get is None:
        return [set(step.names(collection=c)) for c in collections]
    return [get(c) for c in collections]


class _Select:
    """Rows of a step's batch chosen by collections and/or regex (union), cached per layout."""

    def __init__(
        self,
        collections: Sequence[str] = (),
        regex: Optional[str] = None,
        fallback: Optional[str] = None,
        everything: bool = False,
    ) -> None:
        self.collections = tuple(collections)
        self.pat = re.compile(regex) if regex else None
        self.fallback = re.compile(fallback) if fallback else None
        self.everything = everything and not self.collections and self.pat is None
        self._cache: dict = {}

    def index(self, step: StepView) -> np.ndarray:
        b = step.batch()
        if self.everything:
            return np.arange(len(b))
        sets = _collection_sets(step, self.collections)
        key = (_layout_id(b), tuple(len(s) for s in sets))
        idx = self._cache.get(key)
        if idx is None:
            names = b.names
            if len(self._cache) > 64:
                self._cache.clear()
            allowed: set = set().union(*sets) if sets else set()
            pat = self.pat
            if pat is None and not allowed:
                pat = self.fallback
            idx = np.flatnonzero(
                np.fromiter(
                    (n in allowed or (pat is not None and bool(pat.search(n))) for n in names),
                    dtype=bool,
                    count=len(names),
                )
            )
            self._cache[key] = idx
        return idx

    def members(self, step: StepView, collection: str) -> set:
        """Names of ``collection`` (for per-tensor decisions such as tanh vs sigmoid)."""
        return _collection_sets(step, [collection])[0]


class _Derived:
    """Columns derived once per step and shared by the rules evaluating that step."""

    __slots__ = ("finite", "nonfinite", "mean_abs", "multi_rank")

    def __init__(self, b: StatsBatch) -> None:
        self.nonfinite = b.nan + b.posinf + b.neginf
        self.finite = (b.numel - self.nonfinite).astype(np.int64)
        self.mean_abs = b.l1 / np.maximum(self.finite, 1)  # no errstate: it costs microseconds
        self.mean_abs[self.finite == 0] = np.nan
        self.multi_rank = bool(len(b) and b.rank.any())


def _derived(b: StatsBatch) -> _Derived:
    """The derived columns of a batch, computed once and kept on it (rules share the batch)."""
    d = b.__dict__.get("_tv_derived")
    if d is None:
        d = b.__dict__["_tv_derived"] = _Derived(b)
    return d


def _first_hit(start: int, mask: np.ndarray, n: int) -> int:
    """``start`` + the first row of a (steps, ...) mask with any true element, else ``n``."""
    if mask.ndim > 1:
        mask = mask.any(axis=tuple(range(1, mask.ndim)))
    rows = np.flatnonzero(mask)
    return start + int(rows[0]) if len(rows) else n


def _first_rank_rows(b: StatsBatch, idx: np.ndarray) -> np.ndarray:
    """The rows of ``idx`` of the lowest rank present (values rules read one rank)."""
    if not len(idx) or not _derived(b).multi_rank:
        return idx
    ranks = b.rank[idx]
    return idx[ranks == ranks.min()]


def _keys(b: StatsBatch, idx: np.ndarray) -> list[tuple[str, int]]:
    """(name, rank) of the rows ``idx``."""
    names = b.names
    return [(names[i], r) for i, r in zip(idx.tolist(), b.rank[idx].tolist())]


def _label(name: str, rank: int) -> str:
    return name if rank == 0 else f"{name}@rank{rank}"


def _listing(items: Sequence[tuple[str, Any]], fmt: str = "{:.3g}") -> str:
    parts = [f"{n} ({fmt.format(v) if isinstance(v, float) else v})" for n, v in items]
    if len(parts) > _MAX_LISTED:
        parts = parts[:_MAX_LISTED] + [f"and {len(items) - _MAX_LISTED} more"]
    return ", ".join(parts)


# -- losses ---------------------------------------------------------------------------------------


def _loss_values(step: StepView, sel: _Select) -> dict[str, float]:
    """Each loss tensor of the step (mean over ranks); NaN when a loss has no finite value."""
    b = step.batch()
    idx = sel.index(step)
    if not len(idx):
        return {}
    numel_col, mean_col, nan_col = b.numel, b.mean, b.nan
    pinf_col, ninf_col = b.posinf, b.neginf
    out: dict[str, list] = {}
    names = b.names
    for i in idx.tolist():
        mean, nan = mean_col.item(i), nan_col.item(i)
        if nan:
            v = math.nan
        elif numel_col.item(i) - pinf_col.item(i) - ninf_col.item(i) > 0:
            v = mean
        else:  # only infinities: report them as such
            v = math.inf if pinf_col.item(i) >= ninf_col.item(i) else -math.inf
        out.setdefault(names[i], []).append(v)
    return {k: (v[0] if len(v) == 1 else sum(v) / len(v)) for k, v in out.items()}


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


#: Relative change of a loss's window mean below which the loss counts as flat (rounding).
_FLAT_RTOL = 1e-4


def _sem(values: Sequence[float]) -> float:
    """Standard error of the mean of ``values`` (sample std with ddof=1; 0 for one value)."""
    n = len(values)
    if n < 2:
        return 0.0
    m = _mean(values)
    return math.sqrt(math.fsum((v - m) ** 2 for v in values) / (n - 1) / n)


def _not_decreasing(
    before: Sequence[float], now: Sequence[float], diff_percent: float, significance: float
) -> tuple[bool, dict]:
    """Noise-aware "the loss did not drop by more than ``diff_percent`` %" test.

    Compares the mean of ``now`` with the mean of ``before`` (a window of losses, or one
    loss). The drop ``(before - now) / |before|`` must be at most ``diff_percent`` % (the
    SageMaker condition) **and** the excess of ``now`` over the required level
    ``before * (1 - diff_percent / 100)`` must be at least ``significance`` standard errors
    of the difference of the two means, so a flat noise-free loss (standard error 0) counts
    while a difference explained by mini-batch noise does not. A change of at most
    ``_FLAT_RTOL`` (relative) counts as flat whatever the noise: a loss that only moves by
    float rounding has not decreased. When ``before`` is one value its noise is taken as the
    per-value spread of ``now``.
    """
    ref, cur = _mean(before), _mean(now)
    se_now = _sem(now)
    if len(before) >= 2:
        se_ref = _sem(before)
    else:
        se_ref = se_now * math.sqrt(len(now))  # one value: the spread of a single loss
    se = math.hypot(se_ref, se_now)
    if ref != 0:
        drop = (ref - cur) / abs(ref) * 100.0
    else:
        drop = 0.0 if cur == 0 else (-math.inf if cur > 0 else math.inf)
    target = ref - abs(ref) * diff_percent / 100.0
    excess = cur - target
    flat = abs(cur - ref) <= _FLAT_RTOL * abs(ref)
    flag = (not drop > diff_percent) and (flat or excess >= significance * se)
    return flag, {
        "reference_loss": ref,
        "loss": cur,
        "drop_percent": drop,
        "standard_error": se,
        "excess": excess,
    }


def _split_losses(step: StepView, losses: dict[str, float]) -> tuple[list, list]:
    """(train, validation) loss values of a step.

    Eval-mode steps and ``loss/eval``-style names are validation; predict steps are neither.
    """
    train, val = [], []
    for name, v in losses.items():
        if step.mode == Mode.EVAL or _VAL_NAME.search(name):
            val.append(v)
        elif step.mode != Mode.PREDICT:
            train.append(v)
    return train, val


def _loss_select(use_collection: bool = True, regex: Optional[str] = None) -> _Select:
    if use_collection:
        return _Select(("losses",), regex, fallback=_LOSS_RE)
    return _Select((), regex or _LOSS_RE)


# == rules ========================================================================================


class VanishingGradient(Rule):
    """Fires when the mean absolute value of a gradient tensor falls below ``threshold``.

    Reads statistics only (``l1 / finite count`` of every tensor of the ``gradients``
    collection, or of names ending in ``/grad`` when the run has no collections file).
    Gradient tensors with fewer than ``min_elements`` elements (biases, normalisation
    parameters) are left out while the step has larger gradient tensors: the gradient of a
    32-element LayerNorm bias of a converged model can legitimately average below 1e-7,
    while vanishing gradients show on the weight matrices. When every gradient tensor is
    small, all are inspected. Edge-triggered per gradient tensor.

    Args:
        threshold: Mean |gradient| below which a gradient is vanishing.
        min_elements: Gradient tensors with fewer elements are skipped (see above).

    """

    needs = Needs(collections=["gradients"], regex=_GRAD_RE)

    def __init__(self, threshold: float = 1e-7, min_elements: int = 100) -> None:
        super().__init__()
        self.threshold = _number(self.name, "threshold", threshold, lo=0.0)
        self.min_elements = _number(self.name, "min_elements", min_elements, integer=True, lo=0)
        self._sel = _Select(("gradients",), fallback=_GRAD_RE)
        self._edge = _Edge()

    def fast_forward(self, block: StepBlock, start: int) -> int:
        """Skips the steps where no inspected gradient is below the threshold."""
        if self._edge.active:
            return start
        idx = self._sel.index(block.view(start))
        if not len(idx):
            return len(block)
        big = block.numel[start:, idx] >= self.min_elements
        use = big | ~big.any(axis=1, keepdims=True)
        fin = block.finite()[start:, idx]
        with np.errstate(divide="ignore", invalid="ignore"):
            ma = block.l1[start:, idx] / np.maximum(fin, 1)
        return _first_hit(start, (ma < self.threshold) & (fin > 0) & use, len(block))

    def evaluate(self, step: StepView) -> Optional[Finding]:
        """Checks the gradients saved at ``step``."""
        b = step.batch()
        idx = self._sel.index(step)
        if not len(idx):
            return None
        big = b.numel[idx] >= self.min_elements
        if big.any():
            idx = idx[big]
        ma = _derived(b).mean_abs[idx]
        hitmask = ma < self.threshold  # NaN compares false
        if not self._edge.active and not hitmask.any():
            return None
        hit = idx[hitmask]
        new = self._edge.update(_keys(b, hit), lambda: set(_keys(b, idx)))
        if not new:
            return None
        newset = set(new)
        vals = {
            _label(*k): float(v) for k, v in zip(_keys(b, hit), ma[hitmask].tolist()) if k in newset
        }
        return self.finding(
            step,
            f"{len(vals)} gradient tensor(s) have a mean absolute value below "
            f"{self.threshold:g}: {_listing(list(vals.items()))}",
            {"threshold": self.threshold, "tensors": list(vals), "mean_abs": vals},
        )


class ExplodingTensor(Rule):
    """Fires when an inspected tensor holds NaN (or +-Inf, unless ``only_nan``).

    Reads the ``nan`` / ``posinf`` / ``neginf`` counts of the statistics. Severity ``error``.
    Edge-triggered per tensor.

    Args:
        only_nan: Only NaN counts; infinities are ignored.
        tensor_regex: Inspect tensors whose name matches (default: every captured tensor).
        collections: Inspect tensors of these collections (union with ``tensor_regex``).

    """

    severity = "error"
    needs = Needs()

    def __init__(
        self,
        only_nan: bool = False,
        tensor_regex: Optional[str] = None,
        collections: Optional[Union[str, Sequence[str]]] = None,
    ) -> None:
        super().__init__()
        self.only_nan = bool(only_nan)
        self.tensor_regex = _regex(self.name, "tensor_regex", tensor_regex, optional=True)
        self.collections = list(_collections(self.name, "collections", collections))
        if self.collections or self.tensor_regex:
            self.needs = Needs(collections=self.collections, regex=self.tensor_regex)
        self._sel = _Select(self.collections, self.tensor_regex, everything=True)
        self._edge = _Edge()

    def fast_forward(self, block: StepBlock, start: int) -> int:
        """Skips the steps where no tensor holds NaN (or Inf)."""
        if self._edge.active:
            return start
        col = block.nan if self.only_nan else block.nonfinite()
        return _first_hit(start, col[start:] > 0, len(block))

    def evaluate(self, step: StepView) -> Optional[Finding]:
        """Checks the NaN/Inf counts of the tensors saved at ``step``."""
        b = step.batch()
        col = b.nan if self.only_nan else _derived(b).nonfinite
        if not self._edge.active and not col.any():
            return None
        idx = self._sel.index(step)
        if not len(idx):
            return None
        hit = idx[col[idx] > 0]
        new = self._edge.update(_keys(b, hit), lambda: set(_keys(b, idx)))
        if not new:
            return None
        newset = set(new)
        counts = {}
        for i in hit.tolist():
            key = (b.names[i], int(b.rank[i]))
            if key in newset:
                counts[_label(*key)] = {
                    "nan": int(b.nan[i]),
                    "posinf": int(b.posinf[i]),
                    "neginf": int(b.neginf[i]),
                    "numel": int(b.numel[i]),
                }
        what = "NaN" if self.only_nan else "NaN or Inf"
        short = [(n, f"{c['nan']} NaN, {c['posinf'] + c['neginf']} Inf") for n, c in counts.items()]
        return self.finding(
            step,
            f"{len(counts)} tensor(s) hold {what} values: {_listing(short)}",
            {"only_nan": self.only_nan, "tensors": list(counts), "counts": counts},
        )


class PoorWeightInitialization(Rule):
    """Detects a poorly initialised model in the first ``steps`` saved training steps.

    Three checks, each reported once:

    - activation-input variance: ``max/min`` of the per-layer variance of activation inputs
      (tensors of the ``relu_input`` collection and names matching
      ``activation_inputs_regex``) exceeds ``threshold`` (needs at least two layers) at more
      than half of the ``steps`` inspected steps (a majority: a default initialisation whose
      ratio sits near the threshold for the first few steps and then drifts down is not
      reported; a bad one stays far above it). It fires at the step that makes the majority;
    - gradient spread: the 5th-95th percentile spread of the gradient tensors is below
      ``distribution_range`` for the majority of the gradient tensors with at least
      ``min_elements`` elements at a step (a 2-element bias or one quiet tensor of a healthy
      LSTM or transformer is not a poor initialisation). From statistics only: the spread is
      at most ``max - min``, and at most ``2 * q95(|g|)``, whose upper bound is read from the
      exponent histogram (``exp_hist``, upper edge of the bucket holding the 95th percentile
      of ``|g|``); with a fixed-bin histogram the percentiles are interpolated in it. The
      bounds are conservative (never fire on a spread that is really above the range);
    - loss: the training loss does not decrease within ``patience`` saved steps: the mean of
      the last ``patience`` losses is not below the mean of the ``patience`` before by more
      than ``significance`` standard errors of their difference (noise-aware, as in
      :class:`LossNotDecreasing`; a noise-free plateau always counts).

    Args:
        activation_inputs_regex: Names of activation inputs (besides the ``relu_input``
            collection, whose hook names are ``<module>/input``).
        threshold: Largest accepted ratio of activation-input variances across layers.
        distribution_range: Smallest accepted 5th-95th percentile spread of a gradient.
        patience: Saved training steps within which the loss must decrease.
        steps: Number of saved training steps the rule inspects (then it is idle).
        min_elements: Gradient tensors with fewer elements are left out of the spread check.
        significance: Standard errors by which the loss must fail to decrease.

    """

    needs = Needs(collections=["gradients", "relu_input", "losses"], regex=_GRAD_RE)

    def __init__(
        self,
        activation_inputs_regex: str = ".*relu_input",
        threshold: float = 10.0,
        distribution_range: float = 0.001,
        patience: int = 5,
        steps: int = 10,
        min_elements: int = 100,
        significance: float = 2.0,
    ) -> None:
        super().__init__()
        n = self.name
        self.activation_inputs_regex = _regex(
            n, "activation_inputs_regex", activation_inputs_regex, optional=True
        )
        self.threshold = _number(n, "threshold", threshold, lo=1.0)
        self.distribution_range = _number(n, "distribution_range", distribution_range, lo=0)
        self.patience = _number(n, "patience", patience, integer=True, lo=1)
        self.steps = _number(n, "steps", steps, integer=True, lo=1)
        self.min_elements = _number(n, "min_elements", min_elements, integer=True, lo=2)
        self.significance = _number(n, "significance", significance, lo=0.0)
        self._act = _Select(("relu_input",), self.activation_inputs_regex)
        self._grad = _Select(("gradients",), fallback=_GRAD_RE)
        self._loss = _loss_select()
        self._seen = 0
        self._losses: list[float] = []
        self._ratios: list[float] = []
        self._reported: set = set()

    def fast_forward(self, block: StepBlock, start: int) -> int:
        """Skips everything after the first ``steps`` training steps (and other modes)."""
        if block.mode not in (Mode.TRAIN, Mode.GLOBAL) or self._seen >= self.steps:
            return len(block)
        return start

    def evaluate(self, step: StepView) -> Optional[list[Finding]]:
        """Runs the three checks on the first ``steps`` saved training steps."""
        if step.mode not in (Mode.TRAIN, Mode.GLOBAL) or self._seen >= self.steps:
            return None
        self._seen += 1
        out = [f for f in (self._variance(step), self._spread(step), self._loss_check(step)) if f]
        return out or None

    def _variance(self, step: StepView) -> Optional[Finding]:
        if "variance" in self._reported:
            return None
        b = step.batch()
        idx = _first_rank_rows(b, self._act.index(step))
        var = {b.names[i]: float(b.var[i]) for i in idx.tolist() if np.isfinite(b.var[i])}
        if len(var) < 2:
            return None
        hi, lo = max(var.values()), min(var.values())
        if hi <= 0:
            return None
        ratio = hi / lo if lo > 0 else math.inf
        self._ratios.append(ratio)
        above = sum(1 for r in self._ratios if r > self.threshold)
        if not (ratio > self.threshold and 2 * above > self.steps):
            return None
        self._reported.add("variance")
        return self.finding(
            step,
            f"activation-input variance differs by a factor {ratio:.3g} across layers "
            f"(threshold {self.threshold:g}) at {above} of the first {len(self._ratios)} "
            "steps: the weights are probably poorly initialised",
            {
                "check": "activation_variance",
                "threshold": self.threshold,
                "ratio": ratio,
                "ratios": list(self._ratios),
                "steps_above": above,
                "variance": var,
            },
        )

    def _spread(self, step: StepView) -> Optional[Finding]:
        b = step.batch()
        idx = _first_rank_rows(b, self._grad.index(step))
        if "spread" in self._reported:
            return None
        spreads: dict[str, float] = {}
        methods: dict[str, str] = {}
        eligible = 0
        for i in idx.tolist():
            name = b.names[i]
            if b.numel[i] - b.nan[i] < self.min_elements:
                continue
            eligible += 1
            bound = float(b.max[i] - b.min[i])
            method = "max-min"
            if not bound < self.distribution_range:
                est = self._hist_spread(step, name, int(b.rank[i]))
                if est is not None:
                    bound, method = est
            if bound < self.distribution_range:
                spreads[name] = bound
                methods[name] = method
        if not 2 * len(spreads) > eligible:
            return None
        self._reported.add("spread")
        return self.finding(
            step,
            f"{len(spreads)} of {eligible} gradient tensor(s) have a 5th-95th percentile spread "
            f"below {self.distribution_range:g}: {_listing(list(spreads.items()))}",
            {
                "check": "gradient_spread",
                "distribution_range": self.distribution_range,
                "min_elements": self.min_elements,
                "inspected": eligible,
                "tensors": list(spreads),
                "spread": spreads,
                "method": methods,
            },
        )

    @staticmethod
    def _hist_spread(step: StepView, name: str, rank: int) -> Optional[tuple[float, str]]:
        s = step.stats(name, rank)
        hist = s.hist
        if hist is not None and len(hist):
            counts = np.concatenate(([s.hist_below], hist, [s.hist_above])).astype(np.float64)
            edges = np.concatenate(([s.min], s.hist_edges, [s.max]))
            edges = np.maximum.accumulate(np.nan_to_num(edges, nan=s.hist_edges[0]))
            cum = np.concatenate(([0.0], np.cumsum(counts)))
            total = cum[-1]
            if total <= 0:
                return None
            p5, p95 = np.interp([0.05 * total, 0.95 * total], cum, edges)
            return float(p95 - p5), "histogram"
        exp = s.exp_hist
        if exp is not None and len(exp):
            total = float(s.zeros) + float(exp.sum())
            if total <= 0:
                return None
            cum = float(s.zeros) + np.cumsum(exp, dtype=np.float64)
            if s.zeros >= 0.95 * total:
                return 0.0, "exp_hist"
            k = int(np.searchsorted(cum, 0.95 * total))
            if k >= len(exp) - 1:
                return None
            upper = 2.0 ** (k - _EXP_BIAS + 1)
            return min(2.0 * upper, float(s.max - s.min)), "exp_hist"
        return None

    def _loss_check(self, step: StepView) -> Optional[Finding]:
        if "loss" in self._reported:
            return None
        train, _ = _split_losses(step, _loss_values(step, self._loss))
        train = [v for v in train if math.isfinite(v)]
        if not train:
            return None
        self._losses.append(_mean(train))
        p = self.patience
        if len(self._losses) < 2 * p:
            return None
        before, now = self._losses[-2 * p : -p], self._losses[-p:]
        flag, det = _not_decreasing(before, now, 0.0, self.significance)
        if not flag:
            return None
        self._reported.add("loss")
        return self.finding(
            step,
            f"the training loss did not decrease within {p} saved steps (mean "
            f"{det['reference_loss']:.4g} -> {det['loss']:.4g}): the weights may be poorly "
            "initialised",
            {
                "check": "loss",
                "patience": p,
                "significance": self.significance,
                **det,
                "losses": self._losses[-2 * p :],
            },
        )


class _ActivityRule(Rule):
    """Shared machinery of DeadRelu and SaturatedActivation (values rules).

    A *unit* is one element position of the tensor without its first (batch) dimension; its
    activity is the share of the samples (the first dimension) for which it is active,
    accumulated over the last ``window`` saved steps of the tensor (the layer is judged once
    that many steps are there). A tensor of one dimension or less has one sample per
    element.
    """

    _collections_used: tuple[str, ...] = ()

    def __init__(
        self,
        tensor_regex: str,
        threshold_inactivity: float,
        threshold_layer: float,
        window: int = 1,
    ):
        super().__init__()
        self.tensor_regex = _regex(self.name, "tensor_regex", tensor_regex, optional=True)
        self.threshold_inactivity = _percent(
            self.name, "threshold_inactivity", threshold_inactivity
        )
        self.threshold_layer = _percent(self.name, "threshold_layer", threshold_layer)
        self.window = _number(self.name, "window", window, integer=True, lo=1)
        self.needs = Needs(
            collections=list(self._collections_used), regex=self.tensor_regex, values=True
        )
        self._sel = _Select(self._collections_used, self.tensor_regex)
        self._edge = _Edge()
        # name -> list of [step, rank, may_fire, (active counts per unit, samples) or None]
        self._hist: dict[str, list] = {}

    def _active(self, step: StepView, name: str, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _may_fire(self, b: StatsBatch, idx: np.ndarray, step: StepView) -> np.ndarray:
        """Mask of the rows ``idx`` that the statistics cannot clear (values are read)."""
        return np.ones(len(idx), dtype=bool)

    def _counts(self, step: StepView, name: str, x: np.ndarray) -> tuple[np.ndarray, int]:
        act = self._active(step, name, x)
        if act.ndim >= 2:
            return act.reshape(act.shape[0], -1).sum(axis=0), int(act.shape[0])
        return act.reshape(-1).astype(np.int64), 1

    def fast_forward(self, block: StepBlock, start: int) -> int:
        """Skips the steps where no inspected tensor has stored values."""
        view = block.view(start)
        idx = _first_rank_rows(view.batch(), self._sel.index(view))
        if not len(idx):
            return len(block)
        ok = block.has_value[start:, idx] & (block.numel[start:, idx] > 0)
        return _first_hit(start, ok, len(block))

    def _scan(self, step: StepView) -> tuple[dict, Any]:
        b = step.batch()
        idx = _first_rank_rows(b, self._sel.index(step))
        if not len(idx):
            return {}, set()
        valid = idx[b.has_value[idx] & (b.numel[idx] > 0)]
        if not len(valid):
            return {}, set()
        may = self._may_fire(b, valid, step)
        bad: dict[str, float] = {}
        judged: set = set()
        for i, rank, m in zip(valid.tolist(), b.rank[valid].tolist(), may.tolist()):
            name = b.names[i]
            hist = self._hist.setdefault(name, [])
            hist.append([step.step, rank, bool(m), None])
            del hist[: -self.window]
            if len(hist) < self.window:
                continue
            judged.add(name)
            if not any(e[2] for e in hist):
                continue  # the statistics prove no step of the window can make it dead
            total, samples = None, 0
            for e in hist:
                if e[3] is None:
                    if e[0] == step.step:
                        x = np.asarray(step.value(name, e[1]))
                    else:
                        x = np.asarray(step.run.tensor(name).value(e[0], e[1]))
                    e[3] = self._counts(step, name, x)
                cnt, n = e[3]
                if total is not None and cnt.shape != total.shape:
                    total, samples = None, 0  # the layer changed shape: restart the sum
                total = cnt.astype(np.int64) if total is None else total + cnt
                samples += n
            share = total / max(samples, 1)
            inactive = share * 100.0 < self.threshold_inactivity
            pct = 100.0 * float(inactive.mean())
            if pct > self.threshold_layer:
                bad[name] = pct
        return bad, judged

    def _report(self, step: StepView, what: str, extra: dict) -> Optional[Finding]:
        bad, observed = self._scan(step)
        new = self._edge.update(bad, observed)
        if not new:
            return None
        vals = {n: bad[n] for n in new}
        return self.finding(
            step,
            f"{len(vals)} layer(s) have more than {self.threshold_layer:g}% {what} units "
            f"(active < {self.threshold_inactivity:g}% of the samples): "
            f"{_listing([(n, f'{v:.1f}%') for n, v in vals.items()])}",
            {
                "threshold_inactivity": self.threshold_inactivity,
                "threshold_layer": self.threshold_layer,
                **extra,
                "tensors": list(vals),
                "inactive_percent": vals,
            },
        )


class SaturatedActivation(_ActivityRule):
    """Fires when too many units of a tanh/sigmoid layer sit in the saturated region.

    A unit is active when its input lies within the band (inclusive); it is saturated when it
    is active for less than ``threshold_inactivity`` % of the step's samples. Inspects the
    ``tanh_input`` and ``sigmoid_input`` collections and names matching ``tensor_regex``; the
    tanh band applies to ``tanh_input`` members and names containing ``tanh``, the sigmoid
    band to the rest. Reads values, except when the statistics prove every element in the band.

    Args:
        tensor_regex: Names of activation inputs (besides the collections).
        threshold_tanh: Non-saturated band ``(low, high)`` of tanh inputs.
        threshold_sigmoid: Non-saturated band ``(low, high)`` of sigmoid inputs.
        threshold_inactivity: Percent of samples below which a unit counts as saturated.
        threshold_layer: Percent of saturated units above which a layer is reported.

    """

    _collections_used = ("tanh_input", "sigmoid_input")
    needs = Needs(
        collections=["tanh_input", "sigmoid_input"],
        regex=".*tanh_input|.*sigmoid_input",
        values=True,
    )

    def __init__(
        self,
        tensor_regex: str = ".*tanh_input|.*sigmoid_input",
        threshold_tanh: Sequence[float] = (-9.4999, 9.4999),
        threshold_sigmoid: Sequence[float] = (-23, 16.99999),
        threshold_inactivity: float = 1.0,
        threshold_layer: float = 50.0,
    ) -> None:
        self.threshold_tanh = _band(type(self).__name__, "threshold_tanh", threshold_tanh)
        self.threshold_sigmoid = _band(type(self).__name__, "threshold_sigmoid", threshold_sigmoid)
        super().__init__(tensor_regex, threshold_inactivity, threshold_layer)
        self._bands: dict[str, tuple[float, float]] = {}

    def _band_of(self, step: StepView, name: str) -> tuple[float, float]:
        band = self._bands.get(name)
        if band is None:
            if name in self._sel.members(step, "tanh_input") or "tanh" in name:
                band = self.threshold_tanh
            elif name in self._sel.members(step, "sigmoid_input") or "sigmoid" in name:
                band = self.threshold_sigmoid
            else:
                band = self.threshold_tanh
            self._bands[name] = band
        return band

    def _may_fire(self, b: StatsBatch, idx: np.ndarray, step: StepView) -> np.ndarray:
        bands = np.array([self._band_of(step, b.names[i]) for i in idx.tolist()]).reshape(-1, 2)
        clean = _derived(b).nonfinite[idx] == 0
        inside = (b.min[idx] >= bands[:, 0]) & (b.max[idx] <= bands[:, 1])
        return ~(clean & inside)

    def _active(self, step: StepView, name: str, x: np.ndarray) -> np.ndarray:
        lo, hi = self._band_of(step, name)
        return (x >= lo) & (x <= hi)

    def evaluate(self, step: StepView) -> Optional[Finding]:
        """Checks the activation inputs saved at ``step``."""
        return self._report(
            step,
            "saturated",
            {
                "threshold_tanh": list(self.threshold_tanh),
                "threshold_sigmoid": list(self.threshold_sigmoid),
            },
        )


class DeadRelu(_ActivityRule):
    """Fires when too many ReLUs of a layer are dead (output > 0 for too few samples).

    Inspects the ``relu_output`` collection and names matching ``tensor_regex``. Reads values,
    except when the zero count proves the layer cannot be dead: a dead layer needs more than
    ``threshold_layer`` % of its units zero in at least ``100 - threshold_inactivity`` % of the
    samples, so a tensor (with no negative element) whose zero share is at most
    ``layer * (1 - inactivity)`` at every step of the window is skipped.

    A ReLU is active for a sample when its output is > 0. Its activity is accumulated over
    the last ``window`` saved steps (default 5) before it is judged, so a layer is first
    judged at its ``window``-th saved step: with 64-sample batches a healthy fully connected
    layer can have more than half of its units silent in one batch by chance (they fire on
    few inputs), which would make a single-step judgement flap; a dead unit stays silent for
    every sample of the window. ``window=1`` judges each step alone (the previous behaviour).

    Args:
        tensor_regex: Names of ReLU outputs (besides the ``relu_output`` collection).
        threshold_inactivity: Percent of samples below which a ReLU counts as dead.
        threshold_layer: Percent of dead ReLUs above which a layer is reported.
        window: Saved steps over which the activity of a ReLU is accumulated.

    """

    _collections_used = ("relu_output",)
    needs = Needs(collections=["relu_output"], regex=".*relu_output", values=True)

    def __init__(
        self,
        tensor_regex: str = ".*relu_output",
        threshold_inactivity: float = 1.0,
        threshold_layer: float = 50.0,
        window: int = 5,
    ) -> None:
        super().__init__(tensor_regex, threshold_inactivity, threshold_layer, window)

    def _may_fire(self, b: StatsBatch, idx: np.ndarray, step: StepView) -> np.ndarray:
        bound = (self.threshold_layer / 100.0) * (1.0 - self.threshold_inactivity / 100.0)
        return (b.min[idx] < 0) | (b.nan[idx] > 0) | (b.zeros[idx] > bound * b.numel[idx])

    def _active(self, step: StepView, name: str, x: np.ndarray) -> np.ndarray:
        return x > 0

    def evaluate(self, step: StepView) -> Optional[Finding]:
        """Checks the ReLU outputs saved at ``step``."""
        return self._report(step, "dead", {"window": self.window})


class WeightUpdateRatio(Rule):
    """Fires when the relative update of a weight is above or below its thresholds.

    The ratio is ``||w_t - w_prev|| / (||w_prev|| + epsilon)``, ``w_prev`` being the value of
    the same weight at its previous saved step; with ``num_steps`` set, pairs farther apart
    than ``num_steps`` steps are skipped. Reads the values of the
    ``weights`` collection (names ending in ``weight`` without a ``/`` when the run has no
    collections file) and keeps the previous value of each weight in memory (one copy of the
    inspected weights). Edge-triggered per weight.

    Args:
        num_steps: Largest step distance of a compared pair (``None``: any consecutive pair).
        large_threshold: Ratio above which an update is too large.
        small_threshold: Ratio below which an update is too small (weights not learning).
        epsilon: Added to ``||w_prev||`` to avoid dividing by zero.

    """

    needs = Needs(collections=["weights"], regex=_WEIGHT_RE, values=True)

    def __init__(
        self,
        num_steps: Optional[int] = None,
        large_threshold: float = 10.0,
        small_threshold: float = 1e-8,
        epsilon: float = 1e-9,
    ) -> None:
        super().__init__()
        n = self.name
        self.num_steps = _number(n, "num_steps", num_steps, integer=True, lo=1, optional=True)
        self.large_threshold = _number(n, "large_threshold", large_threshold, lo=0.0)
        self.small_threshold = _number(n, "small_threshold", small_threshold, lo=0.0)
        self.epsilon = _number(n, "epsilon", epsilon, lo=0.0)
        if self.small_threshold >= self.large_threshold:
            raise _bad(n, "small_threshold", "must be below large_threshold", small_threshold)
        self._sel = _Select(("weights",), fallback=_WEIGHT_RE)
        self._prev: dict[str, tuple[int, np.ndarray]] = {}
        self._edge = _Edge()

    def fast_forward(self, block: StepBlock, start: int) -> int:
        """Skips other modes and the steps where no inspected weight has stored values."""
        if block.mode not in (Mode.TRAIN, Mode.GLOBAL):
            return len(block)
        view = block.view(start)
        idx = _first_rank_rows(view.batch(), self._sel.index(view))
        if not len(idx):
            return len(block)
        ok = block.has_value[start:, idx] & (block.numel[start:, idx] > 0)
        return _first_hit(start, ok, len(block))

    def evaluate(self, step: StepView) -> Optional[Finding]:
        """Compares each weight saved at ``step`` with its previous saved value."""
        if step.mode not in (Mode.TRAIN, Mode.GLOBAL):
            return None
        b = step.batch()
        idx = _first_rank_rows(b, self._sel.index(step))
        if not len(idx):
            return None
        rows = idx[b.has_value[idx] & (b.numel[idx] > 0)]
        if not len(rows):
            return None
        bad: dict[str, float] = {}
        observed: set = set()
        for i, rank in zip(rows.tolist(), b.rank[rows].tolist()):
            name = b.names[i]
            cur = np.asarray(step.value(name, rank))
            prev = self._prev.get(name)
            self._prev[name] = (step.step, cur)
            if prev is None or prev[1].shape != cur.shape:
                continue
            if self.num_steps is not None and step.step - prev[0] > self.num_steps:
                continue
            p = prev[1].astype(np.float64, copy=False)
            delta = np.sqrt(np.sum(np.square(cur.astype(np.float64, copy=False) - p)))
            ratio = float(delta / (np.sqrt(np.sum(np.square(p))) + self.epsilon))
            if not np.isfinite(ratio):
                continue
            observed.add(name)
            if ratio > self.large_threshold or ratio < self.small_threshold:
                bad[name] = ratio
        new = self._edge.update(bad, observed)
        if not new:
            return None
        vals = {n: bad[n] for n in new}
        large = [n for n in new if vals[n] > self.large_threshold]
        kind = "too large" if len(large) == len(vals) else "too small" if not large else "off"
        return self.finding(
            step,
            f"{len(vals)} weight update ratio(s) are {kind} (outside "
            f"[{self.small_threshold:g}, {self.large_threshold:g}]): "
            f"{_listing(list(vals.items()))}",
            {
                "large_threshold": self.large_threshold,
                "small_threshold": self.small_threshold,
                "tensors": list(vals),
                "ratio": vals,
            },
        )


class TensorVariance(Rule):
    """Fires when a tensor's variance leaves ``[min_threshold, max_threshold]``.

    Reads the ``var`` statistic (population variance of the finite elements). At least one
    threshold is required. Edge-triggered per tensor.

    Args:
        tensor_regex: Inspect tensors whose name matches (default: every tensor).
        collections: Inspect tensors of these collections (union with ``tensor_regex``).
        max_threshold: Variance above which the rule fires.
        min_threshold: Variance below which the rule fires.

    """

    needs = Needs()

    def __init__(
        self,
        tensor_regex: Optional[str] = None,
        collections: Optional[Union[str, Sequence[str]]] = None,
        max_threshold: Optional[float] = None,
        min_threshold: Optional[float] = None,
    ) -> None:
        super().__init__()
        n = self.name
        self.tensor_regex = _regex(n, "tensor_regex", tensor_regex, optional=True)
        self.collections = list(_collections(n, "collections", collections))
        self.max_threshold = _number(n, "max_threshold", max_threshold, optional=True)
        self.min_threshold = _number(n, "min_threshold", min_threshold, optional=True)
        if self.max_threshold is None and self.min_threshold is None:
            raise InvalidArgumentError(f"{n}: give max_threshold and/or min_threshold")
        if (
            self.max_threshold is not None
            and self.min_threshold is not None
            and self.min_threshold > self.max_threshold
        ):
            raise _bad(n, "min_threshold", "must not exceed max_threshold", min_threshold)
        if self.collections or self.tensor_regex:
            self.needs = Needs(collections=self.collections, regex=self.tensor_regex)
        self._sel = _Select(self.collections, self.tensor_regex, everything=True)
        self._edge = _Edge()

    def _band_text(self) -> str:
        if self.min_threshold is None:
            return f"above {self.max_threshold:g}"
        if self.max_threshold is None:
            return f"below {self.min_threshold:g}"
        return f"outside [{self.min_threshold:g}, {self.max_threshold:g}]"

    def evaluate(self, step: StepView) -> Optional[Finding]:
        """Checks the variance of the tensors saved at ``step``."""
        b = step.batch()
        idx = self._sel.index(step)
        if not len(idx):
            return None
        var = b.var[idx]
        with np.errstate(invalid="ignore"):
            bad = np.zeros(len(idx), dtype=bool)
            if self.max_threshold is not None:
                bad |= var > self.max_threshold
            if self.min_threshold is not None:
                bad |= var < self.min_threshold
        if not self._edge.active and not bad.any():
            return None
        hit = idx[bad]
        new = self._edge.update(_keys(b, hit), lambda: set(_keys(b, idx)))
        if not new:
            return None
        newset = set(new)
        vals = {
            _label(b.names[i], int(b.rank[i])): float(b.var[i])
            for i in hit.tolist()
            if (b.names[i], int(b.rank[i])) in newset
        }
        return self.finding(
            step,
            f"{len(vals)} tensor(s) have a variance {self._band_text()}: "
            f"{_listing(list(vals.items()))}",
            {
                "min_threshold": self.min_threshold,
                "max_threshold": self.max_threshold,
                "tensors": list(vals),
                "variance": vals,
            },
        )


class AllZero(Rule):
    """Fires when at least ``threshold`` % of a tensor's values are zero.

    Reads the ``zeros`` and ``numel`` statistics. ``tensor_regex`` or ``collections`` is
    required. Edge-triggered per tensor.

    Args:
        tensor_regex: Inspect tensors whose name matches.
        collections: Inspect tensors of these collections (union with ``tensor_regex``).
        threshold: Percent of zero elements at or above which the rule fires.

    """

    def __init__(
        self,
        tensor_regex: Optional[str] = None,
        collections: Optional[Union[str, Sequence[str]]] = None,
        threshold: float = 100,
    ) -> None:
        super().__init__()
        n = self.name
        self.tensor_regex = _regex(n, "tensor_regex", tensor_regex, optional=True)
        self.collections = list(_collections(n, "collections", collections))
        if not self.collections and not self.tensor_regex:
            raise InvalidArgumentError(f"{n}: give tensor_regex or collections (one is required)")
        self.threshold = _percent(n, "threshold", threshold)
        self.needs = Needs(collections=self.collections, regex=self.tensor_regex)
        self._sel = _Select(self.collections, self.tensor_regex)
        self._edge = _Edge()

    def evaluate(self, step: StepView) -> Optional[Finding]:
        """Checks the zero share of the tensors saved at ``step``."""
        b = step.batch()
        idx = self._sel.index(step)
        if not len(idx):
            return None
        numel = b.numel[idx]
        pct = 100.0 * b.zeros[idx] / np.maximum(numel, 1)
        bad = (numel > 0) & (pct >= self.threshold)
        if not self._edge.active and not bad.any():
            return None
        hit = idx[bad]
        new = self._edge.update(_keys(b, hit), lambda: set(_keys(b, idx)))
        if not new:
            return None
        newset = set(new)
        vals = {
            _label(b.names[i], int(b.rank[i])): 100.0 * float(b.zeros[i]) / float(b.numel[i])
            for i in hit.tolist()
            if (b.names[i], int(b.rank[i])) in newset
        }
        return self.finding(
            step,
            f"{len(vals)} tensor(s) are at least {self.threshold:g}% zeros: "
            f"{_listing([(k, f'{v:.1f}%') for k, v in vals.items()])}",
            {"threshold": self.threshold, "tensors": list(vals), "zero_percent": vals},
        )


class UnchangedTensor(Rule):
    """Fires when a tensor stays ``allclose`` over its last ``num_steps`` saved steps.

    Each saved value is compared with the previous saved value of the same tensor
    (``numpy.allclose(current, previous, rtol, atol, equal_nan)``); the rule fires when
    ``num_steps - 1`` consecutive comparisons hold. Statistics serve as a digest that can only
    prove a change (numel, NaN/Inf counts, or min/max/mean moved by more than the tolerance),
    never sameness: values are read only when the digest cannot tell. ``tensor_regex`` or
    ``collections`` is required. Edge-triggered per tensor (clears when it changes).

    Args:
        tensor_regex: Inspect tensors whose name matches.
        collections: Inspect tensors of these collections (union with ``tensor_regex``).
        num_steps: Number of saved steps (>= 2) over which the tensor must be unchanged.
        rtol: Relative tolerance of ``numpy.allclose``.
        atol: Absolute tolerance of ``numpy.allclose``.
        equal_nan: Whether NaNs compare equal.

    """

    needs = Needs(values=True)

    def __init__(
        self,
        tensor_regex: Optional[str] = None,
        collections: Optional[Union[str, Sequence[str]]] = None,
        num_steps: int = 3,
        rtol: float = 1e-5,
        atol: float = 1e-8,
        equal_nan: bool = False,
    ) -> None:
        super().__init__()
        n = self.name
        self.tensor_regex = _regex(n, "tensor_regex", tensor_regex, optional=True)
        self.collections = list(_collections(n, "collections", collections))
        if not self.collections and not self.tensor_regex:
            raise InvalidArgumentError(f"{n}: give tensor_regex or collections (one is required)")
        self.num_steps = _number(n, "num_steps", num_steps, integer=True, lo=2)
        self.rtol = _number(n, "rtol", rtol, lo=0.0)
        self.atol = _number(n, "atol", atol, lo=0.0)
        self.equal_nan = bool(equal_nan)
        self.needs = Needs(collections=self.collections, regex=self.tensor_regex, values=True)
        self._sel = _Select(self.collections, self.tensor_regex)
        # name -> [step, stats row, cached value or None, run length]
        self._state: dict[str, list] = {}
        self._edge = _Edge()

    def _digest_changed(self, cur: dict, prev: dict) -> bool:
        if cur["numel"] != prev["numel"]:
            return True
        if cur["posinf"] != prev["posinf"] or cur["neginf"] != prev["neginf"]:
            return True
        if cur["nan"] != prev["nan"] or (cur["nan"] and not self.equal_nan):
            return True
        fin = cur["numel"] - cur["nan"] - cur["posinf"] - cur["neginf"]
        if fin == 0:
            return False
        tol = self.atol + self.rtol * prev["abs_max"]
        mean_tol = self.atol + self.rtol * prev["l1"] / max(fin, 1)
        return (
            abs(cur["max"] - prev["max"]) > tol * (1 + 1e-9)
            or abs(cur["min"] - prev["min"]) > tol * (1 + 1e-9)
            or abs(cur["mean"] - prev["mean"]) > mean_tol * (1 + 1e-6) + 1e-12 * prev["abs_max"]
        )

    def evaluate(self, step: StepView) -> Optional[Finding]:
        """Compares each tensor saved at ``step`` with its previous saved value."""
        b = step.batch()
        idx = _first_rank_rows(b, self._sel.index(step))
        idx = idx[b.has_value[idx]]
        observed: set = set()
        firing: list = []
        for i, rank in zip(idx.tolist(), b.rank[idx].tolist()):
            name = b.names[i]
            observed.add(name)
            row = {
                k: getattr(b, k)[i].item()
                for k in ("numel", "nan", "posinf", "neginf", "min", "max", "mean", "l1", "abs_max")
            }
            st = self._state.get(name)
            if st is None:
                self._state[name] = [step.step, row, None, 1, rank]
                continue
            cur_val = None
            if self._digest_changed(row, st[1]):
                run = 1
            else:
                prev_val = st[2]
                if prev_val is None:
                    prev_val = step.run.tensor(name).value(st[0], st[4])
                cur_val = np.asarray(step.value(name, rank))
                same = prev_val.shape == cur_val.shape and bool(
                    np.allclose(
                        cur_val, prev_val, rtol=self.rtol, atol=self.atol, equal_nan=self.equal_nan
                    )
                )
                run = st[3] + 1 if same else 1
            self._state[name] = [step.step, row, cur_val, run, rank]
            if run >= self.num_steps:
                firing.append(name)
        new = self._edge.update(firing, observed)
        if not new:
            return None
        return self.finding(
            step,
            f"{len(new)} tensor(s) did not change over the last {self.num_steps} saved steps "
            f"(rtol={self.rtol:g}, atol={self.atol:g}): {_listing([(n, '') for n in new])}".replace(
                " ()", ""
            ),
            {
                "num_steps": self.num_steps,
                "rtol": self.rtol,
                "atol": self.atol,
                "tensors": new,
                "unchanged_steps": {n: self._state[n][3] for n in new},
            },
        )


class LossNotDecreasing(Rule):
    """Fires when a loss did not drop by more than ``diff_percent`` % over ``num_steps``.

    The rule keeps a checkpoint per loss: the first saved loss, then, every time a loss is
    saved at least ``num_steps`` mode steps after the checkpoint, it compares the window of
    losses saved since the checkpoint with the checkpoint, and that window becomes the new
    checkpoint (one comparison per ``num_steps``, like SageMaker, against the loss
    ``num_steps`` earlier). The comparison is noise-aware: a check counts as *not decreasing*
    when ``(checkpoint - mean) / |checkpoint| * 100 <= diff_percent`` (SageMaker's condition,
    on window means) **and** the mean exceeds ``checkpoint * (1 - diff_percent / 100)`` by at
    least ``significance`` standard errors of the difference of the two window means (a
    noise-free plateau has a standard error of 0 and always counts; a window mean a little
    above the previous one by mini-batch noise does not). It fires after ``patience``
    consecutive not-decreasing checks. ``mode=None`` uses eval losses when the run has any so
    far, else train, else global ones. Losses are the tensors of the ``losses`` collection
    (names starting with ``loss`` when the run has none). Edge-triggered per loss name.

    Args:
        use_losses_collection: Inspect the ``losses`` collection (``False``: only
            ``tensor_regex``, default names starting with ``loss``).
        num_steps: Mode steps between two comparisons.
        diff_percent: Minimum drop, in percent, between two comparisons.
        mode: ``"train"``, ``"eval"``, ``"global"`` or ``None`` (first with data of eval,
            train, global).
        tensor_regex: Further loss names (SageMaker's ``tensor_regex``).
        significance: Standard errors by which the loss must sit above the required level
            (``0``: SageMaker's plain comparison of the window means).
        patience: Consecutive not-decreasing checks before firing.

    """

    needs = Needs(collections=["losses"], regex=_LOSS_RE)

    def __init__(
        self,
        use_losses_collection: bool = True,
        num_steps: int = 10,
        diff_percent: float = 0.0,
        mode: Optional[Union[str, Mode]] = None,
        tensor_regex: Optional[str] = None,
        significance: float = 2.0,
        patience: int = 1,
    ) -> None:
        super().__init__()
        n = self.name
        self.significance = _number(n, "significance", significance, lo=0.0)
        self.patience = _number(n, "patience", patience, integer=True, lo=1)
        self.use_losses_collection = bool(use_losses_collection)
        self.num_steps = _number(n, "num_steps", num_steps, integer=True, lo=1)
        self.diff_percent = _number(n, "diff_percent", diff_percent)
        if mode is not None:
            try:
                mode = to_mode(mode)
            except InvalidArgumentError:
                raise _bad(n, "mode", "must be train, eval, global or None", mode) from None
        self.mode = mode
        self.tensor_regex = _regex(n, "tensor_regex", tensor_regex, optional=True)
        if self.tensor_regex or not self.use_losses_collection:
            self.needs = Needs(
                collections=["losses"] if self.use_losses_collection else [],
                regex=self.tensor_regex or _LOSS_RE,
            )
        self._sel = _loss_select(self.use_losses_collection, self.tensor_regex)
        self._modes_seen: set = set()
        self._state: dict[tuple, list] = {}
        self._edge = _Edge()
        self._ff: Optional[tuple] = None  # fast_forward's loss columns of the current block

    def fast_forward(self, block: StepBlock, start: int) -> int:
        """Keeps the windows and checkpoints up to the first comparison that fires."""
        if self.mode is not None and block.mode != self.mode:
            return len(block)
        cached = self._ff
        if cached is None or cached[0]() is not block:
            idx = self._sel.index(block.view(0))
            names = [block.names[i] for i in idx.tolist()]
            vals = ok = None
            if len(idx) and len(set(names)) == len(names):
                fin = block.finite()[:, idx]
                vals = np.where(
                    block.nan[:, idx] > 0,
                    np.nan,
                    np.where(
                        fin > 0,
                        block.mean[:, idx],
                        np.where(block.posinf[:, idx] >= block.neginf[:, idx], np.inf, -np.inf),
                    ),
                )
                ok = np.isfinite(vals)
            # A weak reference: the block's columns are not kept alive after the poll.
            cached = self._ff = (weakref.ref(block), idx, names, vals, ok)
        _, idx, names, vals, ok = cached
        if not len(idx):
            return len(block)  # no loss: evaluate() returns at once
        if vals is None:
            return start  # one loss on several ranks: evaluate() averages them
        if self.mode is None:
            self._modes_seen.add(block.mode)  # as evaluate() does at every such step
            use = next(
                (m for m in (Mode.EVAL, Mode.TRAIN, Mode.GLOBAL) if m in self._modes_seen), None
            )
            if block.mode != use:
                return len(block)
        ms = block.mode_steps
        n = len(block)
        keys = [(block.mode, name) for name in names]
        finite_rows = [np.flatnonzero(ok[:, j]) for j in range(len(names))]
        pos = start
        while pos < n:
            # The next row at which some loss is compared, with each loss's checkpoint as it
            # will be then (a loss seen for the first time gets its checkpoint on the way).
            due_at = n
            for j, key in enumerate(keys):
                rows = finite_rows[j]
                rows = rows[np.searchsorted(rows, pos) :]
                st = self._state.get(key)
                if st is None:
                    if not len(rows):
                        continue
                    ckpt, rows = int(ms[rows[0]]), rows[1:]
                else:
                    ckpt = st[0]
                due = rows[ms[rows] >= ckpt + self.num_steps]
                if len(due):
                    due_at = min(due_at, int(due[0]))
            # Rows before it only fill the windows.
            for j, key in enumerate(keys):
                rows = finite_rows[j]
                rows = rows[np.searchsorted(rows, pos) : np.searchsorted(rows, due_at)]
                if not len(rows):
                    continue
                st = self._state.get(key)
                if st is None:
                    st = self._state[key] = [int(ms[rows[0]]), [float(vals[rows[0], j])], [], 0]
                    rows = rows[1:]
                st[2].extend(vals[rows, j].tolist())
            if due_at >= n:
                return n
            # At the comparison row: let evaluate() take it if any loss would fire there.
            updates = []
            for j, key in enumerate(keys):
                if not ok[due_at, j]:
                    continue
                st = self._state.get(key)
                v = float(vals[due_at, j])
                if st is None or int(ms[due_at]) < st[0] + self.num_steps:
                    updates.append((key, v, None))
                    continue
                flag, _ = _not_decreasing(st[1], st[2] + [v], self.diff_percent, self.significance)
                count = st[3] + 1 if flag else 0
                if flag and count >= self.patience:
                    return due_at
                updates.append((key, v, count))
            for key, v, count in updates:
                st = self._state.get(key)
                if st is None:
                    self._state[key] = [int(ms[due_at]), [v], [], 0]
                    continue
                st[2].append(v)
                if count is None:
                    continue
                self._state[key] = [int(ms[due_at]), st[2], [], count]
                if not count:
                    self._edge.active.discard(key)  # observed and not holding: it clears
            pos = due_at + 1
        return n

    def evaluate(self, step: StepView) -> Optional[Finding]:
        """Updates the checkpoints of the losses saved at ``step`` and compares."""
        if self.mode is not None and step.mode != self.mode:
            return None
        losses = _loss_values(step, self._sel)
        if not losses:
            return None
        if self.mode is None:
            self._modes_seen.add(step.mode)
            use = next(
                (m for m in (Mode.EVAL, Mode.TRAIN, Mode.GLOBAL) if m in self._modes_seen), None
            )
            if step.mode != use:
                return None
        ms = step.mode_step
        firing, observed, details = [], set(), {}
        for name, v in losses.items():
            if not math.isfinite(v):
                continue
            key = (step.mode, name)
            st = self._state.get(key)
            if st is None:
                self._state[key] = [ms, [v], [], 0]
                continue
            st[2].append(v)
            if ms < st[0] + self.num_steps:
                continue
            flag, det = _not_decreasing(st[1], st[2], self.diff_percent, self.significance)
            observed.add(key)
            count = st[3] + 1 if flag else 0
            if flag and count >= self.patience:
                firing.append(key)
                details[key] = {
                    "reference_step": st[0],
                    **det,
                    "losses_averaged": len(st[2]),
                    "consecutive_checks": count,
                }
            elif count:
                observed.discard(key)  # not decreasing, patience not reached: keep the edge
            self._state[key] = [ms, st[2], [], count]
        new = self._edge.update(firing, observed)
        if not new:
            return None
        ev = {_label(k[1], 0): details[k] for k in new}
        first = next(iter(ev.values()))
        return self.finding(
            step,
            f"{step.mode} loss {', '.join(repr(k) for k in ev)} did not decrease by more than "
            f"{self.diff_percent:g}% over {self.num_steps} steps "
            f"({first['reference_loss']:.4g} at step {first['reference_step']} -> "
            f"{first['loss']:.4g})",
            {
                "num_steps": self.num_steps,
                "diff_percent": self.diff_percent,
                "significance": self.significance,
                "patience": self.patience,
                "mode": str(step.mode),
                "tensors": list(ev),
                "losses": ev,
            },
        )


class Overfit(Rule):
    """Fires when validation loss exceeds training loss by more than ``ratio_threshold``.

    Training losses are losses of train (or global) steps; validation losses are losses of
    eval steps and, in any step, losses named ``loss/eval``, ``loss/val``, ``loss/valid``,
    ``loss/validation`` or ``loss/test``. Consecutive steps with validation losses form a
    validation phase; at each of its steps the rule computes
    ``(mean validation loss of the phase - mean training loss since the previous phase) /
    mean training loss`` and fires when it exceeds ``ratio_threshold`` at ``patience``
    consecutive validation steps. Steps before ``start_step`` are ignored. Edge-triggered.

    Args:
        start_step: First global step considered.
        patience: Consecutive validation steps the condition must hold.
        ratio_threshold: Largest accepted relative excess of validation over training loss.

    """

    needs = Needs(collections=["losses"], regex=_LOSS_RE)

    def __init__(
        self, start_step: int = 0, patience: int = 1, ratio_threshold: float = 0.1
    ) -> None:
        super().__init__()
        n = self.name
        self.start_step = _number(n, "start_step", start_step, integer=True, lo=0)
        self.patience = _number(n, "patience", patience, integer=True, lo=1)
        self.ratio_threshold = _number(n, "ratio_threshold", ratio_threshold)
        self._sel = _loss_select()
        self._train: list[float] = []
        self._train_mean: Optional[float] = None
        self._val: list[float] = []
        self._in_val = False
        self._count = 0
        self._edge = _Edge()

    def evaluate(self, step: StepView) -> Optional[Finding]:
        """Accumulates the losses of ``step``; compares at validation steps."""
        if step.step < self.start_step:
            return None
        losses = _loss_values(step, self._sel)
        if not losses:
            return None
        train, val = _split_losses(step, losses)
        train = [v for v in train if math.isfinite(v)]
        val = [v for v in val if math.isfinite(v)]
        if train:
            if self._in_val:
                self._in_val, self._val = False, []
            self._train.extend(train)
        if not val:
            return None
        if not self._in_val:
            self._in_val = True
            if self._train:
                self._train_mean, self._train = _mean(self._train), []
        self._val.extend(val)
        tm = self._train_mean
        if tm is None or tm <= 0:
            return None
        vm = _mean(self._val)
        ratio = (vm - tm) / tm
        self._count = self._count + 1 if ratio > self.ratio_threshold else 0
        new = self._edge.update(["overfit"] if self._count >= self.patience else [], {"overfit"})
        if not new:
            return None
        return self.finding(
            step,
            f"validation loss {vm:.4g} exceeds training loss {tm:.4g} by {100 * ratio:.1f}% "
            f"(threshold {100 * self.ratio_threshold:g}%) for {self._count} validation step(s)",
            {
                "ratio_threshold": self.ratio_threshold,
                "patience": self.patience,
                "ratio": ratio,
                "validation_loss": vm,
                "training_loss": tm,
            },
        )


class Overtraining(Rule):
    """Fires when the training or validation loss stops improving by ``delta``.

    For each series (training, validation; split as in :class:`Overfit`, one value per step:
    the mean of its losses) the rule keeps the best loss; a step improves when its loss is
    below ``best - delta`` (absolute). It fires when a series has not improved for its
    patience (counted in steps carrying that series). Edge-triggered per series.

    Args:
        patience_train: Training steps without improvement before firing.
        patience_validation: Validation steps without improvement before firing.
        delta: Minimum absolute improvement of the best loss.

    """

    needs = Needs(collections=["losses"], regex=_LOSS_RE)

    def __init__(
        self, patience_train: int = 5, patience_validation: int = 10, delta: float = 0.1
    ) -> None:
        super().__init__()
        n = self.name
        self.patience_train = _number(n, "patience_train", patience_train, integer=True, lo=1)
        self.patience_validation = _number(
            n, "patience_validation", patience_validation, integer=True, lo=1
        )
        self.delta = _number(n, "delta", delta, lo=0.0)
        self._sel = _loss_select()
        self._best: dict[str, float] = {}
        self._since: dict[str, int] = {"training": 0, "validation": 0}
        self._edge = _Edge()

    def evaluate(self, step: StepView) -> Optional[Finding]:
        """Updates the best losses with the losses of ``step``."""
        losses = _loss_values(step, self._sel)
        if not losses:
            return None
        train, val = _split_losses(step, losses)
        firing, observed, ev = [], set(), {}
        for series, vals, patience in (
            ("training", train, self.patience_train),
            ("validation", val, self.patience_validation),
        ):
            vals = [v for v in vals if math.isfinite(v)]
            if not vals:
                continue
            v = _mean(vals)
            observed.add(series)
            best = self._best.get(series)
            if best is None or v < best - self.delta:
                self._best[series] = v
                self._since[series] = 0
                continue
            self._since[series] += 1
            if self._since[series] >= patience:
                firing.append(series)
                ev[series] = {
                    "best_loss": best,
                    "loss": v,
                    "steps_without_improvement": self._since[series],
                    "patience": patience,
                }
        new = self._edge.update(firing, observed)
        if not new:
            return None
        s = new[0]
        return self.finding(
            step,
            f"{' and '.join(new)} loss stopped improving by {self.delta:g}: "
            f"best {ev[s]['best_loss']:.4g}, {ev[s]['steps_without_improvement']} steps without "
            "improvement",
            {"delta": self.delta, **{k: ev[k] for k in new}},
        )


class StalledTraining(Rule):
    """Fires when no new step is committed for ``threshold`` seconds.

    Uses the wall-clock time of step commits (``Run._r.commits()["wall_time"]``). Offline
    (``check``), a gap longer than ``threshold`` between two consecutive committed steps fires
    at the step that ended it. Live, a watcher calls :meth:`check_idle` between polls: it
    fires once per idle period when ``now`` is more than ``threshold`` seconds after the last
    commit and the run has not ended (the later step then does not report the same gap).
    With ``stop_training_on_fire`` a finding also writes the run's stop request
    (``stop_request.json``), which the hooks honour at their next step boundary.

    Args:
        threshold: Seconds without a new step before firing.
        stop_training_on_fire: Also request training to stop when the rule fires.

    """

    needs = Needs()

    def __init__(self, threshold: float = 1800, stop_training_on_fire: bool = False) -> None:
        super().__init__()
        self.threshold = _number(self.name, "threshold", threshold, lo=0, lo_open=True)
        self.stop_training_on_fire = bool(stop_training_on_fire)
        self._times: dict[int, float] = {}
        self._times_upto = -1
        self._run: Any = None
        self._last: Optional[tuple[int, str, int, float]] = None
        self._idle_reported_for: Optional[int] = None

    def _commit_time(self, step: StepView) -> Optional[float]:
        t = self._times.get(step.step)
        if t is None:
            c = step.run._r.commits()
            s, w = np.asarray(c["step"]), np.asarray(c["wall_time"])
            keep = s > self._times_upto
            s, w = s[keep], w[keep]
            if len(s):
                order = np.lexsort((w, s))
                s, w = s[order], w[order]
                last = np.r_[s[1:] != s[:-1], True]  # latest commit over ranks
                self._times = dict(zip(s[last].tolist(), w[last].tolist()))
            t = self._times.get(step.step)
        return t

    def evaluate(self, step: StepView) -> Optional[Finding]:
        """Checks the time since the previous committed step."""
        self._run = step.run
        t = self._commit_time(step)
        if t is None:
            return None
        self._times_upto = max(self._times_upto, step.step)
        prev = self._last
        self._last = (step.step, str(step.mode), step.mode_step, t)
        if prev is None or self._idle_reported_for == prev[0]:
            return None
        gap = t - prev[3]
        if gap <= self.threshold:
            return None
        f = self.finding(
            step,
            f"no step was committed for {gap:.3g} s between step {prev[0]} and step "
            f"{step.step} (threshold {self.threshold:g} s)",
            {"threshold": self.threshold, "idle_seconds": gap, "previous_step": prev[0]},
        )
        self._maybe_stop(f)
        return f

    def check_idle(self, now: Optional[float] = None) -> Optional[Finding]:
        """Checks the time since the last committed step evaluated so far.

        Call it between :meth:`RuleEngine.poll` calls (a watcher does); it needs no new
        step. Returns a finding once per idle period, or ``None``.

        Args:
            now: Current wall-clock time (``time.time()``) in seconds; default now.

        """
        if self._last is None or self._idle_reported_for == self._last[0]:
            return None
        now = time.time() if now is None else float(now)
        idle = now - self._last[3]
        if idle <= self.threshold:
            return None
        run = self._run
        if run is not None:
            ranks = run.ranks()
            if ranks and all(run.ended(r) for r in ranks):
                return None
        self._idle_reported_for = self._last[0]
        step, mode, mode_step, _ = self._last
        f = Finding(
            rule=self.name,
            step=step,
            mode=mode,
            mode_step=mode_step,
            severity=self.severity,
            message=f"no new step for {idle:.3g} s after step {step} "
            f"(threshold {self.threshold:g} s): training looks stalled",
            evidence={"threshold": self.threshold, "idle_seconds": idle, "last_step": step},
        )
        self._maybe_stop(f)
        return f

    def _maybe_stop(self, f: Finding) -> None:
        f.evidence["stop_training"] = self.stop_training_on_fire
        if self.stop_training_on_fire and self._run is not None:
            from ...hooks.base import write_stop_request

            write_stop_request(self._run.path, f"{self.name}: {f.message}", source="rule")


class SimilarAcrossRuns(Rule):
    """Fires when tensors at the same step differ between this run and ``other``.

    Tensors are matched by name and rank at the same global step (steps or tensors the other
    run lacks are skipped). The statistics are compared first (numel and NaN/Inf counts
    exactly; min, max, mean and L2 with ``numpy.isclose(rtol, atol)``); when they agree and
    both runs stored the values, the values are compared with ``numpy.allclose`` (so the rule
    declares ``values=True``). Edge-triggered per tensor.

    Args:
        other: The other run: a :class:`tensorvigil.Run` or its directory.
        tensor_regex: Compare tensors whose name matches (default: every tensor).
        collections: Compare tensors of these collections (union with ``tensor_regex``).
        rtol: Relative tolerance of the comparisons.
        atol: Absolute tolerance of the comparisons.

    """

    needs = Needs(values=True)

    def __init__(
        self,
        other: Any = None,
        tensor_regex: Optional[str] = None,
        collections: Optional[Union[str, Sequence[str]]] = None,
        rtol: float = 1e-5,
        atol: float = 1e-8,
    ) -> None:
        super().__init__()
        n = self.name
        from ...store.reader import Run

        if other is None:
            raise InvalidArgumentError(f"{n}: parameter other (another run) is required")
        if not isinstance(other, Run):
            if not isinstance(other, (str, os.PathLike)):
                raise _bad(n, "other", "must be a tv.Run or a run directory", other)
            try:
                other = Run(other)
            except NotFoundError as e:
                raise InvalidArgumentError(f"{n}: parameter other: {e}") from None
        self.other = other
        self.tensor_regex = _regex(n, "tensor_regex", tensor_regex, optional=True)
        self.collections = list(_collections(n, "collections", collections))
        self.rtol = _number(n, "rtol", rtol, lo=0.0)
        self.atol = _number(n, "atol", atol, lo=0.0)
        if self.collections or self.tensor_regex:
            self.needs = Needs(collections=self.collections, regex=self.tensor_regex, values=True)
        self._sel = _Select(self.collections, self.tensor_regex, everything=True)
        self._cols: Optional[dict] = None
        self._cols_hi = -1
        self._edge = _Edge()

    def params(self) -> dict:
        """The rule's parameters (``other`` as its path)."""
        p = super().params()
        p["other"] = self.other.path
        return p

    def _other_rows(self, s: int) -> Optional[dict]:
        if self._cols is None or s > self._cols_hi:
            self.other.refresh()
            r = self.other._r
            hi = s + 1023
            cols = r.stats_columns(name_ids=[], ranks=[], step_min=s, step_max=hi, mode=-1)
            order = np.argsort(cols["step"], kind="stable")
            self._cols = {k: v[order] for k, v in cols.items()}
            self._names = r.names()
            steps = self.other.steps()
            self._cols_hi = min(hi, steps[-1]) if steps else -1
        c = self._cols
        a, b = np.searchsorted(c["step"], [s, s + 1])
        if a == b:
            return None
        return {(self._names[int(c["name_id"][i])], int(c["rank"][i])): i for i in range(a, b)}

    def evaluate(self, step: StepView) -> Optional[Finding]:
        """Compares the tensors saved at ``step`` with the other run's."""
        b = step.batch()
        idx = self._sel.index(step)
        if not len(idx):
            return None
        rows = self._other_rows(step.step)
        if rows is None:
            return None
        c = self._cols
        differ: dict[tuple, dict] = {}
        observed: set = set()
        for i in idx.tolist():
            key = (b.names[i], int(b.rank[i]))
            j = rows.get(key)
            if j is None:
                continue
            observed.add(key)
            why = None
            for k in ("numel", "nan", "posinf", "neginf"):
                if int(getattr(b, k)[i]) != int(c[k][j]):
                    why = {"stat": k, "this": int(getattr(b, k)[i]), "other": int(c[k][j])}
                    break
            if why is None:
                for k in ("min", "max", "mean", "l2"):
                    x, y = float(getattr(b, k)[i]), float(c[k][j])
                    if not np.isclose(x, y, rtol=self.rtol, atol=self.atol, equal_nan=True):
                        why = {"stat": k, "this": x, "other": y}
                        break
            if why is None and b.has_value[i] and c["has_value"][j]:
                x = np.asarray(step.value(*key))
                y = self.other._r.read(key[0], step.step, key[1])
                if x.shape != y.shape:
                    why = {"stat": "shape", "this": list(x.shape), "other": list(y.shape)}
                elif not np.allclose(x, y, rtol=self.rtol, atol=self.atol, equal_nan=True):
                    d = np.abs(x.astype(np.float64) - y.astype(np.float64))
                    why = {"stat": "values", "max_abs_diff": float(np.nanmax(d))}
            if why is not None:
                differ[key] = why
        new = self._edge.update(differ, observed)
        if not new:
            return None
        vals = {_label(*k): differ[k] for k in new}
        return self.finding(
            step,
            f"{len(vals)} tensor(s) differ from run {self.other.path} at step {step.step}: "
            f"{_listing([(n, d['stat']) for n, d in vals.items()])}",
            {
                "other": self.other.path,
                "rtol": self.rtol,
                "atol": self.atol,
                "tensors": list(vals),
                "differences": vals,
            },
        )
