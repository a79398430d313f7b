"""The engine's order of steps and its rollbacks, against a fake system (no root, no kernel).

The orchestrator, the forms, the transitions and the rollback computation are the real ones;
only the side effects are fakes (tests/support/fake_system.py), recorded as events. The kernel
tests (tests/kernel/test_apply_*.py, test_locks.py, test_kill_resume.py) prove the same promises
against the real system.
"""

from __future__ import annotations

import io

import pytest

from istio_iptables.config.sidecar import Config
from istio_iptables.engine.actions import Action, choose_action, execute
from istio_iptables.errors import ApplyError, DriftError, EnvironmentProblem, ExitCode
from istio_iptables.net import Family
from istio_iptables.policy.footprint import SIDECAR
from istio_iptables.policy.sidecar_xtables import build_plan
from tests.support.fake_system import FakeSystem, config, save_text


def complete(cfg: Config) -> dict[Family, str]:
    """The save text of a namespace holding exactly ``cfg``'s rules."""
    plan = build_plan(cfg)
    return {family: save_text(plan.ruleset(family)) for family in (Family.V4, Family.V6)}


def run(action: Action, cfg: Config, system: FakeSystem) -> None:
    execute(action, lambda: cfg, io.StringIO(), system=system, namespace="pod")


def test_the_action_is_chosen_from_the_istio_flags() -> None:
    assert choose_action(dry_run=True, cleanup_only=False) is Action.RENDER
    assert choose_action(dry_run=True, cleanup_only=True) is Action.PREVIEW_CLEANUP
    assert choose_action(dry_run=False, cleanup_only=True) is Action.CLEANUP
    assert choose_action(dry_run=False, cleanup_only=False, skip_rule_apply=True) is Action.VALIDATE
    assert choose_action(dry_run=False, cleanup_only=False) is Action.APPLY


def test_a_dry_run_enters_no_namespace_and_touches_nothing() -> None:
    system = FakeSystem()
    out = io.StringIO()
    execute(Action.RENDER, config, out, system=system, namespace="pod")
    assert system.events == []
    assert "-N ISTIO_OUTPUT" in out.getvalue()


def test_apply_order_lock_first_sets_before_rules_routes_after() -> None:
    cfg = config(tproxy=True, sets=True)
    system = FakeSystem(after=complete(cfg))
    run(Action.APPLY, cfg, system)
    assert system.events == [
        "enter pod",
        "check privileges",
        "lock",  # before the first read
        "nft tables?",  # the cross-form guard
        "detect",
        "check lo",  # TPROXY: a down lo is refused before anything is written
        "ipset load",  # sets before the rules that match them
        "write IPv4",
        "write IPv6",
        "routes",  # after the rules
        "ipset remove stale",
        "unlock",
    ]


def test_a_rerun_writes_nothing() -> None:
    cfg = config()
    system = FakeSystem(before=complete(cfg))
    run(Action.APPLY, cfg, system)
    assert not [event for event in system.events if event.startswith(("write", "rollback"))]


@pytest.mark.parametrize("family", [Family.V4, Family.V6])
def test_an_interrupted_run_is_resumed_family_by_family(family: Family) -> None:
    cfg = config()
    done = complete(cfg)
    other = Family.V6 if family is Family.V4 else Family.V4
    system = FakeSystem(before={family: done[family]}, after=done)
    run(Action.APPLY, cfg, system)
    assert f"write {other.label}" in system.events and f"write {family.label}" not in system.events


def test_another_configuration_is_drift_and_nothing_is_written() -> None:
    system = FakeSystem(before=complete(config(tproxy=True)))
    with pytest.raises(DriftError):
        run(Action.APPLY, config(), system)
    assert not [event for event in system.events if event.startswith(("write", "ipset"))]
    assert system.events[-1] == "unlock"


def test_the_lock_timing_out_means_nothing_is_read_or_written() -> None:
    system = FakeSystem(fail_at={"lock": "fail"})
    with pytest.raises(EnvironmentProblem):
        run(Action.APPLY, config(sets=True), system)
    assert system.events == ["enter pod", "check privileges", "lock"]


