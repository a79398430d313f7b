"""Property-based fuzzing of the command line: every flag and every environment variable.

hypothesis draws argv and environment values (legal ones, near misses and hostile ones: control
characters followed by a forged log line, 5,000-digit numbers, device and FIFO paths, 120 KB
lists, lone surrogates) and runs the real entry point (:func:`istio_iptables.frontends.cli.main.main`) in this
process, always as a dry run. For every example:

- the exit code is 0 or 2, never a traceback (any other exception fails the test);
- no program that writes to the kernel is started (a stand-in for the spawner refuses and
  records every writer; reads such as iptables-save for the cleanup preview are allowed);
- on exit 2, stdout is empty and the DRY_RUN_FILE_PATH file was not written;
- no output line starts with the marker a hostile value carried after a control character,
  and every stderr line has one of our shapes (a log line, an effective-configuration line,
  a usage error).

``explain`` is fuzzed the same way (its configuration and flow flags, never ``--live``, which
reads the host's rules): exit 0 or 2, no program started at all, no forged line.

The example count is bounded (``FUZZ_EXAMPLES``, 400 by default per test: about half a minute here).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from istio_iptables.frontends.cli import main as cli
from istio_iptables.system import spawn

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "400"))
MARKER = "FORGED"

# Characters after which a naive program would start a new line (str.splitlines' boundaries).
LINE_BREAKS = ["\n", "\r", "\r\n", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    base = tmp_path_factory.mktemp("fuzz")
    fifo = base / "fifo"
    os.mkfifo(fifo)
    resolv = base / "resolv.conf"
    resolv.write_text("nameserver 10.96.0.10\nnameserver fd00::10\n")
    return {
        "dir": str(base),
        "fifo": str(fifo),
        "resolv": str(resolv),
        "log": str(base / "log.txt"),
        "dry_run_file": str(base / "dry-run.txt"),
        "missing": str(base / "missing" / "file"),
    }


def hostile_values(paths: dict[str, str]) -> st.SearchStrategy[str]:
    forged = st.sampled_from(LINE_BREAKS).map(lambda brk: f"15001{brk}{MARKER} 2026-12-01T00:00:00Z\terror\tx")
    return st.one_of(
        forged,
        st.sampled_from(LINE_BREAKS).map(lambda brk: f"eth0{brk}{MARKER}"),
        st.sampled_from(["1" * 5000, "0" * 4999 + "1", "9" * 400 + "h", "9" * 400 + ".5s", "1e400", "-1", "0x10"]),
        st.sampled_from(["/dev/zero", "/dev/full", "/dev/null", "", " ", "*", "**", ",", ",,,", "'", '"', "\\"]),
        st.sampled_from([paths["fifo"], paths["dir"], paths["missing"], "/proc/self/ns/mnt", "\udcff", "\x1b[2J"]),
        st.sampled_from(["-j DROP", "eth0 -j DROP", "10.0.0.0/8 -j ACCEPT", "80;COMMIT", "--dry-run", "-n"]),
        st.just(",".join(["10.0.0.0/8"] * 12_000)),  # a 130 KB list
        st.text(alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=40),
    )


# A few legal values per option, so that examples also reach the end of a successful dry run.
LEGAL = {
    "envoy_port": ["15001", "1", "65535"],
    "inbound_capture_port": ["15006"],
    "inbound_tunnel_port": ["15008"],
    "proxy_uid": ["1337", "0,1337"],
    "proxy_gid": ["1337", "0"],
    "istio_inbound_interception_mode": ["REDIRECT", "TPROXY"],
    "istio_inbound_ports": ["*", "80,443", ""],
    "istio_local_exclude_ports": ["15090,15021,15020", ""],
    "istio_exclude_interfaces": ["eth1", ""],
    "istio_service_cidr": ["*", "10.0.0.0/8,fd00::/8", ""],
    "istio_service_exclude_cidr": ["10.96.0.0/12", ""],
    "istio_outbound_ports": ["443"],
    "istio_local_outbound_ports_exclude": ["22,3306"],
    "kube_virt_interfaces": ["tap0"],
    "istio_inbound_tproxy_mark": ["1337"],
    "istio_inbound_tproxy_route_table": ["133"],
    "iptables_probe_port": ["15002"],
    "probe_timeout": ["5s", "100ms", "1m30s"],
    "network_namespace": ["pod1", "/run/netns/pod1"],
    "force_iptables_binary": ["legacy", "nft", ""],
    "applier": ["restore", "libiptc"],
    "use_sets": ["auto", "always", "never", "multiport"],
    "log_output_level": ["default:debug", "info", "all:warn", "default:none"],
    "log_caller": ["default", "all", ""],
    "log_stacktrace_level": ["default:none", "error"],
    "log_rotate": ["/tmp/x"],
    "log_rotate_max_age": ["30"],
    "log_rotate_max_size": ["104857600"],
    "log_rotate_max_backups": ["1000"],
}
BOOL_WORDS = ["true", "false", "1", "0", "t", "F", "TRUE", "False"]
ENV_ONLY_LEGAL = {
    "ISTIO_OUTBOUND_OWNER_GROUPS": ["*", "0", "root"],
    "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE": ["", "0"],
    "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR": ["127.0.0.1/32", "127.0.0.0/8"],
    "ENVOY_USER": ["istio-proxy", "root"],
}


def fuzzed_options() -> list[click.Option]:
    """Every option of the main command but --help/--version and --dry-run (which the test pins)."""
    return [
        param for param in cli.command.params
        if isinstance(param, click.Option) and param.name not in {None, "dry_run"} and param.expose_value
    ]


def legal_for_variable(variable: str) -> list[str]:
    """The legal values of the option a variable feeds (booleans: ParseBool's words)."""
    for param in cli.command.params:
        if isinstance(param, click.Option) and isinstance(param.envvar, list) and variable in param.envvar:
            return BOOL_WORDS if isinstance(param, cli.BoolOption) else LEGAL.get(param.name or "", ["x"])
    return ENV_ONLY_LEGAL.get(variable, ["x"])


def environment_variables() -> list[str]:
    names = [var for param in cli.command.params if isinstance(param, click.Option)
             for var in (param.envvar or []) if isinstance(param.envvar, list)]
    return sorted({*names, *ENV_ONLY_LEGAL, cli.DRY_RUN_FILE_VARIABLE})


@st.composite
def invocations(draw: st.DrawFn, paths: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    hostile = hostile_values(paths)
    argv: list[str] = []
    for option in draw(st.lists(st.sampled_from(fuzzed_options()), max_size=6)):
        name = draw(st.sampled_from(option.opts + option.secondary_opts))
        if isinstance(option, cli.BoolOption):
            form = draw(st.sampled_from(["bare", "equals", "hostile"]))
            if form == "bare":
                argv.append(name)
            else:
                argv.append(f"{name}={draw(st.sampled_from(BOOL_WORDS) if form == 'equals' else hostile)}")
            continue
        if option.is_flag:  # --enable-ipv6/--disable-ipv6
            argv.append(name)
            continue
        legal = LEGAL.get(option.name or "", []) + {
            "resolv_conf": [paths["resolv"]], "log_target": ["stderr", paths["log"]]
        }.get(option.name or "", [])
        # Three legal values to one hostile: most examples combine a few of each.
        value = draw(st.one_of(*[st.sampled_from(legal)] * 3, hostile)) if legal else draw(hostile)
        argv.extend([name, value] if draw(st.booleans()) or (name.startswith("-") and len(name) == 2) else
                    [f"{name}={value}"])
    if draw(st.booleans()):
        argv.append(draw(st.sampled_from(["false", "true", "stray", f"x\n{MARKER}"])))  # a stray word
    env: dict[str, str] = {}
    for variable in draw(st.lists(st.sampled_from(environment_variables()), max_size=4, unique=True)):
        if variable == cli.DRY_RUN_FILE_VARIABLE:
            choices = st.sampled_from([paths["dry_run_file"], paths["dir"], paths["fifo"], "/dev/full"])
        else:
            choices = st.one_of(*[st.sampled_from(legal_for_variable(variable))] * 3, hostile)
        env[variable] = draw(choices)
    return ["--dry-run", *argv], env


# Spawned programs that only read: iptables-save for the cleanup preview, listings.
READERS = re.compile(r"^(ip6?tables(-legacy|-nft)?-save|nft( -j)? list|ipset (save|list))\b")


class Writers:
    def __init__(self) -> None:
        self.started: list[tuple[str, ...]] = []


@contextlib.contextmanager
def no_kernel_writes(monkeypatch: pytest.MonkeyPatch) -> Iterator[Writers]:
    writers = Writers()
    original = spawn.Running.__init__

    def guarded(self: spawn.Running, args: list[str], *rest: object, **kwargs: object) -> None:
        command = " ".join(os.path.basename(arg) if index == 0 else arg for index, arg in enumerate(args))
        if not READERS.match(command):
            writers.started.append(tuple(args))
            raise AssertionError(f"a dry run started a program that writes: {command}")
        original(self, args, *rest, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(spawn.Running, "__init__", guarded)
    # --run-validation listens and connects for seconds: what it would do is not this test's matter.
    monkeypatch.setattr("istio_iptables.engine.validation.validate", lambda probe: None)
    yield writers


LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z\t(debug|info|warn|error|fatal)\t")
JSON_LINE = re.compile(r'^\{"level":"(debug|info|warn|error|fatal)","time":"')
CONFIG_LINE = re.compile(r"^[a-z0-9_]+=")
USAGE_LINE = re.compile(r"^(Usage: istio-iptables |Try 'istio-iptables --help' for help\.$|Error: )")


def run_main(argv: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    saved_env = dict(os.environ)
    saved_streams = sys.stdout, sys.stderr
    out, err = io.StringIO(), io.StringIO()
    os.environ.update(env)
    sys.stdout, sys.stderr = out, err
    try:
        cli.main(argv)
        code = 0
    except SystemExit as done:
        code = int(done.code or 0)
    finally:
        sys.stdout, sys.stderr = saved_streams
        os.environ.clear()
        os.environ.update(saved_env)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_fuzzed_flags_and_variables_exit_0_or_2_and_never_write_or_forge(
    paths: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(paths["dir"])  # a fuzzed --log_target is a relative path: a file here, not in the checkout
    for name in environment_variables():
        monkeypatch.delenv(name, raising=False)

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(invocations(paths))
    def check(invocation: tuple[list[str], dict[str, str]]) -> None:
        argv, env = invocation
        Path(paths["dry_run_file"]).unlink(missing_ok=True)
        with no_kernel_writes(monkeypatch) as writers:
            code, stdout, stderr = run_main(argv, env)
        assert writers.started == []
        assert code in (0, 2), (code, stderr[-2000:])
        if code == 2:
            assert stdout == ""
            assert not Path(paths["dry_run_file"]).exists()
        for line in (stdout + stderr).splitlines():
            assert not line.startswith(MARKER), line
        for line in stderr.splitlines():
            assert (LOG_LINE.match(line) or JSON_LINE.match(line) or CONFIG_LINE.match(line)
                    or USAGE_LINE.match(line)), line

    check()


EXPLAIN_LEGAL = {
    "dst": ["10.0.0.1", "10.96.0.10", "fd00::1", "127.0.0.1"],
    "src": ["10.0.0.2", "127.0.0.6"],
    "dport": ["80", "15021", "53"],
    "sport": ["43210"],
    "uid": ["1337", "1000"],
    "gid": ["1337", "0"],
    "in_interface": ["eth0", "eth1"],
    "out_interface": ["eth0", "lo"],
    "pod_ips": ["10.0.0.2", "fd00::2"],
}


@st.composite
def explain_invocations(draw: st.DrawFn, paths: dict[str, str]) -> list[str]:
    from istio_iptables.frontends.cli.explain import explain_command

    hostile = hostile_values(paths)
    options = [param for param in explain_command.params if isinstance(param, click.Option)
               and param.expose_value and param.name not in {"live"}]
    argv = ["--dst", draw(st.sampled_from(EXPLAIN_LEGAL["dst"])), "--dport", "80"]
    for option in draw(st.lists(st.sampled_from(options), max_size=6)):
        name = draw(st.sampled_from(option.opts + option.secondary_opts))
        if isinstance(option, cli.BoolOption):
            argv.append(name if draw(st.booleans()) else f"{name}={draw(st.sampled_from(BOOL_WORDS) | hostile)}")
        elif option.is_flag:
            argv.append(name)
        else:
            choices = list(getattr(option.type, "choices", []) or [])
            legal = choices or LEGAL.get(option.name or "", []) + EXPLAIN_LEGAL.get(option.name or "", [])
            value = draw(st.one_of(*[st.sampled_from(legal)] * 3, hostile)) if legal else draw(hostile)
            argv.extend([name, value])
    return ["explain", *argv]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_fuzzed_explain_exits_0_or_2_and_never_forges(paths: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(paths["dir"])
    for name in environment_variables():
        monkeypatch.delenv(name, raising=False)

    @settings(max_examples=FUZZ_EXAMPLES // 2, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(explain_invocations(paths))
    def check(argv: list[str]) -> None:
        with no_kernel_writes(monkeypatch) as writers:
            code, stdout, stderr = run_main(argv, {})
        assert writers.started == []
        assert code in (0, 2), (code, stderr[-2000:])
        if code == 2:
            assert stdout == ""
        for line in (stdout + stderr).splitlines():
            assert not line.startswith(MARKER), line

    check()
