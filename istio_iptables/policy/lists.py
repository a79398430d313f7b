"""Long lists as sets: one rule that matches a set instead of one rule per CIDR or port.

Istio writes one rule per excluded or included CIDR and port, and every new connection walks
them in order: 10 000 excluded CIDRs cost it 100-400 µs per connection, a set one lookup
(docs/speed.md). How a list is written is decided in one place, :func:`cidr_matches` and
:func:`port_matches`, which the capture policy calls for each list. ``--use-sets``:

- ``auto`` (default): a list of more than :data:`SET_THRESHOLD` entries becomes one set;
  shorter lists keep Istio's rules exactly (so Istio's goldens still hold).
- ``always``: every non-empty list becomes a set.
- ``never``: Istio's rules, one per entry, whatever the length.
- ``multiport``: no sets, so no ipset needed (e.g. gVisor): port lists longer than the threshold
  become ``-m multiport`` rules of at most 15 ports (a range ``FIRST:LAST`` counts 2); CIDR lists
  stay one rule per entry.

Port lists hold ranges too (``8000:9000``, istio_iptables.config.sidecar.parse_port_entry): a set holds
every port of the range (ipset and nft are given it as ``8000-9000``).

Sets are ipsets for the iptables backends (``hash:net`` per family, ``bitmap:port`` shared by
both families). Their names are ours and say what they hold, plus a digest of the members
(``istio-v4-out-excl-1c9a02f3``): other members mean another name, so a changed list shows up
as changed rules (drift) and a new set never replaces an old one in place.
"""

from __future__ import annotations

import re
from _socket import AF_INET6, inet_ntop  # the C module: socket.py costs 2 ms to import
from collections.abc import Iterable, Sequence
from typing import Literal

from istio_iptables.config.sidecar import UseSets
from istio_iptables.net import Family, IPNetwork
from istio_iptables.xtables.model import (
    Address,
    Match,
    NamedSet,
    PortEntry,
    PortRange,
    Ports,
    RuleSet,
    SetMatch,
    port_bounds,
)
from istio_iptables.xtables.render import check_token
from istio_iptables.xtables.spelling import MULTIPORT_LIMIT, multiport_slots, port_text

# Above this many entries a list becomes a set (auto) or multiport rules. Below it, walking the
# rules costs less than 0.2x a new connection's baseline even on iptables-nft (docs/speed.md).
SET_THRESHOLD = 64

# What each set holds; the purpose is part of the name.
CidrPurpose = Literal["out-excl", "out-incl"]
PortPurpose = Literal["port-out", "port-out-excl", "port-in", "port-in-excl"]
# Not compiled at import: most runs never ask (re caches it on first use).
OWN_SET_NAME = r"istio-(?:v4-|v6-)?(?:out-excl|out-incl|port-out|port-out-excl|port-in|port-in-excl)-[0-9a-f]{8}(?:-t)?"
_FAMILY_TAG = {Family.V4: "v4", Family.V6: "v6"}
IPSET_MAXELEM = 65536  # ipset's default; larger sets say how many they hold


def use_set(use_sets: UseSets, count: int) -> bool:
    if count == 0:
        return False
    return use_sets == "always" or (use_sets == "auto" and count > SET_THRESHOLD)


def cidr_matches(
    use_sets: UseSets, rules: RuleSet, purpose: CidrPurpose, cidrs: Sequence[IPNetwork]
) -> list[Match]:
    """The destination match of each rule a CIDR list needs: one per CIDR, or one set match."""
    if not use_set(use_sets, len(cidrs)):
        return [Address("dst", cidr) for cidr in cidrs]
    members = set_members(cidrs)
    named = NamedSet(set_name(purpose, members, rules.family), "net", rules.family, members)
    rules.sets[named.name] = named
    return [SetMatch(named.name, "dst")]


