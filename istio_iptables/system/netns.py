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
NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3), Linux 4.11+
NAMESPACE_KINDS = {
    0x00020000: "mount",
    0x02000000: "cgroup",
    0x04000000: "UTS",
    0x08000000: "IPC",
    0x10000000: "user",
    0x20000000: "PID",
    0x00000080: "time",
}
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


def open_network_namespace(path: str, value: str, source: str) -> int:
    """Open ``path`` if it is a network namespace; anything else is bad input (exit 2), at once.

    Namespace files are regular files of nsfs: a device, FIFO or directory is refused before it
    is opened (a FIFO would block, a device could act), then the kernel says which kind of
    namespace the file is (NS_GET_NSTYPE): a mount namespace or a plain file is refused too.
    """
    import stat

    def refuse(reason: str) -> ConfigError:
        return ConfigError(source, value, f"{path} {reason}")

    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        raise refuse(f"cannot be opened: {error.strerror}") from None
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
        raise refuse(f"is {kind}, not a network namespace (e.g. /run/netns/NAME or /proc/PID/ns/net)")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as error:
        raise refuse(f"cannot be opened: {error.strerror}") from None
    try:
        import fcntl

        kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError:
        os.close(fd)
        raise refuse("is not a namespace file (e.g. /run/netns/NAME or /proc/PID/ns/net)") from None
    if kind != CLONE_NEWNET:
        os.close(fd)
        name = NAMESPACE_KINDS.get(kind, f"type {kind:#x}")
        raise refuse(f"is a {name} namespace, not a network namespace")
    return fd


@contextmanager
def entered(name_or_path: str, source: str = "--network-namespace") -> Iterator[str]:
    """Enter the namespace for the duration of the block; yields its path ("" when none was asked)."""
    if not name_or_path:
        yield ""
        return
    path = namespace_path(name_or_path)
    target = open_network_namespace(path, name_or_path, source)
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


CLONE_NEWNS = 0x00020000
MS_BIND, MS_REC, MS_PRIVATE, MS_SLAVE = 0x1000, 0x4000, 0x40000, 0x80000
NSSWITCH = "/etc/nsswitch.conf"
GLOBAL_XTABLES_LOCK = "/run/xtables.lock"


def enter_cni_sandbox() -> bool:
    """``--cni-mode``: every program we start from now on runs in a private mount namespace where
    ``/etc/nsswitch.conf`` is ``/dev/null`` and ``/run/xtables.lock`` is this network namespace.

    As Istio's CNI plugin sandboxes each iptables command: the plugin runs in the pod's network
    namespace but on the node's filesystem, where an NSS module (LDAP, sssd) could make ``-m owner``
    lookups hang on a network the pod does not have yet, and where the node-wide xtables lock
    would make pods wait for kube-proxy. XTABLES_LOCKFILE already points iptables 1.8.6+ at the
    namespace; the bind mount does the same for older iptables, which ignore the variable.

    Done once for the whole process (we are single-threaded, which unshare(CLONE_NEWNS) requires)
    rather than per child: the saves that detect the backend run sandboxed too. Best effort as
    in Istio: if the kernel or a security policy refuses, it warns and runs unsandboxed.
    """
    import ctypes

    from istio_iptables._lib.log import log

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]

    def mount(source: str, target: str, flags: int) -> int:
        if libc.mount(source.encode(), target.encode(), None, flags, None) == 0:
            return 0
        return ctypes.get_errno()

    def give_up(step: str, error: int) -> bool:
        log.warning("--cni-mode: cannot sandbox our iptables commands (%s: %s); running them as they are",
                    step, os.strerror(error))
        return False

    if libc.unshare(CLONE_NEWNS) != 0:
        return give_up("unshare(CLONE_NEWNS)", ctypes.get_errno())
    # Private, or at least slave (some seccomp/LSM policies refuse MS_PRIVATE): our mounts must
    # never propagate to the node.
    error = mount("", "/", MS_REC | MS_PRIVATE)
    if error and mount("", "/", MS_REC | MS_SLAVE):
        return give_up("making / private", error)
    if os.path.exists(GLOBAL_XTABLES_LOCK):
        error = mount("/proc/self/ns/net", GLOBAL_XTABLES_LOCK, MS_BIND)
        if error:
            return give_up(f"bind mount over {GLOBAL_XTABLES_LOCK}", error)
    if os.path.exists(NSSWITCH):
        error = mount("/dev/null", NSSWITCH, MS_BIND)
        if error:
            return give_up(f"bind mount over {NSSWITCH}", error)
    log.debug("--cni-mode: commands run with /dev/null as %s and the namespace as the xtables lock", NSSWITCH)
    return True
