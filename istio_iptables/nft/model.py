"""The nftables model: ``inet`` tables holding chains holding rules, as plain typed data (no I/O).

A rule is a tuple of matches followed by a tuple of statements; the renderer adds a ``counter``
to every rule. Values come from the validated :class:`~istio_iptables.config.sidecar.Config` (numbers,
parsed networks, checked names), never from free text.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

from istio_iptables.net import IPNetwork
from istio_iptables.nft.names import (
    ISTIO_DIVERT,
    ISTIO_DROP,
    ISTIO_IN_REDIRECT,
    ISTIO_INBOUND,
    ISTIO_OUTPUT,
    ISTIO_OUTPUT_DNS,
    ISTIO_REDIRECT,
    ISTIO_TPROXY,
    MANGLE,
    NAT,
    OUR_TABLES,
    OUTPUT,
    PREROUTING,
    RAW,
)
from istio_iptables.xtables.model import PortEntry

# --- tables and chains ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ChainHook:
    """Where a base chain attaches: ``{ type TYPE hook HOOK priority PRIORITY ; }``."""

    type: Literal["nat", "filter", "route"]
    hook: Literal["prerouting", "output", "postrouting"]
    priority: int


# iptables' own priorities, so our chains run where Istio's iptables rules would (NF_IP_PRI_*).
NAT_PRIORITY = -100
MANGLE_PRIORITY = -150
RAW_PRIORITY = -300

# Every chain each table may hold, in the order Istio declares them (the kernel lists chains in
# creation order). ``output`` of mangle is a route chain so a changed mark re-routes the packet.
CHAIN_LAYOUT: dict[str, tuple[tuple[str, ChainHook | None], ...]] = {
    NAT: (
        (PREROUTING, ChainHook("nat", "prerouting", NAT_PRIORITY)),
        (OUTPUT, ChainHook("nat", "output", NAT_PRIORITY)),
        (ISTIO_INBOUND, None),
        (ISTIO_REDIRECT, None),
        (ISTIO_IN_REDIRECT, None),
        (ISTIO_OUTPUT, None),
        (ISTIO_OUTPUT_DNS, None),
    ),
    MANGLE: (
        (PREROUTING, ChainHook("filter", "prerouting", MANGLE_PRIORITY)),
        (OUTPUT, ChainHook("route", "output", MANGLE_PRIORITY)),
        (ISTIO_DIVERT, None),
        (ISTIO_TPROXY, None),
        (ISTIO_INBOUND, None),
        (ISTIO_DROP, None),
    ),
    RAW: (
        (PREROUTING, ChainHook("filter", "prerouting", RAW_PRIORITY)),
        (OUTPUT, ChainHook("filter", "output", RAW_PRIORITY)),
        (ISTIO_INBOUND, None),
        (ISTIO_OUTPUT_DNS, None),
    ),
}


# --- matches -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class L4Proto:
    """``meta l4proto tcp``."""

    name: Literal["tcp", "udp"]


@dataclass(frozen=True)
class IfName:
    """``iifname``/``oifname``; the name is one the config validated."""

    direction: Literal["in", "out"]
    name: str
    negate: bool = False


@dataclass(frozen=True)
class Addr:
    """``ip saddr``/``ip6 daddr ...``: the network's version picks ``ip`` or ``ip6``."""

    direction: Literal["saddr", "daddr"]
    network: IPNetwork
    negate: bool = False


@dataclass(frozen=True)
class Port:
    """``tcp dport 53``, or an anonymous set ``tcp dport != { 53, 15008 }`` for several ports; a
    range in nft's spelling, ``tcp dport 8000-9000``."""

    protocol: Literal["tcp", "udp"]
    direction: Literal["sport", "dport"]
    ports: tuple[PortEntry, ...]
    negate: bool = False


@dataclass(frozen=True)
class AddrInSet:
    """``ip daddr & 255.255.255.0 @NAME``: the address, cut to ``prefixlen`` bits, is in a named
    set of this table (:class:`NftSet`) that holds networks of that length (no mask at /32, /128)."""

    direction: Literal["saddr", "daddr"]
    version: Literal[4, 6]
    prefixlen: int
    set_name: str


@dataclass(frozen=True)
class PortInSet:
    """``tcp dport @NAME``: membership in a named ``inet_service`` set of this table."""

    protocol: Literal["tcp", "udp"]
    direction: Literal["sport", "dport"]
    set_name: str


@dataclass(frozen=True)
class SocketOwner:
    """``skuid``/``skgid`` of the sending socket; ``id`` is a number or a validated group name."""

    kind: Literal["uid", "gid"]
    id: str
    negate: bool = False


FULL_MARK_MASK = 0xFFFFFFFF


@dataclass(frozen=True)
class MarkIs:
    """``mark 1337`` / ``mark != 1338`` (the packet mark); with a mask, ``meta mark & 0xfff != 0x539``."""

    value: int
    negate: bool = False
    mask: int = FULL_MARK_MASK


@dataclass(frozen=True)
class CtMarkIs:
    """``ct mark 1337`` (the connection mark); with a mask, ``ct mark & 0xfff == 0x111``."""

    value: int
    mask: int = FULL_MARK_MASK


