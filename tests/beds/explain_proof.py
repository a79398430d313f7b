"""The kernel proof of ``explain``, shared by its backends (tests/e2e/test_explain_kernel.py for iptables,
tests/e2e/test_explain_nft_kernel.py for native nftables).

Per configuration the caller installs the rules in the pod namespace of a :class:`FlowBed`; then
:func:`prove` sends each flow for real. It must land where explain said (redirect port / pod / peer /
nowhere, with the original destination), and the per-rule packet counters must agree: nat rules see
only a connection's first packet, so the nat rules with packets must be exactly the nat rules explain
says the packet matches; in raw and mangle later packets of a TCP connection count too, so every rule
explain names must have counted packets there, and no REDIRECT/TPROXY/DROP rule it did not name may
have (a single UDP datagram is exact everywhere, and its conntrack zone is checked). Explain runs twice
per flow, on the configuration's model and on the rules read back from the kernel, and both must agree
with the kernel.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from istio_iptables.config.sidecar import Config, parse
from istio_iptables.explain.walk import Explanation, Flow, Tables, explain
from istio_iptables.frontends.cli.flags import raw_settings
from istio_iptables.frontends.cli.main import command
from istio_iptables.net import Family
from istio_iptables.xtables.model import Address, L4Protocol, Ports, Redirect, Tproxy, Verdict
from tests.beds.flowsender import FORWARDED_V4, FORWARDED_V6, FlowBed, Landing
from tests.conftest import require_kernel
from tests.support.conformance import EXTRA_GROUPS, Case
from tests.support.fakes import FakeHost
from tests.support.netns import NetNS

RuleKey = tuple[str, str, int]  # (table, chain, rule number)
SETTLE_ATTEMPTS = 6
UNPREDICTED = ", which explain did not predict"
APP = 1000


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def case_config(case: Case) -> Config:
    host = FakeHost(files={"/resolv.conf": case.resolv_conf or ""})
    with environment(case.env):
        ctx = command.make_context("istio-iptables", case.cli_args("/resolv.conf"))
        return parse(raw_settings(ctx, ctx.params), host)


@dataclass(frozen=True)
class Probe:
    origin: str
    proto: str
    dst: str
    dport: int
    uid: int = 0
    gid: int = 0
    src: str | None = None

    @property
    def version(self) -> int:
        return ipaddress.ip_address(self.dst).version

    def __str__(self) -> str:
        who = "remote" if self.origin == "remote" else f"{self.origin}({self.uid}/{self.gid})"
        src = f" from {self.src}" if self.src else ""
        return f"{who} {self.proto} {self.dst} {self.dport}{src}"


LOCAL_V4 = [
    ("tcp", d, p)
    for d, p in [
        ("9.9.1.1", 80),
        ("1.1.1.1", 80),
        ("10.1.2.3", 80),
        ("192.0.2.10", 80),
        ("192.0.2.10", 32000),
        ("192.0.2.10", 22),
        ("10.11.0.1", 80),
        ("10.12.0.1", 80),
        ("10.10.0.2", 8080),
        ("10.10.0.2", 15008),
        ("127.0.0.1", 8080),
        ("127.1.2.3", 8080),
        ("127.0.0.53", 53),
    ]
] + [("udp", "127.0.0.53", 53), ("udp", "192.0.2.10", 53), ("udp", "9.9.1.1", 5000)]
LOCAL_V6 = [
    ("tcp", d, p)
    for d, p in [
        ("2001:db8::5", 80),
        ("2001:db9::1", 80),
        ("2001:db9::1", 32000),
        ("fd00:11::1", 80),
        ("fd00:12::1", 80),
        ("fd00:10::2", 8080),
        ("::1", 8080),
        ("::7f00:35", 53),
    ]
] + [("udp", "::7f00:35", 53), ("udp", "2001:db8::5", 5000)]
FEW_V4 = [
    ("tcp", "192.0.2.10", 80),
    ("tcp", "10.10.0.2", 8080),
    ("tcp", "127.0.0.1", 8080),
    ("udp", "127.0.0.53", 53),
]
FEW_V6 = [
    ("tcp", "2001:db9::1", 80),
    ("tcp", "fd00:10::2", 8080),
    ("tcp", "::1", 8080),
    ("udp", "::7f00:35", 53),
]
REMOTE_PORTS = (8080, 15008, 15090, 15021, 15020, 4000, 5000, 6000, 32000, 22, 15006, 15001)


def probes(config: Config, version: int) -> list[Probe]:
    v4 = version == 4
    proxy = (int(config.proxy_uids[0]), int(config.proxy_gids[0]))
    others = [(int(uid), APP) for uid in config.proxy_uids[1:]] + [(APP, int(gid)) for gid in config.proxy_gids]
    groups = (config.owner_groups_include or ()) + config.owner_groups_exclude
    others += [(APP, EXTRA_GROUPS.get(group) or int(group)) for group in groups]
    found: list[Probe] = []
    for uid, gid in [(APP, APP), proxy]:
        found += [Probe("local", proto, dst, port, uid, gid) for proto, dst, port in (LOCAL_V4 if v4 else LOCAL_V6)]
    for uid, gid in dict.fromkeys(others):
        found += [Probe("local", proto, dst, port, uid, gid) for proto, dst, port in (FEW_V4 if v4 else FEW_V6)]
    pod, lo6 = ("10.10.0.2", "127.0.0.6") if v4 else ("fd00:10::2", "::6")
    found += [Probe("local", "tcp", pod, 8080, uid, gid, src=lo6) for uid, gid in [(APP, APP), proxy]]
    found += [Probe("remote", "tcp", pod, port) for port in REMOTE_PORTS[: 12 if v4 else 7]]
    found += [
        Probe("remote", "tcp", "10.11.0.2" if v4 else "fd00:11::2", 8080),
        Probe("remote", "tcp", "10.12.0.2" if v4 else "fd00:12::2", 8080),
        Probe("remote", "udp", pod, 5000),
    ]
    forwarded = FORWARDED_V4 if v4 else FORWARDED_V6
    found += [Probe("remote", "tcp", dst, 80) for dst in (forwarded if config.virt_interfaces else forwarded[:1])]
    return found


def link_of(address: str) -> str:
    for prefix, name in (
        ("10.11.", "eth1"),
        ("fd00:11:", "eth1"),
        ("10.12.", "not-istio-nic"),
        ("fd00:12:", "not-istio-nic"),
    ):
        if address.startswith(prefix):
            return name
    return "eth0"


# One per flow, above the ephemeral range so entries never collide; cycling, because one process may run
# both proofs (2,322 flows each) and a port past 65535 is an error, not a flow.
SOURCE_PORTS = itertools.cycle(range(61000, 65536))


def flow_of(probe: Probe, bed: FlowBed) -> Flow:
    dst = ipaddress.ip_address(probe.dst)
    local = tuple(ipaddress.ip_address(address) for address in bed.pod_addresses)
    if probe.origin == "remote":
        number = _link_number(probe.dst)
        src = ipaddress.ip_address(f"10.{number}.0.1" if dst.version == 4 else f"fd00:{number}::1")
    elif probe.src:
        src = ipaddress.ip_address(probe.src)
    elif dst in local:
        src = dst
    elif dst.is_loopback or (dst.version == 4 and dst in ipaddress.ip_network("127.0.0.0/8")):
        src = ipaddress.ip_address("127.0.0.1" if dst.version == 4 else "::1")
    else:
        number = _link_number(probe.dst)
        src = ipaddress.ip_address(f"10.{number}.0.2" if dst.version == 4 else f"fd00:{number}::2")
    return Flow(
        origin="local" if probe.origin != "remote" else "remote",
        protocol=probe.proto,
        src=src,
        dst=dst,
        sport=next(SOURCE_PORTS),
        dport=probe.dport,
        uid=None if probe.origin == "remote" else probe.uid,
        gid=None if probe.origin == "remote" else probe.gid,
        in_interface=link_of(probe.dst),
        out_interface=link_of(probe.dst),
        local_addresses=local,
    )


def _link_number(address: str) -> int:
    return {"eth1": 11, "not-istio-nic": 12}.get(link_of(address), 10)


def predicted_landing(explanation: Explanation) -> tuple[str | None, int | None, str | None]:
    landing = explanation.landing
    if landing.kind in ("redirect", "tproxy", "local"):
        return "pod", landing.port, landing.original_destination
    if landing.kind == "network":
        return "peer", landing.port, landing.original_destination
    return None, None, None


def observed_landing(landing: Landing, proto: str) -> tuple[str | None, int | None, str | None]:
    if proto != "tcp" or landing.orig is None:
        return landing.where, landing.port, None
    host, _, port = landing.orig.rpartition(":")
    address = ipaddress.ip_address(host.strip("[]"))  # inet_ntop spells ::7f00:35 as ::127.0.0.53
    return landing.where, landing.port, f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"



def group_id(name: str) -> int | None:
    return EXTRA_GROUPS.get(name)


SIDECAR = ("-p", "15001", "-z", "15006", "-u", "1337", "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020")
# The conformance cases capture little (most leave -i empty); add what pods actually run: the injector's
# defaults in both modes, and one configuration using every exclusion knob with DNS capture.
EXTRA_CASES = [
    Case("sidecar-redirect", (*SIDECAR, "-m", "REDIRECT"), {}, True, None, None, None),
    Case("sidecar-tproxy", (*SIDECAR, "-m", "TPROXY"), {}, True, None, None, None),
    Case(
        "sidecar-knobs-dns",
        (
            "-u",
            "1337",
            "-i",
            "*",
            "-x",
            "1.1.0.0/16,2001:db9::/32",
            "-b",
            "4000,6000",
            "-q",
            "32000",
            "-o",
            "22",
            "-c",
            "not-istio-nic",
            "-k",
            "eth1",
            "--redirect-dns",
        ),
        {"ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE": "ftp"},
        True,
        "nameserver 127.0.0.53\nnameserver ::7f00:35\n",
        None,
        None,
    ),
    # Port ranges (iptables' --dport a:b): the probes' ports fall inside and outside each range.
    Case(
        "port-ranges-redirect",
        ("-u", "1337", "-i", "9.9.0.0/16", "-b", "4000:5000,15020:15021", "-q", "31000:33000", "-o", "20:22"),
        {}, True, None, None, None,
    ),
    Case(
        "port-ranges-tproxy",
        ("-u", "1337", "-m", "TPROXY", "-i", "*", "-b", "*", "-d", "15000:15100,5000:", "-o", ":22"),
        {}, True, None, None, None,
    ),
]

def compare(
    probe: Probe,
    from_model: Explanation,
    from_live: Explanation,
    landing: Landing,
    hit: set[RuleKey],
    exact: bool,
    nat_tables: frozenset[str] = frozenset({"nat"}),
) -> list[str]:
    problems = []
    observed = observed_landing(landing, probe.proto)
    for label, explanation in (("model", from_model), ("live", from_live)):
        expected = predicted_landing(explanation)
        if probe.proto == "udp":
            expected = (*expected[:2], None)
        if expected != observed:
            problems.append(
                f"{label} predicted landing {expected}, kernel {observed} ({landing.result}); "
                f"explain: {explanation.landing.kind} {[s.text for s in explanation.steps]}"
            )
    if from_model.matched != from_live.matched:
        problems.append(f"model path {from_model.matched} != live path {from_live.matched}")
    predicted = set(from_live.matched)
    nat_predicted = {key for key in predicted if key[0] in nat_tables}
    nat_hit = {key for key in hit if key[0] in nat_tables}
    if nat_predicted != nat_hit:
        problems.append(f"nat rules: explain {sorted(nat_predicted)}, kernel counters {sorted(nat_hit)}")
    missing = predicted - hit
    if missing:
        problems.append(f"explain says the packet matched {sorted(missing)}, the kernel counted nothing there")
    if exact and hit - predicted:
        problems.append(f"kernel counted {sorted(hit - predicted)}{UNPREDICTED}")
    return problems


def compare_zone(flow: Flow, explanation: Explanation, zones: dict[tuple[str, int, int], int]) -> list[str]:
    """The conntrack zone explain says the raw table gives the flow is the zone its entry is in."""
    zones_set = [int(effect.split()[-1]) for effect in explanation.effects if "zone" in effect]
    if len(zones_set) > 1:
        return [f"explain sets several conntrack zones {zones_set}; the kernel keeps only the first"]
    predicted = zones_set[0] if zones_set else 0
    observed = zones.get((str(flow.dst), flow.dport, flow.sport))
    if observed is None:
        return [f"no conntrack entry for the flow (entries: {sorted(zones)})"]
    if observed != predicted:
        return [f"explain predicted conntrack zone {predicted}, the kernel put the flow in zone {observed}"]
    return []


def unpredicted_decisions(tables: Tables, explanation: Explanation, hit: set[RuleKey]) -> list[str]:
    """Later packets of a TCP connection never reach a REDIRECT, TPROXY or DROP rule: any that counted
    packets was the first packet's decision, so explain must have named it."""
    deciding = {
        key
        for key in hit - set(explanation.matched)
        if isinstance(tables.chains[key[:2]][key[2] - 1].rule.target, Redirect | Tproxy)
        or tables.chains[key[:2]][key[2] - 1].rule.target == Verdict("DROP")
    }
    return [f"the kernel decided with {sorted(deciding)}, which explain did not predict"] if deciding else []

