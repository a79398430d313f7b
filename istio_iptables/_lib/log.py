"""Istio's logging flags (``--log_output_level``, ``--log_as_json``, ``--log_target``, ``--log_caller``) and our logger.

Modules log through :data:`log` (``from istio_iptables._lib.log import log``), which has the
``logging.Logger`` methods we use. Importing the standard ``logging`` package costs ~4 ms
(traceback, threading, string, textwrap): a tenth of the whole start of a dry run (docs/speed.md).
So once the CLI has called :func:`configure_logging`, ``log`` formats and writes lines itself, in
Istio's forms (pkg/log: zap's console and JSON encoders with Istio's encoder configuration):

    2026-12-01T12:44:15.820123Z<TAB>info<TAB>message
    {"level":"info","time":"2026-12-01T12:44:15.820123Z","msg":"message"}

Until then (library use, unit tests) it hands each record to the standard ``istio_iptables``
logger, so ``caplog`` and any handler a caller installed see everything as usual.
"""

from __future__ import annotations

import os
import sys
import time

from istio_iptables.errors import ConfigError

TYPE_CHECKING = False  # typing costs ~5 ms: istio-cni's skip and DEL paths start without it
if TYPE_CHECKING:
    from typing import Any, TextIO

DEBUG, INFO, WARNING, ERROR, CRITICAL = 10, 20, 30, 40, 50  # the numbers of the logging package
NONE = CRITICAL + 10
# zap's lowercase level names, as Istio prints them (a warning is "warn", a critical line "fatal").
LEVEL_NAMES = {DEBUG: "debug", INFO: "info", WARNING: "warn", ERROR: "error", CRITICAL: "fatal"}

# Istio's level names (pkg/log stringToLevel), exactly: "warning" or "INFO" are refused there too.
LEVELS = {"debug": DEBUG, "info": INFO, "warn": WARNING, "error": ERROR, "fatal": CRITICAL, "none": NONE}
DEFAULT_SCOPE, ALL_SCOPES = "default", "all"
# Istio joins its defaults before the flag's value, so a later item for a scope wins.
DEFAULT_OUTPUT_LEVELS = "default:info,grpc:none"


def level_of(output_level: str, source: str = "--log_output_level") -> int:
    """The level of our (default) scope after ``default:info,grpc:none`` and ``output_level``.

    Istio's grammar: comma separated ``scope:level`` or ``level`` (the default scope); ``all``
    sets every scope; unknown scopes are ignored; an unknown level or a second ``:`` is an error.
    """
    items = DEFAULT_OUTPUT_LEVELS + "," + output_level if output_level else DEFAULT_OUTPUT_LEVELS
    return _scoped_level(items, source, INFO)


def _scoped_level(items: str, source: str, level: int) -> int:
    for item in items.split(","):
        pieces = item.split(":")
        if len(pieces) > 2:
            raise ConfigError(source, item, "the form is scope:level, e.g. default:debug")
        scope, name = pieces if len(pieces) == 2 else (DEFAULT_SCOPE, pieces[0])
        if name not in LEVELS:
            raise ConfigError(source, item, f"the level is one of {', '.join(LEVELS)}")
        if scope in (DEFAULT_SCOPE, ALL_SCOPES):
            level = LEVELS[name]
    return level


