"""Istio's capture policy: which rules a configuration needs, as a :class:`~istio_iptables.xtables.model.Plan`.

Each step below mirrors one part of Istio's ``capture/run.go`` and is pure. The
order of the steps is the order of the rules in the restore input, which is the
order Istio emits them (``../shared/conformance`` pins it).
"""

from __future__ import annotations

import ipaddress

from istio_iptables.config.sidecar import DNS_CAPTURE_PORT, OUTBOUND_MARK, Config
from istio_iptables.net import Family, IPNetwork
from istio_iptables.policy.lists import cidr_matches, port_matches
from istio_iptables.xtables.model import (
    ISTIO_DIVERT,
    ISTIO_DROP,
    ISTIO_IN_REDIRECT,
    ISTIO_INBOUND,
    ISTIO_OUTPUT,
    ISTIO_OUTPUT_DNS,
    ISTIO_REDIRECT,
    ISTIO_TPROXY,
    RETURN,
    Address,
    ConnMark,
    ConnMarkRestore,
    ConnMarkSave,
    ConnState,
    CtZone,
    Interface,
    Jump,
    L4Protocol,
    Mark,
    Match,
    Owner,
    Plan,
    Ports,
    Redirect,
    RuleSet,
    SetMark,
    Tproxy,
    TproxyRoutes,
    Verdict,
)

TCP = L4Protocol("tcp")
UDP = L4Protocol("udp")
LOOPBACK_OUT = Interface("out", "lo")
LOOPBACK_IN = Interface("in", "lo")
DNS_PORT = 53


def build_plan(config: Config) -> Plan:
    """Every rule, route and address ``config`` asks for. IPv4 rules are always built, as in Istio."""
    families = (Family.V4, Family.V6) if config.enable_ipv6 else (Family.V4,)
    rulesets = tuple(build_ruleset(config, family) for family in families)
    routes = None
    if config.tproxy and not config.inbound_ports.empty:
        routes = TproxyRoutes(mark=config.tproxy_mark, table=config.route_table, families=families)
    return Plan(rulesets=rulesets, routes=routes, ipv6_passthrough_address=config.enable_ipv6)


def build_ruleset(config: Config, family: Family) -> RuleSet:
    rules = RuleSet(family)
    loopback = loopback_cidr(config, family)
    include_has_loopback = any(cidr.network_address.is_loopback for cidr in config.outbound_include.cidrs)

    bypass_excluded_interfaces(config, rules)
    bypass_virt_interfaces(config, rules)
    drop_invalid(config, rules)
    declare_redirect_chains(config, rules)
    capture_inbound(config, rules, loopback)
    rules.append("nat", "OUTPUT", target=Jump(ISTIO_OUTPUT))
    bypass_excluded_outbound_ports(config, rules)
    # Envoy's inbound passthrough connects to the app from 127.0.0.6 / ::6: never capture it again.
    rules.append(
        "nat", ISTIO_OUTPUT, LOOPBACK_OUT, Address("src", family.inbound_passthrough_source), target=RETURN
    )
    for kind, ids in (("uid", config.proxy_uids), ("gid", config.proxy_gids)):
        for proxy_id in ids:
            protect_proxy_traffic(config, rules, kind, proxy_id, loopback, include_has_loopback)
    capture_by_owner_group(config, rules)
    if config.dns_capture_active:
        capture_dns(config, rules)
    # Envoy-aware apps and container-to-container traffic use localhost explicitly: leave it alone.
    rules.append("nat", ISTIO_OUTPUT, Address("dst", loopback), target=RETURN)
    # Long lists become one set match (istio_iptables/policy/lists.py); short ones one rule per entry.
    excluded = of_family(config.outbound_exclude, family)
    for destination in cidr_matches(config.use_sets, rules, "out-excl", excluded):
        rules.append("nat", ISTIO_OUTPUT, destination, target=RETURN)
    for port in port_matches(config.use_sets, rules, "port-out", config.outbound_ports_include):
        rules.append("nat", ISTIO_OUTPUT, TCP, port, target=Jump(ISTIO_REDIRECT))
    capture_outbound_ranges(config, rules)
    if config.tproxy:
        keep_tproxy_marks(config, rules, loopback)
    return rules


