"""Explain a flow: walk the netfilter hooks as the kernel does and say which rules decide where it lands.

Pure. The evaluator works on :class:`Tables` (chains of model rules plus how they hook into the
kernel), so rules built from a configuration, rules read back with ``iptables-save`` (see
:mod:`istio_iptables.xtables.save`) and native nftables rules (:mod:`istio_iptables.explain.from_nft`) are all
explained the same way.

The kernel facts modelled here (net/netfilter, net/ipv4):
- hooks run their tables by priority: raw (-300), conntrack (-200), mangle (-150), nat DNAT (-100),
  filter (0), nat SNAT (+100);
- nat chains see only the first packet of a connection, once per direction of translation: a packet
  looping back over ``lo`` already carries its NAT binding, so nat PREROUTING/INPUT never see it;
- before conntrack (raw) a packet has no conntrack entry, so ``--ctstate`` sees INVALID there, and
  ``CT --zone`` does nothing to a looped-back packet, which keeps the entry it left with;
- ``-m owner`` only sees locally generated packets; a packet without a socket matches only ``!``
  (nft's ``skuid``/``skgid`` match it in neither form);
- REDIRECT sends OUTPUT packets to the loopback address and PREROUTING packets to the first address
  of the incoming interface; TPROXY hands the packet to a transparent listener, or drops it if none
  (nft's tproxy: the rule does not match, and the packet goes on).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeAlias

from istio_iptables.net import Family, IPNetwork
from istio_iptables.xtables.model import (
    BUILTIN_CHAINS,
    FULL_MASK,
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
    PortEntry,
    PortRange,
    Ports,
    ProtocolModule,
    Redirect,
    Rule,
    RuleSet,
    SetMark,
    SetMatch,
    Snat,
    SocketExists,
    Target,
    Tproxy,
    Unsupported,
    Verdict,
    port_in,
)
from istio_iptables.xtables.save import SavedRules
from istio_iptables.xtables.spelling import written_tokens

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
Hook = Literal["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"]
Origin = Literal["remote", "local", "proxy"]
ChainKind = Literal["filter", "nat"]
MAX_DEPTH = 64  # deeper jump nesting means a loop the kernel would have refused


# --- the rules, as the kernel holds them ----------------------------------------


@dataclass(frozen=True)
class ChainRule:
    rule: Rule
    text: str  # how the user sees the rule (iptables-save syntax)


@dataclass(frozen=True)
class BaseChain:
    """A chain the kernel calls at a hook; ``nat`` chains see only the first packet of a connection."""

    table: str
    chain: str
    priority: int
    kind: ChainKind = "filter"


# iptables' tables at each hook, in priority order (the security table is not modelled).
IPTABLES_HOOKS: dict[Hook, tuple[BaseChain, ...]] = {
    "PREROUTING": (
        BaseChain("raw", "PREROUTING", -300),
        BaseChain("mangle", "PREROUTING", -150),
        BaseChain("nat", "PREROUTING", -100, "nat"),
    ),
    "INPUT": (
        BaseChain("mangle", "INPUT", -150),
        BaseChain("filter", "INPUT", 0),
        BaseChain("nat", "INPUT", 100, "nat"),
    ),
    "FORWARD": (BaseChain("mangle", "FORWARD", -150), BaseChain("filter", "FORWARD", 0)),
    "OUTPUT": (
        BaseChain("raw", "OUTPUT", -300),
        BaseChain("mangle", "OUTPUT", -150),
        BaseChain("nat", "OUTPUT", -100, "nat"),
        BaseChain("filter", "OUTPUT", 0),
    ),
    "POSTROUTING": (BaseChain("mangle", "POSTROUTING", -150), BaseChain("nat", "POSTROUTING", 100, "nat")),
}
CONNTRACK_PRIORITY = -200


@dataclass
class Tables:
    """One family's rules as the kernel would run them."""

    family: Family
    chains: dict[tuple[str, str], list[ChainRule]]
    policies: dict[tuple[str, str], str] = field(default_factory=dict)
    hooks: Mapping[Hook, tuple[BaseChain, ...]] = field(default_factory=lambda: IPTABLES_HOOKS)
    # Members of the sets SetMatch names: CIDRs, or ports (our port sets). None: contents unknown.
    sets: Mapping[str, tuple[IPNetwork, ...] | tuple[PortEntry, ...]] | None = None
    source: str = "configuration"
    problems: list[str] = field(default_factory=list)
    # Where nft's expressions differ from iptables' matches and targets: skuid/skgid never match a
    # packet without a socket, negated or not (xt_owner: only negated), and a tproxy statement that
    # finds no listener ends the rule, the packet going on (xt_TPROXY drops it).
    dialect: Literal["iptables", "nft"] = "iptables"

    @classmethod
    def from_ruleset(cls, ruleset: RuleSet, source: str = "configuration") -> Tables:
        chains: dict[tuple[str, str], list[ChainRule]] = {}
        for table in ruleset.tables():
            for chain, rules in ruleset.chain_order(table).items():
                chains[(table, chain)] = [ChainRule(rule, xtables_rule_text(rule)) for rule in rules]
        sets = {name: named.members for name, named in ruleset.sets.items()}  # long lists (sets.py)
        return cls(ruleset.family, chains, sets=sets, source=source)

    @classmethod
    def from_saved(
        cls, saved: SavedRules, source: str, sets: Mapping[str, tuple[IPNetwork, ...]] | None = None
    ) -> Tables:
        """Rules read back with ``iptables-save``: each keeps the text the user sees there."""
        chains = {key: [ChainRule(item.rule, item.text) for item in rules] for key, rules in saved.chains.items()}
        return cls(
            saved.family,
            chains,
            dict(saved.policies),
            sets=sets,
            source=source,
            problems=list(saved.problems),
        )


