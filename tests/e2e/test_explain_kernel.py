"""Proof against the kernel: for every conformance configuration and hundreds of flows (both families),
``explain`` must predict where the kernel lands each flow and which rules it matches.

Per configuration: our dry-run rules go into a pod namespace (iptables-restore --noflush), then each
flow is sent for real and checked by tests/beds/explain_proof.py (landing and per-rule packet counters).
Explain runs twice per flow, on the configuration's model and on the rules read back with
iptables-save (istio_iptables.xtables.save), and both must agree with the kernel.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from istio_iptables.explain.walk import Tables
from istio_iptables.net import Family
from istio_iptables.policy.sidecar_xtables import build_plan
from istio_iptables.xtables.render import render_restore
from istio_iptables.xtables.save import read_save_model
from tests.beds.explain_proof import EXTRA_CASES, Backend, RuleKey, case_config, flow_bed, prove
from tests.beds.flowsender import FlowBed
from tests.support.conformance import Case, load_cases

pytestmark = pytest.mark.netns


def counters(text: str, family: Family) -> dict[RuleKey, int]:
    saved = read_save_model(text, family)
    return {
        (table, chain, item.number): item.packets or 0
        for (table, chain), rules in saved.chains.items()
        for item in rules
    }


@pytest.fixture(scope="module")
def bed() -> Iterator[FlowBed]:
    with flow_bed() as bed:
        yield bed


CASES = load_cases() + EXTRA_CASES
# Both iptables backends, alternating over the cases (one pass each would double the run time).
CASES_AND_BACKENDS = [(case, ("nft", "legacy")[index % 2]) for index, case in enumerate(CASES)]


@pytest.mark.parametrize(
    "case, backend", CASES_AND_BACKENDS, ids=[f"{case.name}-{backend}" for case, backend in CASES_AND_BACKENDS]
)
def test_explain_matches_the_kernel(case: Case, backend: str, bed: FlowBed) -> None:
    config = case_config(case)
    plan = build_plan(config)
    documents = {ruleset.family.value: render_restore(ruleset, comment=False) for ruleset in plan.rulesets}
    routes = (plan.routes.mark, plan.routes.table) if plan.routes else None
    bed.install(documents, routes, backend)

    def model(family: Family) -> Tables | None:
        ruleset = plan.ruleset(family)
        return Tables.from_ruleset(ruleset) if ruleset else None

    def snapshot(family: Family) -> tuple[Tables, dict[RuleKey, int]]:
        text = bed.save(family.value)
        return Tables.from_saved(read_save_model(text, family), "live"), counters(text, family)

    prove(case, config, bed, Backend(model, snapshot, frozenset({"nat"})))
