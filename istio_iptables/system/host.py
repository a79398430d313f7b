"""The real :class:`~istio_iptables.config.sidecar.Host`: users, groups, addresses and files of this machine.

Only cheap modules are imported here: every pod start runs this, so addresses come from one
netlink dump (:mod:`istio_iptables.system.netlink`) instead of forking ``ip -j addr show``.
"""

from __future__ import annotations

import _socket as socket  # the C module: socket.py adds 2 ms of enums we do not need
import errno
import grp
import ipaddress
import os
import pwd
import stat
import struct

from istio_iptables.errors import EnvironmentProblem

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_RTM_NEWADDR = 20
_RTM_GETADDR = 22
_IFA_ADDRESS = 1
_IFA_LOCAL = 2
_IFADDRMSG = struct.Struct("=BBBBL")  # family, prefix length, flags, scope, interface index
_ADDRESS_SIZE = {socket.AF_INET: 4, socket.AF_INET6: 16}
# The largest file read_text reads (--resolv-conf): far above any resolv.conf, far below memory.
MAX_READ = 128 << 20


class RealHost:
    def user_uid(self, name: str) -> int | None:
        try:
            return pwd.getpwnam(name).pw_uid
        except KeyError:
            return None

    def group_exists(self, name: str) -> bool:
        try:
            grp.getgrnam(name)
        except KeyError:
            return False
        return True

    def addresses(self) -> list[IPAddress]:
        """Addresses by interface index, IPv4 before IPv6 within an interface, as Go lists them."""
        try:
            dump = _netlink_address_dump()
        except (OSError, ValueError) as error:
            raise EnvironmentProblem(
                f"cannot list the namespace's addresses over netlink ({error.strerror or error}); "
                "pass --enable-ipv6 or --disable-ipv6"
            ) from None
        order = {socket.AF_INET: 0, socket.AF_INET6: 1}
        # sorted() is stable: the kernel's order within one interface and family is kept.
        ranked = sorted(dump, key=lambda entry: (entry[0], order[entry[1]]))
        return [ipaddress.ip_address(raw) for _index, _family, raw in ranked]

    def read_text(self, path: str) -> str:
        """A regular file's text, at most :data:`MAX_READ` bytes; OSError for anything else.

        Opened non-blocking, so a FIFO (which would wait for a writer forever) is seen and
        refused, as are devices (``/dev/zero`` never ends) and directories.
        """
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        try:
            status = os.fstat(fd)
            if not stat.S_ISREG(status.st_mode):
                raise OSError(errno.EINVAL, "not a regular file")
            if status.st_size > MAX_READ:
                raise OSError(errno.EFBIG, f"larger than {MAX_READ >> 20} MiB")
            chunks = []
            remaining = MAX_READ + 1  # a file that grows past the limit while read is refused too
            while remaining > 0:
                chunk = os.read(fd, min(remaining, 1 << 20))
                if not chunk:
                    break
                chunks.append(chunk)
                remaining -= len(chunk)
            if remaining <= 0:
                raise OSError(errno.EFBIG, f"larger than {MAX_READ >> 20} MiB")
        finally:
            os.close(fd)
        return b"".join(chunks).decode("utf-8", errors="replace")


def _netlink_address_dump() -> list[tuple[int, int, bytes]]:
    """(interface index, family, address bytes) of every IPv4/IPv6 address, in the kernel's order."""
    from istio_iptables.system import netlink

    found: list[tuple[int, int, bytes]] = []
    body = _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
    for kind, fixed, attributes in netlink.dump(netlink.NETLINK_ROUTE, _RTM_GETADDR, body, _IFADDRMSG.size):
        family, _prefix, _flags, _scope, index = _IFADDRMSG.unpack(fixed)
        size = _ADDRESS_SIZE.get(family)
        # As iproute2 prints "local": IFA_LOCAL (the address itself on point-to-point links), else IFA_ADDRESS.
        raw = attributes.get(_IFA_LOCAL) or attributes.get(_IFA_ADDRESS)
        if kind == _RTM_NEWADDR and size is not None and raw is not None and len(raw) == size:
            found.append((index, family, raw))
    return found
