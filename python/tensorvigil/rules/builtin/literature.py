"""Rules from the research literature (AUTOTRAINER, ICSE 2021; DeepDiagnosis, ICSE 2022).

Every rule here works on statistics, except :class:`WrongOutputActivation`, which reads the
values of outputs whose statistics say they look like probabilities. Conditions are
edge-triggered: a rule reports a condition once when it starts to hold (per tensor or per
condition) and again only after it cleared. Catalogue and defaults: ``RULES.md``; user
documentation: ``docs/rules/literature.md``.

Model order: :class:`GradientNormRatio` needs the first and the last layer. The store keeps no
model order, but the records of one step keep the order in which the writer received them (the
stream writer writes frames in submission order, the reader lists them in file order and the
engine groups rows by step with a stable sort), and the PyTorch hook saves parameters and
gradients in ``named_parameters()`` order, so the first and last gradient rows of a step are the
first and last layer.
"""

from __future__ import annotations

import math
import re
from collections import deque
from typing import Any, Callable, Hashable, Iterable, Optional, Sequence

import numpy as np

from ...errors import InvalidArgumentError
from ..base import Finding, Needs, Rule, StatsBatch, StepBlock, StepView
from ._params import number as _number
from ._params import regex as _regex

__all__ = [
    "GradientNormRatio",
    "DyingRelu",
    "LossSpike",
    "OscillatingLoss",
    "SlowConvergence",
    "LearningRateMismatch",
    "UnnormalizedInput",
    "WrongOutputActivation",
]

#: At most this many tensors are listed in a finding's evidence.
MAX_LISTED = 10


# -- shared helpers (also used by data.py and health.py) ------------------------------------


class _Edge:
    """Edge-triggering: a key is reported when it starts to hold, again after it cleared."""

    def __init__(self) -> None:
        self.active: set = set()

    def update(
        self,
        holding: Iterable[Hashable],
        checked: Iterable | Callable[[], Iterable] | None = None,
    ) -> list:
        """Records the keys that hold now; returns those that just started to hold.

        Args:
            holding: Keys whose condition holds at this step.
            checked: Keys evaluated at this step (those not holding clear), or a function
                returning them (called only when some key is active); default: every key not
                in ``holding`` clears.

        """
        holding = list(dict.fromkeys(holding))
        hold = set(holding)
        if checked is None:
            self.active &= hold
        elif self.active:
            self.active -= set(checked() if callable(checked) else checked) - hold
        new = [k for k in holding if k not in self.active]
        self.active |= hold
        return new

    def rising(self, key: Hashable, cond: bool) -> bool:
        """Whether ``key`` starts to hold now (one key at a time)."""
        if not cond:
            self.active.discard(key)
            return False
        if key in self.active:
            return False
        self.active.add(key)
        return True


def _members(step: StepView, collection: str) -> set:
    """Names of a collection as the engine sees them (no per-step copy)."""
    engine = getattr(step, "_engine", None)
    fn = getattr(engine, "collection_names", None)
    if fn is not None:
        return fn(collection)
    return set(step.names(collection=collection))


def _set_key(s: set) -> Any:
    # The engine hands out the same set object until collections.json changes.
    return (id(s), len(s)) if s else 0


class _RowCache:
    """Selections of a step's rows, cached on the step's name list (identical most steps)."""

    def __init__(self, maxsize: int = 16) -> None:
        self._d: dict = {}
        self._maxsize = maxsize

    def get(self, key: Any, compute: Callable[[], Any], keep: Any = None) -> Any:
        hit = self._d.get(key)
        if hit is None:
            if len(self._d) >= self._maxsize:
                self._d.clear()
            hit = self._d[key] = (compute(), keep)  # keep: objects whose id is in the key
        return hit[0]


def _not_applicable(rule: Rule, step: StepView, message: str, evidence: dict) -> Finding:
    return Finding(
        rule=rule.name,
        step=step.step,
        mode=str(step.mode),
        mode_step=step.mode_step,
        severity="info",
        kind="not_applicable",
        message=message,
        evidence=evidence,
    )


def _grad_base(name: str) -> str:
    return name[:-5] if name.endswith("/grad") else name


def _is_bias(name: str) -> bool:
    return name.rsplit(".", 1)[-1].startswith("bias")


def _weight_grad_rows(names: Sequence[str], grads: set, weights: set) -> np.ndarray:
    """Rows (file order) of gradients of weight tensors (biases excluded)."""
    out = []
    for i, n in enumerate(names):
        if n in grads:
            base = _grad_base(n)
            if (base in weights) if weights else not _is_bias(base):
                out.append(i)
    return np.asarray(out, dtype=np.int64)


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _listed(items: list) -> list:
    return items[:MAX_LISTED]


# -- GradientNormRatio --------------------------------------------------------------------------


