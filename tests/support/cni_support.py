"""Test support for istio-cni: a local HTTPS "API server" serving Pod objects, kubeconfigs, invocations.

No Kubernetes API server can be installed here: :class:`FakeApiServer` answers
``GET /api/v1/namespaces/NS/pods/NAME`` with Pod objects in Kubernetes' JSON, and the API's
errors (404 and 401 as Status objects, a hang for timeouts), over TLS with a certificate made
for the test by ``openssl``.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.support.conformance import CONFORMANCE_DIR

PLUGIN = [sys.executable, "-m", "istio_iptables.frontends.cni"]
TOKEN = "test-token-1"
SIDECAR_STATUS = '{"initContainers":null,"containers":["istio-proxy"]}'


def plugin_cases() -> list[dict[str, Any]]:
    return json.loads((CONFORMANCE_DIR / "cni-plugin-cases.json").read_text())


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (its own CA), and its key."""
    cert, key = directory / "api.crt", directory / "api.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-addext", "basicConstraints=critical,CA:TRUE"],
        check=True, capture_output=True,
    )
    return cert, key


def status_body(code: int, reason: str, message: str) -> bytes:
    return json.dumps({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                       "message": message, "reason": reason, "code": code}).encode()


class FakeApiServer:
    """Pods by (namespace, name); ``hang`` names pods whose request never gets an answer."""

    def __init__(self, directory: Path) -> None:
        self.cert, self.key = make_certificate(directory)
        self.pods: dict[tuple[str, str], Mapping[str, Any]] = {}
        self.namespaces: dict[str, Mapping[str, Any]] = {}
        self.hang: set[tuple[str, str]] = set()
        self.requests: list[str] = []
        self.release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server.requests.append(self.path)
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    self._answer(401, status_body(401, "Unauthorized", "Unauthorized"))
                    return
                parts = self.path.strip("/").split("/")
                if len(parts) == 6 and parts[:3] == ["api", "v1", "namespaces"] and parts[4] == "pods":
                    key = (parts[3], parts[5])
                    if key in server.hang:
                        server.release.wait(30)
                        return
                    pod = server.pods.get(key)
                    if pod is None:
                        self._answer(404, status_body(404, "NotFound", f'pods "{parts[5]}" not found'))
                    else:
                        self._answer(200, json.dumps(pod).encode())
                    return
                if len(parts) == 4 and parts[:3] == ["api", "v1", "namespaces"]:
                    namespace = server.namespaces.get(parts[3], {"metadata": {"name": parts[3], "labels": {}}})
                    self._answer(200, json.dumps(namespace).encode())
                    return
                self._answer(404, status_body(404, "NotFound", "the server could not find the requested resource"))

            def _answer(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.httpd.server_address[1]}"

    def add_pod(self, pod: Mapping[str, Any]) -> None:
        metadata = pod["metadata"]
        self.pods[(metadata["namespace"], metadata["name"])] = pod

    def write_kubeconfig(self, path: Path, token: str = TOKEN) -> Path:
        """The shape Istio's install-cni writes (YAML, CA inline, bearer token)."""
        import base64

        ca = base64.b64encode(self.cert.read_bytes()).decode()
        path.write_text(
            "apiVersion: v1\nkind: Config\nclusters:\n- cluster:\n"
            f"    certificate-authority-data: {ca}\n    server: {self.url}\n  name: local\n"
            "contexts:\n- context:\n    cluster: local\n    user: istio-cni\n  name: istio-cni-context\n"
            "current-context: istio-cni-context\npreferences: {}\nusers:\n- name: istio-cni\n  user:\n"
            f"    token: {token}\n"
        )
        return path

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def network_config(
    version: str = "1.0.0", prev_result: Mapping[str, Any] | None = None, **fields: Any
) -> dict[str, Any]:
    config: dict[str, Any] = {"cniVersion": version, "name": "k8s-pod-network", "type": "istio-cni",
                              "plugin_log_level": "debug", **fields}
    if prev_result is not None:
        config["prevResult"] = prev_result
    return config


