"""A pod with a sidecar, in two network namespaces, for proving rules with live traffic (root only).

Topology (every address is ours, inside namespaces we create)::

    pod namespace                                    remote namespace
    eth0 10.88.0.2/24  fd00:88::2/64   <== veth ==>  10.88.0.1  fd00:88::1   (default gateway)
    eth1 10.88.5.2/24  fd00:88:5::2/64 <== veth ==>  10.88.5.1  fd00:88:5::1 (a second NIC, for -c)
                                                     on lo: service 10.88.1.1, excluded 10.88.2.1,
                                                     dns 10.88.3.53, istiod 10.88.4.1 (and fd00:88:N::…)
    the service VIP 10.88.9.1 / fd00:88:9::1 exists nowhere: the stand-in proxy maps it to the pod IP.

Processes (small Python programs, :mod:`tests.beds.testbed_node`, started in their namespace as their uid):

- ``app`` (uid 1000): the application, serving ``APP_PORT`` and making the app's connections;
- ``proxy`` (uid/gid 1337, CAP_NET_ADMIN as Envoy has in TPROXY mode): the stand-in Envoy on 15001
  (outbound) and 15006 (inbound), reporting the original destination (``SO_ORIGINAL_DST``, or the local
  address under TPROXY) and forwarding as Envoy does; the agent's DNS on 127.0.0.1/::1:15053;
  the metrics/health/tunnel ports 15090, 15021, 15020, 15008;
- ``remote`` (root): servers on 80, 443, 15012 (istiod) and DNS on 53 at each remote address.

Use::

    with Testbed(backend="nft", mode="REDIRECT") as bed:
        bed.apply(["-p", "15001", ..., "--dual-stack"])
        landing = bed.connect("app", bed.v4.service, 80)
        assert landing.listener == "proxy:15001" and landing.original_dst == "10.88.1.1:80"
"""

from __future__ import annotations

import ipaddress
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from tests.beds.bed_common import Child, default_routes, link, local_addresses
from tests.support.netns import NETNS_ETC, NetNS

Backend = Literal["legacy", "nft", "native-nftables"]  # the iptables backends, or --native-nftables
Mode = Literal["REDIRECT", "TPROXY"]
NodeName = Literal["app", "proxy", "remote"]

APP_UID = 1000
PROXY_UID = 1337
APP_PORT = 8080
OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
DNS_AGENT_PORT = 15053
BYPASS_PORTS = (15090, 15021, 15020)  # metrics and health: reached directly, never through the proxy
TUNNEL_PORT = 15008
REMOTE_PORTS = (80, 443, 15012)
ISTIOD_PORT = 15012
CONNECT_TIMEOUT = 2.0
CLI = [sys.executable, "-m", "istio_iptables"]
# Istio's injector arguments: the default sidecar rules.
INJECTOR_ARGS = {"-p": "15001", "-z": "15006", "-u": "1337", "-m": "REDIRECT", "-i": "*", "-x": "", "-b": "*",
                 "-d": "15090,15021,15020"}


def injector_args(mode: Mode = "REDIRECT", extra: Mapping[str, str | None] | None = None,
                  dual_stack: bool = True) -> list[str]:
    """The injector's argv in ``mode``; ``extra`` replaces or adds flags (None: a flag without value).

    ``--dual-stack`` makes Istio write IPv6 rules for a pod whose first address is IPv4, as the bed's is.
    """
    flags: dict[str, str | None] = {**INJECTOR_ARGS, "-m": mode, **(extra or {})}
    if dual_stack:
        flags["--dual-stack"] = None
    return [token for flag, value in flags.items() for token in ((flag,) if value is None else (flag, value))]


@dataclass(frozen=True)
class Addresses:
    """The bed's addresses of one family."""

    version: int
    pod: str
    remote: str
    pod_side: str  # the pod's second NIC (eth1)
    remote_side: str
    service: str
    excluded: str
    dns: str
    istiod: str
    vip: str
    prefix: int

    def cidr(self, address: str) -> str:
        """The /24 or /64 an address of the bed belongs to, e.g. for ``-x`` or ``-i``."""
        return str(ipaddress.ip_network(f"{address}/{self.prefix}", strict=False))

    @property
    def loopback(self) -> str:
        return "127.0.0.1" if self.version == 4 else "::1"

    @property
    def passthrough(self) -> str:
        return "127.0.0.6" if self.version == 4 else "::6"

    def remote_addresses(self) -> tuple[str, ...]:
        return (self.remote, self.remote_side, self.service, self.excluded, self.dns, self.istiod)


