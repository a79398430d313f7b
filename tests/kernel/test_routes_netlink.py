"""The policy routing written over raw netlink (system/routes.py) is what ``ip`` writes, read back with ``ip``.

The sidecar's TPROXY rule (kernel-chosen priority, full mark), ambient's in-pod rule (masked mark,
fixed priority), the local default routes of both families and lo's ``::6``; a second ``ensure``
adds nothing; removal takes exactly ours, also when ``ip`` added them (another protocol), and keeps
a foreign rule of the same mark with another table or mask.
"""

from __future__ import annotations

import pytest

from istio_iptables.errors import ApplyError
from istio_iptables.net import Family
from istio_iptables.system import routes
from istio_iptables.xtables.model import FULL_MASK, TproxyRoutes
from tests.support.apply_support import inside
from tests.support.netns import NetNS

BOTH = (Family.V4, Family.V6)
SIDECAR = TproxyRoutes(mark=1337, table=133, families=BOTH)
AMBIENT = TproxyRoutes(
    mark=0x111, table=100, families=BOTH, mask=0xFFF, priority=32764, v6_route_only_with_lo_ipv6=True
)


def state(netns: NetNS) -> dict[str, str]:
    return {
        "rules": netns.run("ip", "rule").stdout,
        "rules6": netns.run("ip", "-6", "rule").stdout,
        "routes": netns.run("ip", "route", "show", "table", "all").stdout,
        "routes6": netns.run("ip", "-6", "route", "show", "table", "all").stdout,
        "lo": netns.run("ip", "-6", "addr", "show", "dev", "lo").stdout,
    }


def test_ensure_writes_what_ip_would_and_a_second_call_adds_nothing(netns: NetNS) -> None:
    netns.run("ip", "link", "set", "lo", "up")
    with inside(netns):
        added = routes.ensure(SIDECAR, passthrough_v6=True)
        assert added.passthrough_v6 and len(added.rules) == 2 and len(added.routes) == 2
        added_ambient = routes.ensure(AMBIENT, passthrough_v6=False)
        assert not routes.ensure(SIDECAR, passthrough_v6=True)  # nothing new
        assert not routes.ensure(AMBIENT, passthrough_v6=False)
    assert added_ambient.rules == [(Family.V4, (0x111, 100, 0xFFF)), (Family.V6, (0x111, 100, 0xFFF))]
    for flag in ("-4", "-6"):
        rules = netns.run("ip", flag, "rule").stdout
        assert "32764:\tfrom all fwmark 0x111/0xfff lookup 100" in rules
        assert "from all fwmark 0x539 lookup 133" in rules
        for table in ("100", "133"):
            assert "local default dev lo" in netns.run("ip", flag, "route", "show", "table", table).stdout
    assert "inet6 ::6/128" in netns.run("ip", "-6", "addr", "show", "dev", "lo").stdout
    with inside(netns):
        assert routes.fwmark_rules_present({SIDECAR.key, AMBIENT.key}) == set(BOTH)


def test_removal_takes_exactly_ours_whoever_wrote_them(netns: NetNS) -> None:
    netns.run("ip", "link", "set", "lo", "up")
    netns.run("ip", "rule", "add", "fwmark", "0x111", "lookup", "200")  # foreign: other table, full mask
    netns.run("ip", "route", "add", "local", "default", "dev", "lo", "table", "200")
    before = state(netns)
    for flag in ("-4", "-6"):  # ours, written by `ip` (proto boot), as an interrupted run of Istio's might leave
        netns.run("ip", flag, "rule", "add", "fwmark", "0x111/0xfff", "pref", "32764", "lookup", "100")
    netns.run("ip", "route", "add", "local", "default", "dev", "lo", "table", "100")
    netns.run("ip", "-6", "route", "add", "local", "::/0", "dev", "lo", "table", "100")
    with inside(netns):
        assert routes.fwmark_rules_present({AMBIENT.key}) == set(BOTH)
        assert routes.fwmark_rules_present({(0x111, 100, FULL_MASK)}) == set()  # the mask is part of the key
        assert routes.remove_routes({AMBIENT.key}, passthrough_v6=False)
        assert not routes.remove_routes({AMBIENT.key}, passthrough_v6=False)  # nothing left to remove
    assert state(netns) == before


def test_a_failed_ensure_takes_back_what_it_added(netns: NetNS) -> None:
    # lo has IPv6 disabled: the sidecar's IPv6 local route fails after the IPv4 rule and route and the
    # IPv6 rule went in; all of them go again. (Ambient skips that route there, as Istio's agent does.)
    netns.run("ip", "link", "set", "lo", "up")
    netns.run("sysctl", "-qw", "net.ipv6.conf.lo.disable_ipv6=1")
    before = state(netns)
    with inside(netns), pytest.raises(ApplyError, match="route add local ::/0"):
        routes.ensure(SIDECAR, passthrough_v6=False)
    assert state(netns) == before
    with inside(netns):
        added = routes.ensure(AMBIENT, passthrough_v6=False)
    assert (Family.V6, 100) not in added.routes and (Family.V4, 100) in added.routes
