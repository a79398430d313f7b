"""Ambient mode's configuration slice: the istio-cni node agent's settings for one pod or the node.

Every flag is bound to the environment variable Istio's node agent reads for the same setting
(``cni/pkg/cmd/root.go`` through viper, ``cni/pkg/nodeagent/options.go``); the pod-level ones
stand for the pod's annotations, which have no variable. Values are validated with the same
:class:`~istio_iptables.config.sidecar.Setting` / :class:`~istio_iptables.errors.ConfigError` machinery as
the sidecar's configuration: a bad value names its flag or variable and exits 2 before anything runs.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Literal

from istio_iptables._lib.records import factory, record
from istio_iptables.config.sidecar import Setting, number, parse_go_bool, parse_interfaces, split_list
from istio_iptables.errors import ConfigError

# Istio's fixed ambient numbers (cni/pkg/config/config.go): ztunnel's ports and marks.
ZTUNNEL_OUTBOUND_PORT = 15001
ZTUNNEL_INBOUND_PLAINTEXT_PORT = 15006
ZTUNNEL_INBOUND_PORT = 15008  # HBONE: never redirected
DNS_CAPTURE_PORT = 15053
DNS_PORT = 53
INPOD_MARK = 0x539  # 1337: every packet of ztunnel's own sockets carries it (SO_MARK)
INPOD_MASK = 0xFFF
INPOD_TPROXY_MARK = 0x111  # the connection mark of connections ztunnel accepted
INPOD_TPROXY_MASK = 0xFFF
INPOD_RESTORE_MASK = 0xFFFFFFFF
ROUTE_TABLE_INBOUND = 100
INPOD_RULE_PRIORITY = 32764
DNS_CONNTRACK_ZONE = 1
PROBE_SET_V4 = "istio-inpod-probes-v4"
PROBE_SET_V6 = "istio-inpod-probes-v6"
DEFAULT_PROBE_SNAT_V4 = ipaddress.IPv4Address("169.254.7.127")
DEFAULT_PROBE_SNAT_V6 = ipaddress.IPv6Address("fd16:9254:7127:1337:ffff:ffff:ffff:ffff")

Scope = Literal["pod", "host"]
PodDns = Literal["unset", "enabled", "disabled"]
POD_DNS_CHOICES: tuple[PodDns, ...] = ("unset", "enabled", "disabled")


@record
class AmbientSetting:
    """One setting of the slice: our flag, Istio's variable (or annotation) and what it does."""

    name: str
    flag: str
    istio: str  # the environment variable Istio reads, or the pod annotation it stands for
    kind: Literal["bool", "value"]
    help: str
    envvar: bool = True  # False: ``istio`` names an annotation or a host fact, not a variable


# The ambient flags of the conformance README ("Ambient"), each with Istio's variable.
AMBIENT_SETTINGS: tuple[AmbientSetting, ...] = (
    AmbientSetting("host", "--host", "(node scope)", "bool",
                   "Write the node's rules (kubelet probe SNAT) instead of a pod's.", envvar=False),
    AmbientSetting("redirect_dns", "--redirect-dns", "AMBIENT_DNS_CAPTURE", "bool",
                   "Capture the pod's DNS to ztunnel on port 15053 (the agent's global setting)."),
    AmbientSetting("pod_dns", "--pod-dns", "ambient.istio.io/dns-capture", "value",
                   "The pod's DNS annotation: enabled or disabled wins over --redirect-dns; unset keeps it.",
                   envvar=False),
    AmbientSetting("ingress_mode", "--ingress-mode", "ambient.istio.io/bypass-inbound-capture", "bool",
                   "No inbound capture (the pod is an ingress gateway).", envvar=False),
    AmbientSetting("virtual_interfaces", "--virtual-interfaces", "istio.io/reroute-virtual-interfaces", "value",
                   "Comma separated interfaces whose incoming TCP is treated as outbound.", envvar=False),
    AmbientSetting("host_probe_snat_ipv4", "--host-probe-snat-ipv4", "HOST_PROBE_SNAT_IP", "value",
                   "The address kubelet probes are SNATed to (default 169.254.7.127)."),
    AmbientSetting("host_probe_snat_ipv6", "--host-probe-snat-ipv6", "HOST_PROBE_SNAT_IPV6", "value",
                   "The IPv6 address kubelet probes are SNATed to (default fd16:9254:7127:1337:ffff:ffff:ffff:ffff)."),
    AmbientSetting("kubelet_uid", "--kubelet-uid", "(kubelet's uid from /proc)", "value",
                   "The kubelet's uid, matched by the native nftables host rule (Istio reads it from /proc).",
                   envvar=False),
    AmbientSetting("enrol", "--enrol", "(the node agent's per-pod probe-set update)", "value",
                   "With --host: add these pod addresses (comma separated) to the probe sets.", envvar=False),
    AmbientSetting("unenrol", "--unenrol", "(the node agent's per-pod probe-set update)", "value",
                   "With --host: remove these pod addresses from the probe sets.", envvar=False),
    AmbientSetting("pod_uid", "--pod-uid", "(the pod's metadata.uid)", "value",
                   "The pod's UID: the comment of its probe-set entries, as Istio writes them.", envvar=False),
    AmbientSetting("reconcile", "--reconcile", "AMBIENT_RECONCILE_POD_RULES_ON_STARTUP", "bool",
                   "Replace rules of another configuration."),
    AmbientSetting("native_nftables", "--native-nftables", "NATIVE_NFTABLES", "bool", "Use native nftables."),
    AmbientSetting("force_iptables_binary", "--force-iptables-binary", "FORCE_IPTABLES_BINARY", "value",
                   "Use the legacy or the nft iptables backend instead of detecting it."),
    AmbientSetting("dry_run", "--dry-run", "DRY_RUN", "bool", "Print the rules instead of writing them."),
    AmbientSetting("cleanup_only", "--cleanup-only", "CLEANUP_ONLY", "bool", "Remove everything ambient added."),
    AmbientSetting("network_namespace", "--network-namespace", "NETWORK_NAMESPACE", "value",
                   "The pod's network namespace (name under /run/netns, or a path)."),
)
# --enable-ipv6/--disable-ipv6 is bound to AMBIENT_IPV6 (Istio's EnableIPv6 of the ambient config).
IPV6_VARIABLE = "AMBIENT_IPV6"


