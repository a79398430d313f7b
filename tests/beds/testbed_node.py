"""One process of the test bed: stand-in servers plus a command loop (``python -m tests.beds.testbed_node``).

A node is started by :mod:`tests.beds.testbed` inside a namespace, already running as its uid/gid, as a
child program of :mod:`tests.beds.bed_common`: it takes a JSON configuration as its only argument, opens its
listeners, prints ``{"ready": true}`` and then serves JSON commands from stdin (one per line, each
answered on stdout with its ``id``, concurrently).

Every TCP exchange is one JSON line ``{"token": ..., "hops": [...]}``: each listener that handles it
appends a *hop* (which node and port accepted it, the original destination it recovered, the peer it
saw) and either answers (an end server) or forwards it like Envoy (the stand-in proxy). The client
gets the whole path back in-band, so no event has to be matched across processes.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import threading
from typing import Any

from tests.beds.bed_child import emit, endpoint, family_of, listening_socket, original_dst

TIMEOUT = 3.0
DNS_TXT = 16
SO_MARK = 36


CONFIG: dict[str, Any] = {}


def marked(sock: socket.socket) -> socket.socket:
    """Every socket of a node configured with a ``mark`` carries it (ztunnel's 0x539: SO_MARK, CAP_NET_ADMIN)."""
    if CONFIG.get("mark"):
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, CONFIG["mark"])
    return sock


