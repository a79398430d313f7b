"""Is a connection captured? Run inside a pod's namespace as root (``ip netns exec``):

    python tests/beds/capture_probe.py --uid 1000 --to 10.96.0.10:80 --listen 15001

listens on ``--listen`` as Envoy would, connects to ``--to`` as ``--uid`` from a child process, and
prints JSON: ``{"captured": true, "original_dst": "10.96.0.10:80"}`` when the connection landed on
the listener (the original destination read back with SO_ORIGINAL_DST), else ``{"captured": false}``.
"""

from __future__ import annotations

import argparse
import encodings.idna  # noqa: F401  (sockets encode host names with it; the unprivileged child may not read it)
import ipaddress
import json
import os
import signal
import socket
import struct

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h


def original_destination(connection: socket.socket) -> str:
    raw = connection.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, address = struct.unpack("!2xH4s8x", raw)
    return f"{ipaddress.IPv4Address(address)}:{port}"


def connect_as(uid: int, host: str, port: int, timeout: float) -> None:
    """In a child: drop to ``uid`` (its own gid too, no supplementary groups) and connect."""
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    try:
        with socket.create_connection((host, port), timeout=timeout) as client:
            client.sendall(b"probe")
    except OSError:
        pass


def probe(uid: int, host: str, port: int, listen_port: int, timeout: float) -> dict[str, object]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("0.0.0.0", listen_port))
        listener.listen(1)
        listener.settimeout(timeout)
        child = os.fork()
        if child == 0:
            try:
                connect_as(uid, host, port, timeout)
            finally:
                os._exit(0)
        try:
            connection, _peer = listener.accept()
        except TimeoutError:
            return {"captured": False}
        finally:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
        with connection:
            return {"captured": True, "original_dst": original_destination(connection)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uid", type=int, required=True)
    parser.add_argument("--to", required=True, help="ADDRESS:PORT the application connects to")
    parser.add_argument("--listen", type=int, default=15001)
    parser.add_argument("--timeout", type=float, default=3.0)
    options = parser.parse_args()
    host, port = options.to.rsplit(":", 1)
    print(json.dumps(probe(options.uid, host, int(port), options.listen, options.timeout)))


if __name__ == "__main__":
    main()
