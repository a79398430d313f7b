"""Every conformance case, both backends: apply, no-op rerun, drift, reconcile, cleanup to the byte.

Cases without group names run the engine in-process inside the namespace (fast); the owner-group
cases run the real CLI through ``ip netns exec`` so the namespace's /etc/group resolves names.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from istio_iptables.engine.xtables import apply
from istio_iptables.errors import ExitCode, IstioIptablesError
from istio_iptables.policy.sidecar_xtables import build_plan
from istio_iptables.xtables.save import read_save
from tests.support.apply_support import case_args, config_of, inside, save_both
from tests.support.conformance import EXTRA_GROUPS, load_cases
from tests.support.lifecycle_support import lifecycle
from tests.support.netns import NetNS

CASES = load_cases()


def lifecycle_with_groups(namespace: NetNS, backend: str, args: list[str], env: dict[str, str]) -> None:
    """Group names resolve only under ``ip netns exec``: run the same checks in a child there."""
    root = str(Path(__file__).resolve().parents[2])
    result = namespace.run(
        sys.executable,
        "-m",
        "tests.support.apply_driver",
        namespace.name,
        backend,
        json.dumps(args),
        json.dumps(env),
        check=False,
        env={"PYTHONPATH": root},
    )
    assert result.returncode == 0, result.stderr[-3000:]


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
            states.append({family: read_save(text).tables for family, text in save_both(namespace, "legacy").items()})
            namespace.delete()
        assert states[0] == states[1], case.name


def test_libiptc_refuses_an_nft_namespace(netns, tmp_path: Path) -> None:
    config = config_of(["-u", "1337", "--disable-ipv6"], {"ISTIO_IPTABLES_APPLIER": "libiptc"})
    with inside(netns), pytest.raises(IstioIptablesError) as refused:
        apply(config, build_plan(config))
    assert refused.value.exit_code == ExitCode.ENVIRONMENT
    assert "legacy x_tables only" in str(refused.value)
    assert netns.save("iptables-nft-save") == "" and netns.save("iptables-legacy-save") == ""
