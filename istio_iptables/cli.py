"""The ``istio-iptables`` command line: Istio's flags and environment variables, unchanged.

Only click is imported here; python-iptables, pyroute2 and the appliers are imported
lazily on the paths that need them, so a dry run costs little more than starting Python.

Boolean flags parse as pflag parses them (Istio's cobra): ``--dry-run`` and ``--dry-run=false``
set a value, ``--dry-run false`` is the flag followed by a stray word, which cobra ignores (and
we ignore with a warning). click would take the next word as the value, so :class:`IstioCommand`
rewrites each boolean flag to its ``--flag=value`` form before click parses.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from itertools import islice
from typing import Any, NoReturn

import click
from click.core import ParameterSource

from istio_iptables.errors import ConfigError, ExitCode, IstioIptablesError, StdoutError, cut, escape, quote
from istio_iptables.logging_setup import configure_logging, log

# (name, short flag, long flag, environment variables: an alias listed first wins, as in Istio)
VALUE_OPTIONS: list[tuple[str, str | None, str, tuple[str, ...], str]] = [
    ("envoy_port", "-p", "--envoy-port", (), "Outbound listener port (REDIRECT target of ISTIO_REDIRECT)."),
    ("inbound_capture_port", "-z", "--inbound-capture-port", ("INBOUND_CAPTURE_PORT",),
     "Inbound listener port (REDIRECT/TPROXY target of inbound traffic)."),
    ("inbound_tunnel_port", "-e", "--inbound-tunnel-port", ("INBOUND_TUNNEL_PORT",),
     "HBONE tunnel port, never redirected."),
    ("proxy_uid", "-u", "--proxy-uid", ("PROXY_UID",),
     "Comma separated uids whose traffic is not captured (default: the uid of $ENVOY_USER, else 1337)."),
    ("proxy_gid", "-g", "--proxy-gid", ("PROXY_GID",),
     "Comma separated gids whose traffic is not captured (default: the proxy uids)."),
    ("istio_inbound_interception_mode", "-m", "--istio-inbound-interception-mode",
     ("ISTIO_INBOUND_INTERCEPTION_MODE",), "REDIRECT (default) or TPROXY."),
    ("istio_inbound_ports", "-b", "--istio-inbound-ports", ("ISTIO_INBOUND_PORTS",),
     "Inbound ports to capture: '*' for all, a comma separated list, or empty for none."),
    ("istio_local_exclude_ports", "-d", "--istio-local-exclude-ports", ("ISTIO_LOCAL_EXCLUDE_PORTS",),
     "Inbound ports never captured (used with -b '*')."),
    ("istio_exclude_interfaces", "-c", "--istio-exclude-interfaces", ("ISTIO_EXCLUDE_INTERFACES",),
     "Interfaces whose traffic is never captured."),
    ("istio_service_cidr", "-i", "--istio-service-cidr", ("ISTIO_SERVICE_CIDR",),
     "Outbound CIDRs to capture: '*' for all, a comma separated list, or empty for none."),
    ("istio_service_exclude_cidr", "-x", "--istio-service-exclude-cidr", ("ISTIO_SERVICE_EXCLUDE_CIDR",),
     "Outbound CIDRs never captured (they win over -i)."),
    ("istio_outbound_ports", "-q", "--istio-outbound-ports", ("ISTIO_OUTBOUND_PORTS",),
     "Outbound TCP ports always captured, whatever the destination."),
    ("istio_local_outbound_ports_exclude", "-o", "--istio-local-outbound-ports-exclude",
     ("ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE",), "Outbound ports never captured (TCP and UDP)."),
    ("kube_virt_interfaces", "-k", "--kube-virt-interfaces", ("KUBE_VIRT_INTERFACES",),
     "Interfaces of VM guests, whose incoming traffic is treated as outbound."),
    ("istio_inbound_tproxy_mark", "-t", "--istio-inbound-tproxy-mark", ("ISTIO_INBOUND_TPROXY_MARK",),
     "Packet mark of TPROXY mode."),
    ("istio_inbound_tproxy_route_table", "-r", "--istio-inbound-tproxy-route-table",
     ("ISTIO_INBOUND_TPROXY_ROUTE_TABLE",), "Policy routing table of TPROXY mode."),
    ("iptables_probe_port", None, "--iptables-probe-port", ("IPTABLES_PROBE_PORT",),
     "Original destination port of --run-validation's probe."),
    ("probe_timeout", None, "--probe-timeout", ("PROBE_TIMEOUT",), "Deadline of --run-validation (e.g. 5s)."),
    ("network_namespace", None, "--network-namespace", ("NETWORK_NAMESPACE",),
     "Network namespace (name under /run/netns, or a path) to write the rules into."),
    ("force_iptables_binary", None, "--force-iptables-binary", ("FORCE_IPTABLES_BINARY",),
     "Use the legacy or the nft iptables backend instead of detecting it."),
    ("applier", None, "--applier", ("ISTIO_IPTABLES_APPLIER",),
     "How rules are written: 'restore' (iptables-restore, default) or 'libiptc' (in-process, legacy only)."),
    ("use_sets", None, "--use-sets", ("ISTIO_IPTABLES_USE_SETS",),
     "Long CIDR/port lists as one set match: auto (over 64 entries, default), always, never, or "
     "multiport (no ipset: long port lists as multiport rules). See docs/speed.md."),
]

BOOL_OPTIONS: list[tuple[str, str | None, str, tuple[str, ...], str]] = [
    ("dry_run", "-n", "--dry-run", ("DRY_RUN",), "Print the rules instead of writing them."),
    ("skip_rule_apply", None, "--skip-rule-apply", ("SKIP_RULE_APPLY",), "Write no rules or routes."),
    ("run_validation", None, "--run-validation", ("RUN_VALIDATION",),
     "Check that redirection works (exit 126 if not)."),
    ("redirect_dns", None, "--redirect-dns", ("ISTIO_META_DNS_CAPTURE", "REDIRECT_DNS"),
     "Capture DNS to the agent on port 15053."),
    ("drop_invalid", None, "--drop-invalid", ("INVALID_DROP", "DROP_INVALID"),
     "Drop packets conntrack marks INVALID."),
    ("dual_stack", None, "--dual-stack", ("ISTIO_DUAL_STACK", "DUAL_STACK"),
     "Enable IPv6 rules when the namespace has any IPv6 address."),
    ("capture_all_dns", None, "--capture-all-dns", ("CAPTURE_ALL_DNS",),
     "With --redirect-dns, capture every port 53 flow, not only the resolv.conf servers."),
    ("cni_mode", None, "--cni-mode", ("CNI_MODE",), "Run as the CNI plugin does (per-namespace lock)."),
    ("reconcile", None, "--reconcile", ("RECONCILE",), "Replace rules of another configuration."),
    ("cleanup_only", None, "--cleanup-only", ("CLEANUP_ONLY",), "Remove everything this tool added."),
    ("force_apply", None, "--force-apply", ("FORCE_APPLY",), "Apply even when the rules look current."),
    ("native_nftables", None, "--native-nftables", ("NATIVE_NFTABLES",), "Use native nftables."),
]

# Env-only knobs of Istio (no flag).
ENV_ONLY = {
    "owner_groups_include": "ISTIO_OUTBOUND_OWNER_GROUPS",
    "owner_groups_exclude": "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE",
    "loopback_cidr": "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR",
    "envoy_user": "ENVOY_USER",
}

# Go's strconv.ParseBool, which pflag uses for --flag=VALUE and Istio for the variables.
BOOL_WORDS = {"1": True, "t": True, "T": True, "true": True, "TRUE": True, "True": True,
              "0": False, "f": False, "F": False, "false": False, "FALSE": False, "False": False}


class BoolOption(click.Option):
    """A pflag boolean: ``--flag`` or ``--flag=VALUE``, never the next word (see :class:`IstioCommand`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("metavar", "[=BOOL]")
        super().__init__(*args, **kwargs)


class IstioCommand(click.Command):
    """A command whose boolean flags parse as pflag's, and whose stray words are ignored as cobra's.

    Each boolean flag is rewritten to ``--long=VALUE`` before click parses (``-n`` is
    ``--dry-run=true``, ``-n=false`` is ``--dry-run=false``), so click never takes the next word
    as a boolean's value. The walk knows which options take the next word as their value.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, self.pflag_booleans(args))

    _pflag_tables: tuple[dict[str, str], set[str], dict[str, str]] | None = None

    def pflag_tables(self) -> tuple[dict[str, str], set[str], dict[str, str]]:
        """(boolean option -> long name, options taking the next word, short option -> long name).

        Built once per command: the executable's argv walks (:func:`spell_out_short_options`, then
        :meth:`pflag_booleans`) share it.
        """
        if self._pflag_tables is None:
            booleans: dict[str, str] = {}
            takes_next: set[str] = set()
            long_names: dict[str, str] = {}
            for param in self.params:
                if not isinstance(param, click.Option):
                    continue
                longs = [opt for opt in param.opts if opt.startswith("--")]
                if longs:
                    long_names.update((opt, longs[0]) for opt in param.opts if not opt.startswith("--"))
                if isinstance(param, BoolOption):
                    booleans.update((opt, longs[0]) for opt in param.opts)
                elif not param.is_flag:
                    takes_next.update(param.opts)
            self._pflag_tables = booleans, takes_next, long_names
        return self._pflag_tables

    def pflag_booleans(self, args: list[str]) -> list[str]:
        booleans, takes_next, long_names = self.pflag_tables()
        spelled: list[str] = []
        pending = list(reversed(args))
        while pending:
            arg = pending.pop()
            if arg == "--":
                spelled.append(arg)
                spelled.extend(reversed(pending))
                break
            name, equals, value = arg.partition("=")
            if name in booleans:
                spelled.append(f"{booleans[name]}={value if equals else 'true'}")
                continue
            if arg[:2] in long_names and arg[2:3] == "=" and arg[:2] in takes_next:
                # pflag reads "-p=15001" as 15001, click as "=15001".
                spelled.append(f"{long_names[arg[:2]]}={arg[3:]}")
                continue
            if arg[:2] in booleans and not arg.startswith("--") and len(arg) > 2:
                # "-nb" is "-n -b" for pflag: a short boolean never takes the rest as its value.
                spelled.append(f"{booleans[arg[:2]]}=true")
                pending.append("-" + arg[2:])
                continue
            spelled.append(arg)
            if arg in takes_next and pending:
                spelled.append(pending.pop())
        return spelled


def _options(command: Callable[..., Any]) -> Callable[..., Any]:
    for name, short, long, envvars, help_text in reversed(BOOL_OPTIONS):
        names = [long] + ([short] if short else [])
        command = click.option(
            *names, name, cls=BoolOption, default=None, envvar=list(envvars) or None,
            show_envvar=bool(envvars), help=help_text,
        )(command)
    for name, short, long, envvars, help_text in reversed(VALUE_OPTIONS):
        names = [long] + ([short] if short else [])
        command = click.option(
            *names, name, default=None, envvar=list(envvars) or None, show_envvar=bool(envvars), help=help_text,
        )(command)
    return command


def bool_value(setting: Any) -> bool:
    """A boolean flag's or variable's value, as Istio reads it (strconv.ParseBool).

    An empty variable is false (Istio ignores it and keeps the default); an empty ``--flag=`` and
    any word ParseBool refuses is an error here. Istio fails on such a flag, and silently keeps the
    default for such a variable, so ``DRY_RUN=yes`` would write rules there: we refuse it.
    """
    if setting.value in BOOL_WORDS:
        return BOOL_WORDS[setting.value]
    if setting.value == "" and not setting.source.startswith("-"):
        return False
    raise ConfigError(setting.source, setting.value, "a boolean is one of 1, t, T, true, TRUE, True, "
                      "0, f, F, false, FALSE, False (Go's ParseBool), given as --flag=VALUE")


def _source_label(ctx: click.Context, name: str, long: str, envvars: tuple[str, ...]) -> str:
    if ctx.get_parameter_source(name) is ParameterSource.ENVIRONMENT:
        return next((var for var in envvars if var in os.environ), long)
    return long


def _show_help(ctx: click.Context, _param: click.Parameter, wanted: bool) -> None:
    if wanted and not ctx.resilient_parsing:
        sys.stdout.write(ctx.get_help() + "\n")  # not click.echo: a failing stdout must reach GuardedStdout
        ctx.exit()


def _show_version(ctx: click.Context, _param: click.Parameter, wanted: bool) -> None:
    if wanted and not ctx.resilient_parsing:
        from importlib.metadata import version

        sys.stdout.write(f"{ctx.info_name}, version {version('istio-iptables')}\n")
        ctx.exit()


def config_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Every configuration flag of the main command (``explain`` takes the same ones)."""
    command = click.option("--resolv-conf", "resolv_conf", default="/etc/resolv.conf", show_default=True,
                           help="Where --redirect-dns reads the DNS servers to capture.")(command)
    command = click.option("--enable-ipv6/--disable-ipv6", "enable_ipv6", default=None,
                           help="Write IPv6 rules or not (default: detect from the namespace's addresses, "
                           "as Istio).")(command)
    return _options(command)


