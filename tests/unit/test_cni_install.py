"""``istio-cni install``/``uninstall`` make the edits of Istio's install-cni (its testdata goldens)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from istio_iptables.frontends.cni.install import (
    InstallError,
    find_config_file,
    insert,
    install,
    marshal,
    plugin_config,
    uninstall,
)
from tests.support.cni_support import PLUGIN

DATA = Path(__file__).parent.parent / "data" / "cni-install"


def istio_test_config(**changes: object) -> dict[str, object]:
    """What Istio's tests install: log level debug, run dir /path/to/kubeconfig, namespace my-namespace."""
    return plugin_config(log_level="debug", agent_run_dir="/path/to/kubeconfig", pod_namespace="my-namespace",
                         **changes)  # type: ignore[arg-type]


def test_our_entry_is_istios() -> None:
    assert marshal(istio_test_config(), sort_keys=False) == (DATA / "istio-cni.conf").read_text()


@pytest.mark.parametrize("existing", ["bridge.conf", "list.conflist", "list-with-istio.conflist"])
def test_insert_matches_istios_golden(existing: str) -> None:
    ours = json.loads((DATA / "istio-cni.conf").read_text())
    assert insert(ours, (DATA / existing).read_text()) == (DATA / f"{existing}.golden").read_text()


@pytest.mark.parametrize(("existing", "ours"), [("invalid-map.conflist", "istio-cni.conf"),
                                                 ("invalid-arr.conflist", "istio-cni.conf")])
def test_invalid_configurations_are_refused(existing: str, ours: str) -> None:
    with pytest.raises(InstallError):
        insert(json.loads((DATA / ours).read_text()), (DATA / existing).read_text())


def node_dir(tmp_path: Path) -> Path:
    for name in ("bridge.conf", "list.conflist"):
        shutil.copy(DATA / name, tmp_path / name)
    return tmp_path


def test_install_picks_the_first_file_and_renames_a_conf(tmp_path: Path) -> None:
    directory = node_dir(tmp_path)
    os.chmod(directory / "bridge.conf", 0o600)
    path = install(str(directory), istio_test_config())
    assert path == str(directory / "bridge.conflist") and not (directory / "bridge.conf").exists()
    assert Path(path).read_text() == (DATA / "bridge.conf.golden").read_text()
    assert os.stat(path).st_mode & 0o777 == 0o600  # the node's file keeps its mode


@pytest.mark.parametrize("name", ["list.conflist", "list.conf"])
def test_install_into_a_named_file(tmp_path: Path, name: str) -> None:
    directory = node_dir(tmp_path)
    path = install(str(directory), istio_test_config(), name=name)
    assert Path(path).read_text() == (DATA / "list.conflist.golden").read_text()


@pytest.mark.parametrize(
    ("name", "golden", "node_file"),
    [("list.conflist", "istio-owned.conflist.golden", "list.conflist"),
     ("list.conf", "istio-owned.conflist.golden", "list.conflist"),
     ("bridge.conflist", "istio-owned-bridge.conflist.golden", "bridge.conf")],
)
def test_istio_owned_file_leaves_the_nodes_alone(tmp_path: Path, name: str, golden: str, node_file: str) -> None:
    directory = node_dir(tmp_path)
    path = install(str(directory), istio_test_config(ambient_enabled=True), name=name,
                   istio_owned="02-istio-conf.conflist")
    assert Path(path).read_text() == (DATA / golden).read_text()
    assert (directory / node_file).read_text() == (DATA / node_file).read_text()
    assert uninstall(str(directory), istio_owned="02-istio-conf.conflist") == path and not Path(path).exists()


def test_standalone(tmp_path: Path) -> None:
    path = install(str(tmp_path), istio_test_config(), chained=False)
    assert path.endswith("YYY-istio-cni.conf")
    assert Path(path).read_text() == (DATA / "istio-cni.conf").read_text()


def test_uninstall_takes_only_our_entry_out(tmp_path: Path) -> None:
    directory = node_dir(tmp_path)
    path = install(str(directory), istio_test_config(), name="list.conflist")
    install(str(directory), istio_test_config(), name="list.conflist")  # twice: still one entry
    assert json.loads(Path(path).read_text())["plugins"][-1]["type"] == "istio-cni"
    assert sum(p["type"] == "istio-cni" for p in json.loads(Path(path).read_text())["plugins"]) == 1
    assert uninstall(str(directory)) == path
    assert json.loads(Path(path).read_text()) == json.loads((DATA / "list.conflist").read_text())
    assert uninstall(str(directory)) is None


def test_no_configuration_to_chain_into(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("{}")
    (tmp_path / "broken.conf").write_text("{")
    with pytest.raises(InstallError, match="no valid CNI network configuration"):
        find_config_file(str(tmp_path))


def test_the_command(tmp_path: Path) -> None:
    directory = node_dir(tmp_path)
    done = subprocess.run([*PLUGIN, "install", "--cni-conf-dir", str(directory), "--exclude-namespaces",
                           "kube-system,istio-system"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    entry = json.loads((directory / "bridge.conflist").read_text())["plugins"][-1]
    assert entry["exclude_namespaces"] == ["kube-system", "istio-system"]
    assert "capabilities" not in entry
    done = subprocess.run([*PLUGIN, "install", "--cni-conf-dir", str(directory), "--pod-annotations-capability"],
                          capture_output=True, text=True, timeout=30)
    entry = json.loads((directory / "bridge.conflist").read_text())["plugins"][-1]
    assert entry["capabilities"] == {"io.kubernetes.cri.pod-annotations": True}
    done = subprocess.run([*PLUGIN, "uninstall", "--cni-conf-dir", str(directory)], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0 and "removed from" in done.stderr
    done = subprocess.run([*PLUGIN, "install", "--cni-conf-dir", str(tmp_path / "none")], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 1 and "Traceback" not in done.stderr


def test_kubeconfig_from_the_service_account(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from istio_iptables.frontends.cni.install import write_kubeconfig
    from istio_iptables.system.kube import load_config

    (tmp_path / "token").write_text("sa-token\n")
    (tmp_path / "ca.crt").write_bytes(b"-----BEGIN CERTIFICATE-----\n")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    path = tmp_path / "run" / "istio-cni-kubeconfig"
    write_kubeconfig(str(path), str(tmp_path))
    config = load_config(str(path))
    assert (config.server, config.token, config.ca_data) == ("https://10.96.0.1:443", "sa-token",
                                                              b"-----BEGIN CERTIFICATE-----\n")
    assert os.stat(path).st_mode & 0o777 == 0o600
