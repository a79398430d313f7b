"""Port ranges in a kernel: our rules for a range argv equal Istio's, on both iptables backends, and
native nftables, ipset and explain --live take them.

Istio has no golden with a range, so Istio's rules for each argv below are written out here from its
``tools/istio-iptables/pkg/capture/run.go`` (master 86c9f01): every ``-b/-d/-q/-o`` entry goes, as
given, after ``--dport`` (``config.Split`` drops empty items and trims nothing; the restore input
joins words with one space, so a leading space becomes a double space that iptables-restore skips).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from istio_iptables.policy.sidecar_xtables import build_plan
from istio_iptables.xtables.reconcile import desired_state, diff_states, normalised
from istio_iptables.xtables.render import render_restore
from istio_iptables.xtables.save import read_save
from tests.support.apply_support import config_of, resolve_test_gid
from tests.support.netns import NetNS, canonical_save

CLI = [sys.executable, "-m", "istio_iptables"]
BACKENDS = ("legacy", "nft")

NAT_HEAD = """* nat
-N ISTIO_INBOUND
-N ISTIO_REDIRECT
-N ISTIO_IN_REDIRECT
-N ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
"""
PROXY_OWNER_RULES = """-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
"""

# REDIRECT, listed inbound ports with ranges, outbound include and exclude ranges in every spelling.
REDIRECT_ARGV = ["-u", "1337", "-g", "1337", "-b", "8000:9000,80", "-q", " 3000:3100,4000:",
                 "-o", ":100,7000:7000,5000:5001"]
REDIRECT_ISTIO = (
    NAT_HEAD
    + """-A PREROUTING -p tcp -j ISTIO_INBOUND
-A ISTIO_INBOUND -p tcp --dport 8000:9000 -j ISTIO_IN_REDIRECT
-A ISTIO_INBOUND -p tcp --dport 80 -j ISTIO_IN_REDIRECT
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -p tcp --dport :100 -j RETURN
-A ISTIO_OUTPUT -p udp --dport :100 -j RETURN
-A ISTIO_OUTPUT -p tcp --dport 7000:7000 -j RETURN
-A ISTIO_OUTPUT -p udp --dport 7000:7000 -j RETURN
-A ISTIO_OUTPUT -p tcp --dport 5000:5001 -j RETURN
-A ISTIO_OUTPUT -p udp --dport 5000:5001 -j RETURN
"""
    + PROXY_OWNER_RULES
    + """-A ISTIO_OUTPUT -p tcp --dport  3000:3100 -j ISTIO_REDIRECT
-A ISTIO_OUTPUT -p tcp --dport 4000: -j ISTIO_REDIRECT
COMMIT
"""
)

# TPROXY, every inbound port captured but excluded ranges (":" is every port: iptables keeps no test).
TPROXY_ARGV = ["-u", "1337", "-g", "1337", "-m", "TPROXY", "-b", "*", "-d", ":1000,2000:2100 ,65000:", "-i", "*",
               "-o", ":"]
TPROXY_ISTIO = """* mangle
-N ISTIO_DIVERT
-N ISTIO_TPROXY
-N ISTIO_INBOUND
-A ISTIO_DIVERT -j MARK --set-mark 1337
-A ISTIO_DIVERT -j ACCEPT
-A ISTIO_TPROXY ! -d 127.0.0.1/32 -p tcp -j TPROXY --tproxy-mark 1337/0xffffffff --on-port 15006
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A ISTIO_INBOUND -p tcp --dport :1000 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 2000:2100  -j RETURN
-A ISTIO_INBOUND -p tcp --dport 65000: -j RETURN
-A ISTIO_INBOUND -p tcp -m conntrack --ctstate RELATED,ESTABLISHED -j ISTIO_DIVERT
-A ISTIO_INBOUND -p tcp -j ISTIO_TPROXY
-A PREROUTING -p tcp -m mark --mark 1337 -j CONNMARK --save-mark
-A OUTPUT -p tcp -o lo -m mark --mark 1337 -j RETURN
-A OUTPUT ! -d 127.0.0.1/32 -p tcp -o lo -m owner --uid-owner 1337 -j MARK --set-mark 1338
-A OUTPUT ! -d 127.0.0.1/32 -p tcp -o lo -m owner --gid-owner 1337 -j MARK --set-mark 1338
-A OUTPUT -p tcp -m connmark --mark 1337 -j CONNMARK --restore-mark
-I ISTIO_INBOUND 1 -p tcp -m mark --mark 1337 -j RETURN
-I ISTIO_INBOUND 2 -p tcp -s 127.0.0.6/32 -i lo -j RETURN
-I ISTIO_INBOUND 3 -p tcp -i lo -m mark ! --mark 1338 -j RETURN
COMMIT
""" + NAT_HEAD + """-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -p tcp --dport : -j RETURN
-A ISTIO_OUTPUT -p udp --dport : -j RETURN
""" + PROXY_OWNER_RULES + """-A ISTIO_OUTPUT -j ISTIO_REDIRECT
COMMIT
"""

CASES = {"redirect": (REDIRECT_ARGV, REDIRECT_ISTIO), "tproxy": (TPROXY_ARGV, TPROXY_ISTIO)}


def ipv6_of(document: str) -> str:
    """Istio's IPv6 input for the same argv: its versioned rules name ::6 and ::1 instead (run.go)."""
    return document.replace("127.0.0.6/32", "::6/128").replace("127.0.0.1/32", "::1/128")