def test_the_xtables_lock_held_before_the_first_write_means_nothing_written() -> None:
    cfg = config()
    system = FakeSystem(after=complete(cfg), fail_at={"write IPv4": "lock"})
    with pytest.raises(EnvironmentProblem) as failed:
        run(Action.APPLY, cfg, system)
    assert "nothing was written" in str(failed.value) and failed.value.exit_code == ExitCode.ENVIRONMENT
    assert not [event for event in system.events if event.startswith("rollback")]


def test_a_failed_ipset_load_writes_no_rule() -> None:
    system = FakeSystem(fail_at={"ipset load": "fail"})
    with pytest.raises(ApplyError):
        run(Action.APPLY, config(sets=True), system)
    assert not [event for event in system.events if event.startswith("write")]


def test_the_ipv6_half_failing_rolls_the_ipv4_half_back() -> None:
    cfg = config(sets=True)
    system = FakeSystem(after=complete(cfg), fail_at={"write IPv6": "fail"})
    with pytest.raises(ApplyError) as failed:
        run(Action.APPLY, cfg, system)
    assert "rolled back" in str(failed.value)
    tail = system.events[system.events.index("write IPv6"):]
    # The failed IPv6 restore changed nothing (one transaction): read back, nothing to undo there.
    assert tail == ["write IPv6", "read IPv4", "rollback IPv4", "read IPv6", "ipset remove stale", "unlock"]
    assert system.saves == system.before


def test_the_routes_failing_roll_both_families_back() -> None:
    cfg = config(tproxy=True)
    system = FakeSystem(after=complete(cfg), fail_at={"routes": "fail"})
    with pytest.raises(EnvironmentProblem) as failed:
        run(Action.APPLY, cfg, system)
    assert str(failed.value).endswith("the rules were rolled back")
    tail = system.events[system.events.index("routes"):]
    assert tail == ["routes", "read IPv4", "rollback IPv4", "read IPv6", "rollback IPv6", "unlock"]
    assert system.saves == system.before


def test_a_down_lo_is_refused_before_anything_is_written() -> None:
    system = FakeSystem(fail_at={"check lo": "fail"})
    with pytest.raises(EnvironmentProblem):
        run(Action.APPLY, config(tproxy=True), system)
    assert not [event for event in system.events if event.startswith(("write", "ipset", "routes"))]


def test_cleanup_removes_our_rules_and_walks_the_nft_form() -> None:
    cfg = config()
    system = FakeSystem(before=complete(cfg), after={Family.V4: "", Family.V6: ""})
    run(Action.CLEANUP, config(cleanup_only="true"), system)
    assert "write IPv4" in system.events and "write IPv6" in system.events
    assert system.events.index("write IPv6") < system.events.index("nft tables?")  # then the other form
    assert system.saves == {Family.V4: "", Family.V6: ""}


def test_check_reads_only_and_reports_drift() -> None:
    cfg = config()
    in_place = FakeSystem(before=complete(cfg))
    run(Action.CHECK, cfg, in_place)
    assert in_place.events == ["enter pod", "detect"]
    with pytest.raises(DriftError):
        run(Action.CHECK, cfg, FakeSystem())


def test_the_sidecar_footprint_owns_its_chains_sets_and_tables() -> None:
    assert SIDECAR.owns_chain("ISTIO_OUTPUT") and not SIDECAR.owns_chain("KUBE-SERVICES")
    assert SIDECAR.owns_nft_table("inet", "istio-proxy-nat") and not SIDECAR.owns_nft_table("ip", "istio-proxy-nat")
    assert SIDECAR.owns_set_name("istio-v4-out-excl-0123abcd") and not SIDECAR.owns_set_name("kube-proxy-set")
    assert SIDECAR.owns_nft_set_name("istio-port-in") and not SIDECAR.owns_nft_set_name("foreign")


