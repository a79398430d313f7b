"""The one reader of ``iptables-save`` output (with or without ``-c`` counters). Pure.

Two depths over one line lexer (:func:`save_lines`):

- :func:`read_save` is the apply path's pass: lenient and fast, it keeps each rule as the text
  after ``-A CHAIN`` (the kernel's spelling, which :mod:`istio_iptables.xtables.reconcile`
  compares) and skips what it does not recognise. No line numbers, no model.
- :func:`read_save_model` is explain's: strict (what is not iptables-save output is a
  :class:`SaveFormatError` naming the line), it reads every rule into the rule model with its
  position and counters. Every match and target this tool writes is understood; anything else is
  kept as :class:`~istio_iptables.xtables.model.Unsupported` with its original text and listed in
  :attr:`SavedRules.problems`, so a reader of live rules never skips what it does not understand.

The module stays light to import (records, no dataclasses; shlex only when the model is read):
the apply path loads it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterator
from typing import TypeAlias

from istio_iptables._lib.records import factory, record
from istio_iptables.net import Family
from istio_iptables.xtables.model import (
    BUILTIN_CHAINS,
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
    L4Protocol,
    Mark,
    Match,
    Owner,
    PortEntry,
    PortRange,
    Ports,
    Redirect,
    Rule,
    SetMark,
    SetMatch,
    Snat,
    SocketExists,
    Target,
    Tproxy,
    Unsupported,
    Verdict,
)

_COUNTERS = r"\[(\d+):(\d+)\]\s+"  # a pattern, compiled on first use (re caches it): explain only
_TOP_LEVEL = {"-p", "-s", "-d", "-i", "-o"}
_CT_STATES = {"NEW", "ESTABLISHED", "RELATED", "INVALID", "UNTRACKED", "SNAT", "DNAT"}

# table -> chain -> rule specs (the text after "-A CHAIN "), in kernel order.
Chains = dict[str, list[str]]

# --- the lexer both readers share -----------------------------------------------------

# What a line of iptables-save output is: its kind (the first character that tells), and its body.
TABLE_LINE, CHAIN_LINE, RULE_LINE, COMMIT_LINE = "*", ":", "-", "COMMIT"


def save_lines(text: str) -> Iterator[tuple[int, str, str | None, str]]:
    """``(line number, kind, table, body)`` for every line that is not blank or a comment.

    ``kind`` is :data:`TABLE_LINE` (body: the table's name), :data:`CHAIN_LINE` (body: ``NAME
    POLICY [counters]``), :data:`COMMIT_LINE`, or :data:`RULE_LINE` for anything else (body: the
    whole line, ``[p:b] -A CHAIN spec`` or ``-A CHAIN spec``). ``table`` is the table the line
    belongs to, None outside ``*table`` ... ``COMMIT``.
    """
    table: str | None = None
    for number, raw_line in enumerate(text.splitlines(), 1):
        line = raw_line.strip()
        if not line or line[0] == "#":
            continue
        if line[0] == "*":
            table = line[1:].strip()
            yield number, TABLE_LINE, table, table
        elif line == "COMMIT":
            yield number, COMMIT_LINE, table, line
            table = None
        elif line[0] == ":":
            yield number, CHAIN_LINE, table, line[1:]
        else:
            yield number, RULE_LINE, table, line


def split_rule_line(line: str) -> tuple[str, str] | None:
    """``-A CHAIN spec`` as ``(CHAIN, spec)`` with the spec verbatim; None for any other line."""
    if not line.startswith("-A "):
        return None
    _, chain, *rest = line.split(" ", 2)
    return chain, rest[0] if rest else ""


# --- the apply path's pass: chains of rule texts ---------------------------------------------


class SaveDump:
    """One family's ``iptables-save`` output: tables -> chains (policy, ordered rule specs)."""

    def __init__(self) -> None:
        self.tables: dict[str, Chains] = {}
        self.policies: dict[str, dict[str, str]] = {}

    def holds_rules(self) -> list[str]:
        """Evidence that someone uses this backend: tables with rules, user chains or a non-ACCEPT policy."""
        evidence = []
        for table, chains in self.tables.items():
            rules = sum(len(specs) for specs in chains.values())
            user_chains = [name for name in chains if name not in BUILTIN_CHAINS]
            policies = [name for name, policy in self.policies.get(table, {}).items() if policy not in ("ACCEPT", "-")]
            if rules or user_chains or policies:
                evidence.append(f"{table} ({rules} rules, {len(user_chains)} user chains)")
        return evidence


