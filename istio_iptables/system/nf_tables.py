"""Which nf_tables tables this network namespace holds, asked of the kernel in-process (~0.2 ms).

Starting ``nft list tables`` or an ``iptables-nft-save`` that prints nothing costs a process (a few
ms each, more on a loaded node); one nfnetlink dump of the tables (``NFT_MSG_GETTABLE``, the
request ``nft list tables`` itself sends, through :mod:`istio_iptables.system.netlink`) says
whether there is anything to read at all. Cheap enough for every entry path, the init path included.

The answer is evidence of absence only: any failure (no nf_tables, a refused socket, an answer we
cannot read) gives None, and the caller runs the program as before.
"""

from __future__ import annotations

import struct

from istio_iptables.system import netlink

_NFNL_SUBSYS_NFTABLES = 10
_NFT_MSG_NEWTABLE = 0
_NFT_MSG_GETTABLE = 1
_NFTA_TABLE_NAME = 1
_NFGENMSG = struct.Struct("=BBH")  # family, version, resource id (big endian, unused here)
# nf_tables families (linux/netfilter.h NFPROTO_*), spelled as nft spells them.
FAMILIES = {1: "inet", 2: "ip", 3: "arp", 5: "netdev", 7: "bridge", 10: "ip6"}


def table_names() -> set[tuple[str, str]] | None:
    """(family, name) of every nf_tables table of this network namespace; None if the kernel's answer
    cannot be had or read (the caller then asks ``nft`` or iptables-nft, as it would have)."""
    try:
        answers = netlink.dump(
            netlink.NETLINK_NETFILTER,
            (_NFNL_SUBSYS_NFTABLES << 8) | _NFT_MSG_GETTABLE,
            _NFGENMSG.pack(0, 0, 0),  # AF_UNSPEC: every family
            _NFGENMSG.size,
        )
    except (OSError, ValueError, struct.error):
        return None
    found: set[tuple[str, str]] = set()
    for kind, fixed, attributes in answers:
        if kind != (_NFNL_SUBSYS_NFTABLES << 8) | _NFT_MSG_NEWTABLE:
            continue
        family, name = FAMILIES.get(fixed[0]), attributes.get(_NFTA_TABLE_NAME)
        if family is None or name is None:
            return None  # a family we do not know, or a table without a name: no evidence at all
        try:
            found.add((family, name.split(b"\0", 1)[0].decode()))
        except UnicodeDecodeError:
            return None
    return found
