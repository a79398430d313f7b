"""Ambient mode as native nftables: the same policy as :mod:`ambient_xtables`, in Istio's nft form.

Istio's ``cni/pkg/nftables/nftables.go`` writes three ``inet`` tables of its own
(``istio-ambient-nat``, ``-mangle``, ``-raw``) holding base chains ``prerouting``/``output`` that
jump into ``istio-prerouting``/``istio-output``; the node's rules are one ``postrouting`` chain in
``istio-ambient-nat``, matching the probe sets ``@istio-inpod-probes-v4/-v6`` of that table (which the
node agent creates once and fills per pod: they are not replaced with the rules). One ``inet``
rule serves both families unless it names an address, so IPv6 adds only the address rules.
Rendered by the same nft renderer as the sidecar's tables. Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
import re

from istio_iptables.config.ambient import (
    DNS_CAPTURE_PORT,
    DNS_CONNTRACK_ZONE,
    DNS_PORT,
    INPOD_MARK,
    INPOD_MASK,
    INPOD_TPROXY_MARK,
    INPOD_TPROXY_MASK,
    PROBE_SET_V4,
    PROBE_SET_V6,
    ZTUNNEL_INBOUND_PLAINTEXT_PORT,
    ZTUNNEL_INBOUND_PORT,
    ZTUNNEL_OUTBOUND_PORT,
    AmbientConfig,
)
from istio_iptables.net import Family
from istio_iptables.nft.model import (
    NFT_ACCEPT,
    NFT_RETURN,
    Addr,
    AddrInSet,
    Chain,
    ChainHook,
    CtMarkIs,
    IfName,
    JumpTo,
    L4Proto,
    MarkIs,
    NftRuleset,
    NftTable,
    Port,
    RedirectTo,
    RestoreMarkFromConnection,
    SetCtMarkBits,
    SetCtZone,
    SnatTo,
    SocketOwner,
)
from istio_iptables.nft.names import AMBIENT_MANGLE, AMBIENT_NAT, AMBIENT_RAW, AMBIENT_TABLES
from istio_iptables.policy.ambient_xtables import families, probe_set

__all__ = ["AMBIENT_TABLES", "host_ruleset", "pod_ruleset", "probe_set_lines", "render_ambient_script", "ruleset"]

PREROUTING, OUTPUT, POSTROUTING = "prerouting", "output", "postrouting"
ISTIO_PREROUTING, ISTIO_OUTPUT = "istio-prerouting", "istio-output"

# Chains of each pod table in Istio's declaration order (the kernel lists them in creation order).
POD_LAYOUT: dict[str, tuple[tuple[str, ChainHook | None], ...]] = {
    AMBIENT_NAT: (
        (PREROUTING, ChainHook("nat", "prerouting", -100)),
        (OUTPUT, ChainHook("nat", "output", -100)),
        (ISTIO_PREROUTING, None),
        (ISTIO_OUTPUT, None),
    ),
    AMBIENT_MANGLE: (
        (PREROUTING, ChainHook("filter", "prerouting", -150)),
        (OUTPUT, ChainHook("route", "output", -150)),  # a route chain: a restored mark re-routes the packet
        (ISTIO_PREROUTING, None),
        (ISTIO_OUTPUT, None),
    ),
    AMBIENT_RAW: (
        (PREROUTING, ChainHook("filter", "prerouting", -300)),
        (OUTPUT, ChainHook("filter", "output", -300)),
        (ISTIO_PREROUTING, None),
        (ISTIO_OUTPUT, None),
    ),
}
HOST_LAYOUT: dict[str, tuple[tuple[str, ChainHook | None], ...]] = {
    AMBIENT_NAT: ((POSTROUTING, ChainHook("nat", "postrouting", 100)),),
}

TCP = L4Proto("tcp")
ZTUNNEL_PACKET = MarkIs(INPOD_MARK, mask=INPOD_MASK)
NOT_ZTUNNEL_PACKET = MarkIs(INPOD_MARK, negate=True, mask=INPOD_MASK)
LOOPBACK = {Family.V4: ipaddress.ip_network("127.0.0.1/32"), Family.V6: ipaddress.ip_network("::1/128")}


def _ruleset(layout: dict[str, tuple[tuple[str, ChainHook | None], ...]]) -> NftRuleset:
    tables = {
        name: NftTable(name, {chain: Chain(chain, hook) for chain, hook in chains}) for name, chains in layout.items()
    }
    return NftRuleset(tables=tables)


def _probe(config: AmbientConfig, family: Family) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(config.host_probe_snat_ipv4 if family is Family.V4 else config.host_probe_snat_ipv6)


def pod_ruleset(config: AmbientConfig) -> NftRuleset:
    """The in-pod tables, rule for rule as Istio's nft goldens list them."""
    nft = _ruleset(POD_LAYOUT)
    dns = config.dns_capture
    versions = families(config)

    def per_family(table: str, chain: str, build: object, *, then: object) -> None:
        for family in versions:
            nft.append(table, chain, *build(family), then=then)  # type: ignore[operator]

    nft.append(AMBIENT_NAT, OUTPUT, then=JumpTo(ISTIO_OUTPUT), counter=False)
    nft.append(AMBIENT_NAT, PREROUTING, then=JumpTo(ISTIO_PREROUTING), counter=False)
    for name in config.virtual_interfaces:
        nft.append(AMBIENT_NAT, ISTIO_PREROUTING, IfName("in", name), TCP, then=RedirectTo(ZTUNNEL_OUTBOUND_PORT))
        nft.append(AMBIENT_NAT, ISTIO_PREROUTING, IfName("in", name), TCP, then=NFT_RETURN)
    if not config.ingress_mode:
        per_family(AMBIENT_NAT, ISTIO_PREROUTING, lambda f: (TCP, Addr("saddr", _probe(config, f))), then=NFT_ACCEPT)
    per_family(AMBIENT_NAT, ISTIO_OUTPUT, lambda f: (TCP, Addr("daddr", _probe(config, f))), then=NFT_ACCEPT)
    if not config.ingress_mode:
        per_family(AMBIENT_NAT, ISTIO_PREROUTING, lambda f: (
            Addr("daddr", LOOPBACK[f], negate=True), Port("tcp", "dport", (ZTUNNEL_INBOUND_PORT,), negate=True),
            NOT_ZTUNNEL_PACKET), then=RedirectTo(ZTUNNEL_INBOUND_PLAINTEXT_PORT))
    if dns:
        nft.append(AMBIENT_NAT, ISTIO_OUTPUT, IfName("out", "lo", negate=True), NOT_ZTUNNEL_PACKET,
                   Port("udp", "dport", (DNS_PORT,)), then=RedirectTo(DNS_CAPTURE_PORT))
        per_family(AMBIENT_NAT, ISTIO_OUTPUT, lambda f: (
            Addr("daddr", LOOPBACK[f], negate=True), Port("tcp", "dport", (DNS_PORT,)), NOT_ZTUNNEL_PACKET),
            then=RedirectTo(DNS_CAPTURE_PORT))
    nft.append(AMBIENT_NAT, ISTIO_OUTPUT, TCP, MarkIs(INPOD_TPROXY_MARK, mask=INPOD_TPROXY_MASK), then=NFT_ACCEPT)
    per_family(AMBIENT_NAT, ISTIO_OUTPUT, lambda f: (IfName("out", "lo"), Addr("daddr", LOOPBACK[f], negate=True)),
               then=NFT_ACCEPT)
    per_family(AMBIENT_NAT, ISTIO_OUTPUT, lambda f: (TCP, Addr("daddr", LOOPBACK[f], negate=True),
                                                     NOT_ZTUNNEL_PACKET), then=RedirectTo(ZTUNNEL_OUTBOUND_PORT))

    nft.append(AMBIENT_MANGLE, PREROUTING, then=JumpTo(ISTIO_PREROUTING), counter=False)
    nft.append(AMBIENT_MANGLE, OUTPUT, then=JumpTo(ISTIO_OUTPUT), counter=False)
    nft.append(AMBIENT_MANGLE, ISTIO_PREROUTING, ZTUNNEL_PACKET,
               then=SetCtMarkBits(INPOD_TPROXY_MARK, INPOD_TPROXY_MASK))
    nft.append(AMBIENT_MANGLE, ISTIO_OUTPUT, CtMarkIs(INPOD_TPROXY_MARK, mask=INPOD_TPROXY_MASK),
               then=RestoreMarkFromConnection())

    if dns:
        nft.append(AMBIENT_RAW, PREROUTING, then=JumpTo(ISTIO_PREROUTING), counter=False)
        nft.append(AMBIENT_RAW, OUTPUT, then=JumpTo(ISTIO_OUTPUT), counter=False)
        nft.append(AMBIENT_RAW, ISTIO_OUTPUT, Port("udp", "dport", (DNS_PORT,)), ZTUNNEL_PACKET,
                   then=SetCtZone(DNS_CONNTRACK_ZONE))
        nft.append(AMBIENT_RAW, ISTIO_PREROUTING, Port("udp", "sport", (DNS_PORT,)), NOT_ZTUNNEL_PACKET,
                   then=SetCtZone(DNS_CONNTRACK_ZONE))
    return nft


