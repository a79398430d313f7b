"""One invocation with ``--native-nftables``, and the guard the iptables backends call.

Either form of our rules may be in a namespace, never both: a run asked for one form refuses
(exit 3) while the other is there, unless ``--reconcile``, which removes the other form in
the same run: iptables-nft's chains inside our nft transaction, iptables-legacy's right after it.
"""

from __future__ import annotations

import logging
from typing import TextIO

from istio_iptables.config import Config
from istio_iptables.errors import DriftError
from istio_iptables.model import Plan
from istio_iptables.nft import system
from istio_iptables.nft.capture import build_nft_ruleset
from istio_iptables.nft.render import render_cleanup, render_script

log = logging.getLogger("istio_iptables")


def run_nftables(config: Config, out: TextIO, plan: Plan) -> None:
    """Dry run, apply or clean up with nftables; ``plan`` supplies the routes shared with iptables."""
    if config.cleanup_only:
        if config.dry_run:
            out.write(render_cleanup())
        elif not config.skip_rule_apply:
            enter_namespace(config)
            state = system.NamespaceState()
            system.read_nft_state(state)
            system.remove_our_tables(state.our_tables)
            cleanup_routes(plan)
        return
    ruleset = build_nft_ruleset(config)
    if config.dry_run:
        out.write(render_script(ruleset))
        return
    if config.skip_rule_apply:
        return
    enter_namespace(config)
    state = system.read_state()
    if state.has_iptables_form and not config.reconcile:
        raise DriftError(
            "this namespace already holds istio-iptables rules in iptables form: "
            f"{state.describe_iptables_form()}; re-run with --reconcile to replace them with nftables"
        )
    # With --reconcile, iptables-nft's chains go in the same transaction in which ours arrive.
    removal = system.iptables_nft_removal_lines(state)
    system.apply_script(render_script(ruleset, present=state.our_tables, also=removal))
    if state.has_iptables_form:
        system.remove_legacy_form(state)
        log.info("--reconcile: replaced %s", state.describe_iptables_form())
    configure_routes(plan)


def guard_iptables_run(config: Config) -> bool:
    """For the iptables backends, before they write: True if our nft tables must go once they are done.

    Raises DriftError while our nft tables are present, unless --reconcile; then the caller removes
    them with ``system.remove_our_tables(ALL)`` after its own rules are in.
    """
    if config.cleanup_only:
        return False  # removing iptables rules is never blocked by our nft tables
    state = system.NamespaceState()
    system.read_nft_state(state)
    if not state.our_tables:
        return False
    if not config.reconcile:
        raise DriftError(
            f"this namespace already holds istio-iptables rules in nftables form ({', '.join(state.our_tables)}); "
            "re-run with --reconcile to replace them with iptables rules"
        )
    return True


def enter_namespace(config: Config) -> None:
    if config.network_namespace:
        system.enter_network_namespace(config.network_namespace)


# --- TPROXY routes and the ::6 address: shared with the iptables backends --------------------------
# HOOK(issue 3): the apply engine owns policy routing (ip rule fwmark/lookup, local route on lo) and
# the ::6/128 address on lo. Until its routes module is on main, these only report what is missing.


def configure_routes(plan: Plan) -> None:
    if plan.routes is not None or plan.ipv6_passthrough_address:
        log.warning("TPROXY routes and the ::6 address are not configured yet (waiting for the routes module)")


def cleanup_routes(plan: Plan) -> None:
    if plan.routes is not None:
        log.warning("TPROXY routes are not removed yet (waiting for the routes module)")
