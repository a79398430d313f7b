"""Ambient conformance data (../shared/conformance/ambient-cases.json) and helpers to load our dry
run and Istio's goldens into namespaces. Support code: no test imports a test."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.conformance import CONFORMANCE_DIR
from tests.support.netns import NetNS

CLI = [sys.executable, "-m", "istio_iptables"]


@dataclass(frozen=True)
class AmbientCase:
    name: str
    scope: str
    ipv6: bool
    argv: tuple[str, ...]
    argv_nftables: tuple[str, ...]
    golden_iptables: Path
    golden_nftables: Path


def load_ambient_cases() -> list[AmbientCase]:
    entries = json.loads((CONFORMANCE_DIR / "ambient-cases.json").read_text())
    return [
        AmbientCase(
            name=entry["name"],
            scope=entry["scope"],
            ipv6=entry["ipv6"],
            argv=tuple(entry["argv"]),
            argv_nftables=tuple(entry["argv_nftables"]),
            golden_iptables=CONFORMANCE_DIR / entry["golden_iptables"],
            golden_nftables=CONFORMANCE_DIR / entry["golden_nftables"],
        )
        for entry in entries
    ]


def split_dry_run(text: str) -> tuple[str, list[str]]:
    """(the ipset restore input, or "", [the IPv4 restore document, the IPv6 one]) of an iptables dry run."""
    sets = ""
    match = re.search(r"(?ms)^# ipset restore\n(.*?)(?=^# ip6?tables-restore$)", text)
    if match:
        sets = match.group(1)
    return sets, re.split(r"(?m)^(?=# ip6?tables-restore$)", text)[1:]


def probe_ipsets(ipv6: bool) -> str:
    """``ipset restore`` input creating the probe sets as Istio does (hash:ip with comments)."""
    lines = ["create istio-inpod-probes-v4 hash:ip family inet comment -exist"]
    if ipv6:
        lines.append("create istio-inpod-probes-v6 hash:ip family inet6 comment -exist")
    return "\n".join(lines) + "\n"


def probe_nft_sets(ipv6: bool) -> str:
    """Istio's host_sets.go: the probe sets of ``inet istio-ambient-nat``, created before the rules."""
    comment = '"ambient pods: kubelet probes are SNATed"'
    lines = ["add table inet istio-ambient-nat",
             f"add set inet istio-ambient-nat istio-inpod-probes-v4 {{ type ipv4_addr ; comment {comment} ; }}"]
    if ipv6:
        lines.append(f"add set inet istio-ambient-nat istio-inpod-probes-v6 {{ type ipv6_addr ; comment {comment} ; }}")
    return "\n".join(lines) + "\n"


def dry_run(namespace: NetNS | None, *argv: str) -> str:
    import subprocess

    command = [*CLI, *argv[:1], "--dry-run", *argv[1:]]
    if namespace is None:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    else:
        result = namespace.run(*command, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


def nft_listing(namespace: NetNS) -> list[str]:
    text = namespace.run("nft", "list", "ruleset").stdout
    return [re.sub(r"counter packets \d+ bytes \d+", "counter", line) for line in text.splitlines() if line.strip()]


AMBIENT_BACKENDS = ("legacy", "nft", "native-nftables")


@pytest.fixture(params=AMBIENT_BACKENDS, name="bed")
def ambient_bed(request: pytest.FixtureRequest, netns_factory: Callable[[str], NetNS]) -> Iterator[Any]:
    """The ambient live-traffic bed (:mod:`tests.beds.ambient_testbed`) on each backend, as the fixture
    ``bed`` (import this fixture into a test module to use it; the bed is imported lazily, as rootless
    tests import this module too)."""
    from tests.beds.ambient_testbed import AmbientTestbed

    testbed = AmbientTestbed(backend=request.param, make_namespace=netns_factory)
    try:
        yield testbed
    finally:
        testbed.close()
