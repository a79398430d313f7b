"""Socket helpers both beds' child programs use (tests/beds/testbed_node.py, tests/beds/flowsender_agent.py).

Runs inside a namespace, so it imports nothing but the standard library and istio_iptables.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import sys
import threading
from typing import Any

from istio_iptables.engine.validation import original_destination

SOL_IPV6 = 41
IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75

_print_lock = threading.Lock()


def emit(message: dict[str, Any]) -> None:
    """One JSON line to the parent (whole, even when several threads answer at once)."""
    with _print_lock:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()


def endpoint(sockaddr: tuple[Any, ...]) -> str:
    """``host:port`` (``[v6]:port``), the host spelled as :mod:`ipaddress` does (inet_ntop writes ::127.0.0.53)."""
    host = str(ipaddress.ip_address(sockaddr[0].split("%")[0]))
    return f"[{host}]:{sockaddr[1]}" if ":" in host else f"{host}:{sockaddr[1]}"


def family_of(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def original_dst(conn: socket.socket) -> tuple[str, str]:
    """What a transparent proxy recovers: the NAT original destination, else the local address (TPROXY)."""
    try:
        return endpoint(original_destination(conn)), "SO_ORIGINAL_DST"
    except OSError:
        return endpoint(conn.getsockname()), "local address"


def listening_socket(address: str, port: int, kind: socket.SocketKind, transparent: bool) -> socket.socket:
    """A TCP listener or UDP socket bound to address:port; ``transparent``: TPROXY may hand it packets."""
    family = family_of(address)
    server = socket.socket(family, kind)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    if transparent:
        level, option = (socket.SOL_IP, IP_TRANSPARENT) if family == socket.AF_INET else (SOL_IPV6, IPV6_TRANSPARENT)
        server.setsockopt(level, option, 1)
    server.bind((address, port))
    if kind == socket.SOCK_STREAM:
        server.listen(64)
    return server
