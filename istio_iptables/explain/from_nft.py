"""Native nftables rules as explain's :class:`~istio_iptables.explain.walk.Tables`. Pure.

Two sources: the :class:`~istio_iptables.nft.model.NftRuleset` a configuration builds
(``--native-nftables``), and ``nft -j list ruleset`` (``--live``), which is first read back into
the same nft model, so both reach the evaluator through one translation. What is not understood
stays in the rule as :class:`~istio_iptables.xtables.model.Unsupported` (explain then stops there and
says why): nothing is skipped.

Our tables are ``inet``: one table holds both families. A rule that names an address (or a
TPROXY) of the other family never matches a packet of this one (nft adds an implicit ``meta
nfproto`` check), so the rule is kept, keeping its position in the chain, behind a family guard
that cannot match. Rule numbers are positions in the nft chain, as ``nft list chain`` shows it.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from istio_iptables.explain.walk import BaseChain, ChainRule, Hook, Tables
from istio_iptables.net import Family, IPNetwork
from istio_iptables.nft import model as nft
from istio_iptables.nft.names import AMBIENT_TABLES, OUR_TABLES
from istio_iptables.nft.render import match_text, statement_text
from istio_iptables.xtables.model import (
    Address,
    ConnMark,
    ConnMarkRestore,
    ConnMarkSave,
    ConnMarkSet,
    ConnState,
    CtZone,
    Interface,
    Jump,
    Mark,
    Match,
    Owner,
    PortEntry,
    PortRange,
    Ports,
    Protocol,
    Redirect,
    Rule,
    SetMark,
    SetMatch,
    Snat,
    Target,
    Tproxy,
    Unsupported,
    Verdict,
)

# Every table explain evaluates: the sidecar's and ambient's (both ``inet``).
EXPLAINED_TABLES = (*OUR_TABLES, *AMBIENT_TABLES)

HOOKS: dict[str, Hook] = {
    "prerouting": "PREROUTING",
    "input": "INPUT",
    "forward": "FORWARD",
    "output": "OUTPUT",
    "postrouting": "POSTROUTING",
}
_COUNTS = re.compile(r"\bcounter packets \d+ bytes \d+")
VERDICTS = {"return": "RETURN", "accept": "ACCEPT", "drop": "DROP"}


@dataclass(frozen=True)
class FamilyOnly:
    """``meta nfproto ipv4``: the rule sees only this family's packets."""

    version: int


# What a rule read from the kernel may hold: the nft model's parts, or what we could not read.
Part: TypeAlias = nft.NftMatch | nft.Statement | Unsupported | FamilyOnly


@dataclass(frozen=True)
class ReadRule:
    """One rule as the kernel holds it: its parts in order, its handle and packet counter (if any)."""

    parts: tuple[Part, ...]
    handle: int | None = None
    packets: int | None = None


@dataclass
class ReadChain:
    name: str
    hook: Hook | None = None
    kind: str = "filter"  # "nat" for ``type nat`` chains
    priority: int = 0
    policy: str = "ACCEPT"
    rules: list[ReadRule] = field(default_factory=list)


SetMembers: TypeAlias = tuple[IPNetwork, ...] | tuple[PortEntry, ...]


@dataclass
class ReadTable:
    family: str  # nft family: inet, ip, ip6, ...
    name: str
    chains: dict[str, ReadChain] = field(default_factory=dict)
    # Named sets: their elements as the kernel holds them (addresses as /32 or /128, intervals as
    # prefixes), or ports; None when the elements could not be read.
    sets: dict[str, SetMembers | None] = field(default_factory=dict)

    @property
    def ours(self) -> bool:
        return self.family == "inet" and self.name in EXPLAINED_TABLES

    @property
    def has_effect(self) -> bool:
        return any(chain.rules or chain.policy != "ACCEPT" for chain in self.chains.values())


# --- from the configuration's model --------------------------------------------------------


def read_model(ruleset: nft.NftRuleset) -> list[ReadTable]:
    tables = []
    for table in ruleset.used_tables():
        read = ReadTable("inet", table.name)
        for named in table.sets.values():
            # The model holds each network at the set's prefix length; the kernel holds its address.
            read.sets[named.name] = tuple(
                member if isinstance(member, int | PortRange) else ipaddress.ip_network(member.network_address)
                for member in named.members
            )  # type: ignore[assignment]
        for chain in table.used_chains():
            hook = chain.hook
            read.chains[chain.name] = ReadChain(
                chain.name,
                HOOKS[hook.hook] if hook else None,
                "nat" if hook and hook.type == "nat" else "filter",
                hook.priority if hook else 0,
                rules=[ReadRule((*rule.matches, *rule.statements)) for rule in chain.rules],
            )
        tables.append(read)
    return tables


