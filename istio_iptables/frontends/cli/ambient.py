"""``istio-iptables ambient``: Istio's ambient-mode rules (the node agent's in-pod redirection to
ztunnel, and with ``--host`` the node's kubelet-probe SNAT), as a node agent would ask for them.

Dispatched by :func:`istio_iptables.cli.main` before the Istio flag surface, as ``explain`` is.
Boolean flags parse as pflag's (``--flag``, ``--flag=false``); every flag is also read from Istio's
environment variable for the setting (see :mod:`istio_iptables.policy.ambient_config`).

Only ``--dry-run`` is built: applying, cleanup and reconcile come with the engine refactor
(issue 13), so a real run exits 2 and says so, having touched nothing.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from istio_iptables.errors import ExitCode, IstioIptablesError
from istio_iptables.logging_setup import configure_logging, log
from istio_iptables.policy.ambient_config import AMBIENT_SETTINGS, IPV6_VARIABLE

BOOLEAN_FLAGS = {setting.flag for setting in AMBIENT_SETTINGS if setting.kind == "bool"}
# Run-mode flags of the sidecar command that ambient accepts with the same meaning.
NOT_YET = "not yet: applying ambient rules comes with the engine refactor (issue 13); use --dry-run"


class NotYet(IstioIptablesError):
    """A run this front end cannot do yet; nothing was read or written."""

    exit_code = ExitCode.INVALID_INPUT


def pflag_booleans(args: list[str]) -> list[str]:
    """``--flag`` becomes ``--flag=true`` so click never takes the next word as a boolean's value."""
    spelled: list[str] = []
    for index, arg in enumerate(args):
        if arg == "--":
            spelled.extend(args[index:])
            break
        spelled.append(f"{arg}=true" if arg in BOOLEAN_FLAGS else arg)
    return spelled


class AmbientCommand(click.Command):
    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, pflag_booleans(args))


def _options(command: Any) -> Any:
    for setting in reversed(AMBIENT_SETTINGS):
        envvar = setting.istio if setting.envvar else None
        metavar = "[=BOOL]" if setting.kind == "bool" else None
        help_text = f"{setting.help} [Istio: {setting.istio}]"
        command = click.option(setting.flag, setting.name, default=None, envvar=envvar, show_envvar=bool(envvar),
                               metavar=metavar, help=help_text)(command)
    return command


def _show_help(ctx: click.Context, _param: click.Parameter, wanted: bool) -> None:
    # Our own --help: click's translates its texts with gettext on every run, which imports locale (~1 ms).
    if wanted and not ctx.resilient_parsing:
        sys.stdout.write(ctx.get_help() + "\n")
        ctx.exit()


@click.command(cls=AmbientCommand, add_help_option=False, context_settings={"max_content_width": 110})
@click.option("-h", "--help", is_flag=True, expose_value=False, is_eager=True, callback=_show_help,
              help="Show this message and exit.")
@click.option("--enable-ipv6/--disable-ipv6", "enable_ipv6", default=None,
              help=f"Write IPv6 rules or not (default: ${IPV6_VARIABLE}, else off, as Istio's node agent).")
@_options
@click.option("--log_output_level", "log_output_level", default=None, help="Istio logging: default:info etc.")
@click.pass_context
def ambient_command(ctx: click.Context, **values: Any) -> None:
    """Istio ambient mode's rules for one pod (or, with --host, the node), as iptables or native nft.

    \b
    istio-iptables ambient --dry-run --redirect-dns --network-namespace POD_NS
    istio-iptables ambient --dry-run --host --enable-ipv6
    istio-iptables ambient --dry-run --native-nftables --host --kubelet-uid 0
    """
    try:
        configure_logging(values["log_output_level"] or "default:info", False)
        config = parse_values(ctx, values)
        if config.cleanup_only or config.reconcile:
            flag = "--cleanup-only" if config.cleanup_only else "--reconcile"
            raise NotYet(f"ambient {flag}: {NOT_YET.partition('; ')[0]}")
        if not config.dry_run:
            raise NotYet(f"ambient without --dry-run: {NOT_YET}")
        sys.stdout.write(dry_run_text(config))
    except IstioIptablesError as error:
        log.error("%s", error)
        ctx.exit(error.exit_code)


def parse_values(ctx: click.Context, values: dict[str, Any]) -> Any:
    from click.core import ParameterSource

    from istio_iptables.config import Setting
    from istio_iptables.policy.ambient_config import AmbientRawSettings, parse_ambient

    settings: dict[str, Setting] = {}
    for setting in AMBIENT_SETTINGS:
        value = values[setting.name]
        if value is None:
            continue
        from_env = ctx.get_parameter_source(setting.name) is ParameterSource.ENVIRONMENT
        settings[setting.name] = Setting(value, setting.istio if from_env else setting.flag)
    enable_ipv6 = None
    if values["enable_ipv6"] is not None:
        enable_ipv6 = Setting("true" if values["enable_ipv6"] else "false", "--enable-ipv6/--disable-ipv6")
    elif IPV6_VARIABLE in os.environ:
        enable_ipv6 = Setting(os.environ[IPV6_VARIABLE], IPV6_VARIABLE)
    return parse_ambient(AmbientRawSettings(values=settings, enable_ipv6=enable_ipv6))


def dry_run_text(config: Any) -> str:
    """What a dry run prints: policy routing and probe sets first (as apply would order them), then the rules."""
    from istio_iptables.policy.ambient_footprint import probe_ipset_document, routing_comment_lines

    routing = "".join(f"{line}\n" for line in routing_comment_lines(config))
    if config.native_nftables:
        from istio_iptables.policy.ambient_nft import render_ambient_script

        return routing + render_ambient_script(config)
    from istio_iptables.policy.ambient_xtables import rulesets
    from istio_iptables.render import render_documents

    sets = probe_ipset_document(config) if config.scope == "host" else ""
    return routing + sets + render_documents(rulesets(config))
