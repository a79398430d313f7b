"""Configuration: parse and validate every user-supplied value before anything touches the kernel.

Parsing is pure: :func:`parse` turns raw strings (from flags or environment variables, each
labelled with where it came from) into a typed, validated :class:`Config`. Facts about the
host (default proxy uid, IPv6 auto-detection, resolv.conf servers, group names) come in
through the small :class:`Host` interface so tests can supply them.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from typing import Literal, Protocol

from istio_iptables._lib.records import factory, record
from istio_iptables.errors import ConfigError, escape
from istio_iptables.net import IPNetwork
from istio_iptables.xtables.model import PortEntry, PortRange

Mode = Literal["REDIRECT", "TPROXY"]
UseSets = Literal["auto", "always", "never", "multiport"]  # see istio_iptables/policy/lists.py
USE_SETS_CHOICES: tuple[UseSets, ...] = ("auto", "always", "never", "multiport")

MAX_OWNER_GROUPS = 64
DNS_CAPTURE_PORT = 15053
OUTBOUND_MARK = 1338  # Envoy -> own pod IP in TPROXY mode (Istio's constants.OutboundMark)
# Route tables the kernel reserves: unspec, default, main, local.
RESERVED_ROUTE_TABLES = frozenset({0, 253, 254, 255})
MAX_U32 = 2**32 - 1
DEFAULT_IPV4_LOOPBACK = ipaddress.IPv4Network("127.0.0.1/32")

_INTERFACE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@+-]{0,14}")
_GROUP_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?")
_NUMBER = re.compile(r"[0-9]+")
# Python refuses to convert integers of more than 4,300 digits (a ValueError); every number we take
# fits in 20 digits, so a longer one (leading zeros aside) is simply out of range.
_MAX_DIGITS = 20
# --probe-timeout: Istio takes any Go duration (up to 292 years); a validation that waits longer
# than an hour is a mistake, and an endless one (``999...9h``) would hang the init container.
MAX_PROBE_TIMEOUT = 3600.0


@record
class Setting:
    """A raw value and a label naming where it came from (``--flag`` or ``ENV_VAR``)."""

    value: str
    source: str


@record
class CidrSelection:
    """An include list of CIDRs, or ``*`` for everything."""

    wildcard: bool = False
    cidrs: tuple[IPNetwork, ...] = ()

    def of_family(self, version: int) -> tuple[IPNetwork, ...]:
        return tuple(cidr for cidr in self.cidrs if cidr.version == version)


@record
class PortSelection:
    """Inbound ports to capture: ``*`` for all, a list, or nothing (empty)."""

    wildcard: bool = False
    ports: tuple[PortEntry, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.wildcard and not self.ports


@record
class Config:
    proxy_port: int = 15001
    inbound_capture_port: int = 15006
    inbound_tunnel_port: int = 15008
    proxy_uids: tuple[str, ...] = ()
    proxy_gids: tuple[str, ...] = ()
    mode: Mode = "REDIRECT"
    inbound_ports: PortSelection = PortSelection()
    inbound_exclude_ports: tuple[PortEntry, ...] = ()
    exclude_interfaces: tuple[str, ...] = ()
    outbound_include: CidrSelection = CidrSelection()
    outbound_exclude: tuple[IPNetwork, ...] = ()
    outbound_ports_include: tuple[PortEntry, ...] = ()
    outbound_ports_exclude: tuple[PortEntry, ...] = ()
    virt_interfaces: tuple[str, ...] = ()
    tproxy_mark: int = 1337
    route_table: int = 133
    dry_run: bool = False
    skip_rule_apply: bool = False
    run_validation: bool = False
    probe_port: int = 15002
    probe_timeout: float = 5.0
    redirect_dns: bool = False
    capture_all_dns: bool = False
    drop_invalid: bool = False
    dual_stack: bool = False
    network_namespace: str = ""
    cni_mode: bool = False
    reconcile: bool = False
    cleanup_only: bool = False
    force_apply: bool = False
    native_nftables: bool = False
    force_iptables_binary: Literal["", "legacy", "nft"] = ""
    applier: Literal["restore", "libiptc"] = "restore"
    use_sets: UseSets = "auto"
    owner_groups_include: tuple[str, ...] | None = None  # None means "*": every group is captured
    owner_groups_exclude: tuple[str, ...] = ()
    loopback_cidr: ipaddress.IPv4Network = DEFAULT_IPV4_LOOPBACK
    enable_ipv6: bool = False
    dns_servers_v4: tuple[ipaddress.IPv4Address, ...] = ()
    dns_servers_v6: tuple[ipaddress.IPv6Address, ...] = ()

    @property
    def tproxy(self) -> bool:
        return self.mode == "TPROXY"

    @property
    def route_mask(self) -> int:
        """The TPROXY mark's policy rule matches the whole mark (``fwmark 1337``, no mask)."""
        return 0xFFFFFFFF

    @property
    def dns_capture_active(self) -> bool:
        """Istio silently turns DNS capture off when there is no server to capture."""
        return self.redirect_dns and (
            self.capture_all_dns or bool(self.dns_servers_v4) or bool(self.dns_servers_v6)
        )

    def describe(self) -> str:
        """One ``name=value`` line per setting, lists comma separated, as Istio's Config.Print logs it."""
        return "\n".join(f"{name}={_describe_value(value)}" for name, value in vars(self).items())


