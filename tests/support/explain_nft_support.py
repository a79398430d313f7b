"""Helpers shared by tests/unit/test_explain_nft.py and tests/kernel/test_explain_nft_live.py."""

from __future__ import annotations

from istio_iptables.config.sidecar import Config, parse
from istio_iptables.frontends.cli.flags import raw_settings
from istio_iptables.frontends.cli.main import command
from tests.support.fakes import FakeHost

SIDECAR = ("-p", "15001", "-z", "15006", "-u", "1337", "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020")


def config(*args: str) -> Config:
    ctx = command.make_context("istio-iptables", list(args))
    host = FakeHost(files={"/resolv.conf": "nameserver 10.255.255.53\nnameserver fd00::53\n"})
    return parse(raw_settings(ctx, ctx.params), host)