class GradientNormRatio(Rule):
    """First-layer / last-layer gradient-norm ratio (vanishing or exploding gradients).

    Reads the ``l2`` statistic of the gradients of the first and the last weight tensor in
    model order (the order the hook saves them within a step; biases are skipped).

    Args:
        vanish_ratio: Vanishing when the ratio is below this and the first-layer norm is below
            ``vanish_first``.
        vanish_first: First-layer gradient norm below which a small ratio counts as vanishing.
        explode_ratio: Exploding when the ratio is above this.

    """

    needs = Needs(collections=["gradients"])

    def __init__(
        self, *, vanish_ratio: float = 1e-3, vanish_first: float = 1e-4, explode_ratio: float = 70
    ) -> None:
        super().__init__()
        n = type(self).__name__
        self.vanish_ratio = _number(n, "vanish_ratio", vanish_ratio, lo=0, lo_open=True)
        self.vanish_first = _number(n, "vanish_first", vanish_first, lo=0, lo_open=True)
        self.explode_ratio = _number(n, "explode_ratio", explode_ratio, lo=0, lo_open=True)
        if self.explode_ratio <= self.vanish_ratio:
            raise InvalidArgumentError(
                f"{n}: explode_ratio ({explode_ratio}) must be greater than vanish_ratio "
                f"({vanish_ratio})"
            )
        self._cache = _RowCache()
        self._edge = _Edge()

    def _rows(self, step: StepView) -> np.ndarray:
        b = step.batch()
        grads, weights = _members(step, "gradients"), _members(step, "weights")
        key = (tuple(b.names), _set_key(grads), _set_key(weights))
        return self._cache.get(
            key, lambda: _weight_grad_rows(b.names, grads, weights), (grads, weights)
        )

    def fast_forward(self, block: StepBlock, start: int) -> int:
        """Skips the steps where the ratio is within bounds (one rank)."""
        if self._edge.active:
            return start
        rows = self._rows(block.view(start))
        if len(rows) < 2:
            return len(block)
        ranks = block.rank[rows]
        if not (ranks == ranks[0]).all():
            return start
        first, last = int(rows[0]), int(rows[-1])
        n1, nl = block.l2[start:, first], block.l2[start:, last]
        nonfinite = block.nonfinite()
        skip = (nonfinite[start:, first] + nonfinite[start:, last] > 0) | ~(nl > 0)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            skip |= ~(np.isfinite(n1) & np.isfinite(nl))
            ratio = n1 / np.where(skip, 1.0, nl)
            cond = ((ratio < self.vanish_ratio) & (n1 < self.vanish_first)) | (
                ratio > self.explode_ratio
            )
        hits = np.flatnonzero(cond & ~skip)
        return start + int(hits[0]) if len(hits) else len(block)

    def evaluate(self, step: StepView) -> Optional[list]:
        """Checks one step; returns the conditions that started to hold."""
        b = step.batch()
        rows = self._rows(step)
        if len(rows) < 2:
            return None
        ranks = b.rank[rows]
        if ranks[0] == ranks[-1] and (ranks == ranks[0]).all():
            per_rank = [(int(ranks[0]), rows)]
        else:
            per_rank = [(int(r), rows[ranks == r]) for r in np.unique(ranks)]
        out = []
        for rank, sel in per_rank:
            if len(sel) < 2:
                continue
            first, last = int(sel[0]), int(sel[-1])
            n1, nl = float(b.l2[first]), float(b.l2[last])
            bad = sum(int(c[i]) for c in (b.nan, b.posinf, b.neginf) for i in (first, last))
            if bad or not (math.isfinite(n1) and math.isfinite(nl)) or nl <= 0.0:
                # Non-finite gradients are ExplodingTensor's (``l2`` counts finite elements
                # only); a zero last layer has no ratio.
                continue
            ratio = n1 / nl
            vanish = ratio < self.vanish_ratio and n1 < self.vanish_first
            explode = ratio > self.explode_ratio
            ev = {
                "rank": rank,
                "first_layer": b.names[first],
                "last_layer": b.names[last],
                "first_norm": n1,
                "last_norm": nl,
                "ratio": ratio,
            }
            if self._edge.rising((rank, "vanishing"), vanish):
                ev.update(vanish_ratio=self.vanish_ratio, vanish_first=self.vanish_first)
                out.append(
                    self.finding(
                        step,
                        f"vanishing gradients: first-layer/last-layer gradient norm ratio "
                        f"{_fmt(ratio)} < {_fmt(self.vanish_ratio)} with first-layer norm "
                        f"{_fmt(n1)} < {_fmt(self.vanish_first)} ({b.names[first]} vs "
                        f"{b.names[last]})",
                        ev,
                    )
                )
            if self._edge.rising((rank, "exploding"), explode):
                ev.update(explode_ratio=self.explode_ratio)
                out.append(
                    self.finding(
                        step,
                        f"exploding gradients: first-layer/last-layer gradient norm ratio "
                        f"{_fmt(ratio)} > {_fmt(self.explode_ratio)} ({b.names[first]} vs "
                        f"{b.names[last]})",
                        ev,
                    )
                )
        return out or None


# -- DyingRelu ----------------------------------------------------------------------------------


