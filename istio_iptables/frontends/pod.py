"""The one mapping from a Kubernetes Pod object to our settings, as Istio's CNI plugin makes it.

Istio's plugin (``cni/pkg/plugin``: ``kubernetes.go`` reads the pod, ``plugin.go`` decides whether
to skip it, ``sidecar_redirect.go`` turns annotations and the istio-proxy container into the
settings of ``istio-iptables``). Both ``istio-cni`` and ``istio-iptables --from-pod`` use this
module, and it produces :class:`~istio_iptables.config.sidecar.RawSettings` for the ordinary parser, so
every value is validated in one place; each setting's source names the annotation or the
container field it came from, so a bad value is reported as such.

Only cheap modules are imported: the plugin runs this for every pod creation on a node.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from istio_iptables._lib.records import record
from istio_iptables.config.sidecar import RawSettings, Setting
from istio_iptables.errors import ConfigError

ISTIO_INIT = "istio-init"
ISTIO_PROXY = "istio-proxy"
INJECT_ANNOTATION = "sidecar.istio.io/inject"
INJECT_LABEL = "sidecar.istio.io/inject"
STATUS_ANNOTATION = "sidecar.istio.io/status"
INTERCEPTION_MODE = "sidecar.istio.io/interceptionMode"
INCLUDE_OUTBOUND_IP_RANGES = "traffic.sidecar.istio.io/includeOutboundIPRanges"
EXCLUDE_OUTBOUND_IP_RANGES = "traffic.sidecar.istio.io/excludeOutboundIPRanges"
INCLUDE_INBOUND_PORTS = "traffic.sidecar.istio.io/includeInboundPorts"
EXCLUDE_INBOUND_PORTS = "traffic.sidecar.istio.io/excludeInboundPorts"
INCLUDE_OUTBOUND_PORTS = "traffic.sidecar.istio.io/includeOutboundPorts"
EXCLUDE_OUTBOUND_PORTS = "traffic.sidecar.istio.io/excludeOutboundPorts"
EXCLUDE_INTERFACES = "traffic.sidecar.istio.io/excludeInterfaces"
KUBEVIRT_INTERFACES = "traffic.sidecar.istio.io/kubevirtInterfaces"  # deprecated by the next one
REROUTE_VIRTUAL_INTERFACES = "istio.io/reroute-virtual-interfaces"

# Istio's plugin always excludes the agent's status, health and Envoy's stats ports inbound.
ALWAYS_EXCLUDED_INBOUND = ("15020", "15021", "15090")
DEFAULT_PROXY_ID = "1337"
OUTBOUND_PORT = "15001"

# (our setting, the annotation, Istio's default when the annotation is absent, the kind of value)
_ANNOTATED: tuple[tuple[str, str, str, str], ...] = (
    ("istio_service_cidr", INCLUDE_OUTBOUND_IP_RANGES, "*", "cidrs*"),
    ("istio_service_exclude_cidr", EXCLUDE_OUTBOUND_IP_RANGES, "", "cidrs"),
    ("istio_inbound_ports", INCLUDE_INBOUND_PORTS, "*", "ports*"),
    ("istio_local_outbound_ports_exclude", EXCLUDE_OUTBOUND_PORTS, "15020", "ports*"),
    ("istio_outbound_ports", INCLUDE_OUTBOUND_PORTS, "", "ports*"),
    ("istio_exclude_interfaces", EXCLUDE_INTERFACES, "", "interfaces"),
)

# Istio's plugin reads these of the istio-proxy container's environment (our flag, Istio's variable).
_PROXY_ENV_FLAGS = (
    ("redirect_dns", "ISTIO_META_DNS_CAPTURE"),
    ("dual_stack", "ISTIO_DUAL_STACK"),
    ("drop_invalid", "INVALID_DROP"),
)

# Istio's env-only knobs, read from the plugin's own environment (cfg.FillConfigFromEnvironment).
_PROCESS_ENV = {
    "owner_groups_include": "ISTIO_OUTBOUND_OWNER_GROUPS",
    "owner_groups_exclude": "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE",
    "loopback_cidr": "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR",
}


@record
class PodInfo:
    """What Istio's plugin reads of a pod (``ExtractPodInfo``)."""

    name: str
    namespace: str
    containers: tuple[str, ...]
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    proxy_type: str
    proxy_env: Mapping[str, str]
    proxy_uid: int | None
    proxy_gid: int | None


@record
class Skip:
    """The pod gets no rules from the plugin, and why (Istio logs the same reasons)."""

    reason: str


