"""Plots of captured runs as matplotlib Figures (``tv.plot``), for notebooks and reports.

Every function takes a run path, a :class:`~tensorvigil.Run` from ``tv.open``, or a list of
them (the runs are then drawn side by side, or overlaid for curves, with shared axis ranges
where that helps comparison) and returns a :class:`matplotlib.figure.Figure`. Figures are
created with the Agg canvas and without pyplot, so nothing is displayed or kept alive by
matplotlib's global state; in a notebook the returned Figure renders inline.

Histograms are computed from the stored values when a record has them; otherwise from the
fixed-bin histogram stored with the statistics (captured with ``hist_bins``), re-binned onto
the plot's common range by assuming values spread uniformly inside each stored bin. Figures
say so when they fall back.

Example:
    >>> import tensorvigil as tv
    >>> tv.plot.stat("runs/exp1", r"weight/grad$", stat="l2", logy=True)
    >>> tv.plot.heatmap(["runs/bad", "runs/good"], "0.weight/grad")

"""

from __future__ import annotations

import base64
import io
import math
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import numpy as np

from .errors import (
    InvalidArgumentError,
    NotFoundError,
    StepNotAvailableError,
    TensorNotFoundError,
    UnsupportedError,
)
from .modes import ModeLike, to_mode
from .store import Run, open_run

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

RunLike = Union[str, "os.PathLike[str]", Run]
RunsLike = Union[RunLike, Sequence[RunLike]]
ValueRange = Union[str, tuple[float, float]]

#: Default resolution of figures (dots per inch); small so reports stay small.
DPI = 90
#: Statistics that :func:`stat` can plot (columns of ``Run.stats``).
STATS = (
    "min",
    "max",
    "mean",
    "var",
    "std",
    "l1",
    "l2",
    "abs_max",
    "numel",
    "nan",
    "posinf",
    "neginf",
    "zeros",
)
#: Line styles told apart runs in overlaid plots.
_RUN_STYLES = ("-", "--", ":", "-.")
#: Ranges of two runs are shared when their spans differ by at most this factor.
_SHARE_FACTOR = 10.0


# -- matplotlib -------------------------------------------------------------------------------


