"""``tensorvigil export RUN --tensorboard DIR``: a TensorBoard view of a run, brought up to date."""

from __future__ import annotations

import argparse
import json
from typing import Any, Optional

from ..errors import InvalidArgumentError


def _split(values: Optional[list[str]]) -> Optional[list[str]]:
    """``--collections a,b --collections c`` -> ``[a, b, c]``."""
    if values is None:
        return None
    out = [p.strip() for v in values for p in v.split(",") if p.strip()]
    if not out:
        raise InvalidArgumentError("--collections names no collection")
    return out


def _ranks(spec: Optional[str]) -> Optional[list[int]]:
    if spec is None:
        return None
    try:
        ranks = [int(p) for p in spec.split(",") if p.strip()]
    except ValueError:
        raise InvalidArgumentError(
            f"--ranks must be comma-separated integers, got {spec!r}"
        ) from None
    if not ranks:
        raise InvalidArgumentError("--ranks names no rank")
    return ranks


def cmd_export(args: argparse.Namespace) -> int:
    """Exports (incrementally) a run to TensorBoard event files; prints what was written."""
    from ..export.tensorboard import export_tensorboard

    result = export_tensorboard(
        args.run,
        args.tensorboard,
        collections=_split(args.collections),
        steps=args.steps,
        ranks=_ranks(args.ranks),
        stats=args.stats,
        histograms=args.histograms,
        hist_bins=args.hist_bins,
        step_axis=args.step_axis,
        findings=not args.no_findings,
        overwrite=args.overwrite,
    )
    if args.json:
        doc: dict[str, Any] = {
            "logdir": result.logdir,
            "events": result.events,
            "records": result.records,
            "scalars": result.scalars,
            "histograms": result.histograms,
            "findings": result.findings,
            "seconds": round(result.seconds, 6),
            "files": result.files,
        }
        print(json.dumps(doc))
    else:
        print(f"exported {result}")
        if result.events or result.findings:
            print(f"view it with: tensorboard --logdir {result.logdir}")
    return 0


def add_parsers(sub: Any) -> None:
    """Adds ``export`` to the ``tensorvigil`` sub-command parser."""
    from ..export.tensorboard import DEFAULT_STATS, HISTOGRAM_SOURCES, STATS, STEP_AXES

    p = sub.add_parser(
        "export",
        help="export a run to TensorBoard event files (re-running appends only new steps)",
        description="Writes DIR/rank<R>/<mode>/events.out.tfevents.* with per-tensor statistics "
        "as scalars, histograms, losses and metrics, and rule findings as text. Re-running it "
        "appends only steps committed since the last export into DIR.",
    )
    p.add_argument("run", help="run directory")
    p.add_argument(
        "--tensorboard", required=True, metavar="DIR", help="TensorBoard log directory to write"
    )
    p.add_argument(
        "--collections",
        nargs="+",
        metavar="NAME",
        help="export only tensors of these collections (space- or comma-separated)",
    )
    p.add_argument("--steps", metavar="A:B", help="only steps A <= step < B (A: or :B also work)")
    p.add_argument("--ranks", metavar="R[,R]", help="only these ranks (default: all)")
    p.add_argument(
        "--stats",
        default=",".join(DEFAULT_STATS),
        help=f"statistics exported per tensor (default %(default)s; any of {', '.join(STATS)})",
    )
    p.add_argument(
        "--histograms",
        choices=HISTOGRAM_SOURCES,
        default="auto",
        help="auto: stored histograms, else computed from stored values (default); "
        "stored: stored histograms only; none: no histograms",
    )
    p.add_argument(
        "--hist-bins", type=int, default=30, help="bins of histograms computed from values"
    )
    p.add_argument(
        "--step-axis",
        choices=STEP_AXES,
        default="global",
        help="TensorBoard step: the global step (default) or the step within the mode",
    )
    p.add_argument("--no-findings", action="store_true", help="do not export rule findings")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="delete an earlier export's event files and state in DIR first",
    )
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=cmd_export)


__all__ = ["add_parsers", "cmd_export"]
