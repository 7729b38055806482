"""``tensorvigil`` command line: ``demo``, ``ls``, ``stats``, ``check``, ``watch``.

Errors are one clear line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

from ..errors import TensorVigilError


def _fmt(v: float) -> str:
    return f"{v:.4g}" if v == v else "nan"


def cmd_ls(args: argparse.Namespace) -> int:
    """Prints ranks, steps and tensors of a run."""
    from .. import open as open_run

    run = open_run(args.run)
    steps = run.steps()
    print(f"run      {run.path}")
    print(f"ranks    {run.ranks()}  ended={[run.ended(r) for r in run.ranks()]}")
    span = f"{steps[0]}..{steps[-1]}" if steps else "-"
    print(f"steps    {len(steps)} committed ({span})")
    names = run.tensor_names(regex=args.tensor)
    print(f"tensors  {len(names)}")
    for n in names:
        t = run.tensor(n)
        ts = t.steps()
        if not ts:
            continue
        rec = t.record(ts[-1])
        print(f"  {n:<40} {rec.dtype:<9} {list(rec.shape)!s:<16} {len(ts)} steps")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    """Prints statistics of matching tensors over steps (from the index, no payload read)."""
    from .. import open as open_run

    run = open_run(args.run)
    table = run.stats(regex=args.tensor, steps=range(args.start, args.end) if args.end else None)
    cols = ["step", "numel", "nan", "min", "max", "mean", "std", "l2"]
    rows = table.to_pylist()
    rows.sort(key=lambda r: (str(r["tensor"]), r["rank"], r["step"]))
    print(f"{'tensor':<40} {'rank':>4} " + " ".join(f"{c:>10}" for c in cols))
    for r in rows[: args.limit]:
        vals = [str(r[c]) if c in ("step", "numel", "nan") else _fmt(r[c]) for c in cols]
        print(f"{r['tensor']!s:<40} {r['rank']:>4} " + " ".join(f"{v:>10}" for v in vals))
    if len(rows) > args.limit:
        print(f"... {len(rows) - args.limit} more rows (use --limit)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Trains a small NumPy MLP, captures it with the store and prints what was captured."""
    from ..demo import run_demo

    out = args.out or os.path.join(os.getcwd(), "tensorvigil-demo")
    t0 = time.perf_counter()
    summary = run_demo(out, steps=args.steps)
    print(summary)
    print(
        f"run written to {out} in {time.perf_counter() - t0:.1f} s; "
        f"explore it with: tensorvigil ls {out}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``tensorvigil`` command."""
    from .. import __version__

    p = argparse.ArgumentParser(prog="tensorvigil", description="Debugger for ML training runs.")
    p.add_argument("--version", action="version", version=f"tensorvigil {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="train a small model with capture and summarise the run")
    d.add_argument("--out", help="run directory (default ./tensorvigil-demo)")
    d.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
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
    st.set_defaults(func=cmd_stats)

    from .rules_cmd import add_parsers

    add_parsers(sub)
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


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
