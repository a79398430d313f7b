"""The configuration flags and their environment variables, shared by the main command and ``explain``.

Only click is imported here (see docs/speed.md): the configuration is parsed lazily.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import click
from click.core import ParameterSource

from istio_iptables.errors import ConfigError

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
    from istio_iptables.config.sidecar import RawSettings, Setting

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


def _host(ctx: click.Context) -> Any:
    """The machine's facts; tests pass a fake one as ``obj={"host": ...}``."""
    if isinstance(ctx.obj, dict) and "host" in ctx.obj:
        return ctx.obj["host"]
    from istio_iptables.system.host import RealHost

    return RealHost()


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


def show_help(ctx: click.Context, _param: click.Parameter, wanted: bool) -> None:
    """Our own --help: click's translates its texts with gettext on every run, which imports locale (~1 ms)."""
    if wanted and not ctx.resilient_parsing:
        sys.stdout.write(ctx.get_help() + "\n")  # not click.echo: a failing stdout must reach GuardedStdout
        ctx.exit()
