"""The container image, built with podman and run as Kubernetes runs Istio's init container.

Slow (it builds an image), so it runs only from ``make image-test`` (ISTIO_IPTABLES_IMAGE_TEST=1).
Every container joins a throwaway "pod" namespace (``--network ns:/run/netns/<pod>``) with all
capabilities dropped but those the pod spec in deploy/ grants, and a read-only root filesystem.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator

import pytest

from tests.support import container
from tests.support.netns import NetNS, canonical_save

if os.environ.get("ISTIO_IPTABLES_IMAGE_TEST") != "1":
    pytest.skip("builds and runs the container image: run `make image-test`", allow_module_level=True)

POD = container.init_container("pod.yaml")
POD_ARGS: list[str] = POD["args"]  # ["istio-iptables", "-p", "15001", ...] exactly as the injector writes
POD_CAPS: list[str] = POD["securityContext"]["capabilities"]["add"]  # NET_ADMIN, NET_RAW
POD_ADDRESS = "10.244.1.5"
SERVICE = "10.96.0.10:80"  # "remote-looking": routed out of the pod, only capture brings it back
HOST_CLI = [sys.executable, "-m", "istio_iptables"]
PROBE = [sys.executable, str(container.REPO / "tests" / "beds" / "capture_probe.py")]
MAX_IMAGE_BYTES = 160 * 10**6


@pytest.fixture(scope="module")
def image() -> str:
    missing = [tool for tool in ("podman", "runc", "debootstrap") if shutil.which(tool) is None]
    assert not missing, f"missing {missing}: apt-get install podman runc debootstrap (make image-test does)"
    return container.build_image()


def make_pod(netns_factory: Callable[[str], NetNS], prefix: str = "iit-pod") -> NetNS:
    """A pod's network: eth0 with an address and a default route, so outbound traffic has a way out."""
    pod = netns_factory(prefix)
    for command in (
        ["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0-peer"],
        ["ip", "addr", "add", f"{POD_ADDRESS}/24", "dev", "eth0"],
        ["ip", "link", "set", "eth0", "up"],
        ["ip", "link", "set", "eth0-peer", "up"],
        ["ip", "route", "add", "default", "via", "10.244.1.1", "dev", "eth0"],
    ):
        pod.run(*command)
    return pod


@pytest.fixture
def pod(netns_factory: Callable[[str], NetNS]) -> NetNS:
    return make_pod(netns_factory)


@pytest.fixture
def named_container(image: str) -> Iterator[str]:
    """A container name to inspect after exit (``podman diff``); removed afterwards."""
    name = f"iit-{uuid.uuid4().hex[:10]}"
    yield name
    container.podman("rm", "--force", name, check=False)


def restore_documents(dry_run_output: str) -> list[str]:
    return re.split(r"(?m)^(?=# ip6?tables-restore$)", dry_run_output)[1:]


def loaded_by_the_host(namespace: NetNS, document: str, backend: str) -> list[str]:
    """The canonical dump after the host's own iptables-restore loads ``document``: the reference."""
    loaded = namespace.run(f"iptables-{backend}-restore", "--noflush", input=document, check=False)
    assert loaded.returncode == 0, loaded.stderr
    return canonical_save(namespace.save(f"iptables-{backend}-save"))


def istio_backend(pod: NetNS) -> str:
    """Which iptables backend holds the pod's ISTIO chains."""
    holding = [backend for backend in ("legacy", "nft") if "ISTIO_OUTPUT" in pod.save(f"iptables-{backend}-save")]
    assert len(holding) == 1, f"ISTIO chains found in {holding or 'no'} backend"
    return holding[0]


def captured(pod: NetNS, uid: int, timeout: float = 3.0) -> dict[str, object]:
    done = pod.run(*PROBE, "--uid", str(uid), "--to", SERVICE, "--timeout", str(timeout), timeout=timeout + 10)
    return json.loads(done.stdout)


def test_image_is_small(image: str) -> None:
    size = container.image_size(image)
    print(f"image size: {size / 1e6:.0f} MB")
    assert size < MAX_IMAGE_BYTES


def test_dry_run_needs_no_capability_and_matches_the_host(image: str, pod: NetNS) -> None:
    run = container.run_container([*POD_ARGS, "--dry-run"], network=f"ns:{pod.path}")
    assert run.returncode == 0, run.stderr
    host = pod.run(*HOST_CLI, *POD_ARGS[1:], "--dry-run")
    assert run.stdout == host.stdout
    assert "-A ISTIO_OUTPUT -j ISTIO_REDIRECT" in run.stdout
    # Nothing was written: the pod's netfilter tables are as empty as they started.
    for backend in ("legacy", "nft"):
        assert "ISTIO" not in pod.save(f"iptables-{backend}-save")