class DyingRelu(Rule):
    """Too many gradient elements are exactly zero (dead ReLU units stop learning).

    Reads the ``zeros`` and ``numel`` statistics of every tensor of the ``gradients``
    collection and fires when ``sum(zeros) / sum(numel)`` over them reaches the threshold.

    Args:
        zero_grad_fraction: Fraction (0, 1] of zero gradient elements at which the rule fires.

    """

    needs = Needs(collections=["gradients"])

    def __init__(self, *, zero_grad_fraction: float = 0.7) -> None:
        super().__init__()
        self.zero_grad_fraction = _number(
            type(self).__name__, "zero_grad_fraction", zero_grad_fraction, lo=0, lo_open=True, hi=1
        )
        self._cache = _RowCache()
        self._edge = _Edge()

    def evaluate(self, step: StepView) -> Optional[list]:
        """Checks one step; returns the conditions that started to hold."""
        b = step.batch()
        grads = _members(step, "gradients")
        names = b.names
        rows = self._cache.get(
            (tuple(names), _set_key(grads)),
            lambda: np.asarray([i for i, n in enumerate(names) if n in grads], dtype=np.int64),
            grads,
        )
        if not len(rows):
            return None
        out = []
        ranks = b.rank[rows]
        for rank in np.unique(ranks).tolist():
            sel = rows if len(ranks) == 0 or ranks.min() == ranks.max() else rows[ranks == rank]
            zeros = b.zeros[sel].astype(np.float64)
            numel = b.numel[sel].astype(np.float64)
            total = float(numel.sum())
            if total <= 0:
                continue
            frac = float(zeros.sum()) / total
            if not self._edge.rising(rank, frac >= self.zero_grad_fraction):
                continue
            with np.errstate(divide="ignore", invalid="ignore"):
                per = np.where(numel > 0, zeros / np.maximum(numel, 1), 0.0)
            worst = np.argsort(-per, kind="stable")
            tensors = [{"name": names[int(sel[j])], "zero_fraction": float(per[j])} for j in worst]
            out.append(
                self.finding(
                    step,
                    f"dying ReLU: {frac:.1%} of gradient elements are exactly zero "
                    f"(threshold {self.zero_grad_fraction:.0%}) across {len(sel)} gradient "
                    f"tensors; most affected: {tensors[0]['name']}",
                    {
                        "rank": rank,
                        "zero_fraction": frac,
                        "zero_grad_fraction": self.zero_grad_fraction,
                        "zero_elements": int(zeros.sum()),
                        "elements": int(total),
                        "tensors": _listed(tensors),
                    },
                )
            )
        return out or None


# -- losses: LossSpike, OscillatingLoss ---------------------------------------------------------


def _loss_rows(rule: Any, step: StepView, b: StatsBatch) -> np.ndarray:
    losses = _members(step, "losses")
    names = b.names
    return rule._cache.get(
        (tuple(names), _set_key(losses)),
        lambda: np.asarray([i for i, n in enumerate(names) if n in losses], dtype=np.int64),
        losses,
    )


