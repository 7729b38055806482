"""The XGBoost section of ``tensorvigil report``, and helpers that read an XGBoost run.

Reads what :class:`tensorvigil.xgboost.Hook` saves (names in ``docs/XGBOOST.md``) through
the reader only, so it needs neither xgboost nor the training process. The figure functions
return matplotlib Figures (matplotlib is imported lazily); :func:`_section` renders them into
the report, registered under the key ``xgboost`` after the loss curves.
"""

from __future__ import annotations

import html
import re
from typing import Any, Optional, Sequence

import numpy as np

from .errors import NotFoundError

__all__ = [
    "confusion_figure",
    "feature_importance",
    "hyperparameters",
    "importance_figure",
    "is_xgboost_run",
    "metrics_figure",
    "tree_depth_figure",
]

_METRIC = re.compile(r"^metric/(.+?)-(.+)$")


def _run(r: Any) -> Any:
    return getattr(r, "run", r)  # a plot.RunData or a Run


def _label(r: Any, default: str = "") -> str:
    return getattr(r, "label", default)


def is_xgboost_run(run: Any) -> bool:
    """Whether ``run`` was captured by the XGBoost hook (it has trees or feature importance)."""
    names = _run(run).tensor_names()
    return any(n.startswith(("trees/", "feature_importance/")) for n in names)


def hyperparameters(run: Any) -> dict[str, Any]:
    """The ``hyperparameters`` collection at its first step: ``name -> float or str``.

    Text values are stored as the UTF-8 bytes of the text (``uint8`` vectors) and decoded.
    """
    run = _run(run)
    out: dict[str, Any] = {}
    for name in run.tensor_names():
        if not name.startswith("hyperparameters/"):
            continue
        t = run.tensor(name)
        steps = t.steps()
        if not steps:
            continue
        v = np.asarray(t.value(steps[0]))
        key = name.split("/", 1)[1]
        if v.dtype == np.uint8:
            out[key] = v.tobytes().decode("utf-8", errors="replace")
        else:
            out[key] = float(v.reshape(-1)[0]) if v.size == 1 else v.tolist()
    return out


def feature_importance(
    run: Any, importance_type: str = "gain", step: Optional[int] = None
) -> dict[str, float]:
    """``feature -> importance`` of one type at ``step`` (default: the last saved step).

    Equals ``booster.get_score(importance_type=...)`` of the booster at that iteration.
    """
    run = _run(run)
    prefix = f"feature_importance/{importance_type}/"
    names = [n for n in run.tensor_names() if n.startswith(prefix)]
    if not names:
        raise NotFoundError(f"no '{prefix}*' tensors in run '{run.path}'")
    if step is None:
        step = max(max(run.tensor(n).steps(), default=-1) for n in names)
    out = {}
    for n in names:
        t = run.tensor(n)
        if step in t.steps():
            out[n[len(prefix) :]] = float(np.asarray(t.value(step)).reshape(-1)[0])
    return out


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _metrics(run: Any) -> dict[str, dict[str, str]]:
    """``metric -> {eval set -> tensor name}``."""
    out: dict[str, dict[str, str]] = {}
    for n in _run(run).tensor_names():
        m = _METRIC.match(n)
        if m:
            out.setdefault(m.group(2), {})[m.group(1)] = n
    return out


def metrics_figure(runs: Sequence[Any]) -> Any:
    """One panel per eval metric, a curve per eval set (and run) over boosting iterations."""
    per_run = [_metrics(r) for r in runs]
    metrics = sorted({m for d in per_run for m in d})
    if not metrics:
        raise NotFoundError("no 'metric/<set>-<metric>' tensors")
    fig = _figure(min(4.2 * len(metrics), 13), 3.4)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    styles = ["-", "--", ":", "-."]
    for ax, metric in zip(axes, metrics):
        for ri, (r, d) in enumerate(zip(runs, per_run)):
            for dset, name in sorted(d.get(metric, {}).items()):
                tbl = _run(r).stats([name]).to_pydict()
                order = np.argsort(tbl["step"])
                x = np.asarray(tbl["step"])[order]
                y = np.asarray(tbl["mean"])[order]
                lab = dset if len(runs) == 1 else f"{_label(r, f'run {ri}')}: {dset}"
                ax.plot(x, y, styles[ri % len(styles)], label=lab)
        ax.set_title(metric)
        ax.set_xlabel("iteration")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return fig


