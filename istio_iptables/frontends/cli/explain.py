"""``istio-iptables explain``: which rule decides a flow, and where it lands.

The configuration flags are the main command's own (shared through :func:`cli.config_options`);
``--live`` reads the rules installed in a namespace instead. Reading live rules is the only side
effect, and it happens here, at the edge: :mod:`istio_iptables.explain.walk` stays pure.
"""

from __future__ import annotations

import ipaddress
import json
import sys
from typing import Any

import click
from click.core import ParameterSource

from istio_iptables.errors import ConfigError, EnvironmentProblem, IstioIptablesError
from istio_iptables.explain.walk import Flow, IPAddress, Tables, explain, render_text, to_data
from istio_iptables.frontends.cli.flags import (
    BOOL_OPTIONS,
    VALUE_OPTIONS,
    IstioCommand,
    _host,
    config_options,
    raw_settings,
    show_help,
)
from istio_iptables.net import Family, IPNetwork
from istio_iptables.system.spawn import Finished, run_program, which

DEFAULT_REMOTE = {4: "203.0.113.10", 6: "2001:db8:ffff::10"}
DEFAULT_POD = {4: "10.0.0.2", 6: "fd00::2"}
DEFAULT_SPORT = 43210
APP_ID = 1000
# Configuration flags that still mean something with --live: where to read, and who the proxy is.
LIVE_FLAGS = {"network_namespace", "force_iptables_binary", "proxy_uid", "proxy_gid"}
CONFIG_FLAGS = {name: long for name, _short, long, _env, _help in VALUE_OPTIONS + BOOL_OPTIONS}
CONFIG_FLAGS.update(resolv_conf="--resolv-conf", enable_ipv6="--enable-ipv6/--disable-ipv6")


class AddressType(click.ParamType):
    name = "address"

    def convert(self, value: Any, param: Any, ctx: Any) -> IPAddress:
        if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
            return value
        try:
            return ipaddress.ip_address(str(value).strip("[]"))
        except ValueError:
            self.fail(f"{value!r} is not an IPv4 or IPv6 address", param, ctx)


ADDRESS = AddressType()
PORT = click.IntRange(1, 65535)
ID = click.IntRange(0, 2**32 - 2)


@click.command(cls=IstioCommand, add_help_option=False, context_settings={"max_content_width": 110})
@config_options
@click.option("-h", "--help", is_flag=True, expose_value=False, is_eager=True, callback=show_help,
              help="Show this message and exit.")
@click.option(
    "--live",
    is_flag=True,
    help="Explain with the rules installed in --network-namespace (or this namespace), not a config.",
)
@click.option(
    "--origin",
    type=click.Choice(["remote", "local", "proxy"]),
    default="local",
    show_default=True,
    help="Who sends the packet: a remote host, a local process (--uid/--gid), or the proxy itself.",
)
@click.option("--protocol", type=click.Choice(["tcp", "udp"]), default="tcp", show_default=True)
@click.option("--dst", "dst", type=ADDRESS, required=True, help="Destination address.")
@click.option("--dport", type=PORT, required=True, help="Destination port.")
@click.option(
    "--src",
    "src",
    type=ADDRESS,
    default=None,
    help="Source address (default: loopback for loopback destinations, else a pod address, "
    "or 203.0.113.10 / 2001:db8:ffff::10 for remote hosts).",
)
@click.option("--sport", type=PORT, default=DEFAULT_SPORT, show_default=True, help="Source port.")
@click.option("--uid", type=ID, default=None, help="Owner of the local socket (default 1000; proxy: its uid).")
@click.option("--gid", type=ID, default=None, help="Group of the local socket (default 1000; proxy: its gid).")
@click.option("--in-interface", default="eth0", show_default=True, help="Where a remote packet comes in.")
@click.option(
    "--out-interface",
    default="eth0",
    show_default=True,
    help="Where a local packet to a non-local address leaves (lo is chosen for local addresses).",
)
@click.option(
    "--pod-ip",
    "pod_ips",
    type=ADDRESS,
    multiple=True,
    help="An address of the pod (repeatable); --live reads them from the namespace.",
)
@click.option(
    "--ct-state",
    type=click.Choice(["NEW", "ESTABLISHED", "RELATED", "INVALID"]),
    default="NEW",
    show_default=True,
    help="Conntrack state of the packet (NEW: the first packet of a connection).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the explanation as JSON.")
