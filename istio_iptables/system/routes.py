"""Policy routing (TPROXY's, ambient's in-pod) and the IPv6 passthrough address, over raw netlink.

``ip rule add fwmark MARK[/MASK] [pref P] lookup TABLE`` and ``ip route add local default dev lo
table TABLE`` per family make marked packets local, so TPROXY sockets (or, in ambient mode, the
pod's replies to connections ztunnel accepted) receive them; ``::6/128`` on lo is the source
Envoy's inbound passthrough binds in IPv6 (lo only holds ::1/128). Adding what exists already is
success, so a rerun is a no-op (Istio fails on the duplicate rule).

What is ours: a policy rule is ours only when its fwmark, its mask *and* its table are ours (a
foreign ``fwmark 1337 lookup 200`` is not), and a route only when it is exactly ``local default dev
lo`` in that table. The sidecar's rule gets its priority from the kernel, as ``ip rule add`` (and
Istio) do; ambient's in-pod rule has Istio's fixed one (``fwmark 0x111/0xfff pref 32764 lookup 100``).
A rule is named by :data:`RuleKey` (mark, table, mask).
Every write is recorded in :class:`Added`, so a failed run takes back exactly what it added.

The messages are the few rtnetlink ones ``ip`` sends, through :mod:`istio_iptables.system.netlink`
(pyroute2's import would cost more than the run: docs/speed.md).
"""

from __future__ import annotations

import _socket as socket  # the C module: socket.py's enums cost ~4 ms we do not need
import errno
import os
import struct
from collections.abc import Iterable

from istio_iptables.errors import ApplyError, EnvironmentProblem
from istio_iptables.net import Family
from istio_iptables.system import netlink
from istio_iptables.xtables.model import FULL_MASK, TproxyRoutes

RuleKey = tuple[int, int, int]  # (fwmark, table, mask) of an ``ip rule fwmark MARK/MASK lookup TABLE``

PASSTHROUGH_V6 = "::6"
_ADDRESS_FAMILY = {Family.V4: socket.AF_INET, Family.V6: socket.AF_INET6}
_DEFAULT = {Family.V4: "0.0.0.0/0", Family.V6: "::/0"}
_SIOCGIFFLAGS = 0x8913
_IFF_UP = 0x1

