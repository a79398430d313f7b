"""``istio-iptables explain ambient`` on configurations (no root): the landings of Istio's ambient design,
from the iptables rules and the native nft rules alike, marks and connmarks included."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys

import pytest

from istio_iptables.explain.walk import Flow, Tables, explain
from istio_iptables.net import Family
from istio_iptables.xtables.model import ConnMarkRestore, ConnMarkSet, Snat, SocketExists
from istio_iptables.xtables.save import read_save_model

CLI = [sys.executable, "-m", "istio_iptables", "explain", "ambient"]
DIALECTS = ((), ("--native-nftables",))


def landing(*args: str) -> dict:
    result = subprocess.run([*CLI, "--json", *args], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    verdict = json.loads(result.stdout)["verdict"]
    return {"kind": verdict["landing"], "port": verdict["port"]}


@pytest.mark.parametrize("dialect", DIALECTS, ids=("iptables", "nft"))
@pytest.mark.parametrize("address", ("10.88.1.1", "fd00:88:1::1"))
def test_app_outbound_goes_to_15001_and_ztunnels_own_do_not(dialect: tuple[str, ...], address: str) -> None:
    captured = landing(*dialect, "--dst", address, "--dport", "80")
    assert (captured["kind"], captured["port"]) == ("redirect", 15001)
    assert landing(*dialect, "--origin", "ztunnel", "--dst", address, "--dport", "80")["kind"] == "network"
    # Only the mask's 12 bits count: 0x1539 is ztunnel's mark, 0x538 is not.
    assert landing(*dialect, "--origin", "app", "--mark", "0x1539", "--dst", address, "--dport", "80")["kind"] \
        == "network"
    assert landing(*dialect, "--origin", "app", "--mark", "0x538", "--dst", address, "--dport", "80")["port"] == 15001


@pytest.mark.parametrize("dialect", DIALECTS, ids=("iptables", "nft"))
def test_inbound_to_15006_hbone_untouched_ingress_bypasses(dialect: tuple[str, ...]) -> None:
    pod = ("--origin", "remote", "--dst", "10.0.0.2", "--pod-ip", "10.0.0.2")
    assert landing(*dialect, *pod, "--dport", "8080")["port"] == 15006
    assert landing(*dialect, *pod, "--dport", "15008")["kind"] == "local"
    assert landing(*dialect, "--ingress-mode", *pod, "--dport", "8080")["kind"] == "local"
    probe = landing(*dialect, *pod, "--src", "169.254.7.127", "--dport", "8080")
    assert probe["kind"] == "local"


@pytest.mark.parametrize("dialect", DIALECTS, ids=("iptables", "nft"))
def test_dns_follows_the_pod_override(dialect: tuple[str, ...]) -> None:
    dns = ("--protocol", "udp", "--dst", "10.96.0.10", "--dport", "53")
    assert landing(*dialect, "--redirect-dns", *dns)["port"] == 15053
    assert landing(*dialect, "--redirect-dns=false", *dns)["kind"] == "network"
    assert landing(*dialect, "--redirect-dns=false", "--pod-dns", "enabled", *dns)["port"] == 15053
    assert landing(*dialect, "--redirect-dns", "--pod-dns", "disabled", *dns)["kind"] == "network"


@pytest.mark.parametrize("dialect", DIALECTS, ids=("iptables", "nft"))
def test_ztunnels_dns_upstream_gets_zone_1_and_marks_its_connection(dialect: tuple[str, ...]) -> None:
    result = subprocess.run([*CLI, "--json", *dialect, "--redirect-dns", "--origin", "ztunnel", "--protocol", "udp",
                             "--dst", "10.96.0.10", "--dport", "53"], capture_output=True, text=True, check=True)
    effects = json.loads(result.stdout)["effects"]
    assert "conntrack zone 1" in effects


@pytest.mark.parametrize("dialect", DIALECTS, ids=("iptables", "nft"))
def test_virtual_interface_traffic_is_outbound(dialect: tuple[str, ...]) -> None:
    flow = ("--origin", "remote", "--in-interface", "fake1s0f0", "--dst", "10.0.0.2", "--pod-ip", "10.0.0.2",
            "--dport", "8080")
    assert landing(*dialect, "--virtual-interfaces", "fake1s0f0", *flow)["port"] == 15001


@pytest.mark.parametrize(("dialect", "uid"), [((), ()), (("--native-nftables",), ("--kubelet-uid", "0"))],
                         ids=("iptables", "nft"))
def test_host_probe_snat(dialect: tuple[str, ...], uid: tuple[str, ...]) -> None:
    result = subprocess.run([*CLI, "--json", *dialect, "--host", *uid, "--origin", "node", "--dst", "10.0.0.2",
                             "--dport", "8080"], capture_output=True, text=True, check=True)
    assert "source address 169.254.7.127 (SNAT)" in json.loads(result.stdout)["effects"]
    other = subprocess.run([*CLI, "--json", *dialect, "--host", *uid, "--origin", "node", "--dst", "10.0.0.2",
                            "--enrolled", "10.0.0.3", "--dport", "8080"], capture_output=True, text=True, check=True)
    assert json.loads(other.stdout)["effects"] == []  # not an enrolled pod: no SNAT


def test_ztunnels_reply_path_restores_the_connection_mark() -> None:
    """A later packet of a connection ztunnel accepted (connmark 0x111) leaves with mark 0x111 (the ip rule's)."""
    flow = Flow("local", "tcp", ipaddress.ip_address("10.0.0.2"), ipaddress.ip_address("10.0.0.9"), 8080, 43210,
                uid=1000, gid=1000, ct_state="ESTABLISHED", ctmark=0x111)
    from istio_iptables.config.ambient import AmbientConfig
    from istio_iptables.policy.ambient_xtables import rulesets

    tables = Tables.from_ruleset(rulesets(AmbientConfig())[0])
    result = explain(tables, flow)
    assert "mark becomes 0x111" in [step.note for step in result.steps]


SAVED = """*mangle
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:ISTIO_OUTPUT - [0:0]
:ISTIO_PRERT - [0:0]
-A PREROUTING -j ISTIO_PRERT
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff
-A ISTIO_PRERT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff
COMMIT
*nat
:POSTROUTING ACCEPT [0:0]
:ISTIO_POSTRT - [0:0]
-A POSTROUTING -j ISTIO_POSTRT
-A ISTIO_POSTRT -p tcp -m owner --socket-exists -m set --match-set probes-v4 dst -j SNAT --to-source 10.9.9.1
-A ISTIO_POSTRT -p tcp -m tcp -j ACCEPT
COMMIT
"""


def test_iptables_save_reads_ambients_targets() -> None:
    saved = read_save_model(SAVED, Family.V4)
    targets = [item.rule.target for rules in saved.chains.values() for item in rules]
    matches = [match for rules in saved.chains.values() for item in rules for match in item.rule.matches]
    assert ConnMarkSet(0x111, 0xFFF) in targets
    assert ConnMarkRestore() in targets
    assert any(isinstance(target, Snat) for target in targets)
    assert SocketExists() in matches
    assert not saved.problems
