"""Ambient's footprints (what ambient owns) agree with the rules its policy writes, claim exactly
those, and tell ambient's rules from the sidecar's, which share the ``ISTIO_OUTPUT`` name (no root)."""

from __future__ import annotations

import pytest

from istio_iptables.config.ambient import AmbientConfig
from istio_iptables.net import Family
from istio_iptables.policy.ambient_xtables import build_plan, routing_commands, rulesets
from istio_iptables.policy.footprint import AMBIENT_HOST, AMBIENT_POD, FOOTPRINTS, SIDECAR
from istio_iptables.xtables.model import BUILTIN_CHAINS
from istio_iptables.xtables.reconcile import desired_state, normalised
from istio_iptables.xtables.save import read_save
from tests.support.fake_system import config as sidecar_config
from tests.support.fake_system import save_text

CONFIGS = [
    AmbientConfig(),
    AmbientConfig(redirect_dns=True, enable_ipv6=True),
    AmbientConfig(ingress_mode=True, virtual_interfaces=("eth1",)),
    AmbientConfig(pod_dns="enabled"),
    AmbientConfig(scope="host", enable_ipv6=True),
]


def footprint_of(config: AmbientConfig):
    return AMBIENT_HOST if config.scope == "host" else AMBIENT_POD


def sidecar_save(family: Family) -> str:
    from istio_iptables.policy.sidecar_xtables import build_plan as sidecar_plan

    return save_text(sidecar_plan(sidecar_config()).ruleset(family))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda config: f"{config.scope}-{config.dns_capture}")
def test_the_footprint_claims_exactly_what_the_policy_writes(config: AmbientConfig) -> None:
    footprint = footprint_of(config)
    for ruleset in rulesets(config):
        declared = {name for table in ruleset.tables() for name in ruleset.declared_chains(table)}
        assert declared <= footprint.chains
        wanted = desired_state(ruleset)
        dump = read_save(save_text(ruleset))
        assert normalised(footprint.claim_xtables(dump, None, ruleset.family)) == normalised(wanted)
        assert footprint.rival_in(dump) is None


def test_a_foreign_rule_beside_ours_is_not_claimed() -> None:
    ruleset = rulesets(AmbientConfig())[0]
    jump = "-A OUTPUT -j ISTIO_OUTPUT"
    text = save_text(ruleset).replace(jump, f"-A OUTPUT -o eth9 -j RETURN\n{jump}")
    claimed = AMBIENT_POD.claim_xtables(read_save(text), None, Family.V4)
    assert all("eth9" not in spec for chains in claimed.values() for specs in chains.values() for spec in specs)


def test_sidecar_and_ambient_rules_are_each_others_rivals() -> None:
    ambient = read_save(save_text(rulesets(AmbientConfig())[0]))
    sidecar = read_save(sidecar_save(Family.V4))
    assert SIDECAR.rival_in(ambient) and "ISTIO_PRERT" in SIDECAR.rival_in(ambient)
    assert AMBIENT_POD.rival_in(sidecar) and "ISTIO_INBOUND" in AMBIENT_POD.rival_in(sidecar)
    assert SIDECAR.rival_in(sidecar) is None and AMBIENT_POD.rival_in(ambient) is None
    # Each one's own companions: ISTIO_OUTPUT, the name both use, is neither's.
    assert not SIDECAR.holds_own_companions(ambient) and not AMBIENT_POD.holds_own_companions(sidecar)
    assert "ISTIO_OUTPUT" not in SIDECAR.companion_chains | AMBIENT_POD.companion_chains
    assert AMBIENT_HOST.rival_in(sidecar) is None  # the node's chains share no name


def test_every_mode_is_listed_and_names_its_policy() -> None:
    assert set(FOOTPRINTS.values()) == {SIDECAR, AMBIENT_POD, AMBIENT_HOST}
    plan = AMBIENT_POD.build_plan(AmbientConfig(enable_ipv6=True))
    assert plan.routes is not None and plan.routes.key == (0x111, 100, 0xFFF)
    assert AMBIENT_HOST.build_plan(AmbientConfig(scope="host")).routes is None


def test_routes_and_rules_per_family() -> None:
    routes = build_plan(AmbientConfig(enable_ipv6=True)).routes
    assert routes is not None
    assert routing_commands(routes) == [
        "ip rule add fwmark 0x111/0xfff pref 32764 lookup 100",
        "ip -6 rule add fwmark 0x111/0xfff pref 32764 lookup 100",
        "ip route replace local 0.0.0.0/0 dev lo table 100",
        "ip -6 route replace local ::/0 dev lo table 100",
    ]


def test_the_node_plan_creates_the_probe_sets_and_keeps_members() -> None:
    document = build_plan(AmbientConfig(scope="host", enable_ipv6=True)).ipset_document
    assert document.splitlines() == [
        "create istio-inpod-probes-v4 hash:ip family inet comment -exist",
        "create istio-inpod-probes-v6 hash:ip family inet6 comment -exist",
    ]
    assert AMBIENT_HOST.kept_sets == ("istio-inpod-probes-v4", "istio-inpod-probes-v6")
    assert all(name not in BUILTIN_CHAINS for name in AMBIENT_HOST.chains)
