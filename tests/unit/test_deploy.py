"""deploy/: the manifests are valid Kubernetes objects (checked offline) and their argv works."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.support.cli_support import INJECTOR_ARGV
from tests.support.container import init_container, manifests

# The oldest Kubernetes Istio still supports, and the newest the bundled schemas know.
KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.utils.latest_version() + ".0")
CLI = [sys.executable, "-m", "istio_iptables"]


def documents(path: Path) -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("manifest", manifests(), ids=lambda path: path.name)
def test_manifest_is_a_valid_kubernetes_object(manifest: Path, version: str) -> None:
    for document in documents(manifest):
        kubernetes_validate.validate(document, version, strict=True)


def test_validator_really_checks_offline() -> None:
    """A typo in a field name and a wrongly typed field are refused: the check is not a no-op."""
    pod = documents(next(path for path in manifests() if path.name == "pod.yaml"))[0]
    misspelt = copy.deepcopy(pod)
    misspelt["spec"]["initContainers"][0]["securityContext"]["readOnlyRootFileSystem"] = True
    mistyped = copy.deepcopy(pod)
    mistyped["spec"]["initContainers"][0]["securityContext"]["capabilities"]["add"] = "NET_ADMIN"
    for broken in (misspelt, mistyped):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


def test_init_container_is_the_injectors() -> None:
    """Root with only NET_ADMIN and NET_RAW, and the injector's argv behind its `istio-iptables`."""
    container = init_container("pod.yaml")
    assert container["name"] == "istio-init"
    assert container["args"] == ["istio-iptables", *INJECTOR_ARGV]
    security = container["securityContext"]
    assert security["capabilities"] == {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]}
    assert (security["runAsUser"], security["runAsNonRoot"], security["allowPrivilegeEscalation"]) == (
        0, False, False,
    )


def test_istio_cni_variant_only_validates_as_the_proxy_user() -> None:
    sidecar, cni = init_container("pod.yaml"), init_container("pod-istio-cni.yaml")
    assert cni["name"] == "istio-validation"
    assert cni["args"] == [*sidecar["args"], "--run-validation", "--skip-rule-apply"]
    security = cni["securityContext"]
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert (security["runAsUser"], security["runAsGroup"], security["readOnlyRootFilesystem"]) == (
        1337, 1337, True,
    )


def test_manifest_argv_runs_unchanged() -> None:
    """The leading `istio-iptables` pilot-agent needs is accepted: same rules as the bare flags."""
    manifest_args = init_container("pod.yaml")["args"]
    with_name = subprocess.run([*CLI, *manifest_args, "--dry-run"], capture_output=True, text=True)
    bare = subprocess.run([*CLI, *INJECTOR_ARGV, "--dry-run"], capture_output=True, text=True)
    assert with_name.returncode == bare.returncode == 0, with_name.stderr + bare.stderr
    assert with_name.stdout == bare.stdout
    assert "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001" in with_name.stdout
