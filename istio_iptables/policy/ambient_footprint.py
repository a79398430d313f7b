"""What each capture mode owns, as data: the footprint the refactored engine (issue 13) will consume.

Apply, cleanup, drift detection and the cross-form guard need one answer to "is this ours, and
whose?". Ambient and the sidecar share a chain name (``ISTIO_OUTPUT``) with different content, so a
name is not enough: a footprint also says which built-in chains jump into which of its chains,
which marks its rules carry (ambient's are masked: ``0x539/0xfff``, ``0x111/0xfff``), which sets,
nft tables, ``ip rule`` and routes it adds, and what Istio's own leftovers cleanup removes.

How ``ISTIO_OUTPUT`` is told apart (see :func:`claims_output_chain`):

- the *companions*: ambient always creates ``ISTIO_PRERT`` (mangle and nat) beside it; the sidecar
  never does, and creates ``ISTIO_INBOUND``/``ISTIO_REDIRECT`` instead;
- the *shape* of the jumps: ambient jumps to ``ISTIO_OUTPUT`` from mangle OUTPUT (and raw OUTPUT
  with DNS capture); the sidecar jumps from nat OUTPUT only (``-p tcp``);
- the *marks*: ambient's rules match ``--mark 0x539/0xfff`` and ``0x111/0xfff``; the sidecar's
  match owners (``--uid-owner``) and full-mask marks.

Pure data and pure functions: nothing here reads the kernel.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal

from istio_iptables._lib.records import record
from istio_iptables.config.ambient import (
    INPOD_MARK,
    INPOD_MASK,
    INPOD_RULE_PRIORITY,
    INPOD_TPROXY_MARK,
    INPOD_TPROXY_MASK,
    PROBE_SET_V4,
    PROBE_SET_V6,
    ROUTE_TABLE_INBOUND,
    AmbientConfig,
)
from istio_iptables.net import Family
from istio_iptables.nft.names import AMBIENT_TABLES

Mode = Literal["sidecar", "ambient-pod", "ambient-host"]


@record
class BuiltinJump:
    """A rule of ours in a built-in chain: ``-t TABLE -A|-I CHAIN -j TARGET``."""

    table: str
    chain: str
    target: str
    how: Literal["append", "insert-first"] = "append"


@record
class PolicyRule:
    """``ip [-6] rule add fwmark MARK/MASK pref PRIORITY lookup TABLE``."""

    family: Family
    mark: int
    mask: int
    priority: int
    table: int

    def command(self) -> str:
        flag = "-6 " if self.family is Family.V6 else ""
        return f"ip {flag}rule add fwmark {self.mark:#x}/{self.mask:#x} pref {self.priority} lookup {self.table}"


@record
class LocalRoute:
    """``ip [-6] route add local DEFAULT dev lo table TABLE`` (Istio replaces it: RouteReplace)."""

    family: Family
    table: int

    def command(self) -> str:
        default = "0.0.0.0/0" if self.family is Family.V4 else "::/0"
        flag = "-6 " if self.family is Family.V6 else ""
        return f"ip {flag}route replace local {default} dev lo table {self.table}"


@record
class Footprint:
    """Everything one capture mode writes into a namespace (or the node)."""

    mode: Mode
    chains: Mapping[str, tuple[str, ...]]  # xtables table -> our chains in it
    jumps: tuple[BuiltinJump, ...]
    marks: tuple[tuple[int, int], ...]  # (value, mask) our rules match or set
    ipsets: tuple[str, ...] = ()
    nft_tables: tuple[str, ...] = ()
    nft_sets: tuple[tuple[str, str], ...] = ()  # (table, set): created once, kept across runs
    policy_rules: tuple[PolicyRule, ...] = ()
    routes: tuple[LocalRoute, ...] = ()
    distinguishing_chains: tuple[str, ...] = ()  # present only in this mode's footprint


AMBIENT_NFT_TABLES = AMBIENT_TABLES

SIDECAR = Footprint(
    mode="sidecar",
    chains={
        "nat": ("ISTIO_INBOUND", "ISTIO_REDIRECT", "ISTIO_IN_REDIRECT", "ISTIO_OUTPUT", "ISTIO_OUTPUT_DNS"),
        "mangle": ("ISTIO_INBOUND", "ISTIO_DIVERT", "ISTIO_TPROXY", "ISTIO_DROP"),
        "raw": ("ISTIO_INBOUND", "ISTIO_OUTPUT_DNS"),
    },
    jumps=(
        BuiltinJump("nat", "PREROUTING", "ISTIO_INBOUND"),
        BuiltinJump("nat", "OUTPUT", "ISTIO_OUTPUT"),
        BuiltinJump("mangle", "PREROUTING", "ISTIO_INBOUND"),
        BuiltinJump("raw", "OUTPUT", "ISTIO_OUTPUT_DNS"),
        BuiltinJump("raw", "PREROUTING", "ISTIO_INBOUND"),
    ),
    marks=((1337, 0xFFFFFFFF), (1338, 0xFFFFFFFF)),
    nft_tables=("istio-proxy-nat", "istio-proxy-mangle", "istio-proxy-raw"),
    distinguishing_chains=("ISTIO_INBOUND", "ISTIO_REDIRECT", "ISTIO_IN_REDIRECT"),
)


def ambient_pod_footprint(config: AmbientConfig) -> Footprint:
    """The pod's footprint; the routes are Istio's in-pod ``ip rule`` and table 100 (``iptables_linux.go``).

    IPv6's local route is skipped when lo has IPv6 disabled (Istio reads the sysctl); the engine decides that.
    """
    families = (Family.V4, Family.V6) if config.enable_ipv6 else (Family.V4,)
    dns = config.dns_capture
    jumps = [
        BuiltinJump("mangle", "PREROUTING", "ISTIO_PRERT"),
        BuiltinJump("mangle", "OUTPUT", "ISTIO_OUTPUT"),
        BuiltinJump("nat", "OUTPUT", "ISTIO_OUTPUT"),
        BuiltinJump("nat", "PREROUTING", "ISTIO_PRERT"),
    ]
    if dns:
        jumps += [BuiltinJump("raw", "PREROUTING", "ISTIO_PRERT"), BuiltinJump("raw", "OUTPUT", "ISTIO_OUTPUT")]
    chains = {"mangle": ("ISTIO_PRERT", "ISTIO_OUTPUT"), "nat": ("ISTIO_PRERT", "ISTIO_OUTPUT")}
    if dns:
        chains["raw"] = ("ISTIO_OUTPUT", "ISTIO_PRERT")
    return Footprint(
        mode="ambient-pod",
        chains=chains,
        jumps=tuple(jumps),
        marks=((INPOD_MARK, INPOD_MASK), (INPOD_TPROXY_MARK, INPOD_TPROXY_MASK)),
        nft_tables=AMBIENT_NFT_TABLES,
        policy_rules=tuple(
            PolicyRule(family, INPOD_TPROXY_MARK, INPOD_TPROXY_MASK, INPOD_RULE_PRIORITY, ROUTE_TABLE_INBOUND)
            for family in families
        ),
        routes=tuple(LocalRoute(family, ROUTE_TABLE_INBOUND) for family in families),
        distinguishing_chains=("ISTIO_PRERT",),
    )


def ambient_host_footprint(config: AmbientConfig) -> Footprint:
    families = (Family.V4, Family.V6) if config.enable_ipv6 else (Family.V4,)
    sets = tuple(PROBE_SET_V4 if family is Family.V4 else PROBE_SET_V6 for family in families)
    return Footprint(
        mode="ambient-host",
        chains={"nat": ("ISTIO_POSTRT",)},
        jumps=(BuiltinJump("nat", "POSTROUTING", "ISTIO_POSTRT", how="insert-first"),),
        marks=(),
        ipsets=sets,
        nft_tables=("istio-ambient-nat",),
        nft_sets=tuple(("istio-ambient-nat", name) for name in sets),
        distinguishing_chains=("ISTIO_POSTRT",),
    )


def footprint(config: AmbientConfig) -> Footprint:
    return ambient_host_footprint(config) if config.scope == "host" else ambient_pod_footprint(config)


def claims_output_chain(chains_in_table: Iterable[str], output_rules: Iterable[str]) -> Mode | None:
    """Whose ``ISTIO_OUTPUT`` is this? From the chains of its table and its rules (iptables-save lines).

    Ambient's companion chain (``ISTIO_PRERT``) or its masked marks say ambient; the sidecar's
    companions (``ISTIO_INBOUND``/``ISTIO_REDIRECT``) or owner matches say sidecar; both, or
    neither with rules present, is None: the engine refuses to decide (exit 3), never guesses.
    """
    chains = set(chains_in_table)
    rules = list(output_rules)
    ambient = "ISTIO_PRERT" in chains or any(f"{INPOD_MARK:#x}/{INPOD_MASK:#x}" in rule for rule in rules)
    sidecar = bool(chains & {"ISTIO_INBOUND", "ISTIO_REDIRECT", "ISTIO_IN_REDIRECT"}) or any(
        "--uid-owner" in rule or "--gid-owner" in rule for rule in rules
    )
    if ambient == sidecar:
        return None
    return "ambient-pod" if ambient else "sidecar"


# Istio's leftovers cleanup (DeleteInpodRules: executeDeleteCommands), in its order, per family:
# each command may fail (the chain or jump is optional); then the ip rule and the local routes go.
ISTIO_INPOD_DELETE_COMMANDS: tuple[tuple[str, ...], ...] = (
    ("-t", "mangle", "-D", "PREROUTING", "-j", "ISTIO_PRERT"),
    ("-t", "mangle", "-D", "OUTPUT", "-j", "ISTIO_OUTPUT"),
    ("-t", "nat", "-D", "OUTPUT", "-j", "ISTIO_OUTPUT"),
    ("-t", "raw", "-D", "PREROUTING", "-j", "ISTIO_PRERT"),
    ("-t", "raw", "-D", "OUTPUT", "-j", "ISTIO_OUTPUT"),
    ("-t", "nat", "-D", "PREROUTING", "-j", "ISTIO_PRERT"),
    *(("-t", table, "-F", chain) for table in ("mangle", "nat", "raw") for chain in ("ISTIO_PRERT", "ISTIO_OUTPUT")),
    *(("-t", table, "-X", chain) for table in ("mangle", "nat", "raw") for chain in ("ISTIO_PRERT", "ISTIO_OUTPUT")),
)


def routing_comment_lines(config: AmbientConfig) -> list[str]:
    """The dry run's policy-routing section, as comments: what apply will add beside the rules."""
    if config.scope == "host":
        return []
    pod = ambient_pod_footprint(config)
    lines = ["# policy routing (in-pod mode): replies of connections ztunnel accepted (connmark 0x111) go via lo"]
    lines += [f"#   {rule.command()}" for rule in pod.policy_rules]
    lines += [f"#   {route.command()}" for route in pod.routes]
    return lines


def probe_ipset_document(config: AmbientConfig) -> str:
    """``ipset restore`` input creating the probe sets if missing (``-exist``: members are kept)."""
    families = (Family.V4, Family.V6) if config.enable_ipv6 else (Family.V4,)
    lines = ["# ipset restore"]
    for family in families:
        name, inet = (PROBE_SET_V4, "inet") if family is Family.V4 else (PROBE_SET_V6, "inet6")
        lines.append(f"create {name} hash:ip family {inet} comment -exist")
    # The node agent's per-pod update: entries commented with the pod's UID (Istio's), idempotent.
    lines += [f'add {_probe_set(address)} {address} comment "{config.pod_uid}" -exist' for address in config.enrol]
    lines += [f"del {_probe_set(address)} {address} -exist" for address in config.unenrol]
    return "\n".join(lines) + "\n"


def _probe_set(address: object) -> str:
    return PROBE_SET_V6 if getattr(address, "version", 4) == 6 else PROBE_SET_V4

