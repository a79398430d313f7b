"""The one reader of ``nft -j list ruleset``: the listing as tables, chains, rules and sets. Pure.

Both users read through it: the native backend (:mod:`istio_iptables.system.nft`: which of our
tables exist, what to put back, iptables-nft's ``ISTIO_*`` chains and the jumps into them) and
explain (:mod:`istio_iptables.explain.from_nft`: every rule in the nft model). Each rule keeps its
JSON expressions (the backend's ownership checks and restores use them as they are) and reads
them into the nft model's matches and statements on first use (:attr:`ListedRule.parts`); a set's
elements are read on first use too, so the apply path pays only for what it looks at. The module
is light to import (records, no dataclasses; json and the nft model when first needed): the
iptables backends list iptables-nft's chains through it as well. What is not
understood stays in the rule as :class:`~istio_iptables.xtables.model.Unsupported` (its JSON):
nothing is skipped.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeAlias

from istio_iptables._lib.records import factory, record
from istio_iptables.net import IPNetwork
from istio_iptables.nft.names import OUR_TABLES
from istio_iptables.xtables.model import PortEntry, PortRange, Unsupported

if TYPE_CHECKING:
    from istio_iptables.nft import model as nft

# nft's verdict statements, and the iptables verdict each one is.
VERDICTS = {"return": "RETURN", "accept": "ACCEPT", "drop": "DROP"}


@record
class FamilyOnly:
    """``meta nfproto ipv4``: the rule sees only this family's packets."""

    version: int


# What a rule read from the kernel may hold: the nft model's parts, or what we could not read.
Part: TypeAlias = "nft.NftMatch | nft.Statement | Unsupported | FamilyOnly"
SetMembers: TypeAlias = tuple[IPNetwork, ...] | tuple[PortEntry, ...]


class ListedRule:
    """One rule: its parts in order (the nft model), its handle and packet counter (if any).

    From a listing, ``expressions`` holds the rule's JSON (counter included) and ``parts`` is read
    from it when first asked for; a rule built from the configuration's model gives ``parts``.
    """

    __slots__ = ("_parts", "expressions", "handle", "packets")

    def __init__(
        self,
        parts: tuple[Part, ...] | None = None,
        handle: int | None = None,
        packets: int | None = None,
        expressions: list[Any] | None = None,
    ) -> None:
        self._parts = parts
        self.handle = handle
        self.packets = packets
        self.expressions = expressions if expressions is not None else []

    @property
    def parts(self) -> tuple[Part, ...]:
        if self._parts is None:
            self._parts = tuple(
                _part(expression)
                for expression in self.expressions
                if not (isinstance(expression, dict) and "counter" in expression)
            )
        return self._parts

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ListedRule):
            return NotImplemented
        return (self.parts, self.handle, self.packets) == (other.parts, other.handle, other.packets)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"ListedRule(parts={self.parts!r}, handle={self.handle!r}, packets={self.packets!r})"


@record(frozen=False)
class ListedChain:
    name: str
    hook: str | None = None  # nft's hook name (prerouting, input, ...) for a base chain
    kind: str = "filter"  # "nat" for ``type nat`` chains
    priority: int = 0
    policy: str = "ACCEPT"
    rules: list[ListedRule] = factory(list)


class ListedTable:
    """One table of the listing: its chains with their rules, its named sets, and its objects as listed."""

    def __init__(self, family: str, name: str) -> None:
        self.family = family  # nft family: inet, ip, ip6, ...
        self.name = name
        self.chains: dict[str, ListedChain] = {}
        # The table's own JSON objects (table, sets, chains, rules) in listing order: what a restore replays.
        self.objects: list[dict[str, Any]] = []
        self._set_elements: dict[str, Any] = {}
        self._sets: dict[str, SetMembers | None] | None = None

    @property
    def sets(self) -> dict[str, SetMembers | None]:
        """Named sets: their elements as the kernel holds them (addresses as /32 or /128, intervals
        as prefixes), or ports; None when the elements could not be read."""
        if self._sets is None:
            self._sets = {name: _set_elements(elements) for name, elements in self._set_elements.items()}
        return self._sets

    @property
    def ours(self) -> bool:
        return self.family == "inet" and self.name in OUR_TABLES

    @property
    def has_effect(self) -> bool:
        return any(chain.rules or chain.policy != "ACCEPT" for chain in self.chains.values())


class NftJsonError(ValueError):
    pass


def read_listing(text: str) -> list[ListedTable]:
    """Every table of an ``nft -j list ruleset`` text (ours and others), in listing order."""
    import json

    try:
        objects = json.loads(text)["nftables"]
    except (ValueError, KeyError, TypeError) as error:
        raise NftJsonError(f"not an 'nft -j' listing: {error}") from None
    return read_listing_objects(objects)


def read_listing_objects(objects: Any) -> list[ListedTable]:
    """The tables of the listing's ``nftables`` array (already decoded)."""
    tables: dict[tuple[str, str], ListedTable] = {}
    try:
        for item in objects:
            _read_object(item, tables)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise NftJsonError(f"unexpected object in the 'nft -j' listing: {error!r}") from None
    return list(tables.values())


