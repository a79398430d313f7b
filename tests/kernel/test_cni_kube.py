"""The Kubernetes API client (istio_iptables/system/kube.py) against a local HTTPS endpoint.

No API server can be installed on these machines: tests/cni_support.FakeApiServer serves Pod
objects in Kubernetes' JSON over TLS (a certificate made by the test), the API's 404 and 401
Status objects, and a request that never gets an answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from istio_iptables.system import kube
from tests.support.cni_support import FakeApiServer, api, invoke, network_config, prev_result, sidecar_pod
from tests.support.netns import NetNS, canonical_save

__all__ = ["api"]


def client_for(api: FakeApiServer, tmp_path: Path, timeout: float = 5, token: str | None = None) -> kube.KubeClient:
    path = api.write_kubeconfig(tmp_path / "kubeconfig", **({"token": token} if token else {}))
    return kube.KubeClient(kube.load_config(str(path)), timeout=timeout)


def test_reads_a_pod(api: FakeApiServer, tmp_path: Path) -> None:
    api.add_pod(sidecar_pod())
    pod = client_for(api, tmp_path).get_pod("testNSName", "testPodName")
    assert pod["metadata"]["name"] == "testPodName"
    assert api.requests == ["/api/v1/namespaces/testNSName/pods/testPodName"]


def test_404_and_401_are_named_and_not_retried(api: FakeApiServer, tmp_path: Path) -> None:
    with pytest.raises(kube.KubeError) as missing:
        client_for(api, tmp_path).get_pod("default", "gone")
    assert missing.value.status == 404 and not missing.value.transient and 'pods "gone" not found' in str(missing.value)
    with pytest.raises(kube.KubeError) as refused:
        client_for(api, tmp_path, token="stale").get_pod("default", "gone")
    assert refused.value.status == 401 and "unauthorized" in str(refused.value)
    calls = []
    with pytest.raises(kube.KubeError):
        kube.with_retries(lambda: calls.append(1) or client_for(api, tmp_path).get_pod("a", "b"), 5, 0.01)
    assert len(calls) == 1


def test_a_hanging_server_times_out(api: FakeApiServer, tmp_path: Path) -> None:
    api.hang.add(("default", "slow"))
    started = time.monotonic()
    with pytest.raises(kube.KubeError) as hung:
        client_for(api, tmp_path, timeout=0.5).get_pod("default", "slow")
    assert hung.value.transient and "did not answer within 0.5s" in str(hung.value)
    assert time.monotonic() - started < 10


def test_the_certificate_is_checked(api: FakeApiServer, tmp_path: Path) -> None:
    config = kube.KubeConfig(api.url, token="x", ca_file="/etc/ssl/certs/ca-certificates.crt")
    with pytest.raises(kube.KubeError, match="cannot reach"):
        kube.KubeClient(config).get_pod("a", "b")


KUBECONFIGS = [
    # Istio's install-cni template, as written (token, CA data, quoted context names).
    "apiVersion: v1\nkind: Config\nclusters:\n- cluster:\n    certificate-authority-data: QUJD\n"
    "    server: https://10.96.0.1:443\n  name: local\ncontexts:\n- context:\n    cluster: local\n"
    "    user: istio-cni\n  name: istio-cni-context\ncurrent-context: istio-cni-context\n"
    "users:\n- name: istio-cni\n  user:\n    token: \"abc.def\"\n",
    # kubectl's style: sequences at the key's indentation, comments, booleans, empty maps.
    "# written by kubectl\napiVersion: v1\nclusters:\n- cluster:\n    insecure-skip-tls-verify: true\n"
    "    server: 'https://[fd00::1]:6443'\n  name: c1\ncontexts:\n- context:\n    cluster: c1\n"
    "    namespace: default\n    user: u1\n  name: ctx\ncurrent-context: ctx\nkind: Config\npreferences: {}\n"
    "users:\n- name: u1\n  user:\n    tokenFile: token  # relative to the file\n",
]


@pytest.mark.parametrize("text", KUBECONFIGS)
def test_kubeconfig_reader_agrees_with_pyyaml(text: str) -> None:
    import yaml

    assert kube.read_kubeconfig_text(text) == yaml.safe_load(text)


def test_kubeconfig_resolution(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("from-file\n")
    path = tmp_path / "kubeconfig"
    path.write_text(KUBECONFIGS[1])
    config = kube.load_config(str(path))
    assert (config.server, config.token, config.insecure) == ("https://[fd00::1]:6443", "from-file", True)
    with pytest.raises(kube.KubeError, match="cannot read the kubeconfig"):
        kube.load_config(str(tmp_path / "missing"))


# --- the plugin when the facts cannot be read: a clear error, nothing written -------------


def plugin_config(kubeconfig: Path, **kubernetes: Any) -> dict[str, Any]:
    return network_config(prev_result=prev_result(), kubernetes={"kubeconfig": str(kubeconfig), **kubernetes})


def all_rules(namespace: NetNS) -> list[str]:
    return canonical_save(namespace.save("iptables-nft-save")) + canonical_save(namespace.save("iptables-legacy-save"))


@pytest.mark.parametrize(
    ("setup", "code", "words"),
    [
        (lambda api, path: api.write_kubeconfig(path), 105, "not found (HTTP 404"),
        (lambda api, path: api.write_kubeconfig(path, token="expired"), 105, "unauthorized"),
        (lambda api, path: (api.hang.add(("testNSName", "testPodName")), api.write_kubeconfig(path))[1], 11,
         "did not answer"),
        (lambda api, path: path, 105, "cannot read the kubeconfig"),
    ],
    ids=["404", "401", "timeout", "no-kubeconfig"],
)
def test_add_fails_clearly_when_the_pod_cannot_be_read(
    setup: Callable[[FakeApiServer, Path], Path], code: int, words: str, netns: NetNS, api: FakeApiServer,
    tmp_path: Path,
) -> None:
    kubeconfig = setup(api, tmp_path / "kubeconfig")
    started = time.monotonic()
    status, answer, stderr = invoke(
        "ADD", plugin_config(kubeconfig, request_timeout_seconds=1, pod_retrieval_attempts=2), netns=netns.path
    )
    assert status == 1 and answer["code"] == code and words in answer["msg"], answer
    assert "Traceback" not in stderr
    assert "no rules written" in answer["msg"] or code == 105
    assert time.monotonic() - started < 30
    assert all_rules(netns) == []


def test_kubeconfig_is_found_in_the_agent_run_dir(netns: NetNS, api: FakeApiServer, tmp_path: Path) -> None:
    api.add_pod(sidecar_pod())
    api.write_kubeconfig(tmp_path / "istio-cni-kubeconfig")
    config = network_config(prev_result=prev_result(), cni_agent_run_dir=str(tmp_path))
    status, answer, stderr = invoke("ADD", config, netns=netns.path)
    assert status == 0 and answer == prev_result(), stderr
    assert any("ISTIO_OUTPUT" in line for line in all_rules(netns))


def test_client_certificate_data_leaves_no_file_behind(api: FakeApiServer, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import base64

    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    document = kube.read_kubeconfig_text(api.write_kubeconfig(tmp_path / "kubeconfig").read_text())
    document["users"][0]["user"] = {
        "client-certificate-data": base64.b64encode(api.cert.read_bytes()).decode(),
        "client-key-data": base64.b64encode(api.key.read_bytes()).decode(),
    }
    config = kube.config_from_kubeconfig(document, str(tmp_path), "test")
    kube.KubeClient(config)._tls()
    assert list((tmp_path / "tmp").iterdir()) == []
