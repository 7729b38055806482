"""Rules over the ranks of a distributed run (catalogue: docs/rules/ranks.md)."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np

from ..base import Finding, Needs, Rule, StepView
from ._params import bad, number

__all__ = ["RankDivergence"]

_STATS = ("l2", "l1", "mean", "std", "abs_max", "min", "max")


def _names(rule: str, param: str, value: Union[str, Sequence[str], None]) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not all(isinstance(v, str) and v for v in value):
        raise bad(rule, param, "must be a collection name or a list of them", value)
    return tuple(value)


class RankDivergence(Rule):
    """Fires when one rank's statistics depart from the other ranks' at the same step.

    Under data parallelism (DDP, FSDP's replicated parameters, Horovod...) weights and the
    gradients the optimizer uses are the same on every rank: gradients are averaged before the
    optimizer step. A rank whose weights or gradients differ is a desynchronised replica (a
    missed broadcast, a rank-dependent code path, non-deterministic kernels that drifted). Losses
    differ by rank (each sees its own data) but stay comparable: a rank whose loss is NaN/Inf
    while others are finite, or far from the others', has bad data or a broken replica.

    Reads statistics only, of tensors saved by at least two ranks at the step.

    Args:
        sync_collections: Collections that must agree across ranks.
        local_collections: Collections that may differ by rank but must stay comparable.
        stat: Statistic compared for synchronised tensors.
        rtol: Relative tolerance: a synchronised tensor diverges when a rank's ``stat`` differs
            from the ranks' median by more than ``rtol * max(|median|, atol)``.
        atol: Floor of the scale, so all-zero tensors do not divide by zero.
        loss_factor: A local tensor (e.g. the loss) diverges when a rank's mean is more than
            ``loss_factor`` times, or less than ``1 / loss_factor`` times, the other ranks'
            median (compared by absolute value).

    """

    severity = "error"

    def __init__(
        self,
        sync_collections: Union[str, Sequence[str], None] = ("weights", "biases", "gradients"),
        local_collections: Union[str, Sequence[str], None] = ("losses",),
        stat: str = "l2",
        rtol: float = 1e-3,
        atol: float = 1e-12,
        loss_factor: float = 5.0,
    ) -> None:
        super().__init__()
        self.sync_collections = _names(self.name, "sync_collections", sync_collections)
        self.local_collections = _names(self.name, "local_collections", local_collections)
        if not self.sync_collections and not self.local_collections:
            raise bad(
                self.name,
                "sync_collections/local_collections",
                "must not both be empty",
                (sync_collections, local_collections),
            )
        if stat not in _STATS:
            raise bad(self.name, "stat", f"must be one of {', '.join(_STATS)}", stat)
        self.stat = stat
        self.rtol = number(self.name, "rtol", rtol, lo=0.0, lo_open=True)
        self.atol = number(self.name, "atol", atol, lo=0.0)
        self.loss_factor = number(self.name, "loss_factor", loss_factor, lo=1.0, lo_open=True)
        self.needs = Needs(collections=[*self.sync_collections, *self.local_collections])
        self._reported: set[tuple[str, int]] = set()

    def evaluate(self, step: StepView) -> Optional[Finding]:
        """Compares, per tensor, the statistics of every rank that saved it at ``step``."""
        if len(step.ranks) < 2:
            return None
        diverged: dict[tuple[str, int], dict] = {}
        for collections, check in (
            (self.sync_collections, self._sync),
            (self.local_collections, self._local),
        ):
            if collections:
                b = step.batch(collection=list(collections))
                if len(b):
                    diverged.update(check(b))
        now = set(diverged)
        new = now - self._reported
        self._reported = now  # edge-triggered: a (tensor, rank) is reported again once it recovered
        if not new:
            return None
        ranks = sorted({r for _, r in new})
        tensors = sorted({n for n, _ in new})
        detail = {f"{n}@rank{r}": diverged[(n, r)] for n, r in sorted(new)}
        return self.finding(
            step,
            f"rank(s) {ranks} diverge from the other ranks in {len(tensors)} tensor(s): "
            + ", ".join(f"{k} ({v['why']})" for k, v in list(detail.items())[:5])
            + (" ..." if len(detail) > 5 else ""),
            {
                "ranks": ranks,
                "tensors": tensors,
                "detail": detail,
                "stat": self.stat,
                "rtol": self.rtol,
                "loss_factor": self.loss_factor,
            },
        )

    @staticmethod
    def _groups(b) -> list[np.ndarray]:
        """Row indices of each tensor saved by at least two ranks."""
        order = np.argsort(b.name_id, kind="stable")
        ids = b.name_id[order]
        cuts = np.flatnonzero(np.diff(ids)) + 1
        return [g for g in np.split(order, cuts) if len(g) >= 2]

    def _sync(self, b) -> dict[tuple[str, int], dict]:
        out: dict[tuple[str, int], dict] = {}
        vals = getattr(b, self.stat).astype(np.float64)
        bad_count = b.nan + b.posinf + b.neginf
        for g in self._groups(b):
            nonfinite = bad_count[g] > 0
            if nonfinite.any() and not nonfinite.all():
                for i in g[nonfinite]:
                    out[(b.names[i], int(b.rank[i]))] = {
                        "why": f"{int(bad_count[i])} NaN/Inf values, other ranks none",
                        "nonfinite": int(bad_count[i]),
                    }
                continue
            v = vals[g]
            med = float(np.median(v))
            scale = max(abs(med), self.atol)
            dev = np.abs(v - med) / scale
            for i, d in zip(g[dev > self.rtol], dev[dev > self.rtol]):
                out[(b.names[i], int(b.rank[i]))] = {
                    "why": f"{self.stat} {vals[i]:.6g} vs median {med:.6g} (rel. {d:.2g})",
                    "value": float(vals[i]),
                    "median": med,
                    "relative": float(d),
                }
        return out

    def _local(self, b) -> dict[tuple[str, int], dict]:
        out: dict[tuple[str, int], dict] = {}
        mean = np.abs(b.mean.astype(np.float64))
        bad_count = b.nan + b.posinf + b.neginf
        for g in self._groups(b):
            nonfinite = (bad_count[g] > 0) | ~np.isfinite(mean[g])
            if nonfinite.any() and not nonfinite.all():
                for i in g[nonfinite]:
                    out[(b.names[i], int(b.rank[i]))] = {
                        "why": "NaN/Inf while other ranks are finite",
                        "value": float(b.mean[i]),
                    }
                continue
            if nonfinite.all():
                continue
            for i in g:
                others = mean[g[g != i]]
                ref = float(np.median(others))
                v = float(mean[i])
                if ref > 0 and (v > self.loss_factor * ref or v * self.loss_factor < ref):
                    out[(b.names[i], int(b.rank[i]))] = {
                        "why": f"{v:.4g} vs other ranks' median {ref:.4g}",
                        "value": float(b.mean[i]),
                        "median": ref,
                    }
        return out
