"""Port ranges on the command line and in the environment, as Istio's istio-iptables takes them (no root)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner, Result

from istio_iptables.errors import ExitCode
from istio_iptables.frontends.cli import main as cli
from tests.support.fakes import FakeHost


def invoke(args: list[str], env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli.command, ["-n", "-u", "1337", *args], env=env or {}, obj={"host": FakeHost()})


@pytest.mark.parametrize(
    ("flag", "variable", "rule"),
    [
        ("-b", "ISTIO_INBOUND_PORTS", "-A ISTIO_INBOUND -p tcp --dport 8000:9000 -j ISTIO_IN_REDIRECT"),
        ("-q", "ISTIO_OUTBOUND_PORTS", "-A ISTIO_OUTPUT -p tcp --dport 8000:9000 -j ISTIO_REDIRECT"),
        ("-o", "ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE", "-A ISTIO_OUTPUT -p udp --dport 8000:9000 -j RETURN"),
    ],
)
def test_flags_and_variables_take_ranges(flag: str, variable: str, rule: str) -> None:
    for result in (invoke([flag, "8000:9000"]), invoke([], env={variable: "8000:9000"})):
        assert result.exit_code == 0, result.output
        assert rule in result.stdout


def test_inbound_exclusions_take_ranges_in_every_spelling() -> None:
    result = invoke([], env={"ISTIO_INBOUND_PORTS": "*", "ISTIO_LOCAL_EXCLUDE_PORTS": " :100,65000:,7:7"})
    assert result.exit_code == 0, result.output
    inbound = [line for line in result.stdout.splitlines() if line.startswith("-A ISTIO_INBOUND") and "RETURN" in line]
    assert inbound[1:] == [
        "-A ISTIO_INBOUND -p tcp --dport 0:100 -j RETURN",
        "-A ISTIO_INBOUND -p tcp --dport 65000:65535 -j RETURN",
        "-A ISTIO_INBOUND -p tcp --dport 7 -j RETURN",
    ]


def test_native_nftables_writes_nfts_range_form() -> None:
    result = invoke(["--native-nftables", "-b", "8000:9000", "-o", ":100"])
    assert result.exit_code == 0, result.output
    assert "tcp dport 8000-9000 counter jump istio-in-redirect" in result.stdout
    assert "udp dport 0-100 counter return" in result.stdout
    assert "8000:9000" not in result.stdout.split("\n", 1)[1]


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["-b", "9000:8000"], {}, "--istio-inbound-ports"),
        (["-d", "1:70000"], {}, "--istio-local-exclude-ports"),
        (["-q", "8000-9000"], {}, "--istio-outbound-ports"),
        (["-o", "http"], {}, "--istio-local-outbound-ports-exclude"),
        ([], {"ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE": "9000:8000"}, "ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE"),
        ([], {"ISTIO_OUTBOUND_PORTS": "80:90:100"}, "ISTIO_OUTBOUND_PORTS"),
        ([], {"ISTIO_LOCAL_EXCLUDE_PORTS": "010"}, "ISTIO_LOCAL_EXCLUDE_PORTS"),
        (["--native-nftables", "-b", ":0"], {}, "--istio-inbound-ports"),
    ],
)
def test_broken_ranges_name_their_source_and_exit_2(args: list[str], env: dict[str, str], named: str) -> None:
    result = invoke(args, env=env)
    assert result.exit_code == ExitCode.INVALID_INPUT
    assert result.stdout == ""
    assert named in result.stderr and "Traceback" not in result.stderr