def prev_result(version: str = "1.0.0") -> dict[str, Any]:
    """A bridge plugin's result: one interface in the container, one address."""
    return {
        "cniVersion": version,
        "interfaces": [{"name": "eth0", "mac": "aa:bb:cc:dd:ee:ff", "sandbox": "/run/netns/x"}],
        "ips": [{"address": "10.88.0.5/16", "gateway": "10.88.0.1", "interface": 0,
                 **({"version": "4"} if version.startswith("0.3") else {})}],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {},
    }


def invoke(
    command: str,
    config: Mapping[str, Any] | str,
    *,
    netns: str = "",
    pod: tuple[str, str] | None = ("testNSName", "testPodName"),
    extra_env: Mapping[str, str] | None = None,
    timeout: float = 120,
) -> tuple[int, Any, str]:
    """Run the plugin as a runtime does: (exit code, parsed stdout or None, stderr)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("CNI_")}
    env.update({"CNI_COMMAND": command, "CNI_CONTAINERID": "c0ffee", "CNI_IFNAME": "eth0",
                "CNI_PATH": "/usr/lib/cni"})
    if netns:
        env["CNI_NETNS"] = netns
    if pod is not None:
        env["CNI_ARGS"] = f"IgnoreUnknown=1;K8S_POD_NAMESPACE={pod[0]};K8S_POD_NAME={pod[1]}"
    env.update(extra_env or {})
    stdin = config if isinstance(config, str) else json.dumps(config)
    done = subprocess.run(PLUGIN, input=stdin, capture_output=True, text=True, env=env, timeout=timeout)
    answer = json.loads(done.stdout) if done.stdout.strip() else None
    return done.returncode, answer, done.stderr


@pytest.fixture
def api(tmp_path: Path) -> Iterator[FakeApiServer]:
    """A local HTTPS API server (import this fixture into a test module to use it)."""
    server = FakeApiServer(tmp_path)
    try:
        yield server
    finally:
        server.close()


def sidecar_pod(name: str = "testPodName", namespace: str = "testNSName", **annotations: str) -> dict[str, Any]:
    """A pod as Istio's injector leaves it for istio-cni: app, istio-validation, istio-proxy."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace,
                     "annotations": {"sidecar.istio.io/status": SIDECAR_STATUS, **annotations}},
        "spec": {
            "initContainers": [{"name": "istio-validation", "image": "proxyv2"}],
            "containers": [
                {"name": "app", "image": "app"},
                {"name": "istio-proxy", "image": "proxyv2", "args": ["proxy", "sidecar"],
                 "securityContext": {"runAsUser": 1337, "runAsGroup": 1337}},
            ],
        },
    }


class UserNamespacePod:
    """A sandbox like a ``hostUsers: false`` pod's: a network namespace owned by a user namespace
    that maps the pod's uids 0-65535 to the host's 100000-165535 (as the kubelet does)."""

    HOST_BASE = 100000

    def __init__(self) -> None:
        import time

        self.process = subprocess.Popen(["unshare", "--user", "--net", "sleep", "600"])
        mine = os.stat("/proc/self/ns/user").st_ino
        for _ in range(250):
            if os.stat(f"/proc/{self.process.pid}/ns/user").st_ino != mine:
                break
            time.sleep(0.02)
        for name in ("uid_map", "gid_map"):
            Path(f"/proc/{self.process.pid}/{name}").write_text(f"0 {self.HOST_BASE} 65536\n")

    @property
    def netns(self) -> str:
        return f"/proc/{self.process.pid}/ns/net"

    def run(self, *command: str, as_pod: bool = True) -> str:
        """``command`` in the pod's network namespace, seen from the pod's user namespace or the host's."""
        user = [f"--user=/proc/{self.process.pid}/ns/user"] if as_pod else []
        return subprocess.run(["nsenter", *user, f"--net={self.netns}", *command], capture_output=True, text=True,
                              check=True, timeout=60).stdout

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
