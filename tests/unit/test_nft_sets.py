"""Long lists as named sets in the native nftables backend, without a kernel."""

from __future__ import annotations

import ipaddress

import pytest

from istio_iptables.config.sidecar import CidrSelection, PortSelection
from istio_iptables.errors import ApplyError
from istio_iptables.nft.model import MANGLE, NAT, AddrInSet, NftSet, PortInSet
from istio_iptables.nft.render import match_text, render_script, set_lines
from istio_iptables.policy.lists import SET_THRESHOLD
from istio_iptables.policy.sidecar_nft import build_nft_ruleset
from istio_iptables.system import nft as system
from istio_iptables.xtables.render import RenderError
from tests.support.cli_support import nft_dry_run
from tests.support.conformance import Case, load_cases
from tests.support.sets_support import cidrs, config

CASES = [case for case in load_cases() if case.golden_nftables is not None]
V6_CIDRS = tuple(ipaddress.ip_network(f"fd00:{i:x}::/32") for i in range(100))


def script(**values: object) -> str:
    return render_script(build_nft_ruleset(config(**values)))


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_istio_cases_are_unchanged_by_auto_sets(case: Case) -> None:
    auto = nft_dry_run(case)
    assert auto == nft_dry_run(case, "--use-sets=never")
    assert "@" not in auto and "add set" not in auto


def test_long_cidr_lists_become_one_hash_set_per_family_and_prefix_length() -> None:
    mixed = (*cidrs(100), ipaddress.ip_network("192.0.2.0/28"), ipaddress.ip_network("10.0.0.0/8"))
    text = script(outbound_exclude=(*mixed, *V6_CIDRS), enable_ipv6=True)
    v4 = [line for line in text.splitlines() if "istio-v4-out-excl-24" in line]
    assert v4[0] == f"add set inet {NAT} istio-v4-out-excl-24 {{ type ipv4_addr ; }}"
    assert v4[1] == f"flush set inet {NAT} istio-v4-out-excl-24"
    assert v4[2].startswith(f"add element inet {NAT} istio-v4-out-excl-24 {{ 10.0.0.0, 10.0.1.0,")
    assert v4[2].endswith("10.0.99.0 }") and len(v4) == 4  # declare, flush, fill, one rule
    rules = [line.split(" istio-output ")[1] for line in text.splitlines() if "out-excl" in line and "add rule" in line]
    assert rules == [
        "ip daddr & 255.0.0.0 @istio-v4-out-excl-8 counter return",
        "ip daddr & 255.255.255.0 @istio-v4-out-excl-24 counter return",
        "ip daddr & 255.255.255.240 @istio-v4-out-excl-28 counter return",
        "ip6 daddr & ffff:ffff:: @istio-v6-out-excl-32 counter return",
    ]
    assert "add element inet istio-proxy-nat istio-v6-out-excl-32 { fd00::, fd00:1::," in text
    assert "ip daddr 10." not in text


def test_a_host_route_needs_no_mask_and_a_catch_all_becomes_two_halves() -> None:
    hosts = tuple(ipaddress.ip_network(f"10.0.0.{i}/32") for i in range(100))
    text = script(outbound_exclude=(*hosts, ipaddress.ip_network("0.0.0.0/0")))
    assert "istio-output ip daddr @istio-v4-out-excl-32 counter return" in text
    assert "ip daddr & 128.0.0.0 @istio-v4-out-excl-1 counter return" in text
    assert "istio-v4-out-excl-1 { 0.0.0.0, 128.0.0.0 }" in text


def test_short_lists_keep_one_rule_per_entry_unless_always() -> None:
    short = cidrs(SET_THRESHOLD)
    assert script(outbound_exclude=short).count("ip daddr 10.") == SET_THRESHOLD
    assert "add set" not in script(outbound_exclude=short)
    assert "@istio-v4-out-excl-24" in script(outbound_exclude=cidrs(1), use_sets="always")
    never = script(outbound_exclude=cidrs(5000), use_sets="never")
    assert never.count("ip daddr 10.") == 5000 and "add set" not in never


def test_port_lists_become_inet_service_sets_shared_by_tcp_and_udp() -> None:
    ports = tuple(range(20000, 20100))
    text = script(outbound_ports_exclude=ports, outbound_ports_include=(*ports, 8080), inbound_exclude_ports=ports)
    assert f"add set inet {NAT} istio-port-out-excl {{ type inet_service ; flags interval ; }}" in text
    assert "istio-port-out { 8080, 20000-20099 }" in text
    assert "tcp dport @istio-port-out-excl counter return" in text
    assert "udp dport @istio-port-out-excl counter return" in text
    assert "tcp dport @istio-port-out counter jump" in text and "tcp dport @istio-port-in-excl counter" in text


def test_included_cidrs_and_inbound_ports_sets_sit_in_the_table_that_matches_them() -> None:
    text = script(
        outbound_include=CidrSelection(cidrs=cidrs(100)),
        virt_interfaces=("veth0",),
        inbound_ports=PortSelection(ports=tuple(range(1000, 1100))),
        mode="TPROXY",
    )
    assert 'iifname "veth0" ip daddr & 255.255.255.0 @istio-v4-out-incl-24 ' in text
    assert "istio-output ip daddr & 255.255.255.0 @istio-v4-out-incl-24 counter jump" in text
    assert f"add set inet {MANGLE} istio-port-in " in text
    assert text.count("tcp dport @istio-port-in ") == 2  # established -> divert, new -> tproxy
    assert f"add set inet {NAT} istio-port-in " not in text