def xtables_rule_text(rule: Rule) -> str:
    """The rule as iptables arguments (``-A CHAIN ...``, as written); unread parts as they were read."""
    tokens = ["-A", rule.chain]
    for match in rule.matches:
        tokens += [match.text] if isinstance(match, Unsupported) else written_tokens(match)
    tokens += [rule.target.text] if isinstance(rule.target, Unsupported) else written_tokens(rule.target)
    return " ".join(tokens)


# --- the flow ---------------------------------------------------------------------


@dataclass(frozen=True)
class Flow:
    """The first packet of a connection (or a later one with ``ct_state``)."""

    origin: Origin
    protocol: str
    src: IPAddress
    dst: IPAddress
    sport: int
    dport: int
    uid: int | None = None  # local and proxy origins: the sending socket's owner
    gid: int | None = None
    in_interface: str = "eth0"  # remote origin
    out_interface: str = "eth0"  # local origin, when the destination is not this namespace
    local_addresses: tuple[IPAddress, ...] | None = None  # None: unknown (remote flows are for us)
    ct_state: str = "NEW"
    mark: int = 0  # the sending socket's SO_MARK (ztunnel's 0x539); remote packets arrive unmarked
    ctmark: int = 0  # the connection's mark, for a later packet (ct_state ESTABLISHED)

    @property
    def family(self) -> Family:
        return Family.V4 if self.dst.version == 4 else Family.V6

    @property
    def locally_generated(self) -> bool:
        return self.origin != "remote"

    def is_local_address(self, address: IPAddress) -> bool:
        if address.is_loopback or (address.version == 4 and address in ipaddress.ip_network("127.0.0.0/8")):
            return True
        if self.local_addresses is None:
            return False
        return address in self.local_addresses


# --- the result -------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """A rule that matched the packet, or the policy of a built-in chain that decided it."""

    hook: Hook
    table: str
    chain: str
    number: int | None  # None for a chain policy
    text: str
    action: str  # what happened: "jump", "RETURN", "ACCEPT", "DROP", "REDIRECT", "TPROXY", "MARK", ...
    note: str = ""
    loopback_pass: bool = False