@click.pass_context
def explain_command(ctx: click.Context, **values: Any) -> None:
    """Explain which rule decides a flow and where it lands (redirected, passed through, dropped)."""
    dst: IPAddress = values["dst"]
    if values["live"]:
        ignored = [
            flag for name, flag in CONFIG_FLAGS.items()
            if name not in LIVE_FLAGS and ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE
        ]
        if ignored:
            click.echo(f"error: {ConfigError('--live', ' '.join(ignored), LIVE_CONFLICT)}", err=True)
            ctx.exit(ConfigError.exit_code)
    if values["enable_ipv6"] is None:
        # Istio detects IPv6 from the pod's addresses; here the flow says which family is asked about.
        values["enable_ipv6"] = dst.version == 6
    try:
        from istio_iptables.config.sidecar import parse

        raw = raw_settings(ctx, values)

        config = parse(raw, _host(ctx))
        family = Family.V4 if dst.version == 4 else Family.V6
        if values["live"]:
            tables, addresses = read_live(config.network_namespace, config.force_iptables_binary, family)
            pod_ips = tuple(values["pod_ips"]) or addresses
        else:
            tables = config_tables(config, family)
            pod_ips = tuple(values["pod_ips"])
        flow = build_flow(values, config, pod_ips)
        explanation = explain(tables, flow, group_id)
    except IstioIptablesError as error:
        click.echo(f"error: {error}", err=True)
        ctx.exit(error.exit_code)
    assumed = assumptions(ctx, values, flow, pod_ips)
    # sys.stdout, not click.echo: the executable's GuardedStdout reports a closed or full stdout.
    if values["as_json"]:
        data = {**to_data(explanation, tables), "assumptions": assumed}
        sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    else:
        note = f"Assumed: {'; '.join(assumed)}\n" if assumed else ""
        sys.stdout.write(note + render_text(explanation, tables))


LIVE_CONFLICT = (
    "--live explains the rules installed in the namespace, so these configuration flags would be ignored; "
    "drop them, or drop --live to explain a configuration (only --network-namespace, "
    "--force-iptables-binary, --proxy-uid and --proxy-gid go with --live)"
)


def assumptions(ctx: click.Context, values: dict[str, Any], flow: Flow, pod_ips: tuple[IPAddress, ...]) -> list[str]:
    """What the explanation took for granted because no flag said it (printed with the answer)."""
    assumed = []
    if values["src"] is None and flow.src == ipaddress.ip_address(DEFAULT_POD[flow.dst.version]) and not any(
        address.version == flow.dst.version for address in pod_ips
    ):
        assumed.append(f"the pod's address is {flow.src} (no --pod-ip or --src given)")
    if flow.origin == "remote" and ctx.get_parameter_source("in_interface") is ParameterSource.DEFAULT:
        assumed.append(f"the packet comes in on {flow.in_interface} (--in-interface)")
    leaves = not flow.dst.is_loopback and flow.dst not in pod_ips  # else lo, not --out-interface
    if flow.origin != "remote" and leaves and ctx.get_parameter_source("out_interface") is ParameterSource.DEFAULT:
        assumed.append(f"a packet to a non-local address leaves via {flow.out_interface} (--out-interface)")
    return assumed


def config_tables(config: Any, family: Family) -> Tables | None:
    if config.native_nftables:
        from istio_iptables.explain.from_nft import read_model, to_tables
        from istio_iptables.policy.sidecar_nft import build_nft_ruleset

        read = read_model(build_nft_ruleset(config))
        return to_tables(read, family, f"configuration (native nftables, IPv{family.value} view)")[0]
    from istio_iptables.policy.sidecar_xtables import build_plan

    ruleset = build_plan(config).ruleset(family)
    if ruleset is None:
        return Tables(family, {}, source=f"configuration (no IPv{family.value} rules: IPv6 is off)")
    return Tables.from_ruleset(ruleset, source=f"configuration (IPv{family.value} rules)")


def default_source(remote: bool, dst: IPAddress, same_family: list[IPAddress]) -> IPAddress:
    """The source a flow gets when --src is not given: a remote host's, or the pod's own (the
    destination itself for a pod address, loopback for loopback, else the first pod address)."""
    if remote:
        return ipaddress.ip_address(DEFAULT_REMOTE[dst.version])
    if dst.is_loopback or dst in same_family:
        return dst if dst in same_family else Family(dst.version).loopback.network_address
    return same_family[0] if same_family else ipaddress.ip_address(DEFAULT_POD[dst.version])


