"""``istio-iptables explain``: which rule decides a flow, and where it lands.

The configuration flags are the main command's own (shared through :func:`cli.config_options`);
``--live`` reads the rules installed in a namespace instead. Reading live rules is the only side
effect, and it happens here, at the edge: :mod:`istio_iptables.explain` stays pure.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
import sys
from typing import Any

import click

from istio_iptables.cli import _host, config_options, raw_settings
from istio_iptables.errors import EnvironmentProblem, IstioIptablesError
from istio_iptables.explain import Flow, IPAddress, Tables, explain, render_text, to_data
from istio_iptables.model import Family, IPNetwork

DEFAULT_REMOTE = {4: "203.0.113.10", 6: "2001:db8:ffff::10"}
DEFAULT_POD = {4: "10.0.0.2", 6: "fd00::2"}
DEFAULT_SPORT = 43210
APP_ID = 1000


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


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@config_options
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
    if values["enable_ipv6"] is None:
        # Istio detects IPv6 from the pod's addresses; here the flow says which family is asked about.
        values["enable_ipv6"] = dst.version == 6
    raw = raw_settings(ctx, values)
    try:
        from istio_iptables.config import parse

        config = parse(raw, _host(ctx))
        family = Family.V4 if dst.version == 4 else Family.V6
        if values["live"]:
            reader = LiveReader(config.network_namespace, config.force_iptables_binary)
            tables = reader.tables(family)
            pod_ips = tuple(values["pod_ips"]) or reader.addresses()
        else:
            tables = config_tables(config, family)
            pod_ips = tuple(values["pod_ips"])
        flow = build_flow(values, config, pod_ips)
        explanation = explain(tables, flow, group_id)
    except IstioIptablesError as error:
        click.echo(f"error: {error}", err=True)
        ctx.exit(error.exit_code)
    if values["as_json"]:
        click.echo(json.dumps(to_data(explanation, tables), indent=2, ensure_ascii=False))
    else:
        click.echo(render_text(explanation, tables), nl=False)


def config_tables(config: Any, family: Family) -> Tables | None:
    from istio_iptables.capture import build_plan

    ruleset = build_plan(config).ruleset(family)
    if ruleset is None:
        return Tables(family, {}, source=f"configuration (no IPv{family.value} rules: IPv6 is off)")
    return Tables.from_ruleset(ruleset, source=f"configuration (IPv{family.value} rules)")


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
        if origin == "remote":
            src = ipaddress.ip_address(DEFAULT_REMOTE[dst.version])
        elif dst.is_loopback or dst in same_family:
            src = dst if dst in same_family else ipaddress.ip_address("127.0.0.1" if dst.version == 4 else "::1")
        else:
            src = same_family[0] if same_family else ipaddress.ip_address(DEFAULT_POD[dst.version])
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


class LiveReader:
    """Reads the rules, sets and addresses installed in a network namespace (needs root for another one)."""

    def __init__(self, namespace: str = "", force_binary: str = "") -> None:
        self.namespace = namespace
        self.force_binary = force_binary

    def _prefix(self) -> list[str]:
        if not self.namespace:
            return []
        if "/" in self.namespace:
            return ["nsenter", f"--net={self.namespace}", "--"]
        return ["ip", "netns", "exec", self.namespace]

    def _run(self, *command: str) -> subprocess.CompletedProcess[str] | None:
        if shutil.which(command[0]) is None:
            return None
        try:
            return subprocess.run([*self._prefix(), *command], capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise EnvironmentProblem(f"cannot run {command[0]}: {error}") from None

    def save_text(self, family: Family) -> tuple[str, str]:
        """(backend, iptables-save output) of the backend holding rules; nft wins a tie (Istio's order)."""
        stem = "iptables" if family is Family.V4 else "ip6tables"
        backends = [self.force_binary] if self.force_binary else ["nft", "legacy"]
        dumps: list[tuple[str, str]] = []
        errors = []
        for backend in backends:
            done = self._run(f"{stem}-{backend}-save")
            if done is None:
                continue
            if done.returncode != 0:
                errors.append(done.stderr.strip())
                continue
            dumps.append((backend, done.stdout))
        if not dumps:
            raise EnvironmentProblem(f"cannot read the {stem} rules: {'; '.join(errors) or 'no save binary'}")
        with_rules = [dump for dump in dumps if "\n-A " in dump[1]]
        return (with_rules or dumps)[0]

    def tables(self, family: Family) -> Tables:
        from istio_iptables.parse import SaveFormatError, parse_save

        backend, text = self.save_text(family)
        try:
            saved = parse_save(text, family)
        except SaveFormatError as error:
            raise EnvironmentProblem(f"cannot read iptables-save output: {error}") from None
        where = f"namespace {self.namespace}" if self.namespace else "this namespace"
        stem = "iptables" if family is Family.V4 else "ip6tables"
        if not any(saved.chains.values()):
            self._refuse_native_nftables()
        uses_sets = any("--match-set" in item.text for rules in saved.chains.values() for item in rules)
        return Tables.from_saved(
            saved, f"installed rules ({stem}-{backend}-save in {where})", self.ipsets() if uses_sets else None
        )

    def _refuse_native_nftables(self) -> None:
        done = self._run("nft", "-j", "list", "tables")
        if done is not None and done.returncode == 0 and "istio" in done.stdout:
            raise EnvironmentProblem("the namespace uses native nftables rules; explain cannot read them yet")

    def ipsets(self) -> dict[str, tuple[IPNetwork, ...]] | None:
        done = self._run("ipset", "save")
        if done is None or done.returncode != 0:
            return None
        members: dict[str, list[IPNetwork]] = {}
        for line in done.stdout.splitlines():
            words = line.split()
            if len(words) >= 2 and words[0] == "create":
                members.setdefault(words[1], [])
            elif len(words) >= 3 and words[0] == "add":
                try:
                    members.setdefault(words[1], []).append(ipaddress.ip_network(words[2], strict=False))
                except ValueError:
                    continue  # not an address set: its members stay unknown to the evaluator
        return {name: tuple(networks) for name, networks in members.items()}

    def addresses(self) -> tuple[IPAddress, ...]:
        done = self._run("ip", "-j", "addr", "show")
        if done is None or done.returncode != 0:
            return ()
        found = []
        for link in json.loads(done.stdout or "[]"):
            for info in link.get("addr_info", []):
                if "local" in info:
                    found.append(ipaddress.ip_address(info["local"].split("%")[0]))
        return tuple(found)


def main() -> None:  # pragma: no cover - the console entry is cli.main
    explain_command.main(args=sys.argv[1:], prog_name="istio-iptables explain")
