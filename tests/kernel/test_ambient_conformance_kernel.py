"""Ambient acceptance: our dry run and Istio's ambient goldens hold the same rules in the kernel.

Every case of ambient-cases.json: the iptables form on the legacy and the nft backend (IPv4, and
IPv6 where the case has it), and the native nftables form; the host cases get the probe sets first.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.support.ambient_support import (
    AmbientCase,
    dry_run,
    load_ambient_cases,
    nft_listing,
    probe_ipsets,
    probe_nft_sets,
    split_dry_run,
)
from tests.support.conformance import golden_restore_documents
from tests.support.netns import NetNS, canonical_save

CASES = load_ambient_cases()


def _programs(backend: str, index: int) -> tuple[str, str]:
    prefix = "iptables" if index == 0 else "ip6tables"
    return f"{prefix}-{backend}-restore", f"{prefix}-{backend}-save"


def _load(namespace: NetNS, documents: list[str], backend: str) -> list[list[str]]:
    dumps = []
    for index, document in enumerate(documents):
        restore, save = _programs(backend, index)
        loaded = namespace.run(restore, "--noflush", input=document, check=False)
        assert loaded.returncode == 0, f"{restore} refused:\n{loaded.stderr}\n{document}"
        dumps.append(canonical_save(namespace.save(save)))
    return dumps


def test_every_golden_has_a_case() -> None:
    assert len(CASES) == 14
    assert {case.scope for case in CASES} == {"pod", "host"}


@pytest.mark.parametrize("backend", ("legacy", "nft"))
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_iptables_kernel_holds_the_same_rules(
    case: AmbientCase, backend: str, netns_factory: Callable[[str], NetNS]
) -> None:
    ours_ns, golden_ns = netns_factory("iit-amb"), netns_factory("iit-agold")
    sets, ours = split_dry_run(dry_run(None, *case.argv))
    golden = golden_restore_documents(case.golden_iptables)
    assert len(ours) == len(golden) == (2 if case.ipv6 else 1)
    if case.scope == "host":
        assert sets == probe_ipsets(case.ipv6)
        ours_ns.run("ipset", "restore", input=sets)
        golden_ns.run("ipset", "restore", input=probe_ipsets(case.ipv6))
    else:
        assert sets == ""
    assert _load(ours_ns, ours, backend) == _load(golden_ns, golden, backend)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_native_nft_kernel_holds_the_same_rules(case: AmbientCase, netns_factory: Callable[[str], NetNS]) -> None:
    ours_ns, golden_ns = netns_factory("iit-anft"), netns_factory("iit-angold")
    script = dry_run(None, *case.argv_nftables)
    loaded = ours_ns.run("nft", "-f", "-", input=script, check=False)
    assert loaded.returncode == 0, f"nft refused:\n{loaded.stderr}\n{script}"
    if case.scope == "host":
        golden_ns.run("nft", "-f", "-", input=probe_nft_sets(case.ipv6))
    golden_ns.run("nft", "-f", "-", input=case.golden_nftables.read_text())
    assert nft_listing(ours_ns) == nft_listing(golden_ns)


@pytest.mark.parametrize("native", (False, True), ids=("ipset", "nft-set"))
def test_probe_sets_keep_their_members_across_runs_and_take_the_agents_updates(
    native: bool, netns_factory: Callable[[str], NetNS]
) -> None:
    node = netns_factory("iit-anode")
    form = ["--native-nftables", "--kubelet-uid", "0"] if native else []

    def run(*argv: str) -> None:
        text = dry_run(None, "ambient", "--host", "--enable-ipv6", *form, *argv)
        if native:
            node.run("nft", "-f", "-", input=text)
        else:
            node.run("ipset", "restore", input=split_dry_run(text)[0])

    def members() -> str:
        if native:
            return node.run("nft", "list", "table", "inet", "istio-ambient-nat").stdout
        return node.run("ipset", "save").stdout

    run("--enrol", "10.0.0.2,fd00::2", "--pod-uid", "pod-a")
    run("--enrol", "10.0.0.3", "--pod-uid", "pod-b")
    listed = members()
    assert "10.0.0.2" in listed and "fd00::2" in listed and "10.0.0.3" in listed and '"pod-a"' in listed
    run()  # the node's rules again: the agent's entries stay
    assert members() == listed
    run("--unenrol", "10.0.0.2")
    run("--unenrol", "10.0.0.2")  # already gone: still fine
    after = members()
    assert "10.0.0.2 " not in after and "10.0.0.2\n" not in after and "10.0.0.3" in after and "fd00::2" in after
