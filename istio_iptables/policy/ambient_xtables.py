"""Ambient mode as xtables rules: the in-pod redirection to ztunnel, and the node's probe SNAT.

The same facts as Istio's ``cni/pkg/iptables/iptables.go`` (``AppendInpodRules``,
``AppendHostRules``), in its order, as our rule model: one :class:`RuleSet` per family, rendered
by the same iptables-restore renderer as the sidecar's rules. Pure: no I/O.

The pod's chains are ``ISTIO_PRERT`` and ``ISTIO_OUTPUT`` in mangle, nat and (with DNS capture)
raw; the node's is ``ISTIO_POSTRT`` in nat, inserted first in POSTROUTING. ``ISTIO_OUTPUT`` is also
a sidecar chain name: the two modes never share a namespace (:mod:`istio_iptables.policy.footprint`).
"""

from __future__ import annotations

import ipaddress

from istio_iptables.config.ambient import (
    DNS_CAPTURE_PORT,
    DNS_CONNTRACK_ZONE,
    DNS_PORT,
    INPOD_MARK,
    INPOD_MASK,
    INPOD_RESTORE_MASK,
    INPOD_RULE_PRIORITY,
    INPOD_TPROXY_MARK,
    INPOD_TPROXY_MASK,
    PROBE_SET_V4,
    PROBE_SET_V6,
    ROUTE_TABLE_INBOUND,
    ZTUNNEL_INBOUND_PLAINTEXT_PORT,
    ZTUNNEL_INBOUND_PORT,
    ZTUNNEL_OUTBOUND_PORT,
    AmbientConfig,
)
from istio_iptables.net import Family
from istio_iptables.xtables.model import (
    Address,
    ConnMark,
    ConnMarkRestore,
    ConnMarkSet,
    CtZone,
    Interface,
    Jump,
    L4Protocol,
    Mark,
    Plan,
    Ports,
    ProtocolModule,
    Redirect,
    RuleSet,
    SetMatch,
    Snat,
    SocketExists,
    TproxyRoutes,
    Verdict,
)

TYPE_CHECKING = False
if TYPE_CHECKING:  # the claims read live dumps; a dry run never imports the readers
    from istio_iptables.xtables.reconcile import TableState
    from istio_iptables.xtables.save import SaveDump

# Chain names Istio's node agent uses (cni/pkg/iptables: ChainInpod*, ChainHostPostrouting).
ISTIO_PRERT = "ISTIO_PRERT"
ISTIO_OUTPUT = "ISTIO_OUTPUT"
ISTIO_POSTRT = "ISTIO_POSTRT"
POD_CHAINS = (ISTIO_PRERT, ISTIO_OUTPUT)
HOST_CHAINS = (ISTIO_POSTRT,)

TCP = L4Protocol("tcp")
UDP = L4Protocol("udp")
ZTUNNEL_PACKET = Mark(INPOD_MARK, mask=INPOD_MASK)  # ztunnel's own sockets carry 0x539/0xfff
NOT_ZTUNNEL_PACKET = Mark(INPOD_MARK, negate=True, mask=INPOD_MASK)
ACCEPT = Verdict("ACCEPT")
RETURN = Verdict("RETURN")


def _probe_address(config: AmbientConfig, family: Family) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    address = config.host_probe_snat_ipv4 if family is Family.V4 else config.host_probe_snat_ipv6
    return ipaddress.ip_network(address)


def families(config: AmbientConfig) -> tuple[Family, ...]:
    return (Family.V4, Family.V6) if config.enable_ipv6 else (Family.V4,)


