"""Long lists as sets (istio_iptables/policy/lists.py): when they are used, what they render, what they do."""

from __future__ import annotations

import ipaddress
import random
import re

import pytest

from istio_iptables.config.sidecar import CidrSelection, PortSelection
from istio_iptables.errors import EnvironmentProblem
from istio_iptables.net import Family
from istio_iptables.policy.lists import (
    SET_THRESHOLD,
    cidr_matches,
    ipset_entries,
    is_own_set,
    member_text,
    port_matches,
    render_ipset_destroy,
    render_ipset_restore,
    set_members,
    set_name,
)
from istio_iptables.policy.sidecar_xtables import build_plan
from istio_iptables.system import ipset
from istio_iptables.xtables.model import NamedSet, Ports, RuleSet, SetMatch
from istio_iptables.xtables.render import render_documents
from tests.support.cli_support import invoke
from tests.support.conformance import load_cases
from tests.support.fakes import FakeHost
from tests.support.sets_support import cidrs, config

V4 = Family.V4


def test_short_lists_keep_one_rule_per_entry_and_long_ones_become_one_set() -> None:
    for count, use_sets, expect_set in [
        (SET_THRESHOLD, "auto", False),
        (SET_THRESHOLD + 1, "auto", True),
        (1, "always", True),
        (5000, "never", False),
        (5000, "multiport", False),
        (0, "always", False),
    ]:
        rules = RuleSet(V4)
        matches = cidr_matches(use_sets, rules, "out-excl", cidrs(count))  # type: ignore[arg-type]
        if expect_set:
            assert matches == [SetMatch(next(iter(rules.sets)), "dst")]
            assert next(iter(rules.sets.values())).members == cidrs(count)
        else:
            assert len(matches) == count and not rules.sets


def test_port_lists_become_a_set_or_multiport_rules_of_at_most_15() -> None:
    ports = tuple(range(2000, 2100))
    rules = RuleSet(V4)
    [match] = port_matches("auto", rules, "port-out", ports)
    named = rules.sets[match.name]  # type: ignore[union-attr]
    assert named == NamedSet(match.name, "port", None, ports)  # type: ignore[union-attr]
    multiport = port_matches("multiport", RuleSet(V4), "port-out", ports)
    assert [len(m.ports) for m in multiport] == [15] * 6 + [10]  # type: ignore[union-attr]
    assert [p for m in multiport for p in m.ports] == list(ports)  # type: ignore[union-attr]
    assert port_matches("multiport", RuleSet(V4), "port-out", ports[:10]) == [Ports("dst", (p,)) for p in ports[:10]]


def test_set_names_are_ours_short_enough_and_change_with_the_members() -> None:
    one, other = set_name("port-in-excl", (1, 2), None), set_name("port-in-excl", (1, 3), None)
    assert one != other and is_own_set(one) and is_own_set(f"{one}-t")
    assert len(set_name("out-excl", cidrs(3), Family.V6)) <= 27 and len(one) <= 27
    assert re.fullmatch(r"istio-v4-out-excl-[0-9a-f]{8}", set_name("out-excl", cidrs(3), V4))
    assert not is_own_set("istio-v4-out-excl") and not is_own_set("kube-proxy-set")
    with pytest.raises(ValueError):
        render_ipset_destroy(["KUBE-CLUSTER-IP"])


def test_a_catch_all_cidr_becomes_its_two_halves() -> None:
    halves = set_members([ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("10.0.0.0/8")])
    assert [str(net) for net in halves] == ["0.0.0.0/1", "128.0.0.0/1", "10.0.0.0/8"]


def test_ipset_input_fills_new_sets_directly_and_swaps_existing_ones() -> None:
    named = NamedSet("istio-v4-out-excl-0000abcd", "net", V4, cidrs(2))
    assert render_ipset_restore([named]).splitlines() == [
        "create istio-v4-out-excl-0000abcd hash:net family inet hashsize 1024 maxelem 65536",
        "add istio-v4-out-excl-0000abcd 10.0.0.0/24",
        "add istio-v4-out-excl-0000abcd 10.0.1.0/24",
    ]
    assert render_ipset_restore([named], existing=[named.name]).splitlines() == [
        "create istio-v4-out-excl-0000abcd-t hash:net family inet hashsize 1024 maxelem 65536 -exist",
        "flush istio-v4-out-excl-0000abcd-t",
        "add istio-v4-out-excl-0000abcd-t 10.0.0.0/24",
        "add istio-v4-out-excl-0000abcd-t 10.0.1.0/24",
        "swap istio-v4-out-excl-0000abcd-t istio-v4-out-excl-0000abcd",
        "destroy istio-v4-out-excl-0000abcd-t",
    ]
    big = NamedSet("istio-v6-out-incl-0000abcd", "net", Family.V6, tuple(range(70000)))  # type: ignore[arg-type]
    assert "family inet6 hashsize 65536 maxelem 70000" in render_ipset_restore([big]).splitlines()[0]


def test_port_sets_are_written_as_ranges() -> None:
    ports = NamedSet("istio-port-in-0000abcd", "port", None, (80, 8080, *range(20000, 30000), 443, 8081))
    assert ipset_entries(ports) == ["80", "443", "8080-8081", "20000-29999"]


