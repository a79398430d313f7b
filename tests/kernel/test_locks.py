"""One run at a time per network namespace: concurrent instances, the lock's wait and timeout, a held
xtables lock, --cni-mode's sandbox and --network-namespace validation (issue 11)."""

from __future__ import annotations

import fcntl
import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

from istio_iptables.errors import ConfigError, ExitCode
from istio_iptables.system.nslock import LOCK_NAME, WAIT_ENV, wait_seconds
from tests.beds.bed_common import as_uid
from tests.support.apply_support import inside
from tests.support.locks_support import (
    ALL_BACKENDS,
    EXECUTABLE,
    backend_args,
    finish,
    reference_state,
    rules,
    start,
    whole_state,
)

CONFIG_A = ["-p", "15001", "-z", "15006", "-u", "1337", "-i", "*", "-b", "*", "--enable-ipv6"]
CONFIG_B = ["-p", "15001", "-z", "15006", "-u", "1337", "-i", "10.0.0.0/8", "-b", "8080,9090", "--enable-ipv6"]
LEGACY_V4 = ["-u", "1337", "-i", "*", "-b", "*", "--disable-ipv6", "--force-iptables-binary=legacy"]


# --- the wait setting ----------------------------------------------------------------------------


def test_lock_wait_defaults_to_30_seconds_and_reads_its_variable() -> None:
    assert wait_seconds({}) == 30
    assert wait_seconds({WAIT_ENV: "2.5"}) == 2.5
    assert wait_seconds({WAIT_ENV: "0"}) == 0


@pytest.mark.parametrize("value", ["-1", "abc", "1e3", "3601", "9" * 5000, "½", "1.2.3"])
def test_bad_lock_wait_is_invalid_input(value: str) -> None:
    with pytest.raises(ConfigError) as refused:
        wait_seconds({WAIT_ENV: value})
    assert WAIT_ENV in str(refused.value) and len(str(refused.value)) < 200


# --- concurrent instances ------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("instances", [2, 4, 8])
def test_identical_concurrent_runs_leave_one_configuration(backend: str, instances: int, netns_factory) -> None:
    """N copies of one command started together: every one exits 0 and the rules are there once."""
    expected = reference_state(backend, CONFIG_A)
    namespace = netns_factory()
    # The test holds the lock while the instances start, until one of them asks who holds it (a
    # waiting run connects to the holder): so they surely meet there, however fast a run is.
    held = hold_lock(namespace)
    started = [start(namespace, [*CONFIG_A, *backend_args(backend)]) for _ in range(instances)]
    held.settimeout(60)
    try:
        held.accept()[0].close()
    finally:
        held.close()
    results = [finish(process) for process in started]
    assert [code for code, _ in results] == [0] * instances, results
    assert whole_state(namespace, backend) == expected
    assert sum("waiting up to" in stderr for _, stderr in results) >= 1, "the instances never met on the lock"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("instances", [2, 4, 8])
def test_concurrent_runs_of_different_configurations_leave_one_of_them(
    backend: str, instances: int, netns_factory
) -> None:
    """Half the instances want A, half B: the result is exactly A or exactly B, never a mix.

    Every backend, native nftables included: the first run wins, the others exit 0 (same
    configuration, nothing written) or 3 (drift, with the diff).
    """
    expected = {
        "A": reference_state(backend, CONFIG_A),
        "B": reference_state(backend, CONFIG_B),
    }
    namespace = netns_factory()
    configs = [CONFIG_A if index % 2 == 0 else CONFIG_B for index in range(instances)]
    started = [start(namespace, [*config, *backend_args(backend)]) for config in configs]
    results = [finish(process) for process in started]
    final = whole_state(namespace, backend)
    assert final in expected.values(), final
    winner = next(name for name, state in expected.items() if state == final)
    for config, (code, stderr) in zip(configs, results, strict=True):
        if (config is CONFIG_A) == (winner == "A"):
            assert code == 0, stderr
        else:
            assert code == ExitCode.DRIFT, stderr
            assert "another configuration" in stderr and "--reconcile" in stderr


# --- the lock itself -----------------------------------------------------------------------------


def hold_lock(namespace) -> socket.socket:
    """Take the namespace's lock from this test process, as another run would."""
    with inside(namespace):
        held = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        held.bind(LOCK_NAME)
        held.listen(8)
    return held


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_a_held_namespace_lock_times_out_with_exit_4_naming_the_holder(backend: str, netns) -> None:
    held = hold_lock(netns)
    try:
        began = time.monotonic()
        code, stderr = finish(start(netns, [*CONFIG_A, *backend_args(backend)], env={WAIT_ENV: "1.5"}))
        took = time.monotonic() - began
    finally:
        held.close()
    assert code == ExitCode.ENVIRONMENT, stderr
    assert f"held by pid {os.getpid()}" in stderr and "waiting up to 1.5s" in stderr
    assert "nothing was written" in stderr and f"pid {os.getpid()}" in stderr.splitlines()[-1]
    assert 1.4 <= took < 30, took
    assert "ISTIO" not in rules(netns, backend) and "istio" not in rules(netns, backend)


