"""Set-based rules in a kernel (iptables backends): excluded destinations bypass the proxy, included
ones reach it; sets live and die with the rules. The namespaces: tests/support/sets_support.py.
"""

from __future__ import annotations

import sys
from dataclasses import replace

import pytest

from istio_iptables.engine.xtables import apply
from istio_iptables.errors import IstioIptablesError
from istio_iptables.net import Family
from istio_iptables.policy.lists import set_name
from istio_iptables.policy.sidecar_xtables import build_plan
from istio_iptables.xtables.model import ISTIO_OUTPUT, CtZone, Rule, RuleSet
from tests.support.apply_support import config_of, inside
from tests.support.netns import NetNS
from tests.support.sets_support import EXCLUDED, INCLUDED, Pair, filler_cidrs, filler_ports


@pytest.mark.parametrize("backend", ["legacy", "nft", "native"])
def test_excluded_cidrs_in_a_set_bypass_and_the_rest_is_redirected(pair: Pair, backend: str) -> None:
    excluded = [*filler_cidrs(200), "198.51.100.0/24"]
    printed = pair.apply(backend, ["-i", "*", "-b", "*", "-x", ",".join(excluded)])
    assert ("@" if backend == "native" else "--match-set ") + "istio-v4-out-excl" in printed
    assert pair.ask(EXCLUDED, 80) == "direct"
    assert pair.ask(INCLUDED, 80) == "proxy"


@pytest.mark.parametrize("backend", ["legacy", "nft", "native"])
def test_included_cidrs_and_ports_in_sets_are_redirected_and_nothing_else(pair: Pair, backend: str) -> None:
    included = [*filler_cidrs(200), "203.0.113.0/24"]
    ports = [*filler_ports(100), "8080"]
    printed = pair.apply(backend, ["-i", ",".join(included), "-q", ",".join(ports), "-b", ""])
    assert "istio-v4-out-incl" in printed and "istio-port-out" in printed
    assert "add set" in printed if backend == "native" else "create istio-port-out-" in printed
    assert pair.ask(INCLUDED, 80) == "proxy"
    assert pair.ask(EXCLUDED, 8080) == "proxy"
    assert pair.ask(EXCLUDED, 80) == "direct"


@pytest.mark.parametrize("use_sets", ["always", "multiport"])
@pytest.mark.parametrize("backend", ["legacy", "nft", "native"])
def test_port_ranges_in_long_lists_are_matched_inside_and_only_inside(pair: Pair, backend: str, use_sets: str) -> None:
    """A set holds a range as its ports (ipset and nft take FIRST-LAST); multiport spells it FIRST:LAST."""
    ports = [*filler_ports(100), "8000:8100", "60:70"]
    printed = pair.apply(backend, ["-i", "", "-q", ",".join(ports), "-b", "", f"--use-sets={use_sets}"])
    if use_sets == "multiport":
        assert ("8000-8100" if backend == "native" else "8000:8100") in printed
    else:
        assert ("add element" if backend == "native" else "add istio-port-out-") in printed
        assert "8000-8100" in printed
    assert pair.ask(EXCLUDED, 8080) == "proxy"  # inside 8000:8100
    assert pair.ask(EXCLUDED, 80) == "direct"  # in no range (60:70 ends below it)


@pytest.mark.parametrize("backend", ["legacy", "nft"])
def test_sets_live_and_die_with_the_rules(netns: NetNS, backend: str) -> None:
    def run(*args: str) -> int:
        cli = [sys.executable, "-m", "istio_iptables", "-i", "*", "-b", "*", "--disable-ipv6"]
        return netns.run(*cli, "--force-iptables-binary", backend, *args, check=False).returncode

    def sets() -> list[str]:
        return netns.run("ipset", "list", "-n").stdout.split()

    first, second = ",".join(filler_cidrs(100)), ",".join(filler_cidrs(101))
    assert run("-x", first) == 0
    [name] = sets()
    assert f"--match-set {name} dst -j RETURN" in netns.run(f"iptables-{backend}-save").stdout
    assert run("-x", first) == 0 and sets() == [name]  # unchanged
    assert run("-x", second) == 3 and sets() == [name]  # another list: drift, nothing touched
    assert run("-x", second, "--reconcile") == 0
    [replaced] = sets()
    assert replaced != name
    assert run("-x", "10.0.0.0/8", "--reconcile") == 0 and sets() == []  # short list: no set left
    assert run("-x", first, "--reconcile") == 0 and sets() == [name]
    assert run("--cleanup-only") == 0 and sets() == []
    assert "ISTIO" not in netns.run(f"iptables-{backend}-save").stdout


