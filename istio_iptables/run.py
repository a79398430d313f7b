"""Orchestration: what one invocation does with a validated configuration."""

from __future__ import annotations

import logging
from typing import TextIO

from istio_iptables.capture import build_plan
from istio_iptables.config import Config
from istio_iptables.render import render_documents

log = logging.getLogger("istio_iptables")


def run(config: Config, out: TextIO, namespace_path: str = "") -> None:
    """``namespace_path``: the --network-namespace the caller entered (the CNI-mode lock file)."""
    log.info("effective configuration: %s", config)
    plan = build_plan(config)
    if config.dry_run:
        out.write(render_documents(plan.rulesets))
    elif not config.skip_rule_apply:
        from istio_iptables.apply.engine import apply

        outcome = apply(config, plan, namespace_path)
        log.info("%s (%s backend)", outcome.action, outcome.backend)
    if config.run_validation:
        from istio_iptables.validation import run_validation

        run_validation(config)