def test_every_list_of_the_policy_goes_through_the_set_step() -> None:
    many_ports = tuple(range(3000, 3100))
    plan = build_plan(
        config(
            outbound_exclude=cidrs(100),
            outbound_ports_include=many_ports,
            outbound_ports_exclude=many_ports,
            inbound_exclude_ports=many_ports,
            virt_interfaces=("virt0",),
        )
    )
    text = render_documents(plan.rulesets)
    assert len(text.splitlines()) < 40
    kinds = sorted(name.rsplit("-", 1)[0] for name in plan.rulesets[0].sets)
    assert kinds == ["istio-port-in-excl", "istio-port-out", "istio-port-out-excl", "istio-v4-out-excl"]
    included = build_plan(config(outbound_include=CidrSelection(cidrs=cidrs(100)), virt_interfaces=("virt0",)))
    lines = render_documents(included.rulesets).splitlines()
    assert sum("--match-set istio-v4-out-incl-" in line for line in lines) == 2  # OUTPUT + the virt NIC
    listed = build_plan(config(inbound_ports=PortSelection(ports=many_ports), mode="TPROXY"))
    assert sum("--match-set istio-port-in-" in line for line in render_documents(listed.rulesets).splitlines()) == 2


def test_istio_cases_are_unchanged_by_auto_sets() -> None:
    """Istio's conformance cases all have short lists: auto must write exactly what never writes."""
    for case in load_cases():
        host = FakeHost(files={"/resolv.conf": case.resolv_conf or ""})
        args = [*case.cli_args("/resolv.conf"), "--dry-run"]
        auto = invoke(args, env=case.env, host=host)
        never = invoke([*args, "--use-sets=never"], env=case.env, host=host)
        assert auto.exit_code == 0 and auto.stdout == never.stdout, case.name
        assert "match-set" not in auto.stdout


def test_use_sets_comes_from_the_flag_or_the_environment() -> None:
    args = ["--dry-run", "-i", "*", "-b", "*", "-x", ",".join(map(str, cidrs(3))), "--disable-ipv6"]
    assert "--match-set istio-v4-out-excl-" in invoke([*args, "--use-sets=always"]).stdout
    assert "--match-set" in invoke(args, env={"ISTIO_IPTABLES_USE_SETS": "always"}).stdout
    bad = invoke([*args, "--use-sets", "sometimes"])
    assert bad.exit_code == 2 and "--use-sets" in bad.output


def test_the_dry_run_prints_the_sets_before_the_rules() -> None:
    args = ["--dry-run", "-i", "*", "-b", "*", "-x", ",".join(map(str, cidrs(100))), "--disable-ipv6"]
    out = invoke(args).stdout
    assert out.startswith("# ipset restore\ncreate istio-v4-out-excl-")
    assert out.index("# ipset restore") < out.index("# iptables-restore")


def test_without_the_ipset_command_auto_falls_back_to_rules_and_always_refuses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from istio_iptables.engine.xtables import plan_for_this_host
    from istio_iptables.system.real import RealSystem

    without_ipset = RealSystem()
    monkeypatch.setattr(without_ipset, "has_program", lambda name: name != "ipset")
    monkeypatch.setattr(ipset, "which", lambda name: None)
    many_ports = tuple(range(3000, 3100))
    auto = config(outbound_exclude=cidrs(100), outbound_ports_include=many_ports)
    plan = plan_for_this_host(auto, build_plan(auto), without_ipset)
    text = render_documents(plan.rulesets)
    assert not plan.rulesets[0].sets and "match-set" not in text
    assert text.count("-d 10.") == 100 and text.count("-m multiport --dports") == 7
    with pytest.raises(EnvironmentProblem, match="apt install ipset"):
        always = config(outbound_exclude=cidrs(1), use_sets="always")
        plan_for_this_host(always, build_plan(always), without_ipset)
    small = config(outbound_exclude=cidrs(3))
    assert plan_for_this_host(small, build_plan(small), without_ipset) == build_plan(small)


def test_member_text_is_str_of_the_network() -> None:
    generator = random.Random(3)
    for _ in range(2000):
        v4 = ipaddress.ip_network((generator.getrandbits(32), generator.randrange(0, 33)), strict=False)
        v6 = ipaddress.ip_network((generator.getrandbits(128), generator.randrange(0, 129)), strict=False)
        assert member_text(v4) == str(v4) and ipaddress.ip_network(member_text(v6)) == v6
    assert member_text(8080) == "8080"


def test_explain_walks_set_matches_of_cidrs_and_ports() -> None:
    import subprocess
    import sys

    args = ["-i", "", "-b", "*", "-x", ",".join(map(str, cidrs(100))), "-q", ",".join(map(str, range(20000, 20100)))]

    def verdict(dst: str, port: int) -> str:
        command = [sys.executable, "-m", "istio_iptables", "explain", *args, "--disable-ipv6"]
        out = subprocess.run([*command, "--dst", dst, "--dport", str(port)], capture_output=True, text=True).stdout
        return next(line for line in out.splitlines() if line.startswith("Verdict:"))

    assert "passed through" in verdict("10.0.5.1", 20050)  # excluded CIDR (set) wins over the port
    assert "redirected to port 15001" in verdict("192.0.2.9", 20050)  # included port (set)
    assert "passed through" in verdict("192.0.2.9", 80)