LandingKind = Literal["redirect", "tproxy", "local", "network", "forward", "drop", "undetermined"]


@dataclass(frozen=True)
class Landing:
    kind: LandingKind
    address: str | None = None  # where the packet is delivered ("127.0.0.1", "primary address of eth0")
    port: int | None = None  # the listening port that receives it
    original_destination: str = ""
    interface: str | None = None  # network / forward: the outgoing interface
    reason: str = ""


@dataclass(frozen=True)
class Explanation:
    flow: Flow
    source: str
    steps: tuple[Step, ...]
    landing: Landing
    decision: Step | None  # the REDIRECT/TPROXY/DROP rule, or the rule that could not be evaluated
    exclusions: tuple[Step, ...]  # RETURN/ACCEPT rules that let the packet pass
    effects: tuple[str, ...]  # marks, conntrack zones
    problems: tuple[str, ...] = ()

    @property
    def matched(self) -> list[tuple[str, str, int]]:
        """(table, chain, rule number) of every rule the packet matched, in order."""
        return [(s.table, s.chain, s.number) for s in self.steps if s.number is not None]


class _Undetermined(Exception):
    def __init__(self, step: Step, reason: str) -> None:
        super().__init__(reason)
        self.step = step
        self.reason = reason


# --- the packet as it moves ----------------------------------------------------------


@dataclass
class _Packet:
    src: IPAddress
    dst: IPAddress
    sport: int
    dport: int
    iif: str = ""
    oif: str = ""
    mark: int = 0
    ctmark: int = 0
    zone: int | None = None
    has_conntrack: bool = False
    has_socket: bool = False
    loopback_pass: bool = False
    redirect: tuple[str, int] | None = None  # (address label, port)
    tproxy: int | None = None


GroupResolver = Callable[[str], int | None]


def _no_groups(_name: str) -> int | None:
    return None


