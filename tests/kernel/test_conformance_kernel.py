"""The acceptance bar of the core: our dry run and Istio's goldens hold the same rules in the kernel.

For every case and both iptables backends, Istio's restore inputs and ours are loaded into two
fresh namespaces; the canonicalised ``iptables-save``/``ip6tables-save`` dumps must be identical.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.conformance import EXTRA_GROUPS, Case, golden_restore_documents, load_cases, load_into_kernel
from tests.support.netns import NetNS

CASES = [case for case in load_cases() if case.golden_iptables is not None]
BACKENDS = ("legacy", "nft")
CLI = [sys.executable, "-m", "istio_iptables"]


def our_documents(namespace: NetNS, case: Case, tmp_path: Path) -> list[str]:
    """Our dry run, executed inside the namespace so group names resolve as they would in a pod."""
    resolv_conf = tmp_path / "resolv.conf"
    resolv_conf.write_text(case.resolv_conf or "")
    result = namespace.run(*CLI, "--dry-run", *case.cli_args(str(resolv_conf)), env=case.env, check=False)
    assert result.returncode == 0, result.stderr
    # Loaded exactly as printed, program comment included.
    return re.split(r"(?m)^(?=# ip6?tables-restore$)", result.stdout)[1:]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_kernel_holds_the_same_rules(
    case: Case, backend: str, netns_factory: Callable[[str], NetNS], tmp_path: Path
) -> None:
    ours_ns, golden_ns = netns_factory("iit-ours"), netns_factory("iit-gold")
    if case.needs_groups:
        ours_ns.add_groups(EXTRA_GROUPS)
        golden_ns.add_groups(EXTRA_GROUPS)
    ours = our_documents(ours_ns, case, tmp_path)
    golden = golden_restore_documents(case.golden_iptables)
    assert len(ours) == len(golden) == (2 if case.ipv6 else 1)
    assert load_into_kernel(ours_ns, ours, backend) == load_into_kernel(golden_ns, golden, backend)