def _describe_value(value: object) -> str:
    if isinstance(value, PortSelection | CidrSelection):
        return "*" if value.wildcard else _describe_value(getattr(value, "ports", None) or getattr(value, "cidrs", ()))
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return escape(value)  # a raw path such as --network-namespace's: never a line of its own
    return "*" if value is None else str(value)


class Host(Protocol):
    """What parsing needs to know about the machine (faked in tests)."""

    def user_uid(self, name: str) -> int | None: ...

    def group_exists(self, name: str) -> bool: ...

    def addresses(self) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        """Addresses of the namespace's interfaces, in interface order (as Go's InterfaceAddrs)."""
        ...

    def read_text(self, path: str) -> str: ...


# --- value parsers -----------------------------------------------------------


def number(text: str) -> int | None:
    """The value of a decimal number of at most 20 significant digits; None for anything else."""
    if not _NUMBER.fullmatch(text):
        return None
    significant = text.lstrip("0") or "0"
    return int(significant) if len(significant) <= _MAX_DIGITS else None


def split_list(value: str) -> list[str]:
    """Istio's list syntax: comma separated, empty items dropped, no trimming."""
    return [item for item in value.split(",") if item != ""]


def parse_port(setting: Setting, text: str | None = None) -> int:
    text = setting.value if text is None else text
    port = number(text)
    if port is None or not 1 <= port <= 65535:
        raise ConfigError(setting.source, text, "a port must be a number from 1 to 65535")
    return port


_PORT_LIST_HINT = "a port is a number from 1 to 65535, or a range FIRST:LAST of them (e.g. 8000:9000)"


def _port_number(text: str) -> int | None:
    """A decimal port bound, or None: at most 5 digits (bounds are checked by the caller) and no
    leading zero, which iptables would read as octal (``010`` is 8)."""
    if not _NUMBER.fullmatch(text) or len(text) > 5 or (text[0] == "0" and text != "0"):
        return None
    return int(text)


def parse_port_entry(setting: Setting, text: str) -> PortEntry:
    """One entry of a port list, as iptables' ``--dport`` takes it (Istio passes entries through).

    ``N``, ``FIRST:LAST``, ``:LAST`` (from 0) and ``FIRST:`` (to 65535); spaces around an entry are
    dropped, as Istio's restore input drops them. A range of one port becomes that port. Refused,
    as iptables refuses them: reversed or out-of-range bounds, port 0 alone, and what is no decimal
    port (service names, leading zeros).
    """
    entry = text.strip(" \t")
    # "8000-9000" is nft's spelling (and ipset's); Istio hands entries to iptables, which wants a colon.
    hint = "a range is written FIRST:LAST, as iptables takes it" if "-" in entry[1:] else _PORT_LIST_HINT
    first_text, colon, last_text = entry.partition(":")
    if not colon:
        port = _port_number(entry)
        if port is None or not 1 <= port <= 65535:
            raise ConfigError(setting.source, text, hint)
        return port
    first = _port_number(first_text) if first_text else 0
    last = _port_number(last_text) if last_text else 65535
    if first is None or last is None:
        raise ConfigError(setting.source, text, hint)
    if first > 65535 or last > 65535:
        raise ConfigError(setting.source, text, "a port range's bounds are numbers from 0 to 65535")
    if first > last:
        raise ConfigError(setting.source, text, "a port range goes from the lower port to the higher (FIRST:LAST)")
    if last == 0:
        raise ConfigError(setting.source, text, _PORT_LIST_HINT)
    return first if first == last else PortRange(first, last)


def parse_ports(setting: Setting) -> tuple[PortEntry, ...]:
    """A comma-separated list of ports and port ranges (``-b``, ``-d``, ``-q``, ``-o``)."""
    return _unique(parse_port_entry(setting, item) for item in split_list(setting.value))


