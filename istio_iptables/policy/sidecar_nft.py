"""Istio's capture policy as nftables rules: which rules a configuration needs, as an NftRuleset.

The steps follow Istio's nftables mode (``tools/istio-nftables/pkg/capture``), which differs
from the iptables policy in :mod:`istio_iptables.policy.sidecar_xtables` in a few places: one ``inet`` table
holds both families, so family-specific rules come in IPv4/IPv6 pairs; ports carry their
protocol; TPROXY and DNS rules match TCP explicitly. Each step is pure; within a chain, the
order of the rules is the order in which the steps append (or insert) them.

Long CIDR and port lists become named sets of the table that matches them, decided exactly as
for the iptables backends (:func:`istio_iptables.policy.lists.use_set`, ``--use-sets``), see
:func:`nft_cidr_matches` and :func:`port_choices`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from istio_iptables.config.sidecar import DNS_CAPTURE_PORT, OUTBOUND_MARK, Config
from istio_iptables.net import Family, IPNetwork
from istio_iptables.nft.model import (
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
    NFT_ACCEPT,
    NFT_DROP,
    NFT_RETURN,
    OUTPUT,
    PREROUTING,
    RAW,
    Addr,
    AddrInSet,
    CtMarkIs,
    CtState,
    IfName,
    JumpTo,
    L4Proto,
    MarkIs,
    NftMatch,
    NftRuleset,
    NftSet,
    Port,
    PortInSet,
    RedirectTo,
    RestoreMarkFromConnection,
    SaveMarkToConnection,
    SetCtZone,
    SetMetaMark,
    SocketOwner,
    TproxyTo,
)
from istio_iptables.policy.lists import SET_THRESHOLD, CidrPurpose, PortPurpose, set_members, use_set
from istio_iptables.policy.sidecar_xtables import dns_servers, loopback_cidr, of_family
from istio_iptables.xtables.model import PortEntry

TCP = L4Proto("tcp")
LOOPBACK_OUT = IfName("out", "lo")
LOOPBACK_IN = IfName("in", "lo")
DNS_PORT = 53
DNS_TO_AGENT = Port("udp", "dport", (DNS_PORT,))
DNS_FROM_RESOLVER = Port("udp", "sport", (DNS_PORT,))


def build_nft_ruleset(config: Config) -> NftRuleset:
    """Every rule ``config`` asks for. IPv4 rules are always built, IPv6 ones when IPv6 is on."""
    nft = NftRuleset()
    families = (Family.V4, Family.V6) if config.enable_ipv6 else (Family.V4,)

    bypass_excluded_interfaces(config, nft)
    bypass_virt_interfaces(config, nft)
    drop_invalid(config, nft)
    fill_redirect_chains(config, nft)
    capture_inbound(config, nft, families)
    nft.append(NAT, OUTPUT, then=JumpTo(ISTIO_OUTPUT))
    bypass_excluded_outbound_ports(config, nft)
    # Envoy's inbound passthrough connects to the app from 127.0.0.6 / ::6: never capture it again.
    for family in families:
        nft.append(NAT, ISTIO_OUTPUT, LOOPBACK_OUT, Addr("saddr", family.inbound_passthrough_source), then=NFT_RETURN)
    for kind, ids in (("uid", config.proxy_uids), ("gid", config.proxy_gids)):
        for proxy_id in ids:
            protect_proxy_traffic(config, nft, families, SocketOwner(kind, proxy_id))  # type: ignore[arg-type]
    capture_by_owner_group(config, nft)
    if config.dns_capture_active:
        capture_dns(config, nft, families)
    # Envoy-aware apps and container-to-container traffic use localhost explicitly: leave it alone.
    for family in families:
        nft.append(NAT, ISTIO_OUTPUT, Addr("daddr", loopback_cidr(config, family)), then=NFT_RETURN)
    for family in families:
        excluded = of_family(config.outbound_exclude, family)
        for destination in nft_cidr_matches(config, nft, NAT, "out-excl", family, excluded):
            nft.append(NAT, ISTIO_OUTPUT, destination, then=NFT_RETURN)
    for ports in port_choices(config, nft, NAT, "port-out", config.outbound_ports_include):
        nft.append(NAT, ISTIO_OUTPUT, dport("tcp", ports), then=JumpTo(ISTIO_REDIRECT))
    capture_outbound_ranges(config, nft, families)
    if config.tproxy:
        keep_tproxy_marks(config, nft, families)
    return nft


def bypass_excluded_interfaces(config: Config, nft: NftRuleset) -> None:
    """``-c``: traffic on these NICs never meets the proxy, in either direction."""
    tables = (NAT, MANGLE) if config.tproxy else (NAT,)
    for table in tables:
        for name in config.exclude_interfaces:
            nft.append(table, PREROUTING, IfName("in", name), then=NFT_RETURN)
            nft.append(table, OUTPUT, IfName("out", name), then=NFT_RETURN)


def bypass_virt_interfaces(config: Config, nft: NftRuleset) -> None:
    """``-k``: VM guests behind these NICs are not inbound traffic (they become outbound, see below)."""
    for name in config.virt_interfaces:
        nft.insert(NAT, PREROUTING, 0, IfName("in", name), then=NFT_RETURN)


def drop_invalid(config: Config, nft: NftRuleset) -> None:
    """Out-of-window packets of redirected flows would make the kernel reset the connection (#36566)."""
    if config.drop_invalid:
        nft.append(MANGLE, PREROUTING, TCP, CtState(("invalid",)), then=JumpTo(ISTIO_DROP))
        nft.append(MANGLE, ISTIO_DROP, then=NFT_DROP)


def fill_redirect_chains(config: Config, nft: NftRuleset) -> None:
    # HBONE (the tunnel port) must reach Envoy's own listener untouched.
    nft.append(NAT, ISTIO_INBOUND, TCP, Port("tcp", "dport", (config.inbound_tunnel_port,)), then=NFT_RETURN)
    nft.append(NAT, ISTIO_REDIRECT, TCP, then=RedirectTo(config.proxy_port))
    nft.append(NAT, ISTIO_IN_REDIRECT, TCP, then=RedirectTo(config.inbound_capture_port))


def capture_inbound(config: Config, nft: NftRuleset, families: tuple[Family, ...]) -> None:
    """Send inbound TCP to the inbound listener: redirect in nat, or TPROXY in mangle."""
    ports = config.inbound_ports
    if ports.empty:
        return
    if config.tproxy:
        mark = config.tproxy_mark
        # Marked packets are routed to lo by the policy route, so TPROXY sockets receive them.
        nft.append(MANGLE, ISTIO_DIVERT, then=SetMetaMark(mark))
        nft.append(MANGLE, ISTIO_DIVERT, then=NFT_ACCEPT)
        for family in families:
            nft.append(
                MANGLE,
                ISTIO_TPROXY,
                TCP,
                Addr("daddr", loopback_cidr(config, family), negate=True),
                then=(TproxyTo(family.value, config.inbound_capture_port), SetMetaMark(mark), NFT_ACCEPT),  # type: ignore[arg-type]
            )
    table = MANGLE if config.tproxy else NAT
    nft.append(table, PREROUTING, TCP, then=JumpTo(ISTIO_INBOUND))
    if ports.wildcard:
        for excluded in port_choices(config, nft, table, "port-in-excl", config.inbound_exclude_ports):
            nft.append(table, ISTIO_INBOUND, TCP, dport("tcp", excluded), then=NFT_RETURN)
        divert_inbound(config, nft, ())
    else:
        for included in port_choices(config, nft, table, "port-in", ports.ports):
            divert_inbound(config, nft, (dport("tcp", included),))


def divert_inbound(config: Config, nft: NftRuleset, port_match: tuple[NftMatch, ...]) -> None:
    if config.tproxy:
        # Packets of connections TPROXY already handed to Envoy only need the mark; new ones get TPROXY'd.
        established = CtState(("related", "established"))
        nft.append(MANGLE, ISTIO_INBOUND, TCP, established, *port_match, then=JumpTo(ISTIO_DIVERT))
        nft.append(MANGLE, ISTIO_INBOUND, TCP, *port_match, then=JumpTo(ISTIO_TPROXY))
    else:
        nft.append(NAT, ISTIO_INBOUND, TCP, *port_match, then=JumpTo(ISTIO_IN_REDIRECT))


def bypass_excluded_outbound_ports(config: Config, nft: NftRuleset) -> None:
    """``-o``: must come before the loopback rules so connections back to self honour it too."""
    for ports in port_choices(config, nft, NAT, "port-out-excl", config.outbound_ports_exclude):
        for protocol in ("tcp", "udp"):
            nft.append(NAT, ISTIO_OUTPUT, dport(protocol, ports), then=NFT_RETURN)  # type: ignore[arg-type]


def protect_proxy_traffic(
    config: Config, nft: NftRuleset, families: tuple[Family, ...], owner: SocketOwner
) -> None:
    """Loop prevention for one proxy uid or gid, plus the app -> own-service-VIP round trip."""
    dns = config.dns_capture_active
    # Envoy calling its own pod IP (a Service the pod serves) goes through the inbound listener too.
    # With DNS capture, the agent's TCP DNS to a pod-local resolver must not (uid rules only, as Istio).
    skipped_ports = (DNS_PORT, config.inbound_tunnel_port) if dns and owner.kind == "uid" else (
        config.inbound_tunnel_port,
    )
    for family in families:
        nft.append(
            NAT,
            ISTIO_OUTPUT,
            LOOPBACK_OUT,
            TCP,
            Addr("daddr", loopback_cidr(config, family), negate=True),
            Port("tcp", "dport", skipped_ports, negate=True),
            owner,
            then=JumpTo(ISTIO_IN_REDIRECT),
        )
    # App traffic over lo (localhost, or its own pod IP) is app-to-app: not captured, unless the user
    # asked for a loopback range. With DNS capture, app TCP DNS to a local resolver is still captured.
    if not any(cidr.network_address.is_loopback for cidr in config.outbound_include.cidrs):
        not_owner = SocketOwner(owner.kind, owner.id, negate=True)
        if dns:
            nft.append(
                NAT, ISTIO_OUTPUT, LOOPBACK_OUT, TCP, Port("tcp", "dport", (DNS_PORT,), negate=True), not_owner,
                then=NFT_RETURN,
            )
        else:
            nft.append(NAT, ISTIO_OUTPUT, LOOPBACK_OUT, not_owner, then=NFT_RETURN)
    # Everything the proxy itself sends (upstream, xDS, DNS upstream) leaves uncaptured.
    nft.append(NAT, ISTIO_OUTPUT, owner, then=NFT_RETURN)


def capture_by_owner_group(config: Config, nft: NftRuleset) -> None:
    """ISTIO_OUTBOUND_OWNER_GROUPS(_EXCLUDE): capture only (or all but) these groups' traffic."""
    if config.owner_groups_include is not None:
        not_in_groups = tuple(SocketOwner("gid", group, negate=True) for group in config.owner_groups_include)
        nft.append(NAT, ISTIO_OUTPUT, *not_in_groups, then=NFT_RETURN)
        return
    for group in config.owner_groups_exclude:
        nft.append(NAT, ISTIO_OUTPUT, SocketOwner("gid", group), then=NFT_RETURN)


def capture_dns(config: Config, nft: NftRuleset, families: tuple[Family, ...]) -> None:
    """DNS to the resolv.conf servers (or every port-53 flow) goes to the agent on 15053."""
    servers = [server for family in families for server in dns_servers(config, family)]
    capture = config.capture_all_dns or bool(servers)
    if capture:
        nft.append(NAT, ISTIO_OUTPUT, then=JumpTo(ISTIO_OUTPUT_DNS))
    for protocol in ("tcp", "udp"):
        to_port_53 = Port(protocol, "dport", (DNS_PORT,))  # type: ignore[arg-type]
        for destination in dns_destinations(config, servers):
            nft.append(NAT, ISTIO_OUTPUT_DNS, *destination, to_port_53, then=RedirectTo(DNS_CAPTURE_PORT))
    split_dns_conntrack_zones(config, nft, servers, capture)


def split_dns_conntrack_zones(config: Config, nft: NftRuleset, servers: list[IPNetwork], capture: bool) -> None:
    """Separate conntrack zones keep the app's and the agent's UDP flows to one resolver apart (#33469).

    Zone 1: agent <-> upstream resolver. Zone 2: app <-> agent.
    """
    nft.append(RAW, OUTPUT, then=JumpTo(ISTIO_OUTPUT_DNS))
    for kind, ids in (("uid", config.proxy_uids), ("gid", config.proxy_gids)):
        for proxy_id in ids:
            owner = SocketOwner(kind, proxy_id)  # type: ignore[arg-type]
            nft.append(RAW, ISTIO_OUTPUT_DNS, DNS_TO_AGENT, owner, then=SetCtZone(1))
            nft.append(RAW, ISTIO_OUTPUT_DNS, Port("udp", "sport", (DNS_CAPTURE_PORT,)), owner, then=SetCtZone(2))
    if capture:
        nft.append(RAW, PREROUTING, then=JumpTo(ISTIO_INBOUND))
    for destination in dns_destinations(config, servers):
        source = tuple(Addr("saddr", match.network) for match in destination)
        nft.append(RAW, ISTIO_OUTPUT_DNS, DNS_TO_AGENT, *destination, then=SetCtZone(2))
        nft.append(RAW, ISTIO_INBOUND, DNS_FROM_RESOLVER, *source, then=SetCtZone(1))


def dns_destinations(config: Config, servers: list[IPNetwork]) -> list[tuple[Addr, ...]]:
    """The destination match of each DNS rule: none at all with --capture-all-dns."""
    if config.capture_all_dns:
        return [()]
    return [(Addr("daddr", server),) for server in servers]


def capture_outbound_ranges(config: Config, nft: NftRuleset, families: tuple[Family, ...]) -> None:
    """``-i``: what remains is captured (``*``) or only these CIDRs; ``-k`` NICs are treated alike."""
    include = config.outbound_include
    if include.wildcard:
        nft.append(NAT, ISTIO_OUTPUT, then=JumpTo(ISTIO_REDIRECT))
        for name in config.virt_interfaces:
            nft.insert(NAT, PREROUTING, 0, IfName("in", name), then=JumpTo(ISTIO_REDIRECT))
        return
    for family in families:
        for destination in nft_cidr_matches(config, nft, NAT, "out-incl", family, of_family(include.cidrs, family)):
            for name in config.virt_interfaces:
                nft.insert(NAT, PREROUTING, 0, IfName("in", name), destination, then=JumpTo(ISTIO_REDIRECT))
            nft.append(NAT, ISTIO_OUTPUT, destination, then=JumpTo(ISTIO_REDIRECT))


def keep_tproxy_marks(config: Config, nft: NftRuleset, families: tuple[Family, ...]) -> None:
    """Marks that make TPROXY work with Envoy's original_src and with app -> own-VIP calls."""
    mark = config.tproxy_mark
    # Envoy's original_src sockets mark app-bound packets; remember it on the connection.
    nft.append(MANGLE, PREROUTING, TCP, MarkIs(mark), then=SaveMarkToConnection())
    # Don't re-mark Envoy -> app packets (they already carry the TPROXY mark).
    nft.append(MANGLE, OUTPUT, LOOPBACK_OUT, TCP, MarkIs(mark), then=NFT_RETURN)
    # app -> VIP -> Envoy outbound -(mark 1338)-> Envoy inbound -> app: tag Envoy's leg to its own pod IP.
    for kind, ids in (("uid", config.proxy_uids), ("gid", config.proxy_gids)):
        for proxy_id in ids:
            for family in families:
                nft.append(
                    MANGLE,
                    OUTPUT,
                    LOOPBACK_OUT,
                    TCP,
                    Addr("daddr", loopback_cidr(config, family), negate=True),
                    SocketOwner(kind, proxy_id),  # type: ignore[arg-type]
                    then=SetMetaMark(OUTBOUND_MARK),
                )
    # The app's replies to a (spoofed) remote source get the mark back, so policy routing returns
    # them to Envoy instead of the network.
    nft.append(MANGLE, OUTPUT, TCP, CtMarkIs(mark), then=RestoreMarkFromConnection())
    # Don't TPROXY again what is already marked (prevents loops), what Envoy's passthrough sends
    # from 127.0.0.6 / ::6, or app -> app over lo unless Envoy tagged it 1338. The indexes are
    # Istio's: both passthrough rules go to index 1, so the IPv6 one ends up above the IPv4 one.
    nft.insert(MANGLE, ISTIO_INBOUND, 0, TCP, MarkIs(mark), then=NFT_RETURN)
    for family in families:
        nft.insert(
            MANGLE,
            ISTIO_INBOUND,
            1,
            LOOPBACK_IN,
            TCP,
            Addr("saddr", family.inbound_passthrough_source),
            then=NFT_RETURN,
        )
    nft.insert(MANGLE, ISTIO_INBOUND, 2, LOOPBACK_IN, TCP, MarkIs(OUTBOUND_MARK, negate=True), then=NFT_RETURN)


# --- long lists as named sets ------------------------------------------------------------------------

PortChoice = tuple[PortEntry, ...] | str  # ports and ranges to match in one rule, or the name of a set of them


def nft_cidr_matches(
    config: Config, nft: NftRuleset, table: str, purpose: CidrPurpose, family: Family, cidrs: Sequence[IPNetwork]
) -> list[NftMatch]:
    """The destination match of each rule a CIDR list needs: one per CIDR, or one per prefix length.

    A long list becomes one hash set per prefix length it holds, each matched with the address
    masked to that length (``ip daddr & 255.255.255.0 @istio-v4-out-excl-24``), as ipset's
    hash:net works. Not one interval set: loading 10 000 scattered CIDRs into an interval set
    costs the kernel and nft ~120 ms, hash sets ~30 ms (docs/speed.md); a connection pays one
    hash lookup per distinct length, and lists hold few.
    """
    if not use_set(config.use_sets, len(cidrs)):
        return [Addr("daddr", cidr) for cidr in cidrs]
    by_length: dict[int, list[IPNetwork]] = {}
    for member in set_members(cidrs):
        by_length.setdefault(member.prefixlen, []).append(member)
    set_type = "ipv4_addr" if family is Family.V4 else "ipv6_addr"
    matches: list[NftMatch] = []
    for prefixlen in sorted(by_length):
        name = nft_set_name(purpose, family, prefixlen)
        nft.declare_set(table, NftSet(name, set_type, tuple(by_length[prefixlen])))
        matches.append(AddrInSet("daddr", family.value, prefixlen, name))  # type: ignore[arg-type]
    return matches


def port_choices(
    config: Config, nft: NftRuleset, table: str, purpose: PortPurpose, ports: Sequence[PortEntry]
) -> list[PortChoice]:
    """The ports each rule of a port list matches: one each, all of them, or a named set.

    ``multiport`` (no named sets) writes a long list as one anonymous set, ``{ 80, 443, ... }``:
    nftables has no 15-port limit, and the kernel looks it up once per packet all the same.
    """
    if config.use_sets == "multiport" and len(ports) > SET_THRESHOLD:
        return [tuple(ports)]
    if not use_set(config.use_sets, len(ports)):
        return [(port,) for port in ports]
    members = tuple(dict.fromkeys(ports))
    name = nft_set_name(purpose, None)
    nft.declare_set(table, NftSet(name, "inet_service", members))
    return [name]


def nft_set_name(purpose: str, family: Family | None, prefixlen: int | None = None) -> str:
    """``istio-[v4-|v6-]PURPOSE[-PREFIXLEN]``: unlike ipsets, no digest of the members. A rerun
    refills the set of that name in the transaction that replaces the rules (see render_script)."""
    tag = "" if family is None else f"v{family.value}-"
    return f"istio-{tag}{purpose}" + ("" if prefixlen is None else f"-{prefixlen}")


def dport(protocol: Literal["tcp", "udp"], choice: PortChoice) -> NftMatch:
    if isinstance(choice, str):
        return PortInSet(protocol, "dport", choice)
    return Port(protocol, "dport", choice)
