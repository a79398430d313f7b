"""istio-cni speaks the CNI specification (0.3.0 to 1.1.0), run as a runtime runs it (a process, env + stdin).

Results, errors and the protocol's rules: VERSION, ADD/CHECK/DEL for every supported version,
prevResult passed through unchanged, DEL idempotent and fine on a namespace that is gone, bad
configurations answered with the error document on stdout and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from istio_iptables.frontends.cni.spec import SUPPORTED_VERSIONS
from tests.support.cni_support import (
    PLUGIN,
    FakeApiServer,
    api,
    invoke,
    network_config,
    prev_result,
    sidecar_pod,
)
from tests.support.netns import NetNS, canonical_save

__all__ = ["api"]


def rules(namespace: NetNS) -> list[str]:
    return canonical_save(namespace.save("iptables-nft-save")) + canonical_save(namespace.save("iptables-legacy-save"))


def assert_error(code: int, answer: Any, stderr: str, expected: int) -> None:
    assert code != 0
    assert set(answer) >= {"cniVersion", "code", "msg"} and answer["code"] == expected, answer
    assert "Traceback" not in stderr


@pytest.fixture
def kube(api: FakeApiServer, tmp_path: Path) -> dict[str, Any]:
    """The ``kubernetes`` section pointing at the local API server, with the usual sidecar pod in it."""
    api.add_pod(sidecar_pod())
    return {"kubeconfig": str(api.write_kubeconfig(tmp_path / "kubeconfig")), "pod_retrieval_attempts": 1}


# --- without a kernel ------------------------------------------------------------


def test_version_lists_the_supported_versions() -> None:
    for stdin in ('{"cniVersion": "0.4.0"}', ""):
        done = subprocess.run(PLUGIN, input=stdin, capture_output=True, text=True,
                              env={**os.environ, "CNI_COMMAND": "VERSION"}, timeout=30)
        assert done.returncode == 0
        answer = json.loads(done.stdout)
        assert answer["supportedVersions"] == list(SUPPORTED_VERSIONS)
        assert answer["cniVersion"] == ("0.4.0" if stdin else "1.1.0")


@pytest.mark.parametrize(
    ("stdin", "env", "expected"),
    [
        ("{not json", {}, 6),
        ("[1, 2]", {}, 6),
        ('{"name": "n", "type": "istio-cni"}', {}, 7),
        ('{"cniVersion": "0.2.0", "name": "n", "type": "istio-cni"}', {}, 1),
        ('{"cniVersion": "1.0.0", "type": "istio-cni"}', {}, 7),
        ('{"cniVersion": "1.0.0", "name": "n", "type": "istio-cni", "plugin_log_level": 3}', {}, 7),
        ('{"cniVersion": "1.0.0", "name": "n", "type": "istio-cni", "plugin_log_level": "loud"}', {}, 7),
        ('{"cniVersion": "1.0.0", "name": "n", "type": "istio-cni", "exclude_namespaces": "kube-system"}', {}, 7),
        ('{"cniVersion": "1.0.0", "name": "n", "type": "istio-cni", "prevResult": []}', {}, 7),
        ('{"cniVersion": "1.0.0", "name": "n", "type": "istio-cni"}', {"CNI_COMMAND": "FROB"}, 4),
        ('{"cniVersion": "1.0.0", "name": "n", "type": "istio-cni"}', {"CNI_NETNS": ""}, 4),
        ('{"cniVersion": "1.0.0", "name": "n", "type": "istio-cni"}', {"CNI_ARGS": "K8S_POD_NAME=a;COLOR=red"}, 4),
        ('{"cniVersion": "0.3.1", "name": "n", "type": "istio-cni", "prevResult": {}}', {"CNI_COMMAND": "CHECK"}, 1),
        ('{"cniVersion": "1.0.0", "name": "n", "type": "istio-cni"}', {"CNI_COMMAND": "CHECK"}, 7),
        ('{"cniVersion": "1.0.0", "name": "n", "type": "istio-cni"}', {"CNI_COMMAND": "STATUS"}, 1),
        ('{"cniVersion": "1.0.0", "name": "n", "type": "istio-cni"}', {"CNI_COMMAND": "GC"}, 1),
    ],
)
def test_bad_invocations_get_the_error_document(stdin: str, env: dict[str, str], expected: int) -> None:
    base = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c", "CNI_IFNAME": "eth0", "CNI_NETNS": "/run/netns/none"}
    done = subprocess.run(PLUGIN, input=stdin, capture_output=True, text=True,
                          env={**os.environ, **base, **env}, timeout=30)
    assert done.returncode == 1
    assert_error(done.returncode, json.loads(done.stdout), done.stderr, expected)
    assert done.stdout.count("\n") == 0  # one JSON document, nothing else


def test_logs_never_reach_stdout_and_go_to_the_node_log(tmp_path: Path) -> None:
    config = network_config(prev_result=prev_result(), cni_agent_run_dir=str(tmp_path))
    code, answer, stderr = invoke("ADD", config, netns="/run/netns/none", pod=None)
    assert (code, answer) == (0, config["prevResult"])
    log_lines = (tmp_path / "istio-cni.log").read_text().splitlines()
    assert log_lines and all(json.loads(line)["msg"] for line in log_lines)
    assert "not a Kubernetes pod" in stderr


def test_status_and_gc_of_1_1_0(tmp_path: Path) -> None:
    config = network_config("1.1.0", cni_agent_run_dir=str(tmp_path))
    code, answer, stderr = invoke("STATUS", config)
    assert_error(code, answer, stderr, 50)  # the agent has not written the kubeconfig yet
    (tmp_path / "istio-cni-kubeconfig").write_text("apiVersion: v1\n")
    assert invoke("STATUS", config)[:2] == (0, None)
    config["cni.dev/valid-attachments"] = [{"containerID": "c", "ifname": "eth0"}]
    assert invoke("GC", config)[:2] == (0, None)


def test_pods_istio_skips_never_reach_the_api(api: FakeApiServer, tmp_path: Path) -> None:
    kubeconfig = str(api.write_kubeconfig(tmp_path / "kubeconfig"))
    config = network_config(prev_result=prev_result(), exclude_namespaces=["kube-system"], pod_namespace="istio-system",
                            kubernetes={"kubeconfig": kubeconfig})
    assert invoke("ADD", config, netns="/run/netns/none", pod=("kube-system", "coredns"))[:2] == (0, prev_result())
    assert invoke("ADD", config, netns="/run/netns/none", pod=("istio-system", "istio-cni-node-x1"))[:2] == (
        0, prev_result())
    # The runtime passed the pod's annotations: no sidecar status, no need to ask the API.
    config["runtimeConfig"] = {"io.kubernetes.cri.pod-annotations": {"team": "a"}}
    assert invoke("ADD", config, netns="/run/netns/none", pod=("default", "plain"))[:2] == (0, prev_result())
    assert api.requests == []


# --- in a kernel ---------------------------------------------------------------


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_add_check_del_with_every_version(version: str, netns: NetNS, kube: dict[str, Any]) -> None:
    config = network_config(version, prev_result=prev_result(version), kubernetes=kube)
    code, answer, stderr = invoke("ADD", config, netns=netns.path)
    assert code == 0, stderr
    assert answer == prev_result(version)  # unchanged, whatever the version
    assert any("ISTIO_OUTPUT" in line for line in rules(netns))
    if version >= "0.4.0":
        assert invoke("CHECK", config, netns=netns.path)[:2] == (0, None)
    assert invoke("DEL", config, netns=netns.path)[:2] == (0, None)
    assert rules(netns) == []


def test_add_without_prev_result_answers_an_empty_result(netns: NetNS, kube: dict[str, Any]) -> None:
    code, answer, stderr = invoke("ADD", network_config("1.0.0", kubernetes=kube), netns=netns.path)
    assert (code, answer) == (0, {"cniVersion": "1.0.0"}), stderr


def test_prev_result_passes_through_unchanged(netns: NetNS, kube: dict[str, Any]) -> None:
    previous = {**prev_result(), "x-vendor": {"nested": [1, 2.5, None, "é"]}}
    config = network_config(prev_result=previous, kubernetes=kube)
    env = {key: value for key, value in os.environ.items() if not key.startswith("CNI_")}
    env.update(CNI_COMMAND="ADD", CNI_CONTAINERID="c", CNI_IFNAME="eth0", CNI_NETNS=netns.path,
               CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAMESPACE=testNSName;K8S_POD_NAME=testPodName")
    done = subprocess.run(PLUGIN, input=json.dumps(config), capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == json.dumps(previous)


def test_add_twice_is_fine_and_del_is_idempotent(netns: NetNS, kube: dict[str, Any]) -> None:
    config = network_config(prev_result=prev_result(), kubernetes=kube)
    assert invoke("ADD", config, netns=netns.path)[0] == 0
    before = rules(netns)
    assert invoke("ADD", config, netns=netns.path)[0] == 0
    assert rules(netns) == before
    for _ in range(2):
        assert invoke("DEL", config, netns=netns.path)[:2] == (0, None)
    assert rules(netns) == []


def test_del_on_a_namespace_that_is_gone(netns_factory: Callable[[str], NetNS], kube: dict[str, Any]) -> None:
    namespace = netns_factory("cni-gone")
    path = namespace.path
    namespace.delete()
    config = network_config(prev_result=prev_result(), kubernetes=kube)
    assert invoke("DEL", config, netns=path)[:2] == (0, None)
    assert invoke("DEL", config, netns="")[:2] == (0, None)  # the runtime may not know it any more


def test_add_into_a_missing_namespace_is_container_unknown(kube: dict[str, Any]) -> None:
    code, answer, stderr = invoke("ADD", network_config(kubernetes=kube), netns="/run/netns/cni-missing-0")
    assert_error(code, answer, stderr, 3)


def test_check_reports_drift(netns: NetNS, kube: dict[str, Any]) -> None:
    config = network_config(prev_result=prev_result(), kubernetes=kube)
    assert invoke("ADD", config, netns=netns.path)[0] == 0
    netns.run("iptables-nft", "-t", "nat", "-I", "ISTIO_OUTPUT", "-d", "192.0.2.1/32", "-j", "RETURN")
    code, answer, stderr = invoke("CHECK", config, netns=netns.path)
    assert_error(code, answer, stderr, 103)
    assert "192.0.2.1" in answer["details"]


def test_check_of_a_pod_without_rules_is_drift(netns: NetNS, kube: dict[str, Any]) -> None:
    code, answer, stderr = invoke("CHECK", network_config(prev_result=prev_result(), kubernetes=kube), netns=netns.path)
    assert_error(code, answer, stderr, 103)


def test_a_bad_annotation_fails_add_and_writes_nothing(netns: NetNS, api: FakeApiServer, tmp_path: Path) -> None:
    api.add_pod(sidecar_pod(**{"traffic.sidecar.istio.io/excludeOutboundPorts": "53,dns"}))
    kube = {"kubeconfig": str(api.write_kubeconfig(tmp_path / "kubeconfig"))}
    code, answer, stderr = invoke("ADD", network_config(prev_result=prev_result(), kubernetes=kube), netns=netns.path)
    assert_error(code, answer, stderr, 102)
    assert "traffic.sidecar.istio.io/excludeOutboundPorts" in answer["msg"]
    assert rules(netns) == []


def test_native_nftables_add_check_del(netns: NetNS, kube: dict[str, Any]) -> None:
    config = network_config(prev_result=prev_result(), kubernetes=kube, native_nftables=True)
    assert invoke("ADD", config, netns=netns.path)[:2] == (0, prev_result())
    assert "istio-proxy-nat" in netns.run("nft", "list", "tables").stdout
    assert invoke("CHECK", config, netns=netns.path)[:2] == (0, None)
    assert invoke("DEL", config, netns=netns.path)[:2] == (0, None)
    assert netns.run("nft", "list", "tables").stdout.strip() == ""
