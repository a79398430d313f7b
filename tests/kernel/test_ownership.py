"""What is not ours stays byte-identical; what is ours goes (issue 11, "cleanup and reconcile touch
what is not ours"), on the legacy and nft iptables backends and with --native-nftables.

One namespace per backend is seeded with foreign objects of every kind — rules with counters in every
table (look-alikes of our built-in-chain rules included), a chain, ``ip rule fwmark 1337 lookup 200``
with its ``local default`` route, a route in another table, an ipset named like ours, an nft table, an
address — and snapshotted (iptables-save -c, ip6tables-save -c, nft list ruleset, ip rule, ip route
show table all, ipset save, ip addr). Then: apply (foreign part kept), a failed apply (everything
byte-identical), a reconcile TPROXY -> REDIRECT (foreign kept, our old routing gone), cleanup
(everything byte-identical to the first snapshot).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from istio_iptables.engine.xtables import apply
from istio_iptables.errors import ApplyError, ExitCode, IstioIptablesError
from istio_iptables.net import Family
from istio_iptables.policy.sidecar_xtables import build_plan
from istio_iptables.system import routes
from tests.support.apply_support import FOREIGN_NFT, FOREIGN_V4, FOREIGN_V6, cli_in, config_of, inside, without_comments
from tests.support.netns import NetNS, canonical_save

BACKENDS = ["legacy", "nft", "native"]
CIDRS = ",".join(f"10.{index // 250}.{index % 250}.0/24" for index in range(80))  # > 64: an ipset
TPROXY = ["-m", "TPROXY", "-b", "*", "-i", "*", "-x", CIDRS, "-c", "eth0", "-k", "eth3", "--enable-ipv6"]
REDIRECT = ["-m", "REDIRECT", "-b", "*", "-i", "*", "-c", "eth0", "-k", "eth3", "--enable-ipv6"]
# Look-alikes of the rules our plans put into built-in chains, which no configuration here produces.
LOOK_ALIKES_V4 = """*nat
-A PREROUTING -i eth7 -j RETURN
-A OUTPUT -o eth7 -j RETURN
COMMIT
*mangle
-A PREROUTING -p tcp -m mark --mark 0x7 -j CONNMARK --save-mark --nfmask 0xffffffff --ctmask 0xffffffff
-A OUTPUT -o lo -p tcp -m mark --mark 0x7 -j RETURN
-A OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m owner --uid-owner 999 -j MARK --set-xmark 0x53a/0xffffffff
COMMIT
"""
SHELL_SEED = [
    "ip link set lo up",
    "ip addr add 10.55.0.1/32 dev lo",
    "ip rule add fwmark 1337 lookup 200",
    "ip -6 rule add fwmark 1337 lookup 200",
    "ip route add local default dev lo table 200",
    "ip -6 route add local ::/0 dev lo table 200",
    "ip route add blackhole 10.66.0.0/16 table 300",
    "ipset create istio-v4-out-excl-deadbeef hash:net family inet",
    "ipset add istio-v4-out-excl-deadbeef 10.77.0.0/16",
]


def with_counters(text: str) -> str:
    """Restore input whose rules carry counters (``-c``), so a rule that was rewritten shows."""
    return "".join(f"[7:420] {line}\n" if line.startswith("-A ") else f"{line}\n" for line in text.splitlines())


def iptables_backend(backend: str) -> str:
    return "legacy" if backend == "legacy" else "nft"


def backend_flags(backend: str) -> list[str]:
    return ["--native-nftables"] if backend == "native" else [f"--force-iptables-binary={backend}"]


def seed(namespace: NetNS, backend: str) -> None:
    for command in SHELL_SEED:
        namespace.run(*command.split())
    kind = iptables_backend(backend)
    namespace.run(f"iptables-{kind}-restore", "-c", "--noflush", input=with_counters(FOREIGN_V4 + LOOK_ALIKES_V4))
    namespace.run(f"ip6tables-{kind}-restore", "-c", "--noflush", input=with_counters(FOREIGN_V6))
    namespace.run("nft", "-f", "-", input=FOREIGN_NFT)


def snapshot(namespace: NetNS, backend: str) -> dict[str, str]:
    kind = iptables_backend(backend)
    commands = {
        "iptables": [f"iptables-{kind}-save", "-c"],
        "ip6tables": [f"ip6tables-{kind}-save", "-c"],
        "nft": ["nft", "list", "ruleset"],
        "rules": ["ip", "rule"],
        "rules6": ["ip", "-6", "rule"],
        "routes": ["ip", "route", "show", "table", "all"],
        "routes6": ["ip", "-6", "route", "show", "table", "all"],
        "ipset": ["ipset", "save"],
        "addresses": ["ip", "addr"],
    }
    return {name: without_comments(namespace.run(*command).stdout) for name, command in commands.items()}


def chains_sorted(ruleset: str) -> str:
    """``nft list ruleset`` with each table's chain blocks in name order: a chain of ours that a failed
    run deleted and the rollback created again is listed last by nft; everything else is compared as is."""
    out: list[str] = []
    blocks: list[list[str]] = []
    for line in ruleset.splitlines():
        if line.startswith("\tchain "):
            blocks.append([line])
        elif blocks and line != "}":
            blocks[-1].append(line)
        else:
            out += [text for block in sorted(blocks) for text in block if text]
            blocks = []
            out.append(line)
    return "\n".join(out)


def ours_reordered(state: dict[str, str]) -> dict[str, str]:
    return {**state, "nft": chains_sorted(state["nft"])}


def assert_same(after: dict[str, str], before: dict[str, str], step: str) -> None:
    """Byte for byte, with a readable diff of what differs."""
    import difflib

    for name in before:
        diff = difflib.unified_diff(before[name].splitlines(), after[name].splitlines(), "before", step, lineterm="")
        assert after[name] == before[name], f"{step}: {name}\n" + "\n".join(diff)


def is_subsequence(small: list[str], big: list[str]) -> bool:
    remaining = iter(big)
    return all(line in remaining for line in small)


def assert_foreign_kept(before: dict[str, str], after: dict[str, str], step: str) -> None:
    """Every foreign line is still there, in order, counters included (ours may be in between)."""
    for name, text in before.items():
        assert is_subsequence(text.splitlines(), after[name].splitlines()), f"{step}: {name}\n{after[name]}"


def run_cli(namespace: NetNS, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return cli_in(namespace, [*args, "--log_output_level=default:error"], env=env)


@pytest.mark.parametrize("backend", [*BACKENDS, "legacy-libiptc"])
def test_foreign_objects_stay_byte_identical(backend: str, netns: NetNS, monkeypatch) -> None:
    if backend == "legacy-libiptc":
        backend = "legacy"
        monkeypatch.setenv("ISTIO_IPTABLES_APPLIER", "libiptc")  # the rollback goes through libiptc too
    seed(netns, backend)
    before = snapshot(netns, backend)
    flags = backend_flags(backend)

    applied = run_cli(netns, *TPROXY, *flags)
    assert applied.returncode == 0, applied.stderr
    after_apply = snapshot(netns, backend)
    assert_foreign_kept(before, after_apply, "apply")
    assert "fwmark 0x539 lookup 133" in after_apply["rules"] and "fwmark 0x539 lookup 133" in after_apply["rules6"]

    # A failed reconcile to another TPROXY configuration (the ::6 address cannot be set: IPv6 is off on
    # lo): everything, ours included, exactly as it was. (Turning IPv6 off on lo drops ::1 and ::6.)
    netns.run("sysctl", "-qw", "net.ipv6.conf.lo.disable_ipv6=1")
    before_failure = snapshot(netns, backend)
    failed = run_cli(netns, *TPROXY, "-t", "4242", "-r", "142", "--reconcile", *flags)
    assert failed.returncode == ExitCode.FAILURE, failed.stderr
    assert "rolled back" in failed.stderr
    assert_same(ours_reordered(snapshot(netns, backend)), ours_reordered(before_failure), "failed reconcile (routes)")
    netns.run("sysctl", "-qw", "net.ipv6.conf.lo.disable_ipv6=0")
    netns.run("ip", "-6", "route", "add", "local", "::/0", "dev", "lo", "table", "200")  # the sysctl dropped it

    if backend != "native" and "ISTIO_IPTABLES_APPLIER" not in os.environ:  # a restore failing half way
        before_failure = snapshot(netns, backend)
        shim = Path(f"/tmp/iit-shim-{netns.name}")
        try:
            shim.mkdir()
            real = f"/usr/sbin/ip6tables-{backend}-restore"
            (shim / f"ip6tables-{backend}-restore").write_text(
                f'#!/bin/sh\ncase " $* " in *" --noflush "*) cat >/dev/null; echo "line 2 failed" >&2; exit 1;; esac\n'
                f'exec {real} "$@"\n'
            )
            (shim / f"ip6tables-{backend}-restore").chmod(0o755)
            failed = run_cli(netns, *REDIRECT, "--reconcile", *flags, env={"PATH": f"{shim}:{os.environ['PATH']}"})
        finally:
            subprocess.run(["rm", "-rf", str(shim)], check=False)
        assert failed.returncode == ExitCode.FAILURE, failed.stderr
        after_failure = ours_reordered(snapshot(netns, backend))
        assert_same(after_failure, ours_reordered(before_failure), "failed reconcile (IPv6 restore)")

    # TPROXY -> REDIRECT: a reconcile replaces ours (a plain run is drift, on native nft too), keeps
    # the rest, and our old policy routing goes with the old configuration.
    reconciled = run_cli(netns, *REDIRECT, "--reconcile", *flags)
    assert reconciled.returncode == 0, reconciled.stderr
    after_reconcile = snapshot(netns, backend)
    assert_foreign_kept(before, after_reconcile, "reconcile")
    assert after_reconcile["rules"] == before["rules"] and after_reconcile["rules6"] == before["rules6"]
    assert "table 133" not in after_reconcile["routes"] + after_reconcile["routes6"]

    cleaned = run_cli(netns, *REDIRECT, "--cleanup-only", *flags)
    assert cleaned.returncode == 0, cleaned.stderr
    assert_same(snapshot(netns, backend), before, "cleanup")


@pytest.mark.parametrize("backend", BACKENDS)
def test_plain_cleanup_after_tproxy_keeps_a_foreign_fwmark_rule(backend: str, netns: NetNS) -> None:
    for command in SHELL_SEED[2:6]:
        netns.run(*command.split())
    before = snapshot(netns, backend)
    # Without -c: its interface RETURNs are ours only when the cleanup names the interface too.
    tproxy = ["-m", "TPROXY", "-b", "*", "-i", "*", "-x", CIDRS, "-k", "eth3", "--enable-ipv6"]
    assert run_cli(netns, *tproxy, *backend_flags(backend)).returncode == 0
    result = run_cli(netns, "--cleanup-only")  # no flags at all: the defaults name mark 1337, table 133
    assert result.returncode == 0, result.stderr
    after = snapshot(netns, backend)
    if backend == "legacy":  # legacy tables, once used, stay (empty) in a namespace
        for name in ("iptables", "ip6tables"):
            after[name], before[name] = "\n".join(canonical_save(after[name])), before[name]
    assert after == before


@pytest.mark.parametrize("backend", BACKENDS)
def test_lo_down_is_reported_before_anything_is_written(backend: str, netns: NetNS) -> None:
    netns.run("ip", "link", "set", "lo", "down")
    before = snapshot(netns, backend)
    result = cli_in(netns, [*TPROXY, *backend_flags(backend)])
    assert result.returncode == ExitCode.ENVIRONMENT, result.stderr
    assert "lo is down" in result.stderr and "nothing was written" in result.stderr
    assert snapshot(netns, backend) == before


def test_orphan_routing_of_ours_is_found_by_cleanup(netns: NetNS) -> None:
    """What an interrupted TPROXY run can leave: the policy rules, routes and ::6 without any rule."""
    before = snapshot(netns, "nft")
    for flag in ("-4", "-6"):
        netns.run("ip", flag, "rule", "add", "fwmark", "1337", "lookup", "133")
    netns.run("ip", "route", "add", "local", "default", "dev", "lo", "table", "133")
    netns.run("ip", "-6", "route", "add", "local", "::/0", "dev", "lo", "table", "133")
    netns.run("ip", "-6", "addr", "add", "::6/128", "dev", "lo")
    result = run_cli(netns, "--cleanup-only", "-m", "TPROXY", "--enable-ipv6")
    assert result.returncode == 0, result.stderr
    assert snapshot(netns, "nft") == before


@pytest.mark.parametrize("backend", ["legacy", "nft"])
def test_routes_failing_half_way_take_back_what_they_added(backend: str, netns: NetNS, monkeypatch) -> None:
    """The IPv6 route fails after the IPv4 rule and route and ::6 went in: all of them go again, and the
    rules; on nft the built-in chain the write created (IPv6 mangle PREROUTING) goes again too."""
    seed(netns, backend)
    args = ["-m", "TPROXY", "-b", "*", "-i", "*", "--enable-ipv6", f"--force-iptables-binary={backend}"]
    config = config_of(args)
    before = snapshot(netns, backend)
    real = routes._local_default_route

    def failing_v6(command, family, lo, table):
        if command == "add" and family is Family.V6:
            raise ApplyError("ip -6 route add local ::/0 dev lo table 133 failed: injected")
        return real(command, family, lo, table)

    monkeypatch.setattr(routes, "_local_default_route", failing_v6)
    with inside(netns), pytest.raises(IstioIptablesError) as failed:
        apply(config, build_plan(config))
    assert "rolled back" in str(failed.value)
    assert_same(snapshot(netns, backend), before, "failed routes")


def test_our_ip_rule_gets_the_kernels_priority_as_istio(netns: NetNS) -> None:
    assert run_cli(netns, "-m", "TPROXY", "-b", "*", "--enable-ipv6").returncode == 0
    for flag in ("-4", "-6"):
        assert "32765:\tfrom all fwmark 0x539 lookup 133" in netns.run("ip", flag, "rule").stdout


def test_plain_cleanup_removes_native_nft_tables(netns: NetNS) -> None:
    before = snapshot(netns, "nft")
    assert run_cli(netns, *TPROXY, "--native-nftables").returncode == 0
    assert "istio-proxy-nat" in netns.run("nft", "list", "tables").stdout
    result = cli_in(netns, ["--cleanup-only"])
    assert result.returncode == 0, result.stderr
    assert "cleaned" in result.stderr
    assert snapshot(netns, "nft") == before
