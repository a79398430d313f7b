"""One run at a time per network namespace: an abstract unix socket bound inside the namespace.

Abstract unix socket names live in the network namespace, not in a filesystem: every process that
is in (or has entered) a namespace — an init container, the CNI plugin on the host, a node agent —
sees the same name, whatever its mount namespace, uid or read-only root. Binding the name is the
lock; the kernel frees it when the holder exits or is killed, so a crashed run never leaves a
stale lock. It is keyed by the namespace itself (its identity, net:[inode]), never by a path.

It cannot collide with iptables' own xtables lock, which is an ``flock`` on a file (in CNI mode
the namespace file itself): our children take that lock while we hold this one.

The socket is inherited by the programs we start, so a killed run holds the lock until its last
child (an iptables-restore still reading its input, say) has exited. The holder listens on it,
so a waiting run can connect and learn the holder's pid and uid from the kernel (``SO_PEERCRED``)
to name it in its messages.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from istio_iptables._lib.log import log
from istio_iptables.errors import ConfigError, EnvironmentProblem

if TYPE_CHECKING:
    import _socket

LOCK_NAME = b"\0istio-iptables/namespace-lock"
DEFAULT_WAIT_SECONDS = 30.0
WAIT_ENV = "ISTIO_IPTABLES_LOCK_WAIT"
MAX_WAIT_SECONDS = 3600
_POLL_SECONDS = 0.02
_UCRED_SIZE = 12  # struct ucred: pid, uid, gid (3 x int)


def wait_seconds(environ: os._Environ[str] | dict[str, str] = os.environ) -> float:
    """``$ISTIO_IPTABLES_LOCK_WAIT`` (seconds, 0-3600, decimals allowed), else 30."""
    text = environ.get(WAIT_ENV, "").strip()
    if not text:
        return DEFAULT_WAIT_SECONDS
    if len(text) > 12 or not text.replace(".", "", 1).isdigit() or not text.isascii():
        raise ConfigError(WAIT_ENV, text[:40], f"must be a number of seconds from 0 to {MAX_WAIT_SECONDS}")
    seconds = float(text)
    if seconds > MAX_WAIT_SECONDS:
        raise ConfigError(WAIT_ENV, text, f"must be a number of seconds from 0 to {MAX_WAIT_SECONDS}")
    return seconds


def namespace_identity() -> str:
    """``net:[inode]`` of this thread's network namespace, as ``ls -l /proc/PID/ns/net`` shows it."""
    try:
        return os.readlink("/proc/thread-self/ns/net")
    except OSError:
        return "this network namespace"


def describe_holder(pid: int, uid: int | None) -> str:
    """``pid 123 (uid 0: istio-iptables -p 15001 ...)``, or what of it is visible from here."""
    if pid <= 0:  # the holder is in a pid namespace we cannot see into
        return "a process outside this pid namespace" + (f" (uid {uid})" if uid is not None else "")
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            argv = cmdline.read(300).replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        argv = ""
    shown = "".join(char if char.isprintable() else "?" for char in argv)[:120]
    details = [f"uid {uid}"] if uid is not None else []
    details += [shown] if shown else []
    return f"pid {pid}" + (f" ({': '.join(details)})" if details else "")


def lock_holder() -> str:
    """Who holds the lock, asked of the kernel: connect to the holder's socket and read its credentials."""
    import _socket  # socket.py would add ~5 ms of imports (selectors, enums) to every run

    probe = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_NONBLOCK | _socket.SOCK_CLOEXEC)
    try:
        probe.connect(LOCK_NAME)
        credentials = probe.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, _UCRED_SIZE)
        pid, uid = (int.from_bytes(credentials[i : i + 4], sys.byteorder, signed=True) for i in (0, 4))
        return describe_holder(pid, uid)
    except OSError:
        return "another process (not identifiable: it does not accept connections)"
    finally:
        probe.close()


def _try_bind() -> _socket.socket | None:
    import _socket

    held = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        held.bind(LOCK_NAME)
    except OSError as error:
        held.close()
        if error.errno == 98:  # EADDRINUSE: someone holds it
            return None
        raise EnvironmentProblem(f"cannot take the per-namespace lock: {error.strerror}") from None
    held.listen(64)  # so that waiting runs can ask who we are
    # Our children (iptables-restore, nft, ipset) inherit it: if this process is killed, the lock
    # lasts until the last of them has finished writing, so the next run reads a settled namespace.
    os.set_inheritable(held.fileno(), True)
    return held


@contextmanager
def namespace_lock(wait: float | None = None) -> Iterator[None]:
    """Hold this network namespace's istio-iptables lock for the block; wait up to ``wait`` s for it.

    On timeout: EnvironmentProblem (exit 4) naming the holder; nothing has been read or written.
    """
    limit = wait_seconds() if wait is None else wait
    held = _try_bind()
    if held is None:
        identity = namespace_identity()
        log.info(
            "waiting up to %gs for another run in network namespace %s to finish: held by %s",
            limit,
            identity,
            lock_holder(),
        )
        deadline = time.monotonic() + limit
        while held is None:
            if time.monotonic() >= deadline:
                raise EnvironmentProblem(
                    f"network namespace {identity} stayed locked by {lock_holder()} for over {limit:g}s "
                    f"(set {WAIT_ENV} to wait longer); nothing was written"
                )
            time.sleep(_POLL_SECONDS)
            held = _try_bind()
        log.info("the other run in network namespace %s finished: going on", identity)
    try:
        yield
    finally:
        held.close()