def _figure(width: float, height: float, dpi: int = DPI) -> Figure:
    """A new Figure with an Agg canvas (no pyplot, no display) and no layout engine."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UnsupportedError(
            "tv.plot needs matplotlib: pip install 'tensorvigil[plot]'"
        ) from None
    fig = Figure(figsize=(width, height), dpi=dpi, layout=None)
    FigureCanvasAgg(fig)
    return fig


def _panels(
    nrows: int,
    ncols: int,
    *,
    w: float = 4.6,
    h: float = 2.9,
    top: float = 0.45,
    wgap: float = 0.9,
    hgap: float = 0.75,
    cbar: bool = False,
    sharey: bool = False,
) -> tuple[Figure, Any, Any]:
    """A figure of ``nrows x ncols`` panels of ``w x h`` inches with fixed margins.

    Fixed margins instead of a layout engine: constrained layout more than doubled the time
    to render a report. Returns ``(figure, axes[nrows][ncols], colour-bar axes or None)``.
    """
    left, right, bottom = 0.85, 0.2, 0.55
    extra = 1.0 if cbar else 0.0
    width = left + ncols * w + (ncols - 1) * wgap + right + extra
    height = top + nrows * h + (nrows - 1) * hgap + bottom
    fig = _figure(width, height)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=sharey)
    fig.subplots_adjust(
        left=left / width,
        right=(width - right - extra) / width,
        bottom=bottom / height,
        top=1 - top / height,
        wspace=wgap / w,
        hspace=hgap / h,
    )
    cax = None
    if cbar:
        x = (width - right - extra + 0.15) / width
        cax = fig.add_axes(
            (x, bottom / height, 0.14 / width, (height - top - bottom) / height), label="<colorbar>"
        )
    return fig, axes, cax


def _cmap(name: str) -> Any:
    import matplotlib

    return matplotlib.colormaps[name]


# -- runs -------------------------------------------------------------------------------------


class RunData:
    """A run being plotted: the reader, a label and caches shared between plots.

    Plot functions accept these too, so a report reads each histogram once.

    Args:
        run: A run path or a :class:`~tensorvigil.Run`.
        label: Name shown in legends and titles (default: the run directory's name).

    """

    def __init__(self, run: RunLike, label: Optional[str] = None) -> None:
        if isinstance(run, Run):
            self.run = run
        elif isinstance(run, (str, os.PathLike)):
            self.run = open_run(run)
        else:
            raise InvalidArgumentError(
                f"expected a run path or a tv.open() Run, got {type(run).__name__}"
            )
        self.label = label or os.path.basename(os.path.normpath(self.run.path)) or self.run.path
        self._order: Optional[dict[str, int]] = None
        self._hist: dict[tuple, Optional[tuple[np.ndarray, bool, float]]] = {}

    @property
    def order(self) -> dict[str, int]:
        """Tensor name -> position in first-written order (the model's order for parameters)."""
        if self._order is None:
            self._order = {n: i for i, n in enumerate(self.run._r.names())}
        return self._order

    def names(self) -> list[str]:
        """Tensor names in first-written order."""
        return sorted(self.order, key=self.order.__getitem__)

    def collection(self, name: str, fallback_regex: Optional[str] = None) -> list[str]:
        """Tensors of collection ``name`` in model order (regex fallback without collections)."""
        colls = self.run.collections()
        if name in colls:
            members = set(colls[name])
            return [n for n in self.names() if n in members]
        if fallback_regex is not None and not colls:
            pat = re.compile(fallback_regex)
            return [n for n in self.names() if pat.search(n)]
        return []

    def steps(self, name: str, mode: Optional[ModeLike], rank: int) -> list[int]:
        """Steps at which ``name`` was saved (by ``rank``, in ``mode``); [] if never."""
        if name not in self.order:
            return []
        return self.run.tensor(name).steps(mode=mode, rank=rank)

    def hist(
        self, name: str, step: int, rank: int, edges: np.ndarray
    ) -> Optional[tuple[np.ndarray, bool, float]]:
        """(fraction of finite elements per bin, from stored histogram?, fraction outside).

        ``None`` when the record has neither values nor a stored histogram.
        """
        key = (name, step, rank, edges.tobytes())
        if key not in self._hist:
            self._hist[key] = _hist_one(self.run, name, step, rank, edges)
        return self._hist[key]

    def __repr__(self) -> str:
        return f"RunData({self.run.path!r}, label={self.label!r})"


def as_runs(runs: RunsLike, labels: Optional[Sequence[str]] = None) -> list[RunData]:
    """Normalises one run or a list of runs (paths, ``Run``, ``RunData``) to ``RunData``.

    Args:
        runs: A run or a sequence of runs.
        labels: One label per run (default: the run directories' names).

    Raises:
        InvalidArgumentError: no run, or as many labels as runs not given.
        NotFoundError: a path is not a run.

    """
    if isinstance(runs, (str, os.PathLike, Run, RunData)):
        items: list[Any] = [runs]
    else:
        items = list(runs)
    if not items:
        raise InvalidArgumentError("no run given")
    if labels is not None and len(labels) != len(items):
        raise InvalidArgumentError(f"{len(labels)} labels for {len(items)} runs")
    out = []
    for i, r in enumerate(items):
        label = None if labels is None else labels[i]
        if isinstance(r, RunData):
            if label:
                r.label = label
            out.append(r)
        else:
            out.append(RunData(r, label))
    seen: dict[str, int] = {}
    for r in out:  # runs in directories of the same name still get distinct labels
        seen[r.label] = seen.get(r.label, 0) + 1
        if seen[r.label] > 1:
            r.label = f"{r.label} ({seen[r.label]})"
    return out


def _names_in(srcs: list[RunData], names: Union[str, Sequence[str]]) -> list[str]:
    """Exact names, or for a single string that is no tensor name, the names it matches."""
    if isinstance(names, str):
        if any(names in s.order for s in srcs):
            return [names]
        try:
            pat = re.compile(names)
        except re.error as e:
            raise InvalidArgumentError(f"bad regular expression {names!r}: {e}") from None
        found = _union([[n for n in s.names() if pat.search(n)] for s in srcs])
        if not found:
            raise TensorNotFoundError(
                f"no tensor named or matching {names!r} in {', '.join(s.run.path for s in srcs)}"
            )
        return found
    wanted = list(names)
    if not wanted:
        raise InvalidArgumentError("no tensor names given")
    for n in wanted:
        if not any(n in s.order for s in srcs):
            raise TensorNotFoundError(f"no tensor {n!r} in {', '.join(s.run.path for s in srcs)}")
    return wanted


def _union(lists: Sequence[Sequence[str]]) -> list[str]:
    out: list[str] = []
    for ls in lists:
        out.extend(n for n in ls if n not in out)
    return out


def layer_gradients(src: RunData) -> list[str]:
    """Gradient tensors of a run's layers in model order: weight gradients, biases left out.

    Uses the ``gradients`` collection (names ending in ``/grad`` when the run has no
    ``collections.json``). Falls back to every gradient when none is left after removing biases.
    """
    grads = src.collection("gradients", r"/grad$")
    layers = [n for n in grads if not re.search(r"(^|[./])bias(/grad)?$", n)]
    return layers or grads


def layer_weights(src: RunData) -> list[str]:
    """Weight tensors (collection ``weights``, biases excluded) in model order."""
    return src.collection("weights", r"(^|\.)weight$")


def activation_inputs(src: RunData) -> list[str]:
    """Activation-input tensors (``relu_input``, ``tanh_input``, ``sigmoid_input``) in order."""
    found = _union([src.collection(c) for c in ("relu_input", "tanh_input", "sigmoid_input")])
    return sorted(found, key=src.order.__getitem__)


def loss_names(src: RunData) -> list[str]:
    """Loss tensors: collection ``losses``, else names ``loss`` / ``loss/<name>``."""
    found = src.collection("losses")
    if not found:
        found = [n for n in src.names() if re.fullmatch(r"loss(/.*)?", n)]
    return found


# -- histograms -------------------------------------------------------------------------------


def _finite_count(st: Any) -> int:
    return int(st.numel - st.nan - st.posinf - st.neginf)


def _hist_one(
    run: Run, name: str, step: int, rank: int, edges: np.ndarray
) -> Optional[tuple[np.ndarray, bool, float]]:
    rec = run.tensor(name).record(step, rank)
    st = rec.stats
    finite = _finite_count(st)
    bins = len(edges) - 1
    if finite == 0:
        return np.zeros(bins), not rec.has_value, 0.0
    if rec.has_value:
        a = np.asarray(run.tensor(name).value(step, rank)).astype(np.float64, copy=False).ravel()
        a = a[np.isfinite(a)]
        counts = np.histogram(a, bins=edges)[0].astype(np.float64)
        fallback = False
    elif st.hist is not None:
        counts = _rebin(np.asarray(st.hist, dtype=np.float64), np.asarray(st.hist_edges), edges)
        fallback = True
    else:
        return None
    frac = counts / finite
    return frac, fallback, max(0.0, 1.0 - float(frac.sum()))


def _rebin(counts: np.ndarray, src_edges: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Moves a histogram onto new edges, spreading each source bin's count uniformly."""
    out = np.zeros(len(edges) - 1)
    total = float(counts.sum())
    if src_edges[-1] <= src_edges[0]:  # a constant tensor: every value at one point
        x = src_edges[0]
        if edges[0] <= x <= edges[-1]:
            i = min(int(np.searchsorted(edges, x, side="right")) - 1, len(out) - 1)
            out[i] = total
        return out
    cdf = np.concatenate([[0.0], np.cumsum(counts)])
    return np.diff(np.interp(edges, src_edges, cdf))


def _auto_range(src: RunData, name: str, steps: Sequence[int], rank: int) -> Optional[tuple]:
    """Union over steps of [mean - 4 std, mean + 4 std] clipped to [min, max]."""
    lo, hi = math.inf, -math.inf
    t = src.run.tensor(name)
    for s in steps:
        st = t.stats(s, rank)
        if _finite_count(st) == 0:
            continue
        lo = min(lo, max(st.min, st.mean - 4 * st.std))
        hi = max(hi, min(st.max, st.mean + 4 * st.std))
    if not math.isfinite(lo):
        return None
    return lo, hi


def _pad(lo: float, hi: float) -> tuple[float, float]:
    if hi > lo:
        return lo, hi
    d = max(abs(lo) * 0.05, 1e-6)
    return lo - d, hi + d


def _shared_ranges(ranges: list[Optional[tuple]], share: Union[bool, str]) -> list[Optional[tuple]]:
    """One range for every panel (share=True, or "auto" when spans are comparable)."""
    have = [r for r in ranges if r is not None]
    if not have:
        return ranges
    if share == "auto":
        spans = [max(hi - lo, 1e-300) for lo, hi in have]
        share = max(spans) / min(spans) <= _SHARE_FACTOR
    if share:
        u = (min(r[0] for r in have), max(r[1] for r in have))
        return [u if r is not None else None for r in ranges]
    return ranges


@dataclass
class _Series:
    """Histograms of one tensor of one run over steps."""

    src: RunData
    name: str
    steps: list[int] = field(default_factory=list)
    edges: Optional[np.ndarray] = None
    frac: Optional[np.ndarray] = None  # (steps, bins)
    fallback: int = 0
    outside: float = 0.0
    missing: str = ""  # why there is nothing to draw

    @property
    def ok(self) -> bool:
        return self.frac is not None and len(self.steps) > 0

    def note(self) -> str:
        parts = []
        if self.fallback:
            bins = self.edges is not None and len(self.edges) - 1
            parts.append(
                f"from stored histograms (no values) at {self.fallback}/{len(self.steps)} "
                f"steps, re-binned to {bins} bins"
            )
        if self.outside > 0.001:
            parts.append(f"up to {self.outside:.1%} of values outside the range shown")
        return "; ".join(parts)


def _subsample(steps: list[int], n: int) -> list[int]:
    if n <= 0 or len(steps) <= n:
        return list(steps)
    idx = np.unique(np.linspace(0, len(steps) - 1, n).round().astype(int))
    return [steps[i] for i in idx]


def _series(
    srcs: list[RunData],
    name: str,
    *,
    mode: Optional[ModeLike],
    rank: int,
    bins: int,
    value_range: ValueRange,
    share: Union[bool, str],
    steps: Optional[Sequence[int]] = None,
    max_steps: int = 0,
) -> list[_Series]:
    """Histogram series of ``name`` for each run, on shared edges where asked."""
    if not isinstance(bins, int) or not 2 <= bins <= 1024:
        raise InvalidArgumentError(f"bins must be an int in [2, 1024], got {bins!r}")
    if not any(name in s.order for s in srcs):
        import difflib

        close = difflib.get_close_matches(name, _union([s.names() for s in srcs]), n=5)
        raise TensorNotFoundError(
            f"no tensor '{name}' in {', '.join(s.run.path for s in srcs)}"
            + (f"; did you mean: {', '.join(close)}?" if close else "")
        )
    out, ranges = [], []
    for src in srcs:
        ser = _Series(src, name)
        if name not in src.order:
            ser.missing = "not captured in this run"
        else:
            have = src.steps(name, mode, rank)
            if steps is not None:
                for s in steps:
                    if s not in have:
                        raise StepNotAvailableError(
                            f"tensor '{name}' of run '{src.label}' has no saved step {s}"
                            + (f" in mode {to_mode(mode)}" if mode is not None else "")
                            + f"; saved steps: {_brief(have)}"
                        )
                have = list(steps)
            ser.steps = _subsample(have, max_steps)
            if not ser.steps:
                ser.missing = "no saved steps" + (f" in mode {to_mode(mode)}" if mode else "")
        out.append(ser)
        if isinstance(value_range, str):
            if value_range not in ("auto", "minmax"):
                raise InvalidArgumentError(
                    f"value_range must be 'auto', 'minmax' or (lo, hi), got {value_range!r}"
                )
            r = None
            if ser.steps:
                r = _auto_range(src, name, ser.steps, rank)
                if r is not None and value_range == "minmax":
                    ts = src.run.tensor(name)
                    sts = [ts.stats(s, rank) for s in ser.steps]
                    sts = [s for s in sts if _finite_count(s)]
                    r = (min(s.min for s in sts), max(s.max for s in sts))
            ranges.append(r)
        else:
            try:
                lo, hi = (float(v) for v in value_range)
            except (TypeError, ValueError):
                raise InvalidArgumentError(
                    f"value_range must be 'auto', 'minmax' or (lo, hi), got {value_range!r}"
                ) from None
            if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
                raise InvalidArgumentError(f"value_range needs finite lo < hi, got {value_range}")
            ranges.append((lo, hi))
    ranges = _shared_ranges(ranges, share)
    for ser, r in zip(out, ranges):
        if not ser.steps:
            continue
        if r is None:
            ser.missing = "no finite values"
            continue
        ser.edges = np.linspace(*_pad(*r), bins + 1)
        rows, kept = [], []
        for s in ser.steps:
            h = ser.src.hist(name, s, rank, ser.edges)
            if h is None:
                continue
            rows.append(h[0])
            kept.append(s)
            ser.fallback += int(h[1])
            ser.outside = max(ser.outside, h[2])
        if not rows:
            ser.missing = (
                "neither values nor histograms stored (capture with reductions_only=False "
                "or hist_bins > 0)"
            )
            ser.steps = []
            continue
        ser.steps = kept
        ser.frac = np.vstack(rows)
    if not any(s.ok for s in out):
        why = "; ".join(f"{s.src.label}: {s.missing}" for s in out)
        raise NotFoundError(f"nothing to plot for tensor '{name}' ({why})")
    return out


def _brief(steps: Sequence[int]) -> str:
    if not steps:
        return "none"
    if len(steps) <= 6:
        return str(list(steps))
    return f"{len(steps)} steps, {steps[0]}..{steps[-1]}"


def _lines(what: str, label: Optional[str] = None, note: str = "") -> list[str]:
    """Title lines of a panel: what it shows, the run (when comparing), a note."""
    return [what] + ([label] if label else []) + ([f"({note})"] if note else [])


def _top(n_lines: int) -> float:
    """Top margin (inches) for titles of ``n_lines`` lines."""
    return 0.18 + 0.18 * n_lines


def _set_title(ax: Axes, lines: list[str], size: float = 10) -> None:
    ax.set_title("\n".join(lines), fontsize=size if len(lines) == 1 else size - 1)


def _series_lines(srcs: list[RunData], ser: _Series, what: str) -> list[str]:
    return _lines(what, ser.src.label if len(srcs) > 1 else None, "" if ser.missing else ser.note())


def _missing_panel(ax: Axes, lines: list[str], why: str) -> None:
    _set_title(ax, lines)
    ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _step_edges(steps: Sequence[int]) -> np.ndarray:
    s = np.asarray(steps, dtype=np.float64)
    if len(s) == 1:
        return np.array([s[0] - 0.5, s[0] + 0.5])
    mid = (s[1:] + s[:-1]) / 2
    return np.concatenate([[s[0] - (mid[0] - s[0])], mid, [s[-1] + (s[-1] - mid[-1])]])


# -- public plots -----------------------------------------------------------------------------


def stat(
    run: RunsLike,
    names: Union[str, Sequence[str]],
    stat: str = "l2",
    *,
    mode: Optional[ModeLike] = None,
    rank: int = 0,
    logy: bool = False,
    labels: Optional[Sequence[str]] = None,
    title: Optional[str] = None,
    ylabel: Optional[str] = None,
) -> Figure:
    """A statistic of tensors over global steps, one line per tensor (and mode, and run).

    Read from the statistics index; no tensor values are decompressed.

    Args:
        run: A run (path or ``tv.open`` Run) or a list of runs, drawn with different line
            styles on the same axes.
        names: A tensor name, a regular expression (``re.search``) or a list of names.
        stat: One of :data:`STATS` (``"l2"``, ``"mean"``, ``"std"``, ``"var"``, ``"abs_max"``,
            ``"nan"``...).
        mode: Only steps of this mode (``"train"``, ``"eval"``...); default: all, with one
            line per mode.
        rank: Rank whose records are plotted.
        logy: Logarithmic y axis (non-positive values are left out).
        labels: Run labels for the legend.
        title: Figure title (default: the statistic and the selection).
        ylabel: y axis label (default: ``"<stat> of tensor"``).

    Returns:
        A matplotlib Figure.

    Raises:
        InvalidArgumentError: unknown statistic or bad regular expression.
        TensorNotFoundError: nothing matches ``names``.

    Example:
        >>> tv.plot.stat("runs/exp1", r"weight/grad$", stat="l2", logy=True)

    """
    if stat not in STATS:
        raise InvalidArgumentError(f"unknown statistic {stat!r}; one of {', '.join(STATS)}")
    srcs = as_runs(run, labels)
    wanted = _names_in(srcs, names)
    fig, axes, _ = _panels(1, 1, w=6.2, h=3.2, top=0.4)
    ax = axes[0][0]
    # One colour per tensor; per run when a single tensor is compared across runs.
    per_run = len(wanted) == 1 and len(srcs) > 1
    colors = _colors(len(srcs) if per_run else len(wanted))
    drawn = 0
    for ri, src in enumerate(srcs):
        present = [n for n in wanted if n in src.order]
        if not present:
            continue
        tbl = src.run.stats(present, ranks=[rank], mode=mode).to_pydict()
        lines: dict[tuple[str, int], list[tuple[int, float]]] = {}
        for t, m, s, v in zip(tbl["tensor"], tbl["mode"], tbl["step"], tbl[stat]):
            lines.setdefault((t, m), []).append((s, float(v)))
        modes = {m for _, m in lines}
        for (t, m), pts in sorted(lines.items(), key=lambda kv: (wanted.index(kv[0][0]), kv[0][1])):
            pts.sort()
            xs = np.array([p[0] for p in pts])
            ys = np.array([p[1] for p in pts])
            if logy:
                keep = ys > 0
                xs, ys = xs[keep], ys[keep]
            label = t
            if len(modes) > 1:
                label += f" ({to_mode(int(m))})"
            if len(srcs) > 1:
                label = f"{src.label}: {label}"
            ax.plot(
                xs,
                ys,
                _RUN_STYLES[ri % len(_RUN_STYLES)],
                color=colors[ri if per_run else wanted.index(t)],
                marker="o" if int(m) != 0 or len(xs) < 30 else None,
                markersize=3,
                label=label,
                linewidth=1.3,
            )
            drawn += 1
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("global step")
    ax.set_ylabel((ylabel or f"{stat} of tensor") + (" (log scale)" if logy else ""))
    what = (
        names
        if isinstance(names, str)
        else ", ".join(wanted[:3]) + ("..." if len(wanted) > 3 else "")
    )
    ax.set_title(title or f"{stat} over steps: {what}")
    ax.grid(True, alpha=0.3)
    if drawn:
        ax.legend(fontsize=7, ncols=2 if drawn > 8 else 1, loc="best")
    return fig


def loss(
    run: RunsLike,
    names: Optional[Union[str, Sequence[str]]] = None,
    *,
    logy: bool = False,
    labels: Optional[Sequence[str]] = None,
    title: Optional[str] = None,
) -> Figure:
    """Loss curves over global steps: train mode solid, eval/predict dashed with markers.

    The value plotted is the mean of the recorded loss tensor (the loss itself for a scalar).

    Args:
        run: A run or a list of runs (one colour per run, overlaid).
        names: Loss tensors (default: collection ``losses``, else ``loss`` / ``loss/<name>``).
        logy: Logarithmic y axis.
        labels: Run labels for the legend.
        title: Figure title.

    Returns:
        A matplotlib Figure.

    Raises:
        NotFoundError: no run has a loss tensor.

    """
    srcs = as_runs(run, labels)
    fig, axes, _ = _panels(1, 1, w=6.2, h=3.0, top=0.4)
    ax = axes[0][0]
    colors = _colors(len(srcs) * 2)
    drawn = 0
    for ri, src in enumerate(srcs):
        present = (
            loss_names(src)
            if names is None
            else [n for n in _names_in(srcs, names) if n in src.order]
        )
        if not present:
            continue
        ranks = src.run.ranks()
        tbl = src.run.stats(present, ranks=ranks[:1]).to_pydict()  # the lowest rank's losses
        curves: dict[tuple[str, int], list[tuple[int, float]]] = {}
        for t, m, s, v in zip(tbl["tensor"], tbl["mode"], tbl["step"], tbl["mean"]):
            curves.setdefault((t, m), []).append((s, float(v)))
        for ci, ((t, m), pts) in enumerate(sorted(curves.items())):
            pts.sort()
            xs, ys = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
            if logy:
                keep = ys > 0
                xs, ys = xs[keep], ys[keep]
            train = int(m) == 0
            label = f"{t} ({to_mode(int(m))})"
            if len(srcs) > 1:
                label = f"{src.label}: {label}"
            color = colors[(ri * 2 + ci // 2) % len(colors)] if len(srcs) > 1 else colors[ci % 2]
            ax.plot(
                xs,
                ys,
                "-" if train else "--",
                color=color,
                label=label,
                marker=None if train and len(xs) > 30 else "o",
                markersize=3,
                linewidth=1.3,
            )
            drawn += 1
    if not drawn:
        raise NotFoundError(
            "no loss tensors in "
            + ", ".join(s.run.path for s in srcs)
            + " (capture the 'losses' collection and call hook.record_loss)"
        )
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("global step")
    ax.set_ylabel("loss" + (" (log scale)" if logy else ""))
    ax.set_title(title or "Loss curves")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def distribution(
    run: RunsLike,
    name: str,
    steps: Optional[Sequence[int]] = None,
    *,
    mode: Optional[ModeLike] = None,
    rank: int = 0,
    bins: int = 64,
    value_range: ValueRange = "auto",
    share: Union[bool, str] = "auto",
    logy: bool = False,
    labels: Optional[Sequence[str]] = None,
    title: Optional[str] = None,
) -> Figure:
    """Histograms of a tensor's values at chosen steps, overlaid (early steps lighter).

    Args:
        run: A run or a list of runs (one panel per run, side by side).
        name: Tensor name.
        steps: Steps to draw (default: the first, middle and last saved step of each run).
        mode: Only consider steps of this mode when choosing default steps.
        rank: Rank whose records are plotted.
        bins: Number of bins over the value range.
        value_range: ``"auto"`` (union over steps of mean ± 4 std, clipped to min..max),
            ``"minmax"`` or ``(lo, hi)``.
        share: Same value range in every panel: ``True``, ``False`` or ``"auto"`` (when the
            runs' ranges differ by at most a factor 10).
        logy: Logarithmic y axis.
        labels: Run labels.
        title: Figure title.

    Returns:
        A matplotlib Figure; the y axis is the fraction of the tensor's finite elements per bin.

    Raises:
        StepNotAvailableError: a requested step was not saved.
        NotFoundError: nothing to draw (no values and no stored histograms).

    """
    srcs = as_runs(run, labels)
    if steps is not None:
        steps = [int(s) for s in steps]
        sers = _series(
            srcs,
            name,
            mode=mode,
            rank=rank,
            bins=bins,
            value_range=value_range,
            share=share,
            steps=steps,
        )
    else:
        sers = _series(
            srcs,
            name,
            mode=mode,
            rank=rank,
            bins=bins,
            value_range=value_range,
            share=share,
            max_steps=3,
        )
    what = title or f"Distribution of {name}"
    titles = [_series_lines(srcs, ser, what) for ser in sers]
    fig, axes, _ = _panels(1, len(srcs), top=_top(max(map(len, titles))), wgap=0.3, sharey=True)
    cmap = _cmap("viridis")
    for i, (ax, ser) in enumerate(zip(axes[0], sers)):
        if not ser.ok:
            _missing_panel(ax, titles[i], ser.missing)
            continue
        n = len(ser.steps)
        for k, (s, row) in enumerate(zip(ser.steps, ser.frac)):
            ax.stairs(
                row,
                ser.edges,
                color=cmap(0.15 + 0.7 * k / max(n - 1, 1)),
                linewidth=1.5,
                label=f"step {s}",
            )
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel(f"value of {name}")
        if i == 0:
            ax.set_ylabel("fraction of elements per bin")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, title="global step" if n > 1 else None, title_fontsize=8)
        _set_title(ax, titles[i])
    return fig


def heatmap(
    run: RunsLike,
    name: str,
    *,
    mode: Optional[ModeLike] = "train",
    rank: int = 0,
    bins: int = 64,
    value_range: ValueRange = "auto",
    share: Union[bool, str] = "auto",
    max_steps: int = 200,
    labels: Optional[Sequence[str]] = None,
    title: Optional[str] = None,
) -> Figure:
    """The distribution of a tensor over steps as a heat map.

    x is the global step, y the value bin, colour the fraction of the tensor's finite elements
    in the bin at that step (log colour scale; empty bins blank).

    Args:
        run: A run or a list of runs (one panel per run, with one colour scale).
        name: Tensor name.
        mode: Only steps of this mode (default ``"train"``; ``None``: all).
        rank: Rank whose records are plotted.
        bins: Number of value bins.
        value_range: ``"auto"``, ``"minmax"`` or ``(lo, hi)`` (see :func:`distribution`).
        share: Same value range in every panel: ``True``, ``False`` or ``"auto"``.
        max_steps: Draw at most this many steps (evenly spaced, first and last kept).
        labels: Run labels.
        title: Figure title.

    Returns:
        A matplotlib Figure with a colour bar.

    Raises:
        NotFoundError: nothing to draw.

    """
    srcs = as_runs(run, labels)
    sers = _series(
        srcs,
        name,
        mode=mode,
        rank=rank,
        bins=bins,
        value_range=value_range,
        share=share,
        max_steps=max_steps,
    )
    from matplotlib.colors import LogNorm

    pos = np.concatenate([s.frac[s.frac > 0] for s in sers if s.ok] or [np.ones(1)])
    vmax = float(pos.max())
    vmin = max(float(pos.min()), vmax * 1e-4)
    norm = LogNorm(vmin=vmin, vmax=max(vmax, vmin * 1.0001))
    cmap = _cmap("viridis").with_extremes(bad="#f2f2f2", under="#f2f2f2")
    what = title or f"Distribution of {name} over steps"
    titles = [_series_lines(srcs, ser, what) for ser in sers]
    fig, axes, cax = _panels(1, len(srcs), top=_top(max(map(len, titles))), wgap=1.2, cbar=True)
    mesh = None
    for i, (ax, ser) in enumerate(zip(axes[0], sers)):
        if not ser.ok:
            _missing_panel(ax, titles[i], ser.missing)
            continue
        data = np.ma.masked_less_equal(ser.frac.T, 0)
        mesh = ax.pcolormesh(
            _step_edges(ser.steps),
            ser.edges,
            data,
            cmap=cmap,
            norm=norm,
            shading="flat",
            rasterized=True,
        )
        ax.set_xlabel("global step")
        ax.set_ylabel(f"value of {name}")
        _set_title(ax, titles[i])
    if mesh is not None:
        cb = fig.colorbar(mesh, cax=cax)
        cb.set_label("fraction of elements per bin")
    else:
        cax.set_visible(False)
    return fig


def grad_variance_ratio(
    run: RunsLike,
    names: Optional[Sequence[str]] = None,
    *,
    reference: str = "last",
    mode: Optional[ModeLike] = "train",
    rank: int = 0,
    labels: Optional[Sequence[str]] = None,
    title: Optional[str] = None,
) -> Figure:
    """Each layer's gradient variance divided by the reference layer's, over steps (log y).

    ``ratio_l(t) = var(g_l(t)) / var(g_ref(t))`` with ``var`` the variance of all elements of
    the layer's weight gradient at step ``t`` (from the statistics, no values read). By default
    the reference is the last layer (the output layer), so healthy networks stay near 1 and
    vanishing (exploding) gradients show as ratios far below (above) 1 for the early layers.

    Args:
        run: A run or a list of runs (one panel per run, shared y axis).
        names: Gradient tensors, input to output (default: weight gradients of the
            ``gradients`` collection in model order).
        reference: ``"last"``, ``"first"`` or a gradient tensor name.
        mode: Only steps of this mode (default ``"train"``).
        rank: Rank whose records are plotted.
        labels: Run labels.
        title: Figure title.

    Returns:
        A matplotlib Figure.

    Raises:
        NotFoundError: no run has at least one gradient tensor.

    """
    srcs = as_runs(run, labels)
    multi = len(srcs) > 1
    fig, axes, _ = _panels(1, len(srcs), top=_top(2 if multi else 1), wgap=0.3, sharey=True)
    drawn = 0
    for col, (ax, src) in enumerate(zip(axes[0], srcs)):
        layers = [n for n in names if n in src.order] if names else layer_gradients(src)
        label = src.label if multi else None
        if not layers:
            _missing_panel(
                ax, _lines(title or "Gradient variance ratio", label), "no gradients captured"
            )
            continue
        ref = {"last": layers[-1], "first": layers[0]}.get(reference, reference)
        if ref not in src.order:
            raise TensorNotFoundError(f"reference tensor {ref!r} not in run '{src.label}'")
        tbl = src.run.stats(
            list(dict.fromkeys([*layers, ref])), ranks=[rank], mode=mode
        ).to_pydict()
        var: dict[str, dict[int, float]] = {}
        for t, s, v in zip(tbl["tensor"], tbl["step"], tbl["var"]):
            var.setdefault(t, {})[s] = float(v)
        colors = _colors(len(layers))
        for i, n in enumerate(layers):
            pts = sorted(
                (s, v / var[ref][s])
                for s, v in var.get(n, {}).items()
                if s in var.get(ref, {}) and var[ref][s] > 0 and v > 0
            )
            if not pts:
                continue
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                color=colors[i],
                linewidth=1.4,
                marker="o" if len(pts) < 30 else None,
                markersize=3,
                label=n + (" (reference)" if n == ref else ""),
            )
            drawn += 1
        ax.axhline(1.0, color="0.5", linewidth=0.8, linestyle=":")
        ax.set_yscale("log")
        ax.set_xlabel("global step")
        if col == 0:
            ax.set_ylabel("gradient variance / reference's")
        _set_title(ax, _lines(title or f"Gradient variance relative to {ref}", label))
        ax.grid(True, alpha=0.3, which="both")
        ax.legend(fontsize=7)
    if not drawn:
        raise NotFoundError(
            "no gradient variances to plot in "
            + ", ".join(s.run.path for s in srcs)
            + " (capture the 'gradients' collection)"
        )
    return fig


def update_ratio(
    run: RunsLike,
    names: Optional[Sequence[str]] = None,
    *,
    mode: Optional[ModeLike] = "train",
    rank: int = 0,
    labels: Optional[Sequence[str]] = None,
    title: Optional[str] = None,
) -> Figure:
    """Relative weight update per layer: ``||w_t - w_p|| / ||w_p||`` over steps (log y).

    ``t`` and ``p`` are consecutive saved steps of the tensor (so with ``SaveConfig(every=k)``
    the update spans ``k`` optimizer steps); norms are L2 over all elements, computed from the
    stored values. The ratio is drawn at step ``t``.

    Args:
        run: A run or a list of runs (one panel per run, shared y axis).
        names: Weight tensors (default: collection ``weights`` in model order).
        mode: Only steps of this mode (default ``"train"``; weights do not change in eval).
        rank: Rank whose records are read.
        labels: Run labels.
        title: Figure title.

    Returns:
        A matplotlib Figure.

    Raises:
        NotFoundError: no run stored weight values at two steps.

    """
    srcs = as_runs(run, labels)
    multi = len(srcs) > 1
    fig, axes, _ = _panels(1, len(srcs), top=_top(3 if multi else 2), wgap=0.3, sharey=True)
    drawn = 0
    for col, (ax, src) in enumerate(zip(axes[0], srcs)):
        layers = [n for n in names if n in src.order] if names else layer_weights(src)
        colors = _colors(len(layers))
        gaps: set[int] = set()
        for i, n in enumerate(layers):
            t = src.run.tensor(n)
            prev: Optional[tuple[int, np.ndarray]] = None
            xs, ys = [], []
            for s in t.steps(mode=mode, rank=rank):
                if not t.record(s, rank).has_value:
                    prev = None
                    continue
                w = np.asarray(t.value(s, rank)).astype(np.float64, copy=False).ravel()
                if prev is not None:
                    den = float(np.linalg.norm(prev[1]))
                    if den > 0:
                        xs.append(s)
                        ys.append(float(np.linalg.norm(w - prev[1])) / den)
                        gaps.add(s - prev[0])
                prev = (s, w)
            pos = [(x, y) for x, y in zip(xs, ys) if y > 0]
            if not pos:
                continue
            ax.plot(
                [p[0] for p in pos],
                [p[1] for p in pos],
                color=colors[i],
                linewidth=1.4,
                marker="o" if len(pos) < 30 else None,
                markersize=3,
                label=n,
            )
            drawn += 1
        span = (f"{min(gaps)}" if len(gaps) == 1 else f"{min(gaps)}-{max(gaps)}") if gaps else "?"
        _set_title(
            ax,
            _lines(
                title or "Weight-update ratio",
                src.label if multi else None,
                f"between saved steps {span} global steps apart",
            ),
        )
        if not layers or not gaps:
            ax.text(
                0.5,
                0.5,
                "no weight values at two saved steps",
                ha="center",
                va="center",
                transform=ax.transAxes,
            )
            continue
        ax.set_yscale("log")
        ax.set_xlabel("global step")
        if col == 0:
            ax.set_ylabel("||w_t - w_prev|| / ||w_prev||")
        ax.grid(True, alpha=0.3, which="both")
        ax.legend(fontsize=7)
    if not drawn:
        raise NotFoundError(
            "no weight values at two saved steps in "
            + ", ".join(s.run.path for s in srcs)
            + " (capture the 'weights' collection with reductions_only=False)"
        )
    return fig


class HistogramAnimation:
    """Animated histograms, one frame per step; a GIF for reports, inline in notebooks.

    Made by :func:`animation`. ``figure`` shows the first frame.

    Attributes:
        figure: The matplotlib Figure the frames are drawn on.
        steps: The global step of each frame.
        available: Number of saved steps the frames were chosen from (evenly spaced).
        fps: Frames per second of the GIF.

    """

    def __init__(
        self, figure: Figure, steps: list[int], fps: float, update: Any, dynamic: list
    ) -> None:
        self.figure = figure
        self.steps = steps
        self.available = len(steps)
        self.fps = fps
        self._update = update
        self._dynamic = dynamic
        self._gif: Optional[bytes] = None
        update(0)

    def __len__(self) -> int:
        return len(self.steps)

    def draw_frame(self, i: int) -> Figure:
        """Draws frame ``i`` on :attr:`figure` and returns the figure."""
        self._update(i)
        return self.figure

    def to_gif(self, path: Optional[Union[str, os.PathLike]] = None) -> bytes:
        """Renders every frame and encodes an endlessly looping GIF.

        Args:
            path: Also write the GIF to this file.

        Returns:
            The GIF bytes.

        """
        if self._gif is None:
            self._gif = self._render()
        if path is not None:
            with open(path, "wb") as f:
                f.write(self._gif)
        return self._gif

    def _render(self) -> bytes:
        from PIL import Image

        fig, canvas = self.figure, self.figure.canvas
        # Blitting: draw the static parts once (layout frozen), then per frame only the
        # artists that change. A full redraw per frame is ~20x slower.
        engine = fig.get_layout_engine()
        for a in self._dynamic:
            a.set_animated(True)
        try:
            canvas.draw()
            fig.set_layout_engine("none")
            background = canvas.copy_from_bbox(fig.bbox)
            frames = []
            for i in range(len(self.steps)):
                self._update(i)
                canvas.restore_region(background)
                for a in self._dynamic:
                    fig.draw_artist(a)
                w, h = canvas.get_width_height(physical=True)
                img = Image.frombuffer("RGBA", (w, h), bytes(canvas.buffer_rgba()))
                frames.append(img.convert("RGB").quantize(64, Image.Quantize.FASTOCTREE))
        finally:
            for a in self._dynamic:
                a.set_animated(False)
            fig.set_layout_engine(engine)
            self._update(0)
        buf = io.BytesIO()
        frames[0].save(
            buf,
            format="GIF",
            save_all=True,
            append_images=frames[1:],
            duration=max(20, int(1000 / self.fps)),
            loop=0,
        )
        return buf.getvalue()

    def _repr_html_(self) -> str:
        data = base64.b64encode(self.to_gif()).decode("ascii")
        return f'<img src="data:image/gif;base64,{data}" alt="histogram animation">'


def animation(
    run: RunsLike,
    names: Union[str, Sequence[str]],
    *,
    mode: Optional[ModeLike] = "train",
    rank: int = 0,
    bins: int = 64,
    value_range: ValueRange = "auto",
    share: Union[bool, str] = "auto",
    max_frames: int = 60,
    fps: float = 4.0,
    labels: Optional[Sequence[str]] = None,
    title: Optional[str] = None,
) -> HistogramAnimation:
    """Histograms of tensors animated over steps: a panel per (tensor, run), a frame per step.

    Each panel keeps its value range and y limit over the frames, so growth, shrinkage and
    shifts of the distribution are visible. A run without a saved step at a frame's step shows
    its latest earlier step.

    Args:
        run: A run or a list of runs (one column per run).
        names: A tensor name, a regular expression or a list of names (one row each).
        mode: Only steps of this mode (default ``"train"``).
        rank: Rank whose records are plotted.
        bins: Number of value bins.
        value_range: ``"auto"``, ``"minmax"`` or ``(lo, hi)`` (see :func:`distribution`).
        share: Same value range for a tensor across runs: ``True``, ``False`` or ``"auto"``.
        max_frames: At most this many frames (steps evenly spaced).
        fps: Frames per second.
        labels: Run labels.
        title: Title above the panels (the frame's step is added).

    Returns:
        A :class:`HistogramAnimation` (``.figure``, ``.to_gif()``; displays in notebooks).

    Raises:
        NotFoundError: nothing to draw.

    """
    srcs = as_runs(run, labels)
    wanted = _names_in(srcs, names)
    grid: list[list[_Series]] = []
    for n in wanted:
        try:
            grid.append(
                _series(
                    srcs,
                    n,
                    mode=mode,
                    rank=rank,
                    bins=bins,
                    value_range=value_range,
                    share=share,
                    max_steps=0,
                )
            )
        except NotFoundError:
            if len(wanted) == 1:
                raise
    if not grid:
        raise NotFoundError(f"nothing to animate for {names!r}")
    all_steps = sorted({s for row in grid for ser in row if ser.ok for s in ser.steps})
    frames = _subsample(all_steps, max_frames)
    rows, cols = len(grid), len(srcs)
    titles = [
        [
            _lines(ser.name, ser.src.label if cols > 1 else None, "" if ser.missing else ser.note())
            for ser in row
        ]
        for row in grid
    ]
    n_lines = max(len(t) for row in titles for t in row)
    fig, axes, _ = _panels(
        rows, cols, w=4.0, h=1.9, top=0.3 + _top(n_lines), wgap=0.75, hgap=0.45 + 0.17 * n_lines
    )
    cmap = _cmap("tab10")
    artists: list[tuple[Any, Any, _Series]] = []
    for r, row in enumerate(grid):
        ymax = max((float(s.frac.max()) for s in row if s.ok), default=1.0) * 1.08 or 1.0
        for c, ser in enumerate(row):
            ax = axes[r][c]
            if not ser.ok:
                _missing_panel(ax, titles[r][c], ser.missing)
                continue
            st = ax.stairs(
                np.zeros(len(ser.edges) - 1), ser.edges, fill=True, alpha=0.8, color=cmap(c % 10)
            )
            ax.set_ylim(0, ymax)
            ax.set_xlim(ser.edges[0], ser.edges[-1])
            _set_title(ax, titles[r][c], size=9)
            ax.set_xlabel("value", fontsize=8)
            ax.set_ylabel("fraction per bin", fontsize=8)
            ax.tick_params(labelsize=7)
            txt = ax.text(
                0.98,
                0.92,
                "",
                ha="right",
                va="top",
                transform=ax.transAxes,
                fontsize=8,
                color="0.3",
            )
            artists.append((st, txt, ser))
    head = title or "Histogram over steps"

    def update(i: int) -> None:
        step = frames[i]
        for st, txt, ser in artists:
            j = int(np.searchsorted(ser.steps, step, side="right")) - 1
            if j < 0:
                st.set_data(np.zeros(ser.frac.shape[1]))
                txt.set_text("not yet saved")
            else:
                st.set_data(ser.frac[j])
                # Only a panel that lags the frame's step says which step it shows.
                txt.set_text("" if ser.steps[j] == step else f"step {ser.steps[j]}")
        sup.set_text(f"{head} (global step {step}, frame {i + 1}/{len(frames)})")

    sup = fig.suptitle(head, fontsize=10)
    dynamic = [a for st, txt, _ in artists for a in (st, txt)] + [sup]
    anim = HistogramAnimation(fig, frames, fps, update, dynamic)
    anim.available = len(all_steps)
    return anim


def _colors(n: int) -> list:
    if n <= 10:
        cmap = _cmap("tab10")
        return [cmap(i) for i in range(max(n, 1))]
    cmap = _cmap("viridis")
    return [cmap(0.05 + 0.9 * i / (n - 1)) for i in range(n)]


def to_png(fig: Figure, dpi: Optional[int] = None) -> bytes:
    """Renders a figure as PNG bytes (Agg).

    Args:
        fig: The figure.
        dpi: Resolution (default: the figure's).

    Returns:
        The PNG file's bytes.

    """
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi or fig.dpi)
    return buf.getvalue()


__all__ = [
    "DPI",
    "STATS",
    "HistogramAnimation",
    "RunData",
    "activation_inputs",
    "animation",
    "as_runs",
    "distribution",
    "grad_variance_ratio",
    "heatmap",
    "layer_gradients",
    "layer_weights",
    "loss",
    "loss_names",
    "stat",
    "to_png",
    "update_ratio",
]
