"""Render the nftables model as an ``nft -f`` script: one transaction that replaces our tables.

Every token comes from a typed value: numbers are range-checked integers, addresses are parsed
networks, and names (interfaces, groups) pass :func:`~istio_iptables.xtables.render.check_token` and are
then double-quoted, so no value can end a statement, open a block or name another table.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection, Mapping, Sequence

from istio_iptables.nft.model import (
    OUR_TABLES,
    Addr,
    AddrInSet,
    Chain,
    CtMarkIs,
    CtState,
    IfName,
    JumpTo,
    L4Proto,
    MarkIs,
    NftMatch,
    NftRule,
    NftRuleset,
    NftSet,
    NftTable,
    NftVerdict,
    Port,
    PortInSet,
    RedirectTo,
    RestoreMarkFromConnection,
    SaveMarkToConnection,
    SetCtMarkBits,
    SetCtZone,
    SetMetaMark,
    SnatTo,
    SocketOwner,
    Statement,
    TproxyTo,
)
from istio_iptables.nft.names import AMBIENT_TABLES
from istio_iptables.policy.lists import member_text, port_ranges
from istio_iptables.xtables.model import PortEntry, PortRange
from istio_iptables.xtables.render import RenderError, check_token

HEADER = "# istio-iptables --native-nftables: load with 'nft -f FILE'; applied as one transaction\n"
MAX_U32 = 2**32 - 1
CT_STATES = frozenset({"invalid", "related", "established", "new"})


def _number(value: int, low: int, high: int) -> str:
    if type(value) is not int or not low <= value <= high:
        raise RenderError(f"refusing to render {value!r}: not a number from {low} to {high}")
    return str(value)


def _port(value: PortEntry) -> str:
    """A port, or a range in nft's spelling ``8000-9000`` (nft reads ``8000:9000`` as no port at all)."""
    if isinstance(value, PortRange):
        first, last = _number(value.first, 0, 65535), _number(value.last, 1, 65535)
        if value.first >= value.last:
            raise RenderError(f"refusing to render port range {value!r}")
        return f"{first}-{last}"
    return _number(value, 1, 65535)


def _name(value: str) -> str:
    """A validated name, quoted: nft takes a quoted string literally up to the closing quote."""
    return f'"{check_token(value)}"'


def _interface(name: str) -> str:
    # iptables reads a trailing '+' as "any suffix"; nft spells that '*'. Keep the iptables meaning.
    quoted = _name(name)
    return quoted[:-2] + '*"' if name.endswith("+") else quoted


def _network(network: object) -> str:
    if not isinstance(network, ipaddress.IPv4Network | ipaddress.IPv6Network):
        raise RenderError(f"refusing to render {network!r}: not a parsed network")
    return str(network)


# Our set names (istio_iptables.policy.sidecar_nft.nft_set_name): per purpose, family and prefix length; no digest.
# Ambient's probe sets (istio-inpod-probes-v4/-v6) are named by Istio and filled by the node agent.
OWN_NFT_SET_NAME = re.compile(
    r"istio-(?:(?:v4|v6)-(?:out-excl|out-incl)-[0-9]{1,3}|port-out|port-out-excl|port-in|port-in-excl"
    r"|inpod-probes-v4|inpod-probes-v6)"
)


def _set_reference(name: str) -> str:
    # Only names our set step makes (istio-v4-out-excl-24): nothing else can follow the '@'.
    if not OWN_NFT_SET_NAME.fullmatch(name):
        raise RenderError(f"refusing to render set {name!r}: not one of ours")
    return f"@{name}"


def _netmask(version: int, prefixlen: int) -> str:
    network = ipaddress.IPv4Network((0, prefixlen)) if version == 4 else ipaddress.IPv6Network((0, prefixlen))
    return str(network.netmask)


def _not(negate: bool) -> str:
    return "!= " if negate else ""


def _masked(mask: int) -> str:
    """``& 0xfff `` before a masked mark's comparison; nothing for the full mask."""
    return "" if mask == MAX_U32 else f"& {int(_number(mask, 0, MAX_U32)):#x} "


def _relation(negate: bool, mask: int) -> str:
    # After '& MASK' the comparison is spelled out ('== '), as Istio writes it.
    return "!= " if negate else ("" if mask == MAX_U32 else "== ")


def _mark_value(value: int, mask: int) -> str:
    # Masked marks in hex, as Istio writes them (0x539); full-mask marks in decimal, as before.
    return _number(value, 0, MAX_U32) if mask == MAX_U32 else f"{int(_number(value, 0, MAX_U32)):#x}"


