"""Live and desired rule state, in the kernel's own spelling, and the difference between them (pure).

The kernel normalises every rule it stores (``-m tcp``, ``-s -d -i -o -p`` first, hex marks,
explicit default masks), and ``iptables-save`` prints that normal form. To compare what a plan
wants with what a namespace holds, :func:`canonical_spec` renders the model straight into that
form (each part's spelling from :mod:`istio_iptables.xtables.spelling`); tests prove it equal to
the kernel's dump for every conformance case on both backends. Live dumps are read by
:func:`istio_iptables.xtables.save.read_save`.

What we own in a live namespace: every chain in :data:`~istio_iptables.xtables.model.OWN_CHAINS` and every
rule of a built-in chain that jumps into one (the namespace shows them); any other rule of a
built-in chain only when this run's configuration writes it or our live chains imply it
(:func:`owned_state`), so a foreign look-alike such as ``-i eth7 -j RETURN`` is never ours.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable

from istio_iptables.config.sidecar import OUTBOUND_MARK
from istio_iptables.net import Family
from istio_iptables.xtables.model import (
    BUILTIN_CHAINS,
    ISTIO_DIVERT,
    ISTIO_INBOUND,
    ISTIO_OUTPUT,
    ISTIO_REDIRECT,
    ISTIO_TPROXY,
    OWN_CHAINS,
    TABLES,
    ConnMark,
    ConnMarkRestore,
    ConnMarkSave,
    Interface,
    L4Protocol,
    Mark,
    Ports,
    ProtocolModule,
    Rule,
    RuleSet,
    Verdict,
)
from istio_iptables.xtables.render import check_token, rule_line
from istio_iptables.xtables.save import Chains, SaveDump
from istio_iptables.xtables.spelling import (
    SAVED_HEAD_ORDER,
    GidResolver,
    SavedContext,
    numeric_gid,
    saved_tokens,
    spelling_of,
)

TableState = dict[str, Chains]


# --- the model in the kernel's spelling ---------------------------------------------


def canonical_spec(rule: Rule, family: Family, resolve_gid: GidResolver = numeric_gid) -> str:
    """``rule`` as ``iptables-save`` prints it after the kernel stored it (without ``-A CHAIN``)."""
    protocol = next((match.name for match in rule.matches if isinstance(match, L4Protocol)), "tcp")
    context = SavedContext(family, protocol, resolve_gid)
    head: dict[str, list[str]] = {}
    modules: list[str] = []
    for index, match in enumerate(rule.matches):
        following = rule.matches[index + 1] if index + 1 < len(rule.matches) else None
        if isinstance(match, ProtocolModule) and isinstance(following, Ports) and len(following.ports) == 1:
            continue  # ``-m udp --sport 53`` is one match: the port's saved form names the module
        spelling = spelling_of(match)
        tokens = spelling.saved(match, context)
        if spelling.head:
            head[tokens[1] if tokens[0] == "!" else tokens[0]] = tokens
        else:
            modules += tokens
    tokens = [token for option in SAVED_HEAD_ORDER for token in head.get(option, [])]
    tokens += modules + saved_tokens(rule.target, context)
    return " ".join(check_token(token) if token != "!" else token for token in tokens)


def desired_state(ruleset: RuleSet, resolve_gid: GidResolver = numeric_gid) -> TableState:
    """The chains and rules ``ruleset`` leaves in the kernel, per table, in kernel order."""
    state: TableState = {}
    for table in ruleset.tables():
        state[table] = {
            chain: [canonical_spec(rule, ruleset.family, resolve_gid) for rule in rules]
            for chain, rules in ruleset.chain_order(table).items()
        }
    return state


# --- what we own in a live dump ----------------------------------------------------

# A rule of a built-in chain that is not a jump into our chains cannot be told apart from someone
# else's by its text (`-i eth7 -j RETURN` could be anyone's). Such a rule is ours only when
# something ties it to us: the configuration of this run writes it (as Istio's --cleanup-only
# works from the flags it is given), or our live chains imply it (see _tied_to_our_chains).
# Patterns, not compiled at import (re caches them on first use): a fresh namespace never needs them.
_TPROXY_MARK = r"--(?:tproxy-mark|set-xmark) (0x[0-9a-f]+)/"
_INTERFACE_RETURN = r"-[io] \S+ -j RETURN"
_MARKED_RETURN = r"-p tcp -m mark --mark (0x[0-9a-f]+) -j RETURN"
_PROXY_OWNER_RETURN = r"-m owner --([ug]id)-owner (\d+) -j RETURN"
_OWNER_MARK = (
    rf"! -d \S+ -o lo -p tcp -m owner --([ug]id)-owner (\d+) -j MARK --set-xmark {OUTBOUND_MARK:#x}/0xffffffff"
)
_VIRT_JUMP = rf"-i (\S+) (?:.* )?-j {ISTIO_REDIRECT}"

OwnedKey = tuple[str, str, str]  # (table, built-in chain, rule spec)


def jumps_to_own_chain(spec: str, own_chains: frozenset[str] = OWN_CHAINS) -> bool:
    head, _, target = spec.rpartition("-j ")
    return target in own_chains and (head == "" or head.endswith(" "))


def live_tproxy_mark(chains: Chains) -> int | None:
    """The mark of our live TPROXY chains (mangle ISTIO_TPROXY / ISTIO_DIVERT, or the RETURN of marked
    packets that heads mangle ISTIO_INBOUND when no inbound port is captured), if any."""
    for spec in [*chains.get(ISTIO_TPROXY, []), *chains.get(ISTIO_DIVERT, [])]:
        found = re.search(_TPROXY_MARK, spec)
        if found:
            return int(found.group(1), 16)
    for spec in chains.get(ISTIO_INBOUND, [])[:1]:
        found = re.fullmatch(_MARKED_RETURN, spec)
        if found:
            return int(found.group(1), 16)
    return None


def _tied_to_our_chains(dump: SaveDump, family: Family) -> set[OwnedKey]:
    """Non-jump rules of built-in chains that our live chains imply, whatever the flags of this run.

    - TPROXY: our ISTIO_TPROXY/ISTIO_DIVERT carry the mark M; a TPROXY configuration always adds the
      mangle rules that save, keep and restore M, and the 0x53a MARK of each proxy owner that our
      nat ISTIO_OUTPUT exempts.
    - ``-k X``: our ``-i X ... -j ISTIO_REDIRECT`` in nat PREROUTING comes with ``-i X -j RETURN``.
    """
    tied: set[OwnedKey] = set()
    mangle = dump.tables.get("mangle", {})
    mark = live_tproxy_mark(mangle)
    if mark is not None:
        implied = [
            Rule("mangle", "PREROUTING", (L4Protocol("tcp"), Mark(mark)), ConnMarkSave()),
            Rule("mangle", "OUTPUT", (Interface("out", "lo"), L4Protocol("tcp"), Mark(mark)), Verdict("RETURN")),
            Rule("mangle", "OUTPUT", (L4Protocol("tcp"), ConnMark(mark)), ConnMarkRestore()),
        ]
        tied |= {(rule.table, rule.chain, canonical_spec(rule, family)) for rule in implied}
        owners = {
            found.groups()
            for spec in dump.tables.get("nat", {}).get(ISTIO_OUTPUT, [])
            if (found := re.fullmatch(_PROXY_OWNER_RETURN, spec))
        }
        for spec in mangle.get("OUTPUT", []):
            found = re.fullmatch(_OWNER_MARK, spec)
            if found and found.groups() in owners:
                tied.add(("mangle", "OUTPUT", spec))
    prerouting = dump.tables.get("nat", {}).get("PREROUTING", [])
    for spec in prerouting:
        found = re.fullmatch(_VIRT_JUMP, spec)
        if found:
            tied.add(("nat", "PREROUTING", f"-i {found.group(1)} -j RETURN"))
    return tied


def owned_state(dump: SaveDump, wanted: TableState | None = None, family: Family = Family.V4) -> TableState:
    """The sidecar's part of a live family: :func:`chains_and_jumps` with the sidecar's chains, and the
    built-in-chain rules its live TPROXY and ``-k`` chains imply."""
    return chains_and_jumps(dump, wanted, family, OWN_CHAINS, implied=True)


def chains_and_jumps(
    dump: SaveDump, wanted: TableState | None, family: Family, own_chains: frozenset[str], *, implied: bool = False
) -> TableState:
    """Our part of a live family: ``own_chains`` whole, and our rules of built-in chains in order.

    Of a built-in chain: every rule jumping into one of our chains; any other rule only as often
    as ``wanted`` (the state this run's configuration produces) holds it, or (``implied``, the
    sidecar's) once if our live chains imply it. Nothing at all when the family holds none of our
    chains and no jump to one.
    """
    ours: TableState = {}
    for table in TABLES:
        chains = dump.tables.get(table, {})
        for name, specs in chains.items():
            if name in own_chains:
                ours.setdefault(table, {})[name] = list(specs)
    has_jumps = any(
        jumps_to_own_chain(spec, own_chains)
        for table in TABLES
        for name, specs in dump.tables.get(table, {}).items()
        if name in BUILTIN_CHAINS
        for spec in specs
    )
    if not ours and not has_jumps:
        return {}
    claims: Counter[OwnedKey] = Counter(
        (table, name, spec)
        for table, chains in (wanted or {}).items()
        for name, specs in chains.items()
        if name in BUILTIN_CHAINS
        for spec in specs
        if not jumps_to_own_chain(spec, own_chains)
    )
    if implied:
        _claim_implied(claims, dump, family)
    for table in TABLES:
        for name, specs in dump.tables.get(table, {}).items():
            if name not in BUILTIN_CHAINS:
                continue
            mine = []
            for spec in specs:
                if jumps_to_own_chain(spec, own_chains):
                    mine.append(spec)
                elif claims[(table, name, spec)] > 0:
                    claims[(table, name, spec)] -= 1
                    mine.append(spec)
            if mine:
                ours.setdefault(table, {})[name] = mine
    return ours


def _claim_implied(claims: Counter[OwnedKey], dump: SaveDump, family: Family) -> None:
    tproxy_live = live_tproxy_mark(dump.tables.get("mangle", {})) is not None
    for (table, name, spec), count in list(claims.items()):
        # -c X of a TPROXY configuration also wrote X's RETURNs into mangle: a reconcile to REDIRECT
        # (whose flags name X only in nat) still owns them while our TPROXY chains are live.
        if tproxy_live and table == "nat" and re.fullmatch(_INTERFACE_RETURN, spec):
            claims[("mangle", name, spec)] = max(claims[("mangle", name, spec)], count)
    for key in _tied_to_our_chains(dump, family):
        claims[key] = max(claims[key], 1)


# --- comparing -------------------------------------------------------------------


def state_lines(state: TableState) -> list[str]:
    """A stable text form for diffs: tables in a fixed order, own chains declared, rules in order."""
    lines: list[str] = []
    for table in TABLES:
        chains = state.get(table)
        if not chains:
            continue
        lines.append(f"*{table}")
        lines += [f":{name}" for name in sorted(chains) if name not in BUILTIN_CHAINS]
        for name in sorted(chains):
            lines += [f"-A {name} {spec}" for spec in chains[name]]
    return lines


def normalised(state: TableState) -> TableState:
    """Drop built-in chains that hold nothing of ours, so absent and empty compare equal."""
    return {
        table: {name: specs for name, specs in chains.items() if specs or name not in BUILTIN_CHAINS}
        for table, chains in state.items()
        if any(specs or name not in BUILTIN_CHAINS for name, specs in chains.items())
    }


def diff_states(live: TableState, desired: TableState, family: Family) -> list[str]:
    """An order-aware unified diff (empty when our part of the namespace is exactly what we want)."""
    live_lines = state_lines(normalised(live))
    desired_lines = state_lines(normalised(desired))
    if live_lines == desired_lines:
        return []
    import difflib  # only when there is a difference to show

    live_name, desired_name = f"{family.label} live", f"{family.label} wanted"
    return list(difflib.unified_diff(live_lines, desired_lines, live_name, desired_name, n=2, lineterm=""))


# --- turning live into desired --------------------------------------------------------


def transition_script(live: TableState, ruleset: RuleSet | None) -> str:
    """Restore input (for ``--noflush``) replacing our live part with ``ruleset``'s rules, or removing it.

    Per table: declare (create or flush) every wanted own chain and flush every obsolete one, delete
    our rules from built-in chains, delete obsolete chains, then add the wanted rules in Istio's
    order (``-I`` positions count from the top, exactly as a first apply).
    """
    wanted_tables = ruleset.tables() if ruleset is not None else []
    lines: list[str] = []
    for table in TABLES:
        live_chains = live.get(table, {})
        if table not in wanted_tables and not live_chains:
            continue
        wanted_chains = ruleset.declared_chains(table) if ruleset is not None and table in wanted_tables else []
        lines.append(f"*{table}")
        obsolete = [name for name in live_chains if name not in BUILTIN_CHAINS and name not in wanted_chains]
        lines += [f":{check_token(name)} - [0:0]" for name in [*wanted_chains, *obsolete]]
        for name, specs in live_chains.items():
            if name in BUILTIN_CHAINS:
                lines += [f"-D {name} {spec}" for spec in specs]
        lines += [f"-X {name}" for name in obsolete]
        if ruleset is not None:
            lines += [rule_line(rule) for rule in ruleset.rules_of(table)]  # type: ignore[arg-type]
        lines.append("COMMIT")
    return "\n".join(lines) + "\n" if lines else ""


# --- undoing a failed write -----------------------------------------------------------


def _positions(chain: list[str], mine: list[str]) -> list[int]:
    """1-based positions of ``mine`` (a subsequence of ``chain``, in order) within ``chain``."""
    positions: list[int] = []
    for number, spec in enumerate(chain, start=1):
        if len(positions) < len(mine) and spec == mine[len(positions)]:
            positions.append(number)
    return positions


def _max_claims(*states: TableState) -> TableState:
    """The built-in-chain rules of several states, each as often as the state holding it most often."""
    counts: dict[tuple[str, str], Counter[str]] = {}
    for state in states:
        for table, chains in state.items():
            for name, specs in chains.items():
                if name in BUILTIN_CHAINS:
                    counts[(table, name)] = counts.get((table, name), Counter()) | Counter(specs)
    merged: TableState = {}
    for (table, name), counter in counts.items():
        merged.setdefault(table, {})[name] = list(counter.elements())
    return merged


def rollback_script(
    before: SaveDump,
    now: SaveDump,
    tables: Iterable[str],
    wanted: TableState,
    family: Family,
    claim: Callable[[SaveDump, TableState | None, Family], TableState] | None = None,
) -> str:
    """Restore input (for ``--noflush``) that puts our part of ``tables`` back as ``before`` held it.

    The inverse of a failed run's transition, computed from what the namespace holds ``now`` (a
    table whose write never committed needs nothing): our chains that differ are redeclared and
    refilled, chains the run created are deleted, our rules of built-in chains are deleted and the
    old ones inserted at their old positions. Foreign rules are never written, so they keep their
    counters, and no chain or table is declared that was not there.
    """
    claim = claim or owned_state  # whose part: the footprint's claim (the sidecar's by default)
    ours_before = claim(before, wanted, family)
    ours_now = claim(now, _max_claims(wanted, ours_before), family)
    lines: list[str] = []
    for table in tables:
        was, held = before.tables.get(table, {}), now.tables.get(table, {})
        if was == held:
            continue
        old, new = ours_before.get(table, {}), ours_now.get(table, {})
        refill = [name for name in old if name not in BUILTIN_CHAINS and new.get(name) != old[name]]
        obsolete = [name for name in new if name not in BUILTIN_CHAINS and name not in old]
        builtin = [
            name
            for name in sorted({*old, *new} & BUILTIN_CHAINS)
            if old.get(name, []) != new.get(name, [])
            or _positions(was.get(name, []), old.get(name, [])) != _positions(held.get(name, []), new.get(name, []))
        ]
        if not (refill or obsolete or builtin):
            continue
        lines.append(f"*{table}")
        lines += [f":{check_token(name)} - [0:0]" for name in [*refill, *obsolete]]
        lines += [f"-D {name} {spec}" for name in builtin for spec in new.get(name, [])]
        lines += [f"-X {name}" for name in obsolete]
        lines += [f"-A {name} {spec}" for name in refill for spec in old[name]]
        for name in builtin:
            mine = old.get(name, [])
            positions = _positions(was.get(name, []), mine)
            lines += [f"-I {name} {position} {spec}" for position, spec in zip(positions, mine, strict=True)]
        lines.append("COMMIT")
    return "\n".join(lines) + "\n" if lines else ""
