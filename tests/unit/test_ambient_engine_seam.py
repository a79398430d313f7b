"""Ambient runs through the one engine, against the fake system (no root): what
tests/unit/test_engine_seam.py's ambient part (apply order, no-op re-run, drift, the refusals) leaves
out: an IPv4-only pod, the rollbacks (IPv6 half, policy routing), the lock timing out, the node's
probe sets before its rules, a pod's cleanup. tests/kernel/test_ambient_engine.py proves the same
against the kernel.
"""

from __future__ import annotations

import io
from typing import Any

import pytest

from istio_iptables.config.ambient import AmbientRawSettings, parse_ambient
from istio_iptables.config.sidecar import Setting
from istio_iptables.engine.actions import Action, execute
from istio_iptables.errors import ApplyError, EnvironmentProblem
from istio_iptables.net import Family
from istio_iptables.policy.footprint import AMBIENT_HOST, AMBIENT_POD
from tests.support.fake_system import FakeSystem, save_text


def ambient_config(*, ipv6: bool = True, **flags: str) -> Any:
    values = {name: Setting(value, f"--{name.replace('_', '-')}") for name, value in flags.items()}
    enable_ipv6 = Setting("true" if ipv6 else "false", "--enable-ipv6/--disable-ipv6")
    return parse_ambient(AmbientRawSettings(values=values, enable_ipv6=enable_ipv6))


def footprint_of(cfg: Any) -> Any:
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


def test_an_ipv4_pod_writes_no_ipv6_rules() -> None:
    cfg = ambient_config(ipv6=False)
    system = FakeSystem(after=complete(cfg))
    run(Action.APPLY, cfg, system)
    assert "write IPv4" in system.events and "write IPv6" not in system.events, system.events


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
