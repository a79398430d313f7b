"""The rule model: plain typed data describing netfilter rules, with no I/O.

A :class:`RuleSet` holds the rules of one address family in the order they are
generated. Matches and targets are small frozen dataclasses; their values are
validated before they get here (see :mod:`istio_iptables.config.sidecar`), and the
renderers turn them into text without ever splicing free-form strings.
"""

from __future__ import annotations

import ipaddress
from typing import Literal, TypeAlias

from istio_iptables._lib.records import factory, record
from istio_iptables.net import Family, IPNetwork

Table = Literal["filter", "mangle", "nat", "raw"]
TABLES: tuple[Table, ...] = ("filter", "mangle", "nat", "raw")
BUILTIN_CHAINS = frozenset({"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"})

# Chains this tool creates; everything named here (and nothing else) is ours to remove.
ISTIO_INBOUND = "ISTIO_INBOUND"
ISTIO_IN_REDIRECT = "ISTIO_IN_REDIRECT"
ISTIO_OUTPUT = "ISTIO_OUTPUT"
ISTIO_REDIRECT = "ISTIO_REDIRECT"
ISTIO_DIVERT = "ISTIO_DIVERT"
ISTIO_TPROXY = "ISTIO_TPROXY"
ISTIO_OUTPUT_DNS = "ISTIO_OUTPUT_DNS"
ISTIO_DROP = "ISTIO_DROP"
OWN_CHAINS = frozenset(
    {
        ISTIO_INBOUND,
        ISTIO_IN_REDIRECT,
        ISTIO_OUTPUT,
        ISTIO_REDIRECT,
        ISTIO_DIVERT,
        ISTIO_TPROXY,
        ISTIO_OUTPUT_DNS,
        ISTIO_DROP,
    }
)


# --- matches -----------------------------------------------------------------


@record
class L4Protocol:
    name: Literal["tcp", "udp"]
    negate: bool = False


@record
class Address:
    direction: Literal["src", "dst"]
    network: IPNetwork
    negate: bool = False


@record
class PortRange:
    """The ports ``first`` to ``last``, both included (``first < last``): iptables' ``8000:9000``.

    A range of one port is that port (an ``int``); ``first`` may be 0, as in iptables' ``:9000``.
    """

    first: int
    last: int

    def __str__(self) -> str:
        return f"{self.first}:{self.last}"

    def __contains__(self, port: int) -> bool:
        return self.first <= port <= self.last


# One entry of a port list: a port, or a range of them.
PortEntry: TypeAlias = int | PortRange
ALL_PORTS = PortRange(0, 65535)


def port_bounds(entry: PortEntry) -> tuple[int, int]:
    return (entry.first, entry.last) if isinstance(entry, PortRange) else (entry, entry)


def port_in(port: int, entries: tuple[PortEntry, ...]) -> bool:
    """Whether ``port`` is one of ``entries`` or inside one of their ranges."""
    return any(port == entry if isinstance(entry, int) else port in entry for entry in entries)


@record
class Ports:
    """``--dport``/``--sport`` for one port or range, ``-m multiport --dports`` for several (at most
    15 slots, a range taking two)."""

    direction: Literal["src", "dst"]
    ports: tuple[PortEntry, ...]
    negate: bool = False


@record
class Interface:
    direction: Literal["in", "out"]
    name: str
    negate: bool = False


@record
class Owner:
    """``-m owner --uid-owner``/``--gid-owner``; ``id`` is a number or a group name."""

    kind: Literal["uid", "gid"]
    id: str
    negate: bool = False


FULL_MASK = 0xFFFFFFFF


@record
class Mark:
    """``-m mark --mark value[/mask]``: matches when ``packet mark & mask == value``."""

    value: int
    negate: bool = False
    mask: int = FULL_MASK


@record
class ConnMark:
    value: int
    negate: bool = False
    mask: int = FULL_MASK


@record
class ConnState:
    states: tuple[str, ...]


@record
class SetMatch:
    """``-m set --match-set NAME dst|src``: membership of an address (or port) in a :class:`NamedSet`."""

    name: str
    direction: Literal["src", "dst"]
    negate: bool = False


@record
class NamedSet:
    """A set that rules match with :class:`SetMatch`: an ipset, or a named set in native nftables.

    ``net`` sets hold the CIDRs of one family; ``port`` sets hold port numbers and serve both
    families. The name carries a digest of the members, so other members mean another name.
    """

    name: str
    kind: Literal["net", "port"]
    family: Family | None
    members: tuple[IPNetwork, ...] | tuple[PortEntry, ...]


@record
class ProtocolModule:
    """``-m tcp`` / ``-m udp`` with no option: Istio's ambient rules load it bare (``-p tcp -m tcp``),
    and the kernel keeps (and iptables-save prints) the empty match, so a rule with it differs from one without."""

    name: Literal["tcp", "udp"]


@record
class SocketExists:
    """``-m owner --socket-exists``: the packet belongs to a local socket (not forwarded)."""


@record
class Unsupported:
    """A match or target read from live rules that this tool does not model (the text as it was read).

    Only parsers of installed rules produce it, so nothing is ever silently dropped; renderers refuse it.
    """

    text: str