@record
class AmbientConfig:
    """A validated ambient configuration (Istio's AmbientConfig plus the pod's PodLevelOverrides)."""

    scope: Scope = "pod"
    redirect_dns: bool = False
    pod_dns: PodDns = "unset"
    ingress_mode: bool = False
    virtual_interfaces: tuple[str, ...] = ()
    host_probe_snat_ipv4: ipaddress.IPv4Address = DEFAULT_PROBE_SNAT_V4
    host_probe_snat_ipv6: ipaddress.IPv6Address = DEFAULT_PROBE_SNAT_V6
    kubelet_uid: int | None = None
    enable_ipv6: bool = False
    reconcile: bool = False
    native_nftables: bool = False
    force_iptables_binary: Literal["", "legacy", "nft"] = ""
    dry_run: bool = False
    cleanup_only: bool = False
    network_namespace: str = ""
    enrol: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...] = ()
    unenrol: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...] = ()
    pod_uid: str = ""

    # What the engine reads of a run besides the rules (the sidecar's Config has the same names):
    # ambient runs always write through iptables-restore, never under --cni-mode's sandbox, and
    # their policy rule is Istio's fixed ``fwmark 0x111/0xfff lookup 100``.
    applier: Literal["restore"] = "restore"
    cni_mode: bool = False
    force_apply: bool = False
    skip_rule_apply: bool = False
    run_validation: bool = False
    use_sets: Literal["never"] = "never"
    tproxy_mark: int = INPOD_TPROXY_MARK
    route_table: int = ROUTE_TABLE_INBOUND
    route_mask: int = INPOD_TPROXY_MASK

    def describe(self) -> str:
        """One ``name=value`` line per setting, as the sidecar's configuration logs it."""
        return "\n".join(f"{name}={_describe(value)}" for name, value in vars(self).items())

    @property
    def dns_capture(self) -> bool:
        """The pod's annotation wins over the agent's global setting (Istio's AppendInpodRules)."""
        if self.pod_dns == "enabled":
            return True
        if self.pod_dns == "disabled":
            return False
        return self.redirect_dns


def _describe(value: object) -> str:
    if isinstance(value, tuple):
        return ",".join(str(item) for item in value)
    return str(value).lower() if isinstance(value, bool) else str(value)


@record(frozen=False)
class AmbientRawSettings:
    """The ambient flags and variables of one invocation as text, each labelled with its source."""

    values: Mapping[str, Setting] = factory(dict)
    enable_ipv6: Setting | None = None


def _address(setting: Setting, version: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        address = ipaddress.ip_address(setting.value)
    except ValueError:
        address = None
    if address is None or address.version != version or getattr(address, "scope_id", None):
        raise ConfigError(setting.source, setting.value, f"must be one IPv{version} address (no prefix length)")
    if address.is_unspecified or address.is_multicast:
        raise ConfigError(setting.source, setting.value, "kubelet probes cannot be SNATed to this address")
    return address


_POD_UID = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,63}")  # a Kubernetes UID (RFC 4122), no quotes or spaces