def restore_load(namespace: NetNS, document: str, program: str, lock: Path) -> list[str]:
    env = {"XTABLES_LOCKFILE": str(lock)}
    loaded = namespace.run(f"{program}-restore", "--noflush", input=document, env=env, check=False)
    assert loaded.returncode == 0, f"refused:\n{loaded.stderr}\n{document}"
    return canonical_save(namespace.run(f"{program}-save", env=env).stdout)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_holds_istios_rules_for_a_range_argv(
    case: str, backend: str, netns_factory: Callable[[str], NetNS], tmp_path: Path
) -> None:
    argv, istio = CASES[case]
    ours_ns, istio_ns = netns_factory("iit-rng"), netns_factory("iit-rngi")
    printed = ours_ns.run(*CLI, "--dry-run", "--enable-ipv6", *argv, check=False)
    assert printed.returncode == 0, printed.stderr
    ours = re.split(r"(?m)^(?=# ip6?tables-restore$)", printed.stdout)[1:]
    assert len(ours) == 2
    lock = tmp_path / "xtables.lock"
    for document, expected, prefix in ((ours[0], istio, "iptables"), (ours[1], ipv6_of(istio), "ip6tables")):
        program = f"{prefix}-{backend}"
        assert restore_load(ours_ns, document, program, lock) == restore_load(istio_ns, expected, program, lock)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_spelling_of_ranges_is_predicted(
    backend: str, netns_factory: Callable[[str], NetNS], tmp_path: Path
) -> None:
    """What drift detection expects (desired_state) is what iptables-save prints, multiport included."""
    many = ",".join([*(str(port) for port in range(20000, 20070)), "8000:9000", ":100", "30000:"])
    variants = [
        [*REDIRECT_ARGV, "--disable-ipv6"],
        [*TPROXY_ARGV, "--disable-ipv6"],
        ["-b", "*", "-d", many, "-q", many, "--use-sets=multiport", "--disable-ipv6"],
    ]
    env = {"XTABLES_LOCKFILE": str(tmp_path / "xtables.lock")}
    for argv in variants:
        netns = netns_factory("iit-rngs")
        [ruleset] = build_plan(config_of(argv)).rulesets
        netns.run(f"iptables-{backend}-restore", input=render_restore(ruleset), env=env)
        kernel = normalised(read_save(netns.run(f"iptables-{backend}-save", env=env).stdout).tables)
        predicted = normalised(desired_state(ruleset, resolve_test_gid))
        assert kernel == predicted, "\n".join([" ".join(argv), *diff_states(kernel, predicted, ruleset.family)])


def test_native_nftables_loads_ranges_in_nfts_spelling(netns: NetNS) -> None:
    printed = netns.run(*CLI, "--native-nftables", "--disable-ipv6", *REDIRECT_ARGV).returncode
    assert printed == 0
    listing = json.loads(netns.run("nft", "-j", "list", "ruleset").stdout)["nftables"]
    ranges = {
        tuple(expression["match"]["right"]["range"])
        for item in listing
        if "rule" in item
        for expression in item["rule"]["expr"]
        if "match" in expression and isinstance(expression["match"]["right"], dict)
        and "range" in expression["match"]["right"]
    }
    assert ranges == {(8000, 9000), (0, 100), (5000, 5001), (3000, 3100), (4000, 65535)}


def test_nft_refuses_istios_spelling_of_a_range_and_takes_ours(netns: NetNS) -> None:
    """Istio's nftables mode writes ``tcp dport 8000:9000``; nft reads ``8000:9000`` as a service name."""

    def load(ports: str) -> int:
        script = f"add table inet t\nadd chain inet t c\nadd rule inet t c tcp dport {ports} counter return\n"
        return netns.run("nft", "-f", "-", input=script, check=False).returncode

    assert load("8000:9000") != 0
    assert load("8000-9000") == 0


