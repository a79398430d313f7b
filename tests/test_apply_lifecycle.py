"""Every conformance case, both backends: apply, no-op rerun, drift, reconcile, cleanup to the byte.

Cases without group names run the engine in-process inside the namespace (fast); the owner-group
cases run the real CLI through ``ip netns exec`` so the namespace's /etc/group resolves names.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from istio_iptables.apply.engine import apply
from istio_iptables.apply.state import desired_state, normalised, owned_state, parse_save
from istio_iptables.capture import build_plan
from istio_iptables.errors import ExitCode, IstioIptablesError
from istio_iptables.model import Family
from tests.apply_support import (
    case_args,
    cli_in,
    config_of,
    inside,
    save_both,
    seed_foreign,
    without_comments,
)
from tests.conformance import EXTRA_GROUPS, load_cases
from tests.netns import NetNS

CASES = load_cases()
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
        from tests.apply_support import resolve_test_gid

        wanted = desired_state(ruleset, resolve_test_gid) if ruleset else {}
        owned = owned_state(parse_save(saves[family]), wanted, family)
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


def lifecycle_with_groups(namespace: NetNS, backend: str, args: list[str], env: dict[str, str]) -> None:
    """Group names resolve only under ``ip netns exec``: run the same checks in a child there."""
    root = str(Path(__file__).resolve().parents[1])
    result = namespace.run(
        sys.executable,
        "-m",
        "tests.apply_driver",
        namespace.name,
        backend,
        json.dumps(args),
        json.dumps(env),
        check=False,
        env={"PYTHONPATH": root},
    )
    assert result.returncode == 0, result.stderr[-3000:]


def _same_rules(namespace: NetNS, backend: str, applied: dict[Family, str]) -> bool:
    return {f: without_comments(t) for f, t in save_both(namespace, backend).items()} == {
        f: without_comments(t) for f, t in applied.items()
    }


APPLIERS = [("legacy", "restore"), ("nft", "restore"), ("legacy", "libiptc")]


@pytest.mark.parametrize(("backend", "applier"), APPLIERS)
def test_lifecycle_of_every_case(backend: str, applier: str, netns_factory, tmp_path: Path) -> None:
    for case in CASES:
        namespace = netns_factory()
        if case.needs_groups:
            namespace.add_groups(EXTRA_GROUPS)
        args = case_args(case, tmp_path)
        env = {**case.env, "ISTIO_IPTABLES_APPLIER": applier}
        if case.needs_groups:
            lifecycle_with_groups(namespace, backend, args, env)
        else:
            try:
                lifecycle(namespace, backend, args, env)
            except AssertionError as error:
                raise AssertionError(f"case {case.name}: {error}") from error
        namespace.delete()


def test_both_appliers_leave_the_same_kernel_state(netns_factory, tmp_path: Path) -> None:
    for case in CASES:
        if case.needs_groups:
            continue  # the lifecycle test covers them through both appliers
        states = []
        for applier in ("restore", "libiptc"):
            namespace = netns_factory()
            config = config_of(
                [*case_args(case, tmp_path), "--force-iptables-binary=legacy"],
                {**case.env, "ISTIO_IPTABLES_APPLIER": applier},
            )
            with inside(namespace):
                apply(config, build_plan(config))
            states.append({family: parse_save(text).tables for family, text in save_both(namespace, "legacy").items()})
            namespace.delete()
        assert states[0] == states[1], case.name


def test_libiptc_refuses_an_nft_namespace(netns, tmp_path: Path) -> None:
    config = config_of(["-u", "1337", "--disable-ipv6"], {"ISTIO_IPTABLES_APPLIER": "libiptc"})
    with inside(netns), pytest.raises(IstioIptablesError) as refused:
        apply(config, build_plan(config))
    assert refused.value.exit_code == ExitCode.ENVIRONMENT
    assert "legacy x_tables only" in str(refused.value)
    assert netns.save("iptables-nft-save") == "" and netns.save("iptables-legacy-save") == ""