def raw_settings(ctx: click.Context, values: dict[str, Any]) -> Any:
    """The configuration flags and environment of this invocation, labelled with their sources."""
    from istio_iptables.config import RawSettings, Setting

    settings: dict[str, Setting] = {}
    flags: dict[str, Setting] = {}
    for name, _short, long, envvars, _help in VALUE_OPTIONS:
        if values[name] is not None:
            settings[name] = Setting(values[name], _source_label(ctx, name, long, envvars))
    for name, _short, long, envvars, _help in BOOL_OPTIONS:
        if values[name] is not None:
            setting = Setting(values[name], _source_label(ctx, name, long, envvars))
            flags[name] = Setting("true" if bool_value(setting) else "false", setting.source)
    for name, var in ENV_ONLY.items():
        if var in os.environ:
            settings[name] = Setting(os.environ[var], var)
    return RawSettings(
        values=settings, flags=flags, enable_ipv6=values["enable_ipv6"], resolv_conf=values["resolv_conf"]
    )


EXIT_CODES_HELP = """\b
Commands:
  explain   Which rule decides a flow, and where it lands: istio-iptables explain --help

\b
Exit codes:
  0    success, or nothing to do
  1    applying failed; the namespace was rolled back
  2    invalid input: a bad flag or environment value; nothing was written
  3    drift: our chains hold another configuration (--reconcile replaces it)
  4    environment problem: privilege, binary, kernel support, lock, unwritable stdout
  126  --run-validation failed
"""

