"""The forms our rules take in a namespace, behind one interface, and what crosses between them.

Three forms: iptables rules on the legacy backend, on the nft backend (both
:class:`~istio_iptables.engine.xtables.XtablesForm`: the namespace decides which, read-only), and our
native nftables tables (:class:`~istio_iptables.engine.nft.NftForm`). Each one reads its
footprint's part of the namespace, computes the transition to the plan, writes it and rolls back
exactly what it wrote. A namespace holds one form of our rules at most: a run of one form refuses
(exit 3) while the other is there, unless ``--reconcile`` replaces it; cleanup walks every form it
finds. Only the form a run uses is imported (docs/speed.md: the native paths never load the
iptables engine, the iptables paths never load the nft model).
"""

from __future__ import annotations

from typing import Protocol

from istio_iptables._lib.log import log
from istio_iptables.config.sidecar import Config
from istio_iptables.errors import DriftError
from istio_iptables.policy.footprint import Footprint
from istio_iptables.xtables.model import Plan

TYPE_CHECKING = False
if TYPE_CHECKING:  # the seam is for annotations: its protocols are never needed at run time
    from istio_iptables.engine.seam import System


class Form(Protocol):
    """One form of our rules. ``plan`` carries the routes (and, for iptables, the rules) of the run."""

    name: str

    def apply(self, plan: Plan) -> object: ...

    def drift(self, plan: Plan) -> list[str]: ...


def guard_xtables_run(config: Config, system: System, footprint: Footprint) -> bool:
    """Before an iptables form writes: True if our nft tables must go once it is done.

    Raises DriftError while our nft tables are present, unless --reconcile, and while another
    mode's are (the sidecar's and ambient's never share a namespace).
    """
    if not system.nft_tables_may_exist(footprint):
        return False
    state = system.read_nft_state(footprint, with_legacy=False)
    if state.rivals:
        raise DriftError(footprint.rival_refusal(", ".join(state.rivals)))
    if not state.our_tables:
        return False
    if not config.reconcile:
        raise DriftError(
            f"this namespace already holds istio-iptables rules in nftables form ({', '.join(state.our_tables)}); "
            "re-run with --reconcile to replace them with iptables rules"
        )
    return True


def apply_form(config: Config, plan: Plan, system: System, footprint: Footprint, namespace_path: str) -> None:
    """Write the configuration's form, replacing the other one under --reconcile."""
    if config.native_nftables:
        from istio_iptables.engine.nft import NftForm

        NftForm(config, system, footprint).apply(plan)
        return
    from istio_iptables.engine.xtables import XtablesForm, plan_for_this_host

    replace_nft_tables = guard_xtables_run(config, system, footprint)  # exit 3 while our nft tables exist
    outcome = XtablesForm(config, system, footprint, namespace_path).apply(plan_for_this_host(config, plan, system))
    log.info("%s (%s backend)", outcome.action, outcome.backend)
    if replace_nft_tables:
        state = system.read_nft_state(footprint, with_legacy=False)
        system.remove_nft_tables(state.our_tables)


def clean_every_form(config: Config, plan: Plan, system: System, footprint: Footprint, namespace_path: str) -> None:
    """Remove every form of our rules the namespace holds, and the routes they imply.

    The form the flags name is cleaned first, as before; then whatever other form is found: our
    nft tables after an iptables cleanup, the iptables form (on the backend that holds it) after a
    native one.
    """
    if config.native_nftables:
        from istio_iptables.engine.nft import NftForm

        form = NftForm(config, system, footprint)
        form.cleanup()
        for backend in form.found_iptables_backends:
            from dataclasses import replace

            from istio_iptables.engine.xtables import XtablesForm, plan_for_this_host

            on_backend = replace(config, force_iptables_binary=backend, native_nftables=False)
            outcome = XtablesForm(on_backend, system, footprint, namespace_path).cleanup(
                plan_for_this_host(on_backend, plan, system)
            )
            log.info("%s (%s backend)", outcome.action, outcome.backend)
        return
    from istio_iptables.engine.xtables import XtablesForm, plan_for_this_host

    outcome = XtablesForm(config, system, footprint, namespace_path).cleanup(plan_for_this_host(config, plan, system))
    if system.nft_tables_may_exist(footprint):  # a --native-nftables run's tables too
        from istio_iptables.engine.nft import NftForm

        if NftForm(config, system, footprint).cleanup():
            outcome.action = "cleaned"
    log.info("%s (%s backend)", outcome.action, outcome.backend)
