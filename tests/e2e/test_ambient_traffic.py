"""Ambient capture with live traffic: our rules (loaded from the dry run) in a pod with a ztunnel
stand-in (every socket marked 0x539), on legacy, nft and native nft, IPv4 and IPv6.

Each landing says which listener accepted a connection first and what original destination it
recovered, so every check is about where packets went, not about rule text.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.beds.testbed import APP_PORT, FAMILIES, endpoint
from tests.support.ambient_support import ambient_testbed
from tests.support.netns import NetNS

BACKENDS = ("legacy", "nft", "native-nftables")
PROBE_SNAT = {4: "169.254.7.127", 6: "fd16:9254:7127:1337:ffff:ffff:ffff:ffff"}


@pytest.fixture(params=BACKENDS)
def bed(request: pytest.FixtureRequest, netns_factory: Callable[[str], NetNS]) -> Iterator[Any]:
    testbed = ambient_testbed(request.param, netns_factory)
    try:
        yield testbed
    finally:
        testbed.close()


def test_pod_traffic_lands_where_istios_design_says(bed: Any) -> None:
    bed.load("--redirect-dns", "--enable-ipv6")
    for family in FAMILIES:
        # app -> a remote service: ztunnel's outbound port, with the original destination, then the service.
        out = bed.connect("app", family.service, 80)
        assert out.listener == "ztunnel:15001", out
        assert out.original_dst == endpoint(family.service, 80)
        assert out.path == ("ztunnel:15001", "remote:80") and out.ok, out
        # remote -> the pod's port: ztunnel's inbound plain-text port, then the app (ztunnel's own
        # connection to it is marked, so never captured again).
        inbound = bed.connect("remote", family.pod, APP_PORT)
        assert inbound.path == ("ztunnel:15006", f"app:{APP_PORT}") and inbound.ok, inbound
        assert inbound.original_dst == endpoint(family.pod, APP_PORT)
        # HBONE to 15008 is not redirected.
        hbone = bed.connect("remote", family.pod, 15008)
        assert hbone.path == ("ztunnel:15008",), hbone
        # ztunnel's own connections go straight out.
        direct = bed.connect("ztunnel", family.service, 80)
        assert direct.path == ("remote:80",), direct
        # the app to itself over lo is not captured.
        itself = bed.connect("app", family.pod, APP_PORT)
        assert itself.path == (f"app:{APP_PORT}",), itself
        # DNS, UDP and TCP, to ztunnel's DNS port.
        for proto in ("udp", "tcp"):
            dns = bed.dns("app", family.dns, proto)
            assert dns.listener == "ztunnel:15053", (proto, dns)


def test_ztunnels_dns_upstream_gets_conntrack_zone_1(bed: Any) -> None:
    bed.load("--redirect-dns", "--enable-ipv6")
    for family in FAMILIES:
        upstream = bed.dns("ztunnel", family.dns, "udp")
        assert upstream.listener == "remote:53", upstream
        entries = bed.pod.run("conntrack", "-L", "-f", f"ipv{family.version}", "-p", "udp", "--dport", "53",
                              check=False).stdout
        assert any(f"dst={family.dns}" in line and "zone=1" in line for line in entries.splitlines()), entries


@pytest.mark.parametrize(("argv", "captured"), [
    (("--redirect-dns=false",), False),
    (("--redirect-dns=false", "--pod-dns", "enabled"), True),
    (("--redirect-dns", "--pod-dns", "disabled"), False),
])
def test_dns_capture_follows_the_pod_annotation_over_the_global_setting(
    bed: Any, argv: tuple[str, ...], captured: bool
) -> None:
    bed.load(*argv, "--enable-ipv6")
    for family in FAMILIES:
        landing = bed.dns("app", family.dns, "udp")
        assert landing.listener == ("ztunnel:15053" if captured else "remote:53"), landing


def test_ingress_mode_and_virtual_interfaces(bed: Any) -> None:
    bed.load("--ingress-mode", "--virtual-interfaces", "eth1", "--enable-ipv6")
    for family in FAMILIES:
        # ingress mode: nothing inbound is captured.
        inbound = bed.connect("remote", family.pod, APP_PORT)
        assert inbound.path == (f"app:{APP_PORT}",), inbound
        # a virtual interface's incoming TCP is outbound traffic: ztunnel's 15001.
        virtual = bed.connect("remote", family.pod_side, APP_PORT)
        assert virtual.listener == "ztunnel:15001", virtual
        assert virtual.original_dst == endpoint(family.pod_side, APP_PORT)
        # outbound is captured as ever.
        assert bed.connect("app", family.service, 80).listener == "ztunnel:15001"


def test_kubelet_probe_snated_by_the_host_rules_reaches_the_app_directly(bed: Any) -> None:
    bed.load("--enable-ipv6")
    # Without the host rules, the node's connection is captured like any other inbound one.
    assert bed.connect("remote", FAMILIES[0].pod, APP_PORT).listener == "ztunnel:15006"
    host = ["--host", "--enable-ipv6"] + (["--kubelet-uid", "0"] if bed.backend == "native-nftables" else [])
    # The node's rules, and the pod's addresses in the probe sets as the node agent enrols them.
    pods = ",".join(family.pod for family in FAMILIES)
    bed.load(*host, "--enrol", pods, "--pod-uid", "0b1c2d3e-pod", namespace=bed.remote)
    for family in FAMILIES:
        probe = bed.connect("remote", family.pod, APP_PORT)
        assert probe.path == (f"app:{APP_PORT}",), probe
        assert probe.hops[0].peer_host == PROBE_SNAT[family.version], probe
