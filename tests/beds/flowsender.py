"""A small live-traffic bed for explain's kernel proof: a pod namespace, a peer, listeners, a flow sender.

(tests/beds/testbed.py is the full live-traffic test bed; this one is deliberately small and focused. Both
wire their namespaces and run their in-namespace programs with tests/beds/bed_common.py; the agent's
protocol is in tests/beds/flowsender_agent.py.)

Topology (the pod's interface names match the ones the conformance cases name):

    pod eth0          10.10.0.2/24 fd00:10::2/64  <->  peer p0  10.10.0.1 fd00:10::1   (default route)
    pod eth1          10.11.0.2/24 fd00:11::2/64  <->  peer p1  10.11.0.1 fd00:11::1
    pod not-istio-nic 10.12.0.2/24 fd00:12::2/64  <->  peer p2  10.12.0.1 fd00:12::1

The peer owns the "remote" addresses (REMOTE_V4/REMOTE_V6) on its lo and routes FORWARDED_* to the pod,
which does not forward them. Both namespaces run an agent listening on the same ports; a flow's
landing is (which namespace, listening port, original destination).
"""

from __future__ import annotations

import ipaddress
import time
import uuid
from dataclasses import dataclass
from typing import Any

from tests.beds.bed_common import READY_TIMEOUT, Child, default_routes, link, local_addresses
from tests.support.netns import NetNS

CALL_TIMEOUT = 90.0  # the agent gives a command 60 s
PREFIX = {4: 24, 6: 64}
LINKS = (("eth0", "p0", 10), ("eth1", "p1", 11), ("not-istio-nic", "p2", 12))
REMOTE_V4 = ("9.9.1.1", "1.1.1.1", "10.1.2.3", "192.0.2.10")
REMOTE_V6 = ("2001:db8::5", "2001:db9::1", "::7f00:35")
FORWARDED_V4 = ("10.50.0.1", "172.16.50.1")
FORWARDED_V6 = ("2001:db8:50::1", "fd00:50::1")
TCP_PORTS = (
    80,
    8080,
    53,
    22,
    4000,
    5000,
    6000,
    7000,
    31000,
    32000,
    15001,
    15006,
    15008,
    15020,
    15021,
    15053,
    15090,
)
UDP_PORTS = (53, 5000, 15053)


def pod_address(link: int, version: int) -> str:
    return f"10.{link}.0.2" if version == 4 else f"fd00:{link}::2"


def peer_address(link: int, version: int) -> str:
    return f"10.{link}.0.1" if version == 4 else f"fd00:{link}::1"


@dataclass(frozen=True)
class Landing:
    where: str | None  # "pod", "peer" or None (nothing received it)
    port: int | None = None
    orig: str | None = None  # TCP only
    result: str = ""  # the client's view: ok, timeout, refused, unreachable


class Agent:
    """A :mod:`tests.beds.flowsender_agent` in a namespace, listening on every port the proofs use."""

    def __init__(self, namespace: NetNS) -> None:
        ports = {"tcp": list(TCP_PORTS), "udp": list(UDP_PORTS)}
        self.child = Child(namespace, "tests.beds.flowsender_agent", ports, f"agent in {namespace.name}")
        self.child.ready.result(timeout=READY_TIMEOUT)

    def call(self, **request: Any) -> dict[str, Any]:
        return self.child.send(request).result(timeout=CALL_TIMEOUT)

    def run(self, *argv: str, input: str | None = None, check: bool = True) -> dict[str, Any]:
        done = self.call(op="exec", argv=list(argv), input=input)
        if check and done["rc"] != 0:
            raise RuntimeError(f"{' '.join(argv)} failed: {done['stderr']}")
        return done

    def close(self) -> None:
        self.child.stop()