def parse_endpoint(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def read_line(conn: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


# --- TCP listeners -------------------------------------------------------------
# Two framings share each TCP listener: our JSON line (``{...}\n``) and DNS over TCP (length prefix).


def hop_of(conn: socket.socket, spec: dict[str, Any], proto: str = "tcp") -> dict[str, Any]:
    dst, how = original_dst(conn)
    return {"node": CONFIG["name"], "port": spec["port"], "proto": proto, "original_dst": dst, "how": how,
            "peer": endpoint(conn.getpeername()), "local": endpoint(conn.getsockname())}


def handle_tcp(conn: socket.socket, spec: dict[str, Any]) -> None:
    with conn:
        conn.settimeout(TIMEOUT)
        try:
            json_framing = conn.recv(1, socket.MSG_PEEK) == b"{"
            hop = hop_of(conn, spec)
            if json_framing:
                request = json.loads(read_line(conn))
                request["hops"].append(hop)
                if spec["kind"] in ("echo", "dns"):
                    conn.sendall((json.dumps(request) + "\n").encode())
                else:
                    conn.sendall(forward(spec, hop, (json.dumps(request) + "\n").encode(), read_line, request))
            else:
                query = read_dns_tcp(conn)
                if spec["kind"] == "dns":
                    answer = dns_answer(query, [hop])
                elif spec["kind"] == "echo":
                    return
                else:
                    framed = forward(spec, hop, struct.pack("!H", len(query)) + query, read_dns_tcp_framed, None)
                    # The proxy adds its own hop to the path the answer carries.
                    answer = dns_answer(query, [hop, *json.loads(dns_text(framed[2:]))]) if framed else b""
                if answer:
                    conn.sendall(struct.pack("!H", len(answer)) + answer)
        except (OSError, ValueError, struct.error) as error:
            emit({"log": f"{CONFIG['name']}:{spec['port']}: {error!r}"})


def forward(spec: dict[str, Any], hop: dict[str, Any], payload: bytes, read_reply: Any,
            request: dict[str, Any] | None) -> bytes:
    """Envoy's part: outbound goes to the original (or mapped) destination, inbound to the app.

    Returns the upstream's reply; for JSON requests a failure becomes an ``error`` in the reply.
    """
    def failed(reason: str) -> bytes:
        if request is None:
            return b""
        request["error"] = reason
        return (json.dumps(request) + "\n").encode()

    if parse_endpoint(hop["original_dst"])[1] == spec["port"]:
        return failed("not redirected: the original destination is the listener itself")
    target = CONFIG.get("upstreams", {}).get(hop["original_dst"], hop["original_dst"])
    host, port = parse_endpoint(target)
    family = family_of(host)
    upstream = marked(socket.socket(family, socket.SOCK_STREAM))
    try:
        upstream.settimeout(TIMEOUT)
        if spec["kind"] == "inbound" and spec.get("passthrough_bind", True):
            # Envoy's inbound passthrough binds 127.0.0.6 / ::6, so its own rules let it through.
            upstream.bind(("127.0.0.6" if family == socket.AF_INET else "::6", 0))
        upstream.connect((host, port))
        upstream.sendall(payload)
        reply = read_reply(upstream)
        return reply or failed(f"{CONFIG['name']}:{spec['port']} -> {target}: closed without answering")
    except (OSError, struct.error) as error:
        return failed(f"{CONFIG['name']}:{spec['port']} -> {target}: {error}")
    finally:
        upstream.close()


def read_dns_tcp(conn: socket.socket) -> bytes:
    return recv_exact(conn, struct.unpack("!H", recv_exact(conn, 2))[0])


def read_dns_tcp_framed(conn: socket.socket) -> bytes:
    message = read_dns_tcp(conn)
    return struct.pack("!H", len(message)) + message


def accept_loop(server: socket.socket, spec: dict[str, Any]) -> None:
    while True:
        conn, _ = server.accept()
        threading.Thread(target=handle_tcp, args=(conn, spec), daemon=True).start()


# --- DNS ------------------------------------------------------------------------


def dns_query(name: str, query_id: int) -> bytes:
    labels = b"".join(bytes([len(part)]) + part.encode() for part in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", query_id, 0x0100, 1, 0, 0, 0) + labels + struct.pack("!HH", DNS_TXT, 1)


def dns_answer(query: bytes, hops: list[dict[str, Any]]) -> bytes:
    """A TXT answer to ``query`` carrying the path it took (its hops, as JSON)."""
    end = query.index(b"\0", 12) + 5
    encoded = json.dumps(hops).encode()
    chunks = [encoded[start : start + 255] for start in range(0, len(encoded), 255)]
    strings = b"".join(bytes([len(chunk)]) + chunk for chunk in chunks)
    header = struct.pack("!HHHHHH", struct.unpack("!H", query[:2])[0], 0x8180, 1, 1, 0, 0)
    record = struct.pack("!HHHIH", 0xC00C, DNS_TXT, 1, 0, len(strings)) + strings
    return header + query[12:end] + record


def dns_text(answer: bytes) -> str:
    end = answer.index(b"\0", 12) + 5
    rdlength = struct.unpack("!H", answer[end + 10 : end + 12])[0]
    rdata, text = answer[end + 12 : end + 12 + rdlength], b""
    while rdata:
        text, rdata = text + rdata[1 : 1 + rdata[0]], rdata[1 + rdata[0] :]
    return text.decode()


def dns_udp_loop(server: socket.socket, spec: dict[str, Any]) -> None:
    while True:
        query, peer = server.recvfrom(4096)
        hop = {"node": CONFIG["name"], "port": spec["port"], "proto": "udp", "original_dst": None,
               "how": "udp", "peer": endpoint(peer), "local": endpoint(server.getsockname())}
        try:
            server.sendto(dns_answer(query, [hop]), peer)
        except (OSError, ValueError) as error:
            emit({"log": f"{CONFIG['name']}:{spec['port']}/udp dns: {error!r}"})


def recv_exact(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise OSError("connection closed early")
        data += chunk
    return data


# --- commands (the client side) -------------------------------------------------------


def command(request: dict[str, Any]) -> dict[str, Any]:
    host, port = request["host"], request["port"]
    family = family_of(host)
    timeout = request.get("timeout", TIMEOUT)
    proto = request.get("proto", "tcp")
    sock = marked(socket.socket(family, socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM))
    try:
        sock.settimeout(timeout)
        if request.get("bind"):
            sock.bind((request["bind"], 0))
        if request["op"] == "dns" and proto == "udp":
            query = dns_query(request["name"], request["id"] & 0xFFFF)
            sock.sendto(query, (host, port))
            answer, source = sock.recvfrom(4096)
            return {"hops": json.loads(dns_text(answer)), "reply_from": endpoint(source),
                    "local": endpoint(sock.getsockname())}
        sock.connect((host, port))
        local = endpoint(sock.getsockname())
        if request["op"] == "connect":
            return {"local": local}  # the handshake only: the listener forwards nothing (explain's counter proofs)
        if request["op"] == "dns":
            query = dns_query(request["name"], request["id"] & 0xFFFF)
            sock.sendall(struct.pack("!H", len(query)) + query)
            answer = recv_exact(sock, struct.unpack("!H", recv_exact(sock, 2))[0])
            return {"hops": json.loads(dns_text(answer)), "reply_from": endpoint(sock.getpeername()), "local": local}
        sock.sendall((json.dumps({"token": request["id"], "hops": []}) + "\n").encode())
        reply = read_line(sock)
        if not reply:
            return {"error": "closed without an answer", "local": local}
        answer = json.loads(reply)
        return {"hops": answer["hops"], "error": answer.get("error"), "reply_from": endpoint(sock.getpeername()),
                "local": local}
    except (OSError, ValueError) as error:
        return {"error": f"{type(error).__name__}: {error}"}
    finally:
        sock.close()


def run_command(request: dict[str, Any]) -> None:
    emit({"id": request["id"], **command(request)})


def main() -> None:
    CONFIG.update(json.loads(sys.argv[1]))
    for spec in CONFIG.get("listeners", []):
        # A UDP server answers from the address it is bound to: DNS servers bind each address they serve.
        transparent = spec.get("transparent", False)
        for address in spec.get("addresses", ["0.0.0.0", "::"]):
            tcp = marked(listening_socket(address, spec["port"], socket.SOCK_STREAM, transparent))
            if spec["kind"] == "dns":
                udp = marked(listening_socket(address, spec["port"], socket.SOCK_DGRAM, transparent))
                threading.Thread(target=dns_udp_loop, args=(udp, spec), daemon=True).start()
            threading.Thread(target=accept_loop, args=(tcp, spec), daemon=True).start()
    emit({"ready": True})
    for line in sys.stdin:
        if line.strip():
            threading.Thread(target=run_command, args=(json.loads(line),), daemon=True).start()


if __name__ == "__main__":
    main()