def parse_port_selection(setting: Setting) -> PortSelection:
    if setting.value == "*":
        return PortSelection(wildcard=True)
    return PortSelection(ports=parse_ports(setting))


def parse_ids(setting: Setting) -> tuple[str, ...]:
    ids = split_list(setting.value)
    values = []
    for item in ids:
        value = number(item)
        if value is None or value >= MAX_U32:
            raise ConfigError(setting.source, item, "uids and gids must be numbers from 0 to 4294967294")
        values.append(str(value))
    return _unique(values)


def parse_cidr(setting: Setting, text: str) -> IPNetwork:
    if "/" not in text:
        raise ConfigError(setting.source, text, "a CIDR needs a prefix length, e.g. 10.0.0.0/8")
    address, _, prefix = text.partition("/")
    if not _NUMBER.fullmatch(prefix):
        raise ConfigError(setting.source, text, "not an IPv4 or IPv6 CIDR")
    try:
        parsed = ipaddress.ip_address(address)
        if getattr(parsed, "scope_id", None):
            raise ValueError("scoped address")
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ConfigError(setting.source, text, "not an IPv4 or IPv6 CIDR") from None


def parse_cidrs(setting: Setting) -> tuple[IPNetwork, ...]:
    return _unique(parse_cidr(setting, item) for item in split_list(setting.value))


def parse_cidr_selection(setting: Setting) -> CidrSelection:
    if setting.value == "*":
        return CidrSelection(wildcard=True)
    return CidrSelection(cidrs=parse_cidrs(setting))


def parse_interfaces(setting: Setting) -> tuple[str, ...]:
    names = split_list(setting.value)
    for name in names:
        if not _INTERFACE_NAME.fullmatch(name) or name in {".", ".."}:
            raise ConfigError(
                setting.source,
                name,
                "an interface name has 1-15 characters from A-Z a-z 0-9 _ . @ + - (not first)",
            )
    return _unique(names)


def parse_u32(setting: Setting, *, minimum: int = 0) -> int:
    value = number(setting.value)
    if value is None or not minimum <= value <= MAX_U32:
        raise ConfigError(setting.source, setting.value, f"must be a number from {minimum} to {MAX_U32}")
    return value


def parse_mark(setting: Setting) -> int:
    return parse_u32(setting, minimum=1)


def parse_route_table(setting: Setting) -> int:
    table = parse_u32(setting, minimum=1)
    if table in RESERVED_ROUTE_TABLES:
        raise ConfigError(setting.source, setting.value, "tables 253, 254 and 255 belong to the kernel")
    return table


def parse_mode(setting: Setting) -> Mode:
    if setting.value in ("", "REDIRECT"):
        return "REDIRECT"
    if setting.value == "TPROXY":
        return "TPROXY"
    raise ConfigError(setting.source, setting.value, "the interception mode is REDIRECT or TPROXY")


def parse_duration(setting: Setting, maximum: float = MAX_PROBE_TIMEOUT) -> float:
    """A Go duration as Istio takes it (``5s``, ``500ms``, ``1m30s``), or plain seconds, up to ``maximum``."""
    text = setting.value.strip()
    if re.fullmatch(r"[0-9]+(\.[0-9]+)?", text):
        parts = [(text, "s")]
    else:
        parts = re.findall(r"([0-9]+(?:\.[0-9]+)?)(h|ms|m|s|us|µs|ns)", text)
        if not parts or "".join(amount + unit for amount, unit in parts) != text:
            raise ConfigError(setting.source, setting.value, "a duration looks like 5s, 500ms or 1m30s")
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
    # float() of a 400-digit number is inf or 1e399: compare before trusting the sum.
    seconds = sum(float(amount) * units[unit] for amount, unit in parts)
    if not seconds <= maximum:
        raise ConfigError(setting.source, setting.value, f"a duration of at most {maximum:g}s is accepted")
    return seconds


def parse_owner_groups(setting: Setting, host: Host) -> tuple[str, ...]:
    groups = _unique(split_list(setting.value))
    if len(groups) > MAX_OWNER_GROUPS:
        raise ConfigError(
            setting.source, setting.value, f"at most {MAX_OWNER_GROUPS} groups can be listed, not {len(groups)}"
        )
    for group in groups:
        if _NUMBER.fullmatch(group):
            gid = number(group)
            if gid is None or gid >= MAX_U32:
                raise ConfigError(setting.source, group, "a gid is a number from 0 to 4294967294")
            continue
        if not _GROUP_NAME.fullmatch(group):
            raise ConfigError(setting.source, group, "not a group name or gid")
        if not host.group_exists(group):
            raise ConfigError(setting.source, group, "no such group on this host")
    return groups


