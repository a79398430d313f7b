"""``--run-validation``: exit 0 when the proxy uid's probe is redirected, 126 when it is not."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable

import pytest

from istio_iptables.config.sidecar import Config
from istio_iptables.engine.validation import plan_probe
from istio_iptables.errors import ExitCode
from istio_iptables.net import Family
from tests.beds.bed_common import as_uid
from tests.beds.testbed import APP_UID, CLI, PROXY_UID, Backend, Mode, injector_args, install_rules
from tests.support.fakes import FakeHost
from tests.support.netns import NetNS

# As istio-cni's validation init container runs it (as the proxy uid), with a short deadline.
VALIDATE = [*CLI, "--run-validation", "--skip-rule-apply", "--probe-timeout", "1s"]


@pytest.mark.parametrize(
    ("addresses", "family"),
    [(["10.1.2.3", "fd00::1"], Family.V4), (["fe80::1", "fd00::1", "10.1.2.3"], Family.V6), ([], Family.V4)],
)
def test_probe_uses_the_family_of_the_first_usable_address(addresses: list[str], family: Family) -> None:
    probe = plan_probe(Config(probe_port=15999, probe_timeout=2.5), FakeHost(interface_addresses=addresses))
    assert probe.family is family
    assert (probe.listen_ports, probe.probe_port, probe.timeout) == ((15001, 15006), 15999, 2.5)
    assert probe.target_host == ("127.0.0.6" if family is Family.V4 else "::6")


@pytest.mark.parametrize("mode", ["REDIRECT", "TPROXY"])
@pytest.mark.parametrize("backend", ["legacy", "nft"])
def test_validation_passes_when_rules_redirect(netns: NetNS, backend: Backend, mode: Mode) -> None:
    install_rules(netns, injector_args(mode, dual_stack=False), backend)
    result = netns.run(*as_uid(PROXY_UID), *VALIDATE, check=False)
    assert result.returncode == ExitCode.OK, result.stderr
    assert "validation passed" in result.stderr


def test_validation_passes_over_ipv6_when_the_pod_is_ipv6_first(netns: NetNS) -> None:
    netns.run("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0-peer")
    netns.run("ip", "addr", "add", "fd00:88::2/64", "dev", "eth0", "nodad")
    netns.run("ip", "link", "set", "eth0", "up")
    netns.run("ip", "link", "set", "eth0-peer", "up")
    install_rules(netns, injector_args("REDIRECT", dual_stack=False), "nft")  # IPv6 detected: first address
    result = netns.run(*as_uid(PROXY_UID), *VALIDATE, check=False)
    assert result.returncode == ExitCode.OK, result.stderr
    assert "connection to ::6 port 15002" in result.stderr


@pytest.mark.parametrize("rules", [False, True], ids=["no rules", "not the proxy uid"])
def test_validation_fails_with_126_when_nothing_is_redirected(netns: NetNS, rules: bool) -> None:
    uid = PROXY_UID
    if rules:
        install_rules(netns, injector_args("REDIRECT", dual_stack=False), "nft")
        uid = APP_UID  # only the proxy uid's loopback traffic is redirected
    started = time.monotonic()
    result = netns.run(*as_uid(uid), *VALIDATE, check=False)
    assert result.returncode == ExitCode.VALIDATION_FAILED == 126, result.stderr
    assert "validation timeout after 1s" in result.stderr
    assert time.monotonic() - started < 5


def test_validation_fails_with_126_when_no_port_can_listen(netns_factory: Callable[[str], NetNS]) -> None:
    namespace = netns_factory("iit-val")
    # Something else (without SO_REUSEPORT) holds both capture ports: the validator has nowhere to listen.
    holder = ["python3", "-c", "import socket, time\nheld = [socket.create_server(('127.0.0.1', port)) "
              "for port in (15001, 15006)]\nprint('held', flush=True)\ntime.sleep(30)"]
    with subprocess.Popen(["ip", "netns", "exec", namespace.name, *holder], stdout=subprocess.PIPE, text=True) as held:
        try:
            assert held.stdout is not None and held.stdout.readline().strip() == "held"
            result = namespace.run(*as_uid(PROXY_UID), *VALIDATE, check=False)
        finally:
            held.kill()
    assert result.returncode == ExitCode.VALIDATION_FAILED, result.stderr
    assert "no listener available" in result.stderr


def test_validation_runs_after_applying_in_the_same_run(netns: NetNS) -> None:
    # One run that writes the rules and then proves them: as the proxy uid, with Envoy's CAP_NET_ADMIN.
    result = netns.run(*as_uid(PROXY_UID, caps=("net_admin", "net_raw")), *CLI, "--force-iptables-binary", "nft",
                       *injector_args("REDIRECT", dual_stack=False), "--run-validation", "--probe-timeout", "2s",
                       check=False)
    assert result.returncode == ExitCode.OK, result.stderr
    assert result.stderr.index("applied") < result.stderr.index("validation passed")