def match_text(match: NftMatch) -> str:
    if isinstance(match, L4Proto):
        return f"meta l4proto {check_token(match.name)}"
    if isinstance(match, IfName):
        keyword = "iifname" if match.direction == "in" else "oifname"
        return f"{keyword} {_not(match.negate)}{_interface(match.name)}"
    if isinstance(match, Addr):
        family = "ip" if match.network.version == 4 else "ip6"
        return f"{family} {check_token(match.direction)} {_not(match.negate)}{_network(match.network)}"
    if isinstance(match, Port):
        if not match.ports:
            raise RenderError("a port match needs at least one port")
        ports = [_port(port) for port in match.ports]
        if len(ports) > 1 and any(isinstance(port, PortRange) for port in match.ports):
            ports = port_ranges(match.ports)  # an anonymous interval set refuses overlapping elements
        value = ports[0] if len(ports) == 1 else "{ " + ", ".join(ports) + " }"
        return f"{check_token(match.protocol)} {check_token(match.direction)} {_not(match.negate)}{value}"
    if isinstance(match, AddrInSet):
        family, bits = ("ip", 32) if match.version == 4 else ("ip6", 128)
        _number(match.prefixlen, 1, bits)
        mask = "" if match.prefixlen == bits else f"& {_netmask(match.version, match.prefixlen)} "
        return f"{family} {check_token(match.direction)} {mask}{_set_reference(match.set_name)}"
    if isinstance(match, PortInSet):
        return f"{check_token(match.protocol)} {check_token(match.direction)} {_set_reference(match.set_name)}"
    if isinstance(match, SocketOwner):
        keyword = "skuid" if match.kind == "uid" else "skgid"
        owner = _number(int(match.id), 0, MAX_U32) if match.id.isdigit() else _name(match.id)
        return f"{keyword} {_not(match.negate)}{owner}"
    if isinstance(match, MarkIs):
        return f"mark {_masked(match.mask)}{_relation(match.negate, match.mask)}{_mark_value(match.value, match.mask)}"
    if isinstance(match, CtMarkIs):
        return f"ct mark {_masked(match.mask)}{_relation(False, match.mask)}{_mark_value(match.value, match.mask)}"
    if isinstance(match, CtState):
        if not match.states or not CT_STATES.issuperset(match.states):
            raise RenderError(f"refusing to render conntrack states {match.states!r}")
        return "ct state " + ",".join(match.states)
    raise TypeError(f"unknown match {match!r}")


def statement_text(statement: Statement) -> str:
    if isinstance(statement, NftVerdict):
        return check_token(statement.name)
    if isinstance(statement, JumpTo):
        return f"jump {check_token(statement.chain)}"
    if isinstance(statement, RedirectTo):
        return f"redirect to :{_port(statement.port)}"
    if isinstance(statement, TproxyTo):
        return f"tproxy {'ip' if statement.version == 4 else 'ip6'} to :{_port(statement.port)}"
    if isinstance(statement, SetMetaMark):
        return f"meta mark set {_number(statement.value, 0, MAX_U32)}"
    if isinstance(statement, SaveMarkToConnection):
        return "ct mark set mark"
    if isinstance(statement, RestoreMarkFromConnection):
        return "meta mark set ct mark"
    if isinstance(statement, SetCtZone):
        return f"ct zone set {_number(statement.zone, 0, 65535)}"
    if isinstance(statement, SetCtMarkBits):
        keep = MAX_U32 & ~int(_number(statement.mask, 0, MAX_U32))
        return f"ct mark set ct mark & {keep:#010x} | {int(_number(statement.value, 0, MAX_U32)):#x}"
    if isinstance(statement, SnatTo):
        if not isinstance(statement.address, ipaddress.IPv4Address | ipaddress.IPv6Address):
            raise RenderError(f"refusing to render {statement.address!r}: not a parsed address")
        return f"snat {'ip' if statement.address.version == 4 else 'ip6'} to {statement.address}"
    raise TypeError(f"unknown statement {statement!r}")


def rule_text(rule: NftRule) -> str:
    """Matches, then the statements with ``counter`` just before the last one (Istio's layout)."""
    statements = [statement_text(statement) for statement in rule.statements]
    counter = ["counter"] if rule.counter else []
    parts = [match_text(match) for match in rule.matches] + [*statements[:-1], *counter, statements[-1]]
    return " ".join(parts)


def chain_declaration(table: str, chain: Chain) -> str:
    head = f"add chain inet {check_token(table)} {check_token(chain.name)}"
    if chain.hook is None:
        return head
    hook = chain.hook
    return f"{head} {{ type {hook.type} hook {hook.hook} priority {_number(hook.priority, -1000, 1000)} ; }}"


SET_VERSIONS = {"ipv4_addr": 4, "ipv6_addr": 6}


def set_elements(named: NftSet) -> str:
    """``{ 10.0.0.0, 10.0.1.0 }`` (networks of one length, as addresses) or ``{ 80, 15020-15021 }``.

    Each member is checked for type and range first; what is written is then digits, hex
    digits, '.' and ':' only.
    """
    version = SET_VERSIONS.get(named.type)
    if version is None:
        for member in named.members:
            _port(member)  # type: ignore[arg-type]
        return "{ " + ", ".join(port_ranges(named.members)) + " }"  # type: ignore[arg-type]
    lengths = set()
    for member in named.members:
        if not isinstance(member, ipaddress.IPv4Network | ipaddress.IPv6Network) or member.version != version:
            raise RenderError(f"refusing to render {member!r} in set {named.name}: not an IPv{version} network")
        lengths.add(member.prefixlen)
    if len(lengths) > 1:
        raise RenderError(f"refusing to render set {named.name}: it mixes prefix lengths {sorted(lengths)}")
    return "{ " + ", ".join(member_text(member).partition("/")[0] for member in named.members) + " }"  # type: ignore[arg-type]