class _Walker:
    def __init__(self, tables: Tables, flow: Flow, groups: GroupResolver) -> None:
        self.tables = tables
        self.flow = flow
        self.groups = groups
        self.steps: list[Step] = []
        self.effects: list[str] = []
        self.hook: Hook = "OUTPUT"
        self.kind: ChainKind = "filter"  # of the base chain being run

    # -- matches --

    def match(self, match: Match, packet: _Packet) -> bool | None:
        flow = self.flow
        if isinstance(match, L4Protocol):
            return (flow.protocol == match.name) != match.negate
        if isinstance(match, Address):
            address = packet.src if match.direction == "src" else packet.dst
            return (address.version == match.network.version and address in match.network) != match.negate
        if isinstance(match, Ports):
            port = packet.sport if match.direction == "src" else packet.dport
            return port_in(port, match.ports) != match.negate
        if isinstance(match, Interface):
            name = packet.iif if match.direction == "in" else packet.oif
            wildcard = match.name.endswith("+")  # iptables: "eth+" is any name starting with "eth"
            hit = name.startswith(match.name[:-1]) if wildcard else name == match.name
            return hit != match.negate
        if isinstance(match, Owner):
            if not (packet.has_socket and self.hook in ("OUTPUT", "POSTROUTING")):
                return False if self.tables.dialect == "nft" else match.negate
            wanted = self._owner_id(match)
            if wanted is None:
                return None
            actual = flow.uid if match.kind == "uid" else flow.gid
            return (actual == wanted) != match.negate
        if isinstance(match, Mark):
            return ((packet.mark & match.mask) == match.value) != match.negate
        if isinstance(match, ConnMark):
            return ((packet.ctmark & match.mask) == match.value) != match.negate
        if isinstance(match, ConnState):
            state = self.flow.ct_state if packet.has_conntrack else "INVALID"
            return state in match.states
        if isinstance(match, ProtocolModule):
            return flow.protocol == match.name
        if isinstance(match, SocketExists):
            # xt_owner --socket-exists: a locally generated packet, seen where it still has its socket.
            return packet.has_socket and self.hook in ("OUTPUT", "POSTROUTING")
        if isinstance(match, SetMatch):
            if self.tables.sets is None or match.name not in self.tables.sets:
                return None
            members = self.tables.sets[match.name]
            if members and isinstance(members[0], int | PortRange):  # a port set: matches the packet's port
                port = packet.sport if match.direction == "src" else packet.dport
                return port_in(port, members) != match.negate  # type: ignore[arg-type]
            address = packet.src if match.direction == "src" else packet.dst
            member = any(
                address in network
                for network in members
                if not isinstance(network, int | PortRange) and network.version == address.version
            )
            return member != match.negate
        return None  # Unsupported

    def _owner_id(self, match: Owner) -> int | None:
        if match.id.isdigit():
            return int(match.id)
        return self.groups(match.id) if match.kind == "gid" else None

    def rule_matches(self, rule: Rule, packet: _Packet) -> tuple[bool | None, str]:
        unknown = ""
        for match in rule.matches:
            result = self.match(match, packet)
            if result is False:
                return False, ""
            if result is None and not unknown:
                unknown = _unknown_reason(match)
        return (None, unknown) if unknown else (True, "")

    # -- traversal --

    def run_hook(self, hook: Hook, packet: _Packet) -> str:
        """Run every table at ``hook``; returns "accept" or "drop"."""
        self.hook = hook
        for base in self.tables.hooks.get(hook, ()):
            key = (base.table, base.chain)
            if key not in self.tables.chains and key not in self.tables.policies:
                continue  # the table is not in use
            if base.kind == "nat" and (packet.loopback_pass or self.flow.ct_state != "NEW"):
                continue  # NAT was decided when the connection's first packet left
            if base.priority > CONNTRACK_PRIORITY:
                packet.has_conntrack = True
            verdict = self.run_chain(base, packet)
            if verdict == "drop":
                return "drop"
        packet.has_conntrack = True
        return "accept"

    def run_chain(self, base: BaseChain, packet: _Packet) -> str:
        table = base.table
        self.kind = base.kind
        stack: list[tuple[str, int]] = []
        chain, index = base.chain, 0
        while True:
            rules = self.tables.chains.get((table, chain), [])
            if index >= len(rules):
                if not stack:
                    return self._policy(table, chain, packet)
                chain, index = stack.pop()
                continue
            item = rules[index]
            number = index + 1
            index += 1
            hit, reason = self.rule_matches(item.rule, packet)
            if hit is False:
                continue
            step = Step(self.hook, table, chain, number, item.text, "?", loopback_pass=packet.loopback_pass)
            if hit is None:
                raise _Undetermined(replace(step, action="unknown", note=reason), reason)
            target = item.rule.target
            if isinstance(target, Jump):
                if (table, target.chain) not in self.tables.chains:
                    reason = f"jump to chain {target.chain}, which does not exist in {table}"
                    raise _Undetermined(replace(step, action="unknown", note=reason), reason)
                if len(stack) >= MAX_DEPTH:
                    raise _Undetermined(replace(step, action="unknown", note="jumps nest too deep"), "loop")
                self.steps.append(replace(step, action="jump", note=target.chain))
                stack.append((chain, index))
                chain, index = target.chain, 0
                continue
            if isinstance(target, Verdict):
                self.steps.append(replace(step, action=target.name))
                if target.name == "RETURN":
                    if not stack:
                        return self._policy(table, chain, packet)
                    chain, index = stack.pop()
                    continue
                return "drop" if target.name == "DROP" else "accept"
            outcome = self.apply(target, step, packet)
            if outcome != "continue":
                return outcome

    def _policy(self, table: str, chain: str, packet: _Packet) -> str:
        policy = self.tables.policies.get((table, chain), "ACCEPT")
        if policy == "DROP":
            policy_step = Step(self.hook, table, chain, None, f":{chain} DROP", "DROP", "chain policy")
            self.steps.append(replace(policy_step, loopback_pass=packet.loopback_pass))
            return "drop"
        return "accept"

    def apply(self, target: Target, step: Step, packet: _Packet) -> str:
        if isinstance(target, Redirect):
            if self.kind != "nat":
                raise _Undetermined(replace(step, action="unknown"), "REDIRECT outside a nat chain")
            if self.hook == "OUTPUT":
                address = str(self.tables.family.loopback.network_address)
            else:
                address = f"the first address of {packet.iif}"
            packet.redirect = (address, target.port)
            packet.dport = target.port  # the new address only matters to INPUT rules, which we rarely see
            where = (
                f"{address}:{target.port}"
                if address[0].isalnum() and " " not in address
                else (f"port {target.port} on {address}")
            )
            self.steps.append(replace(step, action="REDIRECT", note=f"to {where}"))
            return "accept"
        if isinstance(target, Tproxy):
            packet.mark = (packet.mark & ~target.mask) ^ target.mark
            packet.tproxy = target.port
            self.effects.append(f"packet mark {packet.mark:#x} (TPROXY)")
            self.steps.append(replace(step, action="TPROXY", note=f"port {target.port}, mark {target.mark:#x}"))
            return "accept"
        if isinstance(target, SetMark):
            packet.mark = (packet.mark & ~target.mask) ^ target.value
            self.effects.append(f"packet mark {packet.mark:#x}")
            self.steps.append(replace(step, action="MARK", note=f"mark becomes {packet.mark:#x}"))
            return "continue"
        if isinstance(target, ConnMarkSave):
            packet.ctmark = packet.mark
            self.effects.append(f"connection mark {packet.ctmark:#x}")
            self.steps.append(replace(step, action="CONNMARK", note=f"connection mark {packet.ctmark:#x}"))
            return "continue"
        if isinstance(target, ConnMarkRestore):
            # xt_connmark: mark = (mark & ~nfmask) ^ (ctmark & ctmask); unwritten masks are full.
            nfmask = FULL_MASK if target.nfmask is None else target.nfmask
            ctmask = FULL_MASK if target.ctmask is None else target.ctmask
            packet.mark = (packet.mark & ~nfmask & FULL_MASK) ^ (packet.ctmark & ctmask)
            self.steps.append(replace(step, action="CONNMARK", note=f"mark becomes {packet.mark:#x}"))
            return "continue"
        if isinstance(target, ConnMarkSet):
            packet.ctmark = (packet.ctmark & ~target.mask & FULL_MASK) ^ target.value
            self.effects.append(f"connection mark {packet.ctmark:#x}")
            self.steps.append(replace(step, action="CONNMARK", note=f"connection mark becomes {packet.ctmark:#x}"))
            return "continue"
        if isinstance(target, Snat):
            if self.kind != "nat":
                raise _Undetermined(replace(step, action="unknown"), "SNAT outside a nat chain")
            packet.src = target.address
            self.effects.append(f"source address {target.address} (SNAT)")
            self.steps.append(replace(step, action="SNAT", note=f"source becomes {target.address}"))
            return "accept"
        if isinstance(target, CtZone):
            # xt_CT leaves a packet that already carries conntrack state alone: the looped-back packet
            # keeps its entry, and a second CT rule cannot override the first one's template.
            if packet.has_conntrack:
                note = "no effect: the packet already has its conntrack entry"
            elif packet.zone is not None:
                note = f"no effect: an earlier CT rule already set zone {packet.zone}"
            else:
                packet.zone = target.zone
                note = f"conntrack zone {target.zone}"
                self.effects.append(note)
            self.steps.append(replace(step, action="CT", note=note))
            return "continue"
        reason = f"target not understood: {target.text if isinstance(target, Unsupported) else target!r}"
        raise _Undetermined(replace(step, action="unknown", note=reason), reason)


