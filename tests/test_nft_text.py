"""Fast text-level check of every nft golden: the ruleset our script leaves equals Istio's (no kernel)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from istio_iptables import cli
from tests.conformance import Case, load_cases
from tests.fakes import FakeHost
from tests.nft_script import final_ruleset

CASES = [case for case in load_cases() if case.golden_nftables is not None]
RESOLV_CONF = "/test/resolv.conf"


def nft_dry_run(case: Case, *extra: str) -> str:
    host = FakeHost(files={RESOLV_CONF: case.resolv_conf or ""})
    result = CliRunner().invoke(
        cli.command,
        ["--dry-run", "--native-nftables", *extra, *case.cli_args(RESOLV_CONF)],
        env=case.env,
        obj={"host": host},
    )
    assert result.exit_code == 0, result.output
    return result.stdout


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
