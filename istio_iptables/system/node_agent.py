"""Istio's node agent (istio-cni's DaemonSet in ambient mode): tell it about a new ambient pod.

Istio's plugin hands ambient pods to the agent instead of writing rules: an HTTP POST of
``{Netns, PodName, PodNamespace, IPs}`` to ``/cmdadd`` over the unix socket
``<cni_agent_run_dir>/pluginevent.sock`` (``cni/pkg/plugin/cnieventclient.go``), with a 5 s timeout.
"""

from __future__ import annotations

import base64
import http.client
import ipaddress
import json
import socket
from collections.abc import Mapping, Sequence
from typing import Any

from istio_iptables.errors import EnvironmentProblem

EVENT_SOCKET_NAME = "pluginevent.sock"  # Istio's constants.CNIEventSocketName
ADD_EVENT_PATH = "/cmdadd"  # Istio's constants.CNIAddEventPath
TIMEOUT = 5.0


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("unix", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


def add_event(netns: str, pod_name: str, pod_namespace: str, ips: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The event as Go's ``json.Marshal`` spells ``nodeagent.CNIPluginAddEvent`` (IPNet: IP + base64 mask)."""
    configs = []
    for entry in ips:
        network = ipaddress.ip_interface(str(entry.get("address", "")))
        mask = network.network.netmask.packed
        configs.append({
            "Interface": entry.get("interface"),
            "Address": {"IP": str(network.ip), "Mask": base64.b64encode(mask).decode()},
            "Gateway": str(entry.get("gateway", "") or ""),
        })
    return {"Netns": netns, "PodName": pod_name, "PodNamespace": pod_namespace, "IPs": configs or None}


def push_add_event(socket_path: str, event: Mapping[str, Any], timeout: float = TIMEOUT) -> None:
    connection = _UnixConnection(socket_path, timeout)
    try:
        connection.request("POST", ADD_EVENT_PATH, body=json.dumps(event),
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        body = response.read(1024 * 1024)
    except (OSError, http.client.HTTPException) as error:
        raise EnvironmentProblem(f"failed to send event request: {error}") from None
    finally:
        connection.close()
    if response.status != 200:
        raise EnvironmentProblem(
            f"unable to push CNI event (status code {response.status}): {body.decode('utf-8', 'replace')}"
        )
