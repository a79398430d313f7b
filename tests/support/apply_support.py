"""Helpers for the apply-engine tests: configs from conformance cases, namespaces, foreign rules."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from istio_iptables.config.sidecar import Config
from istio_iptables.frontends.cli import main as cli
from istio_iptables.net import Family
from istio_iptables.system.netns import entered
from istio_iptables.xtables.reconcile import numeric_gid
from tests.support.conformance import EXTRA_GROUPS, Case
from tests.support.netns import NetNS

BACKENDS = ("legacy", "nft")

# Rules of other programs, in every table and both families, including a chain of their own and
# rules in the built-in chains we also use: cleanup and rollback must leave every byte of them.
FOREIGN_V4 = """*filter
:FOREIGN_FW - [0:0]
-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT
-A FOREIGN_FW -s 10.9.0.0/16 -j DROP
-A OUTPUT -j FOREIGN_FW
COMMIT
*nat
:FOREIGN_NAT - [0:0]
-A PREROUTING -p udp -m udp --dport 5353 -j RETURN
-A OUTPUT -d 10.99.0.1/32 -p tcp -j DNAT --to-destination 10.99.0.2:80
-A FOREIGN_NAT -j RETURN
-A POSTROUTING -o eth9 -j MASQUERADE
COMMIT
*mangle
-A PREROUTING -p udp -j MARK --set-xmark 0x7/0xffffffff
-A OUTPUT -p udp -m udp --dport 9999 -j RETURN
COMMIT
*raw
-A PREROUTING -p udp -m udp --dport 4789 -j NOTRACK
-A OUTPUT -j ACCEPT
COMMIT
"""
FOREIGN_V6 = """*filter
:FOREIGN_FW - [0:0]
-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT
-A FOREIGN_FW -s 2001:db8:9::/48 -j DROP
COMMIT
*nat
-A PREROUTING -p udp -m udp --dport 5353 -j RETURN
-A OUTPUT -d 2001:db8::1/128 -p tcp -j RETURN
COMMIT
*mangle
-A OUTPUT -p udp -m udp --dport 9999 -j RETURN
COMMIT
*raw
-A OUTPUT -j ACCEPT
COMMIT
"""


def resolve_test_gid(name: str) -> str:
    return str(EXTRA_GROUPS[name]) if name in EXTRA_GROUPS else numeric_gid(name)


def config_of(
    args: Sequence[str], env: dict[str, str] | None = None, monkeypatch: pytest.MonkeyPatch | None = None
) -> Config:
    """The Config the CLI builds for ``args`` (parsed exactly as in production, nothing applied)."""
    captured: list[Config] = []
    patcher = monkeypatch or pytest.MonkeyPatch()
    try:
        for name, value in (env or {}).items():
            patcher.setenv(name, value)
        patcher.setattr(
            "istio_iptables.engine.actions.perform",
            lambda action, config, out, system, footprint, namespace_path="": captured.append(config),
        )
        patcher.setattr(
            "istio_iptables.system.host.RealHost.group_exists",
            lambda self, name: name in EXTRA_GROUPS or numeric_gid_exists(name),
        )
        with pytest.raises(SystemExit) as done:
            cli.main([*args, "--log_output_level=default:none"])
        assert done.value.code == 0, f"parsing {args} failed"
    finally:
        if monkeypatch is None:
            patcher.undo()
    return captured[0]


def numeric_gid_exists(name: str) -> bool:
    try:
        numeric_gid(name)
    except KeyError:
        return False
    return True


def case_args(case: Case, tmp_path: Path) -> list[str]:
    resolv = None
    if case.resolv_conf is not None:
        resolv = tmp_path / f"{case.name}.resolv.conf"
        resolv.write_text(case.resolv_conf)
    return case.cli_args(str(resolv) if resolv else None)


@contextmanager
def inside(namespace: NetNS) -> Iterator[None]:
    with entered(namespace.path):
        yield


def program(backend: str, family: Family, kind: str) -> str:
    return f"{'iptables' if family is Family.V4 else 'ip6tables'}-{backend}-{kind}"


def save(namespace: NetNS, backend: str, family: Family) -> str:
    return namespace.run(program(backend, family, "save")).stdout


def save_both(namespace: NetNS, backend: str) -> dict[Family, str]:
    return {family: save(namespace, backend, family) for family in (Family.V4, Family.V6)}


def without_comments(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.startswith("#"))


def seed_foreign(namespace: NetNS, backend: str) -> None:
    namespace.run(program(backend, Family.V4, "restore"), "--noflush", input=FOREIGN_V4)
    namespace.run(program(backend, Family.V6, "restore"), "--noflush", input=FOREIGN_V6)


def cli_in(
    namespace: NetNS, args: Sequence[str], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the real CLI inside ``namespace`` through ``ip netns exec`` (binds /etc/netns/NAME/group)."""
    executable = str(Path(sys.executable).parent / "istio-iptables")
    return namespace.run(executable, *args, check=False, env=env)


# A foreign nft table with a counter: cleanup and reconcile must leave it byte-identical.
FOREIGN_NFT = """table inet foreign {
\tchain input {
\t\ttype filter hook input priority 10; policy accept;
\t\ttcp dport 2222 counter packets 3 bytes 180 accept
\t}
}
"""