def _unknown_reason(match: Match) -> str:
    if isinstance(match, SetMatch):
        return f"membership of set {match.name!r} is unknown"
    if isinstance(match, Owner):
        return f"group {match.id!r} is unknown here"
    if isinstance(match, Unsupported):
        return f"match not understood: {match.text}"
    return f"cannot evaluate {match!r}"


# --- the walk -------------------------------------------------------------------------


def explain(tables: Tables | None, flow: Flow, groups: GroupResolver = _no_groups) -> Explanation:
    """Where ``flow`` lands under ``tables`` (None: this family has no rules at all)."""
    if tables is None:
        tables = Tables(flow.family, {}, source="no rules for this family")
    walker = _Walker(tables, flow, groups)
    try:
        landing = _walk(walker, flow)
        decision = next((s for s in walker.steps if s.action in ("REDIRECT", "TPROXY", "DROP")), None)
    except _Undetermined as stop:
        walker.steps.append(stop.step)
        landing = Landing("undetermined", reason=stop.reason)
        decision = stop.step
    exclusions = tuple(s for s in walker.steps if s.action in ("RETURN", "ACCEPT"))
    return Explanation(
        flow=flow,
        source=tables.source,
        steps=tuple(walker.steps),
        landing=landing,
        decision=decision,
        exclusions=exclusions,
        effects=tuple(dict.fromkeys(walker.effects)),
        problems=tuple(tables.problems),
    )


