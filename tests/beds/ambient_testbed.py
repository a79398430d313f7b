"""The sidecar test bed (:mod:`tests.beds.testbed`) with a ztunnel stand-in instead of the sidecar proxy,
for ambient capture with live traffic (root only). Same namespaces, wiring, app and remote side; only
the pod's proxy differs.

The rules are written by the real engine, as Istio's node agent would have them written: ``load``
runs ``istio-iptables ambient --network-namespace NS`` (the bed's backend chosen with
``--force-iptables-binary`` or ``--native-nftables``, and the bed's own ``XTABLES_LOCKFILE``), which
writes the rules and the in-pod policy routing (or, with ``--host``, the node's rules and probe sets);
``unload`` runs the same command with ``--cleanup-only``; ``enrol_probe_addresses`` is the node
agent's per-pod update, ``ambient --host ... --enrol ADDRS --pod-uid UID`` in the node namespace.
(Before issue 14's engine work the bed loaded ``ambient --dry-run`` by hand; nothing here loads a
dry run any more, so a live-traffic test fails when apply does.)
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.beds.testbed import CLI, Testbed
from tests.support.netns import NetNS

ZTUNNEL_MARK = 0x539
ZTUNNEL_PORTS = {"outbound": 15001, "inbound": 15006, "hbone": 15008, "dns": 15053}


@dataclass
class AmbientTestbed(Testbed):
    """The pod runs ``app`` and ``ztunnel`` (every socket marked 0x539, as ztunnel's are); ``load``
    applies ``istio-iptables ambient`` for real. ``remote`` doubles as the node: it is the pod's
    gateway, so the host rules' SNAT is undone there."""

    __test__ = False
    # What ``load`` last applied in each namespace (by name): ``unload`` and ``enrol_probe_addresses``
    # repeat those flags, so that their run is the same configuration (not drift).
    loaded: dict[str, tuple[str, ...]] = field(init=False, default_factory=dict)

    def _proxy_node(self) -> dict[str, Any]:
        return {
            "name": "ztunnel",
            "mark": ZTUNNEL_MARK,
            "listeners": [
                {"port": ZTUNNEL_PORTS["outbound"], "kind": "outbound"},
                # ztunnel connects to the app itself (marked), not from Envoy's 127.0.0.6.
                {"port": ZTUNNEL_PORTS["inbound"], "kind": "inbound", "passthrough_bind": False},
                {"port": ZTUNNEL_PORTS["hbone"], "kind": "echo"},
                {"port": ZTUNNEL_PORTS["dns"], "kind": "dns", "addresses": ["127.0.0.1", "::1"]},
            ],
        }

    def _environment(self) -> dict[str, str]:
        # Our own xtables lock: other people's tests never wait on ours (tests/support/netns.py's advice).
        # The file exists before any run: iptables would create it, our engine only opens it.
        lock = Path(tempfile.gettempdir()) / f"xtables-{self.pod.name}.lock"
        lock.touch(exist_ok=True)
        return {"XTABLES_LOCKFILE": str(lock)}

    def ambient(self, namespace: NetNS, *argv: str) -> subprocess.CompletedProcess[str]:
        """``istio-iptables ambient --network-namespace NAMESPACE`` on this bed's backend; raises if it fails."""
        selection = (["--native-nftables"] if self.backend == "native-nftables"
                     else ["--force-iptables-binary", self.backend])
        command = [*CLI, "ambient", "--network-namespace", namespace.path, *selection, *argv]
        result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=120,
                                env={**os.environ, **self._environment()})
        if result.returncode != 0:
            raise RuntimeError(f"istio-iptables ambient {' '.join(argv)} in {namespace.name} failed "
                               f"({result.returncode}):\n{result.stderr}")
        return result

    def load(self, *argv: str, namespace: NetNS | None = None) -> subprocess.CompletedProcess[str]:
        """Apply ``istio-iptables ambient ARGV`` in the pod (or ``namespace``, e.g. the node: ``--host``)."""
        target = namespace or self.pod
        result = self.ambient(target, *argv)
        self.loaded[target.name] = _without_enrolment(argv)
        return result

    def unload(self, namespace: NetNS | None = None) -> subprocess.CompletedProcess[str]:
        """``ambient --cleanup-only`` with the flags ``load`` applied there."""
        target = namespace or self.pod
        return self.ambient(target, *self.loaded.pop(target.name, ()), "--cleanup-only")

    def enrol_probe_addresses(self, addresses: Sequence[str], pod_uid: str = "pod-uid") -> None:
        """What the node agent does per pod: its addresses into the node's probe sets, with the node's
        flags as ``load`` applied them (or the node's defaults, IPv6 included)."""
        native = ("--kubelet-uid", "0") if self.backend == "native-nftables" else ()
        host = self.loaded.get(self.remote.name) or ("--host", "--enable-ipv6", *native)
        self.ambient(self.remote, *host, "--enrol", ",".join(addresses), "--pod-uid", pod_uid)
        self.loaded[self.remote.name] = host

    def close(self) -> None:
        super().close()
        if getattr(self, "pod", None) is not None:
            (Path(tempfile.gettempdir()) / f"xtables-{self.pod.name}.lock").unlink(missing_ok=True)


def _without_enrolment(argv: Sequence[str]) -> tuple[str, ...]:
    """``argv`` without ``--enrol``/``--unenrol``/``--pod-uid`` and their values: the node's own flags."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--enrol", "--unenrol", "--pod-uid"):
            skip = True
        elif not arg.startswith(("--enrol=", "--unenrol=", "--pod-uid=")):
            kept.append(arg)
    return tuple(kept)
