"""XGBoost rules: feature importance concentrated on a few features, trees that stay shallow.

Both read statistics only: the XGBoost hook saves each feature's importance as a scalar
(``feature_importance/<type>/<feature>``) and per-tree depths as a vector (``trees/depth``), so
a scalar's mean is its value and a vector's max is its deepest tree. Conditions are
edge-triggered (reported once when they start to hold, again only after they cleared). The
loss, class and confusion rules (``LossNotDecreasing``, ``ClassImbalance``, ``Confusion``) work
on XGBoost runs unchanged. User documentation: ``docs/rules/xgboost.md``.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Any, Optional

import numpy as np

from ...errors import InvalidArgumentError
from ..base import Finding, Needs, Rule, StepView

__all__ = ["FeatureImportanceOverweight", "TreeDepth"]

_IMPORTANCE = re.compile(r"^(.*feature_importance/[^/]+)/(.+)$")


def _num(rule: str, name: str, value: Any, lo: float, *, integer: bool = False, hi=None) -> Any:
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        what = "an integer" if integer else "a number"
        raise InvalidArgumentError(f"{rule}: {name} must be {what}, got {value!r}")
    if not math.isfinite(float(value)) or value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise InvalidArgumentError(f"{rule}: {name} must be {rng}, got {value!r}")
    return int(value) if integer else float(value)


def _pattern(rule: str, name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidArgumentError(f"{rule}: {name} must be a non-empty string, got {value!r}")
    try:
        re.compile(value)
    except re.error as e:
        raise InvalidArgumentError(f"{rule}: {name} is not a valid regex: {e}") from None
    return value


class FeatureImportanceOverweight(Rule):
    """The ``nfeatures`` most important features hold more than ``threshold`` of the total.

    At each step, for each importance group among the tensors matching ``tensor_regex``
    (``feature_importance/weight/<feature>`` by default: split counts), sums the importance of
    the ``nfeatures`` largest features and divides by the sum over all features; fires when
    that share exceeds ``threshold``. A model that leans on a leaked label column or an ID
    column shows this. Steps before ``start_step`` (mode step) are not judged: the first few
    trees use few features by construction.

    Args:
        threshold: Largest acceptable share of the top features (0..1).
        nfeatures: How many top features are summed.
        tensor_regex: Which importance scalars to read (``feature_importance/gain/`` for gain).
        start_step: First mode step judged.

    """

    def __init__(
        self,
        threshold: float = 0.8,
        nfeatures: int = 3,
        tensor_regex: str = r"feature_importance/weight/",
        start_step: int = 10,
    ) -> None:
        super().__init__()
        n = self.name
        self.threshold = _num(n, "threshold", threshold, 0.0, hi=1.0)
        self.nfeatures = _num(n, "nfeatures", nfeatures, 1, integer=True)
        self.tensor_regex = _pattern(n, "tensor_regex", tensor_regex)
        self.start_step = _num(n, "start_step", start_step, 0, integer=True)
        self.needs = Needs(regex=self.tensor_regex)
        self._active: set = set()

    def params(self) -> dict:
        """The rule's parameters."""
        return {k: v for k, v in super().params().items() if k != "needs"}

    def evaluate(self, step: StepView) -> Optional[list]:
        """Checks the importance shares saved at ``step``."""
        if step.mode_step < self.start_step:
            return None
        b = step.batch(regex=self.tensor_regex)
        if not len(b):
            return None
        groups: dict[tuple, tuple[list, list]] = {}
        for name, rank, mean in zip(b.names, b.rank.tolist(), b.mean.tolist()):
            m = _IMPORTANCE.match(name)
            group, feature = (m.group(1), m.group(2)) if m else ("", name)
            g = groups.setdefault((group, rank), ([], []))
            g[0].append(feature)
            g[1].append(mean)
        out = []
        for key, (features, values) in groups.items():
            v = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0)
            v = np.maximum(v, 0.0)
            total = float(v.sum())
            if total <= 0.0:
                continue
            order = np.argsort(-v, kind="stable")[: self.nfeatures]
            share = float(v[order].sum()) / total
            over = share > self.threshold
            if not over:
                self._active.discard(key)
                continue
            if key in self._active:
                continue
            self._active.add(key)
            top = [
                {"feature": features[i], "importance": float(v[i]), "share": float(v[i]) / total}
                for i in order.tolist()
            ]
            group = key[0] or self.tensor_regex
            out.append(
                self.finding(
                    step,
                    f"the top {len(top)} feature(s) hold {share:.0%} of '{group}' (threshold "
                    f"{self.threshold:.0%}): "
                    + ", ".join(f"{t['feature']} {t['share']:.0%}" for t in top),
                    {
                        "importance": group,
                        "rank": key[1],
                        "share": share,
                        "top_features": top,
                        "features_used": len(features),
                        "threshold": self.threshold,
                        "nfeatures": self.nfeatures,
                    },
                )
            )
        return out or None


