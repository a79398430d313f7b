"""``--cleanup-only --dry-run`` prints what cleanup would write, read from the live namespace."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from tests.apply_support import without_comments
from tests.netns import NetNS

CLI = str(Path(sys.executable).with_name("istio-iptables"))
FOREIGN = ("-t", "nat", "-A", "OUTPUT", "-d", "10.9.9.9/32", "-j", "RETURN")


def test_cleanup_dry_run_prints_the_removal_and_changes_nothing(netns: NetNS) -> None:
    netns.run("iptables-nft", *FOREIGN)
    netns.run(CLI, "-b", "*", "-i", "*", "-d", "15020", "--enable-ipv6")
    before = [without_comments(netns.save(program)) for program in ("iptables-nft-save", "ip6tables-nft-save")]

    preview = netns.run(CLI, "--cleanup-only", "--dry-run").stdout
    assert [without_comments(netns.save(program)) for program in ("iptables-nft-save", "ip6tables-nft-save")] == before

    documents = dict(re.findall(r"(?ms)^# (ip6?tables-restore)\n(.*?)(?=^# |\Z)", preview))
    assert set(documents) == {"iptables-restore", "ip6tables-restore"}
    for program, document in documents.items():
        netns.run(program.replace("-restore", "-nft-restore"), "--noflush", input=document)
    after = netns.save("iptables-nft-save") + netns.save("ip6tables-nft-save")
    assert "ISTIO" not in after
    assert "-A OUTPUT -d 10.9.9.9/32 -j RETURN" in after
