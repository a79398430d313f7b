"""The in-namespace half of tests/beds/flowsender.py: listeners, a flow sender and a command runner.

A child program of tests/beds/bed_common.py (``python -m tests.beds.flowsender_agent '{"tcp": [ports], "udp":
[ports]}'``
in the namespace): it listens on those ports on 0.0.0.0 and :: (transparent sockets, so TPROXY can hand
them packets), prints ``{"ready": true}``, then answers one JSON request per line on stdin with one JSON
line on stdout carrying the request's ``id``. One single-threaded select loop serves everything, so a
client forked by ``send`` can connect to a listener of the same agent. Commands:

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
import subprocess
import sys
from typing import Any

from tests.beds.bed_child import emit, listening_socket, original_dst

EXIT_CODES = {0: "ok", 2: "timeout", 3: "refused", 4: "unreachable", 5: "error"}


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
        self.listeners: dict[socket.socket, tuple[str, int]] = {}  # sock -> (proto, port)
        self.pending: dict[socket.socket, int] = {}  # accepted TCP conn -> listening port
        self.children: dict[int, tuple[int, str, int]] = {}  # pidfd -> (pid, token, request id)
        self.landings: list[dict[str, Any]] = []
        self.buffer = b""

    def listen(self, tcp: list[int], udp: list[int]) -> None:
        for proto, ports in (("tcp", tcp), ("udp", udp)):
            kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
            for port in ports:
                for address in ("0.0.0.0", "::"):
                    sock = listening_socket(address, port, kind, transparent=True)
                    sock.setblocking(False)
                    self.listeners[sock] = (proto, port)

    def on_listener(self, sock: socket.socket) -> None:
        proto, port = self.listeners[sock]
        if proto == "tcp":
            try:
                conn, _ = sock.accept()
            except BlockingIOError:
                return
            conn.setblocking(False)
            self.pending[conn] = port
            return
        try:
            data = sock.recv(256)
        except BlockingIOError:
            return
        self.landings.append({"token": data.decode().strip(), "proto": "udp", "port": port, "orig": None})

    def on_connection(self, conn: socket.socket) -> None:
        port = self.pending[conn]
        try:
            data = conn.recv(256)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        token = data.decode(errors="replace").strip()
        if token:
            orig, _ = original_dst(conn)
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
        self.children[os.pidfd_open(pid)] = (pid, request["token"], request["id"])

    def on_child(self, pidfd: int) -> None:
        pid, token, request_id = self.children.pop(pidfd)
        os.close(pidfd)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        emit({"id": request_id, "token": token, "result": EXIT_CODES.get(code, f"exit {code}")})

    def command(self, request: dict[str, Any]) -> None:
        op, request_id = request["op"], request["id"]
        if op == "send":
            self.send(request)
        elif op == "landings":
            emit({"id": request_id, "landings": self.landings})
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
            emit({"id": request_id, "rc": done.returncode, "stdout": done.stdout, "stderr": done.stderr})
        else:
            emit({"id": request_id, "error": f"unknown op {op!r}"})

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
    agent = Agent()
    ports = json.loads(sys.argv[1])
    agent.listen(ports.get("tcp", []), ports.get("udp", []))
    emit({"ready": True})
    agent.serve()
