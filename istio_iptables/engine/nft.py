"""Our rules in native nftables form (``--native-nftables``): our ``inet`` tables, owned whole.

Either form of our rules may be in a namespace, never both: a run asked for nftables refuses
(exit 3) while our iptables rules are there, unless ``--reconcile``, which removes them in the
same run: iptables-nft's chains inside our nft transaction, iptables-legacy's right after it.
(The converse check for the iptables forms is :func:`istio_iptables.engine.forms.guard_xtables_run`.)
The orchestrator (:mod:`istio_iptables.engine.actions`) has entered the namespace and taken its lock.
"""

from __future__ import annotations

from collections.abc import Collection

from istio_iptables._lib.log import log
from istio_iptables.config.sidecar import Config
from istio_iptables.errors import DriftError, IstioIptablesError
from istio_iptables.net import Family
from istio_iptables.nft.render import HEADER, render_cleanup, render_script
from istio_iptables.policy.footprint import SIDECAR, Footprint
from istio_iptables.policy.sidecar_nft import build_nft_ruleset
from istio_iptables.xtables.model import Plan

TYPE_CHECKING = False
if TYPE_CHECKING:  # the seam is for annotations: its protocols are never needed at run time
    from istio_iptables.engine.seam import System
    from istio_iptables.nft.model import NftRuleset
    from istio_iptables.system.nft import NamespaceState


class NftForm:
    """Read our tables (one ``nft -j list ruleset``) and compare them with the configuration's, as
    the iptables forms do: the same rules are not written again (only the routes are made sure
    of), other rules of ours are drift (exit 3) unless ``--reconcile``/``--force-apply``. A write
    transitions the tables in one ``nft -f`` transaction (the script deletes and re-creates the
    tables it replaces) and rolls back by putting the tables listed before back (:meth:`rollback`)
    when the routes that come after fail."""

    name = "nft"

    def __init__(self, config: Config, system: System, footprint: Footprint = SIDECAR) -> None:
        self.config = config
        self.system = system
        self.footprint = footprint
        # What cleanup found of the iptables form besides our tables: the backends holding it.
        self.found_iptables_backends: list[str] = []

    def render(self) -> str:
        return render_script(build_nft_ruleset(self.config))

    def preview_cleanup(self, plan: Plan | None = None) -> str:
        return render_cleanup(self.footprint.nft_tables)

    def ruleset(self) -> NftRuleset:
        return self.footprint.build_nft_ruleset(self.config)

    def apply(self, plan: Plan) -> str:
        """Write our tables; ``plan`` supplies the routes shared with the iptables forms. Returns what was done."""
        config, system, footprint = self.config, self.system, self.footprint
        ruleset = self.ruleset()
        state = system.read_nft_state(footprint, with_legacy=True)
        if state.rivals:
            raise DriftError(footprint.rival_refusal(", ".join(state.rivals)))
        kept_sets = footprint.kept_set_nft_lines(config)
        if state.has_iptables_form and not config.reconcile:
            raise DriftError(
                "this namespace already holds istio-iptables rules in iptables form: "
                f"{state.describe_iptables_form()}; re-run with --reconcile to replace them with nftables"
            )
        if state.our_tables and not state.has_iptables_form and not config.force_apply:
            differences = self.differences(state, ruleset)
            if not differences:
                # A re-run (a restarted init container, or one killed after the transaction and
                # before the routes): nothing to write; the routes are made sure of, as on iptables.
                log.info("the namespace already holds exactly these nftables rules: nothing to write")
                if kept_sets:  # created if missing, members changed only as asked
                    system.apply_nft_script(HEADER + "\n".join(kept_sets) + "\n")
                if plan.routes is not None or plan.ipv6_passthrough_address:
                    if plan.routes is not None:
                        system.check_loopback_up()
                    system.ensure_routes(plan.routes, plan.ipv6_passthrough_address)
                return "unchanged"
            if not config.reconcile:
                raise DriftError(
                    "the namespace holds istio-iptables nftables rules of another configuration (or edited "
                    "ones); rerun with --reconcile to replace them, or --cleanup-only to remove them:\n"
                    + "\n".join(differences)
                )
        if plan.routes is not None:
            system.check_loopback_up()  # before anything is written: exit 4, not half the routes
        # With --reconcile, iptables-nft's chains go in the same transaction in which ours arrive.
        from istio_iptables.system.nft import iptables_nft_removal_lines

        removal = iptables_nft_removal_lines(state)
        script = render_script(
            ruleset, present=state.our_tables, also=removal, held=state.held(), kept_sets=footprint.kept_sets,
            first=kept_sets,
        )
        system.apply_nft_script(script)
        if state.has_iptables_form:
            system.remove_legacy_form(state)
            log.info("--reconcile: replaced %s", state.describe_iptables_form())
        self._ensure_routes(plan, state)
        self._remove_replaced_routes(plan, state)
        return "reconciled" if state.our_tables or state.has_iptables_form else "applied"

    def cleanup(self) -> bool:
        """Delete exactly our tables, and the TPROXY routing and ::6 address they implied; True if anything went.

        Policy routing is ours by mark and table, as on the iptables forms (XtablesForm._cleanup): the
        mark of our live TPROXY rule and the one given to this run, each with the table given to it.
        """
        system, config = self.system, self.config
        state = system.read_nft_state(self.footprint, with_legacy=True)
        if state.rivals and state.our_tables:
            raise DriftError(self.footprint.rival_refusal(", ".join(state.rivals)))
        system.remove_nft_tables(state.our_tables)
        self.found_iptables_backends = [
            backend
            for backend, found in (("nft", state.iptables_nft_chains), ("legacy", state.legacy_saves))
            if found
        ]
        marks = {config.tproxy_mark} | ({state.tproxy_mark} if state.tproxy_mark is not None else set())
        keys = {(mark, config.route_table, config.route_mask) for mark in marks}
        orphans = system.fwmark_rules_present(keys)
        routed = False
        if state.tproxy_mark is not None or state.our_ipv6 or orphans:
            routed = system.remove_routes(keys, state.our_ipv6 or Family.V6 in orphans)
        return bool(state.our_tables) or routed

    def drift(self, plan: Plan | None = None) -> list[str]:
        """Native nftables: our tables must hold exactly this configuration's rules, and iptables' form be absent."""
        state = self.system.read_nft_state(self.footprint, with_legacy=True)
        if state.rivals:
            return [f"the namespace holds {', '.join(state.rivals)}"]
        if state.has_iptables_form:
            return [f"the namespace holds iptables rules: {state.describe_iptables_form()}"]
        if not state.our_tables:
            return ["the namespace holds none of our nftables tables"]
        return self.differences(state, self.ruleset())

    def differences(self, state: NamespaceState, ruleset: NftRuleset) -> list[str]:
        """How our live tables differ from ``ruleset``: tables, named sets and their members, chains
        (hook, type, priority, policy) and rules, in order; counters are not compared."""
        kept = set(self.footprint.kept_sets)  # their members are the node agent's, not the configuration's
        return table_differences(live_lines(state.our_objects, kept), desired_lines(ruleset))

    def rollback(self, before: NamespaceState) -> None:
        self.system.restore_nft_tables(before)

    def _remove_replaced_routes(self, plan: Plan, before: NamespaceState) -> None:
        """Our tables were replaced: the old configuration's TPROXY routing and ::6 go if this one has none."""
        config = self.config
        stale = set()
        if before.tproxy_mark is not None:
            stale.add((before.tproxy_mark, config.route_table, config.route_mask))
        wanted = plan.routes
        unchanged = wanted is not None and stale <= {wanted.key} and len(wanted.families) == 2
        drop_v6 = before.our_ipv6 and not plan.ipv6_passthrough_address
        if (not stale or unchanged) and not drop_v6:
            return
        self.system.remove_routes(stale, drop_v6, keep=wanted)

    def _ensure_routes(self, plan: Plan, before: NamespaceState) -> None:
        """TPROXY policy routing and ``::6`` on lo, shared with the iptables forms.

        If they cannot be set, our tables go back to what they were, as the iptables forms roll back.
        """
        if plan.routes is None and not plan.ipv6_passthrough_address:
            return
        try:
            self.system.ensure_routes(plan.routes, plan.ipv6_passthrough_address)
        except IstioIptablesError as error:
            self.rollback(before)
            raise type(error)(f"{error}; the nftables rules were rolled back") from None


