"""``istio-cni install`` / ``uninstall``: chain the plugin into the node's CNI configuration, and take it out.

The same edits as Istio's install-cni (``cni/pkg/install/cniconfig.go``; its testdata goldens are
this module's tests):
- chained (the default): the first valid ``.conf``/``.conflist`` of the directory, in name order
  (or the one named), gets our plugin appended to its ``plugins``; a single-plugin ``.conf`` becomes
  a ``k8s-pod-network`` list (cniVersion 0.3.1) and is renamed to ``.conflist``; an istio-cni entry
  already there is replaced; the file keeps its mode;
- ``--istio-owned-conf NAME``: the chained list is written to a file of our own instead;
- standalone (``--no-chained``): our configuration alone, in ``YYY-istio-cni.conf`` by default.
Uninstall removes our entry from the list (or our own file). Writes are atomic (rename).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

PLUGIN_TYPE = "istio-cni"
STANDALONE_NAME = "YYY-istio-cni.conf"
CONFIG_EXTENSIONS = (".conf", ".conflist")


class InstallError(Exception):
    pass


def plugin_config(
    *,
    log_level: str = "info",
    agent_run_dir: str = "/var/run/istio-cni",
    ambient_enabled: bool = False,
    enablement_selectors: Sequence[Any] = (),
    exclude_namespaces: Sequence[str] = (),
    pod_namespace: str = "istio-system",
    native_nftables: bool = False,
    enable_ambient_detection_retry: bool = False,
) -> dict[str, Any]:
    """Our entry, with the fields and in the order Istio's install-cni writes them."""
    return {
        "cniVersion": "0.3.1",
        "name": PLUGIN_TYPE,
        "type": PLUGIN_TYPE,
        "ipam": {},
        "dns": {},
        "plugin_log_level": log_level,
        "cni_agent_run_dir": agent_run_dir,
        "ambient_enabled": ambient_enabled,
        "enablement_selectors": list(enablement_selectors),
        "exclude_namespaces": list(exclude_namespaces) or None,
        "pod_namespace": pod_namespace,
        "native_nftables": native_nftables,
        "enable_ambient_detection_retry": enable_ambient_detection_retry,
    }