def test_the_lock_is_per_namespace(netns_factory) -> None:
    held = hold_lock(netns_factory())
    try:
        code, stderr = finish(start(netns_factory(), [*CONFIG_A], env={WAIT_ENV: "0"}))
    finally:
        held.close()
    assert code == 0, stderr and "waiting" not in stderr


def test_a_killed_holder_releases_the_lock(netns) -> None:
    """The kernel frees the name when its holder dies: a crashed run never leaves a stale lock."""
    script = f"import socket,time; s=socket.socket(socket.AF_UNIX); s.bind({LOCK_NAME!r}); s.listen(1); time.sleep(60)"
    squatter = subprocess.Popen(["ip", "netns", "exec", netns.name, "python3", "-c", script])
    try:
        deadline = time.monotonic() + 20
        while "@istio-iptables/namespace-lock" not in netns.run("cat", "/proc/net/unix").stdout:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        running = start(netns, CONFIG_A)
        seen = ""
        while "waiting up to 30s" not in seen:  # it met the lock
            line = running.stderr.readline()
            assert line, seen
            seen += line
        squatter.kill()
        code, rest = finish(running)
        stderr = seen + rest
    finally:
        squatter.kill()
        squatter.wait()
    assert code == 0, stderr
    assert "waiting up to 30s" in stderr and "going on" in stderr


def test_the_lock_works_for_a_non_root_proxy_uid_on_a_read_only_root(netns) -> None:
    """An istio-validation style container: uid 1337, only NET_ADMIN/NET_RAW, nothing writable."""
    code, stderr = finish(
        start(netns, ["-u", "1337", "-b", "*", "--disable-ipv6"], uid_prefix=as_uid(1337, ["net_admin", "net_raw"]))
    )
    assert code == 0, stderr
    assert "-j ISTIO_IN_REDIRECT" in rules(netns, "nft")


# --- the xtables lock held by someone else (legacy) ----------------------------------------------


