"""``hostUsers: false`` pods: their network namespace belongs to their own user namespace.

The kernel takes owner (uid/gid) matches only from a writer in that user namespace (from the
host's: EINVAL), and reads their uids through that namespace's map. Istio runs iptables through ``nsenter --user
--net`` for such pods; our plugin enters the same two namespaces (tests/cni_support.UserNamespacePod
makes one as the kubelet would: uids 0-65535 of the pod are 100000-165535 of the host).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_kernel
from tests.support.cni_support import (
    FakeApiServer,
    UserNamespacePod,
    api,
    invoke,
    network_config,
    prev_result,
    sidecar_pod,
)

__all__ = ["api"]
pytestmark = pytest.mark.netns


@pytest.fixture
def pod_sandbox() -> Iterator[UserNamespacePod]:
    require_kernel()
    sandbox = UserNamespacePod()
    try:
        yield sandbox
    finally:
        sandbox.close()


def test_rules_are_written_in_the_pods_user_namespace(
    pod_sandbox: UserNamespacePod, api: FakeApiServer, tmp_path: Path
) -> None:
    api.add_pod(sidecar_pod())
    config = network_config(prev_result=prev_result(),
                            kubernetes={"kubeconfig": str(api.write_kubeconfig(tmp_path / "kubeconfig"))})
    code, answer, stderr = invoke("ADD", config, netns=pod_sandbox.netns)
    assert (code, answer) == (0, prev_result()), stderr
    assert "-m owner --uid-owner 1337 -j RETURN" in pod_sandbox.run("iptables-nft-save")
    # Why the plugin must enter the pod's user namespace: the same owner match, written from the
    # host's, is refused by the kernel.
    with pytest.raises(subprocess.CalledProcessError) as refused:
        pod_sandbox.run("iptables-nft", "-t", "nat", "-A", "OUTPUT", "-m", "owner", "--uid-owner", "1337", "-j",
                        "RETURN", as_pod=False)
    assert "Invalid argument" in refused.value.stderr
    assert invoke("CHECK", config, netns=pod_sandbox.netns)[:2] == (0, None)
    assert invoke("DEL", config, netns=pod_sandbox.netns)[:2] == (0, None)
    assert "ISTIO" not in pod_sandbox.run("iptables-nft-save")


def test_a_refused_write_is_reported_from_the_pods_namespace(
    pod_sandbox: UserNamespacePod, api: FakeApiServer, tmp_path: Path
) -> None:
    """An error inside the user namespace comes back as the plugin's error document, not a crash."""
    pod = sidecar_pod()
    pod["spec"]["containers"][1]["securityContext"] = {"runAsUser": 70000}  # not mapped in the pod
    api.add_pod(pod)
    config = network_config(prev_result=prev_result(),
                            kubernetes={"kubeconfig": str(api.write_kubeconfig(tmp_path / "kubeconfig"))})
    code, answer, stderr = invoke("ADD", config, netns=pod_sandbox.netns)
    assert code == 1 and answer["code"] in (101, 104), answer
    assert "Traceback" not in stderr
    assert "ISTIO" not in pod_sandbox.run("iptables-nft-save")
