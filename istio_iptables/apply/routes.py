"""TPROXY policy routing and the IPv6 passthrough address, through pyroute2 (imported only here).

``ip rule add fwmark MARK lookup TABLE`` and ``ip route add local default dev lo table TABLE``
per family make marked packets local so TPROXY sockets receive them; ``::6/128`` on lo is the
source Envoy's inbound passthrough binds in IPv6 (lo only holds ::1/128). Adding what exists
already is success, so a rerun is a no-op (Istio fails on the duplicate rule).
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from istio_iptables.errors import ApplyError
from istio_iptables.model import Family, TproxyRoutes

PASSTHROUGH_V6 = "::6"
_ADDRESS_FAMILY = {Family.V4: socket.AF_INET, Family.V6: socket.AF_INET6}
_DEFAULT = {Family.V4: "0.0.0.0/0", Family.V6: "::/0"}
_RTN_LOCAL = 2
_RT_SCOPE_HOST = 254  # what `ip route add local` sets; the kernel refuses a v4 local route without it


@contextmanager
def _netlink() -> Iterator[Any]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        yield ipr


def _loopback(ipr: Any) -> int:
    found = ipr.link_lookup(ifname="lo")
    if not found:
        raise ApplyError("this network namespace has no 'lo' interface")
    return found[0]


def _tolerate(code: int, action: str, call: Any, *args: Any, **kwargs: Any) -> None:
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        call(*args, **kwargs)
    except NetlinkError as error:
        if error.code != code:
            hint = " (is lo up?)" if error.code == errno.EINVAL else ""
            raise ApplyError(f"{action} failed: {error.args[1] if len(error.args) > 1 else error}{hint}") from None


def ensure(routes: TproxyRoutes | None, passthrough_v6: bool) -> None:
    with _netlink() as ipr:
        lo = _loopback(ipr)
        if passthrough_v6:
            _passthrough_address(ipr, "add", lo)
        if routes is None:
            return
        for family in routes.families:
            af = _ADDRESS_FAMILY[family]
            if not _has_rule(ipr, af, routes.mark, routes.table):
                _tolerate(
                    errno.EEXIST,
                    f"ip rule add fwmark {routes.mark} lookup {routes.table}",
                    ipr.rule,
                    "add",
                    family=af,
                    fwmark=routes.mark,
                    table=routes.table,
                )
            _local_default_route(ipr, "add", family, lo, routes.table)


def _passthrough_address(ipr: Any, command: str, lo: int) -> None:
    """``ip -6 addr add|del ::6/128 dev lo``; already there / already gone is fine."""
    _tolerate(
        errno.EEXIST if command == "add" else errno.EADDRNOTAVAIL,
        f"ip -6 addr {command} {PASSTHROUGH_V6}/128 dev lo",
        ipr.addr,
        command,
        index=lo,
        address=PASSTHROUGH_V6,
        prefixlen=128,
    )


def _local_default_route(ipr: Any, command: str, family: Family, lo: int, table: int) -> None:
    """``ip route add|del local default dev lo table TABLE``; already there / already gone is fine."""
    _tolerate(
        errno.EEXIST if command == "add" else errno.ESRCH,
        f"ip route {command} local {_DEFAULT[family]} dev lo table {table}",
        ipr.route,
        command,
        family=_ADDRESS_FAMILY[family],
        dst=_DEFAULT[family],
        type="local",
        scope=_RT_SCOPE_HOST,
        oif=lo,
        table=table,
    )


def _rules(ipr: Any, af: int, mark: int) -> list[Any]:
    return [rule for rule in ipr.get_rules(family=af) if rule.get_attr("FRA_FWMARK") == mark]


def _has_rule(ipr: Any, af: int, mark: int, table: int) -> bool:
    return any(_table_of(rule) == table for rule in _rules(ipr, af, mark))


def _table_of(message: Any) -> int:
    return message.get_attr("FRA_TABLE") or message.get_attr("RTA_TABLE") or message["table"]


def remove(mark: int | None, passthrough_v6: bool) -> None:
    """Undo :func:`ensure` for the mark found in the live rules (every table its rules point to)."""
    from pyroute2.netlink.exceptions import NetlinkError

    with _netlink() as ipr:
        lo = _loopback(ipr)
        if passthrough_v6:
            _passthrough_address(ipr, "del", lo)
        if mark is None:
            return
        for family, af in _ADDRESS_FAMILY.items():
            for rule in _rules(ipr, af, mark):
                table = _table_of(rule)
                try:
                    ipr.rule("del", family=af, fwmark=mark, table=table, priority=rule.get_attr("FRA_PRIORITY"))
                except NetlinkError as error:
                    if error.code != errno.ENOENT:
                        raise ApplyError(f"ip rule del fwmark {mark} lookup {table} failed: {error}") from None
                for route in ipr.get_routes(family=af, table=table):
                    if route["type"] == _RTN_LOCAL and route["dst_len"] == 0 and route.get_attr("RTA_OIF") == lo:
                        _local_default_route(ipr, "del", family, lo, table)