def utc_stamp(created: float) -> str:
    """RFC 3339 in UTC with microseconds, as Istio's formatDate writes it."""
    seconds = int(created)
    micros = int((created - seconds) * 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{micros:06d}Z"


def format_text(level: int, message: str, created: float, caller: str = "") -> str:
    """zap's console encoder: time, level, caller (when asked), message, tab separated."""
    fields = [utc_stamp(created), LEVEL_NAMES.get(level, str(level))]
    if caller:
        fields.append(caller)
    fields.append(message)
    return "\t".join(fields)


def format_json(level: int, message: str, created: float, caller: str = "") -> str:
    """zap's JSON encoder: level, time, caller (when asked), msg, in this order, without spaces."""
    import json  # only JSON logging pays for it

    entry = {"level": LEVEL_NAMES.get(level, str(level)), "time": utc_stamp(created)}
    if caller:
        entry["caller"] = caller
    entry["msg"] = message
    return json.dumps(entry, ensure_ascii=False, separators=(",", ":"))


class Logger:
    """The subset of ``logging.Logger`` this project uses, writing straight to one stream."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.level = INFO
        self._streams: list[TextIO] | None = None  # None: not configured, the logging package does the work
        self._format = format_text
        self._callers = False

    def configure(self, level: int, streams: list[TextIO], as_json: bool, callers: bool = False) -> None:
        self.level = level
        self._streams = streams
        self._format = format_json if as_json else format_text
        self._callers = callers

    @property
    def configured(self) -> bool:
        """Whether the CLI has set this logger up (else records go to the logging package)."""
        return self._streams is not None

    def isEnabledFor(self, level: int) -> bool:
        if self._streams is None:
            import logging

            return logging.getLogger(self.name).isEnabledFor(level)
        return level >= self.level

    def log(self, level: int, message: str, *args: Any, exc_info: bool = False) -> None:
        if self._streams is None:
            import logging

            logging.getLogger(self.name).log(level, message, *args, exc_info=exc_info, stacklevel=3)
            return
        if level < self.level:
            return
        text = message % args if args else message
        if exc_info and sys.exc_info()[0] is not None:
            import traceback

            text = f"{text}\n{traceback.format_exc().rstrip()}"
        line = self._format(level, text, time.time(), _caller() if self._callers else "") + "\n"
        for stream in list(self._streams):
            try:
                stream.write(line)
                stream.flush()
            except (OSError, ValueError) as error:  # ValueError: the stream was closed
                self._lost(stream, line, error)

    def _lost(self, stream: TextIO, line: str, error: Exception) -> None:
        """A target that stopped taking lines (disk full): stderr takes over, once said, never a traceback."""
        assert self._streams is not None
        self._streams.remove(stream)
        if sys.stderr is None or stream is sys.stderr or sys.stderr in self._streams:
            return
        self._streams.append(sys.stderr)
        reason = getattr(error, "strerror", None) or str(error)
        note = f"log target {getattr(stream, 'name', '?')!s} failed ({reason}); logging to stderr from here on"
        try:
            sys.stderr.write(self._format(WARNING, note, time.time()) + "\n" + line)
            sys.stderr.flush()
        except (OSError, ValueError):
            pass

    def debug(self, message: str, *args: Any) -> None:
        self.log(DEBUG, message, *args)

    def info(self, message: str, *args: Any) -> None:
        self.log(INFO, message, *args)

    def warning(self, message: str, *args: Any) -> None:
        self.log(WARNING, message, *args)

    def error(self, message: str, *args: Any) -> None:
        self.log(ERROR, message, *args)

    def critical(self, message: str, *args: Any) -> None:
        self.log(CRITICAL, message, *args)

    def exception(self, message: str, *args: Any) -> None:
        self.log(ERROR, message, *args, exc_info=True)


log = Logger("istio_iptables")


def _caller() -> str:
    """``package/module.py:line`` of the code that logged, as zap's ShortCallerEncoder spells it."""
    frame = sys._getframe(1)
    while frame.f_back is not None and frame.f_code.co_filename == __file__:
        frame = frame.f_back
    path = frame.f_code.co_filename.replace(os.sep, "/").split("/")
    return f"{'/'.join(path[-2:])}:{frame.f_lineno}"


def open_target(target: str) -> TextIO:
    """A ``--log_target`` file, opened for appending (created 0666 minus umask, as zap does).

    Refused at once (ConfigError, exit 2) when it cannot take lines: a missing directory, a
    directory, a FIFO nobody reads (opened non-blocking, so never a hang), a device that refuses
    writes (``/dev/full``: a zero-length write already fails).
    """
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    try:
        fd = os.open(target, flags, 0o666)
    except OSError as error:
        raise ConfigError("--log_target", target, f"cannot write the log there: {error.strerror}") from None
    except ValueError:  # a NUL byte
        raise ConfigError("--log_target", target, "not a file path") from None
    try:
        os.set_blocking(fd, True)  # a FIFO with a reader: wait for it rather than lose lines
        os.write(fd, b"")
    except OSError as error:
        os.close(fd)
        raise ConfigError("--log_target", target, f"cannot write the log there: {error.strerror}") from None
    return open(fd, "a", encoding="utf-8", errors="backslashreplace")


def configure_logging(
    output_level: str, as_json: bool, targets: tuple[str, ...] | list[str] = ("stderr",),
    callers: str = "", stacktrace_level: str | None = None,
) -> None:
    """Istio's logging flags; raises ConfigError (after pointing the log at stderr) for a bad one."""
    log.configure(INFO, [sys.stderr] if sys.stderr is not None else [], as_json)  # where an error goes
    level = level_of(output_level)
    if stacktrace_level is not None:
        _scoped_level(stacktrace_level, "--log_stacktrace_level", NONE)  # validated; we print no stacks
    streams: list[TextIO] = []
    for target in dict.fromkeys(targets or ("stderr",)):
        if target in ("stderr", "stdout"):
            stream = getattr(sys, target)
            if stream is not None:
                streams.append(stream)
        else:
            streams.append(open_target(target))
    wanted = {scope.strip() for scope in callers.split(",")}
    log.configure(level, streams, as_json, callers=bool(wanted & {DEFAULT_SCOPE, ALL_SCOPES}))