# Flags Istio had and removed: accepted and ignored with a warning, so an old injection template
# still starts the pod. (Istio master refuses them: "unknown flag", exit 255 from pilot-agent.)
REMOVED_FLAGS = {"trace_logging": "--iptables-trace-logging", "restore_format": "--restore-format"}
# Istio's removed --log_rotate* flags (pkg/log no longer has them): accepted, ignored, no warning.
LOG_ROTATE_FLAGS = ("--log_rotate", "--log_rotate_max_age", "--log_rotate_max_size", "--log_rotate_max_backups")


def _log_rotate_options(command: Callable[..., Any]) -> Callable[..., Any]:
    for flag in LOG_ROTATE_FLAGS:
        command = click.option(flag, flag.lstrip("-"), default=None, hidden=True)(command)
    return command


@click.command(cls=IstioCommand, add_help_option=False, epilog=EXIT_CODES_HELP,
               context_settings={"max_content_width": 110, "allow_extra_args": True})
@config_options
@click.option("--log_output_level", "log_output_level", default="",
              help="Istio logging: comma separated scope:level (levels: debug, info, warn, error, fatal, none); "
              "default default:info.")
@click.option("--log_as_json", "log_as_json", cls=BoolOption, default=None,
              help="Istio logging: one JSON object per line (Istio's fields: level, time, caller, msg).")