def _walk(walker: _Walker, flow: Flow) -> Landing:
    original = _endpoint(flow.dst, flow.dport)
    packet = _Packet(flow.src, flow.dst, flow.sport, flow.dport, ctmark=flow.ctmark)
    if flow.locally_generated:
        packet.mark = flow.mark
    if not flow.locally_generated:
        packet.iif = flow.in_interface
        if walker.run_hook("PREROUTING", packet) == "drop":
            return Landing("drop", original_destination=original)
        return _route_input(walker, flow, packet, original)

    packet.has_socket = True
    packet.oif = "lo" if flow.is_local_address(flow.dst) else flow.out_interface
    if walker.run_hook("OUTPUT", packet) == "drop":
        return Landing("drop", original_destination=original)
    if packet.redirect is not None:
        # REDIRECT in OUTPUT rewrites the destination to the loopback address: rerouted to lo.
        packet.dst = ipaddress.ip_address(packet.redirect[0])
        packet.dport = packet.redirect[1]
        packet.oif = "lo"
    if walker.run_hook("POSTROUTING", packet) == "drop":
        return Landing("drop", original_destination=original)
    if packet.oif != "lo":
        return Landing("network", str(packet.dst), packet.dport, original, interface=packet.oif)
    # Looped back: the packet enters this namespace again on lo, keeping its conntrack entry.
    packet.iif, packet.oif = "lo", ""
    packet.has_socket = False
    packet.loopback_pass = True
    if walker.run_hook("PREROUTING", packet) == "drop":
        return Landing("drop", original_destination=original)
    return _route_input(walker, flow, packet, original)


def _route_input(walker: _Walker, flow: Flow, packet: _Packet, original: str) -> Landing:
    if packet.tproxy is not None:
        unheard = "dropped" if walker.tables.dialect == "iptables" else "the rule does not match and the packet goes on"
        landing = Landing("tproxy", "transparent listener", packet.tproxy, original, reason=unheard)
    elif packet.redirect is not None:
        landing = Landing("redirect", packet.redirect[0], packet.redirect[1], original)
    elif flow.locally_generated or flow.local_addresses is None or flow.is_local_address(packet.dst):
        landing = Landing("local", str(packet.dst), packet.dport, original)
    else:
        if walker.run_hook("FORWARD", packet) == "drop":
            return Landing("drop", original_destination=original)
        return Landing("forward", str(packet.dst), packet.dport, original, reason="not addressed to this namespace")
    if walker.run_hook("INPUT", packet) == "drop":
        return Landing("drop", original_destination=original)
    return landing


def _endpoint(address: IPAddress, port: int) -> str:
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


# --- presentation ------------------------------------------------------------------------

