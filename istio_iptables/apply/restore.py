"""The default applier: ``iptables-restore --noflush`` with the input on stdin, one call per family.

Failures are turned into one actionable line: the kernel lacking a table, match or target and a
held xtables lock are environment problems (exit 4); anything else names the failing restore line
with five lines of context either side. Rolling back replays the snapshot taken before writing.
"""

from __future__ import annotations

import fcntl
import os
import re
import time
from collections.abc import Mapping

from istio_iptables.apply.backend import Backend, find_program
from istio_iptables.apply.state import parse_save
from istio_iptables.errors import ApplyError, EnvironmentProblem, IstioIptablesError
from istio_iptables.logging_setup import log
from istio_iptables.model import Family
from istio_iptables.spawn import run, which


def lock_wait() -> float:
    """How long a run waits for a lock, ours or the xtables one: $ISTIO_IPTABLES_LOCK_WAIT, else 30 s."""
    from istio_iptables.apply.nslock import wait_seconds

    return wait_seconds()


def _wait_option() -> str:
    """``-w`` takes whole seconds; 0 would mean "do not wait at all" there, so at least 1."""
    return str(max(1, int(-(-lock_wait() // 1))))
CONTEXT_LINES = 5

_FAILED_LINE = re.compile(r"line (\d+)(?: failed|:)")  # legacy: "line 3 failed", nft: "line 3: ..."
_MISSING_EXTENSION = re.compile(r"Couldn't load (match|target) `([^']+)'")
_MISSING_TABLE = re.compile(r"(?:can't initialize \S+ table `([^']+)'|Table does not exist)")
# nft: "Extension owner revision 0 not supported, missing kernel module?"
_UNSUPPORTED_EXTENSION = re.compile(r"(?:(match|target) )?[Ee]xtension (\S+) revision \d+ not supported")
_NO_SUCH_EXTENSION = "No chain/target/match by that name"
_LOCK_HELD = "holding the xtables lock"


DEFAULT_LOCKFILE = "/run/xtables.lock"
NAMESPACE_LOCKFILE = "/proc/self/ns/net"  # the same inode for every process of the namespace

class RestoreFailed(Exception):
    """One restore run failed; ``text`` is what it was given."""

    def __init__(self, family: Family, program: str, text: str, returncode: int, stderr: str) -> None:
        super().__init__(program)
        self.family = family
        self.program = program
        self.text = text
        self.returncode = returncode
        self.stderr = stderr

    def __str__(self) -> str:
        return f"{self.program} exited {self.returncode}: {self.stderr.strip()[-500:]}"


class LockTimeout(RestoreFailed):
    """The xtables lock stayed held: this family's write never started (``stderr`` names the holder)."""


def xtables_lockfile(env: Mapping[str, str] | None) -> str:
    return (os.environ if env is None else env).get("XTABLES_LOCKFILE") or DEFAULT_LOCKFILE


def _lock_is_free(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    fcntl.flock(fd, fcntl.LOCK_UN)
    return True


def flock_holder(fd: int) -> str:
    """Who holds an flock on ``fd``'s inode, from /proc/locks (pid and command line when visible)."""
    from istio_iptables.apply.nslock import describe_holder

    stat = os.fstat(fd)
    inode = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as locks:
            for line in locks:
                fields = line.split()
                if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == inode and fields[4].isdigit():
                    return describe_holder(int(fields[4]), None)
    except OSError:
        pass
    return "another process"


def await_xtables_lock(family: Family, program: str, text: str, env: Mapping[str, str] | None) -> None:
    """Before a legacy write: wait (bounded, logged) until nobody holds the xtables lock.

    iptables-restore -w waits silently, and a write that timed out could not tell whether it had
    written anything. Waiting here first, the common case (the lock held all along) ends before
    anything is written, with the holder named. The file is only opened, never created: in CNI
    mode it may be a namespace's path.
    """
    path = xtables_lockfile(env)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return  # absent: nobody holds it; unreadable: iptables will report it
    try:
        if _lock_is_free(fd):
            return
        holder = flock_holder(fd)
        wait = lock_wait()
        log.info("waiting up to %gs for the xtables lock %s, held by %s", wait, path, holder)
        deadline = time.monotonic() + wait
        while not _lock_is_free(fd):
            if time.monotonic() >= deadline:
                raise LockTimeout(family, program, text, 4, f"{path} stayed held by {flock_holder(fd)}")
            time.sleep(0.05)
        log.info("the xtables lock %s is free: going on", path)
    finally:
        os.close(fd)


def with_context(text: str, line_number: int, around: int = CONTEXT_LINES) -> str:
    lines = text.splitlines()
    start, end = max(1, line_number - around), min(len(lines), line_number + around)
    return "\n".join(
        f"{'>' if number == line_number else ' '} {number:4d}  {lines[number - 1]}" for number in range(start, end + 1)
    )


def explain_failure(failure: RestoreFailed, rolled_back: bool) -> IstioIptablesError:
    """The user-facing error for a failed write (after the rollback, which the message reports)."""
    stderr = failure.stderr.strip()
    state = "the namespace was rolled back to its previous rules" if rolled_back else "nothing was changed"
    label = failure.family.label
    where = _FAILED_LINE.search(stderr)
    context = f"\n{with_context(failure.text, int(where.group(1)))}" if where else ""
    if isinstance(failure, LockTimeout):
        written = (
            f"the {label} rules were not written and those written before them were rolled back"
            if rolled_back
            else "nothing was written"
        )
        return EnvironmentProblem(
            f"the xtables lock {failure.stderr} for over {lock_wait():g}s: {written}; retry once it is released"
        )
    if _LOCK_HELD in stderr:
        return EnvironmentProblem(
            f"another program held the xtables lock for more than {_wait_option()}s ({label}); {state}; "
            "retry once it is released"
        )
    missing = _MISSING_EXTENSION.search(stderr) or _UNSUPPORTED_EXTENSION.search(stderr)
    if missing:
        kind, name = missing.groups()
        kind, module = kind or "extension", f"xt_{name}"
        return EnvironmentProblem(
            f"the iptables {kind} '{name}' is unavailable ({label}): load the {module} kernel module "
            f"(modprobe {module}) on the node, and check iptables' extensions are installed; {state}{context}"
        )
    table = _MISSING_TABLE.search(stderr)
    if table:
        name = table.group(1) or "a table"
        prefix = "iptable" if failure.family is Family.V4 else "ip6table"
        return EnvironmentProblem(
            f"the kernel lacks the {label} {name} table: load it (modprobe {prefix}_{name}); {state}"
        )
    if _NO_SUCH_EXTENSION in stderr:
        # Our scripts declare every chain they jump to, so this is a kernel match or target missing.
        return EnvironmentProblem(
            f"the kernel lacks a match or target of this rule ({label}): load its xt_* module "
            f"(e.g. modprobe xt_owner xt_conntrack xt_REDIRECT xt_TPROXY xt_CT xt_mark xt_connmark); {state}{context}"
        )
    detail = stderr.splitlines()[-1] if stderr else f"killed or exited {failure.returncode}"
    return ApplyError(f"{failure.program} failed ({detail}); {state}{context}")


def tables_of(script: str) -> list[str]:
    return [line[1:].strip() for line in script.splitlines() if line.startswith("*")]


class RestoreApplier:
    name = "restore"

    def __init__(self, backend: Backend, env: Mapping[str, str] | None = None) -> None:
        self.backend = backend
        self.env = env

    def write(self, family: Family, script: str) -> None:
        if self.backend.name == "legacy":  # iptables-nft takes no lock
            await_xtables_lock(family, self.backend.program(family, "restore"), script, self.env)
        self._restore(family, script, "--noflush", "-w", _wait_option())

    def rollback(self, family: Family, snapshot: str, tables: list[str]) -> None:
        """Put every table we touched back as the snapshot held it (empty if it held nothing)."""
        saved = parse_save(snapshot).tables
        missing = [table for table in tables if table not in saved]
        kept = "\n".join(self._tables_of_snapshot(snapshot, tables))
        text = kept + "".join(f"*{table}\nCOMMIT\n" for table in missing)
        if text.strip():
            self._restore(family, text, "-w", _wait_option())
        if self.backend.name == "nft" and missing:
            drop_new_nft_tables(family, missing, self.env)

    @staticmethod
    def _tables_of_snapshot(snapshot: str, tables: list[str]) -> list[str]:
        kept: list[str] = []
        keep = False
        for line in snapshot.splitlines():
            if line.startswith("*"):
                keep = line[1:].strip() in tables
            if keep and not line.startswith("#"):
                kept.append(line)
        return [*kept, ""] if kept else []

    def _restore(self, family: Family, text: str, *options: str) -> None:
        program = self.backend.program(family, "restore")
        process = run([find_program(program), *options], input=text, env=self.env, timeout=lock_wait() + 30)
        if process.returncode != 0:
            raise RestoreFailed(family, program, text, process.returncode, process.stderr)


def drop_new_nft_tables(family: Family, tables: list[str], env: Mapping[str, str] | None) -> None:
    """An nft table our failed write created is deleted again, so the backend looks untouched.

    Only tables the snapshot did not list (so nobody else had rules there) and which the rollback
    just emptied; without the nft binary they stay, empty.
    """
    nft = which("nft")
    if nft is None:
        return
    nft_family = "ip" if family is Family.V4 else "ip6"
    script = "".join(f"delete table {nft_family} {table}\n" for table in tables)
    run([nft, "-f", "-"], input=script, env=env)