@pytest.mark.parametrize("applier", ["restore", "libiptc"])
def test_a_held_xtables_lock_exits_4_saying_nothing_was_written(applier: str, netns, tmp_path: Path) -> None:
    lockfile = tmp_path / "xtables.lock"
    env = {"XTABLES_LOCKFILE": str(lockfile), WAIT_ENV: "2", "ISTIO_IPTABLES_APPLIER": applier}
    with open(lockfile, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        began = time.monotonic()
        code, stderr = finish(start(netns, [*LEGACY_V4, "--enable-ipv6"], env=env))
        took = time.monotonic() - began
    assert code == ExitCode.ENVIRONMENT, stderr
    assert "waiting up to 2s for the xtables lock" in stderr
    last = stderr.strip().splitlines()[-1]
    assert "nothing was written" in last and f"pid {os.getpid()}" in last, last
    assert "--network-namespace" not in stderr and "may hold part" not in stderr
    assert took < 2 + 25, took  # one wait, not one per family or rollback
    assert "ISTIO" not in rules(netns, "legacy")


def test_a_briefly_held_xtables_lock_is_waited_for_and_logged(netns, tmp_path: Path) -> None:
    lockfile = tmp_path / "xtables.lock"
    with open(lockfile, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        running = start(netns, LEGACY_V4, env={"XTABLES_LOCKFILE": str(lockfile)})
        time.sleep(1.5)
        fcntl.flock(held, fcntl.LOCK_UN)
        code, stderr = finish(running)
    assert code == 0, stderr
    assert "for the xtables lock" in stderr and "is free: going on" in stderr


# --- --cni-mode ----------------------------------------------------------------------------------

SPY = """#!/bin/sh
{{ echo "$(basename "$0") nsswitch=$(wc -c < /etc/nsswitch.conf) lock=$XTABLES_LOCKFILE \
xtlock=$(stat -L -c %i /run/xtables.lock 2>/dev/null) ns=$(stat -L -c %i /proc/self/ns/net)"; }} >> {log}
exec /usr/sbin/$(basename "$0") "$@"
"""


def spy_on(directory: Path, log: Path, programs: list[str]) -> dict[str, str]:
    directory.mkdir()
    for name in programs:
        (directory / name).write_text(SPY.format(log=log))
        (directory / name).chmod(0o755)
    return {"PATH": f"{directory}:{os.environ['PATH']}"}


def test_cni_mode_runs_every_iptables_command_sandboxed(netns, tmp_path: Path) -> None:
    """As Istio's CNI plugin: /dev/null over nsswitch.conf, the namespace as the lock, reads included."""
    log = tmp_path / "calls.log"
    Path("/run/xtables.lock").touch(exist_ok=True)
    env = spy_on(tmp_path / "bin", log, ["iptables-legacy-save", "iptables-legacy-restore"])
    host_nsswitch = Path("/etc/nsswitch.conf").read_bytes()
    # Legacy tables exist already, so the detection runs iptables-legacy-save.
    netns.run("iptables-legacy", "-t", "filter", "-A", "INPUT", "-p", "udp", "-j", "ACCEPT")
    code, stderr = finish(
        start(netns, [*LEGACY_V4, "--cni-mode", "--network-namespace", netns.path], env=env)
    )  # started inside the namespace already: entering it again is harmless
    assert code == 0, stderr
    calls = log.read_text().splitlines()
    assert any(call.startswith("iptables-legacy-save") for call in calls), calls
    assert any(call.startswith("iptables-legacy-restore") for call in calls), calls
    namespace_inode = str(os.stat(netns.path).st_ino)
    for call in calls:
        fields = dict(field.split("=", 1) for field in call.split()[1:])
        assert fields["nsswitch"] == "0", call
        assert fields["lock"] == "/proc/self/ns/net" and fields["ns"] == namespace_inode, call
        assert fields["xtlock"] == namespace_inode, call  # for iptables older than 1.8.6
    assert Path("/etc/nsswitch.conf").read_bytes() == host_nsswitch
    assert os.stat("/run/xtables.lock").st_ino != int(namespace_inode)


def test_cni_mode_never_creates_a_file_where_a_deleted_namespace_was(netns_factory, tmp_path: Path) -> None:
    """The namespace is deleted while the legacy write runs: nothing may reappear at /run/netns/NAME."""
    namespace = netns_factory()
    directory = tmp_path / "bin"
    directory.mkdir()
    slow = directory / "iptables-legacy-restore"
    slow.write_text(f'#!/bin/sh\ntouch {tmp_path}/started; sleep 1.5; exec /usr/sbin/iptables-legacy-restore "$@"\n')
    slow.chmod(0o755)
    env = {**os.environ, "PATH": f"{directory}:{os.environ['PATH']}"}
    running = subprocess.Popen(
        [EXECUTABLE, *LEGACY_V4, "--cni-mode", "--network-namespace", namespace.name],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not (tmp_path / "started").exists():
        assert time.monotonic() < deadline and running.poll() is None, running.communicate()
        time.sleep(0.02)
    namespace.delete()
    code, stderr = finish(running)
    assert code == 0, stderr  # the run holds the namespace: its rules went in before it vanished
    assert not os.path.lexists(namespace.path), "a file appeared at the deleted namespace's path"
    assert namespace.name not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


# --- --network-namespace validation --------------------------------------------------------------


def odd_namespace_path(kind: str, tmp_path: Path) -> str:
    if kind == "regular file":
        (tmp_path / "file").write_text("x")
        return str(tmp_path / "file")
    if kind == "directory":
        return str(tmp_path)
    if kind == "FIFO":
        os.mkfifo(tmp_path / "fifo")
        return str(tmp_path / "fifo")
    if kind == "missing":
        return str(tmp_path / "missing")
    return {"mount namespace": "/proc/self/ns/mnt", "device": "/dev/zero", "bare missing name": "no-such-ns-1f"}[kind]


@pytest.mark.parametrize(
    "kind", ["regular file", "directory", "mount namespace", "FIFO", "missing", "device", "bare missing name"]
)
def test_network_namespace_that_is_not_one_is_invalid_input(kind: str, tmp_path: Path) -> None:
    value = odd_namespace_path(kind, tmp_path)
    result = subprocess.run(
        [EXECUTABLE, "--network-namespace", value, "-p", "15001", "-u", "1337"],
        capture_output=True, text=True, timeout=20, check=False,
    )  # fmt: skip
    assert result.returncode == ExitCode.INVALID_INPUT, result.stderr
    assert "--network-namespace" in result.stderr and value in result.stderr
    assert "Traceback" not in result.stderr
    assert re.search(r"not a network namespace|not a namespace file|cannot be opened", result.stderr), result.stderr


def test_entering_a_namespace_without_cap_sys_admin_is_exit_4(netns) -> None:
    result = subprocess.run(
        [*as_uid(1337, ["net_admin", "net_raw"]), EXECUTABLE,
         "--network-namespace", netns.name, "-p", "15001", "-u", "1337"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == ExitCode.ENVIRONMENT, result.stderr
    assert "CAP_SYS_ADMIN" in result.stderr