class LossSpike(Rule):
    """The loss is NaN/Inf, very large, or jumps far above the largest loss seen so far.

    Reads the statistics of the ``losses`` collection (a loss tensor's value is its ``mean``),
    per loss name, rank and mode. The factor test is skipped at the first step of each loss and
    while the largest loss so far is not positive.

    Args:
        factor: Fires when the loss exceeds ``factor`` times the largest earlier loss.
        absolute: Fires when the loss is at least this.

    """

    needs = Needs(collections=["losses"])

    def __init__(self, *, factor: float = 10.0, absolute: float = 1e3) -> None:
        super().__init__()
        n = type(self).__name__
        self.factor = _number(n, "factor", factor, lo=1)
        self.absolute = _number(n, "absolute", absolute)
        self._cache = _RowCache()
        self._edge = _Edge()
        self._max: dict = {}

    def fast_forward(self, block: StepBlock, start: int) -> int:
        """Skips the steps where no loss is non-finite, large or a spike (tracking the max)."""
        if self._edge.active:
            return start
        view = block.view(start)
        rows = _loss_rows(self, view, view.batch())
        if not len(rows):
            return len(block)
        mode = str(block.mode)
        ranks = block.rank[rows].tolist()
        keys = [(block.names[i], r, mode) for i, r in zip(rows.tolist(), ranks)]
        if len(set(keys)) != len(keys):
            return start
        vals = block.mean[start:, rows]
        nonfinite = (block.nonfinite()[start:, rows] > 0) | ~np.isfinite(vals)
        big = ~nonfinite & (vals >= self.absolute)
        prev0 = np.array([self._max.get(k, -np.inf) for k in keys], dtype=np.float64)
        cm = np.maximum.accumulate(np.where(nonfinite, -np.inf, vals), axis=0)
        prev = np.maximum(np.vstack([prev0[None, :], cm[:-1]]), prev0)  # largest before each
        with np.errstate(over="ignore", invalid="ignore"):
            jump = ~nonfinite & ~big & (prev > 0) & (vals > self.factor * prev)
        hits = np.flatnonzero((nonfinite | big | jump).any(axis=1))
        t = int(hits[0]) if len(hits) else len(vals)
        if t:
            upto = np.maximum(cm[t - 1], prev0)
            for k, v in zip(keys, upto.tolist()):
                if v != -np.inf:
                    self._max[k] = v
        return start + t

    def evaluate(self, step: StepView) -> Optional[list]:
        """Checks one step; returns the conditions that started to hold."""
        b = step.batch()
        rows = _loss_rows(self, step, b)
        if not len(rows):
            return None
        out = []
        mode = str(step.mode)
        for i in rows.tolist():
            name, rank = b.names[i], int(b.rank[i])
            key = (name, rank, mode)
            bad = int(b.nan[i] + b.posinf[i] + b.neginf[i])
            value = float(b.mean[i])
            prev = self._max.get(key)
            nonfinite = bad > 0 or not math.isfinite(value)
            big = not nonfinite and value >= self.absolute
            jump = (
                not nonfinite
                and not big
                and prev is not None
                and prev > 0
                and value > self.factor * prev
            )
            if not nonfinite:
                self._max[key] = value if prev is None else max(prev, value)
            conds = {"nonfinite": nonfinite, "absolute": big, "factor": jump}
            new = self._edge.update(
                [(key, c) for c, held in conds.items() if held], [(key, c) for c in conds]
            )
            for _, cond in new:
                ev: dict = {"loss": name, "rank": rank, "value": value}
                if cond == "nonfinite":
                    ev.update(nan=int(b.nan[i]), posinf=int(b.posinf[i]), neginf=int(b.neginf[i]))
                    what = "NaN" if b.nan[i] else "infinite"
                    msg = f"loss '{name}' is {what}"
                    sev = "error"
                elif cond == "absolute":
                    ev["absolute"] = self.absolute
                    msg = f"loss '{name}' is {_fmt(value)}, at least {_fmt(self.absolute)}"
                    sev = "warning"
                else:
                    ev.update(largest_before=prev, factor=self.factor)
                    msg = (
                        f"loss '{name}' spiked to {_fmt(value)}, more than {_fmt(self.factor)} "
                        f"x the largest loss so far ({_fmt(prev)})"
                    )
                    sev = "warning"
                out.append(self.finding(step, msg, ev, severity=sev))
        return out or None


class OscillatingLoss(Rule):
    """The loss swings up and down instead of decreasing.

    The loss series (``losses`` collection, per loss name, rank and mode) is cut into
    consecutive windows of ``window`` saved steps. A window *swings* when the loss both rises
    from a trough and falls from a peak by at least ``swing`` relative to the window's mean
    absolute loss. The rule fires when at least ``fraction`` of the last ``windows`` windows
    swing (judged once ``windows`` windows are complete).

    Args:
        swing: Relative peak-to-trough amplitude that makes a window swing.
        fraction: Share of recent windows that must swing.
        window: Saved steps per window.
        windows: Number of recent windows judged.

    """

    needs = Needs(collections=["losses"])

    def __init__(
        self,
        *,
        swing: float = 0.03,
        fraction: float = 0.2,
        window: int = 10,
        windows: int = 5,
    ) -> None:
        super().__init__()
        n = type(self).__name__
        self.swing = _number(n, "swing", swing, lo=0, lo_open=True)
        self.fraction = _number(n, "fraction", fraction, lo=0, lo_open=True, hi=1)
        self.window = _number(n, "window", window, lo=3, integer=True)
        self.windows = _number(n, "windows", windows, lo=1, integer=True)
        self._cache = _RowCache()
        self._edge = _Edge()
        self._buf: dict = {}
        self._flags: dict = {}

    @staticmethod
    def _amplitude(v: np.ndarray) -> tuple[float, float]:
        scale = float(np.mean(np.abs(v)))
        if not scale > 0:
            return 0.0, 0.0
        rise = float(np.max(v - np.minimum.accumulate(v))) / scale
        fall = float(np.max(np.maximum.accumulate(v) - v)) / scale
        return rise, fall

    def evaluate(self, step: StepView) -> Optional[list]:
        """Checks one step; returns the conditions that started to hold."""
        b = step.batch()
        rows = _loss_rows(self, step, b)
        out = []
        for i in rows.tolist():
            value = float(b.mean[i])
            if not math.isfinite(value) or b.nan[i] or b.posinf[i] or b.neginf[i]:
                continue  # LossSpike reports non-finite losses
            key = (b.names[i], int(b.rank[i]), str(step.mode))
            buf = self._buf.setdefault(key, [])
            buf.append(value)
            if len(buf) < self.window:
                continue
            v = np.asarray(buf, dtype=np.float64)
            buf.clear()
            rise, fall = self._amplitude(v)
            flags = self._flags.setdefault(key, deque(maxlen=self.windows))
            flags.append((min(rise, fall) >= self.swing, min(rise, fall)))
            if len(flags) < self.windows:
                continue
            share = sum(1 for f, _ in flags if f) / len(flags)
            if not self._edge.rising(key, share >= self.fraction):
                continue
            out.append(
                self.finding(
                    step,
                    f"loss '{key[0]}' oscillates: {share:.0%} of the last {len(flags)} windows "
                    f"of {self.window} steps swing by >= {self.swing:.1%} (threshold "
                    f"{self.fraction:.0%})",
                    {
                        "loss": key[0],
                        "rank": key[1],
                        "swinging_share": share,
                        "window_swings": [s for _, s in flags],
                        "swing": self.swing,
                        "fraction": self.fraction,
                        "window": self.window,
                        "windows": self.windows,
                    },
                )
            )
        return out or None


