"""Our rules in native nftables form (``--native-nftables``): our ``inet`` tables, owned whole.

Either form of our rules may be in a namespace, never both: a run asked for nftables refuses
(exit 3) while our iptables rules are there, unless ``--reconcile``, which removes them in the
same run: iptables-nft's chains inside our nft transaction, iptables-legacy's right after it.
(The converse check for the iptables forms is :func:`istio_iptables.engine.forms.guard_xtables_run`.)
The orchestrator (:mod:`istio_iptables.engine.actions`) has entered the namespace and taken its lock.
"""

from __future__ import annotations

from istio_iptables._lib.log import log
from istio_iptables.config.sidecar import Config
from istio_iptables.errors import DriftError, IstioIptablesError
from istio_iptables.net import Family
from istio_iptables.nft.render import render_cleanup, render_script
from istio_iptables.policy.footprint import SIDECAR, Footprint
from istio_iptables.policy.sidecar_nft import build_nft_ruleset
from istio_iptables.xtables.model import Plan

TYPE_CHECKING = False
if TYPE_CHECKING:  # the seam is for annotations: its protocols are never needed at run time
    from istio_iptables.engine.seam import System
    from istio_iptables.system.nft import NamespaceState


class NftForm:
    """Read our tables (one ``nft -j list ruleset``), transition them in one ``nft -f`` transaction
    (the script deletes and re-creates the tables it replaces), and roll back by putting the tables
    listed before back (:meth:`rollback`) when the routes that come after fail."""

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
        return render_cleanup()

    def apply(self, plan: Plan) -> str:
        """Write our tables; ``plan`` supplies the routes shared with the iptables forms. Returns what was done."""
        config, system = self.config, self.system
        ruleset = build_nft_ruleset(config)
        state = system.read_nft_state(self.footprint, with_legacy=True)
        if state.has_iptables_form and not config.reconcile:
            raise DriftError(
                "this namespace already holds istio-iptables rules in iptables form: "
                f"{state.describe_iptables_form()}; re-run with --reconcile to replace them with nftables"
            )
        if plan.routes is not None:
            system.check_loopback_up()  # before anything is written: exit 4, not half the routes
        # With --reconcile, iptables-nft's chains go in the same transaction in which ours arrive.
        from istio_iptables.system.nft import iptables_nft_removal_lines

        removal = iptables_nft_removal_lines(state)
        if plan.routes is not None or plan.ipv6_passthrough_address:
            system.load_netlink()  # its import, not after the rules (see XtablesForm.apply)
        system.apply_nft_script(render_script(ruleset, present=state.our_tables, also=removal, held=state.held()))
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
        system.remove_nft_tables(state.our_tables)
        self.found_iptables_backends = [
            backend
            for backend, found in (("nft", state.iptables_nft_chains), ("legacy", state.legacy_saves))
            if found
        ]
        marks = {config.tproxy_mark} | ({state.tproxy_mark} if state.tproxy_mark is not None else set())
        pairs = {(mark, config.route_table) for mark in marks}
        orphans = system.fwmark_rules_present(pairs)
        routed = False
        if state.tproxy_mark is not None or state.our_ipv6 or orphans:
            routed = system.remove_routes(pairs, state.our_ipv6 or Family.V6 in orphans)
        return bool(state.our_tables) or routed

    def drift(self, plan: Plan | None = None) -> list[str]:
        """Native nftables: our tables must be there and iptables' form absent (contents not compared yet)."""
        state = self.system.read_nft_state(self.footprint, with_legacy=True)
        if state.has_iptables_form:
            return [f"the namespace holds iptables rules: {state.describe_iptables_form()}"]
        if not state.our_tables:
            return ["the namespace holds none of our nftables tables"]
        return []

    def rollback(self, before: NamespaceState) -> None:
        self.system.restore_nft_tables(before)

    def _remove_replaced_routes(self, plan: Plan, before: NamespaceState) -> None:
        """Our tables were replaced: the old configuration's TPROXY routing and ::6 go if this one has none."""
        stale = {(before.tproxy_mark, self.config.route_table)} if before.tproxy_mark is not None else set()
        wanted = plan.routes
        unchanged = wanted is not None and stale <= {(wanted.mark, wanted.table)} and len(wanted.families) == 2
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