def importance_figure(run: Any, importance_type: str = "gain", top: int = 20) -> Any:
    """Horizontal bars of the ``top`` features by importance at the last saved step."""
    imp = feature_importance(run, importance_type)
    items = sorted(imp.items(), key=lambda kv: -kv[1])[:top][::-1]
    fig = _figure(6.5, 0.25 * len(items) + 1.2)
    ax = fig.subplots()
    total = sum(imp.values()) or 1.0
    ax.barh([k for k, _ in items], [v / total for _, v in items], color="#4c72b0")
    ax.set_xlabel(f"share of total {importance_type}")
    ax.set_title(f"{_label(run)} feature importance ({importance_type})".strip())
    ax.tick_params(axis="y", labelsize=8)
    return fig


def tree_depth_figure(runs: Sequence[Any]) -> Any:
    """Depth and leaf count of every tree against its boosting round."""
    fig = _figure(10, 3.2)
    ax_d, ax_l = fig.subplots(1, 2)
    found = False
    for ri, r in enumerate(runs):
        run = _run(r)
        names = set(run.tensor_names())
        if "trees/depth" not in names or "trees/round" not in names:
            continue
        found = True
        rnd, dep, lea = [], [], []
        for s in run.tensor("trees/depth").steps():
            rnd.append(np.asarray(run.tensor("trees/round").value(s)))
            dep.append(np.asarray(run.tensor("trees/depth").value(s)))
            if "trees/leaves" in names:
                lea.append(np.asarray(run.tensor("trees/leaves").value(s)))
        x = np.concatenate(rnd)
        lab = _label(r, f"run {ri}") if len(runs) > 1 else None
        ax_d.plot(x, np.concatenate(dep), ".", alpha=0.6, label=lab)
        if lea:
            ax_l.plot(x, np.concatenate(lea), ".", alpha=0.6, label=lab)
    if not found:
        raise NotFoundError("no 'trees/depth' tensors")
    ax_d.set(title="tree depth", xlabel="boosting round", ylabel="depth")
    ax_l.set(title="leaves per tree", xlabel="boosting round", ylabel="leaves")
    for ax in (ax_d, ax_l):
        ax.grid(alpha=0.3)
        if len(runs) > 1:
            ax.legend(fontsize=8)
    return fig


def _pairs(run: Any) -> list[str]:
    names = set(_run(run).tensor_names())
    return sorted(
        n[: -len("/labels")]
        for n in names
        if n.endswith("/labels") and n[: -len("/labels")] + "/predictions" in names
    )


def confusion_figure(run: Any, dataset: str) -> Any:
    """Confusion matrix (classification) or label/prediction histograms (regression).

    Uses ``<dataset>/labels`` and ``<dataset>/predictions`` at their last common saved step.
    """
    r = _run(run)
    lt, pt = r.tensor(f"{dataset}/labels"), r.tensor(f"{dataset}/predictions")
    common = sorted(set(lt.steps()) & set(pt.steps()))
    if not common:
        raise NotFoundError(f"no step with both labels and predictions of '{dataset}'")
    step = common[-1]
    y, p = np.asarray(lt.value(step)).reshape(-1), np.asarray(pt.value(step))
    if y.dtype.kind in "iu" and p.dtype.kind in "iu" and p.ndim == 1:
        k = int(max(y.max(initial=0), p.max(initial=0))) + 1
        cm = np.bincount(y * k + p, minlength=k * k).reshape(k, k)
        fig = _figure(min(1.0 + 0.45 * k, 7), min(0.8 + 0.45 * k, 6.5))
        ax = fig.subplots()
        share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
        im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        if k <= 12:
            for i in range(k):
                for j in range(k):
                    if cm[i, j]:
                        color = "white" if share[i, j] > 0.6 else "black"
                        ax.text(
                            j, i, str(cm[i, j]), ha="center", va="center", fontsize=8, color=color
                        )
        ax.set(xlabel="predicted", ylabel="true", xticks=range(k), yticks=range(k))
        ax.set_title(
            f"{dataset}: confusion at iteration {step} "
            f"(accuracy {np.trace(cm) / max(cm.sum(), 1):.1%})",
            fontsize=10,
        )
        fig.colorbar(im, ax=ax, label="share of the true class")
        return fig
    fig = _figure(6.5, 3.2)
    ax = fig.subplots()
    p = p.reshape(-1)
    lo = float(min(np.nanmin(y), np.nanmin(p)))
    hi = float(max(np.nanmax(y), np.nanmax(p)))
    bins = np.linspace(lo, hi if hi > lo else lo + 1, 41)
    ax.hist(y, bins=bins, alpha=0.5, label="labels")
    ax.hist(p, bins=bins, alpha=0.5, label="predictions")
    ax.set_title(f"{dataset}: labels and predictions at iteration {step}", fontsize=10)
    ax.legend()
    return fig


