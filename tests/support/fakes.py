"""Test doubles for the edges of the core."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from tests.support.conformance import EXTRA_GROUPS


@dataclass
class FakeHost:
    """A host with the given users, groups, addresses and files."""

    users: dict[str, int] = field(default_factory=lambda: {"istio-proxy": 1337})
    groups: set[str] = field(default_factory=lambda: set(EXTRA_GROUPS))
    interface_addresses: list[str] = field(default_factory=lambda: ["10.1.2.3"])
    files: dict[str, str] = field(default_factory=dict)

    def user_uid(self, name: str) -> int | None:
        return self.users.get(name)

    def group_exists(self, name: str) -> bool:
        return name in self.groups

    def addresses(self) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        return [ipaddress.ip_address(address) for address in self.interface_addresses]

    def read_text(self, path: str) -> str:
        if path not in self.files:
            raise FileNotFoundError(2, "No such file or directory", path)
        return self.files[path]
