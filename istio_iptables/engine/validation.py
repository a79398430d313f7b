"""``--run-validation``: prove that redirection works, as Istio's ``istio-validation`` container does.

A server listens on the proxy's two capture ports on loopback; a client, running as the proxy uid,
connects from loopback to the inbound-passthrough address (127.0.0.6 / ::6) on the probe port. That
connection only reaches the server if the rules redirect it (the proxy uid's loopback rule sends it to
the inbound capture port); the server reads the original destination and the run succeeds when it is
the probe port. Nothing arrives before ``--probe-timeout``: exit 126, which istio-cni's repair
controller watches for.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from istio_iptables._lib.log import log
from istio_iptables.config.sidecar import Config, Host, detect_ipv6
from istio_iptables.errors import ValidationFailed
from istio_iptables.net import Family

SO_ORIGINAL_DST = 80  # netfilter's SO_ORIGINAL_DST and IP6T_SO_ORIGINAL_DST share the number
SOL_IPV6 = 41
RETRY_INTERVAL = 1.0  # Istio's client waits one second between attempts

HINT = (
    "the workload is not ready for Istio: connections of the proxy uid are not redirected. With istio-cni "
    "this happens when a pod is scheduled before the node's CNI plugin is ready; istio-cni's repair "
    "controller (cni.repair) restarts or deletes such pods, otherwise delete the pod so it is scheduled again"
)


@dataclass(frozen=True)
class Probe:
    """What one validation run does: listen on ``listen_ports``, expect ``probe_port`` as original port."""

    family: Family
    listen_ports: tuple[int, ...]
    probe_port: int
    timeout: float

    @property
    def listen_host(self) -> str:
        return str(self.family.loopback.network_address)

    @property
    def target_host(self) -> str:
        """Envoy's inbound-passthrough source address: only the proxy uid's redirect rule catches it."""
        return str(self.family.inbound_passthrough_source.network_address)


def plan_probe(config: Config, host: Host) -> Probe:
    """Istio probes in the family of the pod's first usable address (IPv6 only when that one is)."""
    family = Family.V6 if detect_ipv6(host.addresses(), dual_stack=False) else Family.V4
    ports = tuple(dict.fromkeys((config.proxy_port, config.inbound_capture_port)))
    return Probe(family, ports, config.probe_port, config.probe_timeout)


def original_destination(conn: socket.socket) -> tuple[str, int]:
    """The destination a NAT rule rewrote, from conntrack (``SO_ORIGINAL_DST``); raises OSError if none."""
    if conn.family == socket.AF_INET:
        raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), struct.unpack("!H", raw[2:4])[0]
    raw = conn.getsockopt(SOL_IPV6, SO_ORIGINAL_DST, 28)
    return socket.inet_ntop(socket.AF_INET6, raw[8:24]), struct.unpack("!H", raw[2:4])[0]


def _listen(probe: Probe) -> list[socket.socket]:
    """Listeners on the capture ports; one that cannot bind (say Envoy already holds it) is skipped."""
    listeners = []
    family = socket.AF_INET if probe.family is Family.V4 else socket.AF_INET6
    for port in probe.listen_ports:
        server = socket.socket(family, socket.SOCK_STREAM)
        try:
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            server.bind((probe.listen_host, port))
            server.listen(16)
        except OSError as error:
            log.warning("validation: cannot listen on %s port %d: %s", probe.listen_host, port, error.strerror)
            server.close()
            continue
        listeners.append(server)
    return listeners


def _serve(
    listeners: Iterable[socket.socket], probe_port: int, passed: threading.Event, stop: threading.Event
) -> None:
    listeners = list(listeners)
    while not stop.is_set():
        readable, _, _ = select.select(listeners, [], [], 0.1)
        for server in readable:
            conn, _ = server.accept()
            with conn:
                try:
                    address, port = original_destination(conn)
                except OSError:
                    continue  # a direct connection, not a redirected one
                log.info("validation: connection to %s port %d arrived on port %d", address, port,
                         conn.getsockname()[1])
                if port == probe_port:
                    passed.set()
                    return


def validate(probe: Probe) -> None:
    """Raise :class:`ValidationFailed` unless a probe connection is redirected within the timeout."""
    listeners = _listen(probe)
    if not listeners:
        raise ValidationFailed(f"validation failed: no listener available on ports {probe.listen_ports}; {HINT}")
    passed, stop = threading.Event(), threading.Event()
    server = threading.Thread(target=_serve, args=(listeners, probe.probe_port, passed, stop), daemon=True)
    server.start()
    deadline = time.monotonic() + probe.timeout
    family = socket.AF_INET if probe.family is Family.V4 else socket.AF_INET6
    last_error = "no attempt"
    try:
        while not passed.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ValidationFailed(
                    f"validation timeout after {probe.timeout:g}s: no connection to "
                    f"{probe.target_host} port {probe.probe_port} was redirected to port "
                    f"{' or '.join(map(str, probe.listen_ports))} (last attempt: {last_error}); {HINT}"
                )
            client = socket.socket(family, socket.SOCK_STREAM)
            try:
                client.settimeout(min(RETRY_INTERVAL, remaining))
                client.bind((probe.listen_host, 0))
                client.connect((probe.target_host, probe.probe_port))
                last_error = "connected, but not to a capture port"
            except OSError as error:
                last_error = error.strerror or str(error)
            finally:
                client.close()
            passed.wait(min(RETRY_INTERVAL, max(deadline - time.monotonic(), 0)))
    finally:
        stop.set()
        server.join()
        for listener in listeners:
            listener.close()
    log.info("validation passed: redirection to the proxy works")


def run_validation(config: Config, host: Host | None = None) -> None:
    if host is None:
        from istio_iptables.system.host import RealHost

        host = RealHost()
    validate(plan_probe(config, host))
