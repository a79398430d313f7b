"""Ambient dry runs, text level (no root): every case's rules line for line as Istio's goldens list them,
and the dry run's other sections (policy routing, probe sets)."""

from __future__ import annotations

import re

import pytest

from tests.support.ambient_support import AmbientCase, dry_run, load_ambient_cases, probe_ipsets, split_dry_run
from tests.support.conformance import golden_restore_documents
from tests.support.nft_script import final_ruleset

CASES = load_ambient_cases()


def _xtables_lines(document: str) -> list[str]:
    """Rule lines, spelled as the kernel treats them alike: --to-port(s), a host's /32 or /128."""
    lines = []
    for line in document.splitlines():
        if not line or line.startswith("#"):
            continue
        line = line.replace("--to-port ", "--to-ports ")
        lines.append(re.sub(r"(?<=[0-9a-f])/(?:32|128)\b", "", line))
    return lines


def _nft_rules(script: str) -> dict:
    """Tables, chains and rules an nft script leaves, in spellings nft treats alike."""
    kept = []
    for line in script.splitlines():
        if line.startswith(("#", "add set ")) or not line.strip():
            continue
        line = re.sub(r"\s+", " ", line.replace(" and ", " & ").replace("meta mark ", "mark "))
        line = re.sub(r"snat ip6? to", "snat to", line)
        kept.append(re.sub(r"(?<=[0-9a-f])/(?:32|128)\b", "", line))
    return final_ruleset("\n".join(kept))


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_iptables_dry_run_lists_istios_rules(case: AmbientCase) -> None:
    _sets, ours = split_dry_run(dry_run(None, *case.argv))
    golden = golden_restore_documents(case.golden_iptables)
    assert [_xtables_lines(document) for document in ours] == [_xtables_lines(document) for document in golden]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_nft_dry_run_lists_istios_rules(case: AmbientCase) -> None:
    assert _nft_rules(dry_run(None, *case.argv_nftables)) == _nft_rules(case.golden_nftables.read_text())


def test_pod_dry_run_shows_the_policy_routing_apply_will_add() -> None:
    text = dry_run(None, "ambient", "--enable-ipv6")
    assert "#   ip rule add fwmark 0x111/0xfff pref 32764 lookup 100" in text
    assert "#   ip -6 rule add fwmark 0x111/0xfff pref 32764 lookup 100" in text
    assert "#   ip route replace local 0.0.0.0/0 dev lo table 100" in text
    assert "#   ip -6 route replace local ::/0 dev lo table 100" in text
    native = dry_run(None, "ambient", "--native-nftables", "--disable-ipv6")
    assert "#   ip rule add fwmark 0x111/0xfff pref 32764 lookup 100" in native
    assert "ip -6" not in native


def test_host_dry_run_creates_the_probe_sets_first() -> None:
    sets, documents = split_dry_run(dry_run(None, "ambient", "--host", "--enable-ipv6"))
    assert sets == probe_ipsets(True)
    assert len(documents) == 2
    assert "ip rule" not in "".join(documents)
    native = dry_run(None, "ambient", "--host", "--native-nftables", "--kubelet-uid", "0", "--disable-ipv6")
    first_set = native.index("add set inet istio-ambient-nat istio-inpod-probes-v4")
    assert first_set < native.index("flush table inet istio-ambient-nat")
    assert "istio-inpod-probes-v6" not in native