ORIGIN_LABELS = {"remote": "Remote host", "local": "Local process", "proxy": "Proxy"}


def chain_path(explanation: Explanation, tables_rule_counts: Mapping[tuple[str, str], int] | None = None) -> str:
    """One line in the style of Istio's docs.

    For example ``Local process → OUTPUT → ISTIO_OUTPUT rule 9 → ISTIO_REDIRECT → 15001``.
    """
    counts = tables_rule_counts or {}
    parts = [ORIGIN_LABELS[explanation.flow.origin]]
    groups: dict[tuple[bool, str, str], list[Step]] = {}
    for step in explanation.steps:
        groups.setdefault((step.loopback_pass, step.hook, step.table), []).append(step)
    shown_loopback = False
    for (loopback_pass, hook, table), steps in groups.items():
        # A pass that only jumped into chains where nothing matched decided nothing: the listing has it.
        if all(step.action == "jump" for step in steps):
            continue
        if loopback_pass and not shown_loopback:
            parts.append("lo")
            shown_loopback = True
        parts.append(hook if table == "nat" else f"{table} {hook}")
        for step in steps:
            if step.number is None:
                parts.append(f"policy {step.action}")
                continue
            builtin = step.chain in BUILTIN_CHAINS or step.chain.upper() == step.hook  # nft: "output"
            label = f"rule {step.number}" if builtin else step.chain
            if not builtin and counts.get((step.table, step.chain), 2) > 1:
                label += f" rule {step.number}"
            if step.action == "jump":
                if not builtin:
                    parts.append(label)
            elif step.action in ("REDIRECT", "TPROXY"):
                parts.append(label)
            else:
                parts.append(f"{label} ({_action_label(step)})")
    parts.append(_landing_label(explanation.landing))
    return " → ".join(parts)


def _action_label(step: Step) -> str:
    if step.action == "MARK":
        return f"MARK {step.note.split()[-1]}"
    if step.action == "CONNMARK":
        return f"CONNMARK: {step.note}"
    if step.action == "CT":
        return step.note
    if step.action == "unknown":
        return "cannot evaluate"
    return step.action


def _landing_label(landing: Landing) -> str:
    if landing.kind == "redirect":
        return str(landing.port)
    if landing.kind == "tproxy":
        return f"{landing.port} (TPROXY)"
    if landing.kind == "local":
        return f"delivered to {landing.original_destination}"
    if landing.kind == "network":
        return f"{landing.original_destination} via {landing.interface}"
    if landing.kind == "forward":
        return f"forwarded to {landing.original_destination}"
    if landing.kind == "drop":
        return "DROP"
    return "undetermined"


def verdict_text(explanation: Explanation) -> str:
    landing = explanation.landing
    decision = explanation.decision
    where = f" by {_rule_ref(decision)}" if decision is not None else ""
    if landing.kind == "redirect":
        how = " with SO_ORIGINAL_DST" if explanation.flow.protocol == "tcp" else ""
        return (
            f"redirected to port {landing.port} ({landing.address}){where}; the proxy reads the original "
            f"destination {landing.original_destination}{how}"
        )
    if landing.kind == "tproxy":
        return (
            f"handed to the transparent listener on port {landing.port}{where} (TPROXY keeps the original "
            f"destination {landing.original_destination}; if nothing listens there: {landing.reason or 'dropped'})"
        )
    if landing.kind == "drop":
        return f"dropped{where}"
    if landing.kind == "undetermined":
        return f"cannot tell: {landing.reason} ({_rule_ref(decision) if decision else 'no rule'})"
    passed = {
        "local": f"delivered to {landing.original_destination} in this namespace",
        "network": f"sent to {landing.original_destination} via {landing.interface}",
        "forward": f"not addressed to this namespace: forwarded to {landing.original_destination} "
        "if forwarding is on, else dropped",
    }[landing.kind]
    if explanation.exclusions:
        excluded = "; ".join(_rule_ref(step) for step in explanation.exclusions)
        return f"passed through, not captured ({excluded}): {passed}"
    return f"passed through, no rule captured it: {passed}"


