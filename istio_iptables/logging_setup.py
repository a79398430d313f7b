"""Map Istio's logging flags (``--log_output_level``, ``--log_as_json``, ``--log_target``) onto logging."""

from __future__ import annotations

import json
import logging
import sys
import time

# Istio's levels; "none" silences a scope.
LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "fatal": logging.CRITICAL,
    "none": logging.CRITICAL + 10,
}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return json.dumps(
            {
                "time": f"{stamp}.{int(record.msecs):03d}Z",
                "level": record.levelname.lower(),
                "scope": "default",
                "msg": record.getMessage(),
            }
        )


def level_of(output_level: str) -> int:
    """``default:info,foo:debug`` or plain ``info``: the level of the default scope."""
    level = logging.INFO
    for item in output_level.split(","):
        scope, _, name = item.rpartition(":")
        if scope in ("", "default", "all") and name.strip().lower() in LEVELS:
            level = LEVELS[name.strip().lower()]
    return level


def configure_logging(output_level: str, as_json: str, target: str) -> None:
    stream_targets = {"stderr": sys.stderr, "stdout": sys.stdout}
    handler: logging.Handler
    if target in stream_targets:
        handler = logging.StreamHandler(stream_targets[target])
    else:
        handler = logging.FileHandler(target)
    if as_json.strip().lower() in ("1", "t", "true", "yes", "on"):
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s\t%(levelname)s\t%(message)s"))
    root = logging.getLogger("istio_iptables")
    root.handlers[:] = [handler]
    root.setLevel(level_of(output_level))
    root.propagate = False
