"""Named sets of the native nftables backend in a kernel: replaced with the rules in one
transaction (traffic never sees a window), removed with our tables. Traffic through sets for
every backend: tests/kernel/test_sets_kernel.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from istio_iptables.nft.names import NAT, OUR_TABLES
from tests.support.netns import NetNS
from tests.support.sets_support import EXCLUDED, Pair, filler_cidrs

# Asks EXCLUDED:80 again and again until the stop file appears (at most 10 s), then prints the tally.
PROBE = """
import collections, json, os, socket, sys, time
address, stop = sys.argv[1], sys.argv[2]
tally = collections.Counter()
deadline = time.monotonic() + 10
print("ready", flush=True)
while not os.path.exists(stop) and time.monotonic() < deadline:
    try:
        with socket.create_connection((address, 80), timeout=1) as connection:
            tally[connection.recv(16).decode()] += 1
    except OSError as error:
        tally[type(error).__name__] += 1
print(json.dumps(tally))
"""


EXCLUDED_SET = "istio-v4-out-excl-24"  # the /24s of filler_cidrs and 198.51.100.0/24


def our_sets(pair: Pair) -> list[str]:
    listing = json.loads(pair.client.run("nft", "-j", "list", "sets").stdout)["nftables"]
    sets = [entry["set"] for entry in listing if "set" in entry]
    assert all(named["table"] in OUR_TABLES for named in sets)
    return sorted(named["name"] for named in sets)


def holds(pair: Pair, network: str) -> bool:
    """Whether our set of excluded /24s holds ``network`` (``nft get element`` fails when it does not)."""
    command = ["nft", "get", "element", "inet", NAT, EXCLUDED_SET, f"{{ {network} }}"]
    return pair.client.run(*command, check=False).returncode == 0


def test_a_changed_list_refills_the_set_atomically_and_cleanup_removes_it(pair: Pair, tmp_path: Path) -> None:
    def excluding(*cidrs: str) -> list[str]:
        return ["-i", "*", "-b", "*", "-x", ",".join([*cidrs, "198.51.100.0/24"])]

    first, second = excluding(*filler_cidrs(200)), excluding(*filler_cidrs(201))
    pair.run_cli("native", *first)
    assert our_sets(pair) == [EXCLUDED_SET] and not holds(pair, "10.0.200.0")

    stop = tmp_path / "stop"
    command = ["ip", "netns", "exec", pair.client.name, sys.executable, "-c", PROBE, EXCLUDED, str(stop)]
    probe = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert probe.stdout is not None and probe.stdout.readline().strip() == "ready"
        for args in (second, first, second, first, second):  # each replaces the rules and refills the set
            pair.run_cli("native", "--reconcile", *args)
    finally:
        stop.touch()
        tally = json.loads(probe.communicate(timeout=15)[0])
    # Every connection during the replacements bypassed the proxy: the set never looked empty.
    assert set(tally) == {"direct"} and tally["direct"] > 0, tally
    assert our_sets(pair) == [EXCLUDED_SET] and holds(pair, "10.0.200.0")

    pair.run_cli("native", "--reconcile", *excluding())  # a short list: a rule, and no set left over
    assert our_sets(pair) == [] and pair.ask(EXCLUDED, 80) == "direct"
    pair.run_cli("native", "--reconcile", *second, "--use-sets=always", "-q", "8080")
    assert our_sets(pair) == ["istio-port-out", EXCLUDED_SET]
    pair.run_cli("native", "--reconcile", *second)  # the port set goes, the CIDR set stays
    assert our_sets(pair) == [EXCLUDED_SET] and pair.ask(EXCLUDED, 80) == "direct"

    pair.run_cli("native", "--cleanup-only")
    assert our_sets(pair) == []
    assert "istio" not in pair.client.run("nft", "list", "ruleset").stdout
    assert pair.ask(EXCLUDED, 80) == "direct"


def test_a_rollback_puts_the_sets_back_with_the_tables(netns: NetNS) -> None:
    cidrs = ",".join([*filler_cidrs(100), "10.200.0.0/16", "192.0.2.1/32", "fd00::/8"])
    argv = ["-i", "*", "-b", "8080,9090", "-m", "TPROXY", "-x", cidrs, "-q", "80,81,82,443", "--use-sets=always"]
    netns.run(sys.executable, "-m", "istio_iptables", "--native-nftables", "--enable-ipv6", *argv)
    before = netns.run("nft", "list", "ruleset").stdout
    assert before.count("@istio-") == 7  # v4 /24, /16, /32; v6 /8; outbound ports; inbound ports x2
    roundtrip = (
        "from istio_iptables.system import nft as system\n"
        "state = system.read_state()\n"
        "system.remove_our_tables(state.our_tables)\n"
        "system.restore_our_tables(state)\n"
    )
    netns.run(sys.executable, "-c", roundtrip)
    assert netns.run("nft", "list", "ruleset").stdout == before
    # Every kind of set (addresses of each length and family, port intervals) reads back as ours.
    rerun = netns.run(sys.executable, "-m", "istio_iptables", "--native-nftables", "--enable-ipv6", *argv)
    assert "nothing to write" in rerun.stderr
    assert netns.run("nft", "list", "ruleset").stdout == before
