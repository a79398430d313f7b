"""The module-global logger is reset between tests (tests/conftest.py), whatever a test configured.

An in-process CLI invocation binds ``log`` to the CliRunner's stream; without the reset, log lines
of every later test in the same process went to that dead stream instead of ``caplog``.
The two tests below run in this order (pytest keeps the file's order).
"""

from __future__ import annotations

import pytest

from istio_iptables._lib.log import log
from tests.support.cli_support import INJECTOR_ARGV, invoke


def test_an_in_process_run_configures_the_logger() -> None:
    result = invoke([*INJECTOR_ARGV, "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "effective configuration" in result.stderr


def test_a_later_test_sees_log_lines_through_caplog(caplog: pytest.LogCaptureFixture) -> None:
    log.warning("seen by caplog")
    assert "seen by caplog" in caplog.text
