"""Helpers for the lock, concurrency and kill tests: start the real CLI in a namespace, read back
everything a run leaves (rules of the chosen backend, policy routes, ::6) as one comparable text."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from tests.support.netns import NetNS, canonical_save

EXECUTABLE = str(Path(sys.executable).parent / "istio-iptables")
# Backends as the tests name them: the two iptables backends, and native nftables.
ALL_BACKENDS = ("legacy", "nft", "native")
ROUTE_TABLE = "133"


def backend_args(backend: str) -> list[str]:
    return ["--native-nftables"] if backend == "native" else [f"--force-iptables-binary={backend}"]


def start(
    namespace: NetNS, args: Sequence[str], env: Mapping[str, str] | None = None, uid_prefix: Sequence[str] = ()
) -> subprocess.Popen[str]:
    """The real CLI, started in ``namespace`` (not waited for)."""
    return subprocess.Popen(
        ["ip", "netns", "exec", namespace.name, *uid_prefix, EXECUTABLE, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def finish(process: subprocess.Popen[str], timeout: float = 120) -> tuple[int, str]:
    _, stderr = process.communicate(timeout=timeout)
    return process.returncode, stderr


def routing(namespace: NetNS) -> str:
    """Our policy routing and the ::6 address: `ip rule`, the local routes of table 133, lo's IPv6 addresses."""
    commands = (
        ("ip", "rule"),
        ("ip", "-6", "rule"),
        ("ip", "route", "show", "table", ROUTE_TABLE),
        ("ip", "-6", "route", "show", "table", ROUTE_TABLE),
        ("ip", "-6", "-o", "addr", "show", "dev", "lo"),
    )
    text = "".join(namespace.run(*command, check=False).stdout for command in commands)
    return re.sub(r"valid_lft.*", "", text)


def rules(namespace: NetNS, backend: str) -> str:
    if backend == "native":
        return namespace.run("nft", "list", "ruleset").stdout
    found = []
    for program in ("iptables", "ip6tables"):
        text = namespace.run(f"{program}-{backend}-save").stdout
        found.append("\n".join(canonical_save(text)))
    return "\n--\n".join(found)


def whole_state(namespace: NetNS, backend: str) -> str:
    return rules(namespace, backend) + "\n==\n" + routing(namespace)


_REFERENCES: dict[tuple[str, tuple[str, ...]], str] = {}


def reference_state(backend: str, args: Sequence[str]) -> str:
    """What one lone run of ``args`` leaves in a fresh namespace (computed once per test session)."""
    key = (backend, tuple(args))
    if key not in _REFERENCES:
        with NetNS() as namespace:
            code, stderr = finish(start(namespace, [*args, *backend_args(backend)]))
            assert code == 0, stderr
            _REFERENCES[key] = whole_state(namespace, backend)
    return _REFERENCES[key]
