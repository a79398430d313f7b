"""Which nf_tables tables this network namespace holds, asked of the kernel in-process (~0.2 ms).

Starting ``nft list tables`` or an ``iptables-nft-save`` that prints nothing costs a process (a few
ms each, more on a loaded node); one nfnetlink dump of the tables (``NFT_MSG_GETTABLE``, the
request ``nft list tables`` itself sends) says whether there is anything to read at all. Only
the C ``_socket`` module and ``struct``: cheap enough for every entry path, the init path included.

The answer is evidence of absence only: any failure (no nf_tables, a refused socket, an answer we
cannot read) gives None, and the caller runs the program as before.
"""

from __future__ import annotations

import _socket as socket  # the C module: socket.py adds ms of enums we do not need
import struct

_NETLINK_NETFILTER = 12
_NFNL_SUBSYS_NFTABLES = 10
_NFT_MSG_NEWTABLE = 0
_NFT_MSG_GETTABLE = 1
_NLM_F_REQUEST = 0x1
_NLM_F_DUMP = 0x300
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_NFTA_TABLE_NAME = 1
_NLMSG_HEADER = struct.Struct("=LHHLL")  # length, type, flags, sequence, port id
_NFGENMSG = struct.Struct("=BBH")  # family, version, resource id (big endian, unused here)
_NLATTR = struct.Struct("=HH")  # length, type
_NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER
# nf_tables families (linux/netfilter.h NFPROTO_*), spelled as nft spells them.
FAMILIES = {1: "inet", 2: "ip", 3: "arp", 5: "netdev", 7: "bridge", 10: "ip6"}


def table_names() -> set[tuple[str, str]] | None:
    """(family, name) of every nf_tables table of this network namespace; None if the kernel's answer
    cannot be had or read (the caller then asks ``nft`` or iptables-nft, as it would have)."""
    try:
        return _dump_tables()
    except (OSError, ValueError, struct.error, UnicodeDecodeError):
        return None


def _dump_tables() -> set[tuple[str, str]]:
    request_type = (_NFNL_SUBSYS_NFTABLES << 8) | _NFT_MSG_GETTABLE
    answer_type = (_NFNL_SUBSYS_NFTABLES << 8) | _NFT_MSG_NEWTABLE
    body = _NFGENMSG.pack(0, 0, 0)  # AF_UNSPEC: every family
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER)
    try:
        sock.settimeout(5)
        sock.bind((0, 0))
        sequence = 1
        sock.send(
            _NLMSG_HEADER.pack(_NLMSG_HEADER.size + len(body), request_type, _NLM_F_REQUEST | _NLM_F_DUMP, sequence, 0)
            + body
        )
        found: set[tuple[str, str]] = set()
        while True:
            data = sock.recv(1 << 16)
            if not data:
                raise ValueError("netlink closed before the end of the dump")
            offset = 0
            while offset + _NLMSG_HEADER.size <= len(data):
                length, kind, _flags, seq, _port = _NLMSG_HEADER.unpack_from(data, offset)
                if length < _NLMSG_HEADER.size or offset + length > len(data):
                    raise ValueError("truncated netlink message")
                if seq != sequence:
                    raise ValueError("netlink answer to another request")
                if kind == _NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", data, offset + _NLMSG_HEADER.size)
                    if code:
                        raise OSError(-code, "nf_tables refused the table dump")
                    return found
                if kind == _NLMSG_DONE:
                    return found
                if kind == answer_type:
                    family = FAMILIES.get(data[offset + _NLMSG_HEADER.size], "")
                    name = _table_name(data, offset + _NLMSG_HEADER.size + _NFGENMSG.size, offset + length)
                    if not family or name is None:
                        raise ValueError("a table of an unknown family, or without a name")
                    found.add((family, name))
                offset += (length + 3) & ~3
    finally:
        sock.close()


def _table_name(data: bytes, at: int, end: int) -> str | None:
    while at + _NLATTR.size <= end:
        size, code = _NLATTR.unpack_from(data, at)
        if size < _NLATTR.size:
            break
        if code & _NLA_TYPE_MASK == _NFTA_TABLE_NAME:
            return data[at + _NLATTR.size : at + size].split(b"\0", 1)[0].decode()
        at += (size + 3) & ~3
    return None