def read_save(text: str) -> SaveDump:
    """Tables, chain policies and rule texts, in kernel order; lines it does not know are skipped."""
    dump = SaveDump()
    for _, kind, table, body in save_lines(text):
        if table is None or kind == COMMIT_LINE:
            continue
        chains = dump.tables.setdefault(table, {})
        if kind == TABLE_LINE:
            dump.policies.setdefault(table, {})
        elif kind == CHAIN_LINE:
            name, policy = [*body.split(), "-"][:2]
            chains.setdefault(name, [])
            dump.policies.setdefault(table, {})[name] = policy
        elif (rule := split_rule_line(body)) is not None:
            chains.setdefault(rule[0], []).append(rule[1])
    return dump


# --- explain's reader: the rule model, with positions and counters ---------------------------


@record
class SavedRule:
    rule: Rule
    text: str  # the line as iptables-save printed it, without counters
    number: int  # 1-based position in its chain, as ``iptables -L --line-numbers`` counts
    packets: int | None = None  # from ``iptables-save -c``


@record(frozen=False)
class SavedRules:
    """One family's tables as iptables-save printed them."""

    family: Family
    chains: dict[tuple[str, str], list[SavedRule]] = factory(dict)
    policies: dict[tuple[str, str], str] = factory(dict)
    problems: list[str] = factory(list)

    def rule(self, table: str, chain: str, number: int) -> SavedRule:
        return self.chains[(table, chain)][number - 1]


class SaveFormatError(ValueError):
    """The text is not iptables-save output."""


def read_save_model(text: str, family: Family) -> SavedRules:
    """Every rule of ``text`` in the rule model, per chain in order, with its text and counters."""
    import shlex  # explain only: the apply path never reads rules into the model

    saved = SavedRules(family)
    for line_number, kind, table, line in save_lines(text):
        if kind in (TABLE_LINE, COMMIT_LINE):
            continue
        if table is None:
            whole = line if kind == RULE_LINE else ":" + line
            raise SaveFormatError(f"line {line_number}: {whole!r} outside a table")
        if kind == CHAIN_LINE:
            name, policy = line.split()[:2]
            saved.chains.setdefault((table, name), [])
            if name in BUILTIN_CHAINS:
                saved.policies[(table, name)] = policy
            continue
        packets = None
        counters = re.match(_COUNTERS, line)
        if counters:
            packets = int(counters.group(1))
            line = line[counters.end() :]
        try:
            tokens = shlex.split(line)
        except ValueError as error:
            raise SaveFormatError(f"line {line_number}: {error}") from None
        if len(tokens) < 2 or tokens[0] != "-A":
            raise SaveFormatError(f"line {line_number}: expected '-A CHAIN ...', got {line!r}")
        chain = tokens[1]
        matches, target = parse_rule_spec(tokens[2:])
        rule = Rule(table, chain, matches, target)  # type: ignore[arg-type]
        for part in (*matches, target):
            if isinstance(part, Unsupported):
                saved.problems.append(f"{table} {chain}: not understood: {part.text!r} in {line!r}")
        rules = saved.chains.setdefault((table, chain), [])
        rules.append(SavedRule(rule, line, len(rules) + 1, packets))
    return saved


def parse_rule_spec(tokens: list[str]) -> tuple[tuple[Match, ...], Target]:
    """Matches and target of one rule: the tokens after ``-A CHAIN``."""
    matches: list[Match] = []
    target: Target | None = None
    for head, body in _segments(tokens):
        if head in ("-j", "-g"):
            target = _target(head, body)
        elif head == "-m":
            matches.extend(_module(body))
        else:
            matches.append(_top_level(head, body))
    if target is None:
        # A rule without a target only counts packets; it decides nothing, so it is harmless to model
        # as a no-op, but say so rather than guessing.
        target = Unsupported("(no target)")
    return tuple(matches), target


def _segments(tokens: list[str]) -> Iterator[tuple[str, list[str]]]:
    """Split into top-level options (``[!] -p tcp``), modules (``-m name ...``) and the target."""
    index = 0
    while index < len(tokens):
        negate = tokens[index] == "!"
        head = tokens[index + 1] if negate else tokens[index]
        start = index + (2 if negate else 1)
        if head in _TOP_LEVEL:
            yield head, (["!"] if negate else []) + tokens[start : start + 1]
            index = start + 1
        elif head in ("-m", "-j", "-g") and not negate:
            end = start + 1
            while end < len(tokens) and not _starts_segment(tokens, end, head):
                end += 1
            yield head, tokens[start:end]
            index = end
        else:
            yield "?", tokens[index:]
            return


def _starts_segment(tokens: list[str], index: int, current: str) -> bool:
    if current in ("-j", "-g"):
        return False  # target options run to the end of the line
    token = tokens[index]
    if token == "!" and index + 1 < len(tokens):
        token = tokens[index + 1]
        return token in _TOP_LEVEL
    return token in _TOP_LEVEL or token in ("-m", "-j", "-g")


