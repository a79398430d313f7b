"""Ambient apply through the engine (issue 14), in real namespaces, on the legacy and the nft iptables
backends and with native nftables: what ``istio-iptables ambient`` without ``--dry-run`` writes, its
no-op re-run, drift (exit 3) and ``--reconcile``, ``--cleanup-only`` leaving foreign objects
byte-identical (counters included), the refusal to mix sidecar and ambient rules in one namespace,
the node's rules and probe sets (``--host``, ``--enrol``/``--unenrol``), and the namespace lock.

Every run is the real CLI started on the host with ``--network-namespace`` (as a node agent calls
us), with this test's own ``XTABLES_LOCKFILE`` so no other test waits on ours.
"""

from __future__ import annotations

import difflib
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from istio_iptables.errors import ExitCode
from istio_iptables.system.nslock import LOCK_NAME, WAIT_ENV
from tests.support.ambient_support import dry_run, load_ambient_cases, nft_listing, split_dry_run
from tests.support.apply_support import FOREIGN_NFT, inside
from tests.support.conformance import golden_restore_documents, load_into_kernel
from tests.support.locks_support import EXECUTABLE, backend_args
from tests.support.netns import NetNS, canonical_save

BACKENDS = ("legacy", "nft", "native")
POD = ("--redirect-dns", "--enable-ipv6")
POD_V4 = ("--redirect-dns", "--disable-ipv6")
SIDECAR = ("-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-b", "*", "--enable-ipv6")
OUR_RULE = "from all fwmark 0x111/0xfff lookup 100"
PROBE_SETS = ("istio-inpod-probes-v4", "istio-inpod-probes-v6")

# Foreign objects: rules (with counters) in the built-in chains ambient also uses, a look-alike of
# ambient's mangle rule in PREROUTING itself, a chain, a POSTROUTING rule ahead of which the node's
# jump goes, ipsets (one named like ours), an nft table, and a policy rule on ambient's mark. Every
# table ambient writes holds a foreign rule: a legacy table, once used in a namespace, stays listed.
FOREIGN_V4 = """*nat
:FOREIGN_NAT - [0:0]
[7:420] -A OUTPUT -d 10.99.0.1/32 -p tcp -j DNAT --to-destination 10.99.0.2:80
[7:420] -A FOREIGN_NAT -j RETURN
[7:420] -A POSTROUTING -o eth9 -j MASQUERADE
COMMIT
*mangle
[7:420] -A PREROUTING -p udp -j MARK --set-xmark 0x7/0xffffffff
[7:420] -A PREROUTING -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff
COMMIT
*raw
[7:420] -A PREROUTING -p udp -m udp --dport 4789 -j NOTRACK
COMMIT
"""
FOREIGN_V6 = """*nat
[7:420] -A OUTPUT -d 2001:db8::1/128 -p tcp -j RETURN
COMMIT
*mangle
[7:420] -A PREROUTING -p udp -j MARK --set-xmark 0x7/0xffffffff
COMMIT
*raw
[7:420] -A PREROUTING -p udp -m udp --dport 4789 -j NOTRACK
COMMIT
"""
FOREIGN_SHELL = (
    "ip rule add fwmark 0x111 lookup 200",
    "ip -6 rule add fwmark 0x111 lookup 200",
    "ip route add local default dev lo table 200",
    "ip -6 route add local ::/0 dev lo table 200",
    "ipset create foreign-probes hash:ip family inet comment",
    "ipset add foreign-probes 10.77.0.1 comment keep-me",
    "ipset create istio-inpod-probes-v4-old hash:ip family inet",
)


def iptables_kind(backend: str) -> str:
    """The iptables backend whose rules a test reads: native's foreign iptables rules sit on nft."""
    return "legacy" if backend == "legacy" else "nft"