def pod_ruleset(config: AmbientConfig, family: Family) -> RuleSet:
    """The in-pod rules of one family, in Istio's order (its goldens' line order)."""
    rules = RuleSet(family)
    dns = config.dns_capture
    loopback = family.loopback

    # Jumps from the built-in chains into ours (appended: foreign rules before them run first).
    rules.append("mangle", "PREROUTING", target=Jump(ISTIO_PRERT))
    rules.append("mangle", "OUTPUT", target=Jump(ISTIO_OUTPUT))
    rules.append("nat", "OUTPUT", target=Jump(ISTIO_OUTPUT))
    if dns:
        rules.append("raw", "PREROUTING", target=Jump(ISTIO_PRERT))
        rules.append("raw", "OUTPUT", target=Jump(ISTIO_OUTPUT))
    rules.append("nat", "PREROUTING", target=Jump(ISTIO_PRERT))

    # Virtual interfaces (VMs, DinD): their incoming TCP is outbound traffic of the pod.
    for name in config.virtual_interfaces:
        rules.append("nat", ISTIO_PRERT, Interface("in", name), TCP, target=Redirect(ZTUNNEL_OUTBOUND_PORT))
        rules.append("nat", ISTIO_PRERT, Interface("in", name), TCP, target=RETURN)

    # A packet from ztunnel marks its connection 0x111, so replies find their way back (ip rule).
    rules.append("mangle", ISTIO_PRERT, ZTUNNEL_PACKET,
                 target=ConnMarkSet(INPOD_TPROXY_MARK, INPOD_TPROXY_MASK))

    probe = _probe_address(config, family)
    if not config.ingress_mode:
        # Kubelet probes arrive SNATed to the probe address: they go to the app directly.
        rules.append("nat", ISTIO_PRERT, Address("src", probe), TCP, ProtocolModule("tcp"), target=ACCEPT)
    rules.append("nat", ISTIO_OUTPUT, Address("dst", probe), TCP, ProtocolModule("tcp"), target=ACCEPT)

    if not config.ingress_mode:
        # Inbound TCP (not HBONE on 15008, not from ztunnel) goes to ztunnel's plain-text port.
        rules.append("nat", ISTIO_PRERT, Address("dst", loopback, negate=True), TCP,
                     Ports("dst", (ZTUNNEL_INBOUND_PORT,), negate=True), NOT_ZTUNNEL_PACKET,
                     target=Redirect(ZTUNNEL_INBOUND_PLAINTEXT_PORT))

    rules.append("mangle", ISTIO_OUTPUT, ConnMark(INPOD_TPROXY_MARK, mask=INPOD_TPROXY_MASK),
                 target=ConnMarkRestore(INPOD_RESTORE_MASK, INPOD_RESTORE_MASK))

    if dns:
        rules.append("nat", ISTIO_OUTPUT, Interface("out", "lo", negate=True), UDP, NOT_ZTUNNEL_PACKET,
                     ProtocolModule("udp"), Ports("dst", (DNS_PORT,)), target=Redirect(DNS_CAPTURE_PORT))
        rules.append("nat", ISTIO_OUTPUT, Address("dst", loopback, negate=True), TCP, Ports("dst", (DNS_PORT,)),
                     NOT_ZTUNNEL_PACKET, target=Redirect(DNS_CAPTURE_PORT))
        # ztunnel's queries upstream and their answers get a conntrack zone of their own (istio#33469).
        rules.append("raw", ISTIO_OUTPUT, UDP, ZTUNNEL_PACKET, ProtocolModule("udp"), Ports("dst", (DNS_PORT,)),
                     target=CtZone(DNS_CONNTRACK_ZONE))
        rules.append("raw", ISTIO_PRERT, UDP, NOT_ZTUNNEL_PACKET, ProtocolModule("udp"), Ports("src", (DNS_PORT,)),
                     target=CtZone(DNS_CONNTRACK_ZONE))

    # Replies of connections ztunnel accepted, app to itself over lo, then everything else to 15001.
    rules.append("nat", ISTIO_OUTPUT, TCP, Mark(INPOD_TPROXY_MARK, mask=INPOD_TPROXY_MASK), target=ACCEPT)
    rules.append("nat", ISTIO_OUTPUT, Address("dst", loopback, negate=True), Interface("out", "lo"), target=ACCEPT)
    rules.append("nat", ISTIO_OUTPUT, Address("dst", loopback, negate=True), TCP, NOT_ZTUNNEL_PACKET,
                 target=Redirect(ZTUNNEL_OUTBOUND_PORT))
    return rules


def host_ruleset(config: AmbientConfig, family: Family) -> RuleSet:
    """The node's rules of one family: SNAT kubelet's probes to enrolled pods to the probe address.

    ``--socket-exists`` singles out packets of local processes (kubelet) from forwarded ones
    (kube-proxy's), and the probe set holds the addresses of the node's ambient pods.
    """
    rules = RuleSet(family)
    rules.insert("nat", "POSTROUTING", 1, target=Jump(ISTIO_POSTRT))
    probe_set, address = (
        (PROBE_SET_V4, config.host_probe_snat_ipv4) if family is Family.V4
        else (PROBE_SET_V6, config.host_probe_snat_ipv6)
    )
    rules.append("nat", ISTIO_POSTRT, SocketExists(), TCP, SetMatch(probe_set, "dst"), target=Snat(address))
    return rules


