"""Helpers shared by tests/unit/test_explain.py and tests/kernel/test_explain_live.py."""

from __future__ import annotations

from istio_iptables.config.sidecar import Config, RawSettings, Setting, parse
from tests.support.fakes import FakeHost


def config(*args: str, **env: str) -> Config:
    """A Config from Istio-style flags (short names only, as the walkthrough writes them)."""
    names = {
        "-u": "proxy_uid",
        "-g": "proxy_gid",
        "-m": "istio_inbound_interception_mode",
        "-b": "istio_inbound_ports",
        "-d": "istio_local_exclude_ports",
        "-i": "istio_service_cidr",
        "-x": "istio_service_exclude_cidr",
        "-o": "istio_local_outbound_ports_exclude",
        "-c": "istio_exclude_interfaces",
        "-q": "istio_outbound_ports",
        "-k": "kube_virt_interfaces",
    }
    values = {names[flag]: Setting(value, flag) for flag, value in zip(args[::2], args[1::2], strict=True)}
    values.update({name: Setting(value, name) for name, value in env.items()})
    flags = {"redirect_dns": Setting("true", "--redirect-dns")} if "dns" in env.values() else {}
    host = FakeHost(files={"/etc/resolv.conf": "nameserver 127.0.0.53\n"})
    return parse(RawSettings(values=values, flags=flags, enable_ipv6=True), host)


DEFAULT = config("-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020")
