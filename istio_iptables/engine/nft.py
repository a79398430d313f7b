"""One invocation with ``--native-nftables``.

Either form of our rules may be in a namespace, never both: a run asked for nftables refuses
(exit 3) while our iptables rules are there, unless ``--reconcile``, which removes them in the
same run: iptables-nft's chains inside our nft transaction, iptables-legacy's right after it.
(The converse check for the iptables backends is in :mod:`istio_iptables.engine.guard`.) The CLI
has already entered ``--network-namespace`` when this runs.
"""

from __future__ import annotations

from typing import TextIO

from istio_iptables._lib.log import log
from istio_iptables.config.sidecar import Config
from istio_iptables.errors import DriftError, IstioIptablesError
from istio_iptables.net import Family
from istio_iptables.nft.render import render_cleanup, render_script
from istio_iptables.policy.sidecar_nft import build_nft_ruleset
from istio_iptables.system import nft as system
from istio_iptables.xtables.model import Plan


def run_nftables(config: Config, out: TextIO, plan: Plan) -> None:
    """Dry run, apply or clean up with nftables; ``plan`` supplies the routes shared with iptables."""
    if config.cleanup_only:
        if config.dry_run:
            out.write(render_cleanup())
        elif not config.skip_rule_apply:
            cleanup(config)
        return
    ruleset = build_nft_ruleset(config)
    if config.dry_run:
        out.write(render_script(ruleset))
        return
    if config.skip_rule_apply:
        return
    state = system.read_state()
    if state.has_iptables_form and not config.reconcile:
        raise DriftError(
            "this namespace already holds istio-iptables rules in iptables form: "
            f"{state.describe_iptables_form()}; re-run with --reconcile to replace them with nftables"
        )
    if plan.routes is not None:
        from istio_iptables.system import routes

        routes.check_loopback_up()  # before anything is written: exit 4, not half the routes
    # With --reconcile, iptables-nft's chains go in the same transaction in which ours arrive.
    removal = system.iptables_nft_removal_lines(state)
    if plan.routes is not None or plan.ipv6_passthrough_address:
        from pyroute2 import IPRoute  # noqa: F401  (its import, not after the rules: see engine._prepare_routes)
    system.apply_script(render_script(ruleset, present=state.our_tables, also=removal, held=state.held()))
    if state.has_iptables_form:
        system.remove_legacy_form(state)
        log.info("--reconcile: replaced %s", state.describe_iptables_form())
    ensure_routes(plan, state)
    remove_replaced_routes(config, plan, state)


def remove_replaced_routes(config: Config, plan: Plan, before: system.NamespaceState) -> None:
    """Our tables were replaced: the old configuration's TPROXY routing and ::6 go if this one has none."""
    stale = {(before.tproxy_mark, config.route_table)} if before.tproxy_mark is not None else set()
    wanted = plan.routes
    unchanged = wanted is not None and stale <= {(wanted.mark, wanted.table)} and len(wanted.families) == 2
    drop_v6 = before.our_ipv6 and not plan.ipv6_passthrough_address
    if (not stale or unchanged) and not drop_v6:
        return
    from istio_iptables.system import routes

    routes.remove(stale, passthrough_v6=drop_v6, keep=wanted)


def cleanup(config: Config) -> bool:
    """Delete exactly our tables, and the TPROXY routing and ::6 address they implied; True if anything went.

    Policy routing is ours by mark and table, as on the iptables backends (engine._cleanup): the
    mark of our live TPROXY rule and the one given to this run, each with the table given to it.
    """
    state = system.NamespaceState()
    system.read_nft_state(state)
    system.remove_our_tables(state.our_tables)
    from istio_iptables.system import routes

    marks = {config.tproxy_mark} | ({state.tproxy_mark} if state.tproxy_mark is not None else set())
    pairs = {(mark, config.route_table) for mark in marks}
    orphans = routes.fwmark_rules_present(pairs)
    routed = False
    if state.tproxy_mark is not None or state.our_ipv6 or orphans:
        routed = routes.remove(pairs, passthrough_v6=state.our_ipv6 or Family.V6 in orphans)
    return bool(state.our_tables) or routed


def ensure_routes(plan: Plan, before: system.NamespaceState) -> None:
    """TPROXY policy routing and ``::6`` on lo, shared with the iptables backends (pyroute2, lazily).

    If they cannot be set, our tables go back to what they were, as the iptables backends roll back.
    """
    if plan.routes is None and not plan.ipv6_passthrough_address:
        return
    from istio_iptables.system import routes

    try:
        routes.ensure(plan.routes, plan.ipv6_passthrough_address)
    except IstioIptablesError as error:
        system.restore_our_tables(before)
        raise type(error)(f"{error}; the nftables rules were rolled back") from None