@dataclass
class Namespace:
    """A test namespace with the backend under test and its own xtables lock."""

    ns: NetNS
    backend: str
    lockfile: str

    @property
    def env(self) -> dict[str, str]:
        return {"XTABLES_LOCKFILE": self.lockfile}

    def ambient(self, *argv: str, env: dict[str, str] | None = None,
                backend: str | None = None) -> subprocess.CompletedProcess[str]:
        """``istio-iptables ambient --network-namespace NS [backend] ARGV``, run on the host."""
        command = [EXECUTABLE, "ambient", "--network-namespace", self.ns.path,
                   *backend_args(backend or self.backend), *argv]
        return subprocess.run(command, capture_output=True, text=True, check=False, timeout=120,
                              env={**os.environ, **self.env, **(env or {})})

    def sidecar(self, *argv: str) -> subprocess.CompletedProcess[str]:
        command = [EXECUTABLE, "--network-namespace", self.ns.path,
                   *backend_args(self.backend), *argv]
        return subprocess.run(command, capture_output=True, text=True, check=False, timeout=120,
                              env={**os.environ, **self.env})

    def run(self, *command: str, input: str | None = None, check: bool = True) -> str:
        return self.ns.run(*command, input=input, env=self.env, check=check).stdout

    def seed_foreign(self) -> None:
        kind = iptables_kind(self.backend)
        self.run(f"iptables-{kind}-restore", "-c", "--noflush", input=FOREIGN_V4)
        self.run(f"ip6tables-{kind}-restore", "-c", "--noflush", input=FOREIGN_V6)
        self.run("nft", "-f", "-", input=FOREIGN_NFT)
        for command in FOREIGN_SHELL:
            self.run(*command.split())

    def snapshot(self) -> dict[str, str]:
        """Everything a run may touch, byte for byte: saves with counters, nft with handles, policy
        routing, every routing table, ipsets."""
        kind = iptables_kind(self.backend)
        commands = {
            "iptables": (f"iptables-{kind}-save", "-c"),
            "ip6tables": (f"ip6tables-{kind}-save", "-c"),
            "nft": ("nft", "-a", "list", "ruleset"),
            "rules": ("ip", "rule"),
            "rules6": ("ip", "-6", "rule"),
            "routes": ("ip", "route", "show", "table", "all"),
            "routes6": ("ip", "-6", "route", "show", "table", "all"),
            "ipset": ("ipset", "save"),
        }
        return {name: "\n".join(line for line in self.run(*command).splitlines() if not line.startswith("#"))
                for name, command in commands.items()}

    def ours(self) -> list[str]:
        """The rules as the kernel holds them, comparable with a dry run loaded by hand (no counters)."""
        if self.backend == "native":
            return nft_listing(self.ns)
        kind = iptables_kind(self.backend)
        return [*canonical_save(self.run(f"iptables-{kind}-save")), "--",
                *canonical_save(self.run(f"ip6tables-{kind}-save"))]

    def traffic(self) -> None:
        """A few packets through every hook ambient uses (lo: OUTPUT, then PREROUTING), so counters move."""
        script = ("import socket\nfor address in ('127.0.0.1', '::1'):\n    try:\n"
                  "        socket.create_connection((address, 9), 1).close()\n    except OSError:\n        pass\n")
        self.run("python3", "-c", script)


@pytest.fixture
def make_namespace(netns_factory: Callable[[str], NetNS], tmp_path: Path) -> Iterator[Callable[[str], Namespace]]:
    def make(backend: str) -> Namespace:
        lockfile = tmp_path / f"xtables-{len(list(tmp_path.iterdir()))}.lock"
        lockfile.touch()
        return Namespace(netns_factory("iit-ambe"), backend, str(lockfile))

    yield make


def reference(make_namespace: Callable[[str], Namespace], backend: str, argv: tuple[str, ...]) -> list[str]:
    """What our dry run of ``argv`` holds once loaded by hand into a fresh namespace (with its sets)."""
    target = make_namespace(backend)
    text = dry_run(None, "ambient", *backend_args(backend), *argv)
    if backend == "native":
        target.run("nft", "-f", "-", input=text)
    else:
        sets, documents = split_dry_run(text)
        if sets:
            target.run("ipset", "restore", input=sets)
        load_into_kernel(target.ns, documents, iptables_kind(backend))
    return target.ours()


def assert_same(after: dict[str, str], before: dict[str, str], step: str) -> None:
    for name in before:
        diff = difflib.unified_diff(before[name].splitlines(), after[name].splitlines(), "before", step, lineterm="")
        assert after[name] == before[name], f"{step}: {name} changed\n" + "\n".join(diff)


def assert_foreign_kept(before: dict[str, str], after: dict[str, str], step: str) -> None:
    """Every line of ``before`` is still there, in order (ours may be in between; nft handles aside)."""
    for name, text in before.items():
        if name == "nft":
            continue  # the nft listing's handles and table order move with ours; cleanup compares it whole
        remaining = iter(after[name].splitlines())
        missing = [line for line in text.splitlines() if line not in remaining]
        assert not missing, f"{step}: {name} lost {missing}\n{after[name]}"


