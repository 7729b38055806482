"""``tensorvigil fsck RUN [--repair]``: check a run's files, rebuild missing shard indexes.

Exit status: 0 when the run is clean, 1 when problems were found (or repaired), 2 on an error
(not a run, I/O error).
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def cmd_fsck(args: argparse.Namespace) -> int:
    """Runs :func:`tensorvigil.store.fsck.fsck` and prints what it found and did."""
    from ..store.fsck import fsck

    rep = fsck(args.run, repair=args.repair, verify_values=not args.no_values)
    if args.json:
        print(json.dumps(rep.to_json()))
        return 0 if rep.clean else 1
    for p in rep.problems:
        print(f"PROBLEM  {p}")
    frames = values = 0
    for s in rep.shards:
        frames += s.frames
        values += s.values_checked
        if s.state in ("ok", "empty") and not s.problems and not s.action:
            continue
        line = f"{s.state.upper():9s}{s.path}: index {s.index_state}, {s.frames} frames"
        if s.discard_frames or s.discard_bytes:
            line += (
                f", {s.discard_frames} uncommitted frames / {s.discard_bytes} bytes"
                " after the last commit"
            )
        print(line)
        for p in s.problems:
            print(f"           {p}")
        if s.action:
            print(f"REPAIRED   {s.action}")
        elif s.needs_repair and not args.repair:
            print("           run with --repair to rebuild its index")
    n_bad = sum(1 for s in rep.shards if s.state not in ("ok", "live", "empty") or s.problems)
    print(
        f"{len(rep.shards)} shards, {frames} frames, {values} values verified; "
        f"{n_bad} shards with findings, {len(rep.problems)} run problems, "
        f"{len(rep.repaired)} repaired"
    )
    return 0 if rep.clean else 1


def add_parsers(sub: Any) -> None:
    """Adds ``fsck`` to the ``tensorvigil`` sub-command parser."""
    p = sub.add_parser(
        "fsck", help="verify every checksum of a run; --repair rebuilds missing shard indexes"
    )
    p.add_argument("run")
    p.add_argument(
        "--repair",
        action="store_true",
        help="rebuild the index of unsealed or damaged shards (bytes after the last commit are "
        "moved to a .tail file, never deleted)",
    )
    p.add_argument("--no-values", action="store_true", help="skip decoding the stored values")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_fsck)
