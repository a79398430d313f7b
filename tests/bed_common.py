"""What the two live-traffic beds share (tests/testbed.py, tests/flowsender.py): their child programs.

Child programs: a Python
module of tests/ started in a namespace (optionally as a uid, with capabilities) that speaks JSON lines:
its configuration is its one argument; it binds its sockets, prints ``{"ready": true}``, then answers
each request line with a line carrying the request's ``id`` (lines ``{"log": ...}`` may come between).
tests/bed_child.py holds the socket helpers both child programs use.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from tests.netns import NetNS

ROOT = Path(__file__).resolve().parents[1]  # children import tests.* from here
READY_TIMEOUT = 10.0


# --- child programs ----------------------------------------------------------------------------


def as_uid(uid: int, caps: Sequence[str] = ()) -> list[str]:
    """The prefix that runs a command as ``uid`` (gid the same, no groups), keeping ``caps`` (e.g. net_admin)."""
    prefix = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    if caps:
        wanted = ",".join(f"+{cap}" for cap in caps)
        prefix += [f"--inh-caps={wanted}", f"--ambient-caps={wanted}"]
    return prefix


class Child:
    """A JSON-line child program (``python -m module CONFIG``) running in ``namespace``; see the module doc."""

    def __init__(
        self,
        namespace: NetNS,
        module: str,
        config: dict[str, Any],
        name: str,
        uid: int | None = None,
        caps: Sequence[str] = (),
    ) -> None:
        self.name = name
        command = ["ip", "netns", "exec", namespace.name, *(as_uid(uid, caps) if uid is not None else [])]
        # -E -s: nothing from the caller's environment or user site; tests.* comes from the checkout (cwd).
        command += [sys.executable, "-E", "-s", "-m", module, json.dumps(config)]
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
            cwd=ROOT,
        )
        self._pending: dict[int, Future[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._next_id = 0
        self.ready: Future[bool] = Future()
        self.log: list[str] = []
        self._stderr: deque[str] = deque(maxlen=50)  # drained all the time, so a chatty child never blocks
        self._readers = [threading.Thread(target=self._drain_stderr, daemon=True),
                         threading.Thread(target=self._read, daemon=True)]
        for reader in self._readers:
            reader.start()

    def _drain_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self._stderr.append(line)

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            message = json.loads(line)
            if message.get("ready"):
                self.ready.set_result(True)
            elif "log" in message:
                self.log.append(message["log"])
            else:
                with self._lock:
                    future = self._pending.pop(message["id"], None)
                if future is not None:
                    future.set_result(message)
        self.process.wait()
        error = "".join(self._stderr)
        if not self.ready.done():
            self.ready.set_exception(RuntimeError(f"{self.name} died: {error.strip()}"))
        with self._lock:
            for future in self._pending.values():
                future.set_exception(RuntimeError(f"{self.name} died: {error.strip()}"))
            self._pending.clear()

    def send(self, request: dict[str, Any]) -> Future[dict[str, Any]]:
        """Send ``request``; the future holds the answer (it fails if the child dies first)."""
        future: Future[dict[str, Any]] = Future()
        with self._lock:
            self._next_id += 1
            request = {**request, "id": self._next_id}
            self._pending[self._next_id] = future
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return future

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=5)
        for reader in self._readers:
            reader.join(timeout=5)  # they end at EOF; closing the pipes under them would raise there
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()
