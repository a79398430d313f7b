"""The in-namespace half of tests/flowsender.py: listeners, a flow sender and a command runner.

Started with ``ip netns exec NS python3 flowsender_agent.py``; speaks one JSON object per line on
stdin/stdout. One single-threaded select loop serves everything, so a client forked by ``send`` can
connect to a listener of the same agent. Commands:

- ``{"op": "listen", "tcp": [ports], "udp": [ports]}``: listen on 0.0.0.0 and :: (transparent sockets,
  so TPROXY can hand them packets);
- ``{"op": "send", "token", "proto", "dst", "dport", "src"?, "sport"?, "uid", "gid", "timeout"}``: fork a client
  that drops to uid/gid and sends the token (TCP: connect, send, wait for the listener to close);
- ``{"op": "landings"}``: the tokens the listeners received since the last call, with the listening
  port and the original destination (SO_ORIGINAL_DST, or the local address for TPROXY'd sockets);
- ``{"op": "exec", "argv", "input"?}``: run a command in the namespace (iptables-restore, -save -c).
"""

from __future__ import annotations

import errno
import json
import os
import select
import socket
import struct
import subprocess
import sys
from typing import Any

SO_ORIGINAL_DST = 80
IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75
EXIT_CODES = {0: "ok", 2: "timeout", 3: "refused", 4: "unreachable", 5: "error"}


def original_destination(conn: socket.socket, family: int) -> str:
    try:
        if family == socket.AF_INET:
            raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            port = struct.unpack_from("!H", raw, 2)[0]
            return f"{socket.inet_ntop(socket.AF_INET, raw[4:8])}:{port}"
        raw = conn.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
        port = struct.unpack_from("!H", raw, 2)[0]
        return f"[{socket.inet_ntop(socket.AF_INET6, raw[8:24])}]:{port}"
    except OSError:
        host, port = conn.getsockname()[:2]
        return f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"


def client(request: dict[str, Any]) -> int:
    """Runs in the forked child: become uid/gid, send the token, report by exit code."""
    os.setgroups([])
    os.setgid(request["gid"])
    os.setuid(request["uid"])
    family = socket.AF_INET6 if ":" in request["dst"] else socket.AF_INET
    kind = socket.SOCK_STREAM if request["proto"] == "tcp" else socket.SOCK_DGRAM
    sock = socket.socket(family, kind)
    sock.settimeout(request["timeout"])
    try:
        if request.get("src") or request.get("sport"):
            wildcard = "::" if family == socket.AF_INET6 else "0.0.0.0"
            sock.bind((request.get("src") or wildcard, request.get("sport") or 0))
        sock.connect((request["dst"], request["dport"]))
        sock.send((request["token"] + "\n").encode())
        if kind == socket.SOCK_STREAM:
            while sock.recv(64):
                pass
    except TimeoutError:
        return 2
    except ConnectionRefusedError:
        return 3
    except OSError as error:
        if error.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            return 4
        sys.stderr.write(f"client: {error}\n")
        return 5
    return 0


class Agent:
    def __init__(self) -> None:
        self.listeners: dict[socket.socket, tuple[str, int, int]] = {}  # sock -> (proto, port, family)
        self.pending: dict[socket.socket, tuple[int, int]] = {}  # accepted TCP conn -> (port, family)
        self.children: dict[int, tuple[int, str]] = {}  # pidfd -> (pid, token)
        self.landings: list[dict[str, Any]] = []
        self.buffer = b""

    def reply(self, data: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(data) + "\n")
        sys.stdout.flush()

    def listen(self, tcp: list[int], udp: list[int]) -> None:
        for proto, ports in (("tcp", tcp), ("udp", udp)):
            for port in ports:
                for family, address in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
                    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
                    sock = socket.socket(family, kind)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    if family == socket.AF_INET6:
                        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
                    else:
                        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
                    sock.bind((address, port))
                    if proto == "tcp":
                        sock.listen(64)
                    sock.setblocking(False)
                    self.listeners[sock] = (proto, port, family)

    def on_listener(self, sock: socket.socket) -> None:
        proto, port, family = self.listeners[sock]
        if proto == "tcp":
            try:
                conn, _ = sock.accept()
            except BlockingIOError:
                return
            conn.setblocking(False)
            self.pending[conn] = (port, family)
            return
        try:
            data = sock.recv(256)
        except BlockingIOError:
            return
        self.landings.append({"token": data.decode().strip(), "proto": "udp", "port": port, "orig": None})

    def on_connection(self, conn: socket.socket) -> None:
        port, family = self.pending[conn]
        try:
            data = conn.recv(256)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        token = data.decode(errors="replace").strip()
        if token:
            orig = original_destination(conn, family)
            self.landings.append({"token": token, "proto": "tcp", "port": port, "orig": orig})
        del self.pending[conn]
        conn.close()

    def send(self, request: dict[str, Any]) -> None:
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            code = 5
            try:
                code = client(request)
            finally:
                os._exit(code)
        self.children[os.pidfd_open(pid)] = (pid, request["token"])

    def on_child(self, pidfd: int) -> None:
        pid, token = self.children.pop(pidfd)
        os.close(pidfd)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        self.reply({"token": token, "result": EXIT_CODES.get(code, f"exit {code}")})

    def command(self, request: dict[str, Any]) -> None:
        op = request["op"]
        if op == "listen":
            self.listen(request.get("tcp", []), request.get("udp", []))
            self.reply({"ok": True})
        elif op == "send":
            self.send(request)
        elif op == "landings":
            self.reply({"landings": self.landings})
            self.landings = []
        elif op == "exec":
            done = subprocess.run(
                request["argv"],
                input=request.get("input"),
                capture_output=True,
                text=True,
                check=False,
                timeout=60,
            )
            self.reply({"rc": done.returncode, "stdout": done.stdout, "stderr": done.stderr})
        else:
            self.reply({"error": f"unknown op {op!r}"})

    def serve(self) -> None:
        stdin = sys.stdin.fileno()
        while True:
            readable, _, _ = select.select([stdin, *self.listeners, *self.pending, *self.children], [], [])
            # Sockets first: a landing must be recorded before the client's result is reported.
            for item in sorted(readable, key=lambda r: isinstance(r, int)):
                if item in self.listeners:
                    self.on_listener(item)
                elif item in self.pending:
                    self.on_connection(item)
            for item in readable:
                if isinstance(item, int) and item in self.children:
                    self.on_child(item)
            if stdin in readable:
                chunk = os.read(stdin, 65536)
                if not chunk:
                    return
                self.buffer += chunk
                while b"\n" in self.buffer:
                    line, self.buffer = self.buffer.split(b"\n", 1)
                    if line.strip():
                        self.command(json.loads(line))


if __name__ == "__main__":
    Agent().serve()