@pytest.mark.parametrize("backend", ["legacy", "nft"])
def test_a_failed_apply_leaves_no_new_set_behind(netns: NetNS, backend: str) -> None:
    config = config_of(["-i", "*", "-b", "*", "--disable-ipv6", f"--force-iptables-binary={backend}"])
    with inside(netns):
        apply(config, build_plan(config))  # rules of ours without sets: they stay after the failure
    excluded = ",".join(filler_cidrs(100))
    config = config_of(["-i", "*", "-b", "*", "-x", excluded, "--disable-ipv6", f"--force-iptables-binary={backend}"])
    plan = build_plan(config)
    v4 = plan.rulesets[0]
    # CT is only valid in the raw table: the kernel refuses it in nat, after the set was loaded.
    broken = RuleSet(Family.V4, [*v4.rules, Rule("nat", ISTIO_OUTPUT, (), CtZone(1))], v4.sets)
    with inside(netns), pytest.raises(IstioIptablesError):
        apply(replace(config, reconcile=True), replace(plan, rulesets=(broken,)))
    assert netns.run("ipset", "list", "-n").stdout.split() == []
    assert "match-set" not in netns.run(f"iptables-{backend}-save").stdout


def test_ipsets_are_filled_atomically_replaced_and_removed(netns: NetNS) -> None:
    ports = set_name("port-in", (80, 443), None)
    script = (
        "from istio_iptables.system.ipset import Ipset\n"
        "from istio_iptables.net import Family; from istio_iptables.xtables.model import NamedSet\n"
        "from istio_iptables.policy.lists import set_name\n"
        "import ipaddress, sys\n"
        "nets = tuple(ipaddress.ip_network(c) for c in sys.argv[1].split(','))\n"
        "ipset = Ipset(referenced=sys.argv[2:])\n"
        "ipset.load([NamedSet(set_name('out-excl', nets, Family.V4), 'net', Family.V4, nets),\n"
        f"            NamedSet('{ports}', 'port', None, (80, 443))])\n"
        "print(len(ipset.own_sets()))\n"
        f"print(ipset.remove_stale(['{ports}']))\n"
        "print(sorted(ipset.own_sets()))\n"
    )
    first = netns.run(sys.executable, "-c", script, "10.0.0.0/8,192.0.2.0/24").stdout.splitlines()
    assert first == ["2", "[]", f"['{ports}']"]
    # A set someone edited (our rules match it) is refilled to exactly its members, while a rule matches it.
    netns.run("ipset", "add", ports, "9999")
    netns.run("iptables-nft-restore", "--noflush", input=(
        f"*nat\n:ISTIO_OUTPUT - [0:0]\n-A ISTIO_OUTPUT -p tcp -m set --match-set {ports} dst -j RETURN\nCOMMIT\n"
    ))
    netns.run(sys.executable, "-c", script, "10.0.0.0/8", ports)
    members = netns.run("ipset", "list", ports).stdout.split("Members:")[1].split()
    assert members == ["80", "443"]
    # In use: the kernel keeps it, and we say so instead of failing.
    kept = netns.run(
        sys.executable, "-c", "from istio_iptables.system.ipset import Ipset; print(Ipset().remove_stale([]))"
    )
    assert kept.stdout.strip() == f"['{ports}']"


def test_a_foreign_set_named_like_ours_is_not_ours(netns: NetNS) -> None:
    """istio-v4-out-excl-deadbeef holds members whose digest is not deadbeef: it is someone else's."""
    netns.run("ipset", "create", "istio-v4-out-excl-deadbeef", "hash:net", "family", "inet")
    netns.run("ipset", "add", "istio-v4-out-excl-deadbeef", "10.77.0.0/16")
    netns.run("ipset", "create", "istio-port-out-deadbeef-t", "bitmap:port", "range", "0-65535")
    before = netns.run("ipset", "save").stdout
    excluded = ",".join(filler_cidrs(100))
    for argv in (["-i", "*", "-x", excluded], ["-i", "*", "--reconcile"], ["--cleanup-only"]):
        result = netns.run(sys.executable, "-m", "istio_iptables", *argv, "--disable-ipv6", check=False)
        assert result.returncode == 0, result.stderr
        foreign = [line for line in netns.run("ipset", "save").stdout.splitlines() if "deadbeef" in line]
        assert foreign == [line for line in before.splitlines() if "deadbeef" in line], argv
    assert netns.run("ipset", "save").stdout == before


def test_explain_live_reads_our_ipsets(netns: NetNS) -> None:
    ports, cidrs = ",".join(filler_ports(100)), ",".join(filler_cidrs(100))
    netns.run(sys.executable, "-m", "istio_iptables", "-i", "", "-b", "*", "-q", ports, "-x", cidrs)

    def verdict(dst: str, port: int) -> str:
        explain = [sys.executable, "-m", "istio_iptables", "explain", "--live", "--dst", dst, "--dport", str(port)]
        return next(line for line in netns.run(*explain).stdout.splitlines() if line.startswith("Verdict:"))

    assert "redirected" in verdict("192.0.2.9", 20050)
    assert "passed through" in verdict("10.0.3.1", 20050) and "passed through" in verdict("192.0.2.9", 80)
