"""istio_iptables.spawn: what the apply path relies on from subprocess, without importing it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from istio_iptables import spawn


def test_input_goes_in_and_both_outputs_come_back_whole() -> None:
    text = "".join(f"-A ISTIO_OUTPUT -d 10.{i // 256}.{i % 256}.0/24 -j RETURN\n" for i in range(20000))
    done = spawn.run(["sh", "-c", "cat; echo done >&2; exit 3"], input=text)
    assert (done.returncode, done.stdout, done.stderr) == (3, text, "done\n")


def test_a_program_that_stops_reading_or_is_killed_is_reported_like_subprocess() -> None:
    assert spawn.run(["true"], input="x" * 1_000_000).returncode == 0  # never reads its input
    assert spawn.run(["sh", "-c", "kill -KILL $$"]).returncode == -9
    assert spawn.run(["sh", "-c", "yes | head -1"]).stdout == "y\n"  # SIGPIPE is back to default


def test_parallel_programs_and_environment() -> None:
    running = [spawn.Running(["sh", "-c", f"echo $N{i}"], env={"N0": "zero", "N1": "one"}) for i in range(2)]
    assert [process.wait(5).stdout for process in running] == ["zero\n", "one\n"]


def test_a_program_past_its_timeout_is_killed() -> None:
    with pytest.raises(TimeoutError):
        spawn.run(["sleep", "5"], timeout=0.2)


def test_which_finds_executables_in_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "plain").write_text("")
    (tmp_path / "tool").write_text("#!/bin/sh\necho shim\n")
    (tmp_path / "tool").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}/usr/bin")
    assert spawn.which("tool") == str(tmp_path / "tool") and spawn.which("plain") is None
    assert spawn.run(["tool"]).stdout == "shim\n" and spawn.which("nope") is None
    with pytest.raises(FileNotFoundError):
        spawn.run([str(tmp_path / "missing")])
