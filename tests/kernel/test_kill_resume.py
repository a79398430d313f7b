"""Killed anywhere, the same command run again finishes the job (issue 11).

A run killed part-way leaves each (family, table) either exactly as planned or holding nothing of
ours, and perhaps rules without their TPROXY routes: the same command finishes that (exit 0, the
exact rules, routes and ::6 of a lone run) without --reconcile; another configuration is still drift.
"""

from __future__ import annotations

import os
import random
import subprocess
import time
from pathlib import Path

import pytest

from istio_iptables.errors import ExitCode
from tests.support.locks_support import (
    ALL_BACKENDS,
    backend_args,
    finish,
    reference_state,
    rules,
    start,
    whole_state,
)
from tests.support.netns import NetNS

TPROXY = ["-p", "15001", "-z", "15006", "-u", "1337", "-m", "TPROXY", "-i", "*", "-b", "*", "--enable-ipv6"]
OTHER = ["-p", "15001", "-z", "15006", "-u", "1337", "-i", "*", "-b", "8080", "--enable-ipv6"]
# Bounded number of random kills per backend in the suite; scripts can ask for more.
TRIALS = int(os.environ.get("ISTIO_IPTABLES_KILL_TRIALS", "6"))
IPTABLES_BACKENDS = ("legacy", "nft")


def kill_the_run_on(directory: Path, program: str) -> dict[str, str]:
    """``program`` kills the istio-iptables process that started it, and writes nothing."""
    directory.mkdir(exist_ok=True)
    (directory / program).write_text('#!/bin/sh\nkill -KILL $PPID\nexit 1\n')
    (directory / program).chmod(0o755)
    return {"PATH": f"{directory}:{os.environ['PATH']}"}


@pytest.mark.parametrize("backend", IPTABLES_BACKENDS)
def test_killed_between_ipv4_and_ipv6_the_same_command_finishes(backend: str, netns, tmp_path: Path) -> None:
    args = [*TPROXY, *backend_args(backend)]
    env = kill_the_run_on(tmp_path / "bin", f"ip6tables-{backend}-restore")
    code, _ = finish(start(netns, args, env=env))
    assert code == -9
    v4, v6 = rules(netns, backend).split("\n--\n")
    assert "ISTIO_OUTPUT" in v4 and "ISTIO" not in v6

    code, stderr = finish(start(netns, args))
    assert code == 0, stderr
    assert "finishing an interrupted run of this configuration: IPv6" in stderr
    assert whole_state(netns, backend) == reference_state(backend, TPROXY)


@pytest.mark.parametrize("backend", IPTABLES_BACKENDS)
def test_an_interrupted_run_of_another_configuration_is_still_drift(backend: str, netns, tmp_path: Path) -> None:
    env = kill_the_run_on(tmp_path / "bin", f"ip6tables-{backend}-restore")
    finish(start(netns, [*TPROXY, *backend_args(backend)], env=env))
    before = whole_state(netns, backend)
    code, stderr = finish(start(netns, [*OTHER, *backend_args(backend)]))
    assert code == ExitCode.DRIFT, stderr
    assert whole_state(netns, backend) == before


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_rules_without_their_routes_get_them_back(backend: str, netns) -> None:
    """A run killed after the rules, before the ip rule/route/::6 (a window of a few netlink messages)."""
    args = [*TPROXY, *backend_args(backend)]
    assert finish(start(netns, args))[0] == 0
    for family in ("-4", "-6"):
        netns.run("ip", family, "rule", "del", "fwmark", "0x539", "lookup", "133")
        netns.run("ip", family, "route", "flush", "table", "133")
    netns.run("ip", "-6", "addr", "del", "::6/128", "dev", "lo")
    code, stderr = finish(start(netns, args))
    assert code == 0, stderr
    assert "nothing to write" in stderr  # the rules stand: only the routes are written
    assert whole_state(netns, backend) == reference_state(backend, TPROXY)


def test_native_another_configuration_after_a_complete_run_is_drift(netns) -> None:
    assert finish(start(netns, [*TPROXY, *backend_args("native")]))[0] == 0
    before = whole_state(netns, "native")
    code, stderr = finish(start(netns, [*OTHER, *backend_args("native")]))
    assert code == ExitCode.DRIFT, stderr
    assert whole_state(netns, "native") == before