@click.option("--log_target", "log_target", multiple=True,
              help="Istio logging: stderr (default), stdout or a file; repeatable.")
@click.option("--log_caller", "log_caller", default="",
              help="Istio logging: scopes whose lines name the caller (default or all).")
@click.option("--log_stacktrace_level", "log_stacktrace_level", default=None,
              help="Istio logging: accepted and validated; no stack traces are printed.")
@_log_rotate_options
@click.option("--iptables-trace-logging", "trace_logging", cls=BoolOption, default=None, hidden=True)
@click.option("-f", "--restore-format", "restore_format", cls=BoolOption, default=None, hidden=True)
# Our own --help and --version: click's translate their texts with gettext on every run, which
# imports locale (~1 ms).
@click.option("-h", "--help", is_flag=True, expose_value=False, is_eager=True, callback=_show_help,
              help="Show this message and exit.")
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_show_version,
              help="Show the version and exit.")
@click.pass_context
def command(ctx: click.Context, **values: Any) -> None:
    """Write the netfilter rules that send a pod's traffic through its sidecar proxy."""
    try:
        from istio_iptables.config import Setting

        as_json = values["log_as_json"] is not None and bool_value(Setting(values["log_as_json"], "--log_as_json"))
        configure_logging(values["log_output_level"], as_json, values["log_target"], values["log_caller"],
                          values["log_stacktrace_level"])
        for name, flag in REMOVED_FLAGS.items():
            if values[name] is not None:
                log.warning("ignoring %s: Istio removed it (Istio master refuses it as an unknown flag)", flag)
        for word in ctx.args:
            log.warning("ignoring the argument %s, as Istio does (a boolean flag takes a value only as "
                        "--flag=VALUE)", quote(word))
        raw = raw_settings(ctx, values)

        from istio_iptables.apply.netns import entered
        from istio_iptables.config import parse
        from istio_iptables.run import run

        # Enter the target namespace before parsing: IPv6 detection reads its addresses. A dry run
        # of the rules writes and reads nothing, so it stays where it is (and needs no privilege);
        # the cleanup preview reads the live rules, so it runs where the cleanup would.
        dry_run = raw.flag("dry_run")
        cleanup_only = raw.flag("cleanup_only")
        namespace = raw.values.get("network_namespace") if cleanup_only or not dry_run else None
        with entered(namespace.value if namespace else "", namespace.source if namespace else "") as path:
            config = parse(raw, _host(ctx))
            dry_run_file = os.environ.get(DRY_RUN_FILE_VARIABLE, "")
            if config.dry_run and dry_run_file and not config.skip_rule_apply:
                _dry_run_to_file(config, dry_run_file)
            else:
                run(config, sys.stdout, namespace_path=path)
    except IstioIptablesError as error:
        log.error("%s", error)
        ctx.exit(error.exit_code)


