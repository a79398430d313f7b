"""The in-process applier (``--applier libiptc``): python-iptables driving legacy x_tables.

It executes the very restore input the default applier would feed to ``iptables-restore``
(``*table``, ``:CHAIN``, ``-D``, ``-X``, ``-A``, ``-I``, ``COMMIT``), so both appliers leave the
kernel in the same state, and errors name the same line. Each table is committed once.
libiptc only speaks legacy x_tables: an nft-managed namespace is refused.

python-iptables is imported lazily. Left alone, its import runs ``ldconfig -v``, ``gcc`` and
``ld`` to find libraries (~250-450 ms); the environment knobs it supports (``XTABLES_LIBDIR``,
``IPTABLES_LIBDIR``, ``PYTHON_IPTABLES_XTABLES_VERSION``, and ``SETUPTOOLS_USE_DISTUTILS=stdlib``
for its distutils import) are filled in here when unset, which brings it to ~30 ms.
"""

from __future__ import annotations

import fcntl
import glob
import os
import shlex
import sys
import time
import warnings
from collections.abc import Mapping
from typing import Any

from istio_iptables.errors import EnvironmentProblem
from istio_iptables.net import Family
from istio_iptables.system.xtables_backend import Backend
from istio_iptables.system.xtables_restore import (
    DEFAULT_LOCKFILE,
    LockTimeout,
    RestoreApplier,
    RestoreFailed,
    await_xtables_lock,
    lock_wait,
)

_HEAD_OPTIONS = {"-s": "src", "-d": "dst", "-i": "in_interface", "-o": "out_interface", "-p": "protocol"}


def library_environment() -> dict[str, str]:
    """Values for python-iptables' own knobs, found without running ldconfig or gcc."""
    found: dict[str, str] = {"SETUPTOOLS_USE_DISTUTILS": "stdlib"}
    candidates = [*sorted(glob.glob("/usr/lib/*/xtables")), "/usr/lib64/xtables", "/usr/lib/xtables"]
    candidates += ["/usr/local/lib/xtables"]
    extensions = next((path for path in candidates if os.path.isdir(path)), None)
    if extensions is None:
        return found
    found["XTABLES_LIBDIR"] = extensions
    libdir = os.path.dirname(extensions)
    versions = sorted(glob.glob(os.path.join(libdir, "libxtables.so.*[0-9]")), key=len)
    if versions:
        found["PYTHON_IPTABLES_XTABLES_VERSION"] = versions[0].rsplit(".so.", 1)[1].split(".")[0]
    from importlib.util import find_spec

    spec = find_spec("iptc")
    search = [libdir]
    if spec is not None and spec.origin:
        search.append(os.path.dirname(os.path.dirname(spec.origin)))  # where libxtwrapper*.so lives
    found["IPTABLES_LIBDIR"] = ":".join(search)
    return found


def import_iptc() -> Any:
    for name, value in library_environment().items():
        os.environ.setdefault(name, value)
    # setuptools' distutils shim is installed at interpreter start unless the variable was already
    # set then (set it in the image); the shim makes python-iptables' distutils import cost
    # ~400 ms. _distutils_hack.remove_shim() is setuptools' own switch for it.
    hack = sys.modules.get("_distutils_hack")
    if hack is not None and os.environ["SETUPTOOLS_USE_DISTUTILS"] == "stdlib":
        hack.remove_shim()
    try:
        with warnings.catch_warnings():  # Python 3.11's distutils warns that it is deprecated
            warnings.simplefilter("ignore", DeprecationWarning)
            import iptc
    except Exception as error:  # the library raises plain Exception/XTablesError when libs are missing
        raise EnvironmentProblem(
            f"--applier libiptc cannot load python-iptables ({error}); use the default --applier restore"
        ) from None
    return iptc