Match: TypeAlias = (
    L4Protocol
    | Address
    | Ports
    | Interface
    | Owner
    | Mark
    | ConnMark
    | ConnState
    | SetMatch
    | ProtocolModule
    | SocketExists
    | Unsupported
)


# --- targets -----------------------------------------------------------------


@record
class Jump:
    chain: str


@record
class Verdict:
    name: Literal["RETURN", "ACCEPT", "DROP"]


@record
class Redirect:
    port: int


@record
class Tproxy:
    port: int
    mark: int
    mask: int = 0xFFFFFFFF


@record
class SetMark:
    """``-j MARK``: the packet mark becomes ``(mark & ~mask) ^ value`` (``--set-mark`` is a full mask)."""

    value: int
    mask: int = FULL_MASK


@record
class ConnMarkSet:
    """``-j CONNMARK --set-xmark``: the connection mark becomes ``(ctmark & ~mask) ^ value`` (ambient's 0x111/0xfff)."""

    value: int
    mask: int = FULL_MASK


@record
class ConnMarkSave:
    pass


@record
class ConnMarkRestore:
    """``-j CONNMARK --restore-mark``; ambient writes the masks out (``--nfmask/--ctmask``), the sidecar does not.

    ``None`` leaves a mask unwritten (the kernel's default is the full mask either way).
    """

    nfmask: int | None = None
    ctmask: int | None = None


@record
class Snat:
    """``-j SNAT --to-source ADDRESS`` (nat POSTROUTING): ambient's host rule for kubelet probes."""

    address: ipaddress.IPv4Address | ipaddress.IPv6Address


@record
class CtZone:
    zone: int


Target: TypeAlias = (
    Jump
    | Verdict
    | Redirect
    | Tproxy
    | SetMark
    | ConnMarkSet
    | ConnMarkSave
    | ConnMarkRestore
    | CtZone
    | Snat
    | Unsupported
)

RETURN = Verdict("RETURN")


@record
class Rule:
    """One rule; ``position`` is set for ``-I CHAIN position`` inserts, None for appends."""

    table: Table
    chain: str
    matches: tuple[Match, ...]
    target: Target
    position: int | None = None


@record(frozen=False)
class RuleSet:
    """The rules of one family, in generation order (the order the restore input lists them)."""

    family: Family
    rules: list[Rule] = factory(list)
    sets: dict[str, NamedSet] = factory(dict)  # the sets these rules match, by name

    def append(self, table: Table, chain: str, *matches: Match, target: Target) -> None:
        self.rules.append(Rule(table, chain, matches, target))

    def insert(self, table: Table, chain: str, position: int, *matches: Match, target: Target) -> None:
        self.rules.append(Rule(table, chain, matches, target, position))

    def tables(self) -> list[Table]:
        used = {rule.table for rule in self.rules}
        return [table for table in TABLES if table in used]

    def rules_of(self, table: Table) -> list[Rule]:
        return [rule for rule in self.rules if rule.table == table]

    def declared_chains(self, table: Table) -> list[str]:
        """Non-built-in chains of ``table``: those holding rules first, then pure jump targets."""
        chains: dict[str, None] = {}
        rules = self.rules_of(table)
        for rule in rules:
            if rule.chain not in BUILTIN_CHAINS:
                chains.setdefault(rule.chain)
        for rule in rules:
            if isinstance(rule.target, Jump) and rule.target.chain not in BUILTIN_CHAINS:
                chains.setdefault(rule.target.chain)
        return list(chains)

    def chain_order(self, table: Table) -> dict[str, list[Rule]]:
        """The rules of every chain of ``table`` in the order the kernel will hold them."""
        chains: dict[str, list[Rule]] = {name: [] for name in self.declared_chains(table)}
        for rule in self.rules_of(table):
            chain = chains.setdefault(rule.chain, [])
            if rule.position is None:
                chain.append(rule)
            else:
                chain.insert(rule.position - 1, rule)
        return chains


@record
class TproxyRoutes:
    """Policy routing that makes marked packets local: ``ip rule fwmark MARK[/MASK] [pref PRIORITY] lookup
    TABLE`` + ``local default dev lo`` in TABLE (the sidecar's TPROXY mode; ambient's in-pod replies)."""

    mark: int
    table: int
    families: tuple[Family, ...]
    mask: int = FULL_MASK
    priority: int | None = None  # None: the kernel's choice, as ``ip rule add`` without ``pref``
    # Ambient (as Istio's node agent): no IPv6 local route when lo has IPv6 disabled, rather than failing.
    v6_route_only_with_lo_ipv6: bool = False

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.mark, self.table, self.mask)


@record
class Plan:
    """Everything one run wants in the namespace."""

    rulesets: tuple[RuleSet, ...]
    routes: TproxyRoutes | None = None
    # IPv6 needs ::6/128 on lo for Envoy's inbound passthrough bind (Istio adds it whenever v6 is on).
    ipv6_passthrough_address: bool = False
    # ``ipset restore`` input for sets kept across runs (ambient's probe sets: created if missing,
    # members changed only as asked), loaded before the rules that match them.
    ipset_document: str = ""

    def ruleset(self, family: Family) -> RuleSet | None:
        return next((rs for rs in self.rulesets if rs.family is family), None)
