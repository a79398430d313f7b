"""Run a program with some input and collect what it prints, without the subprocess module.

``import subprocess`` (with signal, threading, selectors, locale) and ``shutil`` cost ~5 ms, a
tenth of the init run's floor (docs/speed.md). Applying rules only needs to start iptables-save,
-restore and ipset, feed them text and read their output: ``os.posix_spawn`` and a poll loop.
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Mapping, Sequence

from istio_iptables._lib.records import record

# Linux signal numbers: the signal module alone takes ~1.5 ms to import.
SIGKILL, SIGPIPE, SIGXFSZ = 9, 13, 25
_CHUNK = 1 << 16


@record
class Finished:
    """As ``subprocess.CompletedProcess``: a negative returncode is the signal that killed it."""

    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


def which(name: str) -> str | None:
    """``shutil.which`` for a command name: the first executable ``name`` in PATH."""
    for directory in os.environ.get("PATH", os.defpath).split(os.pathsep):
        path = os.path.join(directory or ".", name)
        if os.access(path, os.X_OK) and not os.path.isdir(path):
            return path
    return None


class Running:
    """A started program; :meth:`wait` feeds its input and collects its output.

    Whatever goes wrong (a failed start, a timeout, an error while reading), the program is
    killed and reaped and our ends of its pipes closed: a long-lived caller leaks nothing.
    Used as a context manager, a program left unwaited is killed and reaped on leaving the block.
    """

    def __init__(self, args: Sequence[str], input: str | None = None, env: Mapping[str, str] | None = None) -> None:
        self.args = tuple(args)
        self._input = memoryview((input or "").encode())
        self._reaped = True  # nothing to reap until the spawn succeeds
        self._open: set[int] = set()  # our ends of the pipes, closed as they finish
        child_ends: list[int] = []
        try:
            stdin_read, self._stdin = self._pipe(child_ends, parent_end=1)
            self._stdout, stdout_write = self._pipe(child_ends, parent_end=0)
            self._stderr, stderr_write = self._pipe(child_ends, parent_end=0)
            # os.pipe() descriptors are not inherited; dup2 makes the child's 0, 1 and 2 from them.
            actions = [
                (os.POSIX_SPAWN_DUP2, stdin_read, 0),
                (os.POSIX_SPAWN_DUP2, stdout_write, 1),
                (os.POSIX_SPAWN_DUP2, stderr_write, 2),
            ]
            spawn = os.posix_spawn if os.sep in self.args[0] else os.posix_spawnp
            self.pid = spawn(
                self.args[0],
                self.args,
                os.environ if env is None else env,
                file_actions=actions,
                setsigdef=(SIGPIPE, SIGXFSZ),  # Python ignores them; the program must not (as subprocess)
            )
            self._reaped = False
        except BaseException:
            self._close_pipes()
            raise
        finally:
            for fd in child_ends:
                os.close(fd)

    def _pipe(self, child_ends: list[int], parent_end: int) -> tuple[int, int]:
        ends = os.pipe()
        self._open.add(ends[parent_end])
        child_ends.append(ends[1 - parent_end])
        return ends

    def __enter__(self) -> Running:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait(self, timeout: float | None = None) -> Finished:
        """Write the input, read both outputs to the end, reap the program (killed after ``timeout`` s)."""
        try:
            return self._collect(timeout)
        except BaseException:
            self.close()
            raise

    def _collect(self, timeout: float | None) -> Finished:
        deadline = None if timeout is None else time.monotonic() + timeout
        outputs: dict[int, list[bytes]] = {self._stdout: [], self._stderr: []}
        poller = select.poll()
        for fd in outputs:
            poller.register(fd, select.POLLIN)
        if self._input:
            os.set_blocking(self._stdin, False)
            poller.register(self._stdin, select.POLLOUT)
        else:
            self._close(self._stdin)
        while self._open:
            remaining = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
            events = poller.poll(remaining)
            if not events and remaining == 0:
                raise TimeoutError(f"{self.args[0]} did not finish within {timeout} s")
            for fd, _event in events:
                if fd == self._stdin:
                    if self._write():
                        continue
                else:
                    data = os.read(fd, _CHUNK)
                    if data:
                        outputs[fd].append(data)
                        continue
                poller.unregister(fd)
                self._close(fd)
        _, status = os.waitpid(self.pid, 0)
        self._reaped = True
        return Finished(
            self.args,
            os.waitstatus_to_exitcode(status),
            b"".join(outputs[self._stdout]).decode(errors="replace"),
            b"".join(outputs[self._stderr]).decode(errors="replace"),
        )

    def _write(self) -> bool:
        """Write what the pipe takes; False once all is written, or the program stopped reading."""
        try:
            written = os.write(self._stdin, self._input[:_CHUNK])
        except BlockingIOError:
            return True
        except BrokenPipeError:
            return False
        self._input = self._input[written:]
        return bool(self._input)

    def close(self) -> None:
        """Kill the program unless it was waited for, reap it, and close our ends of its pipes."""
        self._close_pipes()
        if not self._reaped:
            os.kill(self.pid, SIGKILL)  # unreaped, so the pid is still ours (a zombie takes it too)
            os.waitpid(self.pid, 0)
            self._reaped = True

    def _close(self, fd: int) -> None:
        if fd in self._open:
            self._open.discard(fd)
            os.close(fd)

    def _close_pipes(self) -> None:
        for fd in list(self._open):
            self._close(fd)


def run_all(
    commands: Sequence[Sequence[str]], *, env: Mapping[str, str] | None = None, timeout: float | None = None
) -> list[Finished]:
    """Run independent programs at once and collect each one's result, in order.

    If one cannot start or does not finish within ``timeout`` s (counted from the first wait),
    every one of them is killed and reaped before the error goes up.
    """
    running: list[Running] = []
    try:
        for args in commands:
            running.append(Running(args, env=env))
        deadline = None if timeout is None else time.monotonic() + timeout
        return [
            process.wait(None if deadline is None else max(0.0, deadline - time.monotonic())) for process in running
        ]
    finally:
        for process in running:
            process.close()  # nothing left to do for the ones that finished


def run_program(
    args: Sequence[str], *, input: str | None = None, env: Mapping[str, str] | None = None, timeout: float | None = None
) -> Finished:
    """Run ``args`` to completion: ``subprocess.run(args, input=..., capture_output=True, text=True)``."""
    return Running(args, input, env).wait(timeout)