def policy_routing(namespace: Namespace) -> dict[str, str]:
    """The policy rules, and table 100's routes ("" when the table does not exist: ip exits 2 then)."""
    return {
        "rules": namespace.run("ip", "rule"),
        "rules6": namespace.run("ip", "-6", "rule"),
        "table": namespace.run("ip", "route", "show", "table", "100", check=False),
        "table6": namespace.run("ip", "-6", "route", "show", "table", "100", check=False),
    }


# --- a pod's rules: apply, re-run, drift, reconcile ---------------------------------------------


@pytest.mark.parametrize("argv", (POD, POD_V4), ids=("dual-stack", "ipv4"))
@pytest.mark.parametrize("backend", BACKENDS)
def test_apply_writes_the_dry_runs_rules_and_the_policy_routing(
    backend: str, argv: tuple[str, ...], make_namespace: Callable[[str], Namespace]
) -> None:
    pod = make_namespace(backend)
    applied = pod.ambient(*argv)
    assert applied.returncode == 0, applied.stderr
    assert pod.ours() == reference(make_namespace, backend, argv)
    routing = policy_routing(pod)
    assert f"32764:\t{OUR_RULE}" in routing["rules"], routing
    assert "local default dev lo" in routing["table"], routing
    if "--enable-ipv6" in argv:
        assert f"32764:\t{OUR_RULE}" in routing["rules6"], routing
        assert "local default dev lo" in routing["table6"], routing
    else:
        assert "0x111" not in routing["rules6"] and not routing["table6"].strip(), routing
        if backend != "native":
            assert not canonical_save(pod.run(f"ip6tables-{iptables_kind(backend)}-save")), "IPv6 rules written"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_rerun_with_the_same_flags_writes_nothing(backend: str, make_namespace: Callable[[str], Namespace]) -> None:
    pod = make_namespace(backend)
    assert pod.ambient(*POD).returncode == 0
    pod.traffic()  # counters that a rewrite would reset
    before = pod.snapshot()
    assert "[0:0] -A OUTPUT" not in before["iptables"] or backend == "native", before["iptables"]
    rerun = pod.ambient(*POD)
    assert rerun.returncode == 0, rerun.stderr
    assert_same(pod.snapshot(), before, "re-run")  # counters, nft handles, routes: all unchanged


@pytest.mark.parametrize("backend", BACKENDS)
def test_other_flags_are_drift_until_reconcile_replaces_the_rules(
    backend: str, make_namespace: Callable[[str], Namespace]
) -> None:
    pod = make_namespace(backend)
    assert pod.ambient(*POD).returncode == 0
    before = pod.snapshot()
    other = ("--redirect-dns=false", "--enable-ipv6")
    drift = pod.ambient(*other)
    assert drift.returncode == ExitCode.DRIFT, drift.stderr
    assert "15053" in drift.stderr and "--reconcile" in drift.stderr, drift.stderr  # a diff naming the DNS rules
    assert_same(pod.snapshot(), before, "drift")
    reconciled = pod.ambient(*other, "--reconcile")
    assert reconciled.returncode == 0, reconciled.stderr
    assert pod.ours() == reference(make_namespace, backend, other)
    assert f"32764:\t{OUR_RULE}" in pod.run("ip", "rule")
    settled = pod.snapshot()
    assert pod.ambient(*other).returncode == 0
    assert_same(pod.snapshot(), settled, "re-run after reconcile")


def test_with_ipv6_off_on_lo_the_ipv6_local_route_is_skipped_and_a_rerun_stays_a_noop(
    make_namespace: Callable[[str], Namespace]
) -> None:
    """As Istio's node agent: lo without IPv6 cannot hold ``local ::/0``; the rules and both ip rules go in."""
    pod = make_namespace("nft")
    pod.run("sysctl", "-qw", "net.ipv6.conf.lo.disable_ipv6=1")
    applied = pod.ambient(*POD)
    assert applied.returncode == 0, applied.stderr
    routing = policy_routing(pod)
    assert OUR_RULE in routing["rules"] and OUR_RULE in routing["rules6"], routing
    assert "local default dev lo" in routing["table"] and not routing["table6"].strip(), routing
    before = pod.snapshot()
    assert pod.ambient(*POD).returncode == 0
    assert_same(pod.snapshot(), before, "re-run")
    cleaned = pod.ambient(*POD, "--cleanup-only")
    assert cleaned.returncode == 0, cleaned.stderr
    routing = policy_routing(pod)
    assert "0x111" not in routing["rules"] + routing["rules6"] and not routing["table"].strip(), routing
    assert pod.ours() == make_namespace("nft").ours()