def _read_object(item: Any, tables: dict[tuple[str, str], ListedTable]) -> None:
    def table_of(family: str, name: str) -> ListedTable:
        return tables.setdefault((family, name), ListedTable(family, name))

    if not isinstance(item, dict):
        return
    if "table" in item:
        table = table_of(item["table"]["family"], item["table"]["name"])
    elif "chain" in item:
        chain = item["chain"]
        table = table_of(chain["family"], chain["table"])
        table.chains[chain["name"]] = ListedChain(
            chain["name"],
            chain.get("hook"),
            "nat" if chain.get("type") == "nat" else "filter",
            int(chain.get("prio", 0)),
            str(chain.get("policy", "accept")).upper(),
        )
    elif "set" in item:
        named = item["set"]
        table = table_of(named["family"], named["table"])
        table._set_elements[named["name"]] = named.get("elem", [])
        table._sets = None
    elif "rule" in item:
        rule = item["rule"]
        table = table_of(rule["family"], rule["table"])
        expressions = rule.get("expr", [])
        counters = [expr["counter"] for expr in expressions if isinstance(expr, dict) and "counter" in expr]
        packets = counters[-1].get("packets") if counters and isinstance(counters[-1], dict) else None
        chain_of = table.chains.setdefault(rule["chain"], ListedChain(rule["chain"]))
        chain_of.rules.append(ListedRule(None, rule.get("handle"), packets, expressions))
    else:
        return
    table.objects.append(item)


def _part(expression: Any) -> Part:
    import json  # for what is not understood: its JSON, as the listing gave it

    try:
        part = _statement(expression) if "match" not in expression else _match(expression["match"])
    except (KeyError, TypeError, ValueError, AttributeError):
        part = None
    return part if part is not None else Unsupported(json.dumps(expression, separators=(",", ":")))


def _statement(expression: Mapping[str, Any]) -> Part | None:
    from istio_iptables.nft import model as nft  # the model only when a rule's parts are asked for

    (key, value), = expression.items()
    if key in VERDICTS:
        return nft.NftVerdict(key)  # type: ignore[arg-type]
    if key == "jump":
        return nft.JumpTo(value["target"])
    if key == "redirect" and set(value) == {"port"}:
        return nft.RedirectTo(int(value["port"]))
    if key == "tproxy" and set(value) == {"family", "port"} and value["family"] in ("ip", "ip6"):
        return nft.TproxyTo(4 if value["family"] == "ip" else 6, int(value["port"]))
    if key == "snat" and set(value) <= {"addr", "family"} and isinstance(value.get("addr"), str):
        return nft.SnatTo(ipaddress.ip_address(value["addr"]))
    if key == "mangle":
        target, source = value["key"], value["value"]
        if target == {"ct": {"key": "mark"}} and isinstance(source, dict) and "|" in source:
            # ct mark set ct mark & KEEP | VALUE (ambient's CONNMARK --set-xmark 0x111/0xfff)
            kept, bits = source["|"]
            inner, keep = kept["&"]
            if inner == {"ct": {"key": "mark"}}:
                keep, bits = _u32(keep), _u32(bits)
                return nft.SetCtMarkBits(bits, (~keep & 0xFFFFFFFF) | bits)
            return None
        if target == {"meta": {"key": "mark"}}:
            if source == {"ct": {"key": "mark"}}:
                return nft.RestoreMarkFromConnection()
            return nft.SetMetaMark(_u32(source))
        if target == {"ct": {"key": "mark"}} and source == {"meta": {"key": "mark"}}:
            return nft.SaveMarkToConnection()
        if target == {"ct": {"key": "zone"}}:
            return nft.SetCtZone(_u32(source))
    return None


