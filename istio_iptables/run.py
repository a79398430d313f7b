"""Orchestration: what one invocation does with a validated configuration."""

from __future__ import annotations

from typing import TextIO

from istio_iptables.capture import build_plan
from istio_iptables.config import Config
from istio_iptables.errors import EnvironmentProblem
from istio_iptables.logging_setup import log
from istio_iptables.render import render_documents
from istio_iptables.sets import render_ipset_document


def run(config: Config, out: TextIO) -> None:
    log.info("effective configuration: %s", config)
    plan = build_plan(config)
    if config.dry_run:
        out.write(render_ipset_document(plan.rulesets) + render_documents(plan.rulesets))
    elif not config.skip_rule_apply:
        raise EnvironmentProblem("applying rules is not implemented yet; use --dry-run")
    if config.run_validation:
        raise EnvironmentProblem("--run-validation is not implemented yet")
