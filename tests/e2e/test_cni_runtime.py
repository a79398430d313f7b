"""A real container runtime calls istio-cni: podman (CNI backend, runc) with Debian's bridge plugin first.

Podman's CNI backend runs the network's plugin chain from ``/usr/lib/cni`` (containernetworking-
plugins) and ours from a plugin directory of the test, exactly as a node's runtime would: bridge +
host-local create the container's interface and address, istio-cni gets bridge's result as
``prevResult``, reads the pod from the (local) API server and writes its rules; podman then starts
the container. The container's first process (uid 1000, busybox) listens on 15001 and connects to
the bridge's gateway: the connection lands on 15001, never on the host's listener. Removing the
container calls DEL, and nothing of the pod is left.

Podman passes ``K8S_POD_NAME`` (the container's name) but no ``K8S_POD_NAMESPACE`` (it is not
Kubernetes), which Istio's plugin, and ours by default, treat as "not a pod". The network
configuration sets our ``assume_pod_namespace`` so the container is looked up as a pod of
``default``. No registry is reachable: the image is busybox-static from Debian, ``podman import``ed.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cni_support import FakeApiServer, api, sidecar_pod
from tests.support.container import REPO, RUN_LIMITS

__all__ = ["api"]
if os.environ.get("ISTIO_IPTABLES_CNI_RUNTIME_TEST") != "1":
    pytest.skip("runs podman with a CNI network: run `make cni-runtime-test`", allow_module_level=True)

IMAGE = "localhost/istio-cni-test-busybox:1"
CNI_PLUGINS = Path("/usr/lib/cni")
BUSYBOX_TOOLS = ("sh", "sleep", "nc", "cat", "echo")


def podman(
    *args: str, config: Path | None = None, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **({"CONTAINERS_CONF": str(config)} if config else {})}
    return subprocess.run(["podman", "--runtime", "runc", *args], capture_output=True, text=True, env=env,
                          check=check, timeout=timeout)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    missing = [tool for tool in ("podman", "runc", "busybox") if shutil.which(tool) is None]
    missing += [] if (CNI_PLUGINS / "bridge").exists() else ["containernetworking-plugins"]
    assert not missing, f"missing {missing}: make cni-runtime-test installs them"
    if podman("image", "exists", IMAGE, check=False).returncode != 0:
        rootfs = tmp_path_factory.mktemp("rootfs")
        (rootfs / "bin").mkdir()
        shutil.copy(shutil.which("busybox") or "", rootfs / "bin" / "busybox")
        for tool in BUSYBOX_TOOLS:
            (rootfs / "bin" / tool).symlink_to("busybox")
        archive = rootfs.parent / "rootfs.tar"
        subprocess.run(["tar", "-C", str(rootfs), "-cf", str(archive), "."], check=True)
        podman("import", str(archive), IMAGE)
    return IMAGE


class HostListener:
    """A TCP listener on the host (the bridge's gateway is a host address): counts who reaches it."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("0.0.0.0", 0))
        self.port = self.socket.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            self.accepted += 1
            connection.close()


@pytest.fixture
def node(tmp_path: Path, api: FakeApiServer) -> Iterator[dict[str, object]]:
    """A CNI network of bridge + istio-cni, a containers.conf pointing podman at it."""
    octet = 200 + uuid.uuid4().int % 50
    bridge = f"iitcni{uuid.uuid4().hex[:6]}"
    plugin_dir, conf_dir, run_dir = tmp_path / "bin", tmp_path / "net.d", tmp_path / "run"
    for directory in (plugin_dir, conf_dir, run_dir):
        directory.mkdir()
    plugin = plugin_dir / "istio-cni"
    plugin.write_text(
        f"#!{sys.executable} -I\nimport sys\nsys.path.insert(0, {str(REPO)!r})\n"
        "from istio_iptables.frontends.cni.plugin import program\nprogram()\n"
    )
    plugin.chmod(0o755)
    network = f"iitcni-{uuid.uuid4().hex[:8]}"
    gateway = f"10.{octet}.0.1"
    conflist = {
        "cniVersion": "0.4.0",
        "name": network,
        "plugins": [
            {"type": "bridge", "bridge": bridge, "isGateway": True, "ipMasq": False,
             "ipam": {"type": "host-local", "routes": [{"dst": "0.0.0.0/0"}],
                      "ranges": [[{"subnet": f"10.{octet}.0.0/24", "gateway": gateway}]]}},
            {"type": "istio-cni", "plugin_log_level": "debug", "cni_agent_run_dir": str(run_dir),
             "assume_pod_namespace": "default",
             "kubernetes": {"kubeconfig": str(api.write_kubeconfig(tmp_path / "kubeconfig"))}},
        ],
    }
    (conf_dir / f"{network}.conflist").write_text(json.dumps(conflist))
    config = tmp_path / "containers.conf"
    config.write_text(
        f'[network]\nnetwork_backend = "cni"\ncni_plugin_dirs = ["{plugin_dir}", "{CNI_PLUGINS}"]\n'
        f'network_config_dir = "{conf_dir}"\n'
    )
    yield {"config": config, "network": network, "gateway": gateway, "log": run_dir / "istio-cni.log"}
    subprocess.run(["ip", "link", "del", bridge], capture_output=True, check=False)
    shutil.rmtree(Path("/var/lib/cni/networks") / network, ignore_errors=True)  # host-local's leases


def test_a_pod_started_by_podman_is_captured_from_its_first_process(
    image: str, node: dict[str, object], api: FakeApiServer
) -> None:
    name = f"iitcni-{uuid.uuid4().hex[:8]}"
    api.add_pod(sidecar_pod(name=name, namespace="default"))
    host = HostListener()
    first_process = (
        "nc -l -p 15001 > /tmp/landed & sleep 0.5; "
        f"echo hello-from-app | nc -w 2 {node['gateway']} {host.port}; sleep 0.5; "
        'echo "landed on 15001: $(cat /tmp/landed)"; sleep 60'
    )
    config = node["config"]
    assert isinstance(config, Path)
    try:
        podman("run", "-d", "--name", name, "--network", str(node["network"]), *RUN_LIMITS, "--user", "1000",
               "--tmpfs", "/tmp", image, "sh", "-c", first_process, config=config)
        sandbox = podman("inspect", "--format", "{{.NetworkSettings.SandboxKey}}", name, config=config).stdout.strip()
        output = ""
        for _ in range(100):
            output = podman("logs", name, config=config).stdout
            if "landed" in output:
                break
            time.sleep(0.1)
        assert "landed on 15001: hello-from-app" in output, (output, node["log"].read_text())  # type: ignore[union-attr]
        assert host.accepted == 0
        rules = subprocess.run(["nsenter", f"--net={sandbox}", "iptables-nft-save"], capture_output=True, text=True,
                               check=True).stdout
        assert "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001" in rules
    finally:
        podman("rm", "--force", "--time", "0", name, config=config, check=False)
    log = [json.loads(line) for line in node["log"].read_text().splitlines()]  # type: ignore[union-attr]
    messages = [entry["msg"] for entry in log]
    assert any(f"programming iptables for pod default/{name}" in message for message in messages)
    assert not any(entry["level"] == "error" for entry in log), messages
    assert api.requests == [f"/api/v1/namespaces/default/pods/{name}"]
    # DEL ran (the cleanup's own log lines), and the sandbox is gone with nothing of ours left behind.
    assert any("cleanup_only=true" in message for message in messages)
    assert not Path(sandbox).exists()


def test_a_pod_that_istio_skips_starts_untouched(image: str, node: dict[str, object], api: FakeApiServer) -> None:
    name = f"iitcni-{uuid.uuid4().hex[:8]}"
    pod = sidecar_pod(name=name, namespace="default")
    pod["metadata"]["annotations"].clear()  # not injected
    api.add_pod(pod)
    config = node["config"]
    assert isinstance(config, Path)
    done = podman("run", "--rm", "--name", name, "--network", str(node["network"]), *RUN_LIMITS, image,
                  "sh", "-c", "echo started", config=config, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "started", done.stderr
    messages = [json.loads(line)["msg"] for line in node["log"].read_text().splitlines()]  # type: ignore[union-attr]
    assert any("excluded: no sidecar.istio.io/status annotation" in message for message in messages)