def _top_level(head: str, body: list[str]) -> Match:
    negate = body[:1] == ["!"]
    values = body[1:] if negate else body
    text = " ".join(["!", head, *values] if negate else [head, *values])
    if head == "?" or len(values) != 1:
        return Unsupported(" ".join(body) if head == "?" else text)
    value = values[0]
    try:
        if head == "-p" and re.fullmatch(r"[a-z][a-z0-9-]*", value):
            return L4Protocol(value, negate)  # type: ignore[arg-type]
        if head in ("-s", "-d"):
            network = ipaddress.ip_network(value, strict=False)
            return Address("src" if head == "-s" else "dst", network, negate)
        if head in ("-i", "-o"):
            return Interface("in" if head == "-i" else "out", value, negate)
    except ValueError:
        pass
    return Unsupported(text)


def _options(body: list[str]) -> list[tuple[bool, str, list[str]]] | None:
    """``[!] --opt value...`` triples of a module; None when the layout is not understood."""
    options: list[tuple[bool, str, list[str]]] = []
    index = 0
    while index < len(body):
        negate = body[index] == "!"
        if negate:
            index += 1
        if index >= len(body) or not body[index].startswith("--"):
            return None
        name = body[index]
        index += 1
        values = []
        while index < len(body) and body[index] != "!" and not body[index].startswith("--"):
            values.append(body[index])
            index += 1
        options.append((negate, name, values))
    return options


def _number(text: str) -> int:
    return int(text, 0)


def _value_mask(text: str) -> tuple[int, int]:
    value, _, mask = text.partition("/")
    return _number(value), _number(mask) if mask else FULL_MASK


def _ports(text: str) -> tuple[PortEntry, ...]:
    """``80``, ``8000:9000`` or a multiport list of both, as iptables-save prints them."""
    entries: list[PortEntry] = []
    for item in text.split(","):
        first_text, colon, last_text = item.partition(":")
        first = int(first_text) if first_text else 0
        last = (int(last_text) if last_text else 65535) if colon else first
        if not 0 <= first <= last <= 65535:
            raise ValueError(text)
        entries.append(first if first == last else PortRange(first, last))
    return tuple(entries)


def _module(body: list[str]) -> list[Match]:
    name, options = body[0] if body else "", _options(body[1:])
    text = " ".join(["-m", *body])
    parser = _MODULES.get(name)
    if options is None or parser is None:
        return [Unsupported(text)]
    try:
        parsed = parser(options)
    except (ValueError, IndexError):
        parsed = None
    return [Unsupported(text)] if parsed is None else parsed


def _port_module(options: list[tuple[bool, str, list[str]]]) -> list[Match] | None:
    """``-m tcp``/``-m udp`` ``--dport``/``--sport`` and ``-m multiport --dports``/``--sports``."""
    matches: list[Match] = []
    for negate, name, values in options:
        direction = {"--dport": "dst", "--sport": "src", "--dports": "dst", "--sports": "src"}.get(name)
        if direction is None or len(values) != 1:
            return None  # --tcp-flags, --syn, ... are not modelled
        matches.append(Ports(direction, _ports(values[0]), negate))  # type: ignore[arg-type]
    return matches


def _owner_module(options: list[tuple[bool, str, list[str]]]) -> list[Match] | None:
    matches: list[Match] = []
    for negate, name, values in options:
        if name == "--socket-exists" and not values and not negate:
            matches.append(SocketExists())
            continue
        kind = {"--uid-owner": "uid", "--gid-owner": "gid"}.get(name)
        # A uid range (a-b) or --suppl-groups/--socket-exists are not modelled.
        if kind is None or len(values) != 1 or not values[0].isdigit():
            return None
        matches.append(Owner(kind, values[0], negate))  # type: ignore[arg-type]
    return matches


Options: TypeAlias = list[tuple[bool, str, list[str]]]


def _mark_module(kind: type[Mark] | type[ConnMark]) -> Callable[[Options], list[Match] | None]:
    def parse(options: Options) -> list[Match] | None:
        if len(options) != 1 or options[0][1] != "--mark" or len(options[0][2]) != 1:
            return None
        negate, _, values = options[0]
        value, mask = _value_mask(values[0])
        return [kind(value, negate, mask)]

    return parse


def _state_module(option: str) -> Callable[[list[tuple[bool, str, list[str]]]], list[Match] | None]:
    def parse(options: list[tuple[bool, str, list[str]]]) -> list[Match] | None:
        if len(options) != 1 or options[0][0] or options[0][1] != option or len(options[0][2]) != 1:
            return None
        states = tuple(options[0][2][0].split(","))
        return [ConnState(states)] if set(states) <= _CT_STATES else None

    return parse


def _set_module(options: list[tuple[bool, str, list[str]]]) -> list[Match] | None:
    if len(options) != 1 or options[0][1] != "--match-set" or len(options[0][2]) != 2:
        return None
    negate, _, (name, direction) = options[0]
    if direction not in ("src", "dst"):
        return None  # multi-dimensional sets (src,dst) are not modelled
    return [SetMatch(name, direction, negate)]  # type: ignore[arg-type]


