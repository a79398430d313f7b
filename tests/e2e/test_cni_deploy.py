"""deploy/istio-cni-daemonset.yaml: the plugin script it installs on the node starts the plugin."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.support.container import DEPLOY, REPO


def install_script() -> str:
    documents = list(yaml.safe_load_all((DEPLOY / "istio-cni-daemonset.yaml").read_text()))
    (daemonset,) = [document for document in documents if document["kind"] == "DaemonSet"]
    (container,) = daemonset["spec"]["template"]["spec"]["containers"]
    return container["command"][-1]


def test_the_node_plugin_script_answers_version(tmp_path: Path) -> None:
    script = install_script()
    plugin = script.split("<<'PLUGIN'\n", 1)[1].split("\nPLUGIN\n", 1)[0]
    assert plugin.startswith("#!/usr/bin/python3 -I\n")
    # As installed, with the package where the DaemonSet copies it (here: this checkout).
    body = plugin.split("\n", 1)[1].replace("/opt/cni/istio-iptables", str(REPO))
    (tmp_path / "istio-cni").write_text(body)
    done = subprocess.run([sys.executable, "-I", str(tmp_path / "istio-cni")], input='{"cniVersion": "0.4.0"}',
                          capture_output=True, text=True, env={**os.environ, "CNI_COMMAND": "VERSION"}, timeout=30)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["cniVersion"] == "0.4.0"


def test_the_daemonset_chains_the_plugin_and_takes_it_out() -> None:
    script = install_script()
    assert "istio-cni install --cni-conf-dir /host/etc/cni/net.d" in script and "--write-kubeconfig" in script
    documents = list(yaml.safe_load_all((DEPLOY / "istio-cni-daemonset.yaml").read_text()))
    (daemonset,) = [document for document in documents if document["kind"] == "DaemonSet"]
    container = daemonset["spec"]["template"]["spec"]["containers"][0]
    assert container["lifecycle"]["preStop"]["exec"]["command"][:2] == ["istio-cni", "uninstall"]
    (role,) = [document for document in documents if document["kind"] == "ClusterRole"]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods", "namespaces"], "verbs": ["get"]}]
