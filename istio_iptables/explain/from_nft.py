"""Native nftables rules as explain's :class:`~istio_iptables.explain.walk.Tables`. Pure.

Two sources: the :class:`~istio_iptables.nft.model.NftRuleset` a configuration builds
(``--native-nftables``, :func:`read_model`), and ``nft -j list ruleset`` (``--live``), which
:mod:`istio_iptables.nft.listing` reads back into the same nft model, so both reach the evaluator
through one translation (:func:`to_tables`). What is not understood
stays in the rule as :class:`~istio_iptables.xtables.model.Unsupported` (explain then stops there and
says why): nothing is skipped.

Our tables are ``inet``: one table holds both families. A rule that names an address (or a
TPROXY) of the other family never matches a packet of this one (nft adds an implicit ``meta
nfproto`` check), so the rule is kept, keeping its position in the chain, behind a family guard
that cannot match. Rule numbers are positions in the nft chain, as ``nft list chain`` shows it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping

from istio_iptables.explain.walk import BaseChain, ChainRule, Hook, Tables
from istio_iptables.net import Family
from istio_iptables.nft import model as nft
from istio_iptables.nft.listing import VERDICTS, FamilyOnly, ListedChain, ListedRule, ListedTable, SetMembers
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
    L4Protocol,
    Mark,
    Match,
    Owner,
    PortRange,
    Ports,
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


def explained(table: ListedTable) -> bool:
    """A table explain evaluates: ours (the sidecar's or ambient's ``inet`` tables)."""
    return table.family == "inet" and table.name in EXPLAINED_TABLES

HOOKS: dict[str, Hook] = {
    "prerouting": "PREROUTING",
    "input": "INPUT",
    "forward": "FORWARD",
    "output": "OUTPUT",
    "postrouting": "POSTROUTING",
}
_COUNTS = re.compile(r"\bcounter packets \d+ bytes \d+")


# --- from the configuration's model --------------------------------------------------------


def read_model(ruleset: nft.NftRuleset) -> list[ListedTable]:
    """The configuration's nft model as the listing of the tables it would create."""
    tables = []
    for table in ruleset.used_tables():
        read = ListedTable("inet", table.name)
        for named in table.sets.values():
            # The model holds each network at the set's prefix length; the kernel holds its address.
            read.sets[named.name] = tuple(
                member if isinstance(member, int | PortRange) else ipaddress.ip_network(member.network_address)
                for member in named.members
            )  # type: ignore[assignment]
        for chain in table.used_chains():
            hook = chain.hook
            read.chains[chain.name] = ListedChain(
                chain.name,
                hook.hook if hook else None,
                "nat" if hook and hook.type == "nat" else "filter",
                hook.priority if hook else 0,
                rules=[ListedRule((*rule.matches, *rule.statements)) for rule in chain.rules],
            )
        tables.append(read)
    return tables


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
    read: Iterable[ListedTable],
    family: Family,
    source: str,
    handles: bool = False,
    texts: Mapping[tuple[str, str, int], str] | None = None,
) -> tuple[Tables, dict[tuple[str, str, int], ListedRule]]:
    """``family``'s view of our tables, and each (table, chain, rule number)'s rule as read.

    ``handles`` adds each rule's handle to its text; ``texts`` (:func:`listed_texts`) gives the rules
    as nft prints them, else they are spelled from the model. Other tables are not evaluated: each
    one that holds rules (or a dropping policy) is a warning.
    """
    texts = texts or {}
    chains: dict[tuple[str, str], list[ChainRule]] = {}
    policies: dict[tuple[str, str], str] = {}
    hooks: dict[Hook, list[BaseChain]] = {}
    index: dict[tuple[str, str, int], ListedRule] = {}
    problems: list[str] = []
    for table in read:
        if not explained(table):
            if table.has_effect:
                problems.append(f"table {table.family} {table.name} is not ours and is not evaluated")
            continue
        for chain in table.chains.values():
            key = (table.name, chain.name)
            chains[key] = []
            for number, rule in enumerate(chain.rules, 1):
                model_rule = to_rule(rule, table.name, chain.name, family)
                text = texts.get((table.name, chain.name, rule.handle or -1)) or listed_rule_text(rule)
                text += f" # handle {rule.handle}" if handles and rule.handle is not None else ""
                chains[key].append(ChainRule(model_rule, text))
                index[(table.name, chain.name, number)] = rule
                problems += [
                    f"{table.name} {chain.name} rule {number}: not understood: {part.text} in '{text}'"
                    for part in (*model_rule.matches, model_rule.target)
                    if isinstance(part, Unsupported)
                ]
            hook = HOOKS.get(chain.hook or "")
            if hook is not None:
                policies[key] = chain.policy
                hooks.setdefault(hook, []).append(BaseChain(table.name, chain.name, chain.priority, chain.kind))  # type: ignore[arg-type]
    ordered = {hook: tuple(sorted(bases, key=lambda base: base.priority)) for hook, bases in hooks.items()}
    sets = _used_sets(read, chains, problems)
    tables = Tables(family, chains, policies, ordered, sets, source, problems, dialect="nft")
    return tables, index


def _used_sets(
    read: Iterable[ListedTable], chains: Mapping[tuple[str, str], list[ChainRule]], problems: list[str]
) -> dict[str, SetMembers]:
    """The members of every set a rule matches, at the prefix length it is matched with."""
    held = {table.name: table.sets for table in read if explained(table)}
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


def to_rule(read: ListedRule, table: str, chain: str, family: Family) -> Rule:
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
            matches += [L4Protocol(part.protocol), SetMatch(set_key(table, part.set_name), direction)]
        elif isinstance(part, nft.TproxyTo):
            other_family |= part.version != family.value
            statements.append(part)
        elif isinstance(part, Unsupported) and part.text.startswith('{"match"'):
            matches.append(part)  # an unread match expression (its JSON, as _part keeps it)
        elif isinstance(part, nft.Statement | Unsupported):
            statements.append(part)
        else:
            if isinstance(part, nft.Port) and part.protocol != "th":
                matches.append(L4Protocol(part.protocol))  # "tcp dport" checks the protocol first, as nft does
            matches.append(_to_match(part))  # type: ignore[arg-type]
    if other_family:
        matches.insert(0, _NEVER[family.value])
    return Rule(table, chain, tuple(matches), _to_target(statements))  # type: ignore[arg-type]


def _to_match(part: nft.NftMatch | Unsupported) -> Match:
    if isinstance(part, nft.L4Proto):
        return L4Protocol(part.name)
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
        if isinstance(statement, nft.NftVerdict):
            return Verdict(VERDICTS[statement.name])  # type: ignore[arg-type]
        if isinstance(statement, nft.JumpTo):
            return Jump(statement.chain)
        if isinstance(statement, nft.RedirectTo):
            return Redirect(statement.port)
        if isinstance(statement, nft.SetMetaMark):
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
        and statements[-1] == nft.NFT_ACCEPT
        and (len(statements) == 2 or isinstance(statements[1], nft.SetMetaMark))
    ):
        mark = statements[1] if isinstance(statements[1], nft.SetMetaMark) else None
        return Tproxy(statements[0].port, mark.value, 0xFFFFFFFF) if mark else Tproxy(statements[0].port, 0, 0)
    texts = [part.text if isinstance(part, Unsupported) else statement_text(part) for part in statements]
    return Unsupported(" ".join(texts) or "a rule without a verdict")


def listed_rule_text(rule: ListedRule) -> str:
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
