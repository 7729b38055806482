"""Data and output rules: class balance, confusion, input images, token ratios.

These rules read raw values (``needs.values``) of tensors the user records with
``hook.record_tensor(name, t)`` (``labels``, ``predictions``, ``input_image``) or module inputs
the hook captures (``embedding/input``), chosen by the regular expressions of the catalogue
(``RULES.md``). Conditions are edge-triggered: reported once when they start to hold, again
only after they cleared. User documentation: ``docs/rules/data.md``.
"""

from __future__ import annotations

import math
import re
from typing import Any, Optional, Sequence, Union

import numpy as np

from ...errors import InvalidArgumentError
from ..base import Needs, Rule, StepView
from ._params import number as _number
from ._params import regex as _regex
from .literature import _Edge, _fmt, _listed, _RowCache

__all__ = ["ClassImbalance", "Confusion", "CheckInputImages", "NLPSequenceRatio"]


class _ValuesRule(Rule):
    """Base of the rules here: ``needs`` depends on a regex parameter."""

    def params(self) -> dict:
        """The rule's parameters."""
        return {k: v for k, v in super().params().items() if k != "needs"}

    def _rows(self, step: StepView, pat: re.Pattern) -> list[tuple[str, int]]:
        """``(name, rank)`` of the tensors matching ``pat`` that have stored values."""
        b = step.batch()
        names = b.names
        rows = self._cache.get(
            (pat.pattern, tuple(names)),
            lambda: np.asarray([i for i, n in enumerate(names) if pat.search(n)], dtype=np.int64),
        )
        return [(names[i], int(b.rank[i])) for i in rows.tolist() if b.has_value[i]]