# Istio's DRY_RUN_FILE_PATH (tools/istio-iptables/pkg/dependencies/stub.go): a dry run also writes
# what it would execute to this file.
DRY_RUN_FILE_VARIABLE = "DRY_RUN_FILE_PATH"


def _dry_run_to_file(config: Any, path: str) -> None:
    """The dry run's output to stdout, and what it would execute to ``path`` (Istio's DRY_RUN_FILE_PATH).

    The file holds the input lines the restore programs (or nft) would read, one per line, as
    Istio's stub writes them; our ``# program`` header comments are left out. Unlike Istio (which
    ignores the error, and writes over an older file without truncating it), a path that cannot be
    written is refused before anything is printed, and a regular file is truncated first.
    """
    import io
    import stat

    from istio_iptables.run import run

    def refuse(reason: str) -> ConfigError:
        return ConfigError(DRY_RUN_FILE_VARIABLE, path, f"cannot write the dry run there: {reason}")

    printed = io.StringIO()
    run(config, printed)
    executed = "".join(line for line in printed.getvalue().splitlines(True) if not line.startswith("#"))
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY, 0o644)
    except OSError as error:
        raise refuse(error.strerror or str(error)) from None
    except ValueError:  # a NUL byte
        raise ConfigError(DRY_RUN_FILE_VARIABLE, path, "not a file path") from None
    try:
        data = memoryview(executed.encode())
        os.set_blocking(fd, True)
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.ftruncate(fd, 0)
        while data:
            data = data[os.write(fd, data) :]
    except OSError as error:
        raise refuse(error.strerror or str(error)) from None
    finally:
        os.close(fd)
    sys.stdout.write(printed.getvalue())