def _pod_addresses(setting: Setting) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]:
    found = []
    for item in split_list(setting.value):
        try:
            address = ipaddress.ip_address(item)
        except ValueError:
            raise ConfigError(setting.source, item, "a pod address is one IPv4 or IPv6 address") from None
        if getattr(address, "scope_id", None) or address.is_unspecified or address.is_multicast:
            raise ConfigError(setting.source, item, "not a pod address")
        found.append(address)
    return tuple(dict.fromkeys(found))


def _pod_dns(setting: Setting) -> PodDns:
    if setting.value not in POD_DNS_CHOICES:
        raise ConfigError(setting.source, setting.value, "must be one of enabled, disabled, unset")
    return setting.value  # type: ignore[return-value]


def _uid(setting: Setting) -> int:
    value = number(setting.value)
    if value is None or value >= 2**32 - 1:
        raise ConfigError(setting.source, setting.value, "a uid is a number from 0 to 4294967294")
    return value


def _binary(setting: Setting) -> Literal["", "legacy", "nft"]:
    if setting.value not in ("", "legacy", "nft"):
        raise ConfigError(setting.source, setting.value, "must be legacy or nft")
    return setting.value  # type: ignore[return-value]


def parse_ambient(raw: AmbientRawSettings) -> AmbientConfig:
    """A validated :class:`AmbientConfig`; raises :class:`ConfigError` on the first bad value."""
    values = raw.values

    def flag(name: str) -> bool:
        return parse_go_bool(values[name]) if name in values else False

    parsed: dict[str, object] = {name: flag(name) for name in (
        "redirect_dns", "ingress_mode", "reconcile", "native_nftables", "dry_run", "cleanup_only")}
    parsed["scope"] = "host" if flag("host") else "pod"
    if "pod_dns" in values:
        parsed["pod_dns"] = _pod_dns(values["pod_dns"])
    if "virtual_interfaces" in values:
        parsed["virtual_interfaces"] = parse_interfaces(values["virtual_interfaces"])
    if "host_probe_snat_ipv4" in values:
        parsed["host_probe_snat_ipv4"] = _address(values["host_probe_snat_ipv4"], 4)
    if "host_probe_snat_ipv6" in values:
        parsed["host_probe_snat_ipv6"] = _address(values["host_probe_snat_ipv6"], 6)
    if "kubelet_uid" in values:
        parsed["kubelet_uid"] = _uid(values["kubelet_uid"])
    if "force_iptables_binary" in values:
        parsed["force_iptables_binary"] = _binary(values["force_iptables_binary"])
    if "network_namespace" in values:
        parsed["network_namespace"] = values["network_namespace"].value
    if raw.enable_ipv6 is not None:
        parsed["enable_ipv6"] = parse_go_bool(raw.enable_ipv6)
    for name in ("enrol", "unenrol"):
        if name in values:
            parsed[name] = _pod_addresses(values[name])
    if "pod_uid" in values:
        if not _POD_UID.fullmatch(values["pod_uid"].value):
            raise ConfigError(values["pod_uid"].source, values["pod_uid"].value,
                              "a pod UID has 1-64 characters from A-Z a-z 0-9 and '-'")
        parsed["pod_uid"] = values["pod_uid"].value
    config = AmbientConfig(**parsed)  # type: ignore[arg-type]
    _check_enrolment(config, values)
    if config.scope == "host" and config.native_nftables and config.kubelet_uid is None:
        # Istio reads the kubelet's uid from /proc on the node; a dry run elsewhere must be told it.
        raise ConfigError("--kubelet-uid", "", "the native nftables host rules match the kubelet's uid: pass it")
    return config


def _check_enrolment(config: AmbientConfig, values: Mapping[str, Setting]) -> None:
    for name in ("enrol", "unenrol"):
        addresses = getattr(config, name)
        if not addresses:
            continue
        if config.scope != "host":
            raise ConfigError(values[name].source, values[name].value, "probe sets are the node's: add --host")
        if not config.enable_ipv6 and any(address.version == 6 for address in addresses):
            raise ConfigError(values[name].source, values[name].value, "an IPv6 address needs --enable-ipv6")
    if config.enrol and not config.pod_uid:
        raise ConfigError("--pod-uid", "", "--enrol comments each entry with its pod's UID, as Istio: pass it")
