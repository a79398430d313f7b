"""Where each kind of pod traffic must land: the expectations the live-traffic tests and the demo share.

A :class:`Path` is one connection (from which node, to which address of a family) and what must happen
to it under a mode; a :class:`Scenario` is a set of istio-iptables flags and the paths it proves.
``../shared/reference/istio-rules-walkthrough.md`` ties each rule to the traffic types T1-T6 named here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tests.beds.testbed import (
    APP_PORT,
    BYPASS_PORTS,
    FAMILIES,
    INBOUND_PORT,
    ISTIOD_PORT,
    OUTBOUND_PORT,
    TUNNEL_PORT,
    Addresses,
    Landing,
    Mode,
    Probe,
    endpoint,
)

OUTBOUND = f"proxy:{OUTBOUND_PORT}"
INBOUND = f"proxy:{INBOUND_PORT}"
APP = f"app:{APP_PORT}"
DNS_AGENT = "proxy:15053"


@dataclass(frozen=True)
class Expect:
    """Where a connection must land: the listeners it passes, in order, and what they must see."""

    path: tuple[str, ...]
    original_dsts: tuple[str | None, ...] = ()  # per hop; None: not checked
    peer_host: str | None = None  # the first listener's view of the client
    app_peer_host: str | None = None  # the last listener's view of its client
    reply_from: str | None = None  # the address the client's answer comes from
    local: str | None = None  # the first listener's socket address (TPROXY: the original destination)

    def mismatches(self, landing: Landing) -> list[str]:
        found = []
        if landing.path != self.path or landing.error:
            return [f"path {' -> '.join(landing.path) or 'none'} (want {' -> '.join(self.path)}): {landing}"]
        for hop, want in zip(landing.hops, self.original_dsts, strict=False):
            if want is not None and hop.original_dst != want:
                found.append(f"{hop.listener} saw original destination {hop.original_dst}, want {want}")
        if self.peer_host is not None and landing.hops[0].peer_host != self.peer_host:
            found.append(f"{landing.listener} saw peer {landing.hops[0].peer}, want host {self.peer_host}")
        if self.app_peer_host is not None and landing.last.peer_host != self.app_peer_host:
            found.append(f"{landing.last.listener} saw peer {landing.last.peer}, want host {self.app_peer_host}")
        if self.local is not None and landing.hops[0].local != self.local:
            found.append(f"{landing.listener} accepted on {landing.hops[0].local}, want {self.local}")
        if self.reply_from is not None and landing.reply_from != self.reply_from:
            found.append(f"answer came from {landing.reply_from}, want {self.reply_from}")
        return found


@dataclass(frozen=True)
class Path:
    name: str
    probe: Callable[[Addresses], Probe]
    expect: Callable[[Addresses, Mode], Expect]


@dataclass(frozen=True)
class Scenario:
    name: str
    extra: dict[str, str | None]
    paths: tuple[Path, ...]


def inbound_to_app(f: Addresses, mode: Mode, port: int = APP_PORT) -> Expect:
    """T1: to 15006 with the original destination and the remote's own address, then on to the app.

    REDIRECT rewrites the destination (the socket is on :15006, the original one comes from conntrack);
    TPROXY hands over the packet unchanged (the socket's own address is the original destination).
    """
    original = endpoint(f.pod, port)
    local = endpoint(f.pod, INBOUND_PORT) if mode == "REDIRECT" else original
    return Expect((INBOUND, APP), (original, original), peer_host=f.remote, app_peer_host=f.passthrough,
                  local=local)


def outbound_to_remote(f: Addresses, host: str, port: int) -> Expect:
    return Expect((OUTBOUND, f"remote:{port}"), (endpoint(host, port),), app_peer_host=f.pod)


def direct(listener: str, peer_host: str | None = None) -> Expect:
    return Expect((listener,), peer_host=peer_host)


SIDECAR_PATHS = (
    Path("T1 remote -> pod service", lambda f: Probe("remote", f.pod, APP_PORT), lambda f, m: inbound_to_app(f, m)),
    Path("T2 app -> remote service", lambda f: Probe("app", f.service, 80),
         lambda f, m: outbound_to_remote(f, f.service, 80)),
    *(
        Path(f"T3 remote -> :{port} (-d)", lambda f, port=port: Probe("remote", f.pod, port),
             lambda f, m, port=port: Expect((f"proxy:{port}",), (endpoint(f.pod, port),), peer_host=f.remote))
        for port in BYPASS_PORTS
    ),
    # Istio never TPROXYs... except the tunnel port: mangle has no 15008 RETURN (walkthrough D.2).
    Path("HBONE remote -> :15008", lambda f: Probe("remote", f.pod, TUNNEL_PORT),
         lambda f, m: direct(f"proxy:{TUNNEL_PORT}", f.remote) if m == "REDIRECT"
         else Expect((INBOUND, f"proxy:{TUNNEL_PORT}"), (endpoint(f.pod, TUNNEL_PORT),))),
    Path("T4 app -> own service VIP", lambda f: Probe("app", f.vip, APP_PORT),
         lambda f, m: Expect((OUTBOUND, INBOUND, APP), (endpoint(f.vip, APP_PORT), endpoint(f.pod, APP_PORT)),
                             app_peer_host=f.passthrough, reply_from=endpoint(f.vip, APP_PORT))),
    Path("T4 app -> own pod IP", lambda f: Probe("app", f.pod, APP_PORT), lambda f, m: direct(APP, f.pod)),
    Path("T4 app -> localhost", lambda f: Probe("app", f.loopback, APP_PORT), lambda f, m: direct(APP, f.loopback)),
    Path("T5 proxy -> localhost", lambda f: Probe("proxy", f.loopback, APP_PORT),
         lambda f, m: direct(APP, f.loopback)),
    Path("T5 proxy from 127.0.0.6/::6 -> pod IP", lambda f: Probe("proxy", f.pod, APP_PORT, bind=f.passthrough),
         lambda f, m: direct(APP, f.passthrough)),
    Path("T6 proxy -> istiod", lambda f: Probe("proxy", f.istiod, ISTIOD_PORT),
         lambda f, m: direct(f"remote:{ISTIOD_PORT}", f.pod)),
)

CAPTURED_SERVICE = Path("app -> remote service (captured)", lambda f: Probe("app", f.service, 80),
                        lambda f, m: outbound_to_remote(f, f.service, 80))
CAPTURED_INBOUND = Path("remote -> pod service (captured)", lambda f: Probe("remote", f.pod, APP_PORT),
                        lambda f, m: inbound_to_app(f, m))


def dns_probe(from_: str, server: str, proto: str) -> Callable[[Addresses], Probe]:
    return lambda f: Probe(from_, getattr(f, server), 53, op="dns", proto=proto)  # type: ignore[arg-type]


def dns_to_agent(server: str, proto: str) -> Callable[[Addresses, Mode], Expect]:
    """Captured DNS lands on the agent, and the answer returns from the server the app asked."""
    def expect(f: Addresses, mode: Mode) -> Expect:
        address = getattr(f, server)
        dsts = (endpoint(address, 53),) if proto == "tcp" else ()
        return Expect((DNS_AGENT,), dsts, peer_host=f.pod, reply_from=endpoint(address, 53))
    return expect


SCENARIOS = (
    Scenario("sidecar defaults", {}, SIDECAR_PATHS),
    Scenario(
        "excluded CIDR and port (-x -o)",
        {"-x": f"{FAMILIES[0].cidr(FAMILIES[0].excluded)},{FAMILIES[1].cidr(FAMILIES[1].excluded)}", "-o": "443"},
        (
            Path("-x app -> excluded CIDR", lambda f: Probe("app", f.excluded, 80),
                 lambda f, m: direct("remote:80", f.pod)),
            Path("-o app -> excluded port", lambda f: Probe("app", f.service, 443),
                 lambda f, m: direct("remote:443", f.pod)),
            CAPTURED_SERVICE,
        ),
    ),
    Scenario(
        "included CIDR and ports only (-i -q -b)",
        {"-i": f"{FAMILIES[0].cidr(FAMILIES[0].service)},{FAMILIES[1].cidr(FAMILIES[1].service)}",
         "-q": str(ISTIOD_PORT), "-b": str(APP_PORT)},
        (
            Path("-i app -> included CIDR", lambda f: Probe("app", f.service, 80),
                 lambda f, m: outbound_to_remote(f, f.service, 80)),
            Path("-i app -> other CIDR", lambda f: Probe("app", f.excluded, 80),
                 lambda f, m: direct("remote:80", f.pod)),
            Path("-q app -> other CIDR, included port", lambda f: Probe("app", f.excluded, ISTIOD_PORT),
                 lambda f, m: outbound_to_remote(f, f.excluded, ISTIOD_PORT)),
            Path("-b remote -> included port", lambda f: Probe("remote", f.pod, APP_PORT),
                 lambda f, m: inbound_to_app(f, m)),
            Path("-b remote -> other port", lambda f: Probe("remote", f.pod, TUNNEL_PORT),
                 lambda f, m: direct(f"proxy:{TUNNEL_PORT}", f.remote)),
        ),
    ),
    # Port ranges (FIRST:LAST, as iptables' --dport takes them): a port inside is treated as listed, one
    # outside as not; native nftables gets them as FIRST-LAST.
    Scenario(
        "port ranges included (-q -b)",
        {"-i": "", "-q": "400:500", "-b": "8000:8100"},
        (
            Path("-q range app -> :443 (inside 400:500)", lambda f: Probe("app", f.service, 443),
                 lambda f, m: outbound_to_remote(f, f.service, 443)),
            Path("-q range app -> :80 (outside)", lambda f: Probe("app", f.service, 80),
                 lambda f, m: direct("remote:80", f.pod)),
            Path("-b range remote -> :8080 (inside 8000:8100)", lambda f: Probe("remote", f.pod, APP_PORT),
                 lambda f, m: inbound_to_app(f, m)),
            Path("-b range remote -> :15020 (outside)", lambda f: Probe("remote", f.pod, 15020),
                 lambda f, m: direct("proxy:15020", f.remote)),
        ),
    ),
    Scenario(
        "port ranges excluded (-d -o)",
        {"-d": "15010:15100", "-o": "400:500"},
        (
            Path("-d range remote -> :15090 (inside 15010:15100)", lambda f: Probe("remote", f.pod, 15090),
                 lambda f, m: direct("proxy:15090", f.remote)),
            Path("-d range remote -> :8080 (outside)", lambda f: Probe("remote", f.pod, APP_PORT),
                 lambda f, m: inbound_to_app(f, m)),
            Path("-o range app -> :443 (inside 400:500)", lambda f: Probe("app", f.service, 443),
                 lambda f, m: direct("remote:443", f.pod)),
            CAPTURED_SERVICE,
        ),
    ),
    Scenario(
        "excluded interface (-c)",
        {"-c": "eth1"},
        (
            Path("-c remote -> pod via eth1", lambda f: Probe("remote", f.pod_side, APP_PORT),
                 lambda f, m: direct(APP, f.remote_side)),
            Path("-c app -> remote via eth1", lambda f: Probe("app", f.remote_side, 80),
                 lambda f, m: direct("remote:80", f.pod_side)),
            CAPTURED_INBOUND,
            CAPTURED_SERVICE,
        ),
    ),
    Scenario(
        "DNS capture (--redirect-dns)",
        {"--redirect-dns": None},
        (
            Path("DNS/udp app -> resolv.conf server", dns_probe("app", "dns", "udp"), dns_to_agent("dns", "udp")),
            Path("DNS/tcp app -> resolv.conf server", dns_probe("app", "dns", "tcp"), dns_to_agent("dns", "tcp")),
            Path("DNS/udp app -> other server", dns_probe("app", "service", "udp"),
                 lambda f, m: Expect(("remote:53",), reply_from=endpoint(f.service, 53))),
            # Plain outbound TCP: the outbound listener takes it, as any other TCP.
            Path("DNS/tcp app -> other server", dns_probe("app", "service", "tcp"),
                 lambda f, m: Expect((OUTBOUND, "remote:53"), (endpoint(f.service, 53),))),
            Path("DNS/udp proxy -> upstream", dns_probe("proxy", "dns", "udp"),
                 lambda f, m: Expect(("remote:53",), peer_host=f.pod, reply_from=endpoint(f.dns, 53))),
            Path("DNS/tcp proxy -> upstream", dns_probe("proxy", "dns", "tcp"),
                 lambda f, m: Expect(("remote:53",), peer_host=f.pod)),
        ),
    ),
    Scenario(
        "all DNS capture (--capture-all-dns)",
        {"--redirect-dns": None, "--capture-all-dns": None},
        (
            Path("DNS/udp app -> any server", dns_probe("app", "service", "udp"), dns_to_agent("service", "udp")),
            Path("DNS/tcp app -> any server", dns_probe("app", "service", "tcp"), dns_to_agent("service", "tcp")),
            Path("DNS/udp proxy -> upstream", dns_probe("proxy", "service", "udp"),
                 lambda f, m: Expect(("remote:53",), peer_host=f.pod)),
        ),
    ),
)
