"""The cases of tests/unit/test_explain_nft.py that need a network namespace (root)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from istio_iptables.frontends.cli.explain import explain_command
from istio_iptables.nft.render import render_script
from istio_iptables.policy.sidecar_nft import build_nft_ruleset
from tests.support.explain_nft_support import SIDECAR, config


def test_live_reads_native_nftables_rules(netns) -> None:  # type: ignore[no-untyped-def]
    netns.run("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p")
    netns.run("ip", "addr", "add", "10.0.0.2/24", "dev", "eth0")
    netns.run("nft", "-f", "-", input=render_script(build_nft_ruleset(config(*SIDECAR, "-m", "REDIRECT"))))
    args = ["--live", "--network-namespace", netns.name, "--origin", "remote", "--dst", "10.0.0.2", "--json"]
    done = CliRunner().invoke(explain_command, [*args, "--dport", "15021"])
    assert done.exit_code == 0, done.output
    data = json.loads(done.output)
    assert data["rules"] == f"installed rules (native nftables in namespace {netns.name})"
    assert data["problems"] == []
    assert data["verdict"]["landing"] == "local"
    assert data["exclusions"][0]["text"].startswith("tcp dport 15021 counter return # handle ")
    captured = json.loads(CliRunner().invoke(explain_command, [*args, "--dport", "8080"]).output)
    assert captured["verdict"]["port"] == 15006