def test_multiport_writes_a_long_port_list_as_one_anonymous_set() -> None:
    text = script(outbound_ports_include=tuple(range(2000, 2100)), outbound_exclude=cidrs(100), use_sets="multiport")
    assert "add set" not in text and "@" not in text
    assert text.count("tcp dport { 2000, 2001,") == 1 and text.count("ip daddr 10.") == 100


@pytest.mark.parametrize(
    "named",
    [
        NftSet("istio-v4-out-excl-1c9a02f3", "ipv4_addr", cidrs(1)),  # not a name of ours
        NftSet("istio-v4-out-excl", "ipv4_addr", cidrs(1)),
        NftSet("x; delete table inet filter", "ipv4_addr", cidrs(1)),
        NftSet("istio-v4-out-excl-24", "ipv4_addr", ("10.0.0.0/8 } ; flush ruleset ; {",)),  # type: ignore[arg-type]
        NftSet("istio-v4-out-excl-32", "ipv4_addr", V6_CIDRS[:1]),  # the wrong family
        NftSet("istio-v4-out-excl-24", "ipv4_addr", (*cidrs(1), ipaddress.ip_network("10.0.0.0/8"))),  # two lengths
        NftSet("istio-v4-out-excl-24", "ipv4_addr", ()),
        NftSet("istio-port-in", "inet_service", (0,)),
        NftSet("istio-port-in", "inet_service", ("80 }",)),  # type: ignore[arg-type]
        NftSet("istio-port-in", "ipv4_addr; flush ruleset", (80,)),  # type: ignore[arg-type]
    ],
)
def test_sets_render_only_our_names_and_typed_members(named: NftSet) -> None:
    with pytest.raises(RenderError):
        set_lines(NAT, named)


@pytest.mark.parametrize(
    "match",
    [
        AddrInSet("daddr", 4, 24, "filter-set"),
        AddrInSet("daddr", 4, 24, "@x"),
        AddrInSet("daddr", 4, 33, "istio-v4-out-excl-24"),
        AddrInSet("daddr", 4, 0, "istio-v4-out-excl-24"),
        PortInSet("tcp", "dport", "istio-port-in }"),
    ],
)
def test_set_matches_name_only_our_sets(match: AddrInSet | PortInSet) -> None:
    with pytest.raises(RenderError):
        match_text(match)


def test_our_sets_are_kept_to_put_them_back_and_foreign_ones_left_alone() -> None:
    state = system.NamespaceState()
    listing = [
        {"table": {"family": "inet", "name": NAT, "handle": 1}},
        {"set": {"family": "inet", "table": NAT, "name": "istio-port-in", "type": "inet_service"}},
        {"set": {"family": "inet", "table": "filter", "name": "blocked", "type": "ipv4_addr"}},
    ]
    system.parse_nft_listing(listing, state)
    assert [next(iter(entry)) for entry in state.our_objects] == ["table", "set"]


def test_a_rerun_keeps_a_live_table_with_sets_and_refills_them_in_place() -> None:
    ruleset = build_nft_ruleset(config(outbound_exclude=cidrs(100)))
    held = {NAT: (["prerouting", "output", "istio-output", "istio-old"], ["istio-v4-out-excl-24", "istio-port-out"])}
    lines = render_script(ruleset, present=[NAT, MANGLE], held=held).splitlines()[1:]
    assert lines[:6] == [
        f"add table inet {MANGLE}",
        f"delete table inet {MANGLE}",  # no sets in it: replaced whole, as before
        f"flush table inet {NAT}",
        f"delete chain inet {NAT} istio-old",
        f"delete set inet {NAT} istio-port-out",
        f"add table inet {NAT}",
    ]
    assert f"delete table inet {NAT}" not in lines
    assert lines[6:9] == [
        f"add set inet {NAT} istio-v4-out-excl-24 {{ type ipv4_addr ; }}",
        f"flush set inet {NAT} istio-v4-out-excl-24",
        lines[8],
    ]
    # Without sets in the new rules the table goes as a whole, whatever it held.
    plain = render_script(build_nft_ruleset(config()), present=[NAT], held=held)
    assert f"delete table inet {NAT}" in plain and "flush table" not in plain


def test_names_read_back_from_the_kernel_are_checked_before_use() -> None:
    state = system.NamespaceState(our_tables=[NAT])
    state.our_objects = [
        {"chain": {"family": "inet", "table": NAT, "name": "istio-output"}},
        {"set": {"family": "inet", "table": NAT, "name": "istio-port-out"}},
    ]
    assert state.held() == {NAT: (["istio-output"], ["istio-port-out"])}
    state.our_objects.append({"set": {"family": "inet", "table": NAT, "name": "x ; flush ruleset"}})
    with pytest.raises(ApplyError):
        state.held()


def test_the_family_of_a_cidr_set_follows_the_family() -> None:
    ruleset = build_nft_ruleset(config(outbound_exclude=V6_CIDRS, enable_ipv6=True))
    [named] = ruleset.tables[NAT].sets.values()
    assert named.type == "ipv6_addr" and named.name.startswith("istio-v6-")
