"""istio_iptables.system.spawn: what the apply path relies on from subprocess, without importing it."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from istio_iptables.system import spawn


def test_input_goes_in_and_both_outputs_come_back_whole() -> None:
    text = "".join(f"-A ISTIO_OUTPUT -d 10.{i // 256}.{i % 256}.0/24 -j RETURN\n" for i in range(20000))
    done = spawn.run_program(["sh", "-c", "cat; echo done >&2; exit 3"], input=text)
    assert (done.returncode, done.stdout, done.stderr) == (3, text, "done\n")


def test_a_program_that_stops_reading_or_is_killed_is_reported_like_subprocess() -> None:
    assert spawn.run_program(["true"], input="x" * 1_000_000).returncode == 0  # never reads its input
    assert spawn.run_program(["sh", "-c", "kill -KILL $$"]).returncode == -9
    assert spawn.run_program(["sh", "-c", "yes | head -1"]).stdout == "y\n"  # SIGPIPE is back to default


def test_parallel_programs_and_environment() -> None:
    running = [spawn.Running(["sh", "-c", f"echo $N{i}"], env={"N0": "zero", "N1": "one"}) for i in range(2)]
    assert [process.wait(5).stdout for process in running] == ["zero\n", "one\n"]


def test_a_program_past_its_timeout_is_killed() -> None:
    with pytest.raises(TimeoutError):
        spawn.run_program(["sleep", "5"], timeout=0.2)


def test_which_finds_executables_in_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "plain").write_text("")
    (tmp_path / "tool").write_text("#!/bin/sh\necho shim\n")
    (tmp_path / "tool").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}/usr/bin")
    assert spawn.which("tool") == str(tmp_path / "tool") and spawn.which("plain") is None
    assert spawn.run_program(["tool"]).stdout == "shim\n" and spawn.which("nope") is None
    with pytest.raises(FileNotFoundError):
        spawn.run_program([str(tmp_path / "missing")])


def _open_descriptors() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _children() -> set[int]:
    """This process's children, zombies included (the kernel lists a child until it is reaped)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue  # it ended while we looked
        if int(fields[1]) == os.getpid():
            found.add(int(stat.parent.name))
    return found


@pytest.fixture
def leak_check() -> Iterator[None]:
    """Every path through the test must leave no descriptor open and no child unreaped."""
    descriptors, children = _open_descriptors(), _children()
    yield
    assert _children() == children
    assert _open_descriptors() == descriptors


def test_several_programs_run_at_once_and_come_back_in_order(leak_check: None) -> None:
    finished = spawn.run_all([["sh", "-c", "sleep 0.2; echo $N"], ["sh", "-c", "echo two >&2"]], env={"N": "one"})
    assert [(done.stdout, done.stderr) for done in finished] == [("one\n", ""), ("", "two\n")]


def test_a_program_that_cannot_start_takes_the_started_ones_down_with_it(leak_check: None) -> None:
    with pytest.raises(FileNotFoundError):
        spawn.run_all([["sleep", "30"], ["/nonexistent/program"]])


def test_a_timeout_in_one_program_reaps_them_all(leak_check: None) -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        spawn.run_all([["sleep", "30"], ["sleep", "30"]], timeout=0.3)
    assert time.monotonic() - started < 10


def test_a_failure_while_collecting_output_kills_and_reaps_the_program(
    leak_check: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_read(fd: int, size: int) -> bytes:
        raise OSError("read failed")

    running = spawn.Running(["sh", "-c", "echo ready; sleep 30"])
    monkeypatch.setattr(spawn.os, "read", broken_read)
    with pytest.raises(OSError, match="read failed"):
        running.wait(5)
    monkeypatch.undo()
    with spawn.Running(["sleep", "30"]):
        pass  # leaving the block unwaited kills and reaps it


def test_a_timeout_reaps_and_closes(leak_check: None) -> None:
    with pytest.raises(TimeoutError):
        spawn.run_program(["sh", "-c", "sleep 30"], input="x" * 1_000_000, timeout=0.2)