V4 = Addresses(4, pod="10.88.0.2", remote="10.88.0.1", pod_side="10.88.5.2", remote_side="10.88.5.1",
               service="10.88.1.1", excluded="10.88.2.1", dns="10.88.3.53", istiod="10.88.4.1",
               vip="10.88.9.1", prefix=24)
V6 = Addresses(6, pod="fd00:88::2", remote="fd00:88::1", pod_side="fd00:88:5::2", remote_side="fd00:88:5::1",
               service="fd00:88:1::1", excluded="fd00:88:2::1", dns="fd00:88:3::53", istiod="fd00:88:4::1",
               vip="fd00:88:9::1", prefix=64)
FAMILIES = (V4, V6)


def endpoint(host: str, port: int) -> str:
    """``host:port`` as the nodes write it (``[v6]:port``)."""
    host = str(ipaddress.ip_address(host))
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class Hop:
    """One listener that handled a connection, and what it saw."""

    node: str
    port: int
    original_dst: str | None
    peer: str
    local: str
    how: str

    @property
    def listener(self) -> str:
        return f"{self.node}:{self.port}"

    @property
    def peer_host(self) -> str:
        return self.peer.rpartition(":")[0].strip("[]")


@dataclass(frozen=True)
class Landing:
    """Where one connection (or DNS query) landed: its first listener and the whole path it took."""

    hops: tuple[Hop, ...] = ()
    reply_from: str | None = None  # the address the client's answer came from
    error: str | None = None

    @property
    def listener(self) -> str:
        """``node:port`` of the first socket that accepted it, or ``unreached``."""
        return self.hops[0].listener if self.hops else "unreached"

    @property
    def original_dst(self) -> str | None:
        return self.hops[0].original_dst if self.hops else None

    @property
    def peer(self) -> str | None:
        return self.hops[0].peer if self.hops else None

    @property
    def path(self) -> tuple[str, ...]:
        return tuple(hop.listener for hop in self.hops)

    @property
    def last(self) -> Hop:
        return self.hops[-1]

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.hops)

    def __str__(self) -> str:
        if not self.hops:
            return f"unreached ({self.error})"
        text = " -> ".join(f"{hop.listener}[dst {hop.original_dst} from {hop.peer}]" for hop in self.hops)
        return text + (f" ERROR {self.error}" if self.error else "")


@dataclass(frozen=True)
class Probe:
    """One connection to make: from a node (its uid) to host:port, TCP or a DNS query."""

    from_: NodeName
    host: str
    port: int
    op: Literal["tcp", "dns"] = "tcp"
    proto: Literal["tcp", "udp"] = "tcp"
    bind: str | None = None
    timeout: float = CONNECT_TIMEOUT


def install_rules(pod: NetNS, args: Sequence[str], backend: Backend) -> subprocess.CompletedProcess[str]:
    """Write the rules ``args`` ask for into ``pod``, as istio-init does: the one place that applies.

    Our CLI runs inside the namespace (so resolv.conf and address detection are the pod's) and writes
    the rules, the TPROXY policy routes and ``::6`` on lo itself, on the backend asked for.
    """
    selection = ["--native-nftables"] if backend == "native-nftables" else ["--force-iptables-binary", backend]
    return pod.run(*CLI, *selection, *args, check=False)


