"""Fast text-level check of every nft golden: the ruleset our script leaves equals Istio's (no kernel)."""

from __future__ import annotations

import pytest

from tests.support.cli_support import nft_dry_run
from tests.support.conformance import Case, load_cases
from tests.support.nft_script import final_ruleset

CASES = [case for case in load_cases() if case.golden_nftables is not None]
def test_every_golden_case_is_covered() -> None:
    assert len(CASES) == 28


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_dry_run_leaves_the_golden_ruleset(case: Case) -> None:
    assert case.golden_nftables is not None
    ours, golden = final_ruleset(nft_dry_run(case)), final_ruleset(case.golden_nftables.read_text())
    # Lists, not dicts: the kernel lists tables and chains in creation order.
    assert [(table, list(chains.items())) for table, chains in ours.items()] == [
        (table, list(chains.items())) for table, chains in golden.items()
    ]
