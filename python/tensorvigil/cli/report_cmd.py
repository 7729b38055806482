"""``tensorvigil report``: a self-contained HTML report of a run (or two, compared)."""

from __future__ import annotations

import argparse
import os
import time


def cmd_report(args: argparse.Namespace) -> int:
    """Writes the HTML report and prints where it went."""
    from ..errors import InvalidArgumentError
    from ..report import write_report

    labels = args.label or None
    if labels is not None and len(labels) != (2 if args.compare else 1):
        raise InvalidArgumentError(
            f"--label given {len(labels)} times for {2 if args.compare else 1} run(s)"
        )
    t0 = time.perf_counter()
    path = write_report(
        args.run, args.output, compare=args.compare, labels=labels, title=args.title
    )
    size = os.path.getsize(path)
    print(f"report written to {path} ({size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Adds the ``report`` command."""
    p = sub.add_parser(
        "report",
        help="write a self-contained HTML report (plots, findings) of a run",
        description="Write one self-contained HTML file (no network, images embedded) with the "
        "run summary, rule findings and plots of gradients, activations, weights and losses.",
    )
    p.add_argument("run", help="run directory")
    p.add_argument("--compare", metavar="RUN2", help="a second run shown side by side")
    p.add_argument(
        "-o", "--output", default="report.html", help="HTML file to write (default: report.html)"
    )
    p.add_argument("--title", help="page title")
    p.add_argument(
        "--label",
        action="append",
        help="label of a run (repeat: first RUN, then RUN2; default: folder names)",
    )
    p.set_defaults(func=cmd_report)
