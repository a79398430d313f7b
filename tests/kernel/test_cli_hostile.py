"""Hostile input, case by case (issue 11): exit 2 naming the flag and the value, no traceback, no hang.

These run the real executable (``python -m istio_iptables``) as a dry run, so what Python does
with its standard streams, closed or full, is part of what is tested.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from istio_iptables.errors import ExitCode
from tests.support.netns import NetNS

HUGE = "1" * 5000  # Python refuses int() of more than 4,300 digits
PROGRAM = [sys.executable, "-m", "istio_iptables"]


def run(
    args: list[str], env: dict[str, str] | None = None, timeout: float = 60, **kwargs: object
) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key not in {"DRY_RUN_FILE_PATH"}}
    environment.update(env or {})
    return subprocess.run(
        [*PROGRAM, *args], capture_output="stdout" not in kwargs, text=True, env=environment, timeout=timeout,
        **kwargs,  # type: ignore[call-overload]
    )


def assert_refused(done: subprocess.CompletedProcess, named: str, value_start: str = "") -> None:
    assert done.returncode == ExitCode.INVALID_INPUT, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert done.stdout in ("", None)
    assert named in done.stderr
    assert f"invalid value '{value_start}" in done.stderr


@pytest.mark.parametrize(
    "flag",
    ["-p", "-z", "-e", "-u", "-g", "-t", "-r", "-b", "-d", "-q", "-o", "--iptables-probe-port", "--probe-timeout"],
)
def test_numbers_of_5000_digits_are_refused_by_name(flag: str) -> None:
    done = run(["-n", flag, HUGE])
    assert_refused(done, flag if flag.startswith("--") else "--", HUGE[:20])
    assert len(done.stderr) < 600  # the value is cut, not echoed whole


@pytest.mark.parametrize(
    "variable",
    ["INBOUND_CAPTURE_PORT", "PROXY_UID", "ISTIO_INBOUND_TPROXY_MARK", "ISTIO_INBOUND_TPROXY_ROUTE_TABLE",
     "IPTABLES_PROBE_PORT", "ISTIO_OUTBOUND_OWNER_GROUPS", "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "PROBE_TIMEOUT"],
)
def test_variables_of_5000_digits_are_refused_by_name(variable: str) -> None:
    assert_refused(run(["-n"], env={variable: HUGE}), variable, HUGE[:20])


def test_leading_zeros_do_not_count_as_digits() -> None:
    done = run(["-n", "--disable-ipv6", "-p", "0" * 5000 + "15001"])
    assert done.returncode == 0 and "--to-ports 15001" in done.stdout


@pytest.mark.parametrize("duration", ["9" * 400 + "h", "9" * 400 + "s", "2h", "3601s"])
def test_an_endless_probe_timeout_is_refused(duration: str) -> None:
    assert_refused(run(["-n", "--probe-timeout", duration]), "--probe-timeout: a duration of at most 3600s")


@pytest.fixture
def fifo(tmp_path: Path) -> str:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return str(path)


@pytest.mark.parametrize("target", ["missing-dir/log", "directory", "", "/dev/full", "fifo"])
def test_an_unwritable_log_target_is_refused_by_name(target: str, tmp_path: Path, fifo: str) -> None:
    path = {"missing-dir/log": str(tmp_path / "missing" / "log"), "directory": str(tmp_path), "fifo": fifo}.get(
        target, target
    )
    done = run(["-n", "--log_target", path], timeout=20)  # a FIFO without a reader: no hang
    assert_refused(done, "for --log_target: cannot write the log there", path[:20])


def test_log_target_file_and_stderr_both_get_the_lines(tmp_path: Path) -> None:
    log = tmp_path / "log"
    done = run(["-n", "--disable-ipv6", "--log_target", "stderr", "--log_target", str(log)])
    assert done.returncode == 0
    assert "\tinfo\teffective configuration:" in done.stderr
    assert "\tinfo\teffective configuration:" in log.read_text()


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero", "directory", "/dev/null"])
def test_resolv_conf_must_be_a_regular_file(kind: str, tmp_path: Path, fifo: str) -> None:
    path = {"fifo": fifo, "directory": str(tmp_path)}.get(kind, kind)
    done = run(["-n", "--redirect-dns", "--resolv-conf", path], timeout=20)
    assert_refused(done, "--resolv-conf: cannot read it", path[:20])


def test_a_100_mb_resolv_conf_is_read_and_a_larger_than_128_mib_one_refused(tmp_path: Path) -> None:
    big = tmp_path / "resolv.conf"
    with big.open("w") as handle:
        handle.write("nameserver 10.96.0.10\n")
        handle.truncate(100 << 20)  # sparse: 100 MB of NULs after the first line
    done = run(["-n", "--disable-ipv6", "--redirect-dns", "--resolv-conf", str(big)])
    assert done.returncode == 0 and "--dport 53 -d 10.96.0.10/32 -j" in done.stdout
    os.truncate(big, (128 << 20) + 1)
    assert_refused(run(["-n", "--redirect-dns", "--resolv-conf", str(big)]), "larger than 128 MiB")


def _close_stdout() -> None:
    os.close(1)


@pytest.mark.parametrize("args", [["-n", "--disable-ipv6"], ["--help"], ["--version"]])
def test_closed_stdout_is_said_and_exits_4(args: list[str]) -> None:
    done = subprocess.run([*PROGRAM, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          preexec_fn=_close_stdout, timeout=60)
    assert done.returncode == ExitCode.ENVIRONMENT, done.stderr
    assert "cannot write to stdout: it is closed" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "args", [["-n", "--disable-ipv6"], ["--help"], ["explain", "--dst", "10.0.0.1", "--dport", "80"]]
)
def test_full_stdout_is_said_and_exits_4(args: list[str]) -> None:
    with open("/dev/full", "w") as full:
        done = subprocess.run([*PROGRAM, *args], stdout=full, stderr=subprocess.PIPE, text=True, timeout=60)
    assert done.returncode == ExitCode.ENVIRONMENT, done.stderr
    assert "cannot write to stdout: No space left on device" in done.stderr and "Traceback" not in done.stderr


def test_closed_stdout_does_not_become_the_next_opened_file(tmp_path: Path) -> None:
    """fd 1 is pointed at /dev/null first: the DRY_RUN_FILE_PATH file must not be where stdout goes."""
    target = tmp_path / "dry-run.txt"
    done = subprocess.run([*PROGRAM, "-n", "--disable-ipv6"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, preexec_fn=_close_stdout, env={**os.environ, "DRY_RUN_FILE_PATH": str(target)},
                          timeout=60)
    assert done.returncode == ExitCode.ENVIRONMENT
    assert target.read_text().startswith("* nat\n")
    assert "# iptables-restore" not in target.read_text()


@pytest.mark.parametrize("breaker", ["\n", "\r", "\x0b", "\x1e", "\x85", "\u2028"])
def test_control_characters_never_forge_a_line(breaker: str) -> None:
    forged = f"a{breaker}2026-12-01T00:00:00.000000Z\terror\tFORGED"
    for args in (["-n", "-p", forged], ["-n", f"--envoy{breaker}FORGED"], ["-n", "--dry-run", forged],
                 ["explain", "--dst", forged, "--dport", "80"], ["explain", "--dst", "10.0.0.1", "--dport", forged]):
        done = run(args)
        assert done.returncode == ExitCode.INVALID_INPUT or args[2] == forged, (args, done.stderr)
        for line in (done.stdout + done.stderr).splitlines():
            assert not line.startswith(("FORGED", "2026-12-01T00:00:00")), (args, line)


def test_a_121_kb_value_is_cut_in_every_message() -> None:
    long_list = ",".join(["10.0.0.0/8"] * 11_000) + ",bad"
    explain = ["explain", "--dst", long_list, "--dport", "80"]
    for args in (["-n", "-x", long_list], ["-n", "--" + "x" * 121_000], explain):
        done = run(args)
        assert done.returncode == ExitCode.INVALID_INPUT and "Traceback" not in done.stderr
        assert len(done.stderr) < 1500, len(done.stderr)


def test_stray_words_are_warned_about_escaped() -> None:
    done = run(["-n", "--disable-ipv6", "x\nFORGED"])
    assert done.returncode == 0
    assert "\twarn\tignoring the argument 'x\\nFORGED'" in done.stderr


# --- real runs in a throwaway namespace: refused before anything is written -----------------------

KERNEL_READERS = ("iptables-legacy-save", "iptables-nft-save", "ip6tables-legacy-save", "ip6tables-nft-save")


def namespace_state(netns: NetNS) -> tuple[str, ...]:
    dumps = [netns.save(program) for program in KERNEL_READERS]
    dumps += [netns.run("nft", "list", "ruleset").stdout, netns.run("ip", "rule").stdout,
              netns.run("ip", "-6", "addr").stdout]
    # Comment lines carry the time of the dump.
    return tuple("\n".join(line for line in dump.splitlines() if not line.startswith("#")) for dump in dumps)


@pytest.mark.netns
def test_hostile_values_on_a_real_run_write_nothing(netns: NetNS, tmp_path: Path, fifo: str) -> None:
    before = namespace_state(netns)
    base = [*PROGRAM, "-p", "15001", "-z", "15006", "-u", "1337", "-i", "*", "-b", "*", "-m", "TPROXY"]
    cases: list[tuple[list[str], dict[str, str]]] = [
        (["-t", HUGE], {}),
        ([], {"ISTIO_INBOUND_TPROXY_ROUTE_TABLE": HUGE}),
        (["--log_target", "/dev/full"], {}),
        (["--log_target", fifo], {}),
        (["--redirect-dns", "--resolv-conf", fifo], {}),
        (["--redirect-dns", "--resolv-conf", "/dev/zero"], {}),
        (["--run-validation", "--probe-timeout", "9" * 400 + "h"], {}),
        (["-c", "eth0\nFORGED"], {}),
        (["--log_output_level=default:loud"], {}),
        ([], {"DRY_RUN": "yes"}),
        (["--dry-run="], {}),
    ]
    for args, env in cases:
        done = netns.run(*base, *args, env={"XTABLES_LOCKFILE": str(tmp_path / "xtables.lock"), **env},
                         check=False, timeout=30)
        assert done.returncode == ExitCode.INVALID_INPUT, (args, env, done.stderr[-1000:])
        assert "Traceback" not in done.stderr and done.stdout == ""
        assert namespace_state(netns) == before, (args, env)


@pytest.mark.netns
def test_dry_run_false_on_a_real_run_stays_a_dry_run(netns: NetNS, tmp_path: Path) -> None:
    before = namespace_state(netns)
    done = netns.run(*PROGRAM, "-p", "15001", "-i", "*", "--dry-run", "false", check=False,
                     env={"XTABLES_LOCKFILE": str(tmp_path / "xtables.lock")})
    assert done.returncode == 0 and done.stdout.startswith("# iptables-restore\n")
    assert namespace_state(netns) == before