class XtablesLock:
    """The lock every legacy iptables program takes; we wait for it (bounded) like ``-w``."""

    def __init__(self, path: str, wait_seconds: float | None = None) -> None:
        self.path = path
        self.wait_seconds = lock_wait() if wait_seconds is None else wait_seconds
        self.fd: int | None = None

    def __enter__(self) -> XtablesLock:
        self.fd = os.open(self.path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + self.wait_seconds
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(self.fd)
                    raise EnvironmentProblem(
                        f"another program held the xtables lock {self.path} for over {self.wait_seconds}s"
                    ) from None
                time.sleep(0.02)

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the flock
            self.fd = None


class LibiptcApplier:
    name = "libiptc"

    def __init__(self, backend: Backend, env: Mapping[str, str] | None = None) -> None:
        if backend.name != "legacy":
            raise EnvironmentProblem(
                "--applier libiptc drives legacy x_tables only, but this namespace is managed by nft "
                "(iptables-nft holds its rules, or nothing holds any); use --applier restore, or "
                "--force-iptables-binary=legacy if legacy is really wanted"
            )
        self.backend = backend
        self.env = env
        self.lockfile = (env or os.environ).get("XTABLES_LOCKFILE") or DEFAULT_LOCKFILE
        self.iptc = import_iptc()

    # libxtables registers an extension for one family per process (loading TPROXY for IPv6 once
    # IPv4 has it fails: "already registered"), and a fork inherits what is loaded. So each
    # family's write runs in a forked child of this process (same namespace, the library already
    # imported), and this process never loads an extension.
    def write(self, family: Family, script: str) -> None:
        await_xtables_lock(family, f"libiptc ({family.name})", script, self.env)
        self._write_in_child(family, script)

    def _write_in_child(self, family: Family, script: str) -> None:
        reader, writer = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through the pipe and exit code
            os.close(reader)
            code, message = 0, ""
            try:
                with XtablesLock(self.lockfile):
                    self._execute(family, script)
            except RestoreFailed as failure:
                code, message = 1, failure.stderr
            except EnvironmentProblem as problem:
                code, message = 2, str(problem)
            except BaseException as error:
                code, message = 1, f"{type(error).__name__}: {error}"
            os.write(writer, message.encode())
            os._exit(code)
        os.close(writer)
        with os.fdopen(reader, "rb") as pipe:
            message = pipe.read().decode(errors="replace")
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        if code == 2:  # the xtables lock was taken again between our wait and the child's flock
            raise LockTimeout(family, f"libiptc ({family.name})", script, 4, f"{self.lockfile} stayed held")
        if code != 0:
            raise RestoreFailed(family, f"libiptc ({family.name})", script, code, message or f"exit {code}")

    def read(self, family: Family) -> str:
        """What the namespace holds now; the rollback computed from it is written with :meth:`write`."""
        return RestoreApplier(self.backend, self.env).read(family)

    def _table(self, family: Family, name: str) -> Any:
        iptc = self.iptc
        table = iptc.Table(name) if family is Family.V4 else iptc.Table6(name)
        table.autocommit = False
        return table

    def _execute(self, family: Family, script: str) -> None:
        # python-iptables decides whether "-j NAME" is a chain by asking every table it believes
        # exists, which instantiates (legacy) tables we never write, security included. Tell it
        # that only this script's tables exist.
        touched = {line[1:].strip() for line in script.splitlines() if line.startswith("*")}
        table_class = self.iptc.Table if family is Family.V4 else self.iptc.Table6
        table_class.existing_table_names.clear()
        table_class.existing_table_names.update({name: name in touched for name in table_class.ALL})
        table: Any = None
        for number, line in enumerate(script.splitlines(), start=1):
            try:
                if line.startswith("*"):
                    table = self._table(family, line[1:].strip())
                    table.refresh()
                elif line == "COMMIT":
                    table.commit()
                    table = None
                elif line.startswith(":"):
                    chain = line[1:].split()[0]
                    if table.is_chain(chain):
                        table.flush_entries(chain)
                    else:
                        table.create_chain(chain)
                elif line.startswith("-X "):
                    table.delete_chain(line.split()[1])
                elif line.startswith(("-A ", "-D ", "-I ")):
                    self._rule_line(family, table, line)
                elif line.strip() and not line.startswith("#"):
                    raise ValueError(f"unsupported line {line!r}")
            except Exception as error:
                if table is not None:
                    table.refresh()  # drop the uncommitted changes of this table
                raise RestoreFailed(
                    family, f"libiptc ({family.name})", script, 1, f"line {number} failed: {error}"
                ) from None

    def _rule_line(self, family: Family, table: Any, line: str) -> None:
        tokens = shlex.split(line)
        action, chain_name = tokens[0], tokens[1]
        rest = tokens[2:]
        position = 0
        if action == "-I":
            position, rest = int(rest[0]) - 1, rest[1:]
        chain = self.iptc.Chain(table, chain_name)
        rule = self.rule_from_spec(family, rest)
        if action == "-A":
            chain.append_rule(rule)
        elif action == "-I":
            chain.insert_rule(rule, position)
        else:
            chain.delete_rule(rule)

    def rule_from_spec(self, family: Family, tokens: list[str]) -> Any:
        """Build a python-iptables rule from iptables arguments (the save spelling or ours)."""
        iptc = self.iptc
        rule = iptc.Rule() if family is Family.V4 else iptc.Rule6()
        module: Any = None
        negate = False
        index = 0
        while index < len(tokens):
            token = tokens[index]
            if token == "!":
                negate = True
                index += 1
                continue
            if token in _HEAD_OPTIONS:
                setattr(rule, _HEAD_OPTIONS[token], ("!" if negate else "") + tokens[index + 1])
                index += 2
            elif token == "-m":
                module = rule.create_match(tokens[index + 1])
                index += 2
            elif token == "-j":
                module = rule.create_target(tokens[index + 1])
                index += 2
            elif token.startswith("--"):
                if module is None:  # "-p tcp --dport N": iptables loads the protocol's match implicitly
                    module = rule.create_match(rule.protocol.lstrip("!"))
                values = []
                index += 1
                while index < len(tokens) and not tokens[index].startswith("-") and tokens[index] != "!":
                    values.append(tokens[index])
                    index += 1
                value: Any = values[0] if len(values) == 1 else values if values else ""
                if negate:
                    value = "!" + value if isinstance(value, str) else ["!", *value]
                module.set_parameter(token[2:], value)
            else:
                raise ValueError(f"cannot read {token!r} in {' '.join(tokens)!r}")
            negate = False
        return rule