@pytest.mark.parametrize("use_sets", ["always", "multiport"])
def test_long_lists_with_ranges_load_as_sets_and_multiport(use_sets: str, netns: NetNS) -> None:
    many = ",".join([*(str(port) for port in range(20000, 20070)), "8000:9000", ":100", "20050:20100"])
    result = netns.run(*CLI, "--disable-ipv6", "-b", "*", "-d", many, f"--use-sets={use_sets}",
                       "--force-iptables-binary=nft", check=False)
    assert result.returncode == 0, result.stderr
    saved = netns.run("iptables-nft-save").stdout
    if use_sets == "always":
        [name] = netns.run("ipset", "list", "-n").stdout.split()
        members = netns.run("ipset", "list", name).stdout.split("Members:")[1].split()
        assert len(members) == 101 + 1001 + 101  # 0-100, 8000-9000, 20000-20100: every port once
        assert {"0", "100", "8000", "9000", "20100"} <= set(members) and "101" not in members
    else:
        # 10 ports and two ranges fill one rule's 15 places (a range takes 2); the third range goes on.
        assert "--dports 20060,20061,20062,20063,20064,20065,20066,20067,20068,20069,8000:9000,0:100 -j RETURN" in saved
        assert "-m tcp --dport 20050:20100 -j RETURN" in saved


# explain --live reads ranges back: iptables-save's --dport 8000:9000 and multiport lists, ipset
# members, nft's range expressions and interval sets.
LONG_OUTBOUND_EXCLUDE = ",".join([*(str(port) for port in range(20000, 20070)), "400:500"])
LONG_INBOUND = ",".join([*(str(port) for port in range(30000, 30070)), "8000:9000"])
EXPLAIN_VARIANTS = {
    "rules": ["-b", "8000:9000", "-o", "400:500"],
    "sets": ["-b", "8000:9000", "-o", "400:500", "--use-sets=always"],
    "multiport": ["-b", LONG_INBOUND, "-o", LONG_OUTBOUND_EXCLUDE, "--use-sets=multiport"],
}


@pytest.mark.parametrize("backend", ["nft", "native"])
@pytest.mark.parametrize("variant", sorted(EXPLAIN_VARIANTS))
def test_explain_live_reads_ranges_back(variant: str, backend: str, netns: NetNS) -> None:
    netns.run("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p")
    netns.run("ip", "addr", "add", "10.0.0.2/24", "dev", "eth0")
    chosen = ["--native-nftables"] if backend == "native" else ["--force-iptables-binary", "nft"]
    argv = ["-u", "1337", "-i", "*", "--disable-ipv6", *chosen, *EXPLAIN_VARIANTS[variant]]
    applied = netns.run(*CLI, *argv, check=False)
    assert applied.returncode == 0, applied.stderr

    def verdict(origin: str, dst: str, port: int) -> tuple[str, int | None]:
        args = ["explain", "--live", "--origin", origin, "--dst", dst, "--dport", str(port), "--json"]
        done = netns.run(*CLI, *args, check=False)
        assert done.returncode == 0, done.stderr
        data = json.loads(done.stdout)
        assert data["problems"] == [], data["problems"]
        return data["verdict"]["landing"], data["verdict"].get("port")

    assert verdict("remote", "10.0.0.2", 8500) == ("redirect", 15006)  # inside -b 8000:9000
    assert verdict("remote", "10.0.0.2", 9001)[0] == "local"
    assert verdict("local", "10.1.2.3", 450)[0] == "network"  # inside -o 400:500
    assert verdict("local", "10.1.2.3", 501) == ("redirect", 15001)


@pytest.mark.parametrize("backend", ["legacy", "nft", "native"])
def test_a_broken_range_changes_nothing(backend: str, netns: NetNS) -> None:
    chosen = ["--native-nftables"] if backend == "native" else ["--force-iptables-binary", backend]
    argv = [*CLI, "-u", "1337", "-i", "*", "-b", "*", "-d", "15000:15100", "--disable-ipv6", *chosen]
    assert netns.run(*argv, check=False).returncode == 0

    def state() -> tuple[str, ...]:
        dumps = [netns.run(f"iptables-{name}-save", check=False).stdout for name in ("legacy", "nft")]
        listing = netns.run("nft", "list", "ruleset").stdout
        return (*(re.sub(r"(?m)^#.*\n|\[\d+:\d+\]", "", dump) for dump in dumps), listing)

    before = state()
    refused = netns.run(*argv, "-o", "9000:8000", "--reconcile", check=False)
    assert refused.returncode == 2
    assert "-o" in refused.stderr or "--istio-local-outbound-ports-exclude" in refused.stderr
    assert state() == before