@contextmanager
def flow_bed() -> Iterator[FlowBed]:
    require_kernel()
    with NetNS("xpod") as pod, NetNS("xpeer") as peer:
        bed = FlowBed(pod, peer, groups=EXTRA_GROUPS)
        try:
            yield bed
        finally:
            bed.close()


@dataclass(frozen=True)
class Backend:
    """How the proof sees one backend's rules once the caller has installed them."""

    model: Callable[[Family], Tables | None]  # explain's tables from the configuration
    snapshot: Callable[[Family], tuple[Tables, dict[RuleKey, int]]]  # the kernel's rules and their packet counters
    nat_tables: frozenset[str]  # tables whose rules see only a connection's first packet


def measure(
    probe: Probe,
    bed: FlowBed,
    backend: Backend,
    family: Family,
    model_tables: Tables | None,
    live_tables: Tables,
    before: dict[RuleKey, int],
) -> tuple[list[str], bool, dict[RuleKey, int]]:
    """Send one probe; the disagreements, whether only background-prone rules disagreed, the counters."""
    flow = flow_of(probe, bed)
    from_model = explain(model_tables, flow, group_id)
    from_live = explain(live_tables, flow)
    exact = probe.proto == "udp"
    if exact:
        before = backend.snapshot(family)[1]  # a lone datagram: count from just before
    # Forwarded destinations never answer when nothing captures them: do not wait long for them.
    forwarded = probe.dst in FORWARDED_V4 + FORWARDED_V6
    landing = bed.send(
        origin=probe.origin,
        proto=probe.proto,
        dst=probe.dst,
        dport=probe.dport,
        src=probe.src,
        sport=flow.sport,
        uid=probe.uid,
        gid=probe.gid,
        timeout=0.1 if forwarded else 1.0,
    )
    # A packet nothing answers may still wait in a backlog when the sender gives up (on a busy
    # machine): let the counters settle before calling it a disagreement. Counters only grow,
    # so waiting can add hits but never hide one.
    for attempt in range(SETTLE_ATTEMPTS):
        after = backend.snapshot(family)[1]
        hit = {key for key, packets in after.items() if packets > before.get(key, 0)}
        problems = compare(probe, from_model, from_live, landing, hit, exact, backend.nat_tables)
        problems += unpredicted_decisions(live_tables, from_live, hit)
        if not problems or landing.where is not None:
            break
        time.sleep(0.05 * (attempt + 1))
    unpredicted = hit - set(from_live.matched)
    background = counted_other_packets(live_tables, unpredicted, probe.proto)
    noise_only = exact and only_unpredicted_counts(problems) and background
    if exact:
        problems += compare_zone(flow, from_live, bed.conntrack_zones(family.value))
    return problems, noise_only, after