def test_starting_never_writes_bytecode(image: str, named_container: str) -> None:
    """Every module the tool can import has valid bytecode in the image, so a read-only root is safe.

    Bytecode writing is switched back on and the root left writable; ``podman diff`` then shows
    any .pyc Python had to (re)write. The package's modules and python-iptables are all
    imported, so the paths that apply rules are covered, not only the dry run.
    """
    imports = (
        "import pkgutil, importlib, istio_iptables, iptc;"
        "[importlib.import_module(m.name) for m in pkgutil.walk_packages(istio_iptables.__path__, 'istio_iptables.')"
        " if not m.name.endswith('.__main__')]"  # a __main__ runs its program when imported
    )
    run = container.run_container(
        ["-c", imports], network="none", read_only=False, remove=False, name=named_container,
        env={"PYTHONDONTWRITEBYTECODE": ""}, entrypoint="/opt/istio-iptables/bin/python",
    )
    assert run.returncode == 0, run.stderr
    changes = container.podman("diff", named_container).stdout.split()
    assert not [path for path in changes if path.endswith(".pyc") or "__pycache__" in path], changes


# A rule a pod may hold before its init container runs: detection then picks the legacy backend.
LEGACY_SEED = ("iptables-legacy", "-t", "filter", "-A", "INPUT", "-p", "255", "-j", "RETURN")
@pytest.mark.parametrize(
    ("backend", "read_only", "extra_args"),
    [
        pytest.param("nft", True, [], id="fresh-pod-nft-read-only-root"),
        # The injector's own securityContext leaves the root writable (readOnlyRootFilesystem: false).
        pytest.param("legacy", False, [], id="legacy-pod-writable-root"),
        pytest.param("legacy", True, [], id="legacy-pod-read-only-root"),
        # python-iptables in the image: its C helper built, its libraries found.
        pytest.param("legacy", False, ["--applier", "libiptc"], id="legacy-pod-libiptc-applier"),
    ],
)
def test_init_container_writes_the_rules_and_captures_traffic(
    image: str, pod: NetNS, netns: NetNS, backend: str, read_only: bool, extra_args: list[str]
) -> None:
    """The pod spec's init container, for real: then an application's connection lands on Envoy's port."""
    for namespace in (pod, netns) if backend == "legacy" else ():
        namespace.run(*LEGACY_SEED)
    dry_run = container.run_container([*POD_ARGS, "--dry-run"], network=f"ns:{pod.path}")
    assert dry_run.returncode == 0, dry_run.stderr

    run = container.run_container(
        [*POD_ARGS, *extra_args], network=f"ns:{pod.path}", caps=POD_CAPS, read_only=read_only
    )
    assert run.returncode == 0, run.stderr
    assert istio_backend(pod) == backend

    # The kernel holds exactly what the dry run printed (loaded by the host's iptables for reference).
    (document,) = restore_documents(dry_run.stdout)  # IPv4 only: the pod has no IPv6 address
    reference = loaded_by_the_host(netns, document, backend)
    assert canonical_save(pod.save(f"iptables-{backend}-save")) == reference

    assert captured(pod, uid=1000) == {"captured": True, "original_dst": SERVICE}
    # The proxy's own traffic (uid 1337) is never captured.
    assert captured(pod, uid=1337, timeout=1.5) == {"captured": False}

def test_node_agent_enters_the_pods_namespace(image: str, netns_factory: Callable[[str], NetNS]) -> None:
    """CNI mode: the tool runs in the node agent's namespace and writes into the pod's (setns)."""
    pod, node = make_pod(netns_factory), netns_factory("iit-node")
    run = container.run_container(
        [*POD_ARGS, "--cni-mode", "--network-namespace", pod.path],
        network=f"ns:{node.path}", caps=[*POD_CAPS, "SYS_ADMIN"], volumes=["/run/netns:/run/netns:ro"],
    )
    assert run.returncode == 0, run.stderr
    istio_backend(pod)
    for backend in ("legacy", "nft"):
        assert "ISTIO" not in node.save(f"iptables-{backend}-save")
    assert captured(pod, uid=1000) == {"captured": True, "original_dst": SERVICE}


def test_istio_cni_validation_container(image: str, netns_factory: Callable[[str], NetNS]) -> None:
    """With istio-cni the init container only checks, as uid 1337 with no capability: 0 or 126."""
    validation = container.init_container("pod-istio-cni.yaml")
    security = validation["securityContext"]
    assert not security["capabilities"].get("add") and security["readOnlyRootFilesystem"]
    user = f"{security['runAsUser']}:{security['runAsGroup']}"
    programmed, forgotten = make_pod(netns_factory), make_pod(netns_factory, "iit-bare")
    # Stand-in for the CNI plugin: the host's own iptables loads the rules the dry run prints.
    dry_run = container.run_container([*POD_ARGS, "--dry-run"], network=f"ns:{programmed.path}")
    (document,) = restore_documents(dry_run.stdout)
    loaded_by_the_host(programmed, document, "nft")

    passed = container.run_container(validation["args"], network=f"ns:{programmed.path}", user=user)
    assert passed.returncode == 0, passed.stderr
    failed = container.run_container(validation["args"], network=f"ns:{forgotten.path}", user=user)
    assert failed.returncode == 126, failed.stderr
