"""The command line as users and Istio's injector call it (no root needed)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from istio_iptables.errors import ExitCode
from tests.support.cli_support import INJECTOR_ARGV, invoke
from tests.support.fakes import FakeHost


def test_injector_argv_works_unchanged() -> None:
    result = invoke([*INJECTOR_ARGV, "--dry-run"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("# iptables-restore\n* nat\n")
    assert "-A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN" in result.stdout
    assert "# ip6tables-restore" not in result.stdout


def test_ipv6_document_follows_when_enabled() -> None:
    result = invoke([*INJECTOR_ARGV, "--dry-run", "--enable-ipv6"])
    first, second = result.stdout.split("# ip6tables-restore\n")
    assert "127.0.0.6/32" in first and "::6/128" in second


def test_ipv6_is_detected_from_the_first_address() -> None:
    host = FakeHost(interface_addresses=["fd00::7", "10.0.0.7"])
    assert "# ip6tables-restore" in invoke([*INJECTOR_ARGV, "-n"], host=host).stdout


def test_environment_variables_configure_like_flags() -> None:
    env = {"ISTIO_INBOUND_PORTS": "8080", "ISTIO_SERVICE_CIDR": "10.0.0.0/8", "DRY_RUN": "true"}
    result = invoke([], env=env)
    assert "-A ISTIO_INBOUND -p tcp --dport 8080 -j ISTIO_IN_REDIRECT" in result.stdout
    assert "-A ISTIO_OUTPUT -d 10.0.0.0/8 -j ISTIO_REDIRECT" in result.stdout


def test_flags_win_over_environment() -> None:
    result = invoke(["-b", "9090", "-n"], env={"ISTIO_INBOUND_PORTS": "8080"})
    assert "--dport 9090" in result.stdout and "--dport 8080" not in result.stdout


def test_alias_environment_variable_wins_over_primary() -> None:
    files = {"/etc/resolv.conf": "nameserver 10.0.0.10\n"}
    env = {"REDIRECT_DNS": "false", "ISTIO_META_DNS_CAPTURE": "true"}
    result = invoke(["-n"], env=env, host=FakeHost(files=files))
    assert "ISTIO_OUTPUT_DNS" in result.stdout


@pytest.mark.parametrize("value", ["", "=true", "=1", "=false"])
def test_bool_flags_take_istio_spellings(value: str) -> None:
    result = invoke(["-n", f"--drop-invalid{value}"])
    assert result.exit_code == 0
    assert ("ISTIO_DROP" in result.stdout) is (value != "=false")


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["-b", "80,x"], {}, "--istio-inbound-ports"),
        (["-z", "70000"], {}, "--inbound-capture-port"),
        ([], {"ISTIO_INBOUND_PORTS": "x"}, "ISTIO_INBOUND_PORTS"),
        ([], {"ISTIO_META_DNS_CAPTURE": "maybe"}, "ISTIO_META_DNS_CAPTURE"),
        (["-m", "tproxy"], {}, "--istio-inbound-interception-mode"),
        (["-x", "*"], {}, "--istio-service-exclude-cidr"),
        ([], {"ISTIO_SERVICE_EXCLUDE_CIDR": "*"}, "ISTIO_SERVICE_EXCLUDE_CIDR"),
        ([], {"ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR": "10.0.0.0/8"}, "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR"),
        (["--force-iptables-binary", "iptables"], {}, "--force-iptables-binary"),
    ],
)
def test_bad_values_name_their_source_and_exit_2(args: list[str], env: dict[str, str], named: str) -> None:
    result = invoke(["-n", *args], env=env)
    assert result.exit_code == ExitCode.INVALID_INPUT
    assert result.stdout == ""
    assert named in result.stderr


INJECTIONS = [
    "eth0\n-A OUTPUT -j DROP",
    "eth0 -j DROP",
    "eth0\r-A OUTPUT -j DROP",
    "eth0;COMMIT",
    "'eth0'",
    '"eth0 -j DROP"',
    "-j DROP",
    "eth0\x00",
    "lo#",
]


@pytest.mark.parametrize("payload", INJECTIONS)
@pytest.mark.parametrize(
    "flag", ["-c", "-k", "-b", "-d", "-q", "-o", "-i", "-x", "-u", "-g", "-p", "-z", "-e", "-t", "-r", "-m"]
)
def test_no_value_can_smuggle_a_rule(flag: str, payload: str) -> None:
    result = invoke(["-n", flag, payload])
    assert result.exit_code == ExitCode.INVALID_INPUT
    assert "DROP" not in result.stdout and result.stdout == ""


@pytest.mark.parametrize("variable", ["ISTIO_OUTBOUND_OWNER_GROUPS", "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE"])
@pytest.mark.parametrize("payload", [payload for payload in INJECTIONS if "\x00" not in payload])
def test_no_group_can_smuggle_a_rule(variable: str, payload: str) -> None:
    result = invoke(["-n"], env={variable: payload})
    assert result.exit_code == ExitCode.INVALID_INPUT and result.stdout == ""


def test_unknown_flag_is_a_usage_error() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "istio_iptables", "--no-such-flag"], capture_output=True, text=True
    )
    assert completed.returncode == ExitCode.INVALID_INPUT
    assert "--no-such-flag" in completed.stderr


def test_logging_flags_are_accepted() -> None:
    result = invoke(
        [
            "-n",
            "--log_output_level=default:debug",
            "--log_as_json",
            "--log_caller=x",
            "--log_stacktrace_level=default:error",
        ]
    )
    assert result.exit_code == 0
    assert '"level":"info"' in result.stderr


@pytest.mark.parametrize("flag", ["--iptables-trace-logging", "--restore-format", "-f"])
def test_removed_istio_flags_are_ignored_with_a_warning_naming_them(flag: str) -> None:
    result = invoke(["-n", flag])
    named = "--restore-format" if flag == "-f" else flag
    assert result.exit_code == 0 and f"\twarn\tignoring {named}: Istio removed it" in result.stderr


def test_cli_import_and_dry_run_stay_light() -> None:
    """python-iptables and pyroute2 cost 350-450 ms to import: the dry run must not pay for them."""
    code = (
        "import sys\n"
        "from istio_iptables.frontends.cli.main import main\n"
        "sys.argv = ['istio-iptables', '-n', '--disable-ipv6']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('iptc', 'pyroute2', 'ctypes.util') if m in sys.modules]\n"
        "sys.stderr.write(repr(heavy))\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert completed.stderr.strip().endswith("[]"), completed.stderr