def only_unpredicted_counts(problems: list[str]) -> bool:
    return bool(problems) and all(problem.endswith(UNPREDICTED) for problem in problems)


def counted_other_packets(tables: Tables, keys: set[RuleKey], proto: str) -> bool:
    """Whether every unpredicted count may belong to a packet other than the probe.

    A rule without a protocol, port or address match also counts packets the namespace sends by itself
    (an IPv6 MLD report, say); a rule that only takes another protocol cannot have counted the probe at
    all: a late segment of an earlier TCP probe, say.
    """
    specific = (L4Protocol, Ports, Address)

    def other_packet(key: RuleKey) -> bool:
        matches = tables.chains[key[:2]][key[2] - 1].rule.matches
        protocols = [match for match in matches if isinstance(match, L4Protocol)]
        if any((match.name == proto) == match.negate for match in protocols):
            return True
        return not any(isinstance(match, specific) for match in matches)

    return all(other_packet(key) for key in keys)


def prove(case: Case, config: Config, bed: FlowBed, backend: Backend) -> None:
    disagreements: list[str] = []
    sent = 0
    for family in (Family.V4, Family.V6) if config.enable_ipv6 else (Family.V4,):
        model_tables = backend.model(family)
        live_tables, before = backend.snapshot(family)
        assert not live_tables.problems, live_tables.problems
        for probe in probes(config, family.value):
            # A lone datagram is compared exactly everywhere; a disagreement that only rules able to count
            # another packet saw may be background (see counted_other_packets): such a probe is measured
            # once more with a fresh flow, and the second measurement decides.
            for trial in range(2):
                problems, noise_only, before = measure(probe, bed, backend, family, model_tables, live_tables, before)
                sent += 1
                if not (problems and noise_only and trial == 0):
                    break
            disagreements += [f"{case.name} {probe}: {problem}" for problem in problems]
    assert sent > 0
    assert not disagreements, "\n".join(disagreements)