# --- comparing our live tables with the configuration's ---------------------------------------------

TableLines = dict[str, list[str]]  # per table of ours: its sets, chains and rules as nft text, in order


def desired_lines(ruleset: NftRuleset) -> TableLines:
    """The configuration's tables as comparable lines (the same spelling :func:`live_lines` gives)."""
    tables: TableLines = {}
    for table in ruleset.used_tables():
        lines = [
            # render.set_lines declares port sets with ``flags interval``, address sets without flags
            _set_line(named.name, named.type, ["interval"] if named.type == "inet_service" else [],
                      _member_texts(named.members))
            for named in table.sets.values()
        ]
        for chain in table.used_chains():
            hook = chain.hook
            lines.append(_chain_line(chain.name, hook and (hook.type, hook.hook, hook.priority, "accept")))
            lines += ["  " + _parts_text((*rule.matches, *rule.statements)) for rule in chain.rules]
        tables[table.name] = lines
    return tables


def live_lines(objects: list[dict], kept_sets: Collection[str] = ()) -> TableLines:
    """Our live tables (``nft -j`` objects, read by :mod:`istio_iptables.nft.listing`) as comparable
    lines: counters left out; a part we cannot read is spelled as its JSON, so it never equals ours."""
    from istio_iptables.nft.listing import read_listing_objects

    tables: TableLines = {}
    for table in read_listing_objects(objects):
        lines = []
        for entry in table.objects:
            if "set" in entry and entry["set"]["name"] not in kept_sets:
                named = entry["set"]
                members = table.sets.get(named["name"])
                texts = _member_texts(members) if members is not None else [f"<unreadable {named.get('elem')!r}>"]
                lines.append(_set_line(named["name"], named.get("type"), named.get("flags", []), texts))
        for entry in table.objects:
            if "chain" not in entry:
                continue
            chain = entry["chain"]
            hook = (chain.get("type"), chain.get("hook"), chain.get("prio"), chain.get("policy"))
            lines.append(_chain_line(chain["name"], hook if "hook" in chain else None))
            listed = table.chains.get(chain["name"])
            lines += ["  " + _parts_text(rule.parts) for rule in (listed.rules if listed else [])]
        tables[table.name] = lines
    return tables


