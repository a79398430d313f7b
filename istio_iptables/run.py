"""Orchestration: what one invocation does with a validated configuration."""

from __future__ import annotations

import logging
from typing import TextIO

from istio_iptables.capture import build_plan
from istio_iptables.config import Config
from istio_iptables.errors import EnvironmentProblem
from istio_iptables.render import render_documents

log = logging.getLogger("istio_iptables")


def run(config: Config, out: TextIO) -> None:
    log.info("effective configuration: %s", config)
    plan = build_plan(config)
    if config.native_nftables:  # native nftables backend (issue 5): istio_iptables/nft/
        from istio_iptables.nft.run import run_nftables

        run_nftables(config, out, plan)
    elif config.dry_run:
        out.write(render_documents(plan.rulesets))
    elif not config.skip_rule_apply:
        from istio_iptables.nft.run import guard_iptables_run  # issue 5: refuse our nft tables (exit 3)

        guard_iptables_run(config)  # True (--reconcile): remove them after applying, see its docstring
        raise EnvironmentProblem("applying rules is not implemented yet; use --dry-run")
    if config.run_validation:
        raise EnvironmentProblem("--run-validation is not implemented yet")
