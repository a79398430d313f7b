"""Live and desired rule state, in the kernel's own spelling, and the difference between them (pure).

The kernel normalises every rule it stores (``-m tcp``, ``-s -d -i -o -p`` first, hex marks,
explicit default masks), and ``iptables-save`` prints that normal form. To compare what a plan
wants with what a namespace holds, :func:`canonical_spec` renders the model straight into that
form; tests prove it equal to the kernel's dump for every conformance case on both backends.

What we own in a live namespace is decided from the live state alone (so cleanup works after a
configuration change): every chain in :data:`~istio_iptables.model.OWN_CHAINS`, every rule of a
built-in chain that jumps into one, and the other rule shapes our plans put into built-in
chains (interface RETURNs, TPROXY MARK/CONNMARK rules) when the family holds any of the former.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Callable, Iterable

from istio_iptables.model import (
    BUILTIN_CHAINS,
    OWN_CHAINS,
    TABLES,
    Address,
    ConnMark,
    ConnMarkRestore,
    ConnMarkSave,
    ConnMarkSet,
    ConnState,
    CtZone,
    Family,
    Interface,
    IPNetwork,
    Jump,
    Mark,
    Match,
    Owner,
    Ports,
    Protocol,
    Redirect,
    Rule,
    RuleSet,
    SetMark,
    SetMatch,
    Target,
    Tproxy,
    Verdict,
)
from istio_iptables.render import check_token, rule_line

# table -> chain -> rule specs (the text after "-A CHAIN "), in kernel order.
Chains = dict[str, list[str]]
TableState = dict[str, Chains]
GidResolver = Callable[[str], str]

_FULL_MASK = 0xFFFFFFFF
# The order libxt_conntrack prints --ctstate in, whatever order the rule gave.
_CTSTATE_ORDER = ("INVALID", "NEW", "RELATED", "ESTABLISHED", "UNTRACKED", "SNAT", "DNAT")


# --- iptables-save parsing ----------------------------------------------------


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


def parse_save(text: str) -> SaveDump:
    dump = SaveDump()
    chains: Chains | None = None
    for line in text.splitlines():
        if not line or line.startswith("#") or line == "COMMIT":
            continue
        if line.startswith("*"):
            table = line[1:].strip()
            chains = dump.tables.setdefault(table, {})
            dump.policies.setdefault(table, {})
        elif chains is None:
            continue
        elif line.startswith(":"):
            name, policy = [*line[1:].split(), "-"][:2]
            chains.setdefault(name, [])
            dump.policies[table][name] = policy
        elif line.startswith("-A "):
            _, chain, *rest = line.split(" ", 2)
            chains.setdefault(chain, []).append(rest[0] if rest else "")
    return dump


# --- the model in the kernel's spelling ---------------------------------------------


def numeric_gid(name: str) -> str:
    """Group names become gids in the kernel; resolve them as iptables would (this process's NSS)."""
    if name.isdigit():
        return name
    import grp

    return str(grp.getgrnam(name).gr_gid)


def kernel_network(network: IPNetwork) -> str:
    """An address as iptables prints it: glibc's inet_ntop keeps embedded IPv4 dotted (``::127.0.0.53``)."""
    address = network.network_address
    if isinstance(address, ipaddress.IPv6Address):
        words = [int.from_bytes(address.packed[i : i + 2], "big") for i in range(0, 16, 2)]
        dotted = str(ipaddress.IPv4Address(address.packed[12:]))
        if words[:6] == [0] * 6 and words[6] != 0:
            return f"::{dotted}/{network.prefixlen}"
        if words[:5] == [0] * 5 and words[5] == 0xFFFF:
            return f"::ffff:{dotted}/{network.prefixlen}"
    return network.compressed


def _negated(negate: bool, *tokens: str) -> list[str]:
    return ["!", *tokens] if negate else list(tokens)


def _protocol_of(matches: Iterable[Match]) -> str:
    return next((match.name for match in matches if isinstance(match, Protocol)), "tcp")


def _kernel_mark(value: int, mask: int) -> str:
    """libxt_mark and libxt_connmark print the mask only when it is not the full one."""
    return f"{value:#x}" if mask == _FULL_MASK else f"{value:#x}/{mask:#x}"


def _module_tokens(match: Match, protocol: str, resolve_gid: GidResolver) -> list[str]:
    if isinstance(match, Ports):
        if len(match.ports) == 1:
            option = "--sport" if match.direction == "src" else "--dport"
            return ["-m", protocol, *_negated(match.negate, option, str(match.ports[0]))]
        option = "--sports" if match.direction == "src" else "--dports"
        return ["-m", "multiport", *_negated(match.negate, option, ",".join(map(str, match.ports)))]
    if isinstance(match, Owner):
        owner = resolve_gid(match.id) if match.kind == "gid" else match.id
        return ["-m", "owner", *_negated(match.negate, f"--{match.kind}-owner", owner)]
    if isinstance(match, Mark):
        return ["-m", "mark", *_negated(match.negate, "--mark", _kernel_mark(match.value, match.mask))]
    if isinstance(match, ConnMark):
        return ["-m", "connmark", *_negated(match.negate, "--mark", _kernel_mark(match.value, match.mask))]
    if isinstance(match, ConnState):
        states = [state for state in _CTSTATE_ORDER if state in match.states]
        return ["-m", "conntrack", "--ctstate", ",".join(states)]
    if isinstance(match, SetMatch):
        return ["-m", "set", *_negated(match.negate, "--match-set", match.name, match.direction)]
    raise TypeError(f"unknown match {match!r}")


def _target_tokens(target: Target, family: Family) -> list[str]:
    if isinstance(target, Jump):
        return ["-j", target.chain]
    if isinstance(target, Verdict):
        return ["-j", target.name]
    if isinstance(target, Redirect):
        return ["-j", "REDIRECT", "--to-ports", str(target.port)]
    if isinstance(target, Tproxy):
        on_ip = "0.0.0.0" if family is Family.V4 else "::"
        mark = f"{target.mark:#x}/{target.mask:#x}"
        return ["-j", "TPROXY", "--on-port", str(target.port), "--on-ip", on_ip, "--tproxy-mark", mark]
    if isinstance(target, SetMark):
        return ["-j", "MARK", "--set-xmark", f"{target.value:#x}/{target.mask:#x}"]
    if isinstance(target, ConnMarkSet):
        return ["-j", "CONNMARK", "--set-xmark", f"{target.value:#x}/{target.mask:#x}"]
    if isinstance(target, ConnMarkSave | ConnMarkRestore):
        action = "--save-mark" if isinstance(target, ConnMarkSave) else "--restore-mark"
        return ["-j", "CONNMARK", action, "--nfmask", f"{_FULL_MASK:#x}", "--ctmask", f"{_FULL_MASK:#x}"]
    if isinstance(target, CtZone):
        return ["-j", "CT", "--zone", str(target.zone)]
    raise TypeError(f"unknown target {target!r}")


def canonical_spec(rule: Rule, family: Family, resolve_gid: GidResolver = numeric_gid) -> str:
    """``rule`` as ``iptables-save`` prints it after the kernel stored it (without ``-A CHAIN``)."""
    head: dict[str, list[str]] = {}
    modules: list[str] = []
    protocol = _protocol_of(rule.matches)
    for match in rule.matches:
        if isinstance(match, Address):
            option = "-s" if match.direction == "src" else "-d"
            head[option] = _negated(match.negate, option, kernel_network(match.network))
        elif isinstance(match, Interface):
            option = "-i" if match.direction == "in" else "-o"
            head[option] = _negated(match.negate, option, match.name)
        elif isinstance(match, Protocol):
            head["-p"] = _negated(match.negate, "-p", match.name)
        else:
            modules += _module_tokens(match, protocol, resolve_gid)
    tokens = [token for option in ("-s", "-d", "-i", "-o", "-p") for token in head.get(option, [])]
    tokens += modules + _target_tokens(rule.target, family)
    return " ".join(check_token(token) if token != "!" else token for token in tokens)


def desired_state(ruleset: RuleSet, resolve_gid: GidResolver = numeric_gid) -> TableState:
    """The chains and rules ``ruleset`` leaves in the kernel, per table, in kernel order."""
    state: TableState = {}
    for table in ruleset.tables():
        state[table] = {
            chain: [canonical_spec(rule, ruleset.family, resolve_gid) for rule in rules]
            for chain, rules in ruleset.chain_order(table).items()
        }
    return state


# --- what we own in a live dump ----------------------------------------------------

@functools.cache
def _builtin_shapes() -> tuple[tuple[frozenset[str], str, re.Pattern[str]], ...]:
    """(tables, chain, shape) of every non-jump rule our plans put into built-in chains (capture.py).

    Compiled on first use: a fresh namespace never needs them.
    """
    masks = "--nfmask 0xffffffff --ctmask 0xffffffff"
    hexa = r"0x[0-9a-f]+"
    owner = rf"! -d \S+ -o lo -p tcp -m owner --[ug]id-owner \d+ -j MARK --set-xmark {hexa}/0xffffffff"
    return (
        (frozenset({"nat", "mangle"}), "PREROUTING", re.compile(r"-i \S+ -j RETURN")),
        (frozenset({"nat", "mangle"}), "OUTPUT", re.compile(r"-o \S+ -j RETURN")),
        (
            frozenset({"mangle"}),
            "PREROUTING",
            re.compile(rf"-p tcp -m mark --mark {hexa} -j CONNMARK --save-mark {masks}"),
        ),
        (frozenset({"mangle"}), "OUTPUT", re.compile(rf"-o lo -p tcp -m mark --mark {hexa} -j RETURN")),
        (frozenset({"mangle"}), "OUTPUT", re.compile(owner)),
        (
            frozenset({"mangle"}),
            "OUTPUT",
            re.compile(rf"-p tcp -m connmark --mark {hexa} -j CONNMARK --restore-mark {masks}"),
        ),
    )


def jumps_to_own_chain(spec: str) -> bool:
    head, _, target = spec.rpartition("-j ")
    return target in OWN_CHAINS and (head == "" or head.endswith(" "))


def builtin_shape_is_ours(table: str, chain: str, spec: str) -> bool:
    return any(
        table in tables and chain == shape_chain and shape.fullmatch(spec)
        for tables, shape_chain, shape in _builtin_shapes()
    )


def owned_state(dump: SaveDump) -> TableState:
    """Our part of a live family: own chains whole, and our rules of built-in chains in order."""
    ours: TableState = {}
    for table in TABLES:
        chains = dump.tables.get(table, {})
        for name, specs in chains.items():
            if name in OWN_CHAINS:
                ours.setdefault(table, {})[name] = list(specs)
    has_jumps = any(
        jumps_to_own_chain(spec)
        for table in TABLES
        for name, specs in dump.tables.get(table, {}).items()
        if name in BUILTIN_CHAINS
        for spec in specs
    )
    if not ours and not has_jumps:
        return {}
    for table in TABLES:
        for name, specs in dump.tables.get(table, {}).items():
            if name not in BUILTIN_CHAINS:
                continue
            mine = [spec for spec in specs if jumps_to_own_chain(spec) or builtin_shape_is_ours(table, name, spec)]
            if mine:
                ours.setdefault(table, {})[name] = mine
    return ours


# --- comparing -------------------------------------------------------------------


def state_lines(state: TableState) -> list[str]:
    """A stable text form for diffs: tables in a fixed order, own chains declared, rules in order."""
    lines: list[str] = []
    for table in TABLES:
        chains = state.get(table)
        if not chains:
            continue
        lines.append(f"*{table}")
        lines += [f":{name}" for name in sorted(chains) if name not in BUILTIN_CHAINS]
        for name in sorted(chains):
            lines += [f"-A {name} {spec}" for spec in chains[name]]
    return lines


def normalised(state: TableState) -> TableState:
    """Drop built-in chains that hold nothing of ours, so absent and empty compare equal."""
    return {
        table: {name: specs for name, specs in chains.items() if specs or name not in BUILTIN_CHAINS}
        for table, chains in state.items()
        if any(specs or name not in BUILTIN_CHAINS for name, specs in chains.items())
    }


def diff_states(live: TableState, desired: TableState, family: Family) -> list[str]:
    """An order-aware unified diff (empty when our part of the namespace is exactly what we want)."""
    live_lines = state_lines(normalised(live))
    desired_lines = state_lines(normalised(desired))
    if live_lines == desired_lines:
        return []
    import difflib  # only when there is a difference to show

    live_name, desired_name = f"{family.label} live", f"{family.label} wanted"
    return list(difflib.unified_diff(live_lines, desired_lines, live_name, desired_name, n=2, lineterm=""))


# --- turning live into desired --------------------------------------------------------


def transition_script(live: TableState, ruleset: RuleSet | None) -> str:
    """Restore input (for ``--noflush``) replacing our live part with ``ruleset``'s rules, or removing it.

    Per table: declare (create or flush) every wanted own chain and flush every obsolete one, delete
    our rules from built-in chains, delete obsolete chains, then add the wanted rules in Istio's
    order (``-I`` positions count from the top, exactly as a first apply).
    """
    wanted_tables = ruleset.tables() if ruleset is not None else []
    lines: list[str] = []
    for table in TABLES:
        live_chains = live.get(table, {})
        if table not in wanted_tables and not live_chains:
            continue
        wanted_chains = ruleset.declared_chains(table) if ruleset is not None and table in wanted_tables else []
        lines.append(f"*{table}")
        obsolete = [name for name in live_chains if name not in BUILTIN_CHAINS and name not in wanted_chains]
        lines += [f":{check_token(name)} - [0:0]" for name in [*wanted_chains, *obsolete]]
        for name, specs in live_chains.items():
            if name in BUILTIN_CHAINS:
                lines += [f"-D {name} {spec}" for spec in specs]
        lines += [f"-X {name}" for name in obsolete]
        if ruleset is not None:
            lines += [rule_line(rule) for rule in ruleset.rules_of(table)]  # type: ignore[arg-type]
        lines.append("COMMIT")
    return "\n".join(lines) + "\n" if lines else ""