def table_differences(live: TableLines, desired: TableLines) -> list[str]:
    """What differs, table by table, as a short unified diff (``-`` live, ``+`` this configuration's)."""
    import difflib

    differences: list[str] = []
    for name in [*desired, *(table for table in live if table not in desired)]:
        have, want = live.get(name), desired.get(name)
        if have == want:
            continue
        if have is None:
            differences.append(f"table inet {name}: missing")
        elif want is None:
            differences.append(f"table inet {name}: not part of this configuration")
        else:
            diff = difflib.unified_diff(have, want, lineterm="", n=0)
            changed = [line for line in diff if line[:1] in "-+" and line[:3] not in ("---", "+++")]
            differences.append(f"table inet {name}:")
            differences += [f"  {line}" for line in changed[:MAX_DIFF_LINES]]
            if len(changed) > MAX_DIFF_LINES:
                differences.append(f"  ... and {len(changed) - MAX_DIFF_LINES} more lines")
    return differences


MAX_DIFF_LINES = 40


def _chain_line(name: str, hook: tuple[object, object, object, object] | None) -> str:
    if hook is None:
        return f"chain {name}"
    kind, where, priority, policy = hook
    return f"chain {name} {{ type {kind} hook {where} priority {priority} ; policy {policy} ; }}"


def _set_line(name: str, kind: object, flags: object, members: list[str]) -> str:
    listed = [flags] if isinstance(flags, str) else list(flags) if isinstance(flags, list) else [repr(flags)]
    flagged = f" flags {', '.join(map(str, listed))} ;" if listed else ""
    return f"set {name} {{ type {kind} ;{flagged} elements = {{ {', '.join(members)} }} }}"


def _member_texts(members: tuple[object, ...]) -> list[str]:
    """A set's members as the kernel holds them: addresses (a network's address), or disjoint port runs."""
    import ipaddress

    from istio_iptables.policy.lists import port_ranges

    networks = [member for member in members if isinstance(member, ipaddress.IPv4Network | ipaddress.IPv6Network)]
    if len(networks) != len(members):
        return port_ranges(members)  # type: ignore[arg-type]
    addresses = sorted({network.network_address for network in networks}, key=lambda address: address.packed)
    return [str(address) for address in addresses]


def _parts_text(parts: tuple[object, ...]) -> str:
    from istio_iptables.nft import model as nft
    from istio_iptables.nft.listing import FamilyOnly
    from istio_iptables.nft.render import match_text, statement_text
    from istio_iptables.xtables.model import Unsupported

    texts = []
    for part in _as_listed(parts):
        if isinstance(part, Unsupported):
            texts.append(f"<not ours: {part}>")
            continue
        if isinstance(part, FamilyOnly):
            texts.append(f"meta nfproto ipv{part.version}")
            continue
        try:
            texts.append(statement_text(part) if isinstance(part, nft.Statement) else match_text(part))
        except (TypeError, ValueError) as error:  # RenderError is a ValueError
            texts.append(f"<not ours: {part!r}: {error}>")
    return " ".join(texts)


def _as_listed(parts: tuple[object, ...]) -> list[object]:
    """Parts as ``nft`` lists them, whichever side they come from: ``meta l4proto tcp`` before a
    ``tcp dport`` is that port match's own protocol check (nft lists it once), conntrack states in
    one order, user and group names as their numbers."""
    from istio_iptables.nft import model as nft

    port_protocols = {part.protocol for part in parts if isinstance(part, nft.Port | nft.PortInSet)}
    listed: list[object] = []
    for part in parts:
        if isinstance(part, nft.L4Proto) and part.name in port_protocols:
            continue
        if isinstance(part, nft.CtState):
            part = nft.CtState(tuple(sorted(part.states)))
        elif isinstance(part, nft.SocketOwner) and not part.id.isdigit():
            part = nft.SocketOwner(part.kind, _owner_number(part.kind, part.id), part.negate)
        listed.append(part)
    return listed


def _owner_number(kind: str, name: str) -> str:
    """A user or group name as nft stores it: the number it resolves to here (nft resolved it so)."""
    import grp
    import pwd

    try:
        return str(pwd.getpwnam(name).pw_uid if kind == "uid" else grp.getgrnam(name).gr_gid)
    except KeyError:
        return name  # no longer resolves: spelled as the name, so it differs from what the kernel holds