# --- from ``nft -j list ruleset`` ----------------------------------------------------------


class NftJsonError(ValueError):
    pass


def read_json(text: str) -> list[ReadTable]:
    """Every table of the listing (ours and others), with each rule's parts, handle and counter."""
    try:
        objects = json.loads(text)["nftables"]
    except (ValueError, KeyError, TypeError) as error:
        raise NftJsonError(f"not an 'nft -j' listing: {error}") from None
    tables: dict[tuple[str, str], ReadTable] = {}
    try:
        for item in objects:
            _read_object(item, tables)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise NftJsonError(f"unexpected object in the 'nft -j' listing: {error!r}") from None
    return list(tables.values())


def _read_object(item: Any, tables: dict[tuple[str, str], ReadTable]) -> None:
    def table_of(family: str, name: str) -> ReadTable:
        return tables.setdefault((family, name), ReadTable(family, name))

    if not isinstance(item, dict):
        return
    if "table" in item:
        table_of(item["table"]["family"], item["table"]["name"])
    elif "chain" in item:
        chain = item["chain"]
        table_of(chain["family"], chain["table"]).chains[chain["name"]] = ReadChain(
            chain["name"],
            HOOKS.get(chain.get("hook", "")),
            "nat" if chain.get("type") == "nat" else "filter",
            int(chain.get("prio", 0)),
            str(chain.get("policy", "accept")).upper(),
        )
    elif "set" in item:
        named = item["set"]
        table_of(named["family"], named["table"]).sets[named["name"]] = _set_elements(named.get("elem", []))
    elif "rule" in item:
        rule = item["rule"]
        chains = table_of(rule["family"], rule["table"]).chains
        chains.setdefault(rule["chain"], ReadChain(rule["chain"])).rules.append(_read_rule(rule))


def _read_rule(rule: Mapping[str, Any]) -> ReadRule:
    parts: list[Part] = []
    packets = None
    for expression in rule.get("expr", []):
        if isinstance(expression, dict) and "counter" in expression:
            counter = expression["counter"]
            packets = counter.get("packets") if isinstance(counter, dict) else None
            continue
        parts.append(_part(expression))
    return ReadRule(tuple(parts), rule.get("handle"), packets)


def _part(expression: Any) -> Part:
    try:
        part = _statement(expression) if "match" not in expression else _match(expression["match"])
    except (KeyError, TypeError, ValueError, AttributeError):
        part = None
    return part if part is not None else Unsupported(json.dumps(expression, separators=(",", ":")))


def _statement(expression: Mapping[str, Any]) -> Part | None:
    (key, value), = expression.items()
    if key in VERDICTS:
        return nft.Verdict(key)  # type: ignore[arg-type]
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
            return nft.SetMark(_u32(source))
        if target == {"ct": {"key": "mark"}} and source == {"meta": {"key": "mark"}}:
            return nft.SaveMarkToConnection()
        if target == {"ct": {"key": "zone"}}:
            return nft.SetCtZone(_u32(source))
    return None


def _match(match: Mapping[str, Any]) -> Part | None:
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
        for element in elements:
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


# --- into explain's Tables -----------------------------------------------------------------


def listed_texts(listing: str) -> dict[tuple[str, str, int], str]:
    """(table, chain, handle) -> the rule as ``nft -a list ruleset`` prints it (our ``inet`` tables only)."""
    texts: dict[tuple[str, str, int], str] = {}
    table = chain = ""
    for line in listing.splitlines():
        words = line.split()
        if words[:1] == ["table"]:
            table, chain = (words[2] if words[1:2] == ["inet"] and len(words) >= 3 else ""), ""
        elif words[:1] == ["chain"] and len(words) >= 2:
            chain = words[1]
        elif table in EXPLAINED_TABLES and chain and "# handle " in line:
            text, _, handle = line.strip().rpartition(" # handle ")
            if handle.isdigit():
                texts[(table, chain, int(handle))] = _COUNTS.sub("counter", text)  # counts change; the rule not
    return texts