# -- SlowConvergence ----------------------------------------------------------------------------


class SlowConvergence(Rule):
    """The metric (accuracy-like, higher is better) stops improving while still low.

    Reads the ``metrics`` collection: every metric whose name matches ``metric_regex``, per name
    and mode. The series is cut into windows of ``window`` saved steps. The gain per window is
    the least-squares slope of the metric over the values of the last ``windows + 1``
    complete windows, times ``window`` (a trend, not the best difference of two noisy window
    means: with mini-batch noise a flat metric shows a best difference above ``min_gain`` by
    chance). From step ``after_fraction * total_steps`` on, the rule fires when the gain minus
    one standard error of the slope (from the fit's residuals) is below ``min_gain``, i.e. the
    metric is not shown (at one standard error) to improve by ``min_gain`` per window, while
    the latest window's mean is below ``max_metric``. Without ``total_steps`` the rule reports
    itself not applicable.

    Args:
        min_gain: Smallest acceptable gain (trend) per window.
        max_metric: Metric level below which slow progress counts.
        after_fraction: Share of the planned steps after which the rule judges.
        total_steps: Planned number of global steps (required to judge).
        metric_regex: Which metrics (``metric/<name>``) to watch.
        window: Saved steps per window.
        windows: Number of recent window gains judged.

    """

    needs = Needs(collections=["metrics"])

    def __init__(
        self,
        *,
        min_gain: float = 0.01,
        max_metric: float = 0.6,
        after_fraction: float = 0.3,
        total_steps: Optional[int] = None,
        metric_regex: str = "acc",
        window: int = 10,
        windows: int = 3,
    ) -> None:
        super().__init__()
        n = type(self).__name__
        self.min_gain = _number(n, "min_gain", min_gain)
        self.max_metric = _number(n, "max_metric", max_metric)
        self.after_fraction = _number(n, "after_fraction", after_fraction, lo=0, hi=1)
        self.total_steps = (
            None
            if total_steps is None
            else _number(n, "total_steps", total_steps, lo=1, integer=True)
        )
        self.metric_regex = _regex(n, "metric_regex", metric_regex)
        self.window = _number(n, "window", window, lo=1, integer=True)
        self.windows = _number(n, "windows", windows, lo=1, integer=True)
        self._pat = re.compile(self.metric_regex)
        self._cache = _RowCache()
        self._edge = _Edge()
        self._reported_na = False
        self._buf: dict = {}
        self._means: dict = {}
        self._values: dict = {}

    def _trend(self, key: Any) -> tuple[float, float]:
        """(gain per window, its standard error) from the values of the last windows."""
        y = np.asarray(self._values[key], dtype=np.float64)
        x = np.arange(len(y), dtype=np.float64)
        x -= x.mean()
        sxx = float(np.sum(x * x))
        slope = float(np.sum(x * (y - y.mean()))) / sxx
        resid = y - y.mean() - slope * x
        se = math.sqrt(float(np.sum(resid * resid)) / max(len(y) - 2, 1) / sxx)
        return slope * self.window, se * self.window

    def evaluate(self, step: StepView) -> Optional[list]:
        """Checks one step; returns the conditions that started to hold."""
        if self.total_steps is None:
            if self._reported_na:
                return None
            self._reported_na = True
            return [
                _not_applicable(
                    self,
                    step,
                    "not applicable: SlowConvergence needs the planned number of steps "
                    "(total_steps=...)",
                    {"needs": "total_steps"},
                )
            ]
        b = step.batch()
        metrics = _members(step, "metrics")
        names = b.names
        rows = self._cache.get(
            (tuple(names), _set_key(metrics)),
            lambda: np.asarray(
                [i for i, n in enumerate(names) if n in metrics and self._pat.search(n)],
                dtype=np.int64,
            ),
            metrics,
        )
        mode = str(step.mode)
        for i in rows.tolist():
            value = float(b.mean[i])
            if not math.isfinite(value):
                continue
            key = (names[i], mode)
            buf = self._buf.setdefault(key, [])
            buf.append(value)
            if len(buf) >= self.window:
                self._means.setdefault(key, deque(maxlen=self.windows + 1)).append(
                    sum(buf) / len(buf)
                )
                vals = self._values.setdefault(key, deque(maxlen=(self.windows + 1) * self.window))
                vals.extend(buf)
                buf.clear()
        if step.step < self.after_fraction * self.total_steps:
            return None
        if not self._means and not self._buf:
            if self._reported_na:
                return None
            self._reported_na = True
            return [
                _not_applicable(
                    self,
                    step,
                    f"not applicable: no metric matches metric_regex {self.metric_regex!r}",
                    {"needs": f"metrics matching {self.metric_regex!r}"},
                )
            ]
        out = []
        for key, means in self._means.items():
            if len(means) < self.windows + 1:
                continue
            m = np.asarray(means, dtype=np.float64)
            best = float(np.max(np.diff(m)))
            gain, se = self._trend(key)
            latest = float(m[-1])
            slow = gain - se < self.min_gain and latest < self.max_metric
            if not self._edge.rising(key, slow):
                continue
            out.append(
                self.finding(
                    step,
                    f"slow convergence: metric '{key[0]}' gains {_fmt(gain)} (+- {_fmt(se)}) per "
                    f"window of {self.window} steps over the last {self.windows + 1} windows "
                    f"(< {_fmt(self.min_gain)}) and is still {_fmt(latest)} (< "
                    f"{_fmt(self.max_metric)}) after {step.step} of {self.total_steps} steps",
                    {
                        "metric": key[0],
                        "mode": key[1],
                        "gain": gain,
                        "gain_standard_error": se,
                        "best_gain": best,
                        "latest": latest,
                        "window_means": m.tolist(),
                        "min_gain": self.min_gain,
                        "max_metric": self.max_metric,
                        "after_step": self.after_fraction * self.total_steps,
                        "total_steps": self.total_steps,
                    },
                )
            )
        return out or None