def started_working(namespace: NetNS, args: list[str]) -> subprocess.Popen[str]:
    """The CLI, once it is about to write (its debug log shows the first input): the moments worth a kill."""
    running = start(namespace, [*args, "--log_output_level=default:debug"])
    marker = "nftables: applying" if "--native-nftables" in args else "input for IPv4"
    seen = ""
    while marker not in seen:
        line = running.stderr.readline() if running.stderr else ""
        assert line, seen
        seen += line
    return running


def lone_run_seconds(backend: str) -> float:
    """From the first write to the exit of a lone run."""
    with NetNS() as namespace:
        running = started_working(namespace, [*TPROXY, *backend_args(backend)])
        began = time.monotonic()
        code, stderr = finish(running)
        assert code == 0, stderr
        return time.monotonic() - began


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_killed_at_random_moments_the_same_command_converges(backend: str, netns_factory) -> None:
    """SIGKILL at a random moment of the writing (0 to 1.2x a lone run's time from its first write to its exit), TRIALS
    times, each in a fresh namespace: the same command then
    exits 0 with exactly a lone run's rules, routes and ::6, and cleanup leaves nothing of ours."""
    args = [*TPROXY, *backend_args(backend)]
    expected = reference_state(backend, TPROXY)
    empty = whole_state(netns_factory(), backend)
    seed = int(os.environ.get("ISTIO_IPTABLES_KILL_SEED", str(time.time_ns())))
    chance = random.Random(seed)
    span = 1.2 * lone_run_seconds(backend)
    outcomes = {"untouched": 0, "partial": 0, "complete": 0}
    for trial in range(TRIALS):
        namespace = netns_factory()
        delay = chance.uniform(0, span)
        running = started_working(namespace, args)
        time.sleep(delay)
        running.kill()
        finish(running)
        left = whole_state(namespace, backend)
        outcomes["untouched" if left == empty else "complete" if left == expected else "partial"] += 1
        code, stderr = finish(start(namespace, args))
        where = f"seed {seed}, trial {trial}, killed after {delay:.3f}s of {span:.3f}s"
        assert code == 0, f"{where}: {stderr}"
        assert whole_state(namespace, backend) == expected, where
        code, stderr = finish(start(namespace, ["--cleanup-only", *backend_args(backend)]))
        assert code == 0, f"{where}: {stderr}"
        assert whole_state(namespace, backend) == empty, where
        namespace.delete()
    print(f"{backend}: {TRIALS} kills (seed {seed}) left {outcomes}")


def test_which_partial_states_count_as_an_interrupted_run() -> None:
    """The resume rule, on the model: each (family, table) exactly planned or empty of ours."""
    from istio_iptables.engine.xtables import interrupted_parts
    from istio_iptables.net import Family
    from istio_iptables.policy.sidecar_xtables import build_plan
    from istio_iptables.xtables.reconcile import desired_state
    from tests.support.apply_support import config_of

    def wanted(args: list[str]) -> dict:
        plan = build_plan(config_of(args))
        return {ruleset.family: desired_state(ruleset) for ruleset in plan.rulesets}

    plan, other = wanted(TPROXY), wanted(OTHER)
    v4, v6 = Family.V4, Family.V6
    assert interrupted_parts({v4: plan[v4], v6: {}}, plan) == ["IPv6 mangle", "IPv6 nat"]
    only_nat = {v4: {"nat": plan[v4]["nat"]}, v6: {}}
    assert interrupted_parts(only_nat, plan) == ["IPv4 mangle", "IPv6 mangle", "IPv6 nat"]
    assert interrupted_parts({v4: {}, v6: plan[v6]}, plan) == ["IPv4 mangle", "IPv4 nat"]
    assert interrupted_parts(plan, plan) is None  # complete: nothing to finish
    assert interrupted_parts({v4: other[v4], v6: {}}, plan) is None  # another configuration: drift
    edited = {**plan[v4]["nat"], "ISTIO_OUTPUT": plan[v4]["nat"]["ISTIO_OUTPUT"][1:]}
    assert interrupted_parts({v4: {"nat": edited}, v6: {}}, plan) is None  # an edited rule: drift
    assert interrupted_parts({v4: {"raw": {"ISTIO_OUTPUT_DNS": []}}, v6: {}}, plan) is None  # not ours to write