def host_ruleset(config: AmbientConfig) -> NftRuleset:
    """The node's probe SNAT: kubelet's (``skuid``) TCP to an enrolled pod leaves from the probe address.

    nft has no ``--socket-exists``; Istio matches the kubelet's uid instead (its nftables.go explains why).
    """
    if config.kubelet_uid is None:
        raise ValueError("the native nftables host rules need the kubelet's uid")
    nft = _ruleset(HOST_LAYOUT)
    kubelet = SocketOwner("uid", str(config.kubelet_uid))
    for family in families(config):
        version, probe_set, address = (
            (4, PROBE_SET_V4, config.host_probe_snat_ipv4) if family is Family.V4
            else (6, PROBE_SET_V6, config.host_probe_snat_ipv6)
        )
        nft.append(AMBIENT_NAT, POSTROUTING, TCP, kubelet, AddrInSet("daddr", version, 32 if version == 4 else 128,
                                                                     probe_set), then=SnatTo(address))
    return nft


def ruleset(config: AmbientConfig) -> NftRuleset:
    return host_ruleset(config) if config.scope == "host" else pod_ruleset(config)


PROBE_SET_COMMENT = '"ambient pods: kubelet probes are SNATed"'


def probe_set_lines(config: AmbientConfig) -> list[str]:
    """Create the probe sets if missing (``add`` keeps an existing set and its members): the node
    agent fills them per pod, so a run of the host rules must never empty them."""
    lines = [f"add table inet {AMBIENT_NAT}"]
    for family in families(config):
        name, kind = (PROBE_SET_V4, "ipv4_addr") if family is Family.V4 else (PROBE_SET_V6, "ipv6_addr")
        lines.append(f"add set inet {AMBIENT_NAT} {name} {{ type {kind} ; comment {PROBE_SET_COMMENT} ; }}")
    # The node agent's per-pod update (Istio: an element commented with the pod's UID). Adding before
    # deleting makes the delete valid when the element is absent (the transaction would fail otherwise).
    for address in config.enrol:
        lines.append(f'add element inet {AMBIENT_NAT} {probe_set(address)} {{ {address} comment "{config.pod_uid}" }}')
    for address in config.unenrol:
        target = f"inet {AMBIENT_NAT} {probe_set(address)} {{ {address} }}"
        lines += [f"add element {target}", f"delete element {target}"]
    return lines


def render_ambient_script(config: AmbientConfig) -> str:
    """The whole ``nft -f`` script of a dry run: (host) the probe sets, then our tables replaced."""
    from istio_iptables.nft.render import HEADER, ruleset_lines

    nft = ruleset(config)
    lines: list[str] = []
    if config.scope == "host":
        lines += probe_set_lines(config)
    for table in nft.used_tables():
        lines += [f"add table inet {table.name}", f"flush table inet {table.name}"]
    lines += [line for line in ruleset_lines(nft) if not line.startswith("add table ")]
    return HEADER + "\n".join(lines) + "\n"


# Set names of ours inside our tables (the footprints' nft_set_name_pattern): the node's probe sets, none in a pod.
PROBE_SET_NAME = re.compile(f"{re.escape(PROBE_SET_V4)}|{re.escape(PROBE_SET_V6)}")
NO_SET_NAME = re.compile(r"(?!)")
