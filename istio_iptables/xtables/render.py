"""Render the rule model as iptables-restore input.

Every token comes from a typed, validated value (numbers, parsed addresses, names
checked against a strict pattern), and :func:`check_token` refuses anything that
could end a line or start another option, so no input can add a rule of its own.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from istio_iptables.xtables.model import (
    FULL_MASK,
    Address,
    ConnMark,
    ConnMarkRestore,
    ConnMarkSave,
    ConnMarkSet,
    ConnState,
    CtZone,
    Interface,
    Jump,
    Mark,
    Match,
    Owner,
    PortEntry,
    PortRange,
    Ports,
    Protocol,
    ProtocolModule,
    Redirect,
    Rule,
    RuleSet,
    SetMark,
    SetMatch,
    Snat,
    SocketExists,
    Target,
    Tproxy,
    Verdict,
    port_bounds,
)

MULTIPORT_LIMIT = 15  # the kernel's xt_multiport holds at most 15 ports per rule (a range takes 2)
_SAFE_TOKEN = re.compile(r"[A-Za-z0-9_.:/,@+!$-]+")


class RenderError(ValueError):
    """A value reached the renderer that could change the meaning of the restore input."""


def check_token(token: str) -> str:
    if not _SAFE_TOKEN.fullmatch(token):
        raise RenderError(f"refusing to render unsafe token {token!r}")
    return token


def port_text(entry: PortEntry) -> str:
    """A port or a range in iptables' spelling (``8000``, ``8000:9000``), from checked integers only."""
    first, last = port_bounds(entry)
    if type(first) is not int or type(last) is not int or not 0 <= first <= last <= 65535:
        raise RenderError(f"refusing to render port {entry!r}")
    return str(first) if first == last else f"{first}:{last}"


def multiport_slots(entries: Iterable[PortEntry]) -> int:
    """How much of multiport's 15 places ``entries`` take: the kernel stores a range as two ports."""
    return sum(2 if isinstance(entry, PortRange) else 1 for entry in entries)


def _negated(negate: bool, *tokens: str) -> list[str]:
    return ["!", *tokens] if negate else list(tokens)


def _masked(value: int, mask: int) -> str:
    return str(value) if mask == FULL_MASK else f"{value:#x}/{mask:#x}"


def match_tokens(match: Match) -> list[str]:
    if isinstance(match, Protocol):
        return _negated(match.negate, "-p", match.name)
    if isinstance(match, Address):
        return _negated(match.negate, "-s" if match.direction == "src" else "-d", str(match.network))
    if isinstance(match, Interface):
        return _negated(match.negate, "-i" if match.direction == "in" else "-o", match.name)
    if isinstance(match, Ports):
        if len(match.ports) == 1:
            option = "--sport" if match.direction == "src" else "--dport"
            return _negated(match.negate, option, port_text(match.ports[0]))
        if multiport_slots(match.ports) > MULTIPORT_LIMIT:
            raise RenderError(f"multiport takes at most {MULTIPORT_LIMIT} ports (a range counts 2), got {match.ports}")
        option = "--sports" if match.direction == "src" else "--dports"
        return ["-m", "multiport", *_negated(match.negate, option, ",".join(map(port_text, match.ports)))]
    if isinstance(match, Owner):
        return ["-m", "owner", *_negated(match.negate, f"--{match.kind}-owner", match.id)]
    if isinstance(match, Mark):
        return ["-m", "mark", *_negated(match.negate, "--mark", _masked(match.value, match.mask))]
    if isinstance(match, ConnMark):
        return ["-m", "connmark", *_negated(match.negate, "--mark", _masked(match.value, match.mask))]
    if isinstance(match, ConnState):
        return ["-m", "conntrack", "--ctstate", ",".join(match.states)]
    if isinstance(match, SetMatch):
        return ["-m", "set", *_negated(match.negate, "--match-set", match.name, match.direction)]
    if isinstance(match, ProtocolModule):
        return ["-m", match.name]
    if isinstance(match, SocketExists):
        return ["-m", "owner", "--socket-exists"]
    raise TypeError(f"unknown match {match!r}")


def target_tokens(target: Target) -> list[str]:
    if isinstance(target, Jump):
        return ["-j", target.chain]
    if isinstance(target, Verdict):
        return ["-j", target.name]
    if isinstance(target, Redirect):
        return ["-j", "REDIRECT", "--to-ports", str(target.port)]
    if isinstance(target, Tproxy):
        return ["-j", "TPROXY", "--tproxy-mark", f"{target.mark}/{target.mask:#x}", "--on-port", str(target.port)]
    if isinstance(target, SetMark):
        if target.mask != FULL_MASK:
            return ["-j", "MARK", "--set-xmark", _masked(target.value, target.mask)]
        return ["-j", "MARK", "--set-mark", str(target.value)]
    if isinstance(target, ConnMarkSet):
        return ["-j", "CONNMARK", "--set-xmark", f"{target.value:#x}/{target.mask:#x}"]
    if isinstance(target, ConnMarkSave):
        return ["-j", "CONNMARK", "--save-mark"]
    if isinstance(target, ConnMarkRestore):
        masks = [f"{mask:#x}" if mask is not None else None for mask in (target.nfmask, target.ctmask)]
        tokens = ["-j", "CONNMARK", "--restore-mark"]
        for option, mask in zip(("--nfmask", "--ctmask"), masks, strict=True):
            tokens += [option, mask] if mask is not None else []
        return tokens
    if isinstance(target, CtZone):
        return ["-j", "CT", "--zone", str(target.zone)]
    if isinstance(target, Snat):
        return ["-j", "SNAT", "--to-source", str(target.address)]
    raise TypeError(f"unknown target {target!r}")


def rule_spec(rule: Rule) -> list[str]:
    """The rule's matches and target as iptables arguments (no chain, no -A/-I)."""
    tokens = [token for match in rule.matches for token in match_tokens(match)]
    tokens += target_tokens(rule.target)
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