def port_matches(
    use_sets: UseSets, rules: RuleSet, purpose: PortPurpose, ports: Sequence[PortEntry]
) -> list[Match]:
    """The destination port match of each rule a port list needs: per entry, multiport, or one set.

    Entries are ports and ranges alike (a set holds a range as its ports; multiport spells it
    ``FIRST:LAST``, as iptables does).
    """
    if use_sets == "multiport" and len(ports) > SET_THRESHOLD:
        return [Ports("dst", chunk) for chunk in multiport_chunks(ports)]
    if not use_set(use_sets, len(ports)):
        return [Ports("dst", (port,)) for port in ports]
    members = tuple(ports)
    # The digest is of the single ports, as `ipset save` lists a bitmap:port set, so that
    # holds_what_its_name_says can check a set with ranges too (plain port lists keep their names).
    named = NamedSet(set_name(purpose, single_ports(members), None), "port", None, members)
    rules.sets[named.name] = named
    return [SetMatch(named.name, "dst")]


def multiport_chunks(ports: Sequence[PortEntry]) -> list[tuple[PortEntry, ...]]:
    """The entries in order, cut into groups that fit one multiport match (a range takes 2 places)."""
    chunks: list[tuple[PortEntry, ...]] = []
    chunk: list[PortEntry] = []
    for entry in ports:
        if multiport_slots([*chunk, entry]) > MULTIPORT_LIMIT:
            chunks.append(tuple(chunk))
            chunk = []
        chunk.append(entry)
    return [*chunks, tuple(chunk)] if chunk else chunks


def set_members(cidrs: Iterable[IPNetwork]) -> tuple[IPNetwork, ...]:
    """The CIDRs as a hash:net set can hold them: a /0 (which it cannot) as its two halves."""
    members: list[IPNetwork] = []
    for cidr in cidrs:
        members.extend(cidr.subnets() if cidr.prefixlen == 0 else (cidr,))
    return tuple(dict.fromkeys(members))


def single_ports(entries: Iterable[PortEntry]) -> list[int]:
    """Every port the entries cover, each once."""
    covered: set[int] = set()
    for entry in entries:
        first, last = port_bounds(entry)
        covered.update(range(first, last + 1))
    return sorted(covered)


def member_text(member: IPNetwork | PortEntry) -> str:
    """``str(member)``, faster: 10 000 CIDRs are formatted twice per run (digest, ipset input).

    Safe to splice into ipset input by construction: digits, hex digits, '.', ':' and '/' only.
    """
    if isinstance(member, int):
        return str(member)
    if isinstance(member, PortRange):
        return port_text(member)
    if member.version == 4:
        ip = int(member.network_address)
        return f"{ip >> 24}.{ip >> 16 & 255}.{ip >> 8 & 255}.{ip & 255}/{member.prefixlen}"
    return f"{inet_ntop(AF_INET6, member.network_address.packed)}/{member.prefixlen}"


def set_name(purpose: str, members: Sequence[object], family: Family | None) -> str:
    """``istio-[v4-|v6-]PURPOSE-DIGEST``: at most 27 characters, so ``NAME-t`` fits ipset's 31."""
    tag = f"{_FAMILY_TAG[family]}-" if family is not None else ""
    return f"istio-{tag}{purpose}-{members_digest(map(member_text, members))}"  # type: ignore[arg-type]


def members_digest(texts: Iterable[str]) -> str:
    """The digest in a set's name: of the members in any order, so it can be checked against what
    ``ipset save`` lists (in hash order) as well as computed from a plan."""
    import zlib  # only runs with sets pay for it

    # CRC-32 is enough: the digest only has to change when the members do, nobody forges it.
    return f"{zlib.crc32(','.join(sorted(set(texts))).encode()) & 0xFFFFFFFF:08x}"


def is_own_set(name: str) -> bool:
    """Named like ours; :func:`holds_what_its_name_says` decides whether it is ours."""
    return re.fullmatch(OWN_SET_NAME, name) is not None


