"""--native-nftables in the kernel: Istio's 28 nft goldens, atomic replacement, cleanup, detection.

Conformance: for every case, Istio's golden script is loaded with ``nft -f`` into one fresh
namespace and our CLI *applies* its rules in another; ``nft list ruleset`` must be identical once
counter values are dropped.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from istio_iptables.errors import ExitCode
from tests.support.conformance import EXTRA_GROUPS, Case, load_cases
from tests.support.netns import NetNS

CASES = [case for case in load_cases() if case.golden_nftables is not None]
CLI = [sys.executable, "-m", "istio_iptables"]
DEFAULT_ARGV = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*",
                "-d", "15090,15021,15020", "--disable-ipv6"]
TPROXY_ARGV = ["-u", "1337", "-m", "TPROXY", "-b", "*", "-i", "10.0.0.0/8", "--disable-ipv6"]
FOREIGN = "add table inet foreign\nadd chain inet foreign c { type filter hook output priority 0 ; }\n" \
          "add rule inet foreign c tcp dport 9 counter accept\n"


def listing(namespace: NetNS) -> list[str]:
    """``nft list ruleset`` without counter values (handles are not listed without -a)."""
    text = namespace.run("nft", "list", "ruleset").stdout
    return [re.sub(r"counter packets \d+ bytes \d+", "counter", line) for line in text.splitlines() if line.strip()]


def our_tables(namespace: NetNS) -> list[str]:
    return [line for line in namespace.run("nft", "list", "tables").stdout.splitlines() if "istio-proxy" in line]


def cli(namespace: NetNS, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = namespace.run(*CLI, "--native-nftables", *args, env=env, check=False)
    return result.returncode, result.stderr


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_applied_ruleset_equals_golden(case: Case, netns_factory: Callable[[str], NetNS], tmp_path: Path) -> None:
    assert case.golden_nftables is not None
    ours_ns, golden_ns = netns_factory("iit-nft"), netns_factory("iit-ngold")
    if case.needs_groups:
        ours_ns.add_groups(EXTRA_GROUPS)
        golden_ns.add_groups(EXTRA_GROUPS)
    resolv_conf = tmp_path / "resolv.conf"
    resolv_conf.write_text(case.resolv_conf or "")
    code, stderr = cli(ours_ns, *case.cli_args(str(resolv_conf)), env=case.env)
    assert code == 0, stderr
    golden_ns.run("nft", "-f", "-", input=case.golden_nftables.read_text())
    assert listing(ours_ns) == listing(golden_ns)
    # The same command again reads every shape it wrote (sets too) as its own: nothing is written.
    written = ours_ns.run("nft", "-a", "list", "ruleset").stdout
    code, stderr = cli(ours_ns, *case.cli_args(str(resolv_conf)), env=case.env)
    assert code == 0, stderr
    assert "nothing to write" in stderr
    assert ours_ns.run("nft", "-a", "list", "ruleset").stdout == written


def test_other_configuration_is_drift_until_reconciled_and_foreign_tables_stay(netns: NetNS) -> None:
    netns.run("nft", "-f", "-", input=FOREIGN)
    foreign = listing(netns)
    assert cli(netns, *TPROXY_ARGV)[0] == 0
    assert any("istio-proxy-mangle" in line for line in our_tables(netns))
    # Another configuration: drift (exit 3) naming the differences, and not a byte written.
    written = netns.run("nft", "-a", "list", "ruleset").stdout
    code, stderr = cli(netns, *DEFAULT_ARGV)
    assert code == ExitCode.DRIFT, stderr
    assert "--reconcile" in stderr
    assert "table inet istio-proxy-mangle: not part of this configuration" in stderr
    assert "ip daddr 10.0.0.0/8 jump istio-redirect" in stderr  # the old rule, as nft spells it
    assert netns.run("nft", "-a", "list", "ruleset").stdout == written
    # --reconcile replaces: a REDIRECT run after a TPROXY one, the mangle table goes, not lingers empty.
    assert cli(netns, "--reconcile", *DEFAULT_ARGV)[0] == 0
    assert our_tables(netns) == ["table inet istio-proxy-nat"]
    code, stderr = cli(netns, *DEFAULT_ARGV)
    assert code == 0 and "nothing to write" in stderr, stderr
    once = listing(netns)
    assert cli(netns, *DEFAULT_ARGV)[0] == 0
    assert listing(netns) == once
    assert cli(netns, "--cleanup-only", *DEFAULT_ARGV)[0] == 0
    assert our_tables(netns) == []
    assert listing(netns) == foreign


def test_a_rerun_writes_nothing_counters_and_handles_stay(netns: NetNS) -> None:
    assert cli(netns, *DEFAULT_ARGV)[0] == 0
    netns.run("ip", "link", "set", "lo", "up")
    connect = "import socket; s = socket.socket(); s.settimeout(2); s.connect_ex(('127.0.0.1', 9))"
    netns.run(sys.executable, "-c", connect)
    counted = netns.run("nft", "-a", "list", "ruleset").stdout
    assert re.search(r"counter packets [1-9]", counted), counted
    code, stderr = cli(netns, *DEFAULT_ARGV)
    assert code == 0, stderr
    assert "nothing to write" in stderr
    assert netns.run("nft", "-a", "list", "ruleset").stdout == counted
    # --force-apply writes anyway (counters start again), as on the iptables forms.
    code, stderr = cli(netns, "--force-apply", *DEFAULT_ARGV)
    assert code == 0, stderr
    assert not re.search(r"counter packets [1-9]", netns.run("nft", "list", "ruleset").stdout)


def test_an_edited_rule_of_ours_is_drift(netns: NetNS) -> None:
    assert cli(netns, *DEFAULT_ARGV)[0] == 0
    netns.run("nft", "add", "rule", "inet", "istio-proxy-nat", "istio-output", "tcp", "dport", "7", "counter", "return")
    edited = netns.run("nft", "-a", "list", "ruleset").stdout
    code, stderr = cli(netns, *DEFAULT_ARGV)
    assert code == ExitCode.DRIFT, stderr
    assert "-  tcp dport 7 return" in stderr
    assert netns.run("nft", "-a", "list", "ruleset").stdout == edited
    assert cli(netns, "--reconcile", *DEFAULT_ARGV)[0] == 0
    assert "dport 7" not in netns.run("nft", "list", "ruleset").stdout


def test_a_failing_transaction_changes_nothing(netns: NetNS) -> None:
    assert cli(netns, *DEFAULT_ARGV)[0] == 0
    before = listing(netns)
    script = netns.run(*CLI, "--native-nftables", "--dry-run", *TPROXY_ARGV).stdout
    broken = script + "add rule inet istio-proxy-nat no-such-chain counter return\n"
    assert netns.run("nft", "-f", "-", input=broken, check=False).returncode != 0
    assert listing(netns) == before


@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_iptables_form_is_refused_then_reconciled(netns: NetNS, backend: str) -> None:
    restore = netns.run(*CLI, "--dry-run", *DEFAULT_ARGV).stdout
    netns.run(f"iptables-{backend}-restore", "--noflush", input=restore.split("# ip6tables-restore")[0])
    netns.run(f"iptables-{backend}", "-t", "nat", "-A", "OUTPUT", "-p", "udp", "-j", "ACCEPT")  # not ours
    code, stderr = cli(netns, *DEFAULT_ARGV)
    assert code == ExitCode.DRIFT, stderr
    assert "ISTIO_OUTPUT" in stderr and "--reconcile" in stderr
    assert our_tables(netns) == []

    code, stderr = cli(netns, "--reconcile", *DEFAULT_ARGV)
    assert code == 0, stderr
    assert our_tables(netns) == ["table inet istio-proxy-nat"]
    left = netns.run(f"iptables-{backend}-save", "-t", "nat").stdout
    assert "ISTIO" not in left
    assert "-A OUTPUT -p udp -j ACCEPT" in left


def test_iptables_run_refuses_our_nft_tables_then_reconciles(netns: NetNS) -> None:
    assert cli(netns, *DEFAULT_ARGV)[0] == 0
    result = netns.run(*CLI, *DEFAULT_ARGV, check=False)
    assert result.returncode == ExitCode.DRIFT, result.stderr
    assert "istio-proxy-nat" in result.stderr
    result = netns.run(*CLI, "--reconcile", *DEFAULT_ARGV, check=False)
    assert result.returncode == 0, result.stderr
    assert our_tables(netns) == []
    assert "ISTIO_OUTPUT" in netns.run("iptables-save").stdout + netns.run("iptables-legacy-save").stdout


def test_tproxy_routes_come_and_go_with_our_tables(netns: NetNS) -> None:
    assert cli(netns, *TPROXY_ARGV[:-1], "--enable-ipv6")[0] == 0
    assert "fwmark 0x539 lookup 133" in netns.run("ip", "-6", "rule").stdout
    assert "::6/128" in netns.run("ip", "-6", "addr", "show", "dev", "lo").stdout
    assert cli(netns, "--cleanup-only", *DEFAULT_ARGV)[0] == 0  # cleanup follows the live tables
    assert our_tables(netns) == []
    assert "lookup 133" not in netns.run("ip", "rule").stdout + netns.run("ip", "-6", "rule").stdout
    assert "::6/128" not in netns.run("ip", "-6", "addr", "show", "dev", "lo").stdout


def test_restore_puts_the_previous_tables_back(netns: NetNS) -> None:
    assert cli(netns, *TPROXY_ARGV)[0] == 0
    before = listing(netns)
    # Read the state, replace our tables with another configuration's, then put the first back.
    restore = (
        "import sys\nfrom istio_iptables.system import nft as system\n"
        "state = system.read_state()\nsystem.apply_script(sys.stdin.read())\nsystem.restore_our_tables(state)\n"
    )
    script = netns.run(*CLI, "--native-nftables", "--dry-run", *DEFAULT_ARGV).stdout
    netns.run(sys.executable, "-c", restore, input=script)
    assert listing(netns) == before


def test_dry_run_prints_the_script_that_is_applied(netns_factory: Callable[[str], NetNS]) -> None:
    applied, loaded = netns_factory("iit-nft"), netns_factory("iit-nft")
    assert cli(applied, *TPROXY_ARGV)[0] == 0
    script = loaded.run(*CLI, "--native-nftables", "--dry-run", *TPROXY_ARGV).stdout
    loaded.run("nft", "-f", "-", input=script)
    assert listing(loaded) == listing(applied)


def test_network_namespace_flag_writes_into_that_namespace(netns_factory: Callable[[str], NetNS]) -> None:
    runner, target = netns_factory("iit-nft"), netns_factory("iit-nft")
    code, stderr = cli(runner, f"--network-namespace={target.name}", *DEFAULT_ARGV)
    assert code == 0, stderr
    assert our_tables(target) == ["table inet istio-proxy-nat"]
    assert our_tables(runner) == []
    code, stderr = cli(runner, "--network-namespace=/run/netns/no-such-namespace", *DEFAULT_ARGV)
    assert code == ExitCode.INVALID_INPUT, stderr
