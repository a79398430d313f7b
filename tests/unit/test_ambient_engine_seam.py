"""Ambient runs through the one engine, against the fake system (no root): the order of the steps
(lock first, probe sets before the rules, policy routing after them), the no-op re-run, the refusal
of a namespace holding sidecar rules, and the rollbacks. tests/kernel/test_ambient_engine.py proves
the same against the kernel.

The ambient footprints (``AMBIENT_POD``, ``AMBIENT_HOST``) are imported inside the tests: until the
engine runs ambient, these tests fail one by one rather than stopping the collection.
"""

from __future__ import annotations

import io
from typing import Any

import pytest

from istio_iptables.config.ambient import AmbientRawSettings, parse_ambient
from istio_iptables.config.sidecar import Setting
from istio_iptables.engine.actions import Action, execute
from istio_iptables.errors import ApplyError, DriftError, EnvironmentProblem, ExitCode
from istio_iptables.net import Family
from istio_iptables.policy.sidecar_xtables import build_plan as sidecar_plan
from tests.support.fake_system import FakeSystem, config, save_text


def ambient_config(*, ipv6: bool = True, **flags: str) -> Any:
    values = {name: Setting(value, f"--{name.replace('_', '-')}") for name, value in flags.items()}
    enable_ipv6 = Setting("true" if ipv6 else "false", "--enable-ipv6/--disable-ipv6")
    return parse_ambient(AmbientRawSettings(values=values, enable_ipv6=enable_ipv6))


def footprint_of(cfg: Any) -> Any:
    from istio_iptables.policy.footprint import AMBIENT_HOST, AMBIENT_POD

    return AMBIENT_HOST if cfg.scope == "host" else AMBIENT_POD


def complete(cfg: Any) -> dict[Family, str]:
    """The save text of a namespace holding exactly ``cfg``'s ambient rules."""
    plan = footprint_of(cfg).build_plan(cfg)
    return {family: save_text(plan.ruleset(family)) for family in (Family.V4, Family.V6)}


def run(action: Action, cfg: Any, system: FakeSystem) -> None:
    execute(action, lambda: cfg, io.StringIO(), system=system, namespace="pod", footprint=footprint_of(cfg))


def in_order(events: list[str], *steps: str) -> bool:
    """Each step happens, in this order (other events may come in between)."""
    remaining = iter(events)
    return all(step in remaining for step in steps)


# How the fake system records a set load: sets of a plan (``ipset load``), or sets kept across runs
# whose members the node agent manages (``kept sets``: the probe sets).
SET_LOADS = ("ipset load", "kept sets")


def writes(system: FakeSystem) -> list[str]:
    return [event for event in system.events if event.startswith(("write", "rollback", "routes", *SET_LOADS))]


def test_a_pods_apply_takes_the_lock_first_and_writes_the_policy_routing_after_the_rules() -> None:
    cfg = ambient_config(redirect_dns="true")
    system = FakeSystem(after=complete(cfg))
    run(Action.APPLY, cfg, system)
    assert in_order(system.events, "enter pod", "check privileges", "lock", "detect", "write IPv4", "write IPv6",
                    "routes", "unlock"), system.events
    assert not set(SET_LOADS) & set(system.events)  # a pod has no sets
    assert system.saves == complete(cfg)


def test_an_ipv4_pod_writes_no_ipv6_rules() -> None:
    cfg = ambient_config(ipv6=False)
    system = FakeSystem(after=complete(cfg))
    run(Action.APPLY, cfg, system)
    assert "write IPv4" in system.events and "write IPv6" not in system.events, system.events


def test_a_rerun_of_a_pods_rules_writes_no_rule() -> None:
    cfg = ambient_config(redirect_dns="true")
    system = FakeSystem(before=complete(cfg))
    run(Action.APPLY, cfg, system)
    assert not [event for event in system.events if event.startswith(("write", "rollback"))], system.events


def test_another_ambient_configuration_is_drift_and_nothing_is_written() -> None:
    system = FakeSystem(before=complete(ambient_config(redirect_dns="true")))
    with pytest.raises(DriftError) as refused:
        run(Action.APPLY, ambient_config(), system)
    assert refused.value.exit_code == ExitCode.DRIFT
    assert not writes(system) and system.events[-1] == "unlock"


@pytest.mark.parametrize("reconcile", ("false", "true"))
def test_a_namespace_holding_sidecar_rules_is_refused_even_with_reconcile(reconcile: str) -> None:
    sidecar = sidecar_plan(config())
    system = FakeSystem(before={family: save_text(sidecar.ruleset(family)) for family in (Family.V4, Family.V6)})
    with pytest.raises(DriftError) as refused:
        run(Action.APPLY, ambient_config(reconcile=reconcile), system)
    assert refused.value.exit_code == ExitCode.DRIFT
    assert not writes(system)
    assert system.saves == system.before


def test_a_sidecar_run_refuses_a_namespace_holding_ambient_rules() -> None:
    system = FakeSystem(before=complete(ambient_config()))
    with pytest.raises(DriftError):
        execute(Action.APPLY, config, io.StringIO(), system=system, namespace="pod")
    assert not writes(system)


def test_the_ipv6_half_failing_rolls_the_ipv4_half_back() -> None:
    cfg = ambient_config(redirect_dns="true")
    system = FakeSystem(after=complete(cfg), fail_at={"write IPv6": "fail"})
    with pytest.raises(ApplyError) as failed:
        run(Action.APPLY, cfg, system)
    assert "rolled back" in str(failed.value)
    assert in_order(system.events, "write IPv4", "write IPv6", "rollback IPv4", "unlock"), system.events
    assert "routes" not in system.events
    assert system.saves == system.before


def test_the_policy_routing_failing_rolls_both_families_back() -> None:
    cfg = ambient_config(redirect_dns="true")
    system = FakeSystem(after=complete(cfg), fail_at={"routes": "fail"})
    with pytest.raises(EnvironmentProblem) as failed:
        run(Action.APPLY, cfg, system)
    assert "rolled back" in str(failed.value)
    assert in_order(system.events, "routes", "rollback IPv4", "rollback IPv6", "unlock"), system.events
    assert system.saves == system.before


def test_the_lock_timing_out_means_nothing_is_read_or_written() -> None:
    system = FakeSystem(fail_at={"lock": "fail"})
    with pytest.raises(EnvironmentProblem):
        run(Action.APPLY, ambient_config(), system)
    assert system.events == ["enter pod", "check privileges", "lock"]


def test_the_nodes_apply_loads_the_probe_sets_before_the_rules_and_adds_no_policy_routing() -> None:
    cfg = ambient_config(host="true")
    system = FakeSystem(after=complete(cfg))
    run(Action.APPLY, cfg, system)
    sets = next((event for event in system.events if event in SET_LOADS), "sets never loaded")
    assert in_order(system.events, "lock", sets, "write IPv4", "write IPv6", "unlock"), system.events
    assert "routes" not in system.events


def test_a_pods_cleanup_removes_its_rules() -> None:
    cfg = ambient_config(redirect_dns="true")
    system = FakeSystem(before=complete(cfg), after={Family.V4: "", Family.V6: ""})
    run(Action.CLEANUP, ambient_config(cleanup_only="true"), system)
    assert in_order(system.events, "lock", "write IPv4", "write IPv6", "unlock"), system.events
    assert system.saves == {Family.V4: "", Family.V6: ""}
