"""The default applier: ``iptables-restore --noflush`` with the input on stdin, one call per family.

Failures are turned into one actionable line: the kernel lacking a table, match or target and a
held xtables lock are environment problems (exit 4); anything else names the failing restore line
with five lines of context either side. Rollback inputs come from the engine (the inverse of a
transition, see :func:`istio_iptables.xtables.reconcile.rollback_script`).
"""

from __future__ import annotations

import fcntl
import os
import re
import time
from collections.abc import Mapping

from istio_iptables._lib.log import log
from istio_iptables.errors import ApplyError, EnvironmentProblem, IstioIptablesError
from istio_iptables.net import Family
from istio_iptables.system.spawn import run_program, which
from istio_iptables.system.xtables_backend import Backend, Detection, find_program
from istio_iptables.xtables.model import BUILTIN_CHAINS


def lock_wait() -> float:
    """How long a run waits for a lock, ours or the xtables one: $ISTIO_IPTABLES_LOCK_WAIT, else 30 s."""
    from istio_iptables.system.nslock import wait_seconds

    return wait_seconds()


def _wait_option() -> str:
    """``-w`` takes whole seconds; 0 would mean "do not wait at all" there, so at least 1."""
    return str(max(1, int(-(-lock_wait() // 1))))
CONTEXT_LINES = 5

# Patterns, compiled on first use (re caches them): only a failed restore reads them, not every run.
_FAILED_LINE = r"line (\d+)(?: failed|:)"  # legacy: "line 3 failed", nft: "line 3: ..."
_MISSING_EXTENSION = r"Couldn't load (match|target) `([^']+)'"
_MISSING_TABLE = r"(?:can't initialize \S+ table `([^']+)'|Table does not exist)"
# nft: "Extension owner revision 0 not supported, missing kernel module?"
_UNSUPPORTED_EXTENSION = r"(?:(match|target) )?[Ee]xtension (\S+) revision \d+ not supported"
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
    from istio_iptables.system.nslock import describe_holder

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
    where = re.search(_FAILED_LINE, stderr)
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
    missing = re.search(_MISSING_EXTENSION, stderr) or re.search(_UNSUPPORTED_EXTENSION, stderr)
    if missing:
        kind, name = missing.groups()
        kind, module = kind or "extension", f"xt_{name}"
        return EnvironmentProblem(
            f"the iptables {kind} '{name}' is unavailable ({label}): load the {module} kernel module "
            f"(modprobe {module}) on the node, and check iptables' extensions are installed; {state}{context}"
        )
    table = re.search(_MISSING_TABLE, stderr)
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

    def read(self, family: Family) -> str:
        """What the namespace holds now (``*-save``), to compute a rollback from."""
        program = self.backend.program(family, "save")
        process = run_program([find_program(program)], env=self.env, timeout=lock_wait() + 30)
        if process.returncode != 0:
            raise RestoreFailed(family, program, "", process.returncode, process.stderr)
        return process.stdout

    def _restore(self, family: Family, text: str, *options: str) -> None:
        program = self.backend.program(family, "restore")
        process = run_program([find_program(program), *options], input=text, env=self.env, timeout=lock_wait() + 30)
        if process.returncode != 0:
            raise RestoreFailed(family, program, text, process.returncode, process.stderr)


NftChains = dict[tuple[str, str], tuple[bool, str, int]]  # (table, chain) -> (base chain, policy, rules)


def _nft_family(family: Family) -> str:
    return "ip" if family is Family.V4 else "ip6"


def nft_listing(family: Family, env: Mapping[str, str] | None = None) -> NftChains | None:
    """The chains nft holds for iptables-nft's tables of ``family``; None without a usable nft."""
    listed = _nft_ruleset(family, env)
    return None if listed is None else listed[0]


def _nft_ruleset(family: Family, env: Mapping[str, str] | None) -> tuple[NftChains, set[str]] | None:
    """``family``'s chains, and the tables that hold anything besides chains and rules (a set, a map, a
    stateful object: never iptables-nft's, so such a table is not ours to delete); None without a usable nft."""
    nft = which("nft")
    if nft is None:
        return None
    listed = run_program([nft, "-j", "list", "ruleset", _nft_family(family)], env=env, timeout=60)
    if listed.returncode != 0:
        return None
    import json

    from istio_iptables.nft.listing import NftJsonError, read_listing_objects

    try:
        objects = json.loads(listed.stdout or '{"nftables": []}')["nftables"]
        tables = read_listing_objects(objects)
    except (ValueError, KeyError, TypeError, NftJsonError):
        return None
    chains = {
        (table.name, chain.name): (chain.hook is not None, chain.policy.lower(), len(chain.rules))
        for table in tables
        for chain in table.chains.values()
    }
    holding_more = {
        str(body.get("table"))
        for item in objects
        if isinstance(item, dict)
        for kind, body in item.items()
        if kind not in ("metainfo", "table", "chain", "rule") and isinstance(body, dict)
    }
    return chains, holding_more


def nft_chains(family: Family, env: Mapping[str, str] | None = None) -> set[tuple[str, str]]:
    """(table, chain) of every chain nft holds in ``family``'s iptables tables (all of them if nft is missing,
    so nothing is taken for ours)."""
    listing = nft_listing(family, env)
    if listing is None:
        return {(table, chain) for table in ("filter", "mangle", "nat", "raw") for chain in BUILTIN_CHAINS}
    return set(listing)


def _delete_if_empty(
    family: Family, chains: list[tuple[str, str]], tables: list[str], env: Mapping[str, str] | None
) -> bool:
    """Delete these built-in chains if they hold no rule (ACCEPT policy), then these tables if they hold
    nothing else (no chain, set, map or stateful object)."""
    listed = _nft_ruleset(family, env)
    nft = which("nft")
    if listed is None or nft is None:
        return False
    listing, holding_more = listed
    name = _nft_family(family)
    doomed = []
    for table, chain in chains:
        found = listing.get((table, chain))
        if found is not None and found[0] and found[1] == "accept" and found[2] == 0:
            doomed.append((table, chain))
            del listing[(table, chain)]
    remaining = {table for table, _ in listing} | holding_more
    emptied = [table for table in tables if table not in remaining]
    commands = [f"delete chain {name} {table} {chain}" for table, chain in doomed]
    commands += [f"delete table {name} {table}" for table in emptied]
    if not commands:
        return False
    # One transaction: the kernel's commit (~10 ms) is most of what each command costs. If the kernel
    # refuses it, nothing changed: then one by one, so one refusal does not keep the others, and a
    # table whose chain stayed is kept too (deleting a table deletes whatever it still holds).
    if run_program([nft, "-f", "-"], input="\n".join(commands) + "\n", env=env).returncode == 0:
        return True
    deleted, kept = False, set()
    for table, chain in doomed:
        if run_program([nft, f"delete chain {name} {table} {chain}"], env=env).returncode == 0:
            deleted = True
        else:
            kept.add(table)
    for table in emptied:
        if table not in kept:
            deleted |= run_program([nft, f"delete table {name} {table}"], env=env).returncode == 0
    return deleted


def drop_nft_leftovers(
    family: Family, new_tables: list[str], new_chains: list[tuple[str, str]], env: Mapping[str, str] | None
) -> bool:
    """After a rollback on the nft backend: the tables and built-in chains our failed write created go
    again (iptables-nft creates them on first use and never removes them), once they hold nothing."""
    if not new_tables and not new_chains:
        return False
    chains = [*new_chains, *((table, chain) for table in new_tables for chain in sorted(BUILTIN_CHAINS))]
    return _delete_if_empty(family, chains, new_tables, env)


State = Mapping[str, Mapping[str, list[str]]]


def drop_emptied_nft_chains(
    detection: Detection,
    live: Mapping[Family, State],
    env: Mapping[str, str] | None,
    wanted: Mapping[Family, State] | None = None,
) -> bool:
    """After cleanup or a reconcile on the nft backend: built-in chains that held nothing but our rules
    and now get none go, and then a table left without chains, so ``nft list ruleset`` shows what it
    showed before our first run (iptables-nft creates them on first use and never removes them)."""
    deleted = False
    for family, state in live.items():
        tables = detection.dump(family).tables
        kept = (wanted or {}).get(family, {})
        emptied = [
            (table, chain)
            for table, chains in state.items()
            for chain, specs in chains.items()
            if chain in BUILTIN_CHAINS
            and specs
            and len(specs) == len(tables.get(table, {}).get(chain, []))
            and not kept.get(table, {}).get(chain)
        ]
        if emptied:
            deleted |= _delete_if_empty(family, emptied, sorted({table for table, _ in emptied}), env)
    return deleted