# -- LearningRateMismatch -----------------------------------------------------------------------


class LearningRateMismatch(Rule):
    """The learning rate does not fit the gradients: lr * ||grad W|| / ||W|| leaves [low, high].

    Reads statistics only: the learning rate (``lr_tensor``, ``optimizer_variables``) and the
    ``l2`` of the weight tensors (``weights`` collection, biases excluded) and of their
    gradients, at the same step; norms are combined over all weight tensors of the model. The
    value is the relative update size plain SGD would make; adaptive optimizers (Adam) scale
    updates differently, so treat it as a proxy there. Steps with a zero learning rate (warm-up
    start) are skipped.

    Args:
        low: Fires when the relative update is below this (learning rate too small).
        high: Fires when it is above this (learning rate too large).
        lr_tensor: Name of the learning-rate tensor.

    """

    needs = Needs(collections=["optimizer_variables"])

    def __init__(
        self, *, low: float = 1e-5, high: float = 1e-1, lr_tensor: str = "lr/group0"
    ) -> None:
        super().__init__()
        n = type(self).__name__
        self.low = _number(n, "low", low, lo=0)
        self.high = _number(n, "high", high, lo=0, lo_open=True)
        if self.high <= self.low:
            raise InvalidArgumentError(f"{n}: high ({high}) must be greater than low ({low})")
        if not isinstance(lr_tensor, str) or not lr_tensor:
            raise InvalidArgumentError(f"{n}: lr_tensor must be a tensor name, got {lr_tensor!r}")
        self.lr_tensor = lr_tensor
        self._cache = _RowCache()
        self._edge = _Edge()
        self._reported_na = False

    def _select(self, names: Sequence[str], grads: set, weights: set) -> tuple:
        lr = [i for i, n in enumerate(names) if n == self.lr_tensor]
        where = {}
        for i, n in enumerate(names):
            if n in weights and not _is_bias(n):
                where.setdefault(n, []).append(i)
        w_rows, g_rows = [], []
        for i, n in enumerate(names):
            if n in grads:
                ws = where.get(_grad_base(n))
                if ws:
                    w_rows.append(ws.pop(0))  # same occurrence (rank) order
                    g_rows.append(i)
        return (
            np.asarray(lr, dtype=np.int64),
            np.asarray(w_rows, dtype=np.int64),
            np.asarray(g_rows, dtype=np.int64),
        )

    def evaluate(self, step: StepView) -> Optional[list]:
        """Checks one step; returns the conditions that started to hold."""
        b = step.batch()
        grads, weights = _members(step, "gradients"), _members(step, "weights")
        if not grads or not weights:
            if self._reported_na:
                return None
            self._reported_na = True
            missing = [c for c, s in (("weights", weights), ("gradients", grads)) if not s]
            return [
                _not_applicable(
                    self,
                    step,
                    f"not applicable: the run has no tensors of {', '.join(missing)}",
                    {"needs": missing},
                )
            ]
        names = b.names
        lr_rows, w_rows, g_rows = self._cache.get(
            (tuple(names), _set_key(grads), _set_key(weights)),
            lambda: self._select(names, grads, weights),
            (grads, weights),
        )
        if not len(lr_rows) or not len(g_rows):
            return None
        out = []
        g_ranks = b.rank[g_rows]
        for li in lr_rows.tolist():
            rank = int(b.rank[li])
            lr = float(b.mean[li])
            if not math.isfinite(lr) or lr == 0.0:
                continue
            m = g_ranks == rank
            both = np.concatenate([g_rows[m], w_rows[m]])
            if (b.nan[both] + b.posinf[both] + b.neginf[both]).any():
                continue  # norms of non-finite tensors mean nothing (ExplodingTensor reports)
            gn = float(np.sqrt(np.sum(np.square(b.l2[g_rows[m]]))))
            wn = float(np.sqrt(np.sum(np.square(b.l2[w_rows[m]]))))
            if not (math.isfinite(gn) and math.isfinite(wn)) or wn <= 0.0:
                continue
            ratio = abs(lr) * gn / wn
            ev = {
                "rank": rank,
                "lr": lr,
                "grad_norm": gn,
                "weight_norm": wn,
                "relative_update": ratio,
                "low": self.low,
                "high": self.high,
                "tensors": int(m.sum()),
            }
            if self._edge.rising((rank, "low"), ratio < self.low):
                out.append(
                    self.finding(
                        step,
                        f"learning rate too small: lr * ||grad W|| / ||W|| = {_fmt(ratio)} < "
                        f"{_fmt(self.low)} (lr {_fmt(lr)})",
                        ev,
                    )
                )
            if self._edge.rising((rank, "high"), ratio > self.high):
                out.append(
                    self.finding(
                        step,
                        f"learning rate too large: lr * ||grad W|| / ||W|| = {_fmt(ratio)} > "
                        f"{_fmt(self.high)} (lr {_fmt(lr)})",
                        ev,
                    )
                )
        return out or None