@dataclass(frozen=True)
class CtState:
    states: tuple[Literal["invalid", "related", "established", "new"], ...]


NftMatch: TypeAlias = (
    L4Proto | IfName | Addr | Port | AddrInSet | PortInSet | SocketOwner | MarkIs | CtMarkIs | CtState
)


# --- named sets ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class NftSet:
    """A named hash set in one of our tables: networks of one family and one prefix length (held
    as their network addresses), or ports (for both families).

    It lives and dies with its table, so ``nft -f`` creates and replaces it in the transaction
    that replaces the rules matching it, and deleting the table removes it.
    """

    name: str
    type: Literal["ipv4_addr", "ipv6_addr", "inet_service"]
    members: tuple[IPNetwork, ...] | tuple[PortEntry, ...]


# --- statements ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class NftVerdict:
    name: Literal["return", "accept", "drop"]


@dataclass(frozen=True)
class JumpTo:
    chain: str


@dataclass(frozen=True)
class RedirectTo:
    """``redirect to :PORT`` (nat)."""

    port: int


@dataclass(frozen=True)
class TproxyTo:
    """``tproxy ip to :PORT``: hand the packet to a transparent socket on PORT of this host."""

    version: Literal[4, 6]
    port: int


@dataclass(frozen=True)
class SetMetaMark:
    """``meta mark set VALUE``."""

    value: int


@dataclass(frozen=True)
class SaveMarkToConnection:
    """``ct mark set mark``."""


@dataclass(frozen=True)
class RestoreMarkFromConnection:
    """``meta mark set ct mark``."""


@dataclass(frozen=True)
class SetCtMarkBits:
    """``ct mark set ct mark & KEEP | VALUE``: the connection mark's bits outside ``mask`` stay,
    those inside become ``value`` (iptables' ``CONNMARK --set-xmark value/mask``; ambient's 0x111/0xfff)."""

    value: int
    mask: int


@dataclass(frozen=True)
class SnatTo:
    """``snat to ADDRESS`` (nat postrouting): ambient's host rule for kubelet probes."""

    address: ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class SetCtZone:
    """``ct zone set ZONE``."""

    zone: int


Statement: TypeAlias = (
    NftVerdict
    | JumpTo
    | RedirectTo
    | TproxyTo
    | SetMetaMark
    | SaveMarkToConnection
    | RestoreMarkFromConnection
    | SetCtZone
    | SetCtMarkBits
    | SnatTo
)

NFT_RETURN = NftVerdict("return")
NFT_ACCEPT = NftVerdict("accept")
NFT_DROP = NftVerdict("drop")


@dataclass(frozen=True)
class NftRule:
    matches: tuple[NftMatch, ...]
    statements: tuple[Statement, ...]
    counter: bool = True  # Istio's ambient jumps carry no counter; every other rule has one


@dataclass
class Chain:
    name: str
    hook: ChainHook | None
    rules: list[NftRule] = field(default_factory=list)


@dataclass
class NftTable:
    """One ``inet`` table; every chain of its layout exists here, used or not."""

    name: str
    chains: dict[str, Chain]
    sets: dict[str, NftSet] = field(default_factory=dict)  # by name, in declaration order

    @classmethod
    def empty(cls, name: str) -> NftTable:
        return cls(name, {chain: Chain(chain, hook) for chain, hook in CHAIN_LAYOUT[name]})

    def jump_targets(self) -> set[str]:
        return {
            statement.chain
            for chain in self.chains.values()
            for rule in chain.rules
            for statement in rule.statements
            if isinstance(statement, JumpTo)
        }

    def used_chains(self) -> list[Chain]:
        """Chains to create: those holding rules or jumped to, in declaration order."""
        targets = self.jump_targets()
        return [chain for chain in self.chains.values() if chain.rules or chain.name in targets]

    @property
    def has_rules(self) -> bool:
        return any(chain.rules for chain in self.chains.values())


@dataclass
class NftRuleset:
    """Our three tables. ``append``/``insert`` mirror how Istio builds its rules."""

    tables: dict[str, NftTable] = field(default_factory=lambda: {name: NftTable.empty(name) for name in OUR_TABLES})

    def append(
        self, table: str, chain: str, *matches: NftMatch, then: Statement | tuple[Statement, ...], counter: bool = True
    ) -> None:
        self.tables[table].chains[chain].rules.append(_rule(matches, then, counter))

    def insert(
        self, table: str, chain: str, index: int, *matches: NftMatch, then: Statement | tuple[Statement, ...]
    ) -> None:
        """Insert before the rule at ``index`` (0-based); past the end it appends, as Istio does."""
        self.tables[table].chains[chain].rules.insert(index, _rule(matches, then))

    def declare_set(self, table: str, named: NftSet) -> None:
        """Declare ``named`` in ``table``; rules of that table then match it as ``@NAME``."""
        self.tables[table].sets[named.name] = named

    def used_tables(self) -> list[NftTable]:
        return [table for table in self.tables.values() if table.has_rules]


def _rule(matches: tuple[NftMatch, ...], then: Statement | tuple[Statement, ...], counter: bool = True) -> NftRule:
    statements = then if isinstance(then, tuple) else (then,)
    if not statements:
        raise ValueError("a rule needs at least one statement")
    return NftRule(matches, statements, counter)
