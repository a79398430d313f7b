"""The ``istio-iptables`` command line: Istio's flags and environment variables, unchanged.

Only click is imported here; python-iptables and the appliers are imported
lazily on the paths that need them, so a dry run costs little more than starting Python.

Boolean flags parse as pflag parses them (Istio's cobra): ``--dry-run`` and ``--dry-run=false``
set a value, ``--dry-run false`` is the flag followed by a stray word, which cobra ignores (and
we ignore with a warning). click would take the next word as the value, so :class:`IstioCommand`
rewrites each boolean flag to its ``--flag=value`` form before click parses.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Callable
from itertools import islice
from typing import Any, NoReturn

import click

from istio_iptables._lib.log import configure_logging, log
from istio_iptables.errors import ConfigError, ExitCode, IstioIptablesError, StdoutError, cut, escape, quote
from istio_iptables.frontends.cli.flags import (
    BoolOption,
    IstioCommand,
    _host,
    bool_value,
    config_options,
    raw_settings,
    show_help,
)


def _show_version(ctx: click.Context, _param: click.Parameter, wanted: bool) -> None:
    if wanted and not ctx.resilient_parsing:
        from importlib.metadata import version

        sys.stdout.write(f"{ctx.info_name}, version {version('istio-iptables')}\n")
        ctx.exit()


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
@click.option("--from-pod", "from_pod", default=None, metavar="FILE",
              help="Take the settings from a Pod object (JSON or YAML, '-' for stdin) as istio-cni does; "
              "flags given here win.")
# Our own --help and --version: click's translate their texts with gettext on every run, which
# imports locale (~1 ms).
@click.option("-h", "--help", is_flag=True, expose_value=False, is_eager=True, callback=show_help,
              help="Show this message and exit.")
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_show_version,
              help="Show the version and exit.")
@click.pass_context
def command(ctx: click.Context, **values: Any) -> None:
    """Write the netfilter rules that send a pod's traffic through its sidecar proxy."""
    try:
        from istio_iptables.config.sidecar import Setting

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
        if values["from_pod"] is not None:
            from istio_iptables.frontends.pod import settings_from_pod_file

            raw = settings_from_pod_file(values["from_pod"], raw)
            if raw is None:
                return

        from istio_iptables.config.sidecar import parse
        from istio_iptables.engine.actions import Action, choose_action, execute

        # The engine enters the namespace when the action needs it and parses the settings there
        # (IPv6 detection reads its addresses).
        action = choose_action(dry_run=raw.flag("dry_run"), cleanup_only=raw.flag("cleanup_only"),
                               skip_rule_apply=raw.flag("skip_rule_apply"))
        namespace = raw.values.get("network_namespace")
        host = _host(ctx)
        dry_run_file = os.environ.get(DRY_RUN_FILE_VARIABLE, "")
        to_file = dry_run_file and action in (Action.RENDER, Action.PREVIEW_CLEANUP) and not raw.flag("skip_rule_apply")
        out = io.StringIO() if to_file else sys.stdout
        execute(action, lambda: parse(raw, host), out, namespace=namespace.value if namespace else "",
                source=namespace.source if namespace else "--network-namespace")
        if to_file:
            _dry_run_to_file(out.getvalue(), dry_run_file)  # type: ignore[union-attr]
    except IstioIptablesError as error:
        log.error("%s", error)
        ctx.exit(error.exit_code)


# Istio's DRY_RUN_FILE_PATH (tools/istio-iptables/pkg/dependencies/stub.go): a dry run also writes
# what it would execute to this file.
DRY_RUN_FILE_VARIABLE = "DRY_RUN_FILE_PATH"


def _dry_run_to_file(printed: str, path: str) -> None:
    """The dry run's output to stdout, and what it would execute to ``path`` (Istio's DRY_RUN_FILE_PATH).

    The file holds the input lines the restore programs (or nft) would read, one per line, as
    Istio's stub writes them; our ``# program`` header comments are left out. Unlike Istio (which
    ignores the error, and writes over an older file without truncating it), a path that cannot be
    written is refused before anything is printed, and a regular file is truncated first.
    """
    import stat

    def refuse(reason: str) -> ConfigError:
        return ConfigError(DRY_RUN_FILE_VARIABLE, path, f"cannot write the dry run there: {reason}")

    executed = "".join(line for line in printed.splitlines(True) if not line.startswith("#"))
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
    sys.stdout.write(printed)


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
        from istio_iptables.frontends.cli.explain import explain_command

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
        from istio_iptables.frontends.cli.explain import explain_command

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
