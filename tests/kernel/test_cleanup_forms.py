"""Cleanup walks every form of our rules it finds, whichever form its flags name (docs/nftables.md)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.support.netns import NetNS

CLI = str(Path(sys.executable).with_name("istio-iptables"))
ARGS = ("-p", "15001", "-z", "15006", "-u", "1337", "-i", "*", "-b", "*", "--enable-ipv6")
FOREIGN = ("-t", "nat", "-A", "OUTPUT", "-d", "10.9.9.9/32", "-j", "RETURN")


@pytest.mark.parametrize("backend", ["legacy", "nft"])
def test_a_native_cleanup_also_removes_our_iptables_rules(netns: NetNS, backend: str, tmp_path: Path) -> None:
    lock = {"XTABLES_LOCKFILE": str(tmp_path / "xtables.lock")}  # not the global lock other tests wait on
    netns.run(f"iptables-{backend}", *FOREIGN, env=lock)
    netns.run(CLI, *ARGS, f"--force-iptables-binary={backend}", env=lock)
    assert "ISTIO_OUTPUT" in netns.save(f"iptables-{backend}-save")

    netns.run(CLI, "--cleanup-only", "--native-nftables", env=lock)
    for program in (f"iptables-{backend}-save", f"ip6tables-{backend}-save"):
        assert "ISTIO" not in netns.save(program)
    assert "-A OUTPUT -d 10.9.9.9/32 -j RETURN" in netns.save(f"iptables-{backend}-save")
    # and a second cleanup finds nothing left of ours in either form
    assert netns.run(CLI, "--cleanup-only", "--native-nftables", env=lock).returncode == 0


def test_an_iptables_cleanup_also_removes_our_nft_tables(netns: NetNS) -> None:
    netns.run(CLI, *ARGS, "--native-nftables")
    assert "istio-proxy-nat" in netns.run("nft", "list", "tables").stdout
    netns.run(CLI, "--cleanup-only")
    assert "istio-proxy" not in netns.run("nft", "list", "tables").stdout
