"""``--network-namespace``: run in another network namespace, and come back afterwards.

Python 3.11 has no ``os.setns``; libc's ``setns(2)`` through ctypes costs a few milliseconds,
where pyroute2.netns would cost its ~350 ms import. Only the calling thread moves (children
it starts inherit the namespace); the original namespace is re-entered on exit, so an
in-process caller is not left elsewhere.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from istio_iptables.errors import ConfigError, EnvironmentProblem

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"


def namespace_path(name_or_path: str) -> str:
    """A bare name lives under /run/netns (as ``ip netns`` makes them); anything with a slash is a path."""
    return name_or_path if "/" in name_or_path else os.path.join(NETNS_RUN_DIR, name_or_path)


def _setns(fd: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        error = ctypes.get_errno()
        raise EnvironmentProblem(
            f"cannot enter the network namespace: {os.strerror(error)} (needs CAP_SYS_ADMIN, i.e. root)"
        )


@contextmanager
def entered(name_or_path: str, source: str = "--network-namespace") -> Iterator[str]:
    """Enter the namespace for the duration of the block; yields its path ("" when none was asked)."""
    if not name_or_path:
        yield ""
        return
    path = namespace_path(name_or_path)
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as error:
        raise ConfigError(source, name_or_path, f"cannot open {path}: {error.strerror}") from None
    try:
        original = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        os.close(target)
        raise
    try:
        _setns(target)
        try:
            yield path
        finally:
            _setns(original)
    finally:
        os.close(target)
        os.close(original)
