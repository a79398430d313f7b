"""What the two live-traffic beds share (tests/beds/testbed.py, tests/beds/flowsender.py): wiring and child programs.

Wiring: veth links between two namespaces, default routes, addresses on lo. Child programs: a Python
module of tests/ started in a namespace (optionally as a uid, with capabilities) that speaks JSON lines:
its configuration is its one argument; it binds its sockets, prints ``{"ready": true}``, then answers
each request line with a line carrying the request's ``id`` (lines ``{"log": ...}`` may come between).
tests/beds/bed_child.py holds the socket helpers both child programs use.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from tests.support.netns import NetNS

ROOT = Path(__file__).resolve().parents[2]  # children import tests.* from here
READY_TIMEOUT = 10.0


# --- wiring -------------------------------------------------------------------------------------


def link(
    pod: NetNS, peer: NetNS, pod_nic: str, peer_nic: str, pod_addresses: Sequence[str], peer_addresses: Sequence[str]
) -> None:
    """A veth from ``pod`` (``pod_nic``) to ``peer`` (``peer_nic``), each end with its addresses (CIDRs), up.

    IPv6 never waits for duplicate address detection, and each end knows the other's IPv6 addresses
    statically: the first neighbour solicitation on a fresh link is often lost, and the retry comes a
    second later.
    """
    subprocess.run(["ip", "link", "add", pod_nic, "netns", pod.name, "type", "veth", "peer", "name", peer_nic,
                    "netns", peer.name], check=True)
    ends = ((pod, pod_nic, pod_addresses), (peer, peer_nic, peer_addresses))
    for namespace, nic, addresses in ends:
        # The device was born in the host namespace: turn DAD off for its link-local address too.
        _no_dad(namespace, nic)
        for address in addresses:
            namespace.run("ip", "addr", "add", address, "dev", nic, *_nodad(address))
        namespace.run("ip", "link", "set", nic, "up")
    for (namespace, nic, _), (other, other_nic, addresses) in (ends, ends[::-1]):
        mac = json.loads(other.run("ip", "-j", "link", "show", other_nic).stdout)[0]["address"]
        for address in addresses:
            host = ipaddress.ip_interface(address).ip
            if host.version == 6:
                namespace.run("ip", "-6", "neigh", "replace", str(host), "lladdr", mac, "dev", nic, "nud",
                              "permanent")


def default_routes(namespace: NetNS, gateways: Sequence[str]) -> None:
    """A default route via each gateway (one IPv4, one IPv6)."""
    for gateway in gateways:
        namespace.run("ip", f"-{ipaddress.ip_address(gateway).version}", "route", "add", "default", "via", gateway)


def local_addresses(namespace: NetNS, addresses: Sequence[str]) -> None:
    """Host addresses on ``namespace``'s lo: it owns them, whatever link a packet for them comes in by."""
    for address in addresses:
        host = ipaddress.ip_address(address)
        namespace.run("ip", "addr", "add", f"{host}/{host.max_prefixlen}", "dev", "lo", *_nodad(address))


def _nodad(address: str) -> tuple[str, ...]:
    return ("nodad",) if ":" in address else ()


def _no_dad(namespace: NetNS, nic: str) -> None:
    # /proc/sys/net follows the writer's namespace (no procps needed); DAD runs unless "all" and the device say 0.
    keys = " ".join(f"/proc/sys/net/ipv6/conf/{conf}/accept_dad" for conf in ("all", "default", nic))
    namespace.run("sh", "-c", f"for key in {keys}; do echo 0 > $key; done")


# --- child programs ----------------------------------------------------------------------------


def as_uid(uid: int, caps: Sequence[str] = ()) -> list[str]:
    """The prefix that runs a command as ``uid`` (gid the same, no groups), keeping ``caps`` (e.g. net_admin)."""
    prefix = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    if caps:
        wanted = ",".join(f"+{cap}" for cap in caps)
        prefix += [f"--inh-caps={wanted}", f"--ambient-caps={wanted}"]
    return prefix


class Child:
    """A JSON-line child program (``python -m module CONFIG``) running in ``namespace``; see the module doc."""

    def __init__(
        self,
        namespace: NetNS,
        module: str,
        config: dict[str, Any],
        name: str,
        uid: int | None = None,
        caps: Sequence[str] = (),
    ) -> None:
        self.name = name
        command = ["ip", "netns", "exec", namespace.name, *(as_uid(uid, caps) if uid is not None else [])]
        # -E -s: nothing from the caller's environment or user site; tests.* comes from the checkout (cwd).
        command += [sys.executable, "-E", "-s", "-m", module, json.dumps(config)]
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
            cwd=ROOT,
        )
        self._pending: dict[int, Future[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._next_id = 0
        self.ready: Future[bool] = Future()
        self.log: list[str] = []
        self._stderr: deque[str] = deque(maxlen=50)  # drained all the time, so a chatty child never blocks
        self._readers = [threading.Thread(target=self._drain_stderr, daemon=True),
                         threading.Thread(target=self._read, daemon=True)]
        for reader in self._readers:
            reader.start()

    def _drain_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self._stderr.append(line)

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            message = json.loads(line)
            if message.get("ready"):
                self.ready.set_result(True)
            elif "log" in message:
                self.log.append(message["log"])
            else:
                with self._lock:
                    future = self._pending.pop(message["id"], None)
                if future is not None:
                    future.set_result(message)
        self.process.wait()
        error = "".join(self._stderr)
        if not self.ready.done():
            self.ready.set_exception(RuntimeError(f"{self.name} died: {error.strip()}"))
        with self._lock:
            for future in self._pending.values():
                future.set_exception(RuntimeError(f"{self.name} died: {error.strip()}"))
            self._pending.clear()

    def send(self, request: dict[str, Any]) -> Future[dict[str, Any]]:
        """Send ``request``; the future holds the answer (it fails if the child dies first)."""
        future: Future[dict[str, Any]] = Future()
        with self._lock:
            self._next_id += 1
            request = {**request, "id": self._next_id}
            self._pending[self._next_id] = future
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return future

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=5)
        for reader in self._readers:
            reader.join(timeout=5)  # they end at EOF; closing the pipes under them would raise there
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()