class FlowBed:
    """One pod and one peer namespace; install rules with :meth:`install`, send with :meth:`send`."""

    def __init__(self, pod: NetNS, peer: NetNS, groups: dict[str, int] | None = None) -> None:
        self.pod_ns, self.peer_ns = pod, peer
        if groups:
            pod.add_groups(groups)
        for pod_nic, peer_nic, number in LINKS:
            link(pod, peer, pod_nic, peer_nic, [f"{pod_address(number, v)}/{PREFIX[v]}" for v in (4, 6)],
                 [f"{peer_address(number, v)}/{PREFIX[v]}" for v in (4, 6)])
        default_routes(pod, [peer_address(10, 4), peer_address(10, 6)])
        local_addresses(pod, ["::6"])
        local_addresses(peer, REMOTE_V4 + REMOTE_V6)
        for address in FORWARDED_V4 + FORWARDED_V6:
            version = ipaddress.ip_address(address).version
            peer.run("ip", f"-{version}", "route", "add", address, "via", pod_address(10, version))
        self.pod = Agent(pod)
        self.peer = Agent(peer)
        self.routes: list[list[str]] = []
        self.backend = "nft"

    @property
    def pod_addresses(self) -> list[str]:
        return [pod_address(link, version) for _, _, link in LINKS for version in (4, 6)] + ["::6"]

    def install(self, documents: dict[int, str], tproxy: tuple[int, int] | None = None, backend: str = "nft") -> None:
        """Replace every table with ``documents`` (version -> restore text) and set TPROXY routes.

        ``backend`` is ``nft`` or ``legacy``; the other backend's tables are emptied, so only one acts.
        """
        self.backend = backend
        self._empty_tables()
        for version, stem in ((4, "iptables"), (6, "ip6tables")):
            if version in documents:
                self.pod.run(f"{stem}-{backend}-restore", "--noflush", input=documents[version])
        self._set_routes(tproxy)

    def install_nft(self, script: str, tproxy: tuple[int, int] | None = None) -> None:
        """Replace every table with the ``nft -f`` ``script`` (--native-nftables) and set TPROXY routes."""
        self.backend = "native"
        self._empty_tables()
        self.pod.run("nft", "-f", "-", input=script)
        self._set_routes(tproxy)

    def _empty_tables(self) -> None:
        self.pod.run("nft", "flush", "ruleset")  # the pod namespace's only: native tables go, and iptables-nft's
        empty = "".join(f"*{table}\nCOMMIT\n" for table in ("raw", "mangle", "nat", "filter"))
        for stem in ("iptables", "ip6tables"):
            for each in ("nft", "legacy"):
                self.pod.run(f"{stem}-{each}-restore", input=empty)

    def _set_routes(self, tproxy: tuple[int, int] | None) -> None:
        for route in self.routes:
            self.pod.run(*route, check=False)
        self.routes = []
        if tproxy is not None:
            mark, table = tproxy
            for flag, default in (("-4", "0.0.0.0/0"), ("-6", "::/0")):
                self.pod.run("ip", flag, "rule", "add", "fwmark", str(mark), "lookup", str(table))
                self.pod.run("ip", flag, "route", "add", "local", default, "dev", "lo", "table", str(table))
                self.routes.append(["ip", flag, "rule", "del", "fwmark", str(mark), "lookup", str(table)])
                self.routes.append(["ip", flag, "route", "flush", "table", str(table)])
        self.pod.run("conntrack", "-F", check=False)

    def save(self, version: int) -> str:
        """The pod's rules with counters: iptables-save text, or ``nft -j list ruleset`` for native nftables."""
        if self.backend == "native":
            return self.pod.run("nft", "-j", "list", "ruleset")["stdout"]
        stem = "iptables" if version == 4 else "ip6tables"
        return self.pod.run(f"{stem}-{self.backend}-save", "-c")["stdout"]

    def conntrack_zones(self, version: int) -> dict[tuple[str, int, int], int]:
        """(original destination, port, source port) -> conntrack zone of the pod's UDP entries."""
        listing = self.pod.run("conntrack", "-L", "-f", f"ipv{version}", "-p", "udp", check=False)["stdout"]
        zones = {}
        for line in listing.splitlines():
            words = [word.split("=", 1) for word in line.split() if "=" in word]
            # The original direction's src/dst/sport/dport come first, the reply direction's after them.
            first = {key: value for key, value in reversed(words)}
            zone = int(first.get("zone", 0))
            zones[(str(ipaddress.ip_address(first["dst"])), int(first["dport"]), int(first["sport"]))] = zone
        return zones

    def send(
        self,
        *,
        origin: str,
        proto: str,
        dst: str,
        dport: int,
        src: str | None = None,
        sport: int | None = None,
        uid: int = 0,
        gid: int = 0,
        timeout: float = 1.0,
    ) -> Landing:
        token = uuid.uuid4().hex[:12]
        sender = self.peer if origin == "remote" else self.pod
        result = sender.call(
            op="send",
            token=token,
            proto=proto,
            dst=dst,
            dport=dport,
            src=src,
            sport=sport,
            uid=uid,
            gid=gid,
            timeout=timeout,
        )["result"]
        deadline = time.monotonic() + (0.2 if proto == "udp" else 0.0)
        while True:
            for where, agent in (("pod", self.pod), ("peer", self.peer)):
                for landing in agent.call(op="landings")["landings"]:
                    if landing["token"] == token:
                        return Landing(where, landing["port"], landing["orig"], result)
            if time.monotonic() >= deadline:
                return Landing(None, result=result)
            time.sleep(0.005)

    def close(self) -> None:
        self.pod.close()
        self.peer.close()
