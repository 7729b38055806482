"""``tensorvigil check`` (offline) and ``tensorvigil watch`` (live) rule evaluation."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..errors import InvalidArgumentError


def make_rules(spec: str, params: list[str]) -> list:
    """Rules from ``--rules default|NAME[,NAME]`` and ``--param Rule.key=value`` options."""
    from ..rules import builtin

    names: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        names.extend(builtin.DEFAULT_RULES if part == "default" else [part])
    if not names:
        raise InvalidArgumentError("--rules names no rule")
    by_rule: dict[str, dict[str, Any]] = {}
    for p in params:
        key, sep, raw = p.partition("=")
        rule, dot, attr = key.partition(".")
        if not sep or not dot or not rule or not attr:
            raise InvalidArgumentError(f"--param must look like Rule.key=value, got {p!r}")
        if rule not in names:
            raise InvalidArgumentError(f"--param {p!r}: rule {rule} is not among --rules")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        by_rule.setdefault(rule, {})[attr] = value
    seen: list[str] = []
    for n in names:
        if n not in seen:
            seen.append(n)
    return [builtin.make_rule(n, **by_rule.get(n, {})) for n in seen]


def _print(f: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(f.to_json()), flush=True)
    elif f.fired:
        print(f"FIRED  {f}", flush=True)
    else:
        print(f"note   {f}", flush=True)


def _summary(findings: list, steps: int, as_json: bool) -> int:
    fired = [f for f in findings if f.fired]
    if as_json:
        print(
            json.dumps(
                {
                    "summary": True,
                    "steps_evaluated": steps,
                    "fired": len(fired),
                    "rules_fired": sorted({f.rule for f in fired}),
                }
            )
        )
    else:
        rules = ", ".join(sorted({f.rule for f in fired})) or "none"
        print(f"{steps} steps checked; {len(fired)} finding(s); rules fired: {rules}")
    return 1 if fired else 0


def cmd_check(args: argparse.Namespace) -> int:
    """Evaluates rules over every committed step of a run; exit 1 when any fired."""
    from ..rules.engine import RuleEngine

    rules = make_rules(args.rules, args.param)
    engine = RuleEngine(args.run, rules, record=args.record, rank_timeout=args.rank_timeout)
    findings = engine.poll()
    for f in findings:
        _print(f, args.json)
    _print_lost_ranks(engine, args.json)
    return _summary(findings, engine.steps_evaluated, args.json)


def _print_lost_ranks(engine: Any, as_json: bool) -> None:
    """Says which ranks the engine stopped waiting for (``--rank-timeout``)."""
    for rank, st in sorted(engine.lost_ranks.items()):
        if as_json:
            print(json.dumps({"rank_lost": rank, **st}))
        else:
            print(
                f"rank {rank} is {st['state']} (last committed step {st['last_step']}, idle "
                f"{st['idle_s']:.0f} s): later steps were checked without it"
            )


def cmd_watch(args: argparse.Namespace) -> int:
    """Follows a live run, evaluating rules on each committed step; exit 1 when any fired."""
    from ..rules import actions
    from ..rules.engine import RuleEngine

    rules = make_rules(args.rules, args.param)
    acts: list = []
    if args.webhook:
        acts.append(actions.Webhook(args.webhook, timeout=args.webhook_timeout))
    if args.stop:
        acts.append(actions.StopTraining(run_dir=args.run))
    engine = RuleEngine(
        _wait_for_run(args.run, args.timeout, args.poll),
        rules,
        actions=acts,
        rank_timeout=args.rank_timeout,
    )
    if not args.json:
        print(f"watching {args.run} with {', '.join(r.name for r in rules)}", flush=True)
    findings = []
    for f in engine.watch(timeout=args.timeout, poll_interval=args.poll):
        findings.append(f)
        _print(f, args.json)
        if args.stop and f.fired and not args.json:
            print(f"stop requested: {f.rule} fired at step {f.step}", flush=True)
    for a in acts:
        if isinstance(a, actions.Webhook):
            a.flush()
    _print_lost_ranks(engine, args.json)
    return _summary(findings, engine.steps_evaluated, args.json)


def _wait_for_run(path: str, timeout: Any, poll: float) -> Any:
    """Opens ``path``, waiting (up to ``timeout`` s) for a training to create it."""
    import time

    from ..errors import NotFoundError
    from ..store.reader import Run

    end = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            return Run(path)
        except NotFoundError:
            if end is not None and time.monotonic() > end:
                raise
            time.sleep(poll)


def add_parsers(sub: Any) -> None:
    """Adds ``check`` and ``watch`` to the ``tensorvigil`` sub-command parser."""
    for name, helptext, func in (
        ("check", "evaluate rules over a stored run (exit 1 if any fired)", cmd_check),
        ("watch", "evaluate rules live as a run is written (exit 1 if any fired)", cmd_watch),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("run")
        p.add_argument("--rules", default="default", help="'default' or comma-separated rule names")
        p.add_argument(
            "--param",
            action="append",
            default=[],
            metavar="RULE.KEY=VALUE",
            help="rule parameter (value parsed as JSON when it can be), repeatable",
        )
        p.add_argument("--json", action="store_true", help="one JSON object per line")
        p.add_argument(
            "--rank-timeout",
            type=float,
            default=None,
            metavar="SECONDS",
            help="stop waiting for ranks dead or stalled this long (default: wait for every rank)",
        )
        if name == "check":
            p.add_argument(
                "--record", action="store_true", help="also append findings to the run's log"
            )
        else:
            p.add_argument(
                "--stop", action="store_true", help="ask the training to stop when a rule fires"
            )
            p.add_argument("--webhook", help="POST each finding as JSON to this URL")
            p.add_argument("--webhook-timeout", type=float, default=5.0)
            p.add_argument(
                "--timeout",
                type=float,
                default=None,
                help="give up after this many seconds without a new step "
                "(default: until the writers close)",
            )
            p.add_argument("--poll", type=float, default=0.2, help="seconds between polls")
        p.set_defaults(func=func)


__all__ = ["add_parsers", "cmd_check", "cmd_watch", "make_rules"]
