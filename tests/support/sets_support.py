"""Two namespaces to watch set-based rules act on traffic, for every backend (tests/test_*sets_kernel.py).

``client`` holds the rules and a stand-in proxy on 15001 that answers "proxy"; ``server`` owns
the destination addresses and answers "direct" on 80 and 8080. Rules are applied by the CLI, as
the injector runs it.
"""

from __future__ import annotations

import ipaddress
import subprocess
import sys
from collections.abc import Callable

from istio_iptables.config.sidecar import CidrSelection, Config, PortSelection
from tests.support.netns import NetNS

# How each backend is asked for on the command line.
BACKEND_ARGS = {
    "legacy": ("--force-iptables-binary", "legacy"),
    "nft": ("--force-iptables-binary", "nft"),
    "native": ("--native-nftables",),
}
EXCLUDED, INCLUDED = "198.51.100.1", "203.0.113.1"
SERVE = """
import selectors, socket, sys, time
tag = sys.argv[1].encode()
selector = selectors.DefaultSelector()
for port in map(int, sys.argv[2:]):
    listener = socket.create_server(("0.0.0.0", port), reuse_port=True)
    listener.setblocking(False)
    selector.register(listener, selectors.EVENT_READ)
print("ready", flush=True)
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    for key, _ in selector.select(timeout=0.5):
        connection, _ = key.fileobj.accept()
        connection.sendall(tag)
        connection.close()
"""
ASK = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3) as connection:
    print(connection.recv(16).decode())
"""


def filler_cidrs(count: int) -> list[str]:
    return [f"10.{i // 256}.{i % 256}.0/24" for i in range(count)]


def filler_ports(count: int) -> list[str]:
    return [str(port) for port in range(20000, 20000 + count)]


class Pair:
    def __init__(self, make: Callable[[str], NetNS]) -> None:
        self.client, self.server = make("iit-setc"), make("iit-sets")
        self.servers: list[subprocess.Popen[str]] = []
        self.client.run("ip", "link", "add", "vc", "type", "veth", "peer", "name", "vs", "netns", self.server.name)
        self.client.run("ip", "addr", "add", "10.99.0.1/24", "dev", "vc")
        self.client.run("ip", "link", "set", "vc", "up")
        self.server.run("ip", "addr", "add", "10.99.0.2/24", "dev", "vs")
        self.server.run("ip", "link", "set", "vs", "up")
        for address in (EXCLUDED, INCLUDED):
            self.server.run("ip", "addr", "add", f"{address}/32", "dev", "lo")
            self.client.run("ip", "route", "add", f"{address}/32", "via", "10.99.0.2")
        self.serve(self.server, "direct", 80, 8080)
        self.serve(self.client, "proxy", 15001)

    def serve(self, namespace: NetNS, tag: str, *ports: int) -> None:
        command = ["ip", "netns", "exec", namespace.name, sys.executable, "-c", SERVE, tag, *map(str, ports)]
        server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        self.servers.append(server)
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"

    def ask(self, address: str, port: int) -> str:
        return self.client.run(sys.executable, "-c", ASK, address, str(port), timeout=10).stdout.strip()

    def run_cli(self, backend: str, *args: str) -> str:
        """Run istio-iptables in the client namespace, as the injector would; returns its stdout."""
        cli = [sys.executable, "-m", "istio_iptables", "--disable-ipv6", *BACKEND_ARGS[backend], *args]
        return self.client.run(*cli, "--log_output_level=default:none").stdout

    def apply(self, backend: str, args: list[str]) -> str:
        """Apply (in the client namespace); returns the dry run's text of it."""
        self.run_cli(backend, *args)
        return self.run_cli(backend, *args, "--dry-run")

    def close(self) -> None:
        for server in self.servers:
            server.kill()
            server.wait()


def cidrs(count: int, first_octet: int = 10) -> tuple[ipaddress.IPv4Network, ...]:
    return tuple(ipaddress.ip_network(f"{first_octet}.{i // 256}.{i % 256}.0/24") for i in range(count))


def config(**values: object) -> Config:
    base: dict[str, object] = {
        "proxy_uids": ("1337",),
        "proxy_gids": ("1337",),
        "inbound_ports": PortSelection(wildcard=True),
        "outbound_include": CidrSelection(wildcard=True),
    }
    return Config(**{**base, **values})  # type: ignore[arg-type]