# -- UnnormalizedInput --------------------------------------------------------------------------


class UnnormalizedInput(Rule):
    """Model inputs are not normalised, or hidden activations are very large.

    Reads statistics of the ``inputs`` and ``outputs`` collections. Model inputs are the
    tensors of ``inputs`` matching ``input_regex`` (``model/input``); integer and boolean inputs
    (token ids, masks) are skipped. Hidden activations are the other module inputs/outputs
    (names not starting with ``model/``), except those identical to a model input or output
    (the first layer's input, the last layer's output).

    Args:
        bound: Fires when a model input has values outside ``[-bound, bound]``.
        hidden_mean: Fires when the mean absolute value of a hidden activation reaches this.
        input_regex: Which tensors of ``inputs`` are model inputs.

    """

    needs = Needs(collections=["inputs"])

    def __init__(
        self,
        *,
        bound: float = 1.0,
        hidden_mean: float = 10,
        input_regex: str = r"^model/input(\.\d+)?$",
    ) -> None:
        super().__init__()
        n = type(self).__name__
        self.bound = _number(n, "bound", bound, lo=0, lo_open=True)
        self.hidden_mean = _number(n, "hidden_mean", hidden_mean, lo=0, lo_open=True)
        self.input_regex = _regex(n, "input_regex", input_regex)
        self._pat = re.compile(self.input_regex)
        self._cache = _RowCache()
        self._edge = _Edge()
        self._integer: dict = {}

    def _select(self, names: Sequence[str], inputs: set, outputs: set) -> tuple:
        inp, model_io, hidden = [], [], []
        for i, n in enumerate(names):
            if n in inputs and self._pat.search(n):
                inp.append(i)
                model_io.append(i)
            elif n in inputs or n in outputs:
                (model_io if n.startswith("model/") else hidden).append(i)
        return tuple(np.asarray(x, dtype=np.int64) for x in (inp, model_io, hidden))

    def _is_integer(self, step: StepView, name: str, rank: int) -> bool:
        got = self._integer.get(name)
        if got is None:
            try:
                dtype = str(step.run.tensor(name).record(step.step, rank).dtype)
            except Exception:  # noqa: BLE001 - unknown dtype: judge the values
                dtype = ""
            got = self._integer[name] = dtype.startswith(("int", "uint", "bool"))
        return got

    def evaluate(self, step: StepView) -> Optional[list]:
        """Checks one step; returns the conditions that started to hold."""
        b = step.batch()
        inputs, outputs = _members(step, "inputs"), _members(step, "outputs")
        names = b.names
        inp, model_io, hidden = self._cache.get(
            (tuple(names), _set_key(inputs), _set_key(outputs)),
            lambda: self._select(names, inputs, outputs),
            (inputs, outputs),
        )
        out = []
        # model inputs outside [-bound, bound]
        bad = []
        for i in inp.tolist():
            if self._is_integer(step, names[i], int(b.rank[i])):
                continue
            lo, hi = float(b.min[i]), float(b.max[i])
            if lo < -self.bound or hi > self.bound:
                bad.append({"name": names[i], "rank": int(b.rank[i]), "min": lo, "max": hi})
        if self._edge.rising("inputs", bool(bad)):
            worst = max(bad, key=lambda d: max(abs(d["min"]), abs(d["max"])))
            out.append(
                self.finding(
                    step,
                    f"inputs are not normalised: {worst['name']} spans [{_fmt(worst['min'])}, "
                    f"{_fmt(worst['max'])}], outside [-{_fmt(self.bound)}, {_fmt(self.bound)}]",
                    {"bound": self.bound, "tensors": _listed(bad)},
                )
            )
        # hidden activations with a large mean absolute value
        if len(hidden):
            with np.errstate(divide="ignore", invalid="ignore"):
                ma = b.l1[hidden] / np.maximum(
                    b.numel[hidden] - b.nan[hidden] - b.posinf[hidden] - b.neginf[hidden], 1
                )
            cand = np.flatnonzero(ma >= self.hidden_mean)
            if len(cand) and len(model_io):
                io = model_io
                sig = np.stack([b.numel[io], b.l1[io], b.min[io], b.max[io]], axis=1)
                keep = []
                for j in cand.tolist():
                    h = hidden[j]
                    s = np.array([b.numel[h], b.l1[h], b.min[h], b.max[h]], dtype=np.float64)
                    if not (sig == s).all(axis=1).any():
                        keep.append(j)
                cand = np.asarray(keep, dtype=np.int64)
        else:
            cand, ma = np.zeros(0, dtype=np.int64), np.zeros(0)
        if self._edge.rising("hidden", bool(len(cand))):
            order = cand[np.argsort(-ma[cand], kind="stable")]
            tensors = [
                {
                    "name": names[int(hidden[j])],
                    "rank": int(b.rank[hidden[j]]),
                    "mean_abs": float(ma[j]),
                }
                for j in order.tolist()
            ]
            out.append(
                self.finding(
                    step,
                    f"hidden activations are large: mean |{tensors[0]['name']}| = "
                    f"{_fmt(tensors[0]['mean_abs'])} >= {_fmt(self.hidden_mean)}"
                    + (f" ({len(tensors)} tensors)" if len(tensors) > 1 else ""),
                    {"hidden_mean": self.hidden_mean, "tensors": _listed(tensors)},
                )
            )
        return out or None


