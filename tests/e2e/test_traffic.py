"""Rules that load are not rules that work: live traffic through a pod with a sidecar (root, namespaces).

Every scenario (:mod:`tests.beds.traffic_paths`) applies one set of istio-iptables flags to a fresh test bed
(:mod:`tests.beds.testbed`) and sends its connections for IPv4 and IPv6 at once; each must land where
Istio's design says. Scenarios run for both interception modes, both iptables backends and native nftables.

With ``TRAFFIC_MATRIX=FILE`` every checked path is appended to FILE as one JSON line (for reports).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.beds.testbed import FAMILIES, Backend, Mode, Testbed, injector_args
from tests.beds.traffic_paths import SCENARIOS, Scenario
from tests.conftest import require_kernel

BACKENDS: tuple[Backend, ...] = ("legacy", "nft", "native-nftables")
MODES: tuple[Mode, ...] = ("REDIRECT", "TPROXY")
DEMO = Path(__file__).resolve().parents[2] / "scripts" / "demo.py"


@pytest.fixture
def bed_factory(netns_factory: Callable[[str], object]) -> Iterator[Callable[..., Testbed]]:
    beds: list[Testbed] = []

    def make(backend: Backend, mode: Mode) -> Testbed:
        bed = Testbed(backend=backend, mode=mode, make_namespace=netns_factory)  # type: ignore[arg-type]
        beds.append(bed)
        return bed

    yield make
    for bed in beds:
        bed.close()


def record(rows: list[dict[str, object]]) -> None:
    target = os.environ.get("TRAFFIC_MATRIX")
    if target:
        with open(target, "a", encoding="utf-8") as out:
            out.writelines(json.dumps(row) + "\n" for row in rows)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda scenario: scenario.name)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_traffic_lands_where_istio_sends_it(
    backend: Backend, mode: Mode, scenario: Scenario, bed_factory: Callable[..., Testbed]
) -> None:
    bed = bed_factory(backend, mode)
    bed.apply(injector_args(mode, scenario.extra))
    cases = [(path, family) for family in FAMILIES for path in scenario.paths]
    landings = bed.send([path.probe(family) for path, family in cases])
    failures, rows = [], []
    for (path, family), landing in zip(cases, landings, strict=True):
        problems = path.expect(family, mode).mismatches(landing)
        rows.append({"scenario": scenario.name, "path": path.name, "mode": mode, "family": f"IPv{family.version}",
                     "backend": backend, "passed": not problems})
        failures += [f"IPv{family.version} {path.name}: {problem}" for problem in problems]
    record(rows)
    assert not failures, "\n".join(failures)


@pytest.mark.netns
def test_demo_passes_and_leaves_nothing_behind() -> None:
    require_kernel()
    result = subprocess.run([sys.executable, str(DEMO)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "24/24 connections landed where Istio sends them" in result.stdout
    pod = re.search(r"pod namespace (\S+):", result.stdout)
    assert pod and not os.path.exists(f"/run/netns/{pod.group(1)}")
