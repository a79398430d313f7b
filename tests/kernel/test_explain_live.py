"""The cases of tests/unit/test_explain.py that need a network namespace (root)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from istio_iptables.frontends.cli.explain import explain_command
from istio_iptables.net import Family
from istio_iptables.policy.sidecar_xtables import build_plan
from tests.support.explain_support import DEFAULT


def test_live_reads_the_rules_installed_in_a_namespace(netns) -> None:  # type: ignore[no-untyped-def]
    from istio_iptables.xtables.render import render_restore

    ruleset = build_plan(DEFAULT).ruleset(Family.V4)
    assert ruleset is not None
    netns.run("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p")
    netns.run("ip", "addr", "add", "10.0.0.2/24", "dev", "eth0")
    netns.run("iptables-restore", "--noflush", input=render_restore(ruleset, comment=False))
    runner = CliRunner()
    done = runner.invoke(
        explain_command,
        [
            "--live",
            "--network-namespace",
            netns.name,
            "--origin",
            "remote",
            "--dst",
            "10.0.0.2",
            "--dport",
            "15021",
            "--json",
        ],
    )
    assert done.exit_code == 0, done.output
    data = json.loads(done.output)
    assert data["rules"].startswith("installed rules (iptables-nft-save in namespace")
    assert data["verdict"]["landing"] == "local"
    assert data["exclusions"][0]["text"] == "-A ISTIO_INBOUND -p tcp -m tcp --dport 15021 -j RETURN"


def test_live_reads_ipset_members(netns) -> None:  # type: ignore[no-untyped-def]
    from istio_iptables.xtables.render import render_restore

    ruleset = build_plan(DEFAULT).ruleset(Family.V4)
    assert ruleset is not None
    netns.run("ipset", "create", "bypass", "hash:net")
    netns.run("ipset", "add", "bypass", "10.1.0.0/16")
    netns.run("iptables-restore", "--noflush", input=render_restore(ruleset, comment=False))
    netns.run(
        "iptables", "-t", "nat", "-I", "ISTIO_OUTPUT", "1", "-m", "set", "--match-set", "bypass", "dst", "-j", "RETURN"
    )
    runner = CliRunner()
    verdicts = {}
    for dst in ("10.1.2.3", "10.2.2.3"):
        done = runner.invoke(
            explain_command, ["--live", "--network-namespace", netns.name, "--dst", dst, "--dport", "80", "--json"]
        )
        assert done.exit_code == 0, done.output
        verdicts[dst] = json.loads(done.output)["verdict"]["landing"]
    assert verdicts == {"10.1.2.3": "network", "10.2.2.3": "redirect"}
