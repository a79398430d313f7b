"""``istio-iptables ambient``: Istio's ambient-mode rules (the node agent's in-pod redirection to
ztunnel, and with ``--host`` the node's kubelet-probe SNAT), as a node agent would ask for them.

Dispatched by :func:`istio_iptables.frontends.cli.main.main` before the Istio flag surface, as ``explain`` is.
Boolean flags parse as pflag's (``--flag``, ``--flag=false``); every flag is also read from Istio's
environment variable for the setting (see :mod:`istio_iptables.config.ambient`).

A run goes through the engine as the sidecar's does (:func:`istio_iptables.engine.actions.execute`)
with ambient's footprint (``AMBIENT_POD``, or ``AMBIENT_HOST`` with ``--host``), which names its
policy: the same detection, lock, no-op re-run, drift (exit 3), ``--reconcile``, rollback and
``--cleanup-only``. ``--dry-run`` prints the rules and reads nothing.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from istio_iptables._lib.log import configure_logging, log
from istio_iptables.config.ambient import AMBIENT_SETTINGS, IPV6_VARIABLE
from istio_iptables.errors import IstioIptablesError
from istio_iptables.frontends.cli.flags import show_help

BOOLEAN_FLAGS = {setting.flag for setting in AMBIENT_SETTINGS if setting.kind == "bool"}


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


@click.command(cls=AmbientCommand, add_help_option=False, context_settings={"max_content_width": 110})
@click.option("-h", "--help", is_flag=True, expose_value=False, is_eager=True, callback=show_help,
              help="Show this message and exit.")
@click.option("--enable-ipv6/--disable-ipv6", "enable_ipv6", default=None,
              help=f"Write IPv6 rules or not (default: ${IPV6_VARIABLE}, else off, as Istio's node agent).")
@_options
@click.option("--log_output_level", "log_output_level", default=None, help="Istio logging: default:info etc.")
@click.pass_context
def ambient_command(ctx: click.Context, **values: Any) -> None:
    """Istio ambient mode's rules for one pod (or, with --host, the node), as iptables or native nft.

    A re-run writes nothing; other flags exit 3 with a diff unless --reconcile; --cleanup-only
    removes exactly ours. Sidecar and ambient rules never share a namespace (exit 3).

    \b
    istio-iptables ambient --redirect-dns --network-namespace POD_NS
    istio-iptables ambient --cleanup-only --network-namespace POD_NS
    istio-iptables ambient --host --enable-ipv6 --enrol 10.0.0.7 --pod-uid UID
    istio-iptables ambient --dry-run --native-nftables --host --kubelet-uid 0
    """
    try:
        configure_logging(values["log_output_level"] or "default:info", False)
        config = parse_values(ctx, values)
        if config.dry_run and not config.cleanup_only:
            sys.stdout.write(dry_run_text(config))
        else:
            run(config)
    except IstioIptablesError as error:
        log.error("%s", error)
        ctx.exit(error.exit_code)


def run(config: Any) -> None:
    """Apply, clean up (``--cleanup-only``) or preview the cleanup, through the engine."""
    from istio_iptables.engine.actions import choose_action, execute
    from istio_iptables.policy.footprint import AMBIENT_HOST, AMBIENT_POD

    action = choose_action(dry_run=config.dry_run, cleanup_only=config.cleanup_only)
    footprint = AMBIENT_HOST if config.scope == "host" else AMBIENT_POD
    execute(action, lambda: config, sys.stdout, namespace=config.network_namespace, footprint=footprint)


def parse_values(ctx: click.Context, values: dict[str, Any]) -> Any:
    from click.core import ParameterSource

    from istio_iptables.config.ambient import AmbientRawSettings, parse_ambient
    from istio_iptables.config.sidecar import Setting

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
    from istio_iptables.policy.ambient_xtables import build_plan, probe_ipset_document, routing_commands

    routes = build_plan(config).routes
    routing = ""
    if routes is not None:
        routing = "# policy routing (in-pod mode): replies of connections ztunnel accepted (connmark 0x111) go via lo\n"
        routing += "".join(f"#   {command}\n" for command in routing_commands(routes))
    if config.native_nftables:
        from istio_iptables.policy.ambient_nft import render_ambient_script

        return routing + render_ambient_script(config)
    from istio_iptables.policy.ambient_xtables import rulesets
    from istio_iptables.xtables.render import render_documents

    sets = "# ipset restore\n" + probe_ipset_document(config) if config.scope == "host" else ""
    return routing + sets + render_documents(rulesets(config))


# --- istio-iptables explain ambient ---------------------------------------------------------------

ORIGINS = {"remote": "remote", "app": "local", "ztunnel": "proxy", "node": "local"}
ZTUNNEL_UID = 1337
APP_UID = 1000


def _address(_ctx: click.Context, _param: click.Parameter, value: Any) -> Any:
    import ipaddress

    def one(text: str) -> Any:
        try:
            return ipaddress.ip_address(text.strip("[]"))
        except ValueError:
            raise click.BadParameter(f"{text!r} is not an IPv4 or IPv6 address") from None

    if value is None:
        return None
    return tuple(one(item) for item in value) if isinstance(value, tuple) else one(value)


def _mark(_ctx: click.Context, _param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        mark = int(value, 0)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a number (decimal or 0x hex)") from None
    if not 0 <= mark < 2**32:
        raise click.BadParameter(f"{value!r} is not a 32-bit mark")
    return mark


@click.command(cls=AmbientCommand, add_help_option=False, context_settings={"max_content_width": 110})
@click.option("-h", "--help", is_flag=True, expose_value=False, is_eager=True, callback=show_help,
              help="Show this message and exit.")
@click.option("--enable-ipv6/--disable-ipv6", "enable_ipv6", default=None,
              help="IPv6 rules or not (default: the family of --dst).")
@_options
@click.option("--live", is_flag=True,
              help="Explain the rules installed in --network-namespace (or this namespace), not a configuration.")
@click.option("--origin", type=click.Choice(sorted(ORIGINS)), default="app", show_default=True,
              help="Who sends: a remote host, the app, ztunnel (its sockets carry mark 0x539), or the node "
              "(kubelet, with --host).")
@click.option("--protocol", type=click.Choice(["tcp", "udp"]), default="tcp", show_default=True)
@click.option("--dst", required=True, callback=_address, help="Destination address.")
@click.option("--dport", type=click.IntRange(1, 65535), required=True, help="Destination port.")
@click.option("--src", default=None, callback=_address, help="Source address (default: as plain explain).")
@click.option("--sport", type=click.IntRange(1, 65535), default=43210, show_default=True)
@click.option("--uid", type=click.IntRange(0, 2**32 - 2), default=None,
              help="Owner of the local socket (default: app 1000, ztunnel 1337, node 0).")
@click.option("--mark", "mark", default=None, callback=_mark,
              help="The socket's mark (SO_MARK; default 0x539 for ztunnel, else 0).")
@click.option("--ctmark", default=None, callback=_mark, help="The connection's mark (with --ct-state ESTABLISHED).")
@click.option("--ct-state", type=click.Choice(["NEW", "ESTABLISHED", "RELATED", "INVALID"]), default="NEW",
              show_default=True)
@click.option("--in-interface", default="eth0", show_default=True)
@click.option("--out-interface", default="eth0", show_default=True)
@click.option("--pod-ip", "pod_ips", multiple=True, callback=_address, help="An address of the pod (repeatable).")
@click.option("--enrolled", "enrolled", multiple=True, callback=_address,
              help="With --host: a pod address in the probe sets (repeatable; default: --dst).")
@click.option("--json", "as_json", is_flag=True, help="Print the explanation as JSON.")
@click.pass_context
def explain_ambient_command(ctx: click.Context, **values: Any) -> None:
    """Explain where a flow lands under ambient mode's rules (a configuration, or --live)."""
    import json

    from istio_iptables.explain.walk import explain, render_text, to_data
    from istio_iptables.net import Family

    dst = values["dst"]
    family = Family.V4 if dst.version == 4 else Family.V6
    if values["enable_ipv6"] is None:
        values["enable_ipv6"] = dst.version == 6
    values.setdefault("log_output_level", None)
    try:
        configure_logging("default:info", False)
        values["dry_run"] = values["dry_run"] or "true"  # explaining writes nothing
        config = parse_values(ctx, values)
        if values["live"]:
            from istio_iptables.frontends.cli.explain import read_live

            tables, addresses = read_live(config.network_namespace, config.force_iptables_binary, family)
            pod_ips = values["pod_ips"] or addresses
        else:
            tables = ambient_tables(config, family, values["enrolled"] or (dst,))
            pod_ips = values["pod_ips"]
        flow = ambient_flow(values, pod_ips)
        explanation = explain(tables, flow)
    except IstioIptablesError as error:
        log.error("%s", error)
        ctx.exit(error.exit_code)
    if values["as_json"]:
        sys.stdout.write(json.dumps(to_data(explanation, tables), indent=2, ensure_ascii=False) + "\n")
    else:
        sys.stdout.write(render_text(explanation, tables))