# --- cleanup: exactly ours goes ------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_cleanup_removes_exactly_ours_and_leaves_foreign_objects_byte_identical(
    backend: str, make_namespace: Callable[[str], Namespace]
) -> None:
    pod = make_namespace(backend)
    pod.seed_foreign()
    before = pod.snapshot()
    applied = pod.ambient(*POD)
    assert applied.returncode == 0, applied.stderr
    after_apply = pod.snapshot()
    assert_foreign_kept(before, after_apply, "apply")
    assert OUR_RULE in after_apply["rules"] and OUR_RULE in after_apply["rules6"]
    assert "fwmark 0x111 lookup 200" in after_apply["rules"]  # the foreign rule on our mark: still there
    cleaned = pod.ambient(*POD, "--cleanup-only")
    assert cleaned.returncode == 0, cleaned.stderr
    assert_same(pod.snapshot(), before, "cleanup")
    again = pod.ambient(*POD, "--cleanup-only")  # nothing of ours left: still fine, still nothing touched
    assert again.returncode == 0, again.stderr
    assert_same(pod.snapshot(), before, "second cleanup")


def test_cleanup_keeps_table_100_while_another_rule_looks_it_up(
    make_namespace: Callable[[str], Namespace]
) -> None:
    pod = make_namespace("nft")
    pod.run("ip", "rule", "add", "fwmark", "0x222", "lookup", "100", "pref", "1000")
    assert pod.ambient(*POD).returncode == 0
    cleaned = pod.ambient(*POD, "--cleanup-only")
    assert cleaned.returncode == 0, cleaned.stderr
    routing = policy_routing(pod)
    assert OUR_RULE not in routing["rules"] and OUR_RULE not in routing["rules6"], routing
    assert "1000:\tfrom all fwmark 0x222 lookup 100" in routing["rules"], routing
    assert "local default dev lo" in routing["table"], routing  # someone else still looks it up
    assert not routing["table6"].strip(), routing  # nobody looks table 100 up in IPv6


@pytest.mark.parametrize("backend", ("legacy", "nft"))
def test_cleanup_removes_what_istios_node_agent_left(backend: str, make_namespace: Callable[[str], Namespace]) -> None:
    """A pod that Istio's node agent set up (its golden rules and policy routing): our cleanup removes
    it all, whatever DNS setting the pod had (Istio's delete commands do not depend on it)."""
    case = next(case for case in load_ambient_cases() if case.name == "default-ipv6")
    pod = make_namespace(backend)
    pod.seed_foreign()
    before = pod.snapshot()
    for index, document in enumerate(golden_restore_documents(case.golden_iptables)):
        pod.run(f"{'ip6tables' if index else 'iptables'}-{backend}-restore", "--noflush", input=document)
    for family in ("-4", "-6"):
        pod.run("ip", family, "rule", "add", "fwmark", "0x111/0xfff", "pref", "32764", "lookup", "100")
        pod.run("ip", family, "route", "replace", "local", "default" if family == "-4" else "::/0", "dev", "lo",
                "table", "100")
    cleaned = pod.ambient("--enable-ipv6", "--cleanup-only")
    assert cleaned.returncode == 0, cleaned.stderr
    assert_same(pod.snapshot(), before, "cleanup of Istio's rules")


# --- sidecar and ambient never share a namespace -----------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_ambient_refuses_a_namespace_holding_sidecar_rules(
    backend: str, make_namespace: Callable[[str], Namespace]
) -> None:
    pod = make_namespace(backend)
    sidecar = pod.sidecar(*SIDECAR)
    assert sidecar.returncode == 0, sidecar.stderr
    before = pod.snapshot()
    for extra in ((), ("--reconcile",)):
        refused = pod.ambient(*POD, *extra)
        assert refused.returncode == ExitCode.DRIFT, (extra, refused.stderr)
        assert_same(pod.snapshot(), before, f"ambient {' '.join(extra)}")
    cleaned = pod.ambient(*POD, "--cleanup-only")  # ambient's cleanup: the sidecar's rules are not its own
    assert cleaned.returncode == 0, cleaned.stderr
    assert_same(pod.snapshot(), before, "ambient --cleanup-only")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_sidecar_run_refuses_a_namespace_holding_ambient_rules(
    backend: str, make_namespace: Callable[[str], Namespace]
) -> None:
    pod = make_namespace(backend)
    assert pod.ambient(*POD).returncode == 0
    before = pod.snapshot()
    refused = pod.sidecar(*SIDECAR)
    assert refused.returncode == ExitCode.DRIFT, refused.stderr
    assert_same(pod.snapshot(), before, "sidecar apply")
    cleaned = pod.sidecar(*SIDECAR, "--cleanup-only")  # the sidecar's cleanup: ambient's rules are not its own
    assert cleaned.returncode == 0, cleaned.stderr
    assert_same(pod.snapshot(), before, "sidecar --cleanup-only")