def set_lines(table: str, named: NftSet) -> list[str]:
    """Declare, empty (if it survived in a table that was only flushed) and fill one set."""
    if named.type not in (*SET_VERSIONS, "inet_service"):
        raise RenderError(f"refusing to render a set of type {named.type!r}")
    if not named.members:
        raise RenderError(f"refusing to render set {named.name}: it has no members")
    target = f"inet {check_token(table)} {_set_reference(named.name)[1:]}"
    # Ports as intervals (disjoint runs, see port_ranges): a plain set of 16-bit keys is a bitmap
    # set, whose every insertion walks the members already in it (10 000 ports load in ~0.6 s).
    flags = " flags interval ;" if named.type == "inet_service" else ""
    return [
        f"add set {target} {{ type {named.type} ;{flags} }}",
        f"flush set {target}",
        f"add element {target} {set_elements(named)}",
    ]


def remove_tables_lines(tables: Collection[str] = OUR_TABLES) -> list[str]:
    """Delete these of our tables whether or not they exist (``add`` first makes ``delete`` always valid)."""
    lines = []
    for table in (*OUR_TABLES, *AMBIENT_TABLES):  # only names of ours ever reach nft input
        if table in tables:
            lines += [f"add table inet {table}", f"delete table inet {table}"]
    return lines


def ruleset_lines(ruleset: NftRuleset) -> list[str]:
    lines: list[str] = []
    for table in ruleset.used_tables():
        name = check_token(table.name)
        chains = table.used_chains()
        lines.append(f"add table inet {name}")
        lines += [line for named in table.sets.values() for line in set_lines(name, named)]
        lines += [chain_declaration(name, chain) for chain in chains]
        lines += [f"add rule inet {name} {chain.name} {rule_text(rule)}" for chain in chains for rule in chain.rules]
    return lines


def render_script(
    ruleset: NftRuleset,
    present: Collection[str] = OUR_TABLES,
    also: Sequence[str] = (),
    held: Mapping[str, TableObjects] | None = None,
    kept_sets: Collection[str] = (),
    first: Sequence[str] = (),
) -> str:
    """The whole transaction: drop what our tables held, then build them anew (no window without rules).

    ``present`` names our tables known to exist; the others are only flushed before use, since a
    table deletion costs the kernel ~10 ms (an RCU grace period) even for an empty table. Flushing
    keeps a run correct if such a table appears meanwhile. ``also`` joins the same transaction
    (with --reconcile: removing iptables-nft's form of our rules).

    ``held`` lists the chains and sets of present tables. A present table whose new rules match
    named sets is kept and emptied instead of deleted, so its sets keep their names and are
    refilled in place: a set created in a transaction can miss packets for a moment after the
    rules that match it go live (seen on Linux 6.18 with interval sets: a few connections in
    10 000), while a refilled set answers with the old members or the new, never neither.

    ``kept_sets``: sets that outlive the rules (ambient's probe sets, filled by the node agent): a
    table holding one is emptied, never deleted, and they stay with their members. ``first``: nft
    commands before the rules (creating those sets if missing).
    """
    held = held or {}

    def holds_kept_set(name: str) -> bool:
        return any(named in kept_sets for named in held.get(name, ((), ()))[1])

    kept = [
        table
        for table in ruleset.used_tables()
        if (table.sets or holds_kept_set(table.name)) and table.name in held and table.name in present
    ]
    kept_names = {table.name for table in kept}
    emptied = [line for table in kept for line in empty_table_lines(table, held[table.name], kept_sets)]
    fresh = [
        line
        for table in ruleset.used_tables()
        if table.name not in present
        for line in (f"add table inet {table.name}", f"flush table inet {table.name}")
    ]
    removed = remove_tables_lines([table for table in present if table not in kept_names])
    return HEADER + "\n".join([*removed, *emptied, *fresh, *first, *ruleset_lines(ruleset), *also]) + "\n"


TableObjects = tuple[Sequence[str], Sequence[str]]  # the chains and sets a live table holds, by name


def empty_table_lines(table: NftTable, held: TableObjects, kept_sets: Collection[str] = ()) -> list[str]:
    """Empty a live table for its new contents: no rules, and no chain or set the new ones do not declare
    (but ``kept_sets``)."""
    name = check_token(table.name)
    chains, sets = held
    keep_chains = {chain.name for chain in table.used_chains()}
    lines = [f"flush table inet {name}"]
    lines += [f"delete chain inet {name} {check_token(chain)}" for chain in chains if chain not in keep_chains]
    lines += [
        f"delete set inet {name} {check_token(named)}"
        for named in sets
        if named not in table.sets and named not in kept_sets
    ]
    return lines


def render_cleanup(tables: Collection[str] = OUR_TABLES) -> str:
    return HEADER + "\n".join(remove_tables_lines(tables)) + "\n"
