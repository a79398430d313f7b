"""The ``istio-iptables`` command line: Istio's flags and environment variables, unchanged.

Only click is imported here; python-iptables, pyroute2 and the appliers are imported
lazily on the paths that need them, so a dry run costs little more than starting Python.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from itertools import islice
from typing import Any, NoReturn

import click
from click.core import ParameterSource

from istio_iptables.errors import ExitCode, IstioIptablesError
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

def _options(command: Callable[..., Any]) -> Callable[..., Any]:
    for name, short, long, envvars, help_text in reversed(BOOL_OPTIONS):
        names = [long] + ([short] if short else [])
        command = click.option(
            *names, name, is_flag=False, flag_value="true", default=None, envvar=list(envvars) or None,
            show_envvar=bool(envvars), metavar="[BOOL]", help=help_text,
        )(command)
    for name, short, long, envvars, help_text in reversed(VALUE_OPTIONS):
        names = [long] + ([short] if short else [])
        command = click.option(
            *names, name, default=None, envvar=list(envvars) or None, show_envvar=bool(envvars), help=help_text,
        )(command)
    return command


def _source_label(ctx: click.Context, name: str, long: str, envvars: tuple[str, ...]) -> str:
    if ctx.get_parameter_source(name) is ParameterSource.ENVIRONMENT:
        return next((var for var in envvars if var in os.environ), long)
    return long


def _show_help(ctx: click.Context, _param: click.Parameter, wanted: bool) -> None:
    if wanted and not ctx.resilient_parsing:
        click.echo(ctx.get_help(), color=ctx.color)
        ctx.exit()


def _show_version(ctx: click.Context, _param: click.Parameter, wanted: bool) -> None:
    if wanted and not ctx.resilient_parsing:
        from importlib.metadata import version

        click.echo(f"{ctx.info_name}, version {version('istio-iptables')}")
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
            flags[name] = Setting(values[name], _source_label(ctx, name, long, envvars))
    for name, var in ENV_ONLY.items():
        if var in os.environ:
            settings[name] = Setting(os.environ[var], var)
    return RawSettings(
        values=settings, flags=flags, enable_ipv6=values["enable_ipv6"], resolv_conf=values["resolv_conf"]
    )


@click.command(add_help_option=False, context_settings={"max_content_width": 110})
@config_options
@click.option("--log_output_level", "log_output_level", default="default:info",
              help="Istio logging: scope:level pairs, e.g. default:debug.")
@click.option("--log_as_json", "log_as_json", is_flag=False, flag_value="true", default="false",
              metavar="[BOOL]", help="Istio logging: one JSON object per line.")
@click.option("--log_target", "log_target", default="stderr", help="Istio logging: stderr, stdout or a file.")
@click.option("--log_caller", "log_caller", default="", hidden=True)
@click.option("--log_stacktrace_level", "log_stacktrace_level", default="", hidden=True)
@click.option("--log_rotate", "log_rotate", default="", hidden=True)
@click.option("--log_rotate_max_age", "log_rotate_max_age", default="", hidden=True)
@click.option("--log_rotate_max_size", "log_rotate_max_size", default="", hidden=True)
@click.option("--log_rotate_max_backups", "log_rotate_max_backups", default="", hidden=True)
@click.option("--iptables-trace-logging", "trace_logging", is_flag=False, flag_value="true", default=None,
              hidden=True)
@click.option("-f", "--restore-format", "restore_format", is_flag=False, flag_value="true", default=None,
              hidden=True)
@click.option("--from-pod", "from_pod", default=None, metavar="FILE",
              help="Take the settings from a Pod object (JSON or YAML, '-' for stdin) as istio-cni does; "
              "flags given here win.")
# Our own --help and --version: click's translate their texts with gettext on every run, which
# imports locale (~1 ms).
@click.option("-h", "--help", is_flag=True, expose_value=False, is_eager=True, callback=_show_help,
              help="Show this message and exit.")
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_show_version,
              help="Show the version and exit.")
@click.pass_context
def command(ctx: click.Context, **values: Any) -> None:
    """Write the netfilter rules that send a pod's traffic through its sidecar proxy."""

    configure_logging(values["log_output_level"], values["log_as_json"], values["log_target"])
    for removed in ("trace_logging", "restore_format"):
        if values[removed] is not None:
            log.warning("ignoring --%s: Istio removed it", removed.replace("_", "-"))

    raw = raw_settings(ctx, values)
    try:
        if values["from_pod"] is not None:
            from istio_iptables.frontends.pod import settings_from_pod_file

            raw = settings_from_pod_file(values["from_pod"], raw)
            if raw is None:
                return
        from istio_iptables.apply.netns import entered
        from istio_iptables.config import parse, parse_bool
        from istio_iptables.run import run

        # Enter the target namespace before parsing: IPv6 detection reads its addresses. A dry run
        # writes nothing, so it stays where it is (and needs no privilege).
        dry_run = "dry_run" in raw.flags and parse_bool(raw.flags["dry_run"])
        namespace = raw.values.get("network_namespace") if not dry_run else None
        with entered(namespace.value if namespace else "", namespace.source if namespace else "") as path:
            config = parse(raw, _host(ctx))
            run(config, sys.stdout, namespace_path=path)
    except IstioIptablesError as error:
        log.error("%s", error)
        ctx.exit(error.exit_code)


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
    long_names: dict[str, str] = {}
    takes_next: set[str] = set()  # options whose next argument is always their value
    for param in command.params:
        if not isinstance(param, click.Option):
            continue
        longs = [opt for opt in param.opts if opt.startswith("--")]
        if longs:
            long_names.update((opt, longs[0]) for opt in param.opts if not opt.startswith("--"))
        # Optional-value options (flag_value="true") never take an argument that starts with "-".
        if not param.is_flag and param.flag_value != "true":
            takes_next.update(param.opts)
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


def exit_now(code: object) -> NoReturn:
    """Flush and end the process without the interpreter's teardown.

    Freeing every module and object at exit takes ~7 ms, a sixth of a dry run, and nobody needs
    it: whatever must happen at exit has happened when main() returns.
    """
    if code is not None and not isinstance(code, int):
        raise SystemExit(code)  # a message for Python to print
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:
        code = code or 120  # what Python exits with when it cannot flush stdout
    os._exit(code or 0)


def program() -> NoReturn:
    """The ``istio-iptables`` executable (and ``python -m istio_iptables``): :func:`main`, then exit now."""
    try:
        main()
    except SystemExit as done:
        exit_now(done.code)
    exit_now(0)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["istio-iptables"]:
        # Istio's injector writes `args: [istio-iptables, -p, ...]` for `pilot-agent`: accept that
        # argv unchanged, so only the init container's image has to change.
        args = args[1:]
    if args[:1] == ["explain"]:
        from istio_iptables.explain_cli import explain_command

        explain_command.main(args=args[1:], prog_name="istio-iptables explain")
        return
    try:
        # Without standalone mode click returns ctx.exit()'s code instead of raising it.
        code = command.main(args=spell_out_short_options(args), prog_name="istio-iptables", standalone_mode=False)
        if isinstance(code, int) and code != 0:
            sys.exit(code)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.ClickException as error:
        error.show()
        sys.exit(ExitCode.INVALID_INPUT)
    except click.exceptions.Abort:
        sys.exit(ExitCode.FAILURE)
    sys.exit(ExitCode.OK)