def rulesets(config: AmbientConfig) -> tuple[RuleSet, ...]:
    build = host_ruleset if config.scope == "host" else pod_ruleset
    return tuple(build(config, family) for family in families(config))


def build_plan(config: AmbientConfig) -> Plan:
    """The run's plan: the rules of each family, the in-pod policy routing (Istio's ``ip rule`` and
    table 100: replies of connections ztunnel accepted go back through lo), and for the node the
    probe sets' ``ipset restore`` input (created if missing; members changed only as asked)."""
    if config.scope == "host":
        return Plan(rulesets(config), ipset_document=probe_ipset_document(config))
    routes = TproxyRoutes(
        mark=INPOD_TPROXY_MARK,
        table=ROUTE_TABLE_INBOUND,
        families=families(config),
        mask=INPOD_TPROXY_MASK,
        priority=INPOD_RULE_PRIORITY,
        v6_route_only_with_lo_ipv6=True,
    )
    return Plan(rulesets(config), routes=routes)


# --- what is ours in a live namespace (the footprints' claims, policy/footprint.py) ----------------

POD_OWN_CHAINS = frozenset(POD_CHAINS)
HOST_OWN_CHAINS = frozenset(HOST_CHAINS)


def claim_pod(dump: SaveDump, wanted: TableState | None, family: Family) -> TableState:
    """The in-pod part of one family: ISTIO_PRERT and ISTIO_OUTPUT whole, and the jumps into them.

    Only called where no sidecar rules are (the engine refuses a namespace holding both modes'), so
    ISTIO_OUTPUT, a name both modes use, is ambient's here.
    """
    from istio_iptables.xtables.reconcile import chains_and_jumps

    return chains_and_jumps(dump, wanted, family, POD_OWN_CHAINS)


def claim_host(dump: SaveDump, wanted: TableState | None, family: Family) -> TableState:
    """The node's part of one family: nat ISTIO_POSTRT and the POSTROUTING jump into it."""
    from istio_iptables.xtables.reconcile import chains_and_jumps

    return chains_and_jumps(dump, wanted, family, HOST_OWN_CHAINS)


def no_tproxy_mark(_mangle: object) -> None:
    """Ambient's routing mark is fixed (0x111/0xfff, :func:`build_plan`): nothing to read from live rules."""
    return None


# --- what a dry run shows besides the rules ---------------------------------------------------------


def probe_ipset_document(config: AmbientConfig) -> str:
    """``ipset restore`` input creating the probe sets if missing (``-exist``: members are kept), and
    the node agent's per-pod update: entries commented with the pod's UID (as Istio's), idempotent."""
    lines = []
    for family in families(config):
        name, inet = (PROBE_SET_V4, "inet") if family is Family.V4 else (PROBE_SET_V6, "inet6")
        lines.append(f"create {name} hash:ip family {inet} comment -exist")
    lines += [f'add {probe_set(address)} {address} comment "{config.pod_uid}" -exist' for address in config.enrol]
    lines += [f"del {probe_set(address)} {address} -exist" for address in config.unenrol]
    return "\n".join(lines) + "\n"


def probe_set(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """The node's probe set holding a pod address of this family (ipset and nft set alike)."""
    return PROBE_SET_V6 if address.version == 6 else PROBE_SET_V4


def routing_commands(routes: TproxyRoutes) -> list[str]:
    """The in-pod policy routing as ``ip`` commands (a dry run shows them as comments)."""
    commands = []
    for family in routes.families:
        flag = "-6 " if family is Family.V6 else ""
        commands.append(
            f"ip {flag}rule add fwmark {routes.mark:#x}/{routes.mask:#x} pref {routes.priority} lookup {routes.table}"
        )
    for family in routes.families:
        flag, default = ("-6 ", "::/0") if family is Family.V6 else ("", "0.0.0.0/0")
        commands.append(f"ip {flag}route replace local {default} dev lo table {routes.table}")
    return commands
