"""TPROXY policy routing and the IPv6 passthrough address, through pyroute2 (imported only here).

``ip rule add fwmark MARK lookup TABLE`` and ``ip route add local default dev lo table TABLE``
per family make marked packets local so TPROXY sockets receive them; ``::6/128`` on lo is the
source Envoy's inbound passthrough binds in IPv6 (lo only holds ::1/128). Adding what exists
already is success, so a rerun is a no-op (Istio fails on the duplicate rule).

What is ours: a policy rule is ours only when its fwmark, its mask *and* its table are ours (a
foreign ``fwmark 1337 lookup 200`` is not), and a route only when it is exactly ``local default dev
lo`` in that table. The sidecar's rule gets its priority from the kernel, as ``ip rule add`` (and
Istio) do; ambient's in-pod rule has Istio's fixed one (``fwmark 0x111/0xfff pref 32764 lookup 100``).
A rule is named by :data:`RuleKey` (mark, table, mask).
Every write is recorded in :class:`Added`, so a failed run takes back exactly what it added.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from istio_iptables.errors import ApplyError, EnvironmentProblem
from istio_iptables.net import Family
from istio_iptables.xtables.model import FULL_MASK, TproxyRoutes

RuleKey = tuple[int, int, int]  # (fwmark, table, mask) of an ``ip rule fwmark MARK/MASK lookup TABLE``

PASSTHROUGH_V6 = "::6"
_ADDRESS_FAMILY = {Family.V4: socket.AF_INET, Family.V6: socket.AF_INET6}
_DEFAULT = {Family.V4: "0.0.0.0/0", Family.V6: "::/0"}
_RTN_LOCAL = 2
_RT_SCOPE_HOST = 254  # what `ip route add local` sets; the kernel refuses a v4 local route without it
_SIOCGIFFLAGS = 0x8913
_IFF_UP = 0x1
_FR_ACT_TO_TBL = 1


class Added:
    """What one :func:`ensure` wrote (not what was there already): the undo list of a failed run."""

    def __init__(self) -> None:
        self.passthrough_v6 = False
        self.rules: list[tuple[Family, RuleKey]] = []
        self.routes: list[tuple[Family, int]] = []  # (family, table)

    def __bool__(self) -> bool:
        return bool(self.passthrough_v6 or self.rules or self.routes)


def check_loopback_up() -> None:
    """TPROXY delivers through lo: a down lo would fail half way (IPv6 route: "Network is down").

    One ioctl on a throwaway socket of this namespace; no pyroute2, so it costs nothing before writing.
    """
    import fcntl

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            answer = fcntl.ioctl(probe.fileno(), _SIOCGIFFLAGS, struct.pack("16sH14x", b"lo", 0))
        except OSError:
            raise EnvironmentProblem("this network namespace has no 'lo' interface; nothing was written") from None
    flags = struct.unpack("16sH14x", answer)[1]
    if not flags & _IFF_UP:
        raise EnvironmentProblem(
            "lo is down in this network namespace: TPROXY needs it up (ip link set lo up); nothing was written"
        )


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


def _tolerate(code: int, action: str, call: Any, *args: Any, **kwargs: Any) -> bool:
    """Run one netlink change; False when ``code`` says it was already done (exists / already gone)."""
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        call(*args, **kwargs)
    except NetlinkError as error:
        if error.code == code:
            return False
        hint = " (is lo up?)" if error.code in (errno.EINVAL, errno.ENETDOWN) else ""
        raise ApplyError(f"{action} failed: {error.args[1] if len(error.args) > 1 else error}{hint}") from None
    return True


def ensure(routes: TproxyRoutes | None, passthrough_v6: bool) -> Added:
    """Add what is missing; on failure take back what this call added, then raise."""
    added = Added()
    with _netlink() as ipr:
        lo = _loopback(ipr)
        try:
            if passthrough_v6:
                added.passthrough_v6 = _passthrough_address(ipr, "add", lo)
            if routes is None:
                return added
            key = (routes.mark, routes.table, routes.mask)
            for family in routes.families:
                present = _our_rules(ipr, family, key)
                if not present and _add_rule(ipr, family, key, routes.priority):
                    added.rules.append((family, key))
                if family is Family.V6 and routes.v6_route_only_with_lo_ipv6 and _lo_ipv6_disabled():
                    continue
                if _local_default_route(ipr, "add", family, lo, routes.table):
                    added.routes.append((family, routes.table))
        except ApplyError:
            _undo(ipr, lo, added)
            raise
    return added


def _lo_ipv6_disabled() -> bool:
    try:
        with open("/proc/sys/net/ipv6/conf/lo/disable_ipv6") as sysctl:  # this namespace's lo
            return sysctl.read(8).strip() == "1"
    except OSError:
        return False  # no such setting (IPv6 not built in): try, and report what the kernel says


def undo(added: Added) -> None:
    """Remove exactly what :func:`ensure` added (after a later step of the run failed)."""
    if not added:
        return
    with _netlink() as ipr:
        _undo(ipr, _loopback(ipr), added)


def _undo(ipr: Any, lo: int, added: Added) -> None:
    for family, key in reversed(added.rules):
        _delete_rules(ipr, family, key)
    for family, table in reversed(added.routes):
        _local_default_route(ipr, "del", family, lo, table)
    if added.passthrough_v6:
        _passthrough_address(ipr, "del", lo)


def _add_rule(ipr: Any, family: Family, key: RuleKey, priority: int | None) -> bool:
    # priority=None: no FRA_PRIORITY, so the kernel picks it as for `ip rule add` (32765 in a fresh
    # namespace), as Istio's netlink call does; pyroute2 would otherwise send 32000.
    mark, table, mask = key
    masked = {} if mask == FULL_MASK else {"fwmask": mask}
    return _tolerate(
        errno.EEXIST,
        f"ip {_flag(family)}rule add fwmark {_mark_text(key)} lookup {table}",
        ipr.rule,
        "add",
        family=_ADDRESS_FAMILY[family],
        fwmark=mark,
        table=table,
        priority=priority,
        **masked,
    )


def _mark_text(key: RuleKey) -> str:
    mark, _, mask = key
    return str(mark) if mask == FULL_MASK else f"{mark:#x}/{mask:#x}"


def _flag(family: Family) -> str:
    return "-6 " if family is Family.V6 else ""


def _passthrough_address(ipr: Any, command: str, lo: int) -> bool:
    """``ip -6 addr add|del ::6/128 dev lo``; already there / already gone is fine."""
    return _tolerate(
        errno.EEXIST if command == "add" else errno.EADDRNOTAVAIL,
        f"ip -6 addr {command} {PASSTHROUGH_V6}/128 dev lo",
        ipr.addr,
        command,
        index=lo,
        address=PASSTHROUGH_V6,
        prefixlen=128,
    )


def _local_default_route(ipr: Any, command: str, family: Family, lo: int, table: int) -> bool:
    """``ip route add|del local default dev lo table TABLE``; already there / already gone is fine."""
    return _tolerate(
        errno.EEXIST if command == "add" else errno.ESRCH,
        f"ip {_flag(family)}route {command} local {_DEFAULT[family]} dev lo table {table}",
        ipr.route,
        command,
        family=_ADDRESS_FAMILY[family],
        dst=_DEFAULT[family],
        type="local",
        scope=_RT_SCOPE_HOST,
        oif=lo,
        table=table,
    )


def _table_of(message: Any) -> int:
    return message.get_attr("FRA_TABLE") or message.get_attr("RTA_TABLE") or message["table"]


def _is_plain_fwmark_rule(rule: Any, key: RuleKey) -> bool:
    """``fwmark MARK/MASK lookup TABLE`` and nothing else (no selector, interface or other action)."""
    mark, table, mask = key
    extra = {"FRA_SRC", "FRA_DST", "FRA_IIFNAME", "FRA_OIFNAME", "FRA_GOTO"}
    return (
        rule.get_attr("FRA_FWMARK") == mark
        and _table_of(rule) == table
        and (rule.get_attr("FRA_FWMASK") or FULL_MASK) == mask
        and rule.get_attr("FRA_SUPPRESS_PREFIXLEN") in (None, 0xFFFFFFFF)
        and rule["action"] == _FR_ACT_TO_TBL
        and not rule["src_len"]
        and not rule["dst_len"]
        and not any(rule.get_attr(name) for name in extra)
    )


def _our_rules(ipr: Any, family: Family, key: RuleKey) -> list[Any]:
    return [rule for rule in ipr.get_rules(family=_ADDRESS_FAMILY[family]) if _is_plain_fwmark_rule(rule, key)]


def _delete_rules(ipr: Any, family: Family, key: RuleKey) -> bool:
    from pyroute2.netlink.exceptions import NetlinkError

    mark, table, mask = key
    masked = {} if mask == FULL_MASK else {"fwmask": mask}
    deleted = False
    for rule in _our_rules(ipr, family, key):
        try:
            ipr.rule(
                "del",
                family=_ADDRESS_FAMILY[family],
                fwmark=mark,
                table=table,
                priority=rule.get_attr("FRA_PRIORITY") or 0,
                **masked,
            )
            deleted = True
        except NetlinkError as error:
            if error.code != errno.ENOENT:
                raise ApplyError(
                    f"ip {_flag(family)}rule del fwmark {_mark_text(key)} lookup {table} failed: {error}"
                ) from None
    return deleted


def _table_in_use(ipr: Any, family: Family, table: int) -> bool:
    return any(_table_of(rule) == table for rule in ipr.get_rules(family=_ADDRESS_FAMILY[family]))


def _has_local_default(ipr: Any, family: Family, lo: int, table: int) -> bool:
    return any(
        route["type"] == _RTN_LOCAL and route["dst_len"] == 0 and route.get_attr("RTA_OIF") == lo
        for route in ipr.get_routes(family=_ADDRESS_FAMILY[family], table=table)
        if _table_of(route) == table
    )


def remove_routes(keys: Iterable[RuleKey], passthrough_v6: bool, keep: TproxyRoutes | None = None) -> bool:
    """Remove our policy routing for each rule key, both families; True if anything went.

    ``keep``: the routing the current configuration wants (a reconcile keeps it). The local default
    route of a table goes with our rule, unless another rule (anyone's) still looks the table up.
    """
    wanted_rules = {(family, (keep.mark, keep.table, keep.mask)) for family in keep.families} if keep else set()
    wanted_tables = {(family, key[1]) for family, key in wanted_rules}
    removed = False
    with _netlink() as ipr:
        lo = _loopback(ipr)
        if passthrough_v6:
            removed |= _passthrough_address(ipr, "del", lo)
        for key in dict.fromkeys(keys):
            table = key[1]
            for family in (Family.V4, Family.V6):
                if (family, key) not in wanted_rules:
                    removed |= _delete_rules(ipr, family, key)
                # Our route, once no rule (ours or anyone's) looks its table up any more.
                if (
                    (family, table) not in wanted_tables
                    and _has_local_default(ipr, family, lo, table)
                    and not _table_in_use(ipr, family, table)
                ):
                    removed |= _local_default_route(ipr, "del", family, lo, table)
    return removed


# --- a cheap look before pyroute2 (its import costs 100s of ms) --------------------------------

_RTM_GETRULE = 34
_RTM_NEWRULE = 32
_FIB_RULE_HDR = "=BBBBBBBBL"  # family, dst_len, src_len, tos, table, res1, res2, action, flags
_FRA_FWMARK = 10
_FRA_TABLE = 15
_FRA_FWMASK = 16


def fwmark_rules_present(keys: Iterable[RuleKey]) -> set[Family]:
    """The families holding an ``fwmark M/MASK lookup T`` rule for one of ``keys``, by one raw netlink
    dump (both families if the dump cannot be read: pyroute2 then looks)."""
    try:
        return _fwmark_rules_present(set(keys))
    except (OSError, ValueError, struct.error):
        return {Family.V4, Family.V6}


def _fwmark_rules_present(wanted: set[RuleKey]) -> set[Family]:
    families = {socket.AF_INET: Family.V4, socket.AF_INET6: Family.V6}
    header, rule_header, attribute = struct.Struct("=LHHLL"), struct.Struct(_FIB_RULE_HDR), struct.Struct("=HH")
    found: set[Family] = set()
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0) as sock:
        sock.bind((0, 0))
        body = rule_header.pack(socket.AF_UNSPEC, 0, 0, 0, 0, 0, 0, 0, 0)
        sock.send(header.pack(header.size + len(body), _RTM_GETRULE, 0x1 | 0x300, 1, 0) + body)
        while True:
            data = sock.recv(1 << 16)
            offset = 0
            while offset + header.size <= len(data):
                length, kind, _flags, _seq, _port = header.unpack_from(data, offset)
                if length < header.size or kind in (2, 3):  # NLMSG_ERROR, NLMSG_DONE
                    return found
                if kind == _RTM_NEWRULE:
                    family, *_, table, _r1, _r2, _action, _fl = rule_header.unpack_from(data, offset + header.size)
                    attributes: dict[int, bytes] = {}
                    at, end = offset + header.size + rule_header.size, offset + length
                    while at + attribute.size <= end:
                        size, code = attribute.unpack_from(data, at)
                        if size < attribute.size:
                            break
                        attributes[code] = data[at + attribute.size : at + size]
                        at += (size + 3) & ~3
                    if _FRA_TABLE in attributes:
                        table = struct.unpack("=I", attributes[_FRA_TABLE][:4])[0]
                    if _FRA_FWMARK in attributes and family in families:
                        mark = struct.unpack("=I", attributes[_FRA_FWMARK][:4])[0]
                        mask = FULL_MASK
                        if _FRA_FWMASK in attributes:
                            mask = struct.unpack("=I", attributes[_FRA_FWMASK][:4])[0] or FULL_MASK
                        if (mark, table, mask) in wanted:
                            found.add(families[family])
                offset += (length + 3) & ~3