def _host(ctx: click.Context) -> Any:
    """The machine's facts; tests pass a fake one as ``obj={"host": ...}``."""
    if isinstance(ctx.obj, dict) and "host" in ctx.obj:
        return ctx.obj["host"]
    from istio_iptables.host import RealHost

    return RealHost()


def spell_out_short_options(args: list[str]) -> list[str]:
    """``-p 15001`` becomes ``--envoy-port 15001``: the same parse, without click's costly misses.

    click tries every argument as a long option first, and each miss builds an error with gettext
    and difflib suggestions before falling back to the short option: ~2 ms of a ~45 ms start for
    the injector's argv. Walks the arguments as click does, so an option's value is never rewritten.
    """
    _booleans, takes_next, long_names = command.pflag_tables()  # takes_next: the next argument is their value
    spelled: list[str] = []
    remaining = iter(args)
    for arg in remaining:
        if arg == "--":
            spelled.append(arg)
            spelled.extend(remaining)
            break
        spelled.append(long_names.get(arg, arg))
        if arg in takes_next:
            spelled.extend(islice(remaining, 1))
    return spelled


class GuardedStdout:
    """sys.stdout for the executable: a closed or failing stdout becomes :class:`StdoutError` (exit 4).

    Python leaves ``sys.stdout`` None when fd 1 is closed, and reports a failed flush (``/dev/full``)
    with exit 120 and no message. After the first failure, output is dropped: the failure has
    been raised once, and the run ends with it.
    """

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.failed: StdoutError | None = None

    def _guarded(self, action: Callable[[], Any]) -> Any:
        if self.failed is not None:
            return None
        if self._stream is None:
            self.failed = StdoutError("it is closed")
            raise self.failed
        try:
            return action()
        except (OSError, ValueError) as error:  # ValueError: I/O on a closed file
            self.failed = StdoutError(getattr(error, "strerror", None) or str(error))
            raise self.failed from None

    def write(self, text: str) -> int:
        return self._guarded(lambda: self._stream.write(text)) or 0

    def flush(self) -> None:
        self._guarded(lambda: self._stream.flush())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _guard_standard_streams() -> None:
    """Point closed fds 0-2 at /dev/null and wrap stdout in :class:`GuardedStdout`.

    A closed fd 1 would otherwise be the next file this process opens (a lock file, a pipe), and
    whatever is printed, or a child's stdout, would land in it.
    """
    closed = set()
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            closed.add(fd)
    for fd in sorted(closed):
        null = os.open("/dev/null", os.O_RDWR)
        if null != fd:
            os.dup2(null, fd)
            os.close(null)
    if 2 in closed:
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115 - /dev/null now: logs go nowhere, as asked
    sys.stdout = GuardedStdout(None if 1 in closed else sys.stdout)  # type: ignore[assignment]


def exit_now(code: object) -> NoReturn:
    """Flush and end the process without the interpreter's teardown.

    Freeing every module and object at exit takes ~7 ms, a sixth of a dry run, and nobody needs
    it: whatever must happen at exit has happened when main() returns.
    """
    if code is not None and not isinstance(code, int):
        raise SystemExit(code)  # a message for Python to print
    try:
        sys.stdout.flush()
    except StdoutError as error:
        _report(error)
        code = code or error.exit_code
    except OSError:
        code = code or 120  # an unguarded stdout (main() called directly): what Python exits with
    with contextlib.suppress(OSError, ValueError, AttributeError):
        sys.stderr.flush()  # stderr full or gone: nowhere left to say anything
    os._exit(code or 0)