def ambient_tables(config: Any, family: Any, enrolled: tuple[Any, ...]) -> Any:
    """Explain's view of a configuration's ambient rules; the probe sets hold ``enrolled``."""
    import ipaddress

    from istio_iptables.config.ambient import PROBE_SET_V4, PROBE_SET_V6
    from istio_iptables.explain.walk import Tables

    members = {
        name: tuple(ipaddress.ip_network(address) for address in enrolled if address.version == version)
        for name, version in ((PROBE_SET_V4, 4), (PROBE_SET_V6, 6))
    }
    if config.native_nftables:
        from istio_iptables.explain.from_nft import read_model, set_key, to_tables
        from istio_iptables.nft.names import AMBIENT_NAT
        from istio_iptables.policy.ambient_nft import ruleset

        tables = to_tables(read_model(ruleset(config)), family, f"ambient configuration (native nftables, "
                           f"IPv{family.value} view)")[0]
        keyed = {set_key(AMBIENT_NAT, name, 32 if name == PROBE_SET_V4 else 128): value
                 for name, value in members.items()}
        tables.sets = {**(tables.sets or {}), **keyed}
        tables.problems = [problem for problem in tables.problems if "could not be read" not in problem]
        return tables
    from istio_iptables.policy.ambient_xtables import rulesets

    ruleset = next((rs for rs in rulesets(config) if rs.family is family), None)
    if ruleset is None:
        return Tables(family, {}, source=f"ambient configuration (no IPv{family.value} rules: IPv6 is off)")
    tables = Tables.from_ruleset(ruleset, source=f"ambient configuration (IPv{family.value} rules)")
    tables.sets = members
    return tables