def build_flow(values: dict[str, Any], config: Any, pod_ips: tuple[IPAddress, ...]) -> Flow:
    dst: IPAddress = values["dst"]
    origin = values["origin"]
    same_family = [address for address in pod_ips if address.version == dst.version]
    src = values["src"]
    uid, gid = values["uid"], values["gid"]
    if origin == "proxy":
        uid = int(config.proxy_uids[0]) if uid is None else uid
        gid = int(config.proxy_gids[0]) if gid is None else gid
    elif origin == "local":
        uid = APP_ID if uid is None else uid
        gid = APP_ID if gid is None else gid
    if src is None:
        src = default_source(origin == "remote", dst, same_family)
    if src.version != dst.version:
        raise click.BadParameter("source and destination must be of one family", param_hint="--src")
    return Flow(
        origin=origin,
        protocol=values["protocol"],
        src=src,
        dst=dst,
        sport=values["sport"],
        dport=values["dport"],
        uid=None if origin == "remote" else uid,
        gid=None if origin == "remote" else gid,
        in_interface=values["in_interface"],
        out_interface=values["out_interface"],
        local_addresses=tuple(pod_ips) or None,
        ct_state=values["ct_state"],
    )


def group_id(name: str) -> int | None:
    import grp

    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def read_live(namespace: str, force_binary: str, family: Family) -> tuple[Tables, tuple[IPAddress, ...]]:
    """The rules, ipsets and addresses installed in ``namespace`` ("" for this one); root for another one.

    The backend is chosen as the apply engine chooses it (rules in exactly one of legacy and nft).
    """
    from istio_iptables.system.host import RealHost
    from istio_iptables.system.netns import entered
    from istio_iptables.system.xtables_backend import detect
    from istio_iptables.xtables.save import SaveFormatError, read_save_model

    with entered(namespace):
        native = _native_nftables(family, namespace)
        if native is not None:
            return native, tuple(RealHost().addresses())
        detection = detect(force_binary, [family])
        try:
            saved = read_save_model(detection.saves[family], family)
        except SaveFormatError as error:
            raise EnvironmentProblem(f"cannot read iptables-save output: {error}") from None
        uses_sets = any("--match-set" in item.text for rules in saved.chains.values() for item in rules)
        sets = _ipsets() if uses_sets else None
        addresses = tuple(RealHost().addresses())
    where = f"namespace {namespace}" if namespace else "this namespace"
    program = detection.backend.program(family, "save")
    return Tables.from_saved(saved, f"installed rules ({program} in {where})", sets), addresses


def _run_if_installed(*command: str) -> Finished | None:
    if which(command[0]) is None:
        return None
    try:
        return run_program(command, timeout=30)
    except OSError as error:  # spawn's TimeoutError is one
        raise EnvironmentProblem(f"cannot run {command[0]}: {error}") from None


def _native_nftables(family: Family, namespace: str) -> Tables | None:
    """Our nft tables (``--native-nftables``), if the namespace holds any; None: use iptables."""
    from istio_iptables.explain.from_nft import explained, listed_texts, to_tables
    from istio_iptables.nft.listing import NftJsonError, read_listing

    done = _run_if_installed("nft", "-j", "list", "ruleset")
    if done is None or done.returncode != 0:
        return None  # no nft, or no nf_tables: only iptables-legacy can hold rules
    try:
        read = read_listing(done.stdout)
    except NftJsonError as error:
        raise EnvironmentProblem(f"cannot read 'nft -j list ruleset': {error}") from None
    if not any(explained(table) for table in read):
        return None
    # The rules as nft prints them, for the user; a rule added in between falls back to our spelling.
    listed = _run_if_installed("nft", "-a", "list", "ruleset")
    texts = listed_texts(listed.stdout) if listed is not None and listed.returncode == 0 else {}
    where = f"namespace {namespace}" if namespace else "this namespace"
    return to_tables(read, family, f"installed rules (native nftables in {where})", True, texts)[0]


def _ipsets() -> dict[str, tuple[IPNetwork, ...] | tuple[int, ...]] | None:
    """Members of every ipset (``ipset save``: CIDRs, or ports of bitmap:port sets); None when ipset cannot tell."""
    done = _run_if_installed("ipset", "save")
    if done is None or done.returncode != 0:
        return None
    members: dict[str, list[IPNetwork]] = {}
    for line in done.stdout.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "create":
            members.setdefault(words[1], [])
        elif len(words) >= 3 and words[0] == "add" and words[2].isdigit():
            members.setdefault(words[1], []).append(int(words[2]))  # type: ignore[arg-type]  # a port set
        elif len(words) >= 3 and words[0] == "add":
            try:
                members.setdefault(words[1], []).append(ipaddress.ip_network(words[2], strict=False))
            except ValueError:
                continue  # not an address set: its members stay unknown to the evaluator
    return {name: tuple(networks) for name, networks in members.items()}


def main() -> None:  # pragma: no cover - the console entry is cli.main
    explain_command.main(args=sys.argv[1:], prog_name="istio-iptables explain")