@dataclass
class Testbed:
    """A pod (app + stand-in proxy) and a remote side; ``apply`` rules, then ``connect`` and look."""

    __test__ = False  # not a pytest test class

    backend: Backend = "nft"
    mode: Mode = "REDIRECT"
    resolv_conf: str = f"nameserver {V4.dns}\nnameserver {V6.dns}\n"
    # How namespaces are made: tests pass the ``netns_factory`` fixture (so CI never skips them).
    make_namespace: Callable[[str], NetNS] = NetNS
    pod: NetNS = field(init=False)
    remote: NetNS = field(init=False)
    nodes: dict[str, Child] = field(init=False, default_factory=dict)
    v4: Addresses = V4
    v6: Addresses = V6

    def __post_init__(self) -> None:
        self.pod = self.make_namespace("iit-pod")
        try:
            self.remote = self.make_namespace("iit-rem")
            self._wire()
            self._start_nodes()
        except BaseException:
            self.close()
            raise

    def _wire(self) -> None:
        pod, remote = self.pod, self.remote
        for pod_nic, peer_nic, pod_side, remote_side in (("eth0", "rem0", "pod", "remote"),
                                                         ("eth1", "rem1", "pod_side", "remote_side")):
            link(pod, remote, pod_nic, peer_nic, [f"{getattr(f, pod_side)}/{f.prefix}" for f in FAMILIES],
                 [f"{getattr(f, remote_side)}/{f.prefix}" for f in FAMILIES])
        default_routes(pod, [family.remote for family in FAMILIES])
        local_addresses(remote, [address for f in FAMILIES for address in (f.service, f.excluded, f.dns, f.istiod)])
        directory = NETNS_ETC / pod.name
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "resolv.conf").write_text(self.resolv_conf)

    def _proxy_node(self) -> dict[str, Any]:
        """The pod's proxy (uid 1337, CAP_NET_ADMIN): the stand-in Envoy here; a bed of another capture
        mode puts its own (the ambient bed's ztunnel)."""
        echo = [{"port": port, "kind": "echo"} for port in (*BYPASS_PORTS, TUNNEL_PORT)]
        return {
            "name": "proxy",
            "listeners": [
                {"port": OUTBOUND_PORT, "kind": "outbound"},
                {"port": INBOUND_PORT, "kind": "inbound", "transparent": self.mode == "TPROXY"},
                # pilot-agent's DNS listens on localhost: REDIRECT in OUTPUT delivers to 127.0.0.1 / ::1.
                {"port": DNS_AGENT_PORT, "kind": "dns", "addresses": ["127.0.0.1", "::1"]},
                *echo,
            ],
            # The service VIP is served by this very pod: Envoy picks the pod's own IP as the endpoint.
            "upstreams": {endpoint(f.vip, APP_PORT): endpoint(f.pod, APP_PORT) for f in FAMILIES},
        }

    def _start_nodes(self) -> None:
        proxy = self._proxy_node()
        everywhere = ["0.0.0.0", "::"]
        remote_addresses = [address for family in FAMILIES for address in family.remote_addresses()]
        remote = {
            "name": "remote",
            "listeners": [
                *({"port": port, "kind": "echo", "addresses": everywhere} for port in REMOTE_PORTS),
                {"port": 53, "kind": "dns", "addresses": remote_addresses},
            ],
        }
        app = {"name": "app", "listeners": [{"port": APP_PORT, "kind": "echo"}]}
        self.nodes = {
            proxy["name"]: _node(self.pod, proxy, uid=PROXY_UID, caps=("net_admin",)),
            "app": _node(self.pod, app, uid=APP_UID),
            "remote": _node(self.remote, remote),
        }
        for node in self.nodes.values():
            node.ready.result(timeout=10)

    # --- rules ----------------------------------------------------------------------

    def apply(self, args: Sequence[str]) -> subprocess.CompletedProcess[str]:
        """Install the rules of ``args`` (istio-iptables flags) in the pod; raises if that fails."""
        result = install_rules(self.pod, args, self.backend)
        if result.returncode != 0:
            raise RuntimeError(f"istio-iptables {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    # --- traffic --------------------------------------------------------------------

    def send(self, probes: Sequence[Probe]) -> list[Landing]:
        """Make every probe at once (each from its node) and report where each landed."""
        futures = []
        for probe in probes:
            request = {"op": probe.op, "proto": probe.proto, "host": probe.host, "port": probe.port,
                       "timeout": probe.timeout, "name": "probe.test"}
            if probe.bind:
                request["bind"] = probe.bind
            futures.append(self.nodes[probe.from_].send(request))
        pairs = zip(futures, probes, strict=True)
        return [_landing(future.result(timeout=probe.timeout + 10)) for future, probe in pairs]

    def connect(self, from_: NodeName, host: str, port: int, bind: str | None = None) -> Landing:
        return self.send([Probe(from_, host, port, bind=bind)])[0]

    def dns(self, from_: NodeName, server: str, proto: Literal["tcp", "udp"] = "udp") -> Landing:
        return self.send([Probe(from_, server, 53, op="dns", proto=proto)])[0]

    # --- lifetime -------------------------------------------------------------------

    def close(self) -> None:
        for node in self.nodes.values():
            node.stop()
        self.nodes = {}
        for namespace in (getattr(self, "pod", None), getattr(self, "remote", None)):
            if namespace is not None:
                namespace.delete()

    def __enter__(self) -> Testbed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _node(namespace: NetNS, config: dict[str, Any], uid: int | None = None, caps: Sequence[str] = ()) -> Child:
    """One :mod:`tests.beds.testbed_node` process, started in ``namespace`` as ``uid``."""
    return Child(namespace, "tests.beds.testbed_node", config, f"node {config['name']}", uid, caps)


def _landing(message: dict[str, Any]) -> Landing:
    hops = tuple(
        Hop(node=hop["node"], port=hop["port"], original_dst=hop.get("original_dst"), peer=hop["peer"],
            local=hop["local"], how=hop.get("how", ""))
        for hop in message.get("hops") or ()
    )
    return Landing(hops=hops, reply_from=message.get("reply_from"), error=message.get("error"))