def _bool(rule: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgumentError(f"{rule}: {name} must be True or False, got {value!r}")
    return value


def _class_ids(v: np.ndarray, argmax: bool, what: str) -> np.ndarray:
    """Integer class ids of labels / predictions.

    The argmax over the last axis is taken when asked, or when rows are one-hot / scores.
    """
    v = np.asarray(v)
    if argmax or (v.ndim >= 2 and v.shape[-1] > 1):
        if v.ndim == 0:
            raise InvalidArgumentError(f"cannot take argmax of a scalar {what} tensor")
        v = np.argmax(v, axis=-1)
    v = v.reshape(-1)
    if v.dtype.kind == "f":
        if not np.all(np.isfinite(v)) or not np.all(v == np.round(v)):
            raise InvalidArgumentError(
                f"{what} must hold integer class ids (or scores with argmax=True)"
            )
    if v.size and v.min() < 0:
        raise InvalidArgumentError(f"{what} hold a negative class id ({v.min()})")
    return v.astype(np.int64)


def _pair(labels: list, preds: list) -> list:
    """Pairs label tensors with prediction tensors of the same rank (by name prefix)."""
    out = []
    for ln, rank in labels:
        cands = [p for p in preds if p[1] == rank]
        if not cands:
            continue
        prefix = re.sub(r"labels?$", "", ln)
        same = [p for p in cands if re.sub(r"predictions?$", "", p[0]) == prefix]
        out.append(((ln, rank), (same or cands)[0]))
    return out


# -- ClassImbalance -----------------------------------------------------------------------------


class ClassImbalance(_ValuesRule):
    """Classes are imbalanced in the labels, or one class is mostly mispredicted.

    Counts label values (and, with predictions, mispredictions per class) over all steps.
    Once ``samples`` labels were seen it fires when the largest / smallest class count (over
    the classes present in the labels) exceeds ``threshold_imbalance``, or when a class's
    misprediction fraction exceeds ``threshold_misprediction``.

    Args:
        threshold_imbalance: Largest / smallest class count above which the rule fires.
        threshold_misprediction: Misprediction fraction of a class above which it fires.
        samples: Labels to count before judging.
        argmax: Take the argmax over the last axis of predictions (scores or probabilities).
            Labels or predictions with a last axis longer than 1 are argmaxed anyway.
        labels_regex: Which tensors hold the labels.
        predictions_regex: Which tensors hold the predictions.

    """

    def __init__(
        self,
        *,
        threshold_imbalance: float = 10,
        threshold_misprediction: float = 0.7,
        samples: int = 500,
        argmax: bool = False,
        labels_regex: str = ".*labels",
        predictions_regex: str = ".*predictions",
    ) -> None:
        super().__init__()
        n = type(self).__name__
        self.threshold_imbalance = _number(n, "threshold_imbalance", threshold_imbalance, lo=1)
        self.threshold_misprediction = _number(
            n, "threshold_misprediction", threshold_misprediction, lo=0, hi=1, hi_open=True
        )
        self.samples = _number(n, "samples", samples, lo=1, integer=True)
        self.argmax = _bool(n, "argmax", argmax)
        self.labels_regex = _regex(n, "labels_regex", labels_regex)
        self.predictions_regex = _regex(n, "predictions_regex", predictions_regex)
        self.needs = Needs(regex=self.labels_regex, values=True)
        self._lpat, self._ppat = re.compile(labels_regex), re.compile(predictions_regex)
        self._cache = _RowCache()
        self._edge = _Edge()
        self._counts = np.zeros(0, dtype=np.int64)
        self._wrong = np.zeros(0, dtype=np.int64)
        self._judged = np.zeros(0, dtype=np.int64)  # labels that had a prediction

    @staticmethod
    def _add(acc: np.ndarray, ids: np.ndarray) -> np.ndarray:
        c = np.bincount(ids, minlength=len(acc)) if ids.size else np.zeros(len(acc), np.int64)
        if len(c) > len(acc):
            acc = np.concatenate([acc, np.zeros(len(c) - len(acc), dtype=np.int64)])
        acc[: len(c)] += c
        return acc

    def evaluate(self, step: StepView) -> Optional[list]:
        """Checks one step; returns the conditions that started to hold."""
        labels = self._rows(step, self._lpat)
        if not labels:
            return None
        preds = self._rows(step, self._ppat)
        paired = dict(_pair(labels, preds))
        for key in labels:
            y = _class_ids(step.value(*key), False, f"labels '{key[0]}'")
            self._counts = self._add(self._counts, y)
            pkey = paired.get(key)
            if pkey is None:
                continue
            p = _class_ids(step.value(*pkey), self.argmax, f"predictions '{pkey[0]}'")
            if p.shape != y.shape:
                raise InvalidArgumentError(
                    f"labels '{key[0]}' ({y.size}) and predictions '{pkey[0]}' ({p.size}) "
                    "differ in size"
                )
            self._judged = self._add(self._judged, y)
            self._wrong = self._add(self._wrong, y[p != y])
        total = int(self._counts.sum())
        if total < self.samples:
            return None
        out = []
        present = np.flatnonzero(self._counts)
        counts = self._counts[present]
        big, small = int(counts.max()), int(counts.min())
        ratio = big / small
        if self._edge.rising("imbalance", ratio > self.threshold_imbalance):
            cmax, cmin = int(present[np.argmax(counts)]), int(present[np.argmin(counts)])
            out.append(
                self.finding(
                    step,
                    f"class imbalance: class {cmax} has {big} labels, class {cmin} only {small} "
                    f"(ratio {_fmt(ratio)} > {_fmt(self.threshold_imbalance)}) after {total} "
                    "samples",
                    {
                        "ratio": ratio,
                        "largest_class": cmax,
                        "largest_count": big,
                        "smallest_class": cmin,
                        "smallest_count": small,
                        "samples": total,
                        "class_counts": {int(c): int(self._counts[c]) for c in present},
                        "threshold_imbalance": self.threshold_imbalance,
                    },
                )
            )
        judged = self._judged
        wrong = np.zeros(len(judged), dtype=np.int64)
        wrong[: len(self._wrong)] = self._wrong[: len(judged)]
        with np.errstate(divide="ignore", invalid="ignore"):
            frac = np.where(judged > 0, wrong / np.maximum(judged, 1), 0.0)
        bad = np.flatnonzero(frac > self.threshold_misprediction)
        if self._edge.rising("misprediction", bool(len(bad))):
            order = bad[np.argsort(-frac[bad], kind="stable")]
            classes = [
                {
                    "class": int(c),
                    "misprediction": float(frac[c]),
                    "wrong": int(wrong[c]),
                    "labels": int(judged[c]),
                }
                for c in order.tolist()
            ]
            w = classes[0]
            out.append(
                self.finding(
                    step,
                    f"class {w['class']} is mispredicted {w['misprediction']:.0%} of the time "
                    f"({w['wrong']} of {w['labels']}; threshold "
                    f"{self.threshold_misprediction:.0%})"
                    + (f"; {len(classes)} classes affected" if len(classes) > 1 else ""),
                    {
                        "classes": _listed(classes),
                        "threshold_misprediction": self.threshold_misprediction,
                        "samples": total,
                    },
                )
            )
        return out or None


# -- Confusion ----------------------------------------------------------------------------------


class Confusion(_ValuesRule):
    """The confusion matrix of a step has a weak diagonal or a strong off-diagonal cell.

    At each step where labels and predictions are saved, builds the confusion matrix (rows:
    true class) and normalises each row by its count; fires when a diagonal share is below
    ``min_diag`` or an off-diagonal share is above ``max_off_diag``. Classes absent from the
    step's labels are not judged.

    Args:
        category_no: Number of classes (default: inferred, the largest id seen plus one).
        min_diag: Smallest acceptable share of a class predicted correctly.
        max_off_diag: Largest acceptable share of a class predicted as one other class.
        argmax: Take the argmax over the last axis of predictions.
        labels_regex: Which tensors hold the labels.
        predictions_regex: Which tensors hold the predictions.
        start_step: First mode step judged (a boosted model's first iterations predict
            little more than the class prior; 10 suits XGBoost runs).

    """

    def __init__(
        self,
        *,
        category_no: Optional[int] = None,
        min_diag: float = 0.9,
        max_off_diag: float = 0.1,
        argmax: bool = False,
        labels_regex: str = ".*labels",
        predictions_regex: str = ".*predictions",
        start_step: int = 0,
    ) -> None:
        super().__init__()
        n = type(self).__name__
        self.category_no = (
            None
            if category_no is None
            else _number(n, "category_no", category_no, lo=2, integer=True)
        )
        self.min_diag = _number(n, "min_diag", min_diag, lo=0, hi=1)
        self.max_off_diag = _number(n, "max_off_diag", max_off_diag, lo=0, hi=1)
        self.argmax = _bool(n, "argmax", argmax)
        self.labels_regex = _regex(n, "labels_regex", labels_regex)
        self.predictions_regex = _regex(n, "predictions_regex", predictions_regex)
        self.needs = Needs(regex=self.labels_regex, values=True)
        self._lpat, self._ppat = re.compile(labels_regex), re.compile(predictions_regex)
        self._cache = _RowCache()
        self._edge = _Edge()
        self._k = self.category_no or 0
        self.start_step = _number(n, "start_step", start_step, lo=0, integer=True)

    def evaluate(self, step: StepView) -> Optional[list]:
        """Checks one step; returns the conditions that started to hold."""
        if step.mode_step < self.start_step:
            return None
        labels = self._rows(step, self._lpat)
        preds = self._rows(step, self._ppat)
        out = []
        for lkey, pkey in _pair(labels, preds):
            y = _class_ids(step.value(*lkey), False, f"labels '{lkey[0]}'")
            p = _class_ids(step.value(*pkey), self.argmax, f"predictions '{pkey[0]}'")
            if p.shape != y.shape:
                raise InvalidArgumentError(
                    f"labels '{lkey[0]}' ({y.size}) and predictions '{pkey[0]}' ({p.size}) "
                    "differ in size"
                )
            if not y.size:
                continue
            top = int(max(y.max(), p.max())) + 1
            if self.category_no is not None and top > self.category_no:
                raise InvalidArgumentError(
                    f"class id {top - 1} in '{lkey[0]}'/'{pkey[0]}' is out of range for "
                    f"category_no={self.category_no}"
                )
            self._k = k = max(self._k, top)
            cm = np.bincount(y * k + p, minlength=k * k).reshape(k, k)
            rows = cm.sum(axis=1)
            present = np.flatnonzero(rows)
            share = cm[present] / rows[present, None]
            diag = share[np.arange(len(present)), present]
            weak = [
                {"true": int(c), "predicted": int(c), "share": float(s)}
                for c, s in zip(present.tolist(), diag.tolist())
                if s < self.min_diag
            ]
            off = share.copy()
            off[np.arange(len(present)), present] = 0.0
            ri, cj = np.nonzero(off > self.max_off_diag)
            strong = sorted(
                (
                    {"true": int(present[i]), "predicted": int(j), "share": float(off[i, j])}
                    for i, j in zip(ri.tolist(), cj.tolist())
                ),
                key=lambda d: -d["share"],
            )
            key = (lkey[0], pkey[0], lkey[1])
            if not self._edge.rising(key, bool(weak or strong)):
                continue
            parts = []
            if weak:
                w = min(weak, key=lambda d: d["share"])
                parts.append(
                    f"class {w['true']} is predicted correctly only {w['share']:.0%} of the time "
                    f"(min_diag {self.min_diag:.0%})"
                )
            if strong:
                s = strong[0]
                parts.append(
                    f"class {s['true']} is predicted as {s['predicted']} {s['share']:.0%} of the "
                    f"time (max_off_diag {self.max_off_diag:.0%})"
                )
            out.append(
                self.finding(
                    step,
                    "confusion: " + "; ".join(parts),
                    {
                        "labels": lkey[0],
                        "predictions": pkey[0],
                        "rank": lkey[1],
                        "category_no": k,
                        "weak_diagonal": _listed(weak),
                        "strong_off_diagonal": _listed(strong),
                        "min_diag": self.min_diag,
                        "max_off_diag": self.max_off_diag,
                        "matrix": cm.tolist() if k <= 20 else None,
                    },
                )
            )
        return out or None


# -- CheckInputImages ---------------------------------------------------------------------------


class CheckInputImages(_ValuesRule):
    """Input images are not normalised: a channel's mean is far from 0.

    Accumulates per-channel sums over every saved image tensor matching ``regex`` (axis
    ``channel``; images counted over the axes before it) and, once ``threshold_samples`` images
    were seen, fires when a channel's mean deviates from 0 by more than ``threshold_mean``.

    Args:
        threshold_mean: Largest acceptable absolute channel mean.
        threshold_samples: Images to see before judging.
        regex: Which tensors hold input images.
        channel: Axis of the channels (1 for NCHW, 3 or -1 for NHWC).

    """

    def __init__(
        self,
        *,
        threshold_mean: float = 0.2,
        threshold_samples: int = 500,
        regex: str = ".*input_image",
        channel: int = 1,
    ) -> None:
        super().__init__()
        n = type(self).__name__
        self.threshold_mean = _number(n, "threshold_mean", threshold_mean, lo=0)
        self.threshold_samples = _number(
            n, "threshold_samples", threshold_samples, lo=1, integer=True
        )
        self.regex = _regex(n, "regex", regex)
        self.channel = _number(n, "channel", channel, integer=True)
        self.needs = Needs(regex=self.regex, values=True)
        self._pat = re.compile(regex)
        self._cache = _RowCache()
        self._edge = _Edge()
        self._acc: dict = {}  # (name, rank) -> [sums, counts, images]

    def evaluate(self, step: StepView) -> Optional[list]:
        """Checks one step; returns the conditions that started to hold."""
        out = []
        for key in self._rows(step, self._pat):
            v = np.asarray(step.value(*key))
            if not -v.ndim <= self.channel < v.ndim:
                raise InvalidArgumentError(
                    f"channel={self.channel} is out of range for '{key[0]}' of shape {v.shape}"
                )
            ax = self.channel % v.ndim
            x = np.moveaxis(v.astype(np.float64, copy=False), ax, 0).reshape(v.shape[ax], -1)
            finite = np.isfinite(x)
            sums = np.where(finite, x, 0.0).sum(axis=1)
            counts = finite.sum(axis=1)
            images = int(np.prod(v.shape[:ax])) if ax > 0 else 1
            acc = self._acc.get(key)
            if acc is None or len(acc[0]) != len(sums):
                acc = self._acc[key] = [np.zeros(len(sums)), np.zeros(len(sums), np.int64), 0]
            acc[0] += sums
            acc[1] += counts
            acc[2] += images
            if acc[2] < self.threshold_samples:
                continue
            with np.errstate(divide="ignore", invalid="ignore"):
                means = np.where(acc[1] > 0, acc[0] / np.maximum(acc[1], 1), 0.0)
            bad = np.flatnonzero(np.abs(means) > self.threshold_mean)
            if not self._edge.rising(key, bool(len(bad))):
                continue
            worst = int(bad[np.argmax(np.abs(means[bad]))])
            out.append(
                self.finding(
                    step,
                    f"input images '{key[0]}' are not normalised: channel {worst} has mean "
                    f"{_fmt(means[worst])} (|mean| > {_fmt(self.threshold_mean)}) over "
                    f"{acc[2]} images",
                    {
                        "tensor": key[0],
                        "rank": key[1],
                        "channel_means": means.tolist(),
                        "channels_off": bad.tolist(),
                        "images": acc[2],
                        "threshold_mean": self.threshold_mean,
                        "channel_axis": self.channel,
                    },
                )
            )
        return out or None


# -- NLPSequenceRatio ---------------------------------------------------------------------------


def _list_param(rule: str, name: str, value: Any) -> list[float]:
    """A comma-separated string (SageMaker style) or a sequence of numbers."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        items: Sequence = [value]
    elif isinstance(value, str):
        items = [s.strip() for s in value.split(",")]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise InvalidArgumentError(
            f"{rule}: {name} must be a comma-separated string or a list of numbers, got {value!r}"
        )
    out = []
    for it in items:
        try:
            f = float(it)
        except (TypeError, ValueError):
            raise InvalidArgumentError(f"{rule}: {name} holds a non-number: {it!r}") from None
        if isinstance(it, bool) or not math.isfinite(f):
            raise InvalidArgumentError(f"{rule}: {name} holds an invalid number: {it!r}")
        out.append(f)
    if not out:
        raise InvalidArgumentError(f"{rule}: {name} is empty")
    return out


class NLPSequenceRatio(_ValuesRule):
    """Too many tokens of the input sequences are padding / unknown tokens.

    At each step, for every saved tensor matching ``tensor_regex`` (the embedding layer's input:
    token ids), computes the share of each token of ``token_values`` and fires when it exceeds
    the matching threshold of ``token_thresholds_percent``.

    Args:
        tensor_regex: Which tensors hold token ids.
        token_values: Token ids to watch, comma-separated (``"0,1"``) or a list.
        token_thresholds_percent: Threshold (%) per token, same length as ``token_values`` (or
            one value for all).

    """

    def __init__(
        self,
        *,
        tensor_regex: str = ".*embedding.*input",
        token_values: Union[str, Sequence[int]] = "0",
        token_thresholds_percent: Union[str, Sequence[float]] = "50",
    ) -> None:
        super().__init__()
        n = type(self).__name__
        self.tensor_regex = _regex(n, "tensor_regex", tensor_regex)
        tokens = _list_param(n, "token_values", token_values)
        if any(t != int(t) for t in tokens):
            raise InvalidArgumentError(
                f"{n}: token_values must be integer ids, got {token_values!r}"
            )
        thresholds = _list_param(n, "token_thresholds_percent", token_thresholds_percent)
        if len(thresholds) == 1:
            thresholds = thresholds * len(tokens)
        if len(thresholds) != len(tokens):
            raise InvalidArgumentError(
                f"{n}: token_thresholds_percent has {len(thresholds)} values for "
                f"{len(tokens)} token_values"
            )
        if any(not 0 <= t <= 100 for t in thresholds):
            raise InvalidArgumentError(
                f"{n}: token_thresholds_percent must lie in [0, 100], "
                f"got {token_thresholds_percent!r}"
            )
        self.token_values = token_values
        self.token_thresholds_percent = token_thresholds_percent
        self.needs = Needs(regex=self.tensor_regex, values=True)
        self._tokens = [int(t) for t in tokens]
        self._thresholds = thresholds
        self._pat = re.compile(tensor_regex)
        self._cache = _RowCache()
        self._edge = _Edge()

    def evaluate(self, step: StepView) -> Optional[list]:
        """Checks one step; returns the conditions that started to hold."""
        out = []
        for key in self._rows(step, self._pat):
            v = np.asarray(step.value(*key)).reshape(-1)
            if not v.size:
                continue
            shares = [float(np.count_nonzero(v == t)) * 100.0 / v.size for t in self._tokens]
            over = [
                {"token": t, "percent": s, "threshold_percent": th}
                for t, s, th in zip(self._tokens, shares, self._thresholds)
                if s > th
            ]
            new = self._edge.update(
                [(key, d["token"]) for d in over], [(key, t) for t in self._tokens]
            )
            if not new:
                continue  # each (tensor, token) is reported when it starts to exceed
            started = {t for _, t in new}
            over = [d for d in over if d["token"] in started]
            w = max(over, key=lambda d: d["percent"] - d["threshold_percent"])
            out.append(
                self.finding(
                    step,
                    f"token {w['token']} makes up {w['percent']:.1f}% of '{key[0]}' (threshold "
                    f"{w['threshold_percent']:g}%)"
                    + (f"; {len(over)} tokens over their threshold" if len(over) > 1 else ""),
                    {
                        "tensor": key[0],
                        "rank": key[1],
                        "tokens": over,
                        "shares_percent": dict(zip(self._tokens, shares)),
                        "elements": int(v.size),
                    },
                )
            )
        return out or None
