"""Drop-in fidelity with Istio's istio-iptables (issue 12): booleans, DRY_RUN_FILE_PATH, logs, help, small cases."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from istio_iptables.errors import ExitCode
from istio_iptables.frontends.cli import main as cli
from tests.support.fakes import FakeHost

PROGRAM = [sys.executable, "-m", "istio_iptables"]


def invoke(args: list[str], env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli.command, args, env=env or {}, obj={"host": FakeHost()})


def parsed(args: list[str]) -> tuple[dict, list[str]]:
    ctx = cli.command.make_context("istio-iptables", list(args))
    return ctx.params, ctx.args


# --- boolean flags: pflag's forms ----------------------------------------------------------

BOOLEAN_FLAGS = [option for option in cli.command.params if isinstance(option, cli.BoolOption)]


@pytest.mark.parametrize("option", BOOLEAN_FLAGS, ids=lambda option: option.opts[0])
def test_a_boolean_flag_never_takes_the_next_word(option: cli.BoolOption) -> None:
    for name in option.opts:
        params, stray = parsed([name, "false"])
        assert params[option.name] == "true" and stray == ["false"]
        params, stray = parsed([f"{name}=false"])
        assert params[option.name] == "false" and stray == []


def test_dry_run_false_stays_a_dry_run() -> None:
    for args in (["--dry-run", "false"], ["-n", "false"], ["-n", "0"]):
        result = invoke([*args, "--disable-ipv6"])
        assert result.exit_code == 0
        assert result.stdout.startswith("# iptables-restore\n")  # printed, so not written
        assert f"ignoring the argument '{args[1]}'" in result.stderr


def test_short_boolean_clusters_and_short_values_read_as_pflag_reads_them() -> None:
    params, stray = parsed(["-nb", "*"])  # -n then -b *
    assert params["dry_run"] == "true" and params["istio_inbound_ports"] == "*" and stray == []
    params, _ = parsed(["-p=15002", "-n=false"])
    assert params["envoy_port"] == "15002" and params["dry_run"] == "false"


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--dry-run="], {}, "--dry-run"),
        (["--drop-invalid=yes"], {}, "--drop-invalid"),
        (["-n"], {"DRY_RUN": "yes"}, None),  # the flag wins over the variable
        ([], {"DRY_RUN": "yes"}, "DRY_RUN"),  # Istio would ignore it and write rules
        (["-n"], {"REDIRECT_DNS": "on"}, "REDIRECT_DNS"),
    ],
)
def test_booleans_take_go_parsebool_words_only(args: list[str], env: dict[str, str], named: str | None) -> None:
    result = invoke([*args, "--disable-ipv6"], env=env)
    if named is None:
        assert result.exit_code == 0
        return
    assert result.exit_code == ExitCode.INVALID_INPUT and result.stdout == ""
    assert f"for {named}: a boolean is one of" in result.stderr


def test_an_empty_boolean_variable_is_false_as_in_istio() -> None:
    result = invoke(["-n", "--disable-ipv6"], env={"INVALID_DROP": ""})
    assert result.exit_code == 0 and "ISTIO_DROP" not in result.stdout


# --- DRY_RUN_FILE_PATH -----------------------------------------------------------------------


def test_dry_run_file_holds_what_would_be_executed(tmp_path: Path) -> None:
    target = tmp_path / "dry-run.txt"
    target.write_text("x" * 100_000)  # an older, longer file: replaced, not overwritten in place
    result = invoke(["-n", "--enable-ipv6", "-b", "*"], env={"DRY_RUN_FILE_PATH": str(target)})
    assert result.exit_code == 0
    written = target.read_text()
    assert written == "".join(line for line in result.stdout.splitlines(True) if not line.startswith("#"))
    assert written.startswith("* nat\n-N ISTIO_INBOUND\n") and written.count("COMMIT\n") == 2
    assert oct(target.stat().st_mode & 0o777) in ("0o644", "0o600")  # whatever the umask leaves of 0644


def test_dry_run_file_with_native_nftables_holds_the_nft_script(tmp_path: Path) -> None:
    target = tmp_path / "dry-run.txt"
    result = invoke(["-n", "--disable-ipv6", "--native-nftables"], env={"DRY_RUN_FILE_PATH": str(target)})
    assert result.exit_code == 0 and "table inet istio-proxy-nat" in target.read_text()


@pytest.mark.parametrize("kind", ["directory", "missing", "fifo", "/dev/full"])
def test_an_unwritable_dry_run_file_is_refused_before_printing(kind: str, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    path = {"directory": str(tmp_path), "missing": str(tmp_path / "no" / "file"), "fifo": str(fifo)}.get(kind, kind)
    result = invoke(["-n", "--disable-ipv6"], env={"DRY_RUN_FILE_PATH": path})
    assert result.exit_code == ExitCode.INVALID_INPUT and result.stdout == ""
    assert "for DRY_RUN_FILE_PATH: cannot write the dry run there" in result.stderr


def test_skip_rule_apply_prints_and_writes_nothing_as_istio(tmp_path: Path) -> None:
    target = tmp_path / "dry-run.txt"
    for extra in ([], ["--native-nftables"], ["--cleanup-only"]):
        result = invoke(["-n", "--skip-rule-apply", "--disable-ipv6", *extra], env={"DRY_RUN_FILE_PATH": str(target)})
        assert result.exit_code == 0 and result.stdout == "" and not target.exists()
        assert "--skip-rule-apply: no rules written" in result.stderr


# --- logs: Istio's text and JSON forms -----------------------------------------------------------

STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")


def log_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if STAMP.match(line) or line.startswith("{")]


def test_text_log_lines_are_istios_field_by_field() -> None:
    result = invoke(["-n", "--disable-ipv6", "--iptables-trace-logging"])
    lines = log_lines(result.stderr)
    warn, info = lines[0].split("\t"), lines[1].split("\t")
    assert len(warn) == 3 and STAMP.fullmatch(warn[0]) and warn[1] == "warn"
    assert warn[2].startswith("ignoring --iptables-trace-logging")
    assert STAMP.fullmatch(info[0]) and info[1] == "info" and info[2] == "effective configuration:"


def test_json_log_lines_are_istios_field_by_field() -> None:
    result = invoke(["-n", "--disable-ipv6", "--log_as_json", "--iptables-trace-logging"])
    entries = [json.loads(line) for line in result.stderr.splitlines()]
    assert [list(entry) for entry in entries] == [["level", "time", "msg"]] * len(entries)
    assert [entry["level"] for entry in entries] == ["warn", "info"]
    assert all(STAMP.fullmatch(entry["time"]) for entry in entries)
    assert entries[1]["msg"].startswith("effective configuration:\nproxy_port=15001\n")
    assert result.stderr.startswith('{"level":"warn","time":"')  # zap's compact form, no spaces


def test_log_caller_adds_istios_caller_field() -> None:
    result = invoke(["-n", "--disable-ipv6", "--log_as_json", "--log_caller=default"])
    entry = json.loads(result.stderr.splitlines()[0])
    assert list(entry) == ["level", "time", "caller", "msg"]
    assert re.fullmatch(r"engine/actions\.py:\d+", entry["caller"])
    text = invoke(["-n", "--disable-ipv6", "--log_caller=all"]).stderr.splitlines()[0].split("\t")
    assert re.fullmatch(r"engine/actions\.py:\d+", text[2]) and text[3] == "effective configuration:"


@pytest.mark.parametrize(
    ("level", "shown"),
    [("default:debug", True), ("info", True), ("warn", False), ("all:none", False), ("default:info,all:error", False),
     ("other:debug", True), ("", True)],
)
def test_output_levels_follow_istios_grammar(level: str, shown: bool) -> None:
    result = invoke(["-n", "--disable-ipv6", f"--log_output_level={level}"])
    assert result.exit_code == 0
    assert ("effective configuration" in result.stderr) is shown


@pytest.mark.parametrize("level", ["default:loud", "warning", "INFO", "default:info:x", "default:info,"])
def test_unknown_levels_are_refused_as_istio_refuses_them(level: str) -> None:
    for flag in ("--log_output_level", "--log_stacktrace_level"):
        result = invoke(["-n", f"{flag}={level}"])
        assert result.exit_code == ExitCode.INVALID_INPUT and result.stdout == ""
        assert f"for {flag}:" in result.stderr


# --- help, subcommands, packaging ---------------------------------------------------------------


def test_help_lists_the_subcommand_and_the_exit_codes() -> None:
    done = subprocess.run([*PROGRAM, "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert "explain   Which rule decides a flow" in done.stdout
    for code in ("0 ", "1 ", "2 ", "3 ", "4 ", "126"):
        assert f"\n    {code}" in done.stdout


def test_a_subcommand_typo_is_named() -> None:
    done = subprocess.run([*PROGRAM, "explian", "--dst", "10.0.0.1"], capture_output=True, text=True, timeout=60)
    assert done.returncode == ExitCode.INVALID_INPUT
    assert "unknown command 'explian'; did you mean 'istio-iptables explain'?" in done.stderr


def test_an_explain_option_without_explain_says_where_it_belongs() -> None:
    done = subprocess.run([*PROGRAM, "--dst", "10.0.0.1"], capture_output=True, text=True, timeout=60)
    assert done.returncode == ExitCode.INVALID_INPUT
    assert "('--dst' is an option of 'istio-iptables explain')" in done.stderr


def test_pyproject_license_is_an_spdx_string() -> None:
    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == "Apache-2.0"
    assert "hypothesis" in " ".join(pyproject["project"]["optional-dependencies"]["test"])


# --- explain: assumptions said, --live conflicts refused -------------------------------------------


def explain(args: list[str]) -> Result:
    from istio_iptables.frontends.cli.explain import explain_command

    return CliRunner().invoke(explain_command, args, obj={"host": FakeHost()})


def test_explain_says_what_it_assumed() -> None:
    result = explain(["-i", "*", "--dst", "10.96.0.10", "--dport", "80"])
    assert result.stdout.splitlines()[0] == (
        "Assumed: the pod's address is 10.0.0.2 (no --pod-ip or --src given); "
        "a packet to a non-local address leaves via eth0 (--out-interface)"
    )
    given = explain(["-i", "*", "--dst", "10.96.0.10", "--dport", "80", "--pod-ip", "10.1.1.1", "--out-interface",
                     "eth0"])
    assert not given.stdout.startswith("Assumed")
    data = json.loads(explain(["--json", "--origin", "remote", "--dst", "10.0.0.2", "--dport", "80"]).stdout)
    assert data["assumptions"] == ["the packet comes in on eth0 (--in-interface)"]


def test_explain_live_refuses_configuration_flags() -> None:
    result = explain(["--live", "-b", "80", "--redirect-dns", "--dst", "10.0.0.2", "--dport", "80"])
    assert result.exit_code == ExitCode.INVALID_INPUT
    assert "invalid value '--istio-inbound-ports --redirect-dns' for --live" in result.stderr