# --- the node's rules and probe sets -------------------------------------------------------------


def host_flags(backend: str) -> tuple[str, ...]:
    return ("--host", "--enable-ipv6", *(("--kubelet-uid", "0") if backend == "native" else ()))


def probe_members(node: Namespace) -> str:
    if node.backend == "native":
        return "".join(node.run("nft", "list", "set", "inet", "istio-ambient-nat", name) for name in PROBE_SETS)
    return "".join(line + "\n" for line in node.run("ipset", "save").splitlines() if line.startswith("add istio-inpod"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_host_rules_probe_sets_enrolment_and_cleanup(backend: str, make_namespace: Callable[[str], Namespace]) -> None:
    node = make_namespace(backend)
    node.seed_foreign()
    before = node.snapshot()
    host = host_flags(backend)
    clean = make_namespace(backend)  # the rules alone, beside the dry run's
    applied = clean.ambient(*host)
    assert applied.returncode == 0, applied.stderr
    assert clean.ours() == reference(make_namespace, backend, host)
    applied = node.ambient(*host)
    assert applied.returncode == 0, applied.stderr
    after = node.snapshot()
    assert_foreign_kept(before, after, "host apply")
    if backend == "native":
        table = node.run("nft", "list", "table", "inet", "istio-ambient-nat")
        assert all(f"set {name}" in table for name in PROBE_SETS), table
    else:
        postrouting = [line for line in after["iptables"].splitlines() if "-A POSTROUTING" in line]
        assert postrouting[0].endswith("-A POSTROUTING -j ISTIO_POSTRT"), postrouting  # inserted first
        assert "MASQUERADE" in postrouting[1], postrouting
        sets = node.run("ipset", "list", "-n").split()
        assert set(PROBE_SETS) <= set(sets), sets

    enrolled = node.ambient(*host, "--enrol", "10.0.0.2,fd00::2", "--pod-uid", "pod-a")
    assert enrolled.returncode == 0, enrolled.stderr
    assert node.ambient(*host, "--enrol", "10.0.0.3", "--pod-uid", "pod-b").returncode == 0
    members = probe_members(node)
    for address, uid in (("10.0.0.2", "pod-a"), ("fd00::2", "pod-a"), ("10.0.0.3", "pod-b")):
        assert f'{address} comment "{uid}"' in members, members
    with_members = node.snapshot()
    rerun = node.ambient(*host)  # the node's rules again: a no-op that keeps the agent's members
    assert rerun.returncode == 0, rerun.stderr
    assert_same(node.snapshot(), with_members, "host re-run")
    for _ in range(2):  # removing an absent member is fine too
        unenrolled = node.ambient(*host, "--unenrol", "10.0.0.2")
        assert unenrolled.returncode == 0, unenrolled.stderr
    members = probe_members(node)
    assert "10.0.0.2 " not in members and "10.0.0.3" in members and "fd00::2" in members, members

    cleaned = node.ambient(*host, "--cleanup-only")
    assert cleaned.returncode == 0, cleaned.stderr
    assert_same(node.snapshot(), before, "host cleanup")  # rules and probe sets gone, foreign ones kept


# --- the namespace lock --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_ambient_runs_take_the_namespace_lock(backend: str, make_namespace: Callable[[str], Namespace]) -> None:
    pod = make_namespace(backend)
    with inside(pod.ns):
        held = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        held.bind(LOCK_NAME)
        held.listen(8)
    try:
        began = time.monotonic()
        blocked = pod.ambient(*POD, env={WAIT_ENV: "1"})
        took = time.monotonic() - began
    finally:
        held.close()
    assert blocked.returncode == ExitCode.ENVIRONMENT, blocked.stderr
    assert f"held by pid {os.getpid()}" in blocked.stderr and "nothing was written" in blocked.stderr
    assert 0.9 <= took < 60, took
    assert pod.ours() == make_namespace(backend).ours()  # nothing written
    assert OUR_RULE not in pod.run("ip", "rule")
    assert pod.ambient(*POD, env={WAIT_ENV: "1"}).returncode == 0  # free again: it goes ahead
