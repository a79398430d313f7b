"""The ambient footprint (what ambient owns) agrees with the rules its policy writes, and tells ambient's
``ISTIO_OUTPUT`` from the sidecar's (no root)."""

from __future__ import annotations

import pytest

from istio_iptables.config.ambient import AmbientConfig
from istio_iptables.config.sidecar import Config
from istio_iptables.net import Family
from istio_iptables.policy.ambient_footprint import (
    ISTIO_INPOD_DELETE_COMMANDS,
    SIDECAR,
    claims_output_chain,
    footprint,
    routing_comment_lines,
)
from istio_iptables.policy.ambient_xtables import rulesets
from istio_iptables.policy.sidecar_xtables import build_plan
from istio_iptables.xtables.model import BUILTIN_CHAINS, Jump
from istio_iptables.xtables.render import rule_line

CONFIGS = [
    AmbientConfig(),
    AmbientConfig(redirect_dns=True, enable_ipv6=True),
    AmbientConfig(ingress_mode=True, virtual_interfaces=("eth1",)),
    AmbientConfig(pod_dns="enabled"),
    AmbientConfig(scope="host", enable_ipv6=True),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda config: f"{config.scope}-{config.dns_capture}")
def test_the_footprint_names_exactly_the_chains_and_jumps_the_policy_writes(config: AmbientConfig) -> None:
    owned = footprint(config)
    for ruleset in rulesets(config):
        jumps = {(rule.table, rule.chain, rule.target.chain) for rule in ruleset.rules
                 if rule.chain in BUILTIN_CHAINS and isinstance(rule.target, Jump)}
        assert jumps == {(jump.table, jump.chain, jump.target) for jump in owned.jumps}
        chains = {table: set(ruleset.declared_chains(table)) for table in ruleset.tables()}
        assert chains == {table: set(names) for table, names in owned.chains.items()}


def test_routes_and_rules_per_family() -> None:
    owned = footprint(AmbientConfig(enable_ipv6=True))
    assert [rule.command() for rule in owned.policy_rules] == [
        "ip rule add fwmark 0x111/0xfff pref 32764 lookup 100",
        "ip -6 rule add fwmark 0x111/0xfff pref 32764 lookup 100",
    ]
    assert [route.family for route in owned.routes] == [Family.V4, Family.V6]
    assert routing_comment_lines(AmbientConfig(scope="host")) == []
    assert footprint(AmbientConfig(scope="host", enable_ipv6=True)).ipsets == (
        "istio-inpod-probes-v4", "istio-inpod-probes-v6")


def test_istios_leftovers_cleanup_covers_every_chain_and_jump() -> None:
    owned = footprint(AmbientConfig(redirect_dns=True))
    deleted_jumps = {(cmd[1], cmd[3], cmd[5]) for cmd in ISTIO_INPOD_DELETE_COMMANDS if cmd[2] == "-D"}
    assert {(jump.table, jump.chain, jump.target) for jump in owned.jumps} == deleted_jumps
    removed = {(cmd[1], cmd[3]) for cmd in ISTIO_INPOD_DELETE_COMMANDS if cmd[2] == "-X"}
    assert {(table, chain) for table, chains in owned.chains.items() for chain in chains} <= removed


def _output_chain(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("-A ISTIO_OUTPUT ")]


def test_istio_output_is_told_apart() -> None:
    ambient = rulesets(AmbientConfig(redirect_dns=True))[0]
    ambient_lines = [rule_line(rule) for rule in ambient.rules_of("nat")]
    assert claims_output_chain(ambient.declared_chains("nat"), _output_chain(ambient_lines)) == "ambient-pod"
    sidecar = build_plan(Config(proxy_uids=("1337",), proxy_gids=("1337",))).rulesets[0]
    sidecar_lines = [rule_line(rule) for rule in sidecar.rules_of("nat")]
    assert claims_output_chain(sidecar.declared_chains("nat"), _output_chain(sidecar_lines)) == "sidecar"
    # Both in one table: nobody may claim it (the engine refuses with exit 3).
    both = [*ambient.declared_chains("nat"), *sidecar.declared_chains("nat")]
    assert claims_output_chain(both, _output_chain(ambient_lines + sidecar_lines)) is None
    assert set(SIDECAR.distinguishing_chains).isdisjoint(footprint(AmbientConfig()).distinguishing_chains)
