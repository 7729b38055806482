"""Helpers shared by the rule test files: evaluate one rule over a run, pick fired findings."""

import tensorvigil as tv


def run_rule(path, rule):
    """Findings of ``rule`` over every committed step of the run at ``path`` (not recorded)."""
    return tv.rules.RuleEngine(path, [rule], record=False).poll()


def fired(findings):
    """The findings that fired (not ``not_applicable`` or rule errors)."""
    return [f for f in findings if f.fired]


def steps_of(findings):
    """Steps of the fired findings."""
    return [f.step for f in fired(findings)]
