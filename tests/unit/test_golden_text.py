"""Fast text-level check of every iptables golden (the kernel comparison is in test_conformance_kernel)."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from istio_iptables.frontends.cli import main as cli
from tests.support.conformance import Case, golden_restore_documents, load_cases, normalise
from tests.support.fakes import FakeHost

CASES = [case for case in load_cases() if case.golden_iptables is not None]
RESOLV_CONF = "/test/resolv.conf"


def split_documents(output: str) -> list[str]:
    """Dry-run output -> restore documents without their leading program comment."""
    documents = re.split(r"^# ip6?tables-restore\n", output, flags=re.MULTILINE)
    return [document for document in documents if document]


def dry_run(case: Case) -> str:
    host = FakeHost(files={RESOLV_CONF: case.resolv_conf or ""})
    result = CliRunner().invoke(
        cli.command, ["--dry-run", *case.cli_args(RESOLV_CONF)], env=case.env, obj={"host": host}
    )
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_dry_run_text_equals_golden(case: Case) -> None:
    ours = split_documents(dry_run(case))
    golden = golden_restore_documents(case.golden_iptables)
    assert [normalise(doc) for doc in ours] == [normalise(doc) for doc in golden]
