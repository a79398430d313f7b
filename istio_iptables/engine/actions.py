"""The orchestrator: what one invocation does, decided in one place.

A front end (the CLI, the CNI plugin) maps its input onto an :class:`Action`, a way to build the
configuration and the namespace to act in, and calls :func:`execute`. Everything else is decided
here, once, for every front end and every form:

- which namespace is entered (none for a dry run of the rules: it reads and writes nothing; the
  cleanup preview and the check read the live rules, so they run where the cleanup would);
- the configuration is parsed inside it (IPv6 detection reads its addresses);
- before anything is written: the privilege check, the CNI sandbox (``--cni-mode``) and the
  per-namespace lock, taken before the first read so a run decides from a settled state;
- which forms act (:mod:`istio_iptables.engine.forms`).

Every side effect goes through one :class:`~istio_iptables.engine.seam.System`.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import TextIO

from istio_iptables._lib.log import log
from istio_iptables.config.sidecar import Config
from istio_iptables.errors import DriftError
from istio_iptables.policy.lists import render_ipset_document
from istio_iptables.policy.sidecar_xtables import build_plan
from istio_iptables.xtables.model import Plan
from istio_iptables.xtables.render import render_documents

TYPE_CHECKING = False
if TYPE_CHECKING:  # the seam's protocols and the footprints cost ~1 ms: the dry run needs neither
    from istio_iptables.engine.seam import System
    from istio_iptables.policy.footprint import Footprint


class Action(Enum):
    RENDER = "render"  # --dry-run: print the rules
    PREVIEW_CLEANUP = "preview cleanup"  # --cleanup-only --dry-run: print what cleanup would write
    APPLY = "apply"  # write (first run, no-op re-run, resume, --reconcile, --force-apply)
    CLEANUP = "cleanup"  # --cleanup-only: remove every form of our rules
    CHECK = "check"  # read only: DriftError unless the namespace holds exactly the configuration's rules
    VALIDATE = "validate"  # --skip-rule-apply: no rules; --run-validation if asked

    @property
    def enters_namespace(self) -> bool:
        return self is not Action.RENDER

    @property
    def writes(self) -> bool:
        return self in (Action.APPLY, Action.CLEANUP)


def choose_action(*, dry_run: bool, cleanup_only: bool, skip_rule_apply: bool = False) -> Action:
    """The action of the Istio flags (``--dry-run``, ``--cleanup-only``, ``--skip-rule-apply``)."""
    if dry_run:
        return Action.PREVIEW_CLEANUP if cleanup_only else Action.RENDER
    if skip_rule_apply:
        return Action.VALIDATE
    return Action.CLEANUP if cleanup_only else Action.APPLY


def execute(
    action: Action,
    settings: Callable[[], Config],
    out: TextIO,
    *,
    namespace: str = "",
    source: str = "--network-namespace",
    entered_path: str = "",
    system: System | None = None,
    footprint: Footprint | None = None,
) -> None:
    """Run ``action``: enter ``namespace`` (named by ``source``) if the action needs it, build the
    configuration there with ``settings()``, and act. ``entered_path``: the caller has entered the
    namespace itself (the CNI plugin inside a pod's user namespace) and this is its path.
    """
    if system is None:
        from istio_iptables.system.real import RealSystem

        system = RealSystem()
    with system.enter_namespace(namespace if action.enters_namespace else "", source) as path:
        config = settings()
        perform(action, config, out, system, footprint, path or entered_path)


def perform(
    action: Action, config: Config, out: TextIO, system: System, footprint: Footprint | None, namespace_path: str = ""
) -> None:
    """The action in the current namespace. ``namespace_path``: the namespace entered (CNI mode's lock file);
    ``footprint``: whose rules (None: the sidecar's)."""
    if footprint is None and action is not Action.RENDER:
        from istio_iptables.policy.footprint import SIDECAR

        footprint = SIDECAR
    if action is Action.CHECK:
        check_drift(config, system, footprint, namespace_path)
        return
    log.info("effective configuration:\n%s", config.describe())
    plan = build_plan(config) if footprint is None else footprint.build_plan(config)
    if config.skip_rule_apply or action is Action.VALIDATE:
        # As Istio: the rules are neither written nor, in a dry run, printed (ProgramIptables and
        # ProgramNftables skip the whole step); --run-validation still runs.
        log.info("--skip-rule-apply: no rules written")
    elif action is Action.RENDER:
        out.write(render_dry_run(config, plan, system))
    elif action is Action.PREVIEW_CLEANUP:
        out.write(preview_cleanup(config, plan, system, footprint))
    else:
        from istio_iptables.engine import forms

        system.check_privileges()
        if config.cni_mode:
            system.enter_cni_sandbox()
        # One run at a time per network namespace (apply, reconcile, cleanup; every form): the
        # lock is taken before the first read, so a run decides from a state nobody else is changing.
        with system.namespace_lock():
            if action is Action.CLEANUP:
                forms.clean_every_form(config, plan, system, footprint, namespace_path)
            else:
                forms.apply_form(config, plan, system, footprint, namespace_path)
    if config.run_validation:
        from istio_iptables.engine.validation import run_validation

        run_validation(config)


def render_dry_run(config: Config, plan: Plan, system: System) -> str:
    """The dry run: the ipset and restore documents, or the nft script."""
    if config.native_nftables:
        from istio_iptables.engine.nft import NftForm

        return NftForm(config, system).render()
    return render_ipset_document(plan.rulesets) + render_documents(plan.rulesets)


def preview_cleanup(config: Config, plan: Plan, system: System, footprint: Footprint) -> str:
    if config.native_nftables:
        from istio_iptables.engine.nft import NftForm

        return NftForm(config, system, footprint).preview_cleanup()
    from istio_iptables.engine.xtables import XtablesForm

    scripts = XtablesForm(config, system, footprint).preview_cleanup(plan)
    return "".join(f"# {family.restore_program}\n{script}" for family, script in scripts.items())


def check_drift(config: Config, system: System, footprint: Footprint, namespace_path: str = "") -> None:
    """Raise :class:`DriftError` unless the namespace holds exactly the configuration's rules (reads only)."""
    if config.native_nftables:
        from istio_iptables.engine.nft import NftForm

        drift = NftForm(config, system, footprint).drift(footprint.build_plan(config))
    else:
        from istio_iptables.engine.xtables import XtablesForm

        drift = XtablesForm(config, system, footprint, namespace_path).drift(footprint.build_plan(config))
    if drift:
        raise DriftError("the namespace does not hold the configuration's rules:\n" + "\n".join(drift))