def loopback_cidr(config: Config, family: Family) -> IPNetwork:
    return config.loopback_cidr if family is Family.V4 else family.loopback


def of_family(cidrs: tuple[IPNetwork, ...], family: Family) -> tuple[IPNetwork, ...]:
    return tuple(cidr for cidr in cidrs if family.owns(cidr))


def bypass_excluded_interfaces(config: Config, rules: RuleSet) -> None:
    """``-c``: traffic on these NICs never meets the proxy, in either direction."""
    tables = ("nat", "mangle") if config.tproxy else ("nat",)
    for table in tables:
        for name in config.exclude_interfaces:
            rules.append(table, "PREROUTING", Interface("in", name), target=RETURN)
            rules.append(table, "OUTPUT", Interface("out", name), target=RETURN)


def bypass_virt_interfaces(config: Config, rules: RuleSet) -> None:
    """``-k``: VM guests behind these NICs are not inbound traffic (they become outbound, see below)."""
    for name in config.virt_interfaces:
        rules.insert("nat", "PREROUTING", 1, Interface("in", name), target=RETURN)


def drop_invalid(config: Config, rules: RuleSet) -> None:
    """Out-of-window packets of redirected flows would make the kernel reset the connection (#36566)."""
    if config.drop_invalid:
        rules.append("mangle", "PREROUTING", ConnState(("INVALID",)), target=Jump(ISTIO_DROP))
        rules.append("mangle", ISTIO_DROP, target=Verdict("DROP"))


def declare_redirect_chains(config: Config, rules: RuleSet) -> None:
    # HBONE (the tunnel port) must reach Envoy's own listener untouched.
    rules.append("nat", ISTIO_INBOUND, TCP, Ports("dst", (config.inbound_tunnel_port,)), target=RETURN)
    rules.append("nat", ISTIO_REDIRECT, TCP, target=Redirect(config.proxy_port))
    rules.append("nat", ISTIO_IN_REDIRECT, TCP, target=Redirect(config.inbound_capture_port))


def capture_inbound(config: Config, rules: RuleSet, loopback: IPNetwork) -> None:
    """Send inbound TCP to the inbound listener: REDIRECT in nat, or TPROXY in mangle."""
    ports = config.inbound_ports
    if ports.empty:
        return
    table = "mangle" if config.tproxy else "nat"
    if config.tproxy:
        # Marked packets are routed to lo by the policy route, so TPROXY sockets receive them.
        rules.append("mangle", ISTIO_DIVERT, target=SetMark(config.tproxy_mark))
        rules.append("mangle", ISTIO_DIVERT, target=Verdict("ACCEPT"))
        rules.append(
            "mangle",
            ISTIO_TPROXY,
            Address("dst", loopback, negate=True),
            TCP,
            target=Tproxy(config.inbound_capture_port, config.tproxy_mark),
        )
    rules.append(table, "PREROUTING", TCP, target=Jump(ISTIO_INBOUND))
    if ports.wildcard:
        for port in port_matches(config.use_sets, rules, "port-in-excl", config.inbound_exclude_ports):
            rules.append(table, ISTIO_INBOUND, TCP, port, target=RETURN)
        divert_inbound(config, rules, ())
    else:
        for port in port_matches(config.use_sets, rules, "port-in", ports.ports):
            divert_inbound(config, rules, (port,))


def divert_inbound(config: Config, rules: RuleSet, port_match: tuple[Match, ...]) -> None:
    if config.tproxy:
        # Packets of connections TPROXY already handed to Envoy only need the mark; new ones get TPROXY'd.
        established = ConnState(("RELATED", "ESTABLISHED"))
        rules.append("mangle", ISTIO_INBOUND, TCP, *port_match, established, target=Jump(ISTIO_DIVERT))
        rules.append("mangle", ISTIO_INBOUND, TCP, *port_match, target=Jump(ISTIO_TPROXY))
    else:
        rules.append("nat", ISTIO_INBOUND, TCP, *port_match, target=Jump(ISTIO_IN_REDIRECT))


