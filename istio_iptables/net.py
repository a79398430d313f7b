"""Address families and networks: the vocabulary every layer shares (no I/O, cheap to import)."""

from __future__ import annotations

import ipaddress
from enum import Enum
from typing import TypeAlias

IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network


class Family(Enum):
    V4 = 4
    V6 = 6

    @property
    def label(self) -> str:
        return "IPv4" if self is Family.V4 else "IPv6"

    @property
    def restore_program(self) -> str:
        return "iptables-restore" if self is Family.V4 else "ip6tables-restore"

    @property
    def loopback(self) -> IPNetwork:
        return ipaddress.ip_network("127.0.0.1/32" if self is Family.V4 else "::1/128")

    @property
    def inbound_passthrough_source(self) -> IPNetwork:
        """The address Envoy binds for inbound passthrough (127.0.0.6 / ::6)."""
        return ipaddress.ip_network("127.0.0.6/32" if self is Family.V4 else "::6/128")

    def owns(self, network: IPNetwork | ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return network.version == self.value
