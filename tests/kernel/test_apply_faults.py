"""Rollback under injected faults, lock contention, backend detection and environment errors."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from istio_iptables.engine.xtables import apply
from istio_iptables.errors import ApplyError, EnvironmentProblem, ExitCode, IstioIptablesError
from istio_iptables.net import Family
from istio_iptables.policy.sidecar_xtables import build_plan
from istio_iptables.system.real import RealSystem
from istio_iptables.system.xtables_restore import RestoreFailed, explain_failure
from istio_iptables.xtables.model import ISTIO_OUTPUT, CtZone, Plan, Rule, RuleSet
from tests.support.apply_support import (
    BACKENDS,
    config_of,
    inside,
    program,
    save_both,
    seed_foreign,
    without_comments,
)
from tests.support.netns import canonical_save

TPROXY_V6 = [
    "-u",
    "1337",
    "-m",
    "TPROXY",
    "-b",
    "*",
    "-i",
    "*",
    "-c",
    "eth7",
    "--enable-ipv6",
    "--drop-invalid",
]
REAL_SBIN = "/usr/sbin"


def shim(directory: Path, name: str, body: str) -> None:
    """A stand-in for ``name`` that misbehaves on writes (--noflush) and is the real one otherwise."""
    directory.mkdir(exist_ok=True)
    path = directory / name
    path.write_text(f'#!/bin/sh\ncase " $* " in *" --noflush "*) {body};; esac\nexec {REAL_SBIN}/{name} "$@"\n')
    path.chmod(0o755)


def snapshot(namespace, backend: str) -> dict[Family, str]:
    return {family: without_comments(text) for family, text in save_both(namespace, backend).items()}


def routes(namespace) -> str:
    return "".join(
        namespace.run(*command).stdout
        for command in (("ip", "rule"), ("ip", "-6", "rule"), ("ip", "-6", "addr", "show", "dev", "lo"))
    )


def failing_apply(namespace, config, plan: Plan | None = None) -> IstioIptablesError:
    with inside(namespace), pytest.raises(IstioIptablesError) as failed:
        apply(config, plan or build_plan(config))
    return failed.value


@pytest.mark.parametrize("backend", BACKENDS)
def test_ipv6_restore_failure_rolls_back_ipv4(backend: str, netns, tmp_path: Path, monkeypatch) -> None:
    seed_foreign(netns, backend)
    before, routes_before = snapshot(netns, backend), routes(netns)
    shim(
        tmp_path / "bin",
        program(backend, Family.V6, "restore"),
        'cat >/dev/null; echo "ip6tables-restore: line 3 failed: injected" >&2; exit 1',
    )
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    error = failing_apply(netns, config_of(TPROXY_V6))
    assert error.exit_code == ExitCode.FAILURE
    assert "rolled back" in str(error) and "> " in str(error)
    assert snapshot(netns, backend) == before
    assert routes(netns) == routes_before


@pytest.mark.parametrize("backend", BACKENDS)
def test_rule_the_kernel_rejects_rolls_back(backend: str, netns, monkeypatch) -> None:
    seed_foreign(netns, backend)
    before = snapshot(netns, backend)
    config = config_of(["-u", "1337", "-i", "*", "-b", "*", "--enable-ipv6"])
    plan = build_plan(config)
    # CT is only valid in the raw table: the kernel refuses it in nat, on the last line of IPv6.
    v6 = plan.ruleset(Family.V6)
    assert v6 is not None
    broken = RuleSet(Family.V6, [*v6.rules, Rule("nat", ISTIO_OUTPUT, (), CtZone(1))])
    error = failing_apply(netns, config, replace(plan, rulesets=(plan.rulesets[0], broken)))
    assert error.exit_code == ExitCode.FAILURE
    message = str(error)
    assert "-A ISTIO_OUTPUT -j CT --zone 1" in message and "\n>" in message, message
    assert snapshot(netns, backend) == before


@pytest.mark.parametrize("backend", BACKENDS)
def test_killed_restore_rolls_back(backend: str, netns_factory, tmp_path: Path, monkeypatch) -> None:
    namespace = netns_factory()  # nothing seeded: tables the write creates must go again (nft)
    before = snapshot(namespace, backend)
    shim(tmp_path / "bin", program(backend, Family.V4, "restore"), "head -c 200 >/dev/null; kill -KILL $$")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    config = config_of(["-u", "1337", "-i", "*", "-b", "*", "--disable-ipv6", f"--force-iptables-binary={backend}"])
    error = failing_apply(namespace, config)
    assert error.exit_code == ExitCode.FAILURE and "killed" in str(error)
    after = snapshot(namespace, backend)
    if backend == "nft":
        assert after == before
    else:  # legacy tables, once instantiated, stay (empty): equal once empty tables are dropped
        assert {f: canonical_save(t) for f, t in after.items()} == {f: canonical_save(t) for f, t in before.items()}


@pytest.mark.parametrize("applier", ["restore", "libiptc"])
def test_a_held_xtables_lock_is_waited_for(applier: str, netns, tmp_path: Path, monkeypatch) -> None:
    lockfile = tmp_path / "xtables.lock"
    monkeypatch.setenv("XTABLES_LOCKFILE", str(lockfile))
    config = config_of(
        ["-u", "1337", "-i", "*", "--disable-ipv6", "--force-iptables-binary=legacy"],
        {"ISTIO_IPTABLES_APPLIER": applier},
    )
    with open(lockfile, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        threading.Timer(1.0, lambda: fcntl.flock(held, fcntl.LOCK_UN)).start()
        started = time.monotonic()
        with inside(netns):
            outcome = apply(config, build_plan(config))
        waited = time.monotonic() - started
    assert outcome.action == "applied"
    assert waited >= 0.9, waited
    assert "ISTIO_OUTPUT" in netns.save("iptables-legacy-save")


def test_cni_mode_locks_per_namespace(netns, monkeypatch) -> None:
    monkeypatch.delenv("XTABLES_LOCKFILE", raising=False)
    config = config_of(["-u", "1337", "-i", "*", "--disable-ipv6", "--force-iptables-binary=legacy", "--cni-mode"])
    with open(netns.path) as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        threading.Timer(1.0, lambda: fcntl.flock(held, fcntl.LOCK_UN)).start()
        started = time.monotonic()
        with inside(netns):
            apply(config, build_plan(config), namespace_path=netns.path)
        assert time.monotonic() - started >= 0.9


def test_both_backends_holding_rules_is_an_error_naming_them(netns) -> None:
    netns.run("iptables-legacy", "-t", "nat", "-A", "OUTPUT", "-p", "udp", "-j", "RETURN")
    netns.run("ip6tables-nft", "-t", "mangle", "-A", "OUTPUT", "-p", "udp", "-j", "RETURN")
    before = snapshot(netns, "legacy"), snapshot(netns, "nft")
    config = config_of(["-u", "1337", "-i", "*", "--disable-ipv6"])
    error = failing_apply(netns, config)
    assert error.exit_code == ExitCode.ENVIRONMENT
    assert "legacy: IPv4 nat" in str(error) and "nft: IPv6 mangle" in str(error)
    assert (snapshot(netns, "legacy"), snapshot(netns, "nft")) == before
    forced = config_of(["-u", "1337", "-i", "*", "--disable-ipv6", "--force-iptables-binary=nft"])
    with inside(netns):
        assert apply(forced, build_plan(forced)).backend == "nft"


def test_detection_follows_the_rules_and_never_writes(netns) -> None:
    config = config_of(["-u", "1337", "-i", "*", "--disable-ipv6"])
    with inside(netns):
        assert apply(config, build_plan(config)).backend == "nft"  # nothing anywhere: nft
    assert netns.save("iptables-legacy-save") == "" and netns.save("ip6tables-legacy-save") == ""
    assert netns.save("ip6tables-nft-save") == ""


def test_legacy_rules_pick_legacy(netns) -> None:
    netns.run("iptables-legacy", "-t", "filter", "-A", "INPUT", "-p", "udp", "-j", "ACCEPT")
    config = config_of(["-u", "1337", "-i", "*", "--disable-ipv6"])
    with inside(netns):
        assert apply(config, build_plan(config)).backend == "legacy"
    assert netns.save("iptables-nft-save") == ""


def test_missing_iptables_is_an_environment_error(netns, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    error = failing_apply(netns, config_of(["-u", "1337", "--disable-ipv6"]))
    assert error.exit_code == ExitCode.ENVIRONMENT and "not found in PATH" in str(error)


def test_without_net_admin_nothing_is_tried(tmp_path: Path) -> None:
    status = tmp_path / "status"
    status.write_text("Name:\tx\nCapEff:\t0000000000000000\n")
    with pytest.raises(EnvironmentProblem) as refused:
        RealSystem().check_privileges(str(status))
    assert refused.value.exit_code == ExitCode.ENVIRONMENT and "CAP_NET_ADMIN" in str(refused.value)


def test_cli_without_net_admin_exits_4(netns) -> None:
    binary = str(Path(sys.executable).parent / "istio-iptables")
    result = subprocess.run(
        [
            "setpriv",
            "--inh-caps=-net_admin",
            "--bounding-set=-net_admin",
            "ip",
            "netns",
            "exec",
            netns.name,
            binary,
            "-u",
            "1337",
            "--disable-ipv6",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == ExitCode.ENVIRONMENT, result.stderr
    assert "CAP_NET_ADMIN" in result.stderr


@pytest.mark.parametrize(
    ("stderr", "code", "words"),
    [
        (
            "iptables-restore v1.8.9 (legacy): Couldn't load match `owner':No such file or directory",
            4,
            "xt_owner",
        ),
        ("iptables-restore: can't initialize iptables table `nat': Table does not exist", 4, "iptable_nat"),
        ("Another app is currently holding the xtables lock. Stopped waiting after 30s.", 4, "xtables lock"),
        ("iptables-restore: line 2 failed", 1, "line"),
        (
            "Warning: Extension owner revision 0 not supported, missing kernel module?\n"
            "iptables-nft-restore: line 2 failed",
            4,
            "xt_owner",
        ),
        ("iptables-restore: line 2 failed: No chain/target/match by that name", 4, "xt_"),
    ],
)
def test_failures_become_one_actionable_line(stderr: str, code: int, words: str) -> None:
    failure = RestoreFailed(Family.V4, "iptables-restore", "*nat\n-A X -j Y\nCOMMIT\n", 1, stderr)
    error = explain_failure(failure, rolled_back=True)
    assert error.exit_code == code and words in str(error)
    assert isinstance(error, ApplyError) == (code == 1)


def test_tproxy_routes_are_idempotent_and_cleaned_up(netns) -> None:
    args = ["-u", "1337", "-m", "TPROXY", "-b", "*", "--enable-ipv6", "-t", "4242", "-r", "142"]
    config = config_of(args)
    with inside(netns):
        apply(config, build_plan(config))
        assert apply(config, build_plan(config)).action == "unchanged"
    for family in ("-4", "-6"):
        rules = netns.run("ip", family, "rule").stdout
        assert rules.count("fwmark 0x1092 lookup 142") == 1, rules
        assert "local default dev lo" in netns.run("ip", family, "route", "show", "table", "142").stdout
    assert "inet6 ::6/128" in netns.run("ip", "-6", "addr", "show", "dev", "lo").stdout
    cleanup = config_of(["--cleanup-only", "--enable-ipv6", "-r", "142"])  # the table is known from the flags
    with inside(netns):
        assert apply(cleanup, build_plan(cleanup)).action == "cleaned"
    for family in ("-4", "-6"):
        assert "fwmark" not in netns.run("ip", family, "rule").stdout
        assert netns.run("ip", family, "route", "show", "table", "142").stdout == ""
    assert "::6/128" not in netns.run("ip", "-6", "addr", "show", "dev", "lo").stdout


@pytest.mark.parametrize("by_path", [False, True])
def test_network_namespace_flag_enters_it_for_the_whole_run(by_path: bool, netns) -> None:
    host_before = subprocess.run(["readlink", "/proc/self/ns/net"], capture_output=True, text=True).stdout
    binary = str(Path(sys.executable).parent / "istio-iptables")
    target = netns.path if by_path else netns.name
    result = subprocess.run(
        [binary, "--network-namespace", target, "-u", "1337", "-i", "*", "--log_output_level=default:none"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "-A OUTPUT -j ISTIO_OUTPUT" in netns.save("iptables-nft-save")
    assert subprocess.run(["readlink", "/proc/self/ns/net"], capture_output=True, text=True).stdout == host_before


def test_in_process_callers_come_back_to_their_namespace(netns) -> None:
    before = os.readlink("/proc/thread-self/ns/net")
    with inside(netns):
        assert os.readlink("/proc/thread-self/ns/net") != before
    assert os.readlink("/proc/thread-self/ns/net") == before


def test_unknown_namespace_is_invalid_input() -> None:
    binary = str(Path(sys.executable).parent / "istio-iptables")
    result = subprocess.run(
        [binary, "--network-namespace", "no-such-ns-9f8e7d", "-u", "1337"], capture_output=True, text=True, check=False
    )
    assert result.returncode == ExitCode.INVALID_INPUT and "no-such-ns-9f8e7d" in result.stderr


def test_unusable_lock_file_falls_back_to_a_namespace_lock(netns) -> None:
    """An istio-validation style container: uid 1337 with only CAP_NET_ADMIN, legacy backend.

    /run/xtables.lock is root's (and on a read-only root it cannot be created at all): the
    namespace file serves as the lock instead, so the rules still go in.
    """
    binary = str(Path(sys.executable).with_name("istio-iptables"))
    Path("/run/xtables.lock").touch(exist_ok=True)
    result = subprocess.run(
        [
            "ip", "netns", "exec", netns.name,
            "setpriv", "--reuid=1337", "--regid=1337", "--clear-groups",
            "--inh-caps=+net_admin,+net_raw", "--ambient-caps=+net_admin,+net_raw",
            binary, "-u", "1337", "-b", "*", "--disable-ipv6", "--force-iptables-binary", "legacy",
        ],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert result.returncode == ExitCode.OK, result.stderr
    assert "-j ISTIO_IN_REDIRECT" in netns.save("iptables-legacy-save")