def bypass_excluded_outbound_ports(config: Config, rules: RuleSet) -> None:
    """``-o``: must come before the loopback rules so connections back to self honour it too."""
    for port in port_matches(config.use_sets, rules, "port-out-excl", config.outbound_ports_exclude):
        for protocol in (TCP, UDP):
            rules.append("nat", ISTIO_OUTPUT, protocol, port, target=RETURN)


def protect_proxy_traffic(
    config: Config, rules: RuleSet, kind: str, proxy_id: str, loopback: IPNetwork, include_has_loopback: bool
) -> None:
    """Loop prevention for one proxy uid or gid, plus the app -> own-service-VIP round trip."""
    owner = Owner(kind, proxy_id)  # type: ignore[arg-type]
    dns = config.dns_capture_active
    # Envoy calling its own pod IP (a Service the pod serves) goes through the inbound listener too.
    # With DNS capture, the agent's TCP DNS to a pod-local resolver must not (uid rules only, as Istio).
    skipped_ports = (DNS_PORT, config.inbound_tunnel_port) if dns and kind == "uid" else (
        config.inbound_tunnel_port,
    )
    rules.append(
        "nat",
        ISTIO_OUTPUT,
        LOOPBACK_OUT,
        Address("dst", loopback, negate=True),
        TCP,
        Ports("dst", skipped_ports, negate=True),
        owner,
        target=Jump(ISTIO_IN_REDIRECT),
    )
    # App traffic over lo (localhost, or its own pod IP) is app-to-app: not captured, unless the user
    # asked for a loopback range. With DNS capture, app TCP DNS to a local resolver is still captured.
    if not include_has_loopback:
        dns_exception: tuple[Match, ...] = (TCP, Ports("dst", (DNS_PORT,), negate=True)) if dns else ()
        rules.append(
            "nat", ISTIO_OUTPUT, LOOPBACK_OUT, *dns_exception, Owner(kind, proxy_id, negate=True), target=RETURN  # type: ignore[arg-type]
        )
    # Everything the proxy itself sends (upstream, xDS, DNS upstream) leaves uncaptured.
    rules.append("nat", ISTIO_OUTPUT, owner, target=RETURN)


def capture_by_owner_group(config: Config, rules: RuleSet) -> None:
    """ISTIO_OUTBOUND_OWNER_GROUPS(_EXCLUDE): capture only (or all but) these groups' traffic."""
    if config.owner_groups_include is not None:
        not_in_groups = tuple(Owner("gid", group, negate=True) for group in config.owner_groups_include)
        rules.append("nat", ISTIO_OUTPUT, *not_in_groups, target=RETURN)
        return
    for group in config.owner_groups_exclude:
        rules.append("nat", ISTIO_OUTPUT, Owner("gid", group), target=RETURN)


def capture_dns(config: Config, rules: RuleSet) -> None:
    """DNS to the resolv.conf servers (or every port-53 flow) goes to the agent on 15053."""
    family = rules.family
    servers = dns_servers(config, family)
    # nat OUTPUT sees one family; jump only where there is something to capture in it.
    if config.capture_all_dns or servers:
        rules.append("nat", ISTIO_OUTPUT, target=Jump(ISTIO_OUTPUT_DNS))
    for protocol in (TCP, UDP):
        for destination in dns_destinations(config, servers):
            rules.append(
                "nat",
                ISTIO_OUTPUT_DNS,
                protocol,
                Ports("dst", (DNS_PORT,)),
                *destination,
                target=Redirect(DNS_CAPTURE_PORT),
            )
    split_dns_conntrack_zones(config, rules, servers)


def split_dns_conntrack_zones(config: Config, rules: RuleSet, servers: tuple[IPNetwork, ...]) -> None:
    """Separate conntrack zones keep the app's and the agent's UDP flows to one resolver apart (#33469).

    Zone 1: agent <-> upstream resolver. Zone 2: app <-> agent.
    """
    rules.append("raw", "OUTPUT", target=Jump(ISTIO_OUTPUT_DNS))
    for kind, ids in (("uid", config.proxy_uids), ("gid", config.proxy_gids)):
        for proxy_id in ids:
            owner = Owner(kind, proxy_id)  # type: ignore[arg-type]
            rules.append("raw", ISTIO_OUTPUT_DNS, UDP, Ports("dst", (DNS_PORT,)), owner, target=CtZone(1))
            rules.append(
                "raw", ISTIO_OUTPUT_DNS, UDP, Ports("src", (DNS_CAPTURE_PORT,)), owner, target=CtZone(2)
            )
    if config.capture_all_dns or servers:
        rules.append("raw", "PREROUTING", target=Jump(ISTIO_INBOUND))
    for destination in dns_destinations(config, servers):
        source = tuple(Address("src", match.network) for match in destination)
        rules.append("raw", ISTIO_OUTPUT_DNS, UDP, Ports("dst", (DNS_PORT,)), *destination, target=CtZone(2))
        rules.append("raw", ISTIO_INBOUND, UDP, Ports("src", (DNS_PORT,)), *source, target=CtZone(1))


