"""Smoke test with real packets: the nft rules capture outbound and inbound TCP (REDIRECT, IPv4).

The live-traffic test bed (tests/testbed.py, issue 4) proves every path for every backend; this is
the nft backend's own minimal check that rules which load also redirect.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from tests.netns import NetNS

CLI = [sys.executable, "-m", "istio_iptables"]
POD, REMOTE = "10.99.0.1", "10.99.0.2"

# Accept one connection on PORT and print the original destination the kernel recorded for it.
LISTENER = """
import socket, struct, sys
server = socket.socket(); server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("0.0.0.0", int(sys.argv[1]))); server.listen(1); server.settimeout(10)
print("ready", flush=True)
conn, _ = server.accept()
port, address = struct.unpack("!2xH4s8x", conn.getsockopt(socket.SOL_IP, 80, 16))  # SO_ORIGINAL_DST
print(f"{socket.inet_ntoa(address)}:{port}", flush=True)
"""
# Connect as an ordinary uid (not the proxy's 1337), as the app would.
CLIENT = """
import encodings.idna, os, socket, sys  # idna: imported while /root (the venv's home) is readable
os.setgid(1000); os.setuid(1000)
socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close()
"""


def landed(pod: NetNS, client_ns: NetNS, listen_port: int, target: str, port: int) -> str:
    import subprocess

    listener = subprocess.Popen(
        ["ip", "netns", "exec", pod.name, sys.executable, "-c", LISTENER, str(listen_port)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
        result = client_ns.run(sys.executable, "-c", CLIENT, target, str(port), timeout=10, check=False)
        assert result.returncode == 0, result.stderr
        return listener.stdout.readline().strip()
    finally:
        listener.kill()
        listener.wait()


def test_outbound_and_inbound_land_on_the_proxy_ports(netns_factory: Callable[[str], NetNS]) -> None:
    pod, remote = netns_factory("iit-pod"), netns_factory("iit-rem")
    pod.run("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", remote.name)
    for namespace, address in ((pod, POD), (remote, REMOTE)):
        namespace.run("ip", "addr", "add", f"{address}/24", "dev", "eth0")
        namespace.run("ip", "link", "set", "eth0", "up")
    applied = pod.run(*CLI, "--native-nftables", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-b", "*",
                      "-d", "15090,15021,15020", "--disable-ipv6", check=False)  # fmt: skip
    assert applied.returncode == 0, applied.stderr
    assert landed(pod, pod, 15001, REMOTE, 8080) == f"{REMOTE}:8080"  # app -> remote service
    assert landed(pod, remote, 15006, POD, 9080) == f"{POD}:9080"  # remote -> pod service