def test_native_apply_order_and_rollback_when_the_routes_fail() -> None:
    cfg = config(tproxy=True, native_nftables="true")
    system = FakeSystem()
    run(Action.APPLY, cfg, system)
    assert system.events == [
        "enter pod", "check privileges", "lock", "read nft", "check lo", "nft -f", "routes", "unlock",
    ]
    failing = FakeSystem(fail_at={"routes": "fail"})
    with pytest.raises(EnvironmentProblem, match="the nftables rules were rolled back"):
        run(Action.APPLY, cfg, failing)
    assert failing.events[-3:] == ["routes", "restore nft tables", "unlock"]


def test_a_native_cleanup_walks_the_iptables_form_too() -> None:
    system = FakeSystem(before=complete(config()), after={Family.V4: "", Family.V6: ""})

    def with_iptables_form(footprint: object, *, with_legacy: bool) -> object:
        from istio_iptables.system.nft import NamespaceState

        system.events.append("read nft")
        return NamespaceState(footprint=SIDECAR, iptables_nft_chains=[("ip", "nat", "ISTIO_OUTPUT")])

    system.read_nft_state = with_iptables_form  # type: ignore[method-assign]
    run(Action.CLEANUP, config(cleanup_only="true", native_nftables="true"), system)
    assert system.events.index("remove nft tables") < system.events.index("write IPv4")
    assert system.saves == {Family.V4: "", Family.V6: ""}


# --- ambient mode: the same engine with ambient's footprint ----------------------------------------


def ambient_run(action: Action, cfg: object, system: FakeSystem, footprint: object) -> None:
    execute(action, lambda: cfg, io.StringIO(), system=system, namespace="pod", footprint=footprint)  # type: ignore[arg-type]


def ambient_complete(cfg: object) -> dict[Family, str]:
    from istio_iptables.policy.ambient_xtables import build_plan as ambient_plan

    plan = ambient_plan(cfg)  # type: ignore[arg-type]
    return {family: save_text(plan.ruleset(family)) for family in (Family.V4, Family.V6)}


def test_ambient_apply_takes_the_same_steps_with_its_routes() -> None:
    from istio_iptables.config.ambient import AmbientConfig
    from istio_iptables.policy.footprint import AMBIENT_POD

    cfg = AmbientConfig(redirect_dns=True, enable_ipv6=True)
    system = FakeSystem(after=ambient_complete(cfg))
    ambient_run(Action.APPLY, cfg, system, AMBIENT_POD)
    writes = ["write IPv4", "write IPv6"]
    assert system.events[:4] == ["enter pod", "check privileges", "lock", "nft tables?"]
    assert [event for event in system.events if event in writes] == writes
    assert system.events.index("routes") > system.events.index("write IPv6")  # the ip rule after the rules
    assert system.events[-1] == "unlock"


def test_ambient_rerun_writes_nothing_and_other_flags_are_drift() -> None:
    from istio_iptables.config.ambient import AmbientConfig
    from istio_iptables.policy.footprint import AMBIENT_POD

    cfg = AmbientConfig(redirect_dns=True)
    system = FakeSystem(before=ambient_complete(cfg))
    ambient_run(Action.APPLY, cfg, system, AMBIENT_POD)
    assert not [event for event in system.events if event.startswith(("write", "rollback"))]
    with pytest.raises(DriftError):
        ambient_run(Action.APPLY, AmbientConfig(), FakeSystem(before=ambient_complete(cfg)), AMBIENT_POD)


def test_sidecar_and_ambient_rules_never_share_a_namespace() -> None:
    from istio_iptables.config.ambient import AmbientConfig
    from istio_iptables.policy.footprint import AMBIENT_POD

    ambient = ambient_complete(AmbientConfig())
    with pytest.raises(DriftError, match="ambient in-pod"):  # a sidecar run, even with --reconcile
        run(Action.APPLY, config(reconcile="true"), FakeSystem(before=ambient))
    with pytest.raises(DriftError, match="Istio sidecar"):
        ambient_run(Action.APPLY, AmbientConfig(reconcile=True), FakeSystem(before=complete(config())), AMBIENT_POD)
    # Cleanup of one mode leaves the other's rules alone.
    system = FakeSystem(before=ambient)
    run(Action.CLEANUP, config(cleanup_only="true"), system)
    assert not [event for event in system.events if event.startswith("write")]
