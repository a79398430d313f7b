"""``--cleanup-only --dry-run`` prints what cleanup would write, read from the live namespace."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

from tests.support.netns import NetNS, canonical_save

CLI = str(Path(sys.executable).with_name("istio-iptables"))
FOREIGN = ("-t", "nat", "-A", "OUTPUT", "-d", "10.9.9.9/32", "-j", "RETURN")


def test_cleanup_dry_run_prints_the_removal_and_changes_nothing(netns: NetNS) -> None:
    netns.run("iptables-nft", *FOREIGN)
    netns.run(CLI, "-b", "*", "-i", "*", "-d", "15020", "--enable-ipv6")
    before = [canonical_save(netns.save(program)) for program in ("iptables-nft-save", "ip6tables-nft-save")]

    preview = netns.run(CLI, "--cleanup-only", "--dry-run").stdout
    # (canonical_save: the dump's "Generated ... on <time>" header may cross a second)
    assert [canonical_save(netns.save(program)) for program in ("iptables-nft-save", "ip6tables-nft-save")] == before

    documents = dict(re.findall(r"(?ms)^# (ip6?tables-restore)\n(.*?)(?=^# |\Z)", preview))
    assert set(documents) == {"iptables-restore", "ip6tables-restore"}
    for program, document in documents.items():
        netns.run(program.replace("-restore", "-nft-restore"), "--noflush", input=document)
    after = netns.save("iptables-nft-save") + netns.save("ip6tables-nft-save")
    assert "ISTIO" not in after
    assert "-A OUTPUT -d 10.9.9.9/32 -j RETURN" in after


def test_cleanup_dry_run_previews_the_network_namespace_it_is_given(netns_factory: Callable[[], NetNS]) -> None:
    """``--network-namespace NS`` with ``--cleanup-only --dry-run`` reads NS, not the caller's namespace."""
    caller, target = netns_factory(), netns_factory()
    target.run(CLI, "-b", "*", "-i", "*", "-d", "15020")
    before = canonical_save(target.save("iptables-nft-save"))

    preview = caller.run(CLI, "--cleanup-only", "--dry-run", "--network-namespace", target.name).stdout
    assert "-X ISTIO_OUTPUT" in preview and "-D OUTPUT -j ISTIO_OUTPUT" in preview
    assert canonical_save(target.save("iptables-nft-save")) == before
    assert "ISTIO" not in caller.save("iptables-nft-save")