# -- WrongOutputActivation ----------------------------------------------------------------------


class WrongOutputActivation(Rule):
    """Outputs used as probabilities do not sum to 1 (e.g. sigmoid instead of softmax).

    An output counts as probabilities when its statistics lie in ``[0, 1]`` with no NaN/Inf;
    only then are its values read, and the rule fires when a row (sum over the last axis) is
    off 1 by more than ``tolerance``. Outputs with a last axis of size 1 (binary sigmoid) are
    skipped.

    Args:
        tolerance: Allowed deviation of a row sum from 1.
        tensor_regex: Which tensors are the model's outputs.

    """

    def __init__(
        self, *, tolerance: float = 0.1, tensor_regex: str = r"^model/output(\.\d+)?$"
    ) -> None:
        super().__init__()
        n = type(self).__name__
        self.tolerance = _number(n, "tolerance", tolerance, lo=0, lo_open=True)
        self.tensor_regex = _regex(n, "tensor_regex", tensor_regex)
        self.needs = Needs(regex=self.tensor_regex, values=True)
        self._pat = re.compile(self.tensor_regex)
        self._cache = _RowCache()
        self._edge = _Edge()

    def params(self) -> dict:  # ``needs`` is an attribute here, not a parameter
        """The rule's parameters."""
        return {k: v for k, v in super().params().items() if k != "needs"}

    def evaluate(self, step: StepView) -> Optional[list]:
        """Checks one step; returns the conditions that started to hold."""
        b = step.batch()
        names = b.names
        rows = self._cache.get(
            tuple(names),
            lambda: np.asarray(
                [i for i, n in enumerate(names) if self._pat.search(n)], dtype=np.int64
            ),
        )
        out = []
        checked, holding, detail = [], [], {}
        for i in rows.tolist():
            key = (names[i], int(b.rank[i]))
            checked.append(key)
            probs = (
                bool(b.has_value[i])
                and b.numel[i] > 0
                and not (b.nan[i] or b.posinf[i] or b.neginf[i])
                and b.min[i] >= 0.0
                and b.max[i] <= 1.0
            )
            if not probs:
                continue
            v = step.value(names[i], key[1])
            if v.ndim == 0 or v.shape[-1] < 2:
                continue
            sums = np.asarray(v, dtype=np.float64).reshape(-1, v.shape[-1]).sum(axis=1)
            dev = np.abs(sums - 1.0)
            off = dev > self.tolerance
            if off.any():
                holding.append(key)
                worst = int(np.argmax(dev))
                detail[key] = {
                    "name": key[0],
                    "rank": key[1],
                    "rows": int(len(sums)),
                    "rows_off": int(off.sum()),
                    "worst_row_sum": float(sums[worst]),
                    "mean_row_sum": float(sums.mean()),
                }
        for key in self._edge.update(holding, checked):
            d = detail[key]
            out.append(
                self.finding(
                    step,
                    f"output '{key[0]}' looks like probabilities (all values in [0, 1]) but "
                    f"{d['rows_off']} of {d['rows']} rows do not sum to 1 within "
                    f"{_fmt(self.tolerance)} (worst {_fmt(d['worst_row_sum'])}): use softmax "
                    "for exclusive classes",
                    dict(d, tolerance=self.tolerance),
                )
            )
        return out or None
