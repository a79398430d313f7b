"""Render the rule model as iptables-restore input.

Every token comes from a typed, validated value (numbers, parsed addresses, names
checked against a strict pattern), and :func:`check_token` refuses anything that
could end a line or start another option, so no input can add a rule of its own.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from istio_iptables.xtables.model import Rule, RuleSet
from istio_iptables.xtables.spelling import RenderError, written_tokens

_SAFE_TOKEN = re.compile(r"[A-Za-z0-9_.:/,@+!$-]+")


def check_token(token: str) -> str:
    if not _SAFE_TOKEN.fullmatch(token):
        raise RenderError(f"refusing to render unsafe token {token!r}")
    return token


def rule_spec(rule: Rule) -> list[str]:
    """The rule's matches and target as iptables arguments (no chain, no -A/-I)."""
    tokens = [token for match in rule.matches for token in written_tokens(match)]
    tokens += written_tokens(rule.target)
    return [check_token(token) for token in tokens]


def rule_line(rule: Rule) -> str:
    head = ["-A", rule.chain] if rule.position is None else ["-I", rule.chain, str(rule.position)]
    return " ".join([*map(check_token, head), *rule_spec(rule)])


def render_restore(ruleset: RuleSet, *, comment: bool = True) -> str:
    """The restore input for one family, in Istio's layout: ``* table``, ``-N`` chains, rules, COMMIT."""
    lines: list[str] = [f"# {ruleset.family.restore_program}"] if comment else []
    for table in ruleset.tables():
        lines.append(f"* {table}")
        lines.extend(f"-N {check_token(chain)}" for chain in ruleset.declared_chains(table))
        lines.extend(rule_line(rule) for rule in ruleset.rules_of(table))
        lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def render_documents(rulesets: Iterable[RuleSet]) -> str:
    """The dry-run output: the IPv4 document, then the IPv6 one when IPv6 is on."""
    return "".join(render_restore(ruleset) for ruleset in rulesets)