def ambient_flow(values: dict[str, Any], pod_ips: tuple[Any, ...]) -> Any:
    import ipaddress

    from istio_iptables.config.ambient import INPOD_MARK
    from istio_iptables.explain.walk import Flow
    from istio_iptables.frontends.cli.explain import default_source

    dst, origin = values["dst"], values["origin"]
    default_uid = {"app": APP_UID, "ztunnel": ZTUNNEL_UID, "node": 0}.get(origin)
    uid = values["uid"] if values["uid"] is not None else default_uid
    mark = values["mark"] if values["mark"] is not None else (INPOD_MARK if origin == "ztunnel" else 0)
    same_family = [address for address in pod_ips if address.version == dst.version]
    src = values["src"]
    if src is None and origin == "node":
        src = ipaddress.ip_address("10.0.0.1" if dst.version == 4 else "fd00::1")
    elif src is None:
        src = default_source(origin == "remote", dst, same_family)
    if src.version != dst.version:
        raise click.BadParameter("source and destination must be of one family", param_hint="--src")
    return Flow(
        origin=ORIGINS[origin],  # type: ignore[arg-type]
        protocol=values["protocol"],
        src=src,
        dst=dst,
        sport=values["sport"],
        dport=values["dport"],
        uid=None if origin == "remote" else uid,
        gid=None if origin == "remote" else uid,
        in_interface=values["in_interface"],
        out_interface=values["out_interface"],
        local_addresses=tuple(pod_ips) or None,
        ct_state=values["ct_state"],
        mark=0 if origin == "remote" else mark,
        ctmark=values["ctmark"] or 0,
    )