class TreeDepth(Rule):
    """Trees stay shallower than ``depth`` (or, optionally, grow deeper than ``max_depth``).

    XGBoost rejects splits that do not reduce the loss by ``gamma`` or that leave children
    lighter than ``min_child_weight``, so trees may not grow as deep as allowed. Reads the
    ``trees/depth`` vectors of the XGBoost hook (depth: edges from the root to the deepest
    leaf) and fires once ``min_trees`` trees were seen and none of them reached ``depth``
    (over-regularised or starved training: the model cannot learn interactions). When the
    run's ``hyperparameters/max_depth`` is captured and positive, the threshold is the smaller
    of ``depth`` and it, so a run configured for shallow trees is judged against its own
    limit. With ``max_depth`` set, it also fires when a tree deeper than ``max_depth`` is built
    (unbounded trees, e.g. ``max_depth=0`` with ``grow_policy="lossguide"``).

    Args:
        depth: Depth that some tree is expected to reach.
        min_trees: Trees to see before judging the shallow condition.
        max_depth: Deepest acceptable tree (``None``: no upper check).
        tensor_regex: Which tensors hold per-tree depths.

    """

    def __init__(
        self,
        depth: int = 4,
        min_trees: int = 10,
        max_depth: Optional[int] = None,
        tensor_regex: str = r"(?:^|/)trees/depth$",
    ) -> None:
        super().__init__()
        n = self.name
        self.depth = _num(n, "depth", depth, 1, integer=True)
        self.min_trees = _num(n, "min_trees", min_trees, 1, integer=True)
        self.max_depth = (
            None if max_depth is None else _num(n, "max_depth", max_depth, 1, integer=True)
        )
        self.tensor_regex = _pattern(n, "tensor_regex", tensor_regex)
        self.needs = Needs(regex=self.tensor_regex)
        self._limit: Optional[float] = None  # the run's max_depth hyperparameter
        self._seen: dict[int, list] = {}  # rank -> [trees, deepest, fired shallow, fired deep]

    def params(self) -> dict:
        """The rule's parameters."""
        return {k: v for k, v in super().params().items() if k != "needs"}

    def evaluate(self, step: StepView) -> Optional[list]:
        """Updates the depths seen with the trees saved at ``step``."""
        if self._limit is None:
            row = step.row("hyperparameters/max_depth")
            if row is not None and math.isfinite(row["mean"]):
                self._limit = float(row["mean"])
        b = step.batch(regex=self.tensor_regex)
        out: list[Finding] = []
        for rank, numel, mx in zip(b.rank.tolist(), b.numel.tolist(), b.max.tolist()):
            if not numel:
                continue
            st = self._seen.setdefault(rank, [0, -1, False, False])
            st[0] += int(numel)
            st[1] = max(st[1], int(mx))
            expected = self.depth
            if self._limit is not None and self._limit > 0:
                expected = min(expected, int(self._limit))
            if st[0] >= self.min_trees and st[1] < expected and not st[2]:
                st[2] = True
                out.append(
                    self.finding(
                        step,
                        f"trees stay shallow: none of the {st[0]} trees so far is deeper than "
                        f"{st[1]} (expected depth {expected}); splits are being rejected "
                        "(gamma, min_child_weight, lambda too large, or nothing left to learn)",
                        {
                            "rank": rank,
                            "deepest": st[1],
                            "trees": st[0],
                            "depth": self.depth,
                            "expected_depth": expected,
                            "max_depth_hyperparameter": self._limit,
                        },
                    )
                )
            elif st[2] and st[1] >= expected:
                st[2] = False
            if self.max_depth is not None and mx > self.max_depth and not st[3]:
                st[3] = True
                out.append(
                    self.finding(
                        step,
                        f"a tree of depth {int(mx)} was built (max_depth {self.max_depth}): "
                        "deep trees memorise the training data",
                        {
                            "rank": rank,
                            "tree_depth": int(mx),
                            "max_depth": self.max_depth,
                            "trees": st[0],
                        },
                    )
                )
        return out or None
