"""Istio's logging flags (``--log_output_level``, ``--log_as_json``, ``--log_target``) and our logger.

Modules log through :data:`log` (``from istio_iptables.logging_setup import log``), which has the
``logging.Logger`` methods we use. Importing the standard ``logging`` package costs ~4 ms
(traceback, threading, string, textwrap): a tenth of the whole start of a dry run (docs/speed.md).
So once the CLI has called :func:`configure_logging`, ``log`` formats and writes lines itself, in
the same text (``time<TAB>LEVEL<TAB>message``) or JSON format as before. Until then (library use,
unit tests) it hands each record to the standard ``istio_iptables`` logger, so ``caplog`` and
any handler a caller installed see everything as usual.
"""

from __future__ import annotations

import sys
import time

TYPE_CHECKING = False  # typing costs ~5 ms: istio-cni's skip and DEL paths start without it
if TYPE_CHECKING:
    from typing import Any, TextIO

DEBUG, INFO, WARNING, ERROR, CRITICAL = 10, 20, 30, 40, 50  # the numbers of the logging package
LEVEL_NAMES = {DEBUG: "DEBUG", INFO: "INFO", WARNING: "WARNING", ERROR: "ERROR", CRITICAL: "CRITICAL"}

# Istio's levels; "none" silences a scope.
LEVELS = {
    "debug": DEBUG,
    "info": INFO,
    "warn": WARNING,
    "warning": WARNING,
    "error": ERROR,
    "fatal": CRITICAL,
    "none": CRITICAL + 10,
}


def level_of(output_level: str) -> int:
    """``default:info,foo:debug`` or plain ``info``: the level of the default scope."""
    level = INFO
    for item in output_level.split(","):
        scope, _, name = item.rpartition(":")
        if scope in ("", "default", "all") and name.strip().lower() in LEVELS:
            level = LEVELS[name.strip().lower()]
    return level


def format_text(level: int, message: str, created: float) -> str:
    """As ``logging.Formatter("%(asctime)s\\t%(levelname)s\\t%(message)s")`` prints it."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created))
    return f"{stamp},{int(created * 1000) % 1000:03d}\t{LEVEL_NAMES.get(level, level)}\t{message}"


def format_json(level: int, message: str, created: float) -> str:
    import json  # only JSON logging pays for it

    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return json.dumps(
        {
            "time": f"{stamp}.{int(created * 1000) % 1000:03d}Z",
            "level": str(LEVEL_NAMES.get(level, level)).lower(),
            "scope": "default",
            "msg": message,
        }
    )


class Logger:
    """The subset of ``logging.Logger`` this project uses, writing straight to one stream."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.level = INFO
        self._stream: TextIO | None = None  # None: not configured, the logging package does the work
        self._format = format_text

    def configure(self, level: int, stream: TextIO, as_json: bool) -> None:
        self.level = level
        self._stream = stream
        self._format = format_json if as_json else format_text

    def isEnabledFor(self, level: int) -> bool:
        if self._stream is None:
            import logging

            return logging.getLogger(self.name).isEnabledFor(level)
        return level >= self.level

    def log(self, level: int, message: str, *args: Any, exc_info: bool = False) -> None:
        if self._stream is None:
            import logging

            logging.getLogger(self.name).log(level, message, *args, exc_info=exc_info, stacklevel=3)
            return
        if level < self.level:
            return
        text = message % args if args else message
        if exc_info and sys.exc_info()[0] is not None:
            import traceback

            text = f"{text}\n{traceback.format_exc().rstrip()}"
        self._stream.write(self._format(level, text, time.time()) + "\n")
        self._stream.flush()

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


def configure_logging(output_level: str, as_json: str, target: str) -> None:
    stream_targets = {"stderr": sys.stderr, "stdout": sys.stdout}
    stream = stream_targets.get(target) or open(target, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the process
    log.configure(level_of(output_level), stream, as_json.strip().lower() in ("1", "t", "true", "yes", "on"))