def dns_servers(config: Config, family: Family) -> tuple[IPNetwork, ...]:
    addresses = config.dns_servers_v4 if family is Family.V4 else config.dns_servers_v6
    return tuple(ipaddress.ip_network(address) for address in addresses)


def dns_destinations(config: Config, servers: tuple[IPNetwork, ...]) -> list[tuple[Address, ...]]:
    """The destination match of each DNS rule: none at all with --capture-all-dns."""
    if config.capture_all_dns:
        return [()]
    return [(Address("dst", server),) for server in servers]


def capture_outbound_ranges(config: Config, rules: RuleSet) -> None:
    """``-i``: what remains is captured (``*``) or only these CIDRs; ``-k`` NICs are treated alike."""
    include = config.outbound_include
    if include.wildcard:
        rules.append("nat", ISTIO_OUTPUT, target=Jump(ISTIO_REDIRECT))
        for name in config.virt_interfaces:
            rules.insert("nat", "PREROUTING", 1, Interface("in", name), target=Jump(ISTIO_REDIRECT))
        return
    for destination in cidr_matches(config.use_sets, rules, "out-incl", of_family(include.cidrs, rules.family)):
        for name in config.virt_interfaces:
            rules.insert("nat", "PREROUTING", 1, Interface("in", name), destination, target=Jump(ISTIO_REDIRECT))
        rules.append("nat", ISTIO_OUTPUT, destination, target=Jump(ISTIO_REDIRECT))


def keep_tproxy_marks(config: Config, rules: RuleSet, loopback: IPNetwork) -> None:
    """Marks that make TPROXY work with Envoy's original_src and with app -> own-VIP calls."""
    mark = config.tproxy_mark
    # Envoy's original_src sockets mark app-bound packets; remember it on the connection.
    rules.append("mangle", "PREROUTING", TCP, Mark(mark), target=ConnMarkSave())
    # Don't re-mark Envoy -> app packets (they already carry the TPROXY mark).
    rules.append("mangle", "OUTPUT", TCP, LOOPBACK_OUT, Mark(mark), target=RETURN)
    # app -> VIP -> Envoy outbound -(mark 1338)-> Envoy inbound -> app: tag Envoy's leg to its own pod IP.
    for kind, ids in (("uid", config.proxy_uids), ("gid", config.proxy_gids)):
        for proxy_id in ids:
            rules.append(
                "mangle",
                "OUTPUT",
                Address("dst", loopback, negate=True),
                TCP,
                LOOPBACK_OUT,
                Owner(kind, proxy_id),  # type: ignore[arg-type]
                target=SetMark(OUTBOUND_MARK),
            )
    # The app's replies to a (spoofed) remote source get the mark back, so policy routing returns
    # them to Envoy instead of the network.
    rules.append("mangle", "OUTPUT", TCP, ConnMark(mark), target=ConnMarkRestore())
    # Don't TPROXY again what is already marked (prevents loops), what Envoy's passthrough sends
    # from 127.0.0.6, or app -> app over lo unless Envoy tagged it 1338.
    rules.insert("mangle", ISTIO_INBOUND, 1, TCP, Mark(mark), target=RETURN)
    rules.insert(
        "mangle",
        ISTIO_INBOUND,
        2,
        TCP,
        Address("src", rules.family.inbound_passthrough_source),
        LOOPBACK_IN,
        target=RETURN,
    )
    rules.insert("mangle", ISTIO_INBOUND, 3, TCP, LOOPBACK_IN, Mark(OUTBOUND_MARK, negate=True), target=RETURN)
