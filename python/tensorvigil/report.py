"""A self-contained HTML report of one run, or of two runs side by side.

:func:`write_report` (and ``tensorvigil report RUN [--compare RUN2] -o report.html``) writes a
single HTML file: images are embedded as ``data:`` URIs, there is no script and nothing is
loaded from the network. The report is a list of sections (:data:`SECTIONS`); each is a small
function that returns HTML, or raises :class:`SectionSkipped` (or a ``NotFoundError``) when its
data is absent, which the report shows as a one-line note. Other modules add sections with
:func:`register_section` (modules listed in :data:`SECTION_MODULES` are imported first).

Example:
    >>> from tensorvigil.report import write_report
    >>> write_report("runs/bad", "report.html", compare="runs/good", labels=["bad", "good"])
    'report.html'

"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import importlib
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

from .errors import InvalidArgumentError, NotFoundError, StoreIOError
from .modes import Mode

#: Modules imported before a report is built, so that their ``register_section`` calls run
#: (relative to this package, e.g. ``"report_xgboost"``).
SECTION_MODULES: tuple[str, ...] = ("report_xgboost",)


class SectionSkipped(Exception):
    """Raised by a section function when the runs lack its data; the message is the note."""


class SectionNotApplicable(SectionSkipped):
    """Raised by a section that does not apply to these runs at all: left out without a note.

    For example the XGBoost section of a PyTorch run.
    """


@dataclass
class Section:
    """One report section: ``render(ctx)`` returns the section's HTML body.

    Attributes:
        key: Identifier (HTML anchor).
        title: Heading.
        render: ``render(ctx: ReportContext) -> str``; raises :class:`SectionSkipped` (or
            ``NotFoundError``) when the data is absent.

    """

    key: str
    title: str
    render: Callable[[ReportContext], str]


#: The sections of a report, in order.
SECTIONS: list[Section] = []


def register_section(
    key: str,
    title: str,
    render: Callable[[ReportContext], str],
    *,
    after: Optional[str] = None,
) -> Section:
    """Adds a section to every report (replacing one with the same key).

    Args:
        key: Identifier, also the HTML anchor.
        title: Heading of the section.
        render: ``render(ctx) -> str`` returning HTML (use :meth:`ReportContext.figure` for
            matplotlib figures); raise :class:`SectionSkipped` with a one-line reason when the
            runs lack the data.
        after: Insert after the section with this key (default: at the end).

    Returns:
        The :class:`Section`.

    Example:
        >>> def xgb(ctx):
        ...     return ctx.figure(my_plot(ctx.runs), caption="feature importance")
        >>> register_section("xgboost", "XGBoost", xgb, after="loss")

    """
    sec = Section(key, title, render)
    for i, s in enumerate(SECTIONS):
        if s.key == key:
            SECTIONS[i] = sec
            return sec
    if after is not None:
        for i, s in enumerate(SECTIONS):
            if s.key == after:
                SECTIONS.insert(i + 1, sec)
                return sec
        raise InvalidArgumentError(
            f"no report section {after!r}; sections: {[s.key for s in SECTIONS]}"
        )
    SECTIONS.append(sec)
    return sec


class _Progress:
    """``tensorvigil report: [3/9] gradients`` on stderr, only when stderr is a terminal."""

    def __init__(self, total: int, enabled: Optional[bool] = None) -> None:
        self.total = total
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.t0 = time.perf_counter()

    def step(self, i: int, what: str) -> None:
        if self.enabled:
            sys.stderr.write(f"\r\x1b[Ktensorvigil report: [{i}/{self.total}] {what}")
            sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write(
                f"\r\x1b[Ktensorvigil report: done in {time.perf_counter() - self.t0:.1f} s\n"
            )
            sys.stderr.flush()


class ReportContext:
    """What a section function gets: the runs, and helpers to embed figures.

    Attributes:
        runs: :class:`tensorvigil.plot.RunData` of each run (``.run`` is the ``tv.open`` Run,
            ``.label`` its label); one, or two when comparing.
        title: The report's title.
        images: Number of images embedded so far.

    """

    def __init__(self, runs: list[Any], title: str, progress: _Progress) -> None:
        self.runs = runs
        self.title = title
        self.images = 0
        self.progress = progress

    @property
    def compare(self) -> bool:
        """Whether the report compares runs."""
        return len(self.runs) > 1

    def figure(self, fig: Any, caption: str = "", alt: str = "") -> str:
        """Embeds a matplotlib Figure as a PNG ``<figure>`` and releases the figure.

        Args:
            fig: A Figure (from ``tv.plot``).
            caption: Text under the image (escaped).
            alt: Alternative text (default: the caption).

        Returns:
            The HTML of the figure.

        """
        from .plot import to_png

        png = to_png(fig)
        fig.clear()
        return self.image(png, "image/png", caption, alt)

    def image(self, data: bytes, mime: str, caption: str = "", alt: str = "") -> str:
        """Embeds image bytes (PNG or GIF) as a ``data:`` URI ``<figure>``."""
        from io import BytesIO

        from PIL import Image

        with Image.open(BytesIO(data)) as im:
            w, h = im.size
        self.images += 1
        b64 = base64.b64encode(data).decode("ascii")
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        return (
            f'<figure><img class="plot" src="data:{mime};base64,{b64}" width="{w}" '
            f'height="{h}" alt="{html.escape(alt or caption or "plot", quote=True)}">'
            f"{cap}</figure>"
        )


# -- sections ---------------------------------------------------------------------------------


def _esc(x: Any) -> str:
    return html.escape(str(x))


def _summary(ctx: ReportContext) -> str:
    rows: list[tuple[str, list[str]]] = []

    def add(name: str, fn: Callable[[Any], str]) -> None:
        rows.append((name, [fn(r) for r in ctx.runs]))

    def steps(r: Any) -> str:
        st = r.run.steps()
        if not st:
            return "none committed"
        modes = r.run.step_modes()
        per = {}
        for s in st:
            per[str(modes.get(s, Mode.TRAIN))] = per.get(str(modes.get(s, Mode.TRAIN)), 0) + 1
        by_mode = ", ".join(f"{k} {v}" for k, v in per.items())
        return f"{len(st)} ({st[0]}..{st[-1]}; {by_mode})"

    def wall(r: Any) -> str:
        c = r.run._r.commits()
        t = c["wall_time"]
        if len(t) == 0:
            return "-"
        secs = float(t.max() - t.min())
        start = _dt.datetime.fromtimestamp(float(t.min()), _dt.timezone.utc)
        return f"{secs:.1f} s (first commit {start:%Y-%m-%d %H:%M:%S} UTC)"

    def colls(r: Any) -> str:
        cs = r.run.collections()
        return ", ".join(f"{k} ({len(v)})" for k, v in sorted(cs.items())) or "-"

    def fired(r: Any) -> str:
        fs = [f for f in r.run.findings() if f.get("kind", "fired") == "fired"]
        return str(len(fs))

    add("path", lambda r: r.run.path)
    add(
        "producer",
        lambda r: (
            f"{r.run.manifest.get('producer', '?')}, created {r.run.manifest.get('created', '?')}"
        ),
    )
    add(
        "ranks",
        lambda r: (
            ", ".join(f"{k}{'' if r.run.ended(k) else ' (not closed)'}" for k in r.run.ranks())
            or "-"
        ),
    )
    add("steps", steps)
    add("tensors", lambda r: str(len(r.run.tensor_names())))
    add("collections", colls)
    add("wall time", wall)
    add("findings fired", fired)
    if any(r.run.problems for r in ctx.runs):
        add("problems", lambda r: "; ".join(r.run.problems) or "-")
    head = "".join(f"<th>{_esc(r.label)}</th>" for r in ctx.runs)
    body = "".join(
        f"<tr><th>{_esc(k)}</th>" + "".join(f"<td>{_esc(v)}</td>" for v in vals) + "</tr>"
        for k, vals in rows
    )
    return f'<table class="summary"><tr><th></th>{head}</tr>{body}</table>'


def _findings(ctx: ReportContext) -> str:
    parts = []
    for r in ctx.runs:
        fs = r.run.findings()
        fired = [f for f in fs if f.get("kind", "fired") == "fired"]
        errors = [f for f in fs if f.get("kind") == "error"]
        na = [f for f in fs if f.get("kind") == "not_applicable"]
        head = f"<h3>{_esc(r.label)}</h3>" if ctx.compare else ""
        if not fs:
            parts.append(
                f'{head}<p class="note">No findings recorded (findings.jsonl is absent '
                "or empty: rules did not run, or nothing fired).</p>"
            )
            continue
        rows = []
        for f in fired + errors:
            ev = json.dumps(f.get("evidence", {}), indent=1, sort_keys=True, default=str)
            sev = str(f.get("severity", "warning"))
            kind = "" if f.get("kind", "fired") == "fired" else " (rule error)"
            rows.append(
                f'<tr class="sev-{_esc(sev)}"><td>{_esc(sev)}{kind}</td>'
                f"<td>{_esc(f.get('rule', '?'))}</td>"
                f"<td>{_esc(f.get('step', '?'))} ({_esc(f.get('mode', '?'))} step "
                f"{_esc(f.get('mode_step', '?'))})</td>"
                f"<td>{_esc(f.get('message', ''))}<details><summary>evidence</summary>"
                f"<pre>{_esc(ev)}</pre></details></td></tr>"
            )
        table = (
            '<table class="findings"><tr><th>severity</th><th>rule</th><th>step</th>'
            f"<th>message and evidence</th></tr>{''.join(rows)}</table>"
            if rows
            else '<p class="ok">No rule fired.</p>'
        )
        note = ""
        if na:
            why = "; ".join(f"{f.get('rule')}: {f.get('message', '')}" for f in na)
            note = f'<p class="note">Not applicable to this run: {_esc(why)}</p>'
        parts.append(f"{head}{table}{note}")
    return "".join(parts)


def _loss(ctx: ReportContext) -> str:
    from . import plot

    tbl_vals = []
    for r in ctx.runs:
        names = plot.loss_names(r)
        if names:
            tbl_vals += [v for v in r.run.stats(names).column("mean").to_pylist() if v > 0]
    if not tbl_vals:
        raise SectionSkipped("no loss tensors captured (collection 'losses', hook.record_loss)")
    logy = max(tbl_vals) / min(tbl_vals) > 30
    return ctx.figure(
        plot.loss(ctx.runs, logy=logy),
        "Mean of each recorded loss per saved step; train mode solid, eval dashed."
        + (" Log scale: the losses span more than a factor 30." if logy else ""),
    )


def _metrics(ctx: ReportContext) -> str:
    from . import plot

    names = _union_names(ctx, lambda r: r.collection("metrics", r"^metric/"))
    if not names:
        raise SectionSkipped("no metrics recorded (collection 'metrics', hook.record_scalar)")
    return ctx.figure(
        plot.stat(ctx.runs, names, stat="mean", title="Metrics", ylabel="value"),
        "Value of each recorded metric per saved step (the mean, for a non-scalar metric).",
    )


def _union_names(ctx: ReportContext, fn: Callable[[Any], list[str]]) -> list[str]:
    out: list[str] = []
    for r in ctx.runs:
        out.extend(n for n in fn(r) if n not in out)
    return out


def _heatmaps(ctx: ReportContext, names: list[str], what: str) -> str:
    from . import plot

    out = []
    for n in names:
        try:
            fig = plot.heatmap(ctx.runs, n, title=f"{what} {n}")
        except NotFoundError as e:
            out.append(f'<p class="note">{_esc(n)}: {_esc(e)}</p>')
            continue
        out.append(
            ctx.figure(
                fig,
                f"{what} {n}: x = global step (train), y = value bin, "
                "colour = fraction of the tensor's elements in the bin."
                + (
                    " Runs share the value axis unless their ranges differ by more than 10x."
                    if ctx.compare
                    else ""
                ),
            )
        )
    return "".join(out)


def _gradients(ctx: ReportContext) -> str:
    from . import plot

    names = _union_names(ctx, plot.layer_gradients)
    if not names:
        raise SectionSkipped("no gradients captured (collection 'gradients')")
    return _heatmaps(ctx, names, "Gradient distribution of")


def _gradient_animation(ctx: ReportContext) -> str:
    from . import plot

    names = _union_names(ctx, plot.layer_gradients)
    if not names:
        raise SectionSkipped("no gradients captured (collection 'gradients')")
    anim = plot.animation(ctx.runs, names, title="Gradient histograms", max_frames=40)
    try:
        gif = anim.to_gif()
    finally:
        anim.figure.clear()
    spacing = (
        "one frame per saved train step"
        if len(anim) == anim.available
        else f"{len(anim)} frames evenly spaced over the {anim.available} saved train steps"
    )
    return ctx.image(
        gif,
        "image/gif",
        f"Histogram of each layer's weight gradient over training: {spacing}, "
        f"{anim.fps:g} frames per second, looping. Each panel keeps its axes over the frames.",
        alt="animated gradient histograms",
    )


def _grad_variance(ctx: ReportContext) -> str:
    from . import plot

    if not _union_names(ctx, plot.layer_gradients):
        raise SectionSkipped("no gradients captured (collection 'gradients')")
    return ctx.figure(
        plot.grad_variance_ratio(ctx.runs),
        "Variance of each layer's weight gradient divided by the variance of the last layer's "
        "weight gradient at the same step (log scale). Ratios far below 1 in early layers mean "
        "vanishing gradients; far above 1, exploding ones.",
    )


def _activations(ctx: ReportContext) -> str:
    from . import plot

    names = _union_names(ctx, plot.activation_inputs)
    if not names:
        raise SectionSkipped(
            "no activation inputs captured (collections 'relu_input', 'tanh_input', "
            "'sigmoid_input')"
        )
    return _heatmaps(ctx, names, "Activation-input distribution of")


def _weights(ctx: ReportContext) -> str:
    from . import plot

    names = _union_names(ctx, plot.layer_weights)
    if not names:
        raise SectionSkipped("no weights captured (collection 'weights')")
    out = []
    for n in names:
        try:
            fig = plot.distribution(ctx.runs, n, mode="train", title=f"Weights {n}")
        except NotFoundError as e:
            out.append(f'<p class="note">{_esc(n)}: {_esc(e)}</p>')
            continue
        out.append(
            ctx.figure(fig, f"Distribution of {n} at the first, middle and last saved train step.")
        )
    return "".join(out)


def _update_ratio(ctx: ReportContext) -> str:
    from . import plot

    if not _union_names(ctx, plot.layer_weights):
        raise SectionSkipped("no weights captured (collection 'weights')")
    return ctx.figure(
        plot.update_ratio(ctx.runs),
        "||w_t - w_prev|| / ||w_prev|| per layer between consecutive saved train steps, from "
        "the stored weight values (log scale).",
    )


for _key, _title, _fn in (
    ("summary", "Run summary", _summary),
    ("findings", "Findings", _findings),
    ("loss", "Loss curves", _loss),
    ("metrics", "Metrics", _metrics),
    ("gradients", "Gradient distributions over steps", _gradients),
    ("gradient-animation", "Gradient histograms, animated", _gradient_animation),
    ("gradient-variance", "Per-layer gradient-variance ratio", _grad_variance),
    ("activations", "Activation-input distributions over steps", _activations),
    ("weights", "Weight distributions", _weights),
    ("weight-updates", "Weight-update ratio", _update_ratio),
):
    register_section(_key, _title, _fn)


# -- the page ---------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;
max-width:1100px;padding:0 16px 40px;color:#222;line-height:1.4}
h1{font-size:1.6em;margin:18px 0 4px}h2{margin-top:32px;border-bottom:1px solid #ddd}
.meta{color:#666;font-size:.9em}nav a{margin-right:12px}
table{border-collapse:collapse;margin:8px 0;font-size:.92em}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
table.summary th{background:#f6f6f6}.sev-error td:first-child,.sev-critical td:first-child
{color:#b00020;font-weight:bold}.sev-warning td:first-child{color:#a15c00;font-weight:bold}
pre{font-size:.85em;max-height:300px;overflow:auto;background:#f8f8f8;padding:6px}
figure{margin:12px 0}img.plot{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#555;font-size:.88em}.note{color:#666;font-style:italic}.ok{color:#1b7a1b}
"""


