"""With ``ambient_enabled``, ambient pods go to Istio's node agent (a local unix-socket server here)."""

from __future__ import annotations

import json
import socketserver
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from tests.support.cni_support import FakeApiServer, api, invoke, network_config, prev_result, sidecar_pod

__all__ = ["api"]
SELECTORS = [
    {"podSelector": {"matchLabels": {"istio.io/dataplane-mode": "ambient"}}},
    {"podSelector": {"matchExpressions": [{"key": "istio.io/dataplane-mode", "operator": "NotIn",
                                            "values": ["none"]}]},
     "namespaceSelector": {"matchLabels": {"istio.io/dataplane-mode": "ambient"}}},
]  # Istio's default enablement selectors (manifests/charts/istio-cni/values.yaml)


class NodeAgent:
    """Istio's agent's CNI event endpoint: records the events, answers 200 (or ``status``)."""

    def __init__(self, path: Path) -> None:
        self.events: list[dict[str, Any]] = []
        self.status = 200
        agent = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def address_string(self) -> str:
                return "unix"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                agent.events.append({"path": self.path, **json.loads(body)})
                self.send_response(agent.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = socketserver.ThreadingUnixStreamServer(str(path), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def node(api: FakeApiServer, tmp_path: Path) -> Iterator[tuple[NodeAgent, dict[str, Any]]]:
    agent = NodeAgent(tmp_path / "pluginevent.sock")
    config = network_config(prev_result=prev_result(), ambient_enabled=True, enablement_selectors=SELECTORS,
                            cni_agent_run_dir=str(tmp_path),
                            kubernetes={"kubeconfig": str(api.write_kubeconfig(tmp_path / "kubeconfig"))})
    try:
        yield agent, config
    finally:
        agent.close()


def ambient_pod(name: str, **labels: str) -> dict[str, Any]:
    pod = sidecar_pod(name=name, namespace="apps")
    pod["metadata"]["annotations"].clear()
    pod["metadata"]["labels"] = labels
    pod["spec"]["containers"].pop()  # no istio-proxy
    return pod


def test_an_ambient_pod_goes_to_the_node_agent(node: tuple[NodeAgent, dict[str, Any]], api: FakeApiServer) -> None:
    agent, config = node
    api.add_pod(ambient_pod("a1", **{"istio.io/dataplane-mode": "ambient"}))
    code, answer, stderr = invoke("ADD", config, netns="/run/netns/pod-a1", pod=("apps", "a1"))
    assert (code, answer) == (0, prev_result()), stderr
    (event,) = agent.events
    assert event == {"path": "/cmdadd", "Netns": "/run/netns/pod-a1", "PodName": "a1", "PodNamespace": "apps",
                     "IPs": [{"Interface": 0, "Address": {"IP": "10.88.0.5", "Mask": "//8AAA=="},
                              "Gateway": "10.88.0.1"}]}


def test_namespace_labels_count_and_sidecar_pods_never_are_ambient(
    node: tuple[NodeAgent, dict[str, Any]], api: FakeApiServer
) -> None:
    agent, config = node
    api.namespaces["apps"] = {"metadata": {"name": "apps", "labels": {"istio.io/dataplane-mode": "ambient"}}}
    api.add_pod(ambient_pod("a2"))
    api.add_pod(ambient_pod("opted-out", **{"istio.io/dataplane-mode": "none"}))
    api.add_pod(sidecar_pod(name="with-sidecar", namespace="apps"))
    assert invoke("ADD", config, netns="/run/netns/x", pod=("apps", "a2"))[0] == 0
    assert [event["PodName"] for event in agent.events] == ["a2"]
    assert invoke("ADD", config, netns="/run/netns/x", pod=("apps", "opted-out"))[:2] == (0, prev_result())
    # A sidecar pod in an ambient namespace is a sidecar pod: its rules are written (here: no such netns).
    code, answer, _ = invoke("ADD", config, netns="/run/netns/cni-none-1", pod=("apps", "with-sidecar"))
    assert code == 1 and answer["code"] == 3
    assert [event["PodName"] for event in agent.events] == ["a2"]


def test_an_agent_that_refuses_fails_the_add(node: tuple[NodeAgent, dict[str, Any]], api: FakeApiServer,
                                             tmp_path: Path) -> None:
    agent, config = node
    agent.status = 500
    api.add_pod(ambient_pod("a3", **{"istio.io/dataplane-mode": "ambient"}))
    code, answer, stderr = invoke("ADD", config, netns="/run/netns/x", pod=("apps", "a3"))
    assert code == 1 and answer["code"] == 106 and "failed to contact node Istio CNI agent" in answer["msg"]
    agent.close()
    (tmp_path / "pluginevent.sock").unlink()
    code, answer, stderr = invoke("ADD", config, netns="/run/netns/x", pod=("apps", "a3"))
    assert code == 1 and answer["code"] == 106, stderr
