"""``tensorvigil`` command line: ``demo``, ``ls``, ``stats``, ``check``, ``watch``.

Errors are one clear line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

from ..errors import TensorVigilError


def _fmt(v: float) -> str:
    return f"{v:.4g}" if v == v else "nan"


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]], right: set) -> None:
    """Prints an aligned text table; columns in ``right`` are right-aligned."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if i in right else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths))
        ).rstrip()

    print(line(headers))
    print(line(["-" * w for w in widths]))
    for r in cells:
        print(line(r))


def _kind_of(run, names: Sequence[str]) -> dict[str, str]:
    """The built-in collection (kind) of each tensor, from ``collections.json``."""
    from ..hooks.base import KINDS

    out: dict[str, str] = {}
    cols = run.collections()
    for kind in KINDS:
        for n in cols.get(kind, ()):
            out.setdefault(n, kind)
    for coll, members in cols.items():
        for n in members:
            out.setdefault(n, coll)
    return {n: out.get(n, "-") for n in names}


def cmd_ls(args: argparse.Namespace) -> int:
    """Prints ranks, steps per mode, findings and tensors of a run."""
    from .. import open as open_run
    from ..modes import Mode

    run = open_run(args.run)
    steps = run.steps()
    ranks = run.ranks()
    print(f"run       {run.path}")
    ended = sum(run.ended(r) for r in ranks)
    print(f"ranks     {len(ranks)} {ranks if len(ranks) <= 8 else ''} ({ended} ended)".rstrip())
    span = f" ({steps[0]}..{steps[-1]})" if steps else ""
    per_mode = ", ".join(
        f"{m.name.lower()} {len(run.steps(mode=m))}" for m in Mode if run.steps(mode=m)
    )
    print(f"steps     {len(steps)} committed{span}" + (f": {per_mode}" if per_mode else ""))
    findings = run.findings()
    fired = [f for f in findings if f.get("kind", "fired") == "fired"]
    rules = sorted({f["rule"] for f in fired})
    print(f"findings  {len(fired)}" + (f" ({', '.join(rules)})" if rules else ""))
    names = run.tensor_names(regex=args.tensor)
    kinds = _kind_of(run, names)
    rows = []
    for n in names:
        t = run.tensor(n)
        ts = t.steps(rank=ranks[0]) if ranks else []
        if not ts:
            continue
        rec = t.record(ts[-1], rank=ranks[0])
        stored = "values" if rec.has_value else "stats"
        rows.append(
            [
                n,
                kinds[n],
                rec.dtype,
                "x".join(map(str, rec.shape)) or "scalar",
                len(ts),
                f"{ts[0]}..{ts[-1]}",
                stored,
            ]
        )
    print(f"tensors   {len(rows)}")
    if rows:
        _table(
            ["tensor", "collection", "dtype", "shape", "steps", "span", "stored"], rows, right={4}
        )
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    """Prints statistics of matching tensors over steps (from the index, no payload read)."""
    from .. import open as open_run

    run = open_run(args.run)
    steps = range(args.start, args.end) if args.end is not None else None
    if steps is None and args.start:
        steps = range(args.start, 2**62)
    table = run.stats(regex=args.tensor, steps=steps, mode=args.mode)
    cols = ["numel", "nan", "min", "max", "mean", "std", "l2"]
    rows = table.to_pylist()
    rows.sort(key=lambda r: (str(r["tensor"]), r["rank"], r["step"]))
    from ..modes import Mode

    shown = [
        [r["tensor"], r["rank"], r["step"], Mode(r["mode"]).name.lower()]
        + [str(r[c]) if c in ("numel", "nan") else _fmt(r[c]) for c in cols]
        for r in rows[: args.limit]
    ]
    if not shown:
        print(f"no statistics match (tensors: {args.tensor or 'all'})")
        return 0
    _table(
        ["tensor", "rank", "step", "mode", *cols],
        shown,
        right=set(range(1, 3 + len(cols) + 1)) - {3},
    )
    if len(rows) > args.limit:
        print(f"... {len(rows) - args.limit} more rows (use --limit)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Trains the poorly and the well initialised demo CNN, prints findings, writes a report."""
    from ..demo import run_demo

    out = args.out or os.path.join(os.getcwd(), "tensorvigil-demo")
    # Findings are printed below, labelled with their run; the log line would repeat them.
    logging.getLogger("tensorvigil.findings").setLevel(logging.ERROR)

    def live(label: str, finding) -> None:
        if finding.kind == "fired":
            print(f"  [{label}] step {finding.step}: {finding.rule} fired", flush=True)

    print(f"training two CNNs on scikit-learn's digits into {out} ...", flush=True)
    result = run_demo(out, steps=args.steps, report=not args.no_report, live=live)
    print(result.format())
    if result.report:
        print(f"report: {result.report}")
    print(f"done in {result.seconds:.1f} s; explore with: tensorvigil ls {out}/bad")
    return 0


_COMMAND_MODULES = ("rules_cmd", "export_cmd", "fsck_cmd", "report_cmd")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``tensorvigil`` command."""
    from .. import __version__

    p = argparse.ArgumentParser(prog="tensorvigil", description="Debugger for ML training runs.")
    p.add_argument("--version", action="version", version=f"tensorvigil {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser(
        "demo", help="train a poorly and a well initialised CNN with capture and rules"
    )
    d.add_argument("--out", help="output directory (default ./tensorvigil-demo)")
    d.add_argument("--steps", type=int, default=300, help="training steps per run (default 300)")
    d.add_argument("--no-report", action="store_true", help="skip report.html")
    d.set_defaults(func=cmd_demo)

    ls = sub.add_parser("ls", help="list ranks, steps and tensors of a run")
    ls.add_argument("run")
    ls.add_argument("--tensor", help="regex filter on tensor names")
    ls.set_defaults(func=cmd_ls)

    st = sub.add_parser("stats", help="print statistics of tensors over steps")
    st.add_argument("run")
    st.add_argument("--tensor", help="regex filter on tensor names")
    st.add_argument("--start", type=int, default=0)
    st.add_argument("--end", type=int, default=None, help="exclusive")
    st.add_argument("--limit", type=int, default=200, help="rows to print")
    st.add_argument("--mode", choices=["train", "eval", "predict"], help="only this mode")
    st.set_defaults(func=cmd_stats)

    import importlib

    # Each command module adds its subparsers; add a module here to add commands.
    for module in _COMMAND_MODULES:
        importlib.import_module(f"{__package__}.{module}").add_parsers(sub)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``tensorvigil`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except TensorVigilError as e:
        print(f"tensorvigil: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader of our output went away (e.g. `| head`): exit quietly, like coreutils.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