def write_report(
    run: Any,
    out_path: Union[str, os.PathLike],
    *,
    compare: Any = None,
    labels: Optional[Sequence[str]] = None,
    title: Optional[str] = None,
    progress: Optional[bool] = None,
) -> str:
    """Writes a self-contained HTML report of ``run`` (compared with ``compare`` if given).

    Args:
        run: A run path or a ``tv.open`` Run.
        out_path: The HTML file to write (parent folders are created).
        compare: A second run shown side by side with ``run``.
        labels: Labels of the runs (default: their directory names).
        title: Page title (default: ``tensorvigil report: <labels>``).
        progress: Show progress on stderr (default: when stderr is a terminal).

    Returns:
        ``out_path`` as a string.

    Raises:
        NotFoundError: a run does not exist.
        InvalidArgumentError: wrong number of labels.
        StoreIOError: the file cannot be written.

    """
    from . import plot

    for m in SECTION_MODULES:
        importlib.import_module(f".{m}", __package__)
    runs = plot.as_runs([run] if compare is None else [run, compare], labels)
    title = title or "tensorvigil report: " + " vs ".join(r.label for r in runs)
    prog = _Progress(len(SECTIONS), progress)
    ctx = ReportContext(runs, title, prog)
    body, toc = [], []
    for i, sec in enumerate(SECTIONS, 1):
        prog.step(i, sec.title)
        try:
            content = sec.render(ctx)
        except SectionNotApplicable:
            continue
        except (SectionSkipped, NotFoundError) as e:
            body.append(
                f'<section id="{_esc(sec.key)}" class="omitted"><p class="note">'
                f"{_esc(sec.title)}: omitted — {_esc(e)}.</p></section>"
            )
            continue
        toc.append(f'<a href="#{_esc(sec.key)}">{_esc(sec.title)}</a>')
        body.append(f'<section id="{_esc(sec.key)}"><h2>{_esc(sec.title)}</h2>{content}</section>')
    from . import __version__

    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>"
        f'<h1>{_esc(title)}</h1><p class="meta">Generated {now} by tensorvigil '
        f"{_esc(__version__)}; {ctx.images} images.</p><nav>{''.join(toc)}</nav>"
        + "".join(body)
        + "</body></html>\n"
    )
    path = os.fspath(out_path)
    try:
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(page)
        os.replace(tmp, path)
    except OSError as e:
        raise StoreIOError(f"cannot write report to '{path}': {e}") from None
    prog.done()
    return path


__all__ = [
    "SECTIONS",
    "SECTION_MODULES",
    "SectionNotApplicable",
    "ReportContext",
    "Section",
    "SectionSkipped",
    "register_section",
    "write_report",
]
