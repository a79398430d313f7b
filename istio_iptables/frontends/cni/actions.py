"""The plugin's calls into the engine: apply, cleanup and the drift check, in the pod's namespace.

One small function per CNI command, each mapping onto the engine's action (apply, cleanup, check:
:func:`istio_iptables.engine.actions.execute`, as the CLI calls it), never a copy of it.

Pods with their own user namespace (``hostUsers: false``): their network namespace belongs to
that user namespace, and the kernel accepts owner (uid/gid) matches only from a writer in the
namespace's own user namespace (from the host's: EINVAL); it reads their uids through that
namespace's map, so 1337 is the pod's 1337. Istio runs
iptables there through ``nsenter --user --net``; we fork once, enter the user namespace and then
the network namespace, and run the same action in the child.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable

from istio_iptables.config.sidecar import RawSettings, Setting
from istio_iptables.errors import DriftError, EnvironmentProblem, IstioIptablesError

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
NS_GET_USERNS = 0xB701  # _IO(0xb7, 0x1), linux/nsfs.h


def apply_rules(raw: RawSettings, netns: str) -> None:
    """ADD: write the pod's rules (idempotent; a repeated ADD finds them in place)."""
    _in_pod_namespace(netns, lambda enter, entered: _execute("apply", raw, enter, entered))


def remove_rules(netns: str, native_nftables: bool) -> None:
    """DEL: remove exactly what we added; a namespace that is gone has nothing left to remove."""
    if not netns or not os.path.exists(netns):
        return
    flags = {"cleanup_only": Setting("true", "CNI DEL"), "cni_mode": Setting("true", "istio-cni")}
    if native_nftables:
        flags["native_nftables"] = Setting("true", "native_nftables")
    raw = RawSettings(values={"proxy_uid": Setting("1337", "istio-cni")}, flags=flags, enable_ipv6=False)
    _in_pod_namespace(netns, lambda enter, entered: _execute("cleanup", raw, enter, entered))


def check_rules(raw: RawSettings, netns: str) -> None:
    """CHECK: raise :class:`DriftError` unless the namespace holds exactly the pod's rules (reads only)."""
    _in_pod_namespace(netns, lambda enter, entered: _execute("check", raw, enter, entered))


def _execute(action_name: str, raw: RawSettings, enter: str, entered: str) -> None:
    """The engine's action in the pod's namespace: ``enter`` it, or it is ``entered`` already."""
    from istio_iptables.config.sidecar import parse
    from istio_iptables.engine.actions import Action, execute
    from istio_iptables.system.host import RealHost

    action = {"apply": Action.APPLY, "cleanup": Action.CLEANUP, "check": Action.CHECK}[action_name]
    execute(action, lambda: parse(raw, RealHost()), io.StringIO(), namespace=enter, source="CNI_NETNS",
            entered_path=entered)


def _in_pod_namespace(netns: str, action: Callable[[str, str], None]) -> None:
    """Run ``action(enter, entered)`` for the pod's network namespace: the engine enters it
    (``enter``), or, when the pod has its own user namespace, a child enters both and runs the
    action there (``entered``)."""
    user_namespace = _own_user_namespace(netns)
    if user_namespace is None:
        action(netns, "")
        return
    try:
        _in_child(user_namespace, netns, lambda path: action("", path))
    finally:
        os.close(user_namespace)


def _own_user_namespace(netns: str) -> int | None:
    """A descriptor of the user namespace owning ``netns`` when it is not ours (``hostUsers: false``)."""
    import fcntl

    try:
        target = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None  # entered() reports it, naming CNI_NETNS
    try:
        owner = fcntl.ioctl(target, NS_GET_USERNS)
    except OSError:
        return None  # not a namespace file, or a kernel without the ioctl: nothing to enter
    finally:
        os.close(target)
    if os.fstat(owner).st_ino == os.stat("/proc/self/ns/user").st_ino:
        os.close(owner)
        return None
    return owner


# What the actions import lazily: loaded before the fork, because after it our uid is the pod's
# root, which may not read the host's Python installation (e.g. under /root).
_PRELOAD = (
    "ctypes", "dataclasses", "difflib", "grp", "pwd", "_socket", "encodings.ascii", "encodings.latin_1",
    "istio_iptables.system.host", "istio_iptables.engine.actions", "istio_iptables.engine.forms",
    "istio_iptables.engine.seam", "istio_iptables.system.real", "istio_iptables.system.netns",
    "istio_iptables.system.nslock",
    "istio_iptables.policy.sidecar_xtables", "istio_iptables.engine.xtables", "istio_iptables.system.xtables_backend",
    "istio_iptables.xtables.reconcile", "istio_iptables.system.xtables_restore", "istio_iptables.system.routes",
    "istio_iptables.system.ipset", "istio_iptables.engine.nft",
    "istio_iptables.system.nft",
    "istio_iptables.policy.sidecar_nft", "istio_iptables.nft.render", "istio_iptables.engine.validation",
)


def _preload() -> None:
    import importlib

    for name in _PRELOAD:
        importlib.import_module(name)


def _in_child(user_namespace: int, netns: str, action: Callable[[str], None]) -> None:
    import json

    _preload()
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: enter, act, report, and leave without the parent's cleanup
        os.close(reader)
        outcome: dict[str, object] = {"ok": True}
        try:
            net = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
            _enter_namespace_fd(user_namespace, CLONE_NEWUSER, "the pod's user namespace")
            _enter_namespace_fd(net, CLONE_NEWNET, "the pod's network namespace")
            _become_namespace_root()
            action(netns)
        except IstioIptablesError as error:
            outcome = {"ok": False, "kind": type(error).__name__, "message": str(error), "code": int(error.exit_code)}
        except BaseException as error:  # reported by the parent, never a traceback on a runtime's stdout
            outcome = {"ok": False, "kind": "EnvironmentProblem", "message": repr(error), "code": 4}
        os.write(writer, json.dumps(outcome).encode())
        os._exit(0)
    os.close(writer)
    with os.fdopen(reader, "rb") as pipe:
        report = pipe.read()
    os.waitpid(pid, 0)
    try:
        outcome = json.loads(report)
    except ValueError:
        raise EnvironmentProblem("the process that entered the pod's user namespace died") from None
    if not outcome["ok"]:
        error = IstioIptablesError(outcome["message"])
        error.exit_code = outcome["code"]  # type: ignore[misc]
        if outcome["kind"] == "DriftError":
            raise DriftError(outcome["message"])
        raise error


def _become_namespace_root() -> None:
    """Be uid/gid 0 of the pod's user namespace, as ``nsenter --user`` does.

    Our host uid 0 is not mapped in the pod's user namespace: without this, the iptables and nft
    programs we start would run as the overflow uid and lose every capability at exec.
    """
    import contextlib

    with contextlib.suppress(OSError):  # /proc/PID/setgroups is "deny" there: keep what we have
        os.setgroups([])
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)


def _enter_namespace_fd(descriptor: int, kind: int, what: str) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(descriptor, kind) != 0:
        raise EnvironmentProblem(f"cannot enter {what}: {os.strerror(ctypes.get_errno())}")