def pod_info(pod: Mapping[str, Any], extra_annotations: Mapping[str, str] | None = None) -> PodInfo:
    """Istio's ``ExtractPodInfo``; ``extra_annotations`` (the runtime's pod-annotations capability) win."""
    if not isinstance(pod, Mapping):
        raise ConfigError("pod", type(pod).__name__, "a Pod object is a JSON/YAML mapping")
    metadata = _mapping(pod.get("metadata"))
    spec = _mapping(pod.get("spec"))
    names: list[str] = []
    proxy_env: dict[str, str] = {}
    proxy_type = ""
    uid = gid = None
    # Init containers first: Kubernetes 1.28+ may run the sidecar as a native init container.
    for container in [*_list(spec.get("initContainers")), *_list(spec.get("containers"))]:
        container = _mapping(container)
        name = str(container.get("name", ""))
        names.append(name)
        if name != ISTIO_PROXY:
            continue
        for variable in _list(container.get("env")):
            variable = _mapping(variable)
            if "name" in variable:
                # valueFrom entries have no value: Go's zero value, the empty string.
                proxy_env[str(variable["name"])] = str(variable.get("value", "") or "")
        args = _list(container.get("args"))
        if len(args) >= 2 and args[0] == "proxy":
            proxy_type = str(args[1])
        security = container.get("securityContext")
        if isinstance(security, Mapping):
            uid = _id_of(security.get("runAsUser"), "securityContext.runAsUser")
            gid = _id_of(security.get("runAsGroup"), "securityContext.runAsGroup")
    annotations = {str(key): str(value) for key, value in _mapping(metadata.get("annotations")).items()}
    annotations.update(extra_annotations or {})
    return PodInfo(
        name=str(metadata.get("name", "")),
        namespace=str(metadata.get("namespace", "")),
        containers=tuple(names),
        labels={str(key): str(value) for key, value in _mapping(metadata.get("labels")).items()},
        annotations=annotations,
        proxy_type=proxy_type,
        proxy_env=proxy_env,
        proxy_uid=uid,
        proxy_gid=gid,
    )


def skip_reason(info: PodInfo) -> Skip | None:
    """Istio's checks after the pod is read, in its order; None: the pod gets rules."""
    if ISTIO_INIT in info.containers:
        return Skip("already injected with the istio-init container")
    if go_bool(info.proxy_env.get("DISABLE_ENVOY", "")) is True:
        return Skip("DISABLE_ENVOY is set on istio-proxy")
    if ISTIO_PROXY not in info.containers:
        return Skip(f"no istio-proxy container (has {', '.join(sorted(set(info.containers))) or 'none'})")
    if info.proxy_type not in ("", "sidecar"):
        return Skip(f"proxy type {info.proxy_type}")
    inject = info.labels.get(INJECT_LABEL, info.annotations.get(INJECT_ANNOTATION, ""))
    if go_bool(inject) is False:
        return Skip("injection is disabled (sidecar.istio.io/inject)")
    if STATUS_ANNOTATION not in info.annotations:
        return Skip("no sidecar.istio.io/status annotation")
    return None


def pod_settings(
    info: PodInfo, environ: Mapping[str, str] | None = None, warn: Any = None
) -> tuple[dict[str, Setting], dict[str, Setting]]:
    """Istio's ``NewRedirect`` + ``Program``: (values, flags) for :class:`RawSettings`.

    Annotation values are checked as Istio checks them (a bad one fails the pod, naming the
    annotation); the full validation is the ordinary parser's, on these settings.
    """
    annotations = info.annotations
    values: dict[str, Setting] = {"envoy_port": Setting(OUTBOUND_PORT, "istio-cni (fixed)")}

    mode = annotations.get(INTERCEPTION_MODE, "REDIRECT")
    if mode not in ("REDIRECT", "TPROXY"):
        raise ConfigError(f"annotation {INTERCEPTION_MODE}", mode, "the interception mode is REDIRECT or TPROXY")
    values["istio_inbound_interception_mode"] = Setting(mode, f"annotation {INTERCEPTION_MODE}")

    for name, uid in (("proxy_uid", info.proxy_uid), ("proxy_gid", info.proxy_gid)):
        field = "runAsUser" if name == "proxy_uid" else "runAsGroup"
        if uid:  # absent or 0: Istio uses 1337
            values[name] = Setting(str(uid), f"istio-proxy securityContext.{field}")
        else:
            values[name] = Setting(DEFAULT_PROXY_ID, f"istio-proxy securityContext.{field} (default)")

    for name, key, default, kind in _ANNOTATED:
        values[name] = _annotated(annotations, key, default, kind)

    excluded = _annotated(annotations, EXCLUDE_INBOUND_PORTS, "15020", "ports*")
    ports = [port for port in excluded.value.strip().split(",")]
    if ports == [""]:
        ports = []
    merged = list(dict.fromkeys([*ports, *ALWAYS_EXCLUDED_INBOUND]))
    values["istio_local_exclude_ports"] = Setting(",".join(merged), excluded.source)

    # The deprecated kubevirtInterfaces counts only when reroute-virtual-interfaces is absent.
    virtual_key = REROUTE_VIRTUAL_INTERFACES if REROUTE_VIRTUAL_INTERFACES in annotations else KUBEVIRT_INTERFACES
    values["kube_virt_interfaces"] = _annotated(annotations, virtual_key, "", "interfaces")

    flags: dict[str, Setting] = {"cni_mode": Setting("true", "istio-cni")}
    for flag, variable in _PROXY_ENV_FLAGS:
        if variable not in info.proxy_env:
            continue
        parsed = go_bool(info.proxy_env[variable])
        if parsed is None:  # Istio warns and leaves the feature off
            if warn is not None:
                warn("cannot parse %s=%r on istio-proxy: ignored", variable, info.proxy_env[variable])
            parsed = False
        source = f"istio-proxy env {variable}"
        flags[flag] = Setting("true" if parsed else "false", source)
        if flag == "redirect_dns":  # the plugin captures all DNS: it cannot read the pod's resolv.conf
            flags["capture_all_dns"] = Setting("true" if parsed else "false", source)

    env = os.environ if environ is None else environ
    for name, variable in _PROCESS_ENV.items():
        if variable in env:
            values[name] = Setting(env[variable], variable)
    return values, flags


