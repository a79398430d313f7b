"""One conformance case's whole lifecycle in a namespace: apply, no-op rerun, drift, reconcile, cleanup.

Shared by tests/kernel/test_apply_lifecycle.py and tests/support/apply_driver.py (which runs it under ``ip netns
exec``).
"""

from __future__ import annotations

from istio_iptables.engine.xtables import apply
from istio_iptables.errors import ExitCode, IstioIptablesError
from istio_iptables.net import Family
from istio_iptables.policy.sidecar_xtables import build_plan
from istio_iptables.xtables.reconcile import desired_state, normalised, owned_state
from istio_iptables.xtables.save import read_save
from tests.support.apply_support import (
    cli_in,
    config_of,
    inside,
    resolve_test_gid,
    save_both,
    seed_foreign,
    without_comments,
)
from tests.support.netns import NetNS

CHANGED = ["-o", "4242"]  # one more excluded outbound port: a different configuration


def run_step(namespace: NetNS, args: list[str], env: dict[str, str], via_cli: bool) -> int:
    if via_cli:
        result = cli_in(namespace, [*args, "--log_output_level=default:none"], env=env)
        assert result.returncode in (0, 3), result.stderr
        return result.returncode
    config = config_of(args, env)
    with inside(namespace):
        try:
            apply(config, build_plan(config))
        except IstioIptablesError as error:
            assert error.exit_code == ExitCode.DRIFT, str(error)
            return error.exit_code
    return 0


def assert_holds(namespace: NetNS, backend: str, args: list[str], env: dict[str, str]) -> None:
    plan = build_plan(config_of(args, env))
    saves = save_both(namespace, backend)
    for family in (Family.V4, Family.V6):
        ruleset = plan.ruleset(family)
        wanted = desired_state(ruleset, resolve_test_gid) if ruleset else {}
        owned = owned_state(read_save(saves[family]), wanted, family)
        assert normalised(owned) == normalised(wanted), family


def routes_of(namespace: NetNS) -> str:
    rules = namespace.run("ip", "rule").stdout + namespace.run("ip", "-6", "rule").stdout
    addresses = namespace.run("ip", "-6", "addr", "show", "dev", "lo").stdout
    tables = namespace.run("ip", "route", "show", "table", "all").stdout
    tables += namespace.run("ip", "-6", "route", "show", "table", "all").stdout
    return rules + addresses + tables


def lifecycle(namespace: NetNS, backend: str, args: list[str], env: dict[str, str], via_cli: bool = False) -> None:
    seed_foreign(namespace, backend)
    before = {family: without_comments(text) for family, text in save_both(namespace, backend).items()}
    routes_before = routes_of(namespace)

    assert run_step(namespace, args, env, via_cli) == 0
    assert_holds(namespace, backend, args, env)
    applied = save_both(namespace, backend)
    assert run_step(namespace, args, env, via_cli) == 0
    assert save_both(namespace, backend) == applied or _same_rules(namespace, backend, applied)
    assert run_step(namespace, [*args, *CHANGED], env, via_cli) == ExitCode.DRIFT
    assert run_step(namespace, [*args, *CHANGED, "--reconcile"], env, via_cli) == 0
    assert_holds(namespace, backend, [*args, *CHANGED], env)
    assert run_step(namespace, [*args, *CHANGED], env, via_cli) == 0
    assert run_step(namespace, [*args, "--cleanup-only"], env, via_cli) == 0
    after = {family: without_comments(text) for family, text in save_both(namespace, backend).items()}
    assert after == before
    assert routes_of(namespace) == routes_before


def _same_rules(namespace: NetNS, backend: str, applied: dict[Family, str]) -> bool:
    return {f: without_comments(t) for f, t in save_both(namespace, backend).items()} == {
        f: without_comments(t) for f, t in applied.items()
    }