def marshal(document: Any, sort_keys: bool = True) -> str:
    """As Go's ``json.MarshalIndent(v, "", "  ")`` + newline: maps sorted, HTML characters escaped."""
    text = json.dumps(document, indent=2, sort_keys=sort_keys, ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026") + "\n"


def insert(ours: Mapping[str, Any], existing_text: str) -> str:
    """Istio's ``insertCNIConfig``: the existing configuration with our entry chained last."""
    entry = dict(ours)
    entry.pop("cniVersion", None)
    try:
        existing = json.loads(existing_text)
    except ValueError as error:
        raise InstallError(f"the existing CNI configuration is not JSON: {error}") from None
    if not isinstance(existing, dict):
        raise InstallError("the existing CNI configuration is not a JSON object")
    if "type" in existing:
        existing.pop("cniVersion", None)
        chained: dict[str, Any] = {"name": "k8s-pod-network", "cniVersion": "0.3.1", "plugins": [existing, entry]}
    else:
        chained = existing
        plugins = _plugins(chained)
        for index, plugin in enumerate(plugins):
            if plugin.get("type") == PLUGIN_TYPE:
                del plugins[index]
                break
        chained["plugins"] = [*plugins, entry]
    return marshal(chained)


def without_our_plugin(existing_text: str) -> str:
    """The configuration without our entry (Istio's ``Installer.Cleanup``)."""
    try:
        existing = json.loads(existing_text)
    except ValueError as error:
        raise InstallError(f"the CNI configuration is not JSON: {error}") from None
    if not isinstance(existing, dict):
        raise InstallError("the CNI configuration is not a JSON object")
    plugins = _plugins(existing)
    existing["plugins"] = [plugin for plugin in plugins if plugin.get("type") != PLUGIN_TYPE]
    return marshal(existing)


def _plugins(config: dict[str, Any]) -> list[dict[str, Any]]:
    plugins = config.get("plugins")
    if not isinstance(plugins, list):
        raise InstallError("the CNI configuration has no plugins list")
    if not all(isinstance(plugin, dict) for plugin in plugins):
        raise InstallError("a plugin of the CNI configuration is not a JSON object")
    return plugins


def find_config_file(directory: str, name: str = "") -> str:
    """The file to chain into: the one named (``.conf``/``.conflist`` swapped if only the other
    exists), else the first valid configuration in name order, as libcni lists them."""
    if name:
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return path
        if path.endswith(".conf") and os.path.exists(path + "list"):
            return path + "list"
        if path.endswith(".conflist") and os.path.exists(path[:-4]):
            return path[:-4]
        raise InstallError(f"the CNI configuration {path} does not exist")
    try:
        names = sorted(entry for entry in os.listdir(directory) if entry.endswith(CONFIG_EXTENSIONS))
    except OSError as error:
        raise InstallError(f"cannot list {directory}: {error.strerror}") from None
    for candidate in names:
        path = os.path.join(directory, candidate)
        try:
            with open(path, encoding="utf-8") as handle:
                config = json.load(handle)
        except (OSError, ValueError):
            continue
        if not isinstance(config, dict):
            continue
        if candidate.endswith(".conflist") and isinstance(config.get("plugins"), list) and config["plugins"]:
            return path
        if candidate.endswith(".conf") and config.get("type"):
            return path
    raise InstallError(f"no valid CNI network configuration in {directory}")


def write_atomically(path: str, text: str, mode: int) -> None:
    temporary = f"{path}.istio-cni.tmp"
    with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(temporary, mode)
    os.replace(temporary, path)


def install(directory: str, ours: Mapping[str, Any], *, name: str = "", chained: bool = True,
            istio_owned: str = "") -> str:
    """Write our configuration; returns the path written."""
    if not chained:
        path = os.path.join(directory, name or STANDALONE_NAME)
        write_atomically(path, marshal(ours, sort_keys=False), 0o644)
        return path
    source = find_config_file(directory, name)
    with open(source, encoding="utf-8") as handle:
        text = insert(ours, handle.read())
    if istio_owned:
        target = os.path.join(directory, istio_owned)
        write_atomically(target, text, 0o644)
        return target
    mode = os.stat(source).st_mode & 0o7777
    write_atomically(source, text, mode)
    if source.endswith(".conf"):
        os.rename(source, source + "list")
        source += "list"
    return source


def uninstall(directory: str, *, name: str = "", chained: bool = True, istio_owned: str = "") -> str | None:
    """Take our configuration out again; returns the path changed or removed, None if nothing was ours."""
    if not chained or istio_owned:
        path = os.path.join(directory, istio_owned or name or STANDALONE_NAME)
        if os.path.exists(path):
            os.remove(path)
            return path
        return None
    for candidate in sorted(os.listdir(directory)) if not name else [name]:
        path = os.path.join(directory, candidate)
        if not candidate.endswith(CONFIG_EXTENSIONS) or not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        try:
            config = json.loads(text)
        except ValueError:
            continue
        plugins = config.get("plugins") if isinstance(config, dict) else None
        if isinstance(plugins, list) and any(isinstance(p, dict) and p.get("type") == PLUGIN_TYPE for p in plugins):
            write_atomically(path, without_our_plugin(text), os.stat(path).st_mode & 0o7777)
            return path
    return None


def write_kubeconfig(path: str, service_account_dir: str = "/var/run/secrets/kubernetes.io/serviceaccount") -> None:
    """The plugin's credentials, from this (DaemonSet) pod's service account, as install-cni writes them."""
    import base64

    host, port = os.environ.get("KUBERNETES_SERVICE_HOST", ""), os.environ.get("KUBERNETES_SERVICE_PORT", "")
    if not host or not port:
        raise InstallError("KUBERNETES_SERVICE_HOST/PORT are not set: not running in a cluster")
    try:
        with open(os.path.join(service_account_dir, "token"), encoding="utf-8") as handle:
            token = handle.read().strip()
        with open(os.path.join(service_account_dir, "ca.crt"), "rb") as handle:
            ca = base64.b64encode(handle.read()).decode()
    except OSError as error:
        raise InstallError(f"cannot read the service account: {error}") from None
    server = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
    text = (
        "apiVersion: v1\nkind: Config\nclusters:\n- cluster:\n"
        f"    certificate-authority-data: {ca}\n    server: {server}\n  name: local\n"
        "contexts:\n- context:\n    cluster: local\n    user: istio-cni\n  name: istio-cni-context\n"
        f"current-context: istio-cni-context\nusers:\n- name: istio-cni\n  user:\n    token: {token}\n"
    )
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_atomically(path, text, 0o600)


def main(argv: Sequence[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="istio-cni", description="Chain istio-cni into the node's CNI configuration.")
    parser.add_argument("action", choices=("install", "uninstall"))
    parser.add_argument("--cni-conf-dir", default="/etc/cni/net.d", help="the node's CNI configuration directory")
    parser.add_argument("--cni-conf-name", default="", help="the file to chain into (default: the first valid one)")
    parser.add_argument("--chained", action=argparse.BooleanOptionalAction, default=True,
                        help="chain into the existing configuration (default) or write a standalone one")
    parser.add_argument("--istio-owned-conf", default="", metavar="NAME",
                        help="write the chained list to this file of ours instead of editing the node's")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--cni-agent-run-dir", default="/var/run/istio-cni")
    parser.add_argument("--exclude-namespaces", default="", help="comma separated")
    parser.add_argument("--pod-namespace", default="istio-system")
    parser.add_argument("--native-nftables", action="store_true")
    parser.add_argument("--pod-annotations-capability", action="store_true",
                        help="ask the runtime (containerd, CRI-O) for the pod's annotations: skips need no API call")
    parser.add_argument("--write-kubeconfig", action="store_true",
                        help="also write <cni-agent-run-dir>/istio-cni-kubeconfig from this pod's service account")
    args = parser.parse_args(argv)
    try:
        if args.action == "install" and args.write_kubeconfig:
            write_kubeconfig(os.path.join(args.cni_agent_run_dir, "istio-cni-kubeconfig"))
        if args.action == "install":
            ours = plugin_config(
                log_level=args.log_level,
                agent_run_dir=args.cni_agent_run_dir,
                exclude_namespaces=[name for name in args.exclude_namespaces.split(",") if name],
                pod_namespace=args.pod_namespace,
                native_nftables=args.native_nftables,
            )
            if args.pod_annotations_capability:  # not in Istio's entry: off by default, so its goldens hold
                ours["capabilities"] = {"io.kubernetes.cri.pod-annotations": True}
            path = install(args.cni_conf_dir, ours, name=args.cni_conf_name, chained=args.chained,
                           istio_owned=args.istio_owned_conf)
            print(f"istio-cni: wrote {path}", file=sys.stderr)
        else:
            changed = uninstall(args.cni_conf_dir, name=args.cni_conf_name, chained=args.chained,
                                istio_owned=args.istio_owned_conf)
            print(f"istio-cni: {'removed from ' + changed if changed else 'nothing of ours found'}", file=sys.stderr)
    except (InstallError, OSError) as error:
        print(f"istio-cni {args.action}: {error}", file=sys.stderr)
        return 1
    return 0