def parse_loopback_cidr(setting: Setting) -> ipaddress.IPv4Network:
    cidr = parse_cidr(setting, setting.value)
    if (
        not isinstance(cidr, ipaddress.IPv4Network)
        or not cidr.network_address.is_loopback
        or not 8 <= cidr.prefixlen <= 32
    ):
        raise ConfigError(setting.source, setting.value, "must be an IPv4 loopback CIDR with a /8 to /32 mask")
    return ipaddress.IPv4Network(setting.value, strict=False)


def parse_resolv_conf(text: str) -> tuple[list[ipaddress.IPv4Address], list[ipaddress.IPv6Address]]:
    """The nameservers of a resolv.conf, split by family; unparsable or scoped entries are dropped."""
    v4: list[ipaddress.IPv4Address] = []
    v6: list[ipaddress.IPv6Address] = []
    for line in text.splitlines():
        words = line.split()
        if len(words) < 2 or words[0] != "nameserver":
            continue
        try:
            address = ipaddress.ip_address(words[1])
        except ValueError:
            continue
        if isinstance(address, ipaddress.IPv6Address):
            if address.scope_id:
                continue
            if address.ipv4_mapped:
                v4.append(address.ipv4_mapped)
            else:
                v6.append(address)
        else:
            v4.append(address)
    return _unique(v4), _unique(v6)  # type: ignore[return-value]


def detect_ipv6(addresses: Iterable[ipaddress.IPv4Address | ipaddress.IPv6Address], dual_stack: bool) -> bool:
    """Istio's rule: IPv6 if the first usable address is IPv6, or (dual stack) if any usable one is."""
    usable = []
    for address in addresses:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        if address.is_loopback or address.is_link_local or address.is_multicast or address.is_unspecified:
            continue
        usable.append(address)
    if dual_stack:
        return any(address.version == 6 for address in usable)
    return bool(usable) and usable[0].version == 6


# Go's strconv.ParseBool, which pflag uses for --flag=VALUE and Istio for its variables.
GO_BOOL_WORDS = {"1": True, "t": True, "T": True, "true": True, "TRUE": True, "True": True,
                 "0": False, "f": False, "F": False, "false": False, "FALSE": False, "False": False}


def parse_go_bool(setting: Setting) -> bool:
    """A boolean flag's or variable's value, as Istio reads it (strconv.ParseBool).

    An empty variable is false (Istio ignores it and keeps the default); an empty ``--flag=`` and
    any word ParseBool refuses is an error here. Istio fails on such a flag, and silently keeps the
    default for such a variable, so ``DRY_RUN=yes`` would write rules there: we refuse it.
    """
    if setting.value in GO_BOOL_WORDS:
        return GO_BOOL_WORDS[setting.value]
    if setting.value == "" and not setting.source.startswith("-"):
        return False
    raise ConfigError(setting.source, setting.value, "a boolean is one of 1, t, T, true, TRUE, True, "
                      "0, f, F, false, FALSE, False (Go's ParseBool), given as --flag=VALUE")


def parse_bool(setting: Setting) -> bool:
    lowered = setting.value.strip().lower()
    if lowered in ("1", "t", "true", "y", "yes", "on"):
        return True
    if lowered in ("", "0", "f", "false", "n", "no", "off"):
        return False
    raise ConfigError(setting.source, setting.value, "expected true or false")


def _unique(items: Iterable) -> tuple:
    return tuple(dict.fromkeys(items))


# --- the whole configuration -------------------------------------------------


@record(frozen=False)
class RawSettings:
    """Every setting as text, labelled with its source; absent keys take Istio's defaults."""

    values: Mapping[str, Setting] = factory(dict)
    flags: Mapping[str, Setting] = factory(dict)
    enable_ipv6: bool | None = None  # None: detect from the namespace's addresses
    resolv_conf: str = "/etc/resolv.conf"

    def get(self, name: str, default: str = "") -> Setting:
        return self.values.get(name) or Setting(default, f"--{name.replace('_', '-')}")

    def flag(self, name: str) -> bool:
        setting = self.flags.get(name)
        return parse_bool(setting) if setting is not None else False


