"""Orchestration: what one invocation does with a validated configuration."""

from __future__ import annotations

from typing import TextIO

from istio_iptables._lib.log import log
from istio_iptables.config.sidecar import Config
from istio_iptables.policy.lists import render_ipset_document
from istio_iptables.policy.sidecar_xtables import build_plan
from istio_iptables.xtables.model import Plan
from istio_iptables.xtables.render import render_documents


def run(config: Config, out: TextIO, namespace_path: str = "") -> None:
    """``namespace_path``: the --network-namespace the caller entered (the CNI-mode lock file)."""
    log.info("effective configuration:\n%s", config.describe())
    plan = build_plan(config)
    if config.skip_rule_apply:
        # As Istio: the rules are neither written nor, in a dry run, printed (ProgramIptables and
        # ProgramNftables skip the whole step); --run-validation still runs.
        log.info("--skip-rule-apply: no rules written")
    elif config.dry_run:
        _run_steps(config, out, plan, namespace_path)
    else:
        from istio_iptables.system.nslock import namespace_lock

        if config.cni_mode:
            from istio_iptables.system.netns import enter_cni_sandbox

            enter_cni_sandbox()
        # One run at a time per network namespace (apply, reconcile, cleanup; every backend): the
        # lock is taken before the first read, so a run decides from a state nobody else is changing.
        with namespace_lock():
            _run_steps(config, out, plan, namespace_path)
    if config.run_validation:
        from istio_iptables.engine.validation import run_validation

        run_validation(config)


def _run_steps(config: Config, out: TextIO, plan: Plan, namespace_path: str) -> None:
    if config.native_nftables:
        from istio_iptables.engine.nft import run_nftables

        run_nftables(config, out, plan)
    elif config.dry_run and config.cleanup_only:
        from istio_iptables.engine.xtables import cleanup_preview

        scripts = cleanup_preview(config, plan)
        out.write("".join(f"# {family.restore_program}\n{script}" for family, script in scripts.items()))
    elif config.dry_run:
        out.write(render_ipset_document(plan.rulesets) + render_documents(plan.rulesets))
    else:
        from istio_iptables.engine.guard import cleanup_nft_tables, guard_iptables_run, remove_nft_tables
        from istio_iptables.engine.xtables import apply
        from istio_iptables.system.ipset import plan_for_this_host

        replace_nft_tables = guard_iptables_run(config)  # exit 3 while our nft tables exist, unless --reconcile
        outcome = apply(config, plan_for_this_host(config, plan), namespace_path)
        if config.cleanup_only and cleanup_nft_tables(config):  # a --native-nftables run's tables too
            outcome.action = "cleaned"
        log.info("%s (%s backend)", outcome.action, outcome.backend)
        if replace_nft_tables:
            remove_nft_tables()