def holds_what_its_name_says(name: str, listed_members: Iterable[str]) -> bool:
    """A set named like ours is ours only if its members (as ``ipset save`` lists them) match the
    digest in its name: a foreign ``istio-v4-out-excl-deadbeef`` holding other members is not."""
    import ipaddress

    texts = []
    for member in listed_members:
        if member.isdigit():
            texts.append(member)
            continue
        try:
            texts.append(member_text(ipaddress.ip_network(member)))  # ipset prints /32 and /128 bare
        except ValueError:
            return False
    return name.rsplit("-", 1)[1] == members_digest(texts)


def sets_of(rulesets: Iterable[RuleSet]) -> list[NamedSet]:
    """Every set the rule sets match, once (port sets serve both families)."""
    found: dict[str, NamedSet] = {}
    for ruleset in rulesets:
        found.update(ruleset.sets)
    return list(found.values())


# --- ipset ---------------------------------------------------------------------------------


def temporary_name(name: str) -> str:
    return f"{name}-t"


def ipset_create_options(named: NamedSet) -> str:
    if named.kind == "port":
        return "bitmap:port range 0-65535"
    family = "inet" if named.family is Family.V4 else "inet6"
    # Sized up front: growing a hash:net rehashes it again and again (10 000 CIDRs load 2x slower).
    size = len(named.members)
    hashsize = max(1024, 1 << (size // 2).bit_length())
    return f"hash:net family {family} hashsize {hashsize} maxelem {max(IPSET_MAXELEM, size)}"


def ipset_entries(named: NamedSet) -> list[str]:
    """The members as ``add`` arguments: runs of consecutive ports as one ``FIRST-LAST`` range."""
    if named.kind == "net":
        return [member_text(member) for member in named.members]  # type: ignore[arg-type]
    return port_ranges(named.members)  # type: ignore[arg-type]


def port_ranges(members: Iterable[PortEntry]) -> list[str]:
    """Ports and ranges as disjoint ``FIRST-LAST`` runs (ipset and nft both read that form; an nft
    interval set refuses overlapping elements), adjacent and overlapping ones merged; a lone port
    as itself."""
    runs: list[list[int]] = []
    for first, last in sorted(port_bounds(member) for member in members):
        if runs and first <= runs[-1][1] + 1:
            runs[-1][1] = max(runs[-1][1], last)
        else:
            runs.append([first, last])
    return [str(first) if first == last else f"{first}-{last}" for first, last in runs]


def render_ipset_restore(sets: Iterable[NamedSet], existing: Iterable[str] = ()) -> str:
    """``ipset restore`` input that leaves each set holding exactly its members.

    A new set is filled before any rule matches it. One that exists already (a rerun; its name
    says it holds these members, but someone may have edited it) is filled as a temporary set
    and swapped in, so rules that match it never see it half filled.
    """
    present = set(existing)
    lines: list[str] = []
    for named in sets:
        name, options = check_token(named.name), ipset_create_options(named)
        if name not in present:
            lines.append(f"create {name} {options}")
            lines += [f"add {name} {entry}" for entry in ipset_entries(named)]
            continue
        temporary = check_token(temporary_name(name))
        lines += [f"create {temporary} {options} -exist", f"flush {temporary}"]
        lines += [f"add {temporary} {entry}" for entry in ipset_entries(named)]
        lines += [f"swap {temporary} {name}", f"destroy {temporary}"]
    return "\n".join(lines) + "\n" if lines else ""


def render_ipset_document(rulesets: Iterable[RuleSet]) -> str:
    """The dry run's ``# ipset restore`` section (before the rules, as it must be loaded), or nothing."""
    script = render_ipset_restore(sets_of(rulesets))
    return f"# ipset restore\n{script}" if script else ""


def render_ipset_destroy(names: Iterable[str]) -> str:
    """``ipset restore`` input that destroys these sets (each must be ours)."""
    lines = []
    for name in names:
        if not is_own_set(name):
            raise ValueError(f"refusing to destroy set {name!r}: not one of ours")
        lines.append(f"destroy {check_token(name)}")
    return "\n".join(lines) + "\n" if lines else ""