def parse(raw: RawSettings, host: Host) -> Config:
    """Build a validated :class:`Config`; raises :class:`ConfigError` on the first bad value."""
    flag = raw.flag
    uid_setting = raw.get("proxy_uid")
    uids = parse_ids(uid_setting)
    if not uids:
        uid = host.user_uid(raw.get("envoy_user", "istio-proxy").value)
        uids = (str(uid) if uid is not None else "1337",)
    gid_setting = raw.get("proxy_gid")
    gids = parse_ids(gid_setting) or uids

    exclude = raw.get("istio_service_exclude_cidr")
    if exclude.value == "*":
        # Istio's own message names its internal field OUTBOUND_IP_RANGES_EXCLUDE; ours names the flag.
        raise ConfigError(exclude.source, "*", "excluded CIDRs must be listed, '*' is not accepted (as in Istio)")

    include_groups = raw.get("owner_groups_include", "*")
    exclude_groups = raw.get("owner_groups_exclude")
    redirect_dns = flag("redirect_dns")
    capture_all_dns = flag("capture_all_dns")
    dual_stack = flag("dual_stack")

    enable_ipv6 = raw.enable_ipv6
    if enable_ipv6 is None:
        enable_ipv6 = detect_ipv6(host.addresses(), dual_stack)

    dns_v4: list[ipaddress.IPv4Address] = []
    dns_v6: list[ipaddress.IPv6Address] = []
    if redirect_dns and not capture_all_dns:
        try:
            dns_v4, dns_v6 = parse_resolv_conf(host.read_text(raw.resolv_conf))
        except OSError as error:
            raise ConfigError("--resolv-conf", raw.resolv_conf, f"cannot read it: {error.strerror}") from None
        except ValueError:  # a NUL byte in the path
            raise ConfigError("--resolv-conf", raw.resolv_conf, "not a file path") from None

    force_binary = raw.get("force_iptables_binary")
    if force_binary.value not in ("", "legacy", "nft"):
        raise ConfigError(force_binary.source, force_binary.value, "must be legacy or nft")
    applier = raw.get("applier", "restore")
    if applier.value not in ("restore", "libiptc"):
        raise ConfigError(applier.source, applier.value, "must be restore or libiptc")
    use_sets = raw.get("use_sets", "auto")
    if use_sets.value not in USE_SETS_CHOICES:
        raise ConfigError(use_sets.source, use_sets.value, f"must be one of {', '.join(USE_SETS_CHOICES)}")

    return Config(
        proxy_port=parse_port(raw.get("envoy_port", "15001")),
        inbound_capture_port=parse_port(raw.get("inbound_capture_port", "15006")),
        inbound_tunnel_port=parse_port(raw.get("inbound_tunnel_port", "15008")),
        proxy_uids=uids,
        proxy_gids=gids,
        mode=parse_mode(raw.get("istio_inbound_interception_mode")),
        inbound_ports=parse_port_selection(raw.get("istio_inbound_ports")),
        inbound_exclude_ports=parse_ports(raw.get("istio_local_exclude_ports")),
        exclude_interfaces=parse_interfaces(raw.get("istio_exclude_interfaces")),
        outbound_include=parse_cidr_selection(raw.get("istio_service_cidr")),
        outbound_exclude=parse_cidrs(exclude),
        outbound_ports_include=parse_ports(raw.get("istio_outbound_ports")),
        outbound_ports_exclude=parse_ports(raw.get("istio_local_outbound_ports_exclude")),
        virt_interfaces=parse_interfaces(raw.get("kube_virt_interfaces")),
        tproxy_mark=parse_mark(raw.get("istio_inbound_tproxy_mark", "1337")),
        route_table=parse_route_table(raw.get("istio_inbound_tproxy_route_table", "133")),
        dry_run=flag("dry_run"),
        skip_rule_apply=flag("skip_rule_apply"),
        run_validation=flag("run_validation"),
        probe_port=parse_port(raw.get("iptables_probe_port", "15002")),
        probe_timeout=parse_duration(raw.get("probe_timeout", "5s")),
        redirect_dns=redirect_dns,
        capture_all_dns=capture_all_dns,
        drop_invalid=flag("drop_invalid"),
        dual_stack=dual_stack,
        network_namespace=raw.get("network_namespace").value,
        cni_mode=flag("cni_mode"),
        reconcile=flag("reconcile"),
        cleanup_only=flag("cleanup_only"),
        force_apply=flag("force_apply"),
        native_nftables=flag("native_nftables"),
        force_iptables_binary=force_binary.value,  # type: ignore[arg-type]
        applier=applier.value,  # type: ignore[arg-type]
        use_sets=use_sets.value,  # type: ignore[arg-type]
        owner_groups_include=(
            None if include_groups.value in ("*", "") else parse_owner_groups(include_groups, host)
        ),
        owner_groups_exclude=parse_owner_groups(exclude_groups, host),
        loopback_cidr=parse_loopback_cidr(raw.get("loopback_cidr", "127.0.0.1/32")),
        enable_ipv6=enable_ipv6,
        dns_servers_v4=tuple(dns_v4),
        dns_servers_v6=tuple(dns_v6),
    )