# rtnetlink (linux/rtnetlink.h, linux/fib_rules.h, linux/if_addr.h)
_RTM_NEWADDR, _RTM_DELADDR = 20, 21
_RTM_NEWROUTE, _RTM_DELROUTE, _RTM_GETROUTE = 24, 25, 26
_RTM_NEWRULE, _RTM_DELRULE, _RTM_GETRULE = 32, 33, 34
_RULE_HEADER = struct.Struct("=BBBBBBBBL")  # family, dst_len, src_len, tos, table, res1, res2, action, flags
_ROUTE_HEADER = struct.Struct("=BBBBBBBBL")  # family, dst_len, src_len, tos, table, protocol, scope, type, flags
_ADDRESS_HEADER = struct.Struct("=BBBBL")  # family, prefix length, flags, scope, interface index
_FRA_DST, _FRA_SRC, _FRA_IIFNAME, _FRA_GOTO, _FRA_PRIORITY = 1, 2, 3, 4, 6
_FRA_FWMARK, _FRA_SUPPRESS_PREFIXLEN, _FRA_TABLE, _FRA_FWMASK, _FRA_OIFNAME = 10, 14, 15, 16, 17
_RTA_OIF, _RTA_TABLE = 4, 15
_IFA_ADDRESS, _IFA_LOCAL = 1, 2
_FR_ACT_TO_TBL = 1
_RTN_LOCAL = 2
_RTPROT_STATIC = 4
_RT_SCOPE_HOST = 254  # what `ip route add local` sets; the kernel refuses a v4 local route without it
_RT_SCOPE_NOWHERE = 255  # in a deletion: any scope
_RT_TABLE_UNSPEC = 0
_PASSTHROUGH_V6_BYTES = bytes(15) + b"\x06"


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

    One ioctl on a throwaway socket of this namespace, so it costs nothing before writing.
    """
    import fcntl

    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        answer = fcntl.ioctl(probe.fileno(), _SIOCGIFFLAGS, struct.pack("16sH14x", b"lo", 0))
    except OSError:
        raise EnvironmentProblem("this network namespace has no 'lo' interface; nothing was written") from None
    finally:
        probe.close()
    flags = struct.unpack("16sH14x", answer)[1]
    if not flags & _IFF_UP:
        raise EnvironmentProblem(
            "lo is down in this network namespace: TPROXY needs it up (ip link set lo up); nothing was written"
        )


def _loopback() -> int:
    try:
        return socket.if_nametoindex("lo")
    except OSError:
        raise ApplyError("this network namespace has no 'lo' interface") from None


def _change(kind: int, flags: int, body: bytes, tolerated: int, action: str) -> bool:
    """Send one change; False when the kernel answers ``tolerated`` (already there / already gone)."""
    code = netlink.request(netlink.NETLINK_ROUTE, kind, flags, body)
    if code == tolerated:
        return False
    if code:
        hint = " (is lo up?)" if code in (errno.EINVAL, errno.ENETDOWN) else ""
        raise ApplyError(f"{action} failed: {errno.errorcode.get(code, code)}: {os.strerror(code)}{hint}")
    return True


# --- policy rules ---------------------------------------------------------------------------------


def _rule_message(family: Family, key: RuleKey, priority: int | None) -> bytes:
    mark, table, mask = key
    header = _RULE_HEADER.pack(
        _ADDRESS_FAMILY[family], 0, 0, 0, table if table < 256 else _RT_TABLE_UNSPEC, 0, 0, _FR_ACT_TO_TBL, 0
    )
    attributes = [netlink.u32(_FRA_TABLE, table), netlink.u32(_FRA_FWMARK, mark)]
    if mask != FULL_MASK:
        attributes.append(netlink.u32(_FRA_FWMASK, mask))
    if priority is not None:
        # None: no FRA_PRIORITY, so the kernel picks it as for `ip rule add` (32765 in a fresh
        # namespace), as Istio's netlink call does.
        attributes.append(netlink.u32(_FRA_PRIORITY, priority))
    return header + b"".join(attributes)


def _mark_text(key: RuleKey) -> str:
    mark, _, mask = key
    return str(mark) if mask == FULL_MASK else f"{mark:#x}/{mask:#x}"


def _rules(family: Family) -> list[tuple[bytes, netlink.Attributes]]:
    header = _RULE_HEADER.pack(_ADDRESS_FAMILY[family], 0, 0, 0, 0, 0, 0, 0, 0)
    try:
        answers = netlink.dump(netlink.NETLINK_ROUTE, _RTM_GETRULE, header, _RULE_HEADER.size)
    except OSError as error:
        if error.errno == errno.EAFNOSUPPORT:
            return []  # a kernel without IPv6 has no IPv6 rules
        raise ApplyError(f"cannot list the policy rules ({error})") from None
    except ValueError as error:
        raise ApplyError(f"cannot list the policy rules ({error})") from None
    return [(fixed, attributes) for kind, fixed, attributes in answers if kind == _RTM_NEWRULE]


def _table(fixed_table: int, attributes: netlink.Attributes, kind: int) -> int:
    return netlink.read_u32(attributes, kind) or fixed_table


def _is_plain_fwmark_rule(fixed: bytes, attributes: netlink.Attributes, key: RuleKey) -> bool:
    """``fwmark MARK/MASK lookup TABLE`` and nothing else (no selector, interface or other action)."""
    mark, table, mask = key
    _family, dst_len, src_len, _tos, fixed_table, _r1, _r2, action, _flags = _RULE_HEADER.unpack(fixed)
    suppress = netlink.read_u32(attributes, _FRA_SUPPRESS_PREFIXLEN)
    extra = (_FRA_SRC, _FRA_DST, _FRA_IIFNAME, _FRA_OIFNAME, _FRA_GOTO)
    return (
        netlink.read_u32(attributes, _FRA_FWMARK) == mark
        and _table(fixed_table, attributes, _FRA_TABLE) == table
        and (netlink.read_u32(attributes, _FRA_FWMASK) or FULL_MASK) == mask
        and suppress in (None, FULL_MASK)
        and action == _FR_ACT_TO_TBL
        and not src_len
        and not dst_len
        and not any(attributes.get(name) for name in extra)
    )


def _our_rules(family: Family, key: RuleKey) -> list[int | None]:
    """The priorities of our rules for ``key`` in this family."""
    return [
        netlink.read_u32(attributes, _FRA_PRIORITY)
        for fixed, attributes in _rules(family)
        if _is_plain_fwmark_rule(fixed, attributes, key)
    ]


def _add_rule(family: Family, key: RuleKey, priority: int | None) -> bool:
    body = _rule_message(family, key, priority)
    flag = "-6 " if family is Family.V6 else ""
    action = f"ip {flag}rule add fwmark {_mark_text(key)} lookup {key[1]}"
    return _change(_RTM_NEWRULE, netlink.NLM_F_CREATE | netlink.NLM_F_EXCL, body, errno.EEXIST, action)


def _delete_rules(family: Family, key: RuleKey) -> bool:
    deleted = False
    flag = "-6 " if family is Family.V6 else ""
    for priority in _our_rules(family, key):
        action = f"ip {flag}rule del fwmark {_mark_text(key)} lookup {key[1]}"
        deleted |= _change(_RTM_DELRULE, 0, _rule_message(family, key, priority or 0), errno.ENOENT, action)
    return deleted


def _table_in_use(family: Family, table: int) -> bool:
    return any(
        _table(_RULE_HEADER.unpack(fixed)[4], attributes, _FRA_TABLE) == table for fixed, attributes in _rules(family)
    )


# --- routes and the passthrough address ----------------------------------------------------------


def _route_message(family: Family, lo: int, table: int, *, delete: bool = False) -> bytes:
    # A deletion names no protocol and no scope (as ``ip route del``), so the route goes whoever added it.
    header = _ROUTE_HEADER.pack(
        _ADDRESS_FAMILY[family],
        0,  # dst_len 0: default
        0,
        0,
        table if table < 256 else _RT_TABLE_UNSPEC,
        0 if delete else _RTPROT_STATIC,
        _RT_SCOPE_NOWHERE if delete else _RT_SCOPE_HOST,
        _RTN_LOCAL,
        0,
    )
    return header + netlink.u32(_RTA_TABLE, table) + netlink.u32(_RTA_OIF, lo)


def _local_default_route(command: str, family: Family, lo: int, table: int) -> bool:
    """``ip route add|del local default dev lo table TABLE``; already there / already gone is fine."""
    flag = "-6 " if family is Family.V6 else ""
    action = f"ip {flag}route {command} local {_DEFAULT[family]} dev lo table {table}"
    if command == "add":
        body = _route_message(family, lo, table)
        return _change(_RTM_NEWROUTE, netlink.NLM_F_CREATE | netlink.NLM_F_EXCL, body, errno.EEXIST, action)
    return _change(_RTM_DELROUTE, 0, _route_message(family, lo, table, delete=True), errno.ESRCH, action)


def _has_local_default(family: Family, lo: int, table: int) -> bool:
    header = _ROUTE_HEADER.pack(_ADDRESS_FAMILY[family], 0, 0, 0, 0, 0, 0, 0, 0)
    try:
        answers = netlink.dump(netlink.NETLINK_ROUTE, _RTM_GETROUTE, header, _ROUTE_HEADER.size)
    except (OSError, ValueError) as error:
        raise ApplyError(f"cannot list the routes ({error})") from None
    for kind, fixed, attributes in answers:
        _family, dst_len, _src, _tos, fixed_table, _proto, _scope, route_type, _flags = _ROUTE_HEADER.unpack(fixed)
        if (
            kind == _RTM_NEWROUTE
            and _table(fixed_table, attributes, _RTA_TABLE) == table
            and route_type == _RTN_LOCAL
            and dst_len == 0
            and netlink.read_u32(attributes, _RTA_OIF) == lo
        ):
            return True
    return False


def _passthrough_address(command: str, lo: int) -> bool:
    """``ip -6 addr add|del ::6/128 dev lo``; already there / already gone is fine."""
    address = _PASSTHROUGH_V6_BYTES
    body = _ADDRESS_HEADER.pack(socket.AF_INET6, 128, 0, 0, lo)
    body += netlink.attribute(_IFA_LOCAL, address) + netlink.attribute(_IFA_ADDRESS, address)
    action = f"ip -6 addr {command} {PASSTHROUGH_V6}/128 dev lo"
    if command == "add":
        return _change(_RTM_NEWADDR, netlink.NLM_F_CREATE | netlink.NLM_F_EXCL, body, errno.EEXIST, action)
    return _change(_RTM_DELADDR, 0, body, errno.EADDRNOTAVAIL, action)


def _lo_ipv6_disabled() -> bool:
    try:
        with open("/proc/sys/net/ipv6/conf/lo/disable_ipv6") as sysctl:  # this namespace's lo
            return sysctl.read(8).strip() == "1"
    except OSError:
        return False  # no such setting (IPv6 not built in): try, and report what the kernel says


# --- what the engine calls -------------------------------------------------------------------------


def ensure(routes: TproxyRoutes | None, passthrough_v6: bool) -> Added:
    """Add what is missing; on failure take back what this call added, then raise."""
    added = Added()
    lo = _loopback()
    try:
        if passthrough_v6:
            added.passthrough_v6 = _passthrough_address("add", lo)
        if routes is None:
            return added
        for family in routes.families:
            if not _our_rules(family, routes.key) and _add_rule(family, routes.key, routes.priority):
                added.rules.append((family, routes.key))
            if family is Family.V6 and routes.v6_route_only_with_lo_ipv6 and _lo_ipv6_disabled():
                continue
            if _local_default_route("add", family, lo, routes.table):
                added.routes.append((family, routes.table))
    except ApplyError:
        undo(added)
        raise
    return added


def undo(added: Added) -> None:
    """Remove exactly what :func:`ensure` added (after a later step of the run failed)."""
    if not added:
        return
    lo = _loopback()
    for family, key in reversed(added.rules):
        _delete_rules(family, key)
    for family, table in reversed(added.routes):
        _local_default_route("del", family, lo, table)
    if added.passthrough_v6:
        _passthrough_address("del", lo)


def remove_routes(keys: Iterable[RuleKey], passthrough_v6: bool, keep: TproxyRoutes | None = None) -> bool:
    """Remove our policy routing for each rule key, both families; True if anything went.

    ``keep``: the routing the current configuration wants (a reconcile keeps it). The local default
    route of a table goes with our rule, unless another rule (anyone's) still looks the table up.
    """
    wanted_rules = {(family, keep.key) for family in keep.families} if keep else set()
    wanted_tables = {(family, key[1]) for family, key in wanted_rules}
    removed = False
    lo = _loopback()
    if passthrough_v6:
        removed |= _passthrough_address("del", lo)
    for key in dict.fromkeys(keys):
        table = key[1]
        for family in (Family.V4, Family.V6):
            if (family, key) not in wanted_rules:
                removed |= _delete_rules(family, key)
            # Our route, once no rule (ours or anyone's) looks its table up any more.
            if (
                (family, table) not in wanted_tables
                and _has_local_default(family, lo, table)
                and not _table_in_use(family, table)
            ):
                removed |= _local_default_route("del", family, lo, table)
    return removed


def fwmark_rules_present(keys: Iterable[RuleKey]) -> set[Family]:
    """The families holding an ``fwmark M/MASK lookup T`` rule for one of ``keys`` (both families if
    the rules cannot be listed: the removal then looks again and reports)."""
    wanted = set(keys)
    found: set[Family] = set()
    try:
        for family in (Family.V4, Family.V6):
            for fixed, attributes in _rules(family):
                mark = netlink.read_u32(attributes, _FRA_FWMARK)
                if mark is None:
                    continue
                table = _table(_RULE_HEADER.unpack(fixed)[4], attributes, _FRA_TABLE)
                mask = netlink.read_u32(attributes, _FRA_FWMASK) or FULL_MASK
                if (mark, table, mask) in wanted:
                    found.add(family)
    except ApplyError:
        return {Family.V4, Family.V6}
    return found