def _report(error: IstioIptablesError) -> None:
    """An error after the command ended: through our log when it is set up, else on stderr."""
    if log.configured:
        log.error("%s", error)
        return
    with contextlib.suppress(OSError, ValueError, AttributeError):
        sys.stderr.write(f"Error: {error}\n")


def program() -> NoReturn:
    """The ``istio-iptables`` executable (and ``python -m istio_iptables``): :func:`main`, then exit now."""
    _guard_standard_streams()
    try:
        main()
    except SystemExit as done:
        exit_now(done.code)
    exit_now(0)


SUBCOMMANDS = ("explain", "ambient")


def _near(word: str, target: str) -> bool:
    """At most two edits (insert, delete, replace, swap of neighbours) from ``target``: a typo of it."""
    if abs(len(word) - len(target)) > 2 or len(word) < 3:
        return False
    previous2: list[int] = []
    previous = list(range(len(target) + 1))
    for i, char in enumerate(word, 1):
        current = [i]
        for j, other in enumerate(target, 1):
            cost = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char != other))
            if i > 1 and j > 1 and char == target[j - 2] and word[i - 2] == other:
                cost = min(cost, previous2[j - 2] + 1)
            current.append(cost)
        previous2, previous = previous, current
    return previous[-1] <= 2


def show_usage_error(error: click.ClickException) -> None:
    """click's usage error, with the user's words escaped and cut (click echoes them raw and whole)."""
    ctx = getattr(error, "ctx", None)
    lines = []
    if ctx is not None:
        lines.append(escape(ctx.get_usage()))
        lines.append(f"Try '{ctx.command_path} --help' for help.")
    message = cut(escape(error.format_message()), 400)
    if isinstance(error, click.NoSuchOption) and ctx is not None and ctx.command is command:
        from istio_iptables.explain_cli import explain_command

        if any(error.option_name in param.opts for param in explain_command.params if param.name not in
               {param.name for param in command.params}):
            message += f" ({quote(error.option_name)} is an option of 'istio-iptables explain')"
    lines.append(f"Error: {message}")
    sys.stderr.write("\n".join(lines) + "\n")


def invoke(cli: click.Command, args: list[str], prog_name: str) -> NoReturn:
    """Run a click command as the executable does: exit codes of README, usage errors exit 2."""
    try:
        # Without standalone mode click returns ctx.exit()'s code instead of raising it.
        code = cli.main(args=args, prog_name=prog_name, standalone_mode=False)
        if isinstance(code, int) and code != 0:
            sys.exit(code)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.ClickException as error:
        show_usage_error(error)
        sys.exit(ExitCode.INVALID_INPUT)
    except click.exceptions.Abort:
        sys.exit(ExitCode.FAILURE)
    except IstioIptablesError as error:  # raised outside a command's own handler: stdout failing under --help
        _report(error)
        sys.exit(error.exit_code)
    sys.exit(ExitCode.OK)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["istio-iptables"]:
        # Istio's injector writes `args: [istio-iptables, -p, ...]` for `pilot-agent`: accept that
        # argv unchanged, so only the init container's image has to change.
        args = args[1:]
    if args[:2] == ["explain", "ambient"]:
        from istio_iptables.frontends.cli.ambient import explain_ambient_command

        invoke(explain_ambient_command, args[2:], "istio-iptables explain ambient")
    if args[:1] == ["explain"]:
        from istio_iptables.explain_cli import explain_command

        invoke(explain_command, args[1:], "istio-iptables explain")
    if args[:1] == ["ambient"]:
        from istio_iptables.frontends.cli.ambient import ambient_command

        invoke(ambient_command, args[1:], "istio-iptables ambient")
    if args and not args[0].startswith("-") and any(_near(args[0], name) for name in SUBCOMMANDS):
        # cobra ignores stray words, but this one is a typo of a subcommand: say so.
        suggestion = next(name for name in SUBCOMMANDS if _near(args[0], name))
        sys.stderr.write(f"Error: unknown command {quote(args[0])}; did you mean 'istio-iptables {suggestion}'?\n")
        sys.exit(ExitCode.INVALID_INPUT)
    invoke(command, spell_out_short_options(args), "istio-iptables")