def _match(match: Mapping[str, Any]) -> Part | None:
    from istio_iptables.nft import model as nft

    op, left, right = match["op"], match["left"], match["right"]
    negate = op == "!="
    if op not in ("==", "!=", "in"):
        return None
    if "&" in left and left["&"][0] in ({"meta": {"key": "mark"}}, {"ct": {"key": "mark"}}):
        # meta mark & 0xfff != 0x539, ct mark & 0xfff == 0x111 (ambient's masked marks)
        subject, mask = left["&"]
        if subject == {"meta": {"key": "mark"}}:
            return nft.MarkIs(_u32(right), negate, _u32(mask))
        return None if negate else nft.CtMarkIs(_u32(right), _u32(mask))
    if "meta" in left:
        key = left["meta"]["key"]
        if key == "l4proto" and right in ("tcp", "udp") and not negate:
            return nft.L4Proto(right)
        if key == "nfproto" and right in ("ipv4", "ipv6") and not negate:
            return FamilyOnly(4 if right == "ipv4" else 6)
        if key in ("iifname", "oifname") and isinstance(right, str):
            # nft spells "any suffix" eth*, iptables (and our model) eth+; a literal star is \*
            name = right[:-1] + "+" if right.endswith("*") and not right.endswith("\\*") else right
            return nft.IfName("in" if key == "iifname" else "out", name, negate)
        if key in ("skuid", "skgid") and isinstance(right, int | str):
            return nft.SocketOwner("uid" if key == "skuid" else "gid", str(right), negate)
        if key == "mark":
            return nft.MarkIs(_u32(right), negate)
        return None
    if "ct" in left:
        key = left["ct"]["key"]
        if key == "mark" and not negate:
            return nft.CtMarkIs(_u32(right))
        if key == "state" and not negate:
            states = [right] if isinstance(right, str) else list(right)
            if states and all(state in ("invalid", "related", "established", "new") for state in states):
                return nft.CtState(tuple(states))
        return None
    if isinstance(right, str) and right.startswith("@"):
        return None if negate else _set_match(left, right[1:])
    if "payload" in left:
        protocol, field_name = left["payload"]["protocol"], left["payload"]["field"]
        if protocol in ("ip", "ip6") and field_name in ("saddr", "daddr"):
            network = _network(right)
            if network.version != (4 if protocol == "ip" else 6):
                return None
            return nft.Addr(field_name, network, negate)
        if protocol in ("tcp", "udp", "th") and field_name in ("sport", "dport"):
            return nft.Port(protocol, field_name, _ports(right), negate)  # type: ignore[arg-type]
    return None


def _set_elements(elements: Any) -> SetMembers | None:
    members: list[Any] = []
    try:
        for listed in elements:
            # An element with a comment (the probe sets': the pod's UID), timeout or counter is listed
            # wrapped: {"elem": {"val": VALUE, "comment": ...}}.
            element = listed["elem"]["val"] if isinstance(listed, dict) and "elem" in listed else listed
            if type(element) is int or (isinstance(element, dict) and "range" in element and _is_port_range(element)):
                members += _ports(element)
            elif isinstance(element, dict) and "range" in element:
                low, high = (ipaddress.ip_address(bound) for bound in element["range"])
                members += ipaddress.summarize_address_range(low, high)  # type: ignore[type-var]
            else:
                members.append(_network(element))
    except (KeyError, TypeError, ValueError):
        return None
    if len({isinstance(member, int | PortRange) for member in members}) > 1:
        return None  # ports and addresses in one set: not a set of ours
    return tuple(members)


def _is_port_range(element: Mapping[str, Any]) -> bool:
    return all(type(bound) is int for bound in element["range"])


def _set_match(left: Mapping[str, Any], name: str) -> Part | None:
    """``tcp dport @NAME``, ``ip daddr @NAME`` or ``ip daddr & 255.255.0.0 @NAME``."""
    from istio_iptables.nft import model as nft

    netmask = None
    if "&" in left:
        left, netmask = left["&"]
    protocol, field_name = left["payload"]["protocol"], left["payload"]["field"]
    if protocol in ("tcp", "udp") and field_name in ("sport", "dport") and netmask is None:
        return nft.PortInSet(protocol, field_name, name)
    if protocol in ("ip", "ip6") and field_name in ("saddr", "daddr"):
        version = 4 if protocol == "ip" else 6
        bits = 32 if version == 4 else 128
        prefixlen = bits if netmask is None else _prefixlen(netmask, bits)
        return nft.AddrInSet(field_name, version, prefixlen, name)
    return None


def _prefixlen(netmask: str, bits: int) -> int:
    address = ipaddress.ip_address(netmask)
    mask, prefixlen = int(address), bin(int(address)).count("1")
    if address.max_prefixlen != bits or mask != ((1 << bits) - 1) ^ ((1 << (bits - prefixlen)) - 1):
        raise ValueError(f"not a netmask: {netmask}")
    return prefixlen


def _u32(value: Any) -> int:
    if type(value) is not int or not 0 <= value < 2**32:
        raise ValueError(f"not a 32-bit value: {value!r}")
    return value


def _network(value: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if isinstance(value, str):
        return ipaddress.ip_network(value)
    prefix = value["prefix"]
    return ipaddress.ip_network(f"{prefix['addr']}/{int(prefix['len'])}")


def _ports(value: Any) -> tuple[PortEntry, ...]:
    """A port, a range (``{"range": [8000, 9000]}``, nft's ``8000-9000``) or an anonymous set of both."""
    items = value["set"] if isinstance(value, dict) and "set" in value else [value]
    ports: list[PortEntry] = []
    for item in items:
        if isinstance(item, dict) and "range" in item:
            low, high = item["range"]
            if type(low) is not int or type(high) is not int or not 0 <= low <= high <= 65535:
                raise ValueError(f"not a port range: {item!r}")
            ports.append(low if low == high else PortRange(low, high))
        elif type(item) is int and 0 <= item <= 65535:
            ports.append(item)
        else:
            raise ValueError(f"not a port: {item!r}")
    if not ports:
        raise ValueError(f"not ports: {value!r}")
    return tuple(ports)
