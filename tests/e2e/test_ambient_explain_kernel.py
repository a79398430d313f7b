"""explain's ambient predictions against the kernel's counters, as tests/beds/explain_proof.py does for sidecar flows.

For each backend, our ambient rules are loaded in the bed's pod; each flow is sent for real (a TCP
handshake, or one DNS datagram) from the app, ztunnel (mark 0x539) or the remote side. The nat rules
whose packet counters grew must be exactly the nat rules explain says the flow's first packet
matches, every rule explain names must have counted, and explain on the configuration and on the
rules read back (``--live``) must name the same rules.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from istio_iptables.explain import from_nft
from istio_iptables.nft.listing import read_listing
from tests.beds.testbed import APP_PORT, FAMILIES
from tests.support.ambient_support import ambient_testbed
from tests.support.netns import NetNS

RuleKey = tuple[str, str, int]
BACKENDS = ("legacy", "nft", "native-nftables")
CONFIG = ("--redirect-dns", "--enable-ipv6")
EXPLAIN = [sys.executable, "-m", "istio_iptables", "explain", "ambient", "--json"]


@pytest.fixture(params=BACKENDS)
def bed(request: pytest.FixtureRequest, netns_factory: Callable[[str], NetNS]) -> Iterator[Any]:
    testbed = ambient_testbed(request.param, netns_factory)
    try:
        yield testbed
    finally:
        testbed.close()


def counters(bed: Any, version: int, namespace: NetNS | None = None) -> dict[RuleKey, int]:
    """Packets per rule of our tables (in the pod, or ``namespace``), keyed as explain numbers rules."""
    namespace = namespace or bed.pod
    if bed.backend == "native-nftables":
        read = read_listing(namespace.run("nft", "-j", "list", "ruleset").stdout)
        # Istio's ambient jumps carry no counter: only the rules that count can be compared.
        return {(table.name, chain.name, number): rule.packets
                for table in read if from_nft.explained(table) for chain in table.chains.values()
                for number, rule in enumerate(chain.rules, 1) if rule.packets is not None}
    program = f"{'iptables' if version == 4 else 'ip6tables'}-{bed.backend}-save"
    found: dict[RuleKey, int] = {}
    table, numbers = "", {}
    for line in namespace.run(program, "-c", env=bed._environment()).stdout.splitlines():
        if line.startswith("*"):
            table, numbers = line[1:], {}
        match = re.match(r"\[(\d+):\d+\] -A (\S+)", line)
        if match:
            chain = match.group(2)
            numbers[chain] = numbers.get(chain, 0) + 1
            found[(table, chain, numbers[chain])] = int(match.group(1))
    return found


def explained(bed: Any, flow: list[str], live: bool, namespace: NetNS | None = None,
              config: tuple[str, ...] = CONFIG) -> set[RuleKey]:
    native = ["--native-nftables"] if bed.backend == "native-nftables" else []
    where = (["--live", "--network-namespace", (namespace or bed.pod).name] +
             ([] if native else ["--force-iptables-binary", bed.backend])) if live else [*native, *config]
    done = subprocess.run([*EXPLAIN, *where, *flow], capture_output=True, text=True, check=False,
                          env=None if not live else {**__import__("os").environ, **bed._environment()})
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert not data["problems"], data["problems"]
    return {(step["table"], step["chain"], step["rule"]) for step in data["steps"] if step["rule"] is not None}


def flows(family: Any) -> list[tuple[str, dict[str, Any], list[str]]]:
    """(node, the request it sends, the explain flags of that flow)."""
    pod = ["--pod-ip", family.pod]
    return [
        ("app", {"op": "connect", "host": family.service, "port": 80},
         ["--origin", "app", "--src", family.pod, "--dst", family.service, "--dport", "80", *pod]),
        ("app", {"op": "connect", "host": family.pod, "port": APP_PORT},
         ["--origin", "app", "--dst", family.pod, "--dport", str(APP_PORT), *pod]),
        ("ztunnel", {"op": "connect", "host": family.service, "port": 80},
         ["--origin", "ztunnel", "--src", family.pod, "--dst", family.service, "--dport", "80", *pod]),
        ("remote", {"op": "connect", "host": family.pod, "port": APP_PORT},
         ["--origin", "remote", "--src", family.remote, "--dst", family.pod, "--dport", str(APP_PORT), *pod]),
        ("remote", {"op": "connect", "host": family.pod, "port": 15008},
         ["--origin", "remote", "--src", family.remote, "--dst", family.pod, "--dport", "15008", *pod]),
        ("app", {"op": "dns", "proto": "udp", "host": family.dns, "port": 53, "name": "probe.test"},
         ["--origin", "app", "--protocol", "udp", "--src", family.pod, "--dst", family.dns, "--dport", "53", *pod]),
        ("ztunnel", {"op": "dns", "proto": "udp", "host": family.dns, "port": 53, "name": "probe.test"},
         ["--origin", "ztunnel", "--protocol", "udp", "--src", family.pod, "--dst", family.dns, "--dport", "53",
          *pod]),
    ]


def nat(keys: set[RuleKey]) -> set[RuleKey]:
    return {key for key in keys if key[0] in ("nat", "istio-ambient-nat")}


def test_explain_predicts_the_kernels_counters(bed: Any) -> None:
    bed.load(*CONFIG)
    disagreements = []
    for family in FAMILIES:
        for node, request, flow in flows(family):
            from_model, from_live = explained(bed, flow, live=False), explained(bed, flow, live=True)
            for _attempt in range(2):  # a background packet (IPv6 MLD) may count in a catch-all rule once
                before = counters(bed, family.version)
                bed.nodes[node].send({**request, "timeout": 2.0}).result(timeout=15)
                after = counters(bed, family.version)
                hit = {key for key, packets in after.items() if packets > before.get(key, 0)}
                predicted = from_live & set(after)  # the rules with a counter
                problems = []
                if from_model != from_live:
                    problems.append(f"configuration {sorted(from_model)} != live {sorted(from_live)}")
                if nat(predicted) != nat(hit):
                    problems.append(f"nat: explain {sorted(nat(predicted))}, kernel {sorted(nat(hit))}")
                if predicted - hit:
                    problems.append(f"explain names {sorted(predicted - hit)}, the kernel counted nothing there")
                if not problems:
                    break
            disagreements += [f"{bed.backend} {node} {' '.join(flow)}: {problem}" for problem in problems]
    assert not disagreements, "\n".join(disagreements)


def test_explain_predicts_the_host_rules_counters(bed: Any) -> None:
    """The node's probe SNAT: the kubelet's connection (from the node namespace, root) to an enrolled pod."""
    native = bed.backend == "native-nftables"
    host = ("--host", "--enable-ipv6", *(("--kubelet-uid", "0") if native else ()))
    bed.load(*host, namespace=bed.remote)
    bed.enrol_probe_addresses([family.pod for family in FAMILIES])
    disagreements = []
    for family in FAMILIES:
        flow = ["--origin", "node", "--src", family.remote, "--dst", family.pod, "--dport", str(APP_PORT),
                "--enrolled", family.pod]
        from_model = explained(bed, flow, live=False, config=host)
        from_live = explained(bed, flow, live=True, namespace=bed.remote)
        before = counters(bed, family.version, bed.remote)
        bed.nodes["remote"].send({"op": "connect", "host": family.pod, "port": APP_PORT, "timeout": 2.0}).result(15)
        after = counters(bed, family.version, bed.remote)
        hit = {key for key, packets in after.items() if packets > before.get(key, 0)}
        predicted = from_live & set(after)
        snat = {key for key in predicted if key[1] in ("ISTIO_POSTRT", "postrouting")}
        if from_model != from_live:
            disagreements.append(f"configuration {sorted(from_model)} != live {sorted(from_live)}")
        if not snat or nat(predicted) != nat(hit):
            disagreements.append(f"IPv{family.version}: explain {sorted(nat(predicted))}, kernel {sorted(nat(hit))}")
    assert not disagreements, "\n".join(disagreements)
