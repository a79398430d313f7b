"""Proof against the kernel for the native nftables backend (``--native-nftables``): the same flows
and checks as tests/e2e/test_explain_kernel.py (see tests/beds/explain_proof.py), with our ``nft -f`` script
in the pod namespace. Explain runs on the configuration's nft model and on ``nft -j list ruleset``
(istio_iptables.explain.from_nft); each rule's packet counter is read from the same listing.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import pytest

from istio_iptables.explain.from_nft import read_model, to_tables
from istio_iptables.explain.walk import Tables
from istio_iptables.net import Family
from istio_iptables.nft.listing import read_listing
from istio_iptables.nft.names import NAT
from istio_iptables.nft.render import render_script
from istio_iptables.policy.sidecar_nft import build_nft_ruleset
from istio_iptables.policy.sidecar_xtables import build_plan
from tests.beds.explain_proof import EXTRA_CASES, Backend, RuleKey, case_config, flow_bed, prove
from tests.beds.flowsender import FlowBed
from tests.support.conformance import Case, load_cases

pytestmark = pytest.mark.netns
# The knobs case loads its long lists as named sets (address sets matched with a mask, port sets):
# the conformance cases stay under the 64 entries where sets begin.
NFT_CASES = [case for case in load_cases() if case.golden_nftables is not None] + [
    replace(case, argv=(*case.argv, "--use-sets", "always")) if case.name == "sidecar-knobs-dns" else case
    for case in EXTRA_CASES
]


@pytest.fixture(scope="module")
def bed() -> Iterator[FlowBed]:
    with flow_bed() as bed:
        yield bed


@pytest.mark.parametrize("case", NFT_CASES, ids=[case.name for case in NFT_CASES])
def test_explain_matches_the_kernel_with_native_nftables(case: Case, bed: FlowBed) -> None:
    config = case_config(case)
    ruleset = build_nft_ruleset(config)
    routes = build_plan(config).routes
    bed.install_nft(render_script(ruleset), (routes.mark, routes.table) if routes else None)
    model = read_model(ruleset)

    def model_tables(family: Family) -> Tables:
        return to_tables(model, family, "configuration")[0]

    def snapshot(family: Family) -> tuple[Tables, dict[RuleKey, int]]:
        tables, rules = to_tables(read_listing(bed.save(family.value)), family, "live")
        return tables, {key: rule.packets or 0 for key, rule in rules.items()}

    prove(case, config, bed, Backend(model_tables, snapshot, frozenset({NAT})))