def _hyper_table(ctx: Any) -> str:
    keys = (
        "objective",
        "booster",
        "tree_method",
        "eta",
        "max_depth",
        "min_child_weight",
        "gamma",
        "lambda",
        "alpha",
        "subsample",
        "colsample_bytree",
        "num_class",
        "num_feature",
        "num_parallel_tree",
        "grow_policy",
        "max_leaves",
        "scale_pos_weight",
        "base_score",
        "seed",
    )
    hps = [hyperparameters(r) for r in ctx.runs]
    if not any(hps):
        return '<p class="note">No hyperparameters captured.</p>'
    shown = [k for k in keys if any(k in h for h in hps)]

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.6g}"
        return "" if v is None else str(v)

    head = "".join(f"<th>{html.escape(_label(r, 'value'))}</th>" for r in ctx.runs)
    rows = "".join(
        f"<tr><td>{html.escape(k)}</td>"
        + "".join(f"<td>{html.escape(fmt(h.get(k)))}</td>" for h in hps)
        + "</tr>"
        for k in shown
    )
    n_all = max(len(h) for h in hps)
    return (
        f'<table class="summary"><tr><th>hyperparameter</th>{head}</tr>{rows}</table>'
        f'<p class="note">{len(shown)} of {n_all} captured hyperparameters shown '
        "(all: <code>tensorvigil.report_xgboost.hyperparameters(run)</code>).</p>"
    )


def _section(ctx: Any) -> str:
    from .report import SectionNotApplicable

    runs = [r for r in ctx.runs if is_xgboost_run(r)]
    if not runs:
        raise SectionNotApplicable("not an XGBoost run (no trees/ or feature_importance/ tensors)")
    parts = ["<h3>Hyperparameters</h3>", _hyper_table(ctx)]
    try:
        parts.append(
            ctx.figure(
                metrics_figure(runs),
                "Evaluation metrics per boosting iteration, one curve per eval set "
                "(metric/<set>-<metric>).",
            )
        )
    except NotFoundError:
        parts.append('<p class="note">No evaluation metrics captured.</p>')
    for r in runs:
        for itype in ("gain", "weight"):
            try:
                fig = importance_figure(r, itype)
            except NotFoundError:
                continue
            parts.append(
                ctx.figure(
                    fig, f"Top features by {itype} at the last saved iteration (share of total)."
                )
            )
            break
    try:
        parts.append(
            ctx.figure(
                tree_depth_figure(runs),
                "Depth and leaf count of every tree captured, against its boosting round.",
            )
        )
    except NotFoundError:
        pass
    for r in runs:
        for dset in _pairs(r):
            try:
                fig = confusion_figure(r, dset)
            except NotFoundError:
                continue
            lab = _label(r)
            parts.append(
                ctx.figure(
                    fig, f"{lab + ': ' if lab else ''}labels against predictions of '{dset}'."
                )
            )
    return "".join(parts)


def _register() -> None:
    from .report import SECTIONS, register_section

    after = "loss" if any(s.key == "loss" for s in SECTIONS) else None
    register_section("xgboost", "XGBoost", _section, after=after)


_register()
