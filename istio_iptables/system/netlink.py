"""Raw netlink: the one request/answer loop behind every kernel conversation of ours that needs no program.

The namespace's addresses (``system/host.py``), policy rules, routes and lo's ``::6``
(``system/routes.py``) and nf_tables' table list (``system/nf_tables.py``) are a few fixed-format
messages each. pyroute2, which could send them, costs 90-160 ms to import (its package imports
everything), more than a whole init run (docs/speed.md); these messages cost ~0.1 ms each.
Only the C ``_socket`` module and ``struct``: cheap enough for every entry path.
"""

from __future__ import annotations

import _socket as socket  # the C module: socket.py's enums cost ~4 ms we do not need
import struct
from collections.abc import Iterator

NETLINK_ROUTE = 0
NETLINK_NETFILTER = 12

NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_DUMP = 0x300
_NLMSG_ERROR = 2
_NLMSG_DONE = 3

HEADER = struct.Struct("=LHHLL")  # length, type, flags, sequence, port id
_ATTRIBUTE = struct.Struct("=HH")  # length, type
_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER
_TIMEOUT = 5.0  # seconds: a kernel answers at once; never wait forever on a socket

Attributes = dict[int, bytes]


def attribute(kind: int, payload: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    size = _ATTRIBUTE.size + len(payload)
    return _ATTRIBUTE.pack(size, kind) + payload + b"\0" * (-size % 4)


def u32(kind: int, value: int) -> bytes:
    return attribute(kind, struct.pack("=I", value))


def read_u32(attributes: Attributes, kind: int) -> int | None:
    raw = attributes.get(kind)
    return struct.unpack("=I", raw[:4])[0] if raw is not None and len(raw) >= 4 else None


def parse_attributes(data: bytes, start: int, end: int) -> Attributes:
    found: Attributes = {}
    while start + _ATTRIBUTE.size <= end:
        size, kind = _ATTRIBUTE.unpack_from(data, start)
        if size < _ATTRIBUTE.size:
            break
        found[kind & _TYPE_MASK] = data[start + _ATTRIBUTE.size : start + size]
        start += (size + 3) & ~3
    return found


def dump(protocol: int, kind: int, body: bytes, header_size: int) -> list[tuple[int, bytes, Attributes]]:
    """Every answer to a dump request: (message type, fixed header of ``header_size`` bytes, attributes).

    Raises OSError (the kernel's errno) or ValueError (an answer we cannot read).
    """
    found: list[tuple[int, bytes, Attributes]] = []
    for answer_kind, data, start, end in _exchange(protocol, kind, NLM_F_REQUEST | NLM_F_DUMP, body):
        fixed = data[start : start + header_size]
        if len(fixed) < header_size:
            raise ValueError("truncated netlink message")
        found.append((answer_kind, fixed, parse_attributes(data, start + header_size, end)))
    return found


def request(protocol: int, kind: int, flags: int, body: bytes) -> int:
    """Send one change and wait for its acknowledgement: 0, or the kernel's errno (EEXIST, ENOENT, ...)."""
    try:
        for _ in _exchange(protocol, kind, NLM_F_REQUEST | NLM_F_ACK | flags, body):
            pass
    except OSError as error:
        if error.errno is None:
            raise
        return error.errno
    return 0


def _exchange(protocol: int, kind: int, flags: int, body: bytes) -> Iterator[tuple[int, bytes, int, int]]:
    """Send one request; yield (type, data, start, end) of each answer until the kernel is done."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, protocol)
    try:
        sock.settimeout(_TIMEOUT)
        sock.bind((0, 0))
        sequence = 1
        sock.send(HEADER.pack(HEADER.size + len(body), kind, flags, sequence, 0) + body)
        while True:
            data = sock.recv(1 << 16)
            if not data:
                raise ValueError("netlink closed before its answer")
            offset = 0
            while offset + HEADER.size <= len(data):
                length, answer, _flags, seq, _port = HEADER.unpack_from(data, offset)
                if length < HEADER.size or offset + length > len(data):
                    raise ValueError("truncated netlink message")
                if seq == sequence:
                    if answer == _NLMSG_ERROR:
                        (code,) = struct.unpack_from("=i", data, offset + HEADER.size)
                        if code:
                            raise OSError(-code, f"netlink error {-code}")
                        return  # the acknowledgement of a change
                    if answer == _NLMSG_DONE:
                        return
                    yield answer, data, offset + HEADER.size, offset + length
                offset += (length + 3) & ~3
    finally:
        sock.close()