def _comment_module(options: list[tuple[bool, str, list[str]]]) -> list[Match] | None:
    # A comment matches every packet; the rule's text keeps it for the reader.
    return [] if [name for _, name, _ in options] == ["--comment"] else None


_MODULES: dict[str, Callable[[list[tuple[bool, str, list[str]]]], list[Match] | None]] = {
    "tcp": _port_module,
    "udp": _port_module,
    "multiport": _port_module,
    "owner": _owner_module,
    "mark": _mark_module(Mark),
    "connmark": _mark_module(ConnMark),
    "conntrack": _state_module("--ctstate"),
    "state": _state_module("--state"),
    "set": _set_module,
    "comment": _comment_module,
}


def _target(head: str, body: list[str]) -> Target:
    text = " ".join([head, *body])
    if not body:
        return Unsupported(text)
    name, options = body[0], _options(body[1:])
    if head == "-g" or options is None:
        return Unsupported(text)  # goto returns to the caller's caller: not modelled
    values = {option: vals for _, option, vals in options}
    negated = any(negate for negate, _, _ in options)
    try:
        target = None if negated else _known_target(name, values)
    except (ValueError, IndexError):
        target = None
    if target is None:
        if not options and re.fullmatch(r"[A-Za-z0-9_.-]+", name) and name not in _TARGET_NAMES:
            return Jump(name)
        return Unsupported(text)
    return target


# Upper-case names are extension targets, never chains we could follow.
_TARGET_NAMES = frozenset(
    {
        "REDIRECT",
        "TPROXY",
        "MARK",
        "CONNMARK",
        "CT",
        "DNAT",
        "SNAT",
        "MASQUERADE",
        "REJECT",
        "LOG",
        "NOTRACK",
        "TRACE",
        "NFQUEUE",
        "CLASSIFY",
        "TCPMSS",
        "DSCP",
        "TOS",
        "TTL",
        "HL",
        "ACCEPT",
        "DROP",
        "RETURN",
        "QUEUE",
        "NFLOG",
        "SET",
        "AUDIT",
        "CHECKSUM",
        "CONNSECMARK",
        "SECMARK",
    }
)


def _known_target(name: str, values: dict[str, list[str]]) -> Target | None:
    keys = set(values)
    if name in ("ACCEPT", "DROP", "RETURN") and not keys:
        return Verdict(name)  # type: ignore[arg-type]
    if name == "REDIRECT" and keys == {"--to-ports"} and values["--to-ports"][0].isdigit():
        return Redirect(int(values["--to-ports"][0]))
    if name == "TPROXY" and keys <= {"--on-port", "--on-ip", "--tproxy-mark"} and "--on-port" in keys:
        on_ip = values.get("--on-ip", ["0.0.0.0"])[0]
        if not ipaddress.ip_address(on_ip).is_unspecified:
            return None  # a fixed --on-ip is not modelled
        mark, mask = _value_mask(values.get("--tproxy-mark", ["0/0"])[0])
        return Tproxy(int(values["--on-port"][0]), mark, mask)
    if name == "MARK" and len(keys) == 1:
        option = next(iter(keys))
        value, mask = _value_mask(values[option][0])
        if option == "--set-xmark":
            return SetMark(value, mask)
        if option == "--set-mark":
            # --set-mark v/m is (mark & ~m) | v, which equals --set-xmark v/(m|v).
            return SetMark(value, mask | value)
        return None
    if name == "CONNMARK":
        full = [f"{FULL_MASK:#x}"]
        masks_full = all(values.get(option, full) == full for option in ("--nfmask", "--ctmask", "--mask"))
        if masks_full and keys - {"--nfmask", "--ctmask", "--mask"} == {"--save-mark"}:
            return ConnMarkSave()
        if masks_full and keys - {"--nfmask", "--ctmask", "--mask"} == {"--restore-mark"}:
            return ConnMarkRestore()
        if keys - {"--nfmask", "--ctmask"} == {"--restore-mark"}:
            return ConnMarkRestore(*(_number(values.get(option, full)[0]) for option in ("--nfmask", "--ctmask")))
        if keys == {"--set-xmark"}:
            value, mask = _value_mask(values["--set-xmark"][0])
            return ConnMarkSet(value, mask)
        return None
    if name == "SNAT" and keys == {"--to-source"} and len(values["--to-source"]) == 1:
        return Snat(ipaddress.ip_address(values["--to-source"][0]))  # a range or a port is not modelled
    if name == "CT" and keys == {"--zone"} and values["--zone"][0].isdigit():
        return CtZone(int(values["--zone"][0]))
    return None