def to_tables(
    read: Iterable[ReadTable],
    family: Family,
    source: str,
    handles: bool = False,
    texts: Mapping[tuple[str, str, int], str] | None = None,
) -> tuple[Tables, dict[tuple[str, str, int], ReadRule]]:
    """``family``'s view of our tables, and each (table, chain, rule number)'s rule as read.

    ``handles`` adds each rule's handle to its text; ``texts`` (:func:`listed_texts`) gives the rules
    as nft prints them, else they are spelled from the model. Other tables are not evaluated: each
    one that holds rules (or a dropping policy) is a warning.
    """
    texts = texts or {}
    chains: dict[tuple[str, str], list[ChainRule]] = {}
    policies: dict[tuple[str, str], str] = {}
    hooks: dict[Hook, list[BaseChain]] = {}
    index: dict[tuple[str, str, int], ReadRule] = {}
    problems: list[str] = []
    for table in read:
        if not table.ours:
            if table.has_effect:
                problems.append(f"table {table.family} {table.name} is not ours and is not evaluated")
            continue
        for chain in table.chains.values():
            key = (table.name, chain.name)
            chains[key] = []
            for number, rule in enumerate(chain.rules, 1):
                model_rule = to_rule(rule, table.name, chain.name, family)
                text = texts.get((table.name, chain.name, rule.handle or -1)) or rule_text(rule)
                text += f" # handle {rule.handle}" if handles and rule.handle is not None else ""
                chains[key].append(ChainRule(model_rule, text))
                index[(table.name, chain.name, number)] = rule
                problems += [
                    f"{table.name} {chain.name} rule {number}: not understood: {part.text} in '{text}'"
                    for part in (*model_rule.matches, model_rule.target)
                    if isinstance(part, Unsupported)
                ]
            if chain.hook is not None:
                policies[key] = chain.policy
                hooks.setdefault(chain.hook, []).append(BaseChain(table.name, chain.name, chain.priority, chain.kind))  # type: ignore[arg-type]
    ordered = {hook: tuple(sorted(bases, key=lambda base: base.priority)) for hook, bases in hooks.items()}
    sets = _used_sets(read, chains, problems)
    tables = Tables(family, chains, policies, ordered, sets, source, problems, dialect="nft")
    return tables, index


def _used_sets(
    read: Iterable[ReadTable], chains: Mapping[tuple[str, str], list[ChainRule]], problems: list[str]
) -> dict[str, SetMembers]:
    """The members of every set a rule matches, at the prefix length it is matched with."""
    held = {table.name: table.sets for table in read if table.ours}
    sets: dict[str, SetMembers] = {}
    for (table, _chain), rules in chains.items():
        for item in rules:
            for match in item.rule.matches:
                if not isinstance(match, SetMatch) or match.name in sets:
                    continue
                name, _, length = match.name.partition(" @")[2].partition("/")
                elements = held.get(table, {}).get(name)
                if elements is None:
                    problems.append(f"set {table} @{name}: its elements could not be read")
                    continue
                sets[match.name] = masked_members(elements, int(length) if length else None)
    return sets


def set_key(table: str, name: str, prefixlen: int | None = None) -> str:
    """How explain names a set match: sets are per table, and an address set is matched at a prefix length."""
    return f"{table} @{name}" + ("" if prefixlen is None else f"/{prefixlen}")


def masked_members(elements: SetMembers, prefixlen: int | None) -> SetMembers:
    """The networks an address is in when ``address & mask(prefixlen)`` is an element (ports: as is).

    An element at least as long as the mask holds the masked address only if its bits past the
    mask are zero; then it is the network of the address's first ``prefixlen`` bits. A shorter
    element (an interval set's prefix) contains the masked address when it contains the address.
    """
    if prefixlen is None or not elements or isinstance(elements[0], int | PortRange):
        return elements
    members = []
    for element in elements:
        if isinstance(element, int | PortRange):
            continue
        if element.prefixlen < prefixlen:
            members.append(element)
        elif int(element.network_address) & ((1 << (element.max_prefixlen - prefixlen)) - 1) == 0:
            members.append(ipaddress.ip_network((element.network_address, prefixlen)))
    return tuple(members)


# A match no packet of ``family`` can satisfy: an address of the other family.
_NEVER = {4: Address("src", ipaddress.ip_network("::/0")), 6: Address("src", ipaddress.ip_network("0.0.0.0/0"))}


