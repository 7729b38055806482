"""Detection quality: every labelled fault is found by its rules in time; healthy runs are quiet.

The scenarios (real small PyTorch training runs, one injected fault each, or healthy) live in
``scenarios.py``; docs/rules/scenarios.md has the scenario x rule table
(``tools/scenario_table.py``). Each run is trained once per module and shared by the tests.
"""

from __future__ import annotations

import pytest
from scenarios import FAULTY, HEALTHY, SCENARIOS

import tensorvigil as tv


@pytest.fixture(scope="module")
def run_of(tmp_path_factory):
    """``run_of(name)``: the run directory of scenario ``name`` (trained on first use)."""
    cache: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in cache:
            path = str(tmp_path_factory.mktemp(name) / "run")
            SCENARIOS[name].run(path)
            cache[name] = path
        return cache[name]

    return get


def _evaluate(path: str, rules: list) -> list:
    return tv.rules.RuleEngine(path, rules, record=False).poll()


def _first_fired(findings: list) -> dict[str, int]:
    first: dict[str, int] = {}
    for f in findings:
        if f.kind == "fired":
            first[f.rule] = min(first.get(f.rule, f.step), f.step)
    return first


def _describe(findings: list) -> str:
    return "\n".join(f"  {f.kind} {f}" for f in findings) or "  (no findings)"


def test_suite_covers_the_issue():
    assert len(FAULTY) >= 12
    assert len(HEALTHY) >= 5
    for sc in FAULTY:
        assert sc.expect, f"{sc.name} names no intended rule"
        for e in sc.expect:
            assert e.rule in tv.rules.available(), e.rule
    for sc in HEALTHY:
        assert not sc.expect


@pytest.mark.parametrize("name", [s.name for s in FAULTY])
def test_fault_found_by_intended_rules(run_of, name):
    sc = SCENARIOS[name]
    findings = _evaluate(run_of(name), sc.rules())
    errors = [f for f in findings if f.kind == "error"]
    assert not errors, f"rule error(s) on {name}:\n{_describe(errors)}"
    first = _first_fired(findings)
    missed = [
        f"{e.label}: expected by step {e.by_step}, "
        + (f"first fired at step {first[e.rule]}" if e.rule in first else "never fired")
        for e in sc.expect
        if first.get(e.rule, e.by_step + 1) > e.by_step
    ]
    assert not missed, (
        f"{name} ({sc.fault}): " + "; ".join(missed) + f"\nfindings:\n{_describe(findings)}"
    )


@pytest.mark.parametrize("name", [s.name for s in HEALTHY])
def test_defaults_silent_on_healthy_run(run_of, name):
    findings = _evaluate(run_of(name), tv.rules.defaults())
    raised = [f for f in findings if f.kind != "not_applicable"]
    assert not raised, f"default rules raised on healthy run {name}:\n{_describe(raised)}"


@pytest.mark.parametrize("name", [s.name for s in FAULTY])
def test_defaults_on_faulty_run(run_of, name, record_property):
    sc = SCENARIOS[name]
    findings = _evaluate(run_of(name), tv.rules.defaults())
    errors = [f for f in findings if f.kind == "error"]
    assert not errors, f"default rule error(s) on {name}:\n{_describe(errors)}"
    first = _first_fired(findings)
    record_property("default_rules_fired", ", ".join(f"{r}@{s}" for r, s in first.items()))
    if sc.defaults_detect:
        assert first, f"no default rule fired on {name} ({sc.fault})"