def raw_settings_for_pod(
    info: PodInfo, *, environ: Mapping[str, str] | None = None, warn: Any = None, **extra: Any
) -> RawSettings:
    values, flags = pod_settings(info, environ, warn)
    return RawSettings(values=values, flags=flags, **extra)


def settings_from_pod_file(path: str, given: RawSettings) -> RawSettings | None:
    """``istio-iptables --from-pod FILE``: the pod's settings under the command line's; None if skipped."""
    from istio_iptables._lib.log import log

    info = pod_info(load_pod(path))
    skipped = skip_reason(info)
    if skipped is not None:
        log.info("istio-cni would skip pod %s/%s: %s; nothing to do", info.namespace, info.name, skipped.reason)
        return None
    values, flags = pod_settings(info, warn=log.warning)
    # The pod's settings first, then whatever the command line or the environment set.
    return RawSettings(
        values={**values, **given.values},
        flags={**flags, **given.flags},
        enable_ipv6=given.enable_ipv6,
        resolv_conf=given.resolv_conf,
    )


def argv_for(values: Mapping[str, Setting], flags: Mapping[str, Setting]) -> list[str]:
    """The same settings as ``istio-iptables`` flags (for logs, and for runs in another process)."""
    argv = [f"--{name.replace('_', '-')}={setting.value}" for name, setting in values.items()
            if name not in _PROCESS_ENV]
    argv += [f"--{name.replace('_', '-')}={setting.value}" for name, setting in flags.items()]
    return argv


def load_pod(path: str) -> Mapping[str, Any]:
    """A Pod object from a JSON or YAML file (``-`` reads standard input)."""
    source = "--from-pod"
    try:
        if path == "-":
            import sys

            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
    except OSError as error:
        raise ConfigError(source, path, f"cannot read it: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(source, path, "not UTF-8 text") from None
    stripped = text.lstrip()
    if stripped.startswith("{"):
        import json

        try:
            pod = json.loads(text)
        except ValueError as error:
            raise ConfigError(source, path, f"not valid JSON: {error}") from None
    else:
        try:
            import yaml  # only YAML input pays for PyYAML
        except ImportError:
            raise ConfigError(source, path, "YAML input needs PyYAML (pip install pyyaml), or pass JSON") from None
        try:
            pod = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(source, path, f"not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(pod, Mapping) or pod.get("kind", "Pod") != "Pod":
        raise ConfigError(source, path, "expected one Pod object (kind: Pod)")
    return pod


def go_bool(text: str) -> bool | None:
    """Go's ``strconv.ParseBool``: None when it would fail."""
    if text in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if text in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    return None


def _annotated(annotations: Mapping[str, str], key: str, default: str, kind: str) -> Setting:
    if key not in annotations:
        return Setting(default, f"annotation {key} (default)")
    value = annotations[key]
    source = f"annotation {key}"
    if kind.startswith("ports") and not (kind.endswith("*") and value == "*"):
        # Istio trims around each port; the parser that follows takes them as numbers.
        items = [item.strip() for item in value.strip().split(",")] if value.strip() else []
        for item in items:
            if not item.isdigit() or not 0 <= int(item) <= 65535:
                raise ConfigError(source, value, f"{item!r} is not a port")
        value = ",".join(items)
    return Setting(value, source)


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _id_of(value: Any, field: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"istio-proxy {field}", str(value), "a uid or gid is a non-negative integer")
    return value