def to_rule(read: ReadRule, table: str, chain: str, family: Family) -> Rule:
    matches: list[Match] = []
    statements: list[nft.Statement | Unsupported] = []
    other_family = False
    for part in read.parts:
        if isinstance(part, FamilyOnly):
            other_family |= part.version != family.value
        elif isinstance(part, nft.Addr):
            other_family |= part.network.version != family.value
            matches.append(Address("src" if part.direction == "saddr" else "dst", part.network, part.negate))
        elif isinstance(part, nft.AddrInSet):
            other_family |= part.version != family.value
            direction = "src" if part.direction == "saddr" else "dst"
            matches.append(SetMatch(set_key(table, part.set_name, part.prefixlen), direction))
        elif isinstance(part, nft.PortInSet):
            direction = "src" if part.direction == "sport" else "dst"
            matches += [Protocol(part.protocol), SetMatch(set_key(table, part.set_name), direction)]
        elif isinstance(part, nft.TproxyTo):
            other_family |= part.version != family.value
            statements.append(part)
        elif isinstance(part, Unsupported) and part.text.startswith('{"match"'):
            matches.append(part)  # an unread match expression (its JSON, as _part keeps it)
        elif isinstance(part, nft.Statement | Unsupported):
            statements.append(part)
        else:
            if isinstance(part, nft.Port) and part.protocol != "th":
                matches.append(Protocol(part.protocol))  # "tcp dport" checks the protocol first, as nft does
            matches.append(_to_match(part))  # type: ignore[arg-type]
    if other_family:
        matches.insert(0, _NEVER[family.value])
    return Rule(table, chain, tuple(matches), _to_target(statements))  # type: ignore[arg-type]


def _to_match(part: nft.NftMatch | Unsupported) -> Match:
    if isinstance(part, nft.L4Proto):
        return Protocol(part.name)
    if isinstance(part, nft.IfName):
        return Interface(part.direction, part.name, part.negate)
    if isinstance(part, nft.Port):
        return Ports("src" if part.direction == "sport" else "dst", part.ports, part.negate)
    if isinstance(part, nft.SocketOwner):
        return Owner(part.kind, part.id, part.negate)
    if isinstance(part, nft.MarkIs):
        return Mark(part.value, part.negate, part.mask)
    if isinstance(part, nft.CtMarkIs):
        return ConnMark(part.value, mask=part.mask)
    if isinstance(part, nft.CtState):
        return ConnState(tuple(state.upper() for state in part.states))
    return part if isinstance(part, Unsupported) else Unsupported(repr(part))


def _to_target(statements: list[nft.Statement | Unsupported]) -> Target:
    """The rule's statements as one target; the ones our rules use, TPROXY's triple included."""
    if len(statements) == 1:
        (statement,) = statements
        if isinstance(statement, nft.Verdict):
            return Verdict(VERDICTS[statement.name])  # type: ignore[arg-type]
        if isinstance(statement, nft.JumpTo):
            return Jump(statement.chain)
        if isinstance(statement, nft.RedirectTo):
            return Redirect(statement.port)
        if isinstance(statement, nft.SetMark):
            return SetMark(statement.value)
        if isinstance(statement, nft.SaveMarkToConnection):
            return ConnMarkSave()
        if isinstance(statement, nft.RestoreMarkFromConnection):
            return ConnMarkRestore()
        if isinstance(statement, nft.SetCtZone):
            return CtZone(statement.zone)
        if isinstance(statement, nft.SetCtMarkBits):
            return ConnMarkSet(statement.value, statement.mask)
        if isinstance(statement, nft.SnatTo):
            return Snat(statement.address)
    if (
        len(statements) in (2, 3)
        and isinstance(statements[0], nft.TproxyTo)
        and statements[-1] == nft.ACCEPT
        and (len(statements) == 2 or isinstance(statements[1], nft.SetMark))
    ):
        mark = statements[1] if isinstance(statements[1], nft.SetMark) else None
        return Tproxy(statements[0].port, mark.value, 0xFFFFFFFF) if mark else Tproxy(statements[0].port, 0, 0)
    texts = [part.text if isinstance(part, Unsupported) else statement_text(part) for part in statements]
    return Unsupported(" ".join(texts) or "a rule without a verdict")


def rule_text(rule: ReadRule) -> str:
    """The rule as ``nft list`` spells it (our renderer's syntax; unread parts as their JSON)."""
    words = []
    for part in rule.parts:
        if isinstance(part, Unsupported):
            words.append(part.text)
        elif isinstance(part, FamilyOnly):
            words.append(f"meta nfproto ipv{part.version}")
        elif isinstance(part, nft.Statement):
            words.append(statement_text(part))
        else:
            words.append(match_text(part))
    return " ".join(words)
