"""A CNI DEL of a pod with rules, on each form: nothing of ours is left, everything else is byte-identical.

The namespace holds foreign objects before ADD (an nft table with a set and a rule, a policy rule
on our mark to another table and its route, iptables rules, a set inside iptables-nft's own ``nat``
table); after ADD and DEL it must read exactly as before ADD: nft's whole ruleset, both legacy
saves, policy rules, routes and addresses. This is what the cleanup's shortcuts
(tests/unit/test_cleanup_shortcuts.py) must never change.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from istio_iptables.system.netns import entered
from istio_iptables.system.nf_tables import table_names
from tests.support.cni_support import FakeApiServer, api, invoke, network_config, prev_result, sidecar_pod
from tests.support.netns import NetNS, canonical_save

__all__ = ["api"]

FOREIGN_NFT = """
table inet foreign {
    set blocked { type ipv4_addr ; elements = { 192.0.2.7 } }
    chain out {
        type filter hook output priority 10 ; policy accept ;
        ip daddr @blocked counter accept
    }
}
"""
# A set inside the table iptables-nft uses for our nat rules: the table must stay for it.
FOREIGN_SET_IN_IP_NAT = (
    "add table ip nat\n"
    "add set ip nat kept { type ipv4_addr ; }\n"
    "add element ip nat kept { 192.0.2.8 }\n"
)

CASES = {
    # form: (native_nftables, interception mode, foreign iptables rules as (program, args))
    "nft backend": (False, "REDIRECT", [("iptables-nft", "-t filter -A INPUT -s 10.9.9.9/32 -j ACCEPT")]),
    "nft backend, TPROXY": (False, "TPROXY", [("iptables-nft", "-t nat -A OUTPUT -d 10.9.9.9/32 -j RETURN")]),
    "legacy backend": (False, "REDIRECT", [("iptables-legacy", "-t nat -A OUTPUT -d 10.9.9.9/32 -j RETURN"),
                                           ("ip6tables-legacy", "-t filter -A INPUT -s 2001:db8::9 -j ACCEPT")]),
    "native nftables, TPROXY": (True, "TPROXY", [("iptables-nft", "-t nat -A OUTPUT -d 10.9.9.9/32 -j RETURN")]),
}


def snapshot(namespace: NetNS) -> dict[str, Any]:
    def run(*command: str) -> str:
        return namespace.run(*command).stdout

    return {
        "nft": run("nft", "list", "ruleset"),
        "iptables-legacy": canonical_save(run("iptables-legacy-save")),
        "ip6tables-legacy": canonical_save(run("ip6tables-legacy-save")),
        "rules": run("ip", "rule") + run("ip", "-6", "rule"),
        "routes": run("ip", "route", "show", "table", "all") + run("ip", "-6", "route", "show", "table", "all"),
        "addresses": run("ip", "addr"),
    }


@pytest.mark.parametrize("case", sorted(CASES))
def test_del_leaves_nothing_of_ours_and_every_foreign_object_as_it_was(
    case: str, netns: NetNS, api: FakeApiServer, tmp_path: Path
) -> None:
    native, mode, foreign_rules = CASES[case]
    lock = {"XTABLES_LOCKFILE": str(tmp_path / "xtables.lock")}  # not the global lock other tests wait on
    netns.run("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p")
    netns.run("ip", "addr", "add", "10.88.0.5/16", "dev", "eth0")
    netns.run("ip", "link", "set", "eth0", "up")
    netns.run("nft", "-f", "-", input=FOREIGN_NFT)
    if not native and "legacy" not in case:
        netns.run("nft", "-f", "-", input=FOREIGN_SET_IN_IP_NAT)
    for program, args in foreign_rules:
        netns.run(program, *args.split(), env=lock)
    netns.run("ip", "rule", "add", "fwmark", "1337", "lookup", "200")  # our mark, not our table
    netns.run("ip", "route", "add", "local", "default", "dev", "lo", "table", "200")
    before = snapshot(netns)

    api.add_pod(sidecar_pod(**{"sidecar.istio.io/interceptionMode": mode}))
    kube = {"kubeconfig": str(api.write_kubeconfig(tmp_path / "kubeconfig")), "pod_retrieval_attempts": 1}
    config = network_config(prev_result=prev_result(), kubernetes=kube, native_nftables=native)
    code, _, stderr = invoke("ADD", config, netns=netns.path)
    assert code == 0, stderr
    added = snapshot(netns)
    if native:
        assert "istio-proxy-nat" in added["nft"]
    elif "legacy" in case:
        assert any("ISTIO_OUTPUT" in line for line in added["iptables-legacy"])
    else:
        assert "ISTIO_OUTPUT" in added["nft"]
    if mode == "TPROXY":
        assert "lookup 133" in added["rules"]

    code, answer, stderr = invoke("DEL", config, netns=netns.path)
    assert (code, answer) == (0, None), stderr
    assert snapshot(netns) == before


def test_del_of_a_fresh_pod_namespace_leaves_no_table(netns: NetNS, api: FakeApiServer, tmp_path: Path) -> None:
    """iptables-nft creates ``ip nat`` for our rules; DEL takes it away again with its built-in chains."""
    api.add_pod(sidecar_pod())
    kube = {"kubeconfig": str(api.write_kubeconfig(tmp_path / "kubeconfig")), "pod_retrieval_attempts": 1}
    config = network_config(prev_result=prev_result(), kubernetes=kube)
    assert invoke("ADD", config, netns=netns.path)[0] == 0
    assert "table ip nat" in netns.run("nft", "list", "ruleset").stdout
    assert invoke("DEL", config, netns=netns.path)[:2] == (0, None)
    assert netns.run("nft", "list", "ruleset").stdout.strip() == ""


def test_the_kernels_table_list_is_nfts(netns: NetNS) -> None:
    """The in-process nfnetlink dump the shortcuts trust names exactly the tables ``nft`` lists."""
    with entered(netns.path):
        assert table_names() == set()
    script = "".join(f"add table {family} t{index}\n" for index, family in
                     enumerate(["ip", "ip6", "inet", "arp", "bridge", "netdev"] * 40))
    netns.run("nft", "-f", "-", input=script)
    listed = json.loads(netns.run("nft", "-j", "list", "tables").stdout)["nftables"]
    expected = {(item["table"]["family"], item["table"]["name"]) for item in listed if "table" in item}
    assert len(expected) == 240
    with entered(netns.path):
        assert table_names() == expected
