"""Throwaway network namespaces for tests that need a kernel (root only).

Names are random, so tests (and developers) running at the same time never collide.
Everything a namespace gets (its /etc/netns directory included) goes away with it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

NETNS_ETC = Path("/etc/netns")


class NetNS:
    def __init__(self, prefix: str = "iit") -> None:
        self.name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        self.run("ip", "link", "set", "lo", "up")

    @property
    def path(self) -> str:
        return f"/run/netns/{self.name}"

    def run(
        self,
        *command: str,
        input: str | None = None,
        check: bool = True,
        env: Mapping[str, str] | None = None,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``command`` inside the namespace (``ip netns exec`` also binds /etc/netns/NAME/*)."""
        full_env = None if env is None else {**os.environ, **env}
        return subprocess.run(
            ["ip", "netns", "exec", self.name, *command],
            input=input,
            capture_output=True,
            text=True,
            check=check,
            env=full_env,
            timeout=timeout,
        )

    def add_groups(self, groups: Mapping[str, int]) -> None:
        """Make group names known inside the namespace only (``ip netns exec`` binds this file)."""
        directory = NETNS_ETC / self.name
        directory.mkdir(parents=True, exist_ok=True)
        host_groups = Path("/etc/group").read_text()
        extra = "".join(f"{name}:x:{gid}:\n" for name, gid in groups.items())
        (directory / "group").write_text(host_groups + extra)

    def save(self, program: str = "iptables-save") -> str:
        return self.run(program).stdout

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=False, capture_output=True)
        shutil.rmtree(NETNS_ETC / self.name, ignore_errors=True)

    def __enter__(self) -> NetNS:
        return self

    def __exit__(self, *exc: object) -> None:
        self.delete()


def canonical_save(text: str) -> list[str]:
    """An iptables-save dump reduced to what a comparison should see.

    Comments, counters, header lines and the ACCEPT policies of built-in chains go; the order
    of rules within a chain stays (rules are listed chain by chain in kernel order).
    """
    lines = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        if line.startswith(":"):
            name, policy = line[1:].split()[:2]
            if policy in ("ACCEPT", "-"):
                line = f":{name} -" if policy == "-" else ""
            if not line:
                continue
        lines.append(line)
    return _drop_empty_tables(lines)


def _drop_empty_tables(lines: Sequence[str]) -> list[str]:
    kept: list[str] = []
    table: list[str] = []
    for line in lines:
        if line.startswith("*"):
            table = [line]
        elif line == "COMMIT":
            if len(table) > 1:
                kept.extend([*table, line])
            table = []
        else:
            table.append(line)
    return kept
