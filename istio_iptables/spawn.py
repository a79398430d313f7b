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

from istio_iptables.records import record

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
    """A started program; :meth:`wait` feeds its input and collects its output."""

    def __init__(self, args: Sequence[str], input: str | None = None, env: Mapping[str, str] | None = None) -> None:
        self.args = tuple(args)
        self._input = memoryview((input or "").encode())
        stdin_read, self._stdin = os.pipe()
        self._stdout, stdout_write = os.pipe()
        self._stderr, stderr_write = os.pipe()
        # os.pipe() descriptors are not inherited; dup2 makes the child's 0, 1 and 2 from them.
        actions = [
            (os.POSIX_SPAWN_DUP2, stdin_read, 0),
            (os.POSIX_SPAWN_DUP2, stdout_write, 1),
            (os.POSIX_SPAWN_DUP2, stderr_write, 2),
        ]
        spawn = os.posix_spawn if os.sep in self.args[0] else os.posix_spawnp
        try:
            self.pid = spawn(
                self.args[0],
                self.args,
                os.environ if env is None else env,
                file_actions=actions,
                setsigdef=(SIGPIPE, SIGXFSZ),  # Python ignores them; the program must not (as subprocess)
            )
        except BaseException:
            for fd in (self._stdin, self._stdout, self._stderr):
                os.close(fd)
            raise
        finally:
            for fd in (stdin_read, stdout_write, stderr_write):
                os.close(fd)

    def wait(self, timeout: float | None = None) -> Finished:
        """Write the input, read both outputs to the end, reap the program (killed after ``timeout`` s)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        outputs: dict[int, list[bytes]] = {self._stdout: [], self._stderr: []}
        poller = select.poll()
        for fd in outputs:
            poller.register(fd, select.POLLIN)
        if self._input:
            os.set_blocking(self._stdin, False)
            poller.register(self._stdin, select.POLLOUT)
        else:
            os.close(self._stdin)
        open_fds = set(outputs) | ({self._stdin} if self._input else set())
        while open_fds:
            remaining = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
            events = poller.poll(remaining)
            if not events and remaining == 0:
                self._kill(open_fds)
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
                os.close(fd)
                open_fds.discard(fd)
        _, status = os.waitpid(self.pid, 0)
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

    def _kill(self, open_fds: set[int]) -> None:
        os.kill(self.pid, SIGKILL)
        os.waitpid(self.pid, 0)
        for fd in open_fds:
            os.close(fd)


def run(
    args: Sequence[str], *, input: str | None = None, env: Mapping[str, str] | None = None, timeout: float | None = None
) -> Finished:
    """Run ``args`` to completion: ``subprocess.run(args, input=..., capture_output=True, text=True)``."""
    return Running(args, input, env).wait(timeout)