def _rule_ref(step: Step) -> str:
    rule = "policy" if step.number is None else f"rule {step.number}"
    second = " (after looping back over lo)" if step.loopback_pass else ""
    return f"{step.table} {step.chain} {rule}{second}"


def flow_text(flow: Flow) -> str:
    who = {
        "remote": f"from a remote host, in on {flow.in_interface}",
        "local": f"from a local process (uid {flow.uid}, gid {flow.gid})",
        "proxy": f"from the proxy (uid {flow.uid}, gid {flow.gid})",
    }[flow.origin]
    marks = (f", socket mark {flow.mark:#x}" if flow.mark and flow.locally_generated else "") + (
        f", connection mark {flow.ctmark:#x}" if flow.ctmark else ""
    )
    return (
        f"{flow.protocol.upper()} {_endpoint(flow.src, flow.sport)} → {_endpoint(flow.dst, flow.dport)} "
        f"{who} [IPv{flow.family.value}, conntrack {flow.ct_state}{marks}]"
    )


def render_text(explanation: Explanation, tables: Tables | None = None) -> str:
    counts = {key: len(rules) for key, rules in tables.chains.items()} if tables else None
    lines = [f"Flow:    {flow_text(explanation.flow)}", f"Rules:   {explanation.source}"]
    lines += [f"Warning: {problem}" for problem in explanation.problems]
    lines += ["", chain_path(explanation, counts), ""]
    width = max((len(_step_where(step)) for step in explanation.steps), default=0)
    for step in explanation.steps:
        note = f"   # {step.note}" if step.note and step.action not in ("jump",) else ""
        lines.append(f"  {_step_where(step).ljust(width)}  {step.text}{note}")
    if not explanation.steps:
        lines.append("  (no rule matched)")
    lines += ["", f"Verdict: {verdict_text(explanation)}"]
    if explanation.effects:
        lines.append(f"Effects: {', '.join(explanation.effects)}")
    return "\n".join(lines) + "\n"


def _step_where(step: Step) -> str:
    number = "policy" if step.number is None else f"#{step.number}"
    loop = "lo " if step.loopback_pass else ""
    return f"{loop}{step.table} {step.chain} {number}"


def to_data(explanation: Explanation, tables: Tables | None = None) -> dict[str, Any]:
    """The explanation as JSON-ready data (``--json``)."""
    flow = explanation.flow
    counts = {key: len(rules) for key, rules in tables.chains.items()} if tables else None

    def step_data(step: Step) -> dict[str, Any]:
        return {
            "hook": step.hook,
            "table": step.table,
            "chain": step.chain,
            "rule": step.number,
            "text": step.text,
            "action": step.action,
            "note": step.note,
            "loopback_pass": step.loopback_pass,
        }

    landing = explanation.landing
    return {
        "flow": {
            "origin": flow.origin,
            "family": f"ipv{flow.family.value}",
            "protocol": flow.protocol,
            "src": str(flow.src),
            "sport": flow.sport,
            "dst": str(flow.dst),
            "dport": flow.dport,
            "uid": flow.uid,
            "gid": flow.gid,
            "in_interface": flow.in_interface if flow.origin == "remote" else None,
            "out_interface": None if flow.origin == "remote" else flow.out_interface,
            "ct_state": flow.ct_state,
        },
        "rules": explanation.source,
        "path": chain_path(explanation, counts),
        "steps": [step_data(step) for step in explanation.steps],
        "verdict": {
            "landing": landing.kind,
            "address": landing.address,
            "port": landing.port,
            "original_destination": landing.original_destination,
            "interface": landing.interface,
            "reason": landing.reason,
            "text": verdict_text(explanation),
        },
        "decision": step_data(explanation.decision) if explanation.decision else None,
        "exclusions": [step_data(step) for step in explanation.exclusions],
        "effects": list(explanation.effects),
        "problems": list(explanation.problems),
    }
