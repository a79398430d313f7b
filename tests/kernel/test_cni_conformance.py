"""istio-cni's rules equal Istio's plugin goldens in the kernel, for its 9 pods, on both iptables backends.

Both ways in: ``istio-iptables --dry-run --from-pod POD`` (its output loaded with restore), and the
plugin itself (ADD into a fresh namespace, the pod served by a local API server). Each is compared
with Istio's golden loaded into another fresh namespace, as tests/kernel/test_conformance_kernel.py does.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.cni_support import FakeApiServer, api, invoke, network_config, plugin_cases, prev_result
from tests.support.conformance import CONFORMANCE_DIR, golden_restore_documents
from tests.support.netns import NetNS, canonical_save

__all__ = ["api"]  # the fixture
CASES = plugin_cases()
BACKENDS = ("legacy", "nft")
CLI = [sys.executable, "-m", "istio_iptables"]
# A foreign rule of the backend under test: our detection then picks that backend (an empty
# namespace gets nft), and the foreign rule must come through untouched on both sides.
SEED = "*filter\n-A INPUT -p udp --dport 9 -j ACCEPT\nCOMMIT\n"


def seed(namespace: NetNS, backend: str) -> None:
    namespace.run(f"iptables-{backend}-restore", "--noflush", input=SEED)


def dump(namespace: NetNS, backend: str) -> list[str]:
    return canonical_save(namespace.save(f"iptables-{backend}-save"))


def golden_dump(namespace: NetNS, case: dict[str, Any], backend: str) -> list[str]:
    (document,) = golden_restore_documents(CONFORMANCE_DIR / case["golden_iptables"])
    seed(namespace, backend)
    loaded = namespace.run(f"iptables-{backend}-restore", "--noflush", input=document, check=False)
    assert loaded.returncode == 0, loaded.stderr
    return dump(namespace, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda case: case["name"])
def test_dry_run_from_pod_matches_golden(
    case: dict[str, Any], backend: str, netns_factory: Callable[[str], NetNS], tmp_path: Path
) -> None:
    pod_file = tmp_path / "pod.json"
    pod_file.write_text(json.dumps(case["pod"]))
    ours_ns, golden_ns = netns_factory("cni-ours"), netns_factory("cni-gold")
    result = ours_ns.run(*CLI, "--dry-run", "--from-pod", str(pod_file), "--disable-ipv6", check=False)
    assert result.returncode == 0, result.stderr
    (document,) = re.split(r"(?m)^(?=# iptables-restore$)", result.stdout)[1:]
    seed(ours_ns, backend)
    loaded = ours_ns.run(f"iptables-{backend}-restore", "--noflush", input=document, check=False)
    assert loaded.returncode == 0, loaded.stderr
    assert dump(ours_ns, backend) == golden_dump(golden_ns, case, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda case: case["name"])
def test_plugin_add_writes_golden(
    case: dict[str, Any], backend: str, netns_factory: Callable[[str], NetNS], api: FakeApiServer, tmp_path: Path
) -> None:
    api.add_pod(case["pod"])
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
    ours_ns, golden_ns = netns_factory("cni-ours"), netns_factory("cni-gold")
    seed(ours_ns, backend)
    config = network_config(prev_result=prev_result(), kubernetes={"kubeconfig": str(kubeconfig)})
    code, answer, stderr = invoke("ADD", config, netns=ours_ns.path)
    assert code == 0, (answer, stderr)
    assert answer == config["prevResult"]
    assert dump(ours_ns, backend) == golden_dump(golden_ns, case, backend)
    # CHECK agrees; DEL leaves exactly the foreign rule.
    code, answer, stderr = invoke("CHECK", config, netns=ours_ns.path)
    assert (code, answer) == (0, None), stderr
    code, answer, stderr = invoke("DEL", config, netns=ours_ns.path)
    assert (code, answer) == (0, None), stderr
    assert dump(ours_ns, backend) == canonical_save(
        "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -p udp -m udp --dport 9 -j ACCEPT\nCOMMIT\n"
    )
