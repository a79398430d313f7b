"""Shared timing helpers for the benchmarks: medians of whole-process runs, measured in one go."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
CLI = [str(Path(PYTHON).with_name("istio-iptables"))]
INJECTOR_ARGV = [
    "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*",
    "-d", "15090,15021,15020", "--log_output_level=default:info",
]  # fmt: skip


def time_command(command: Sequence[str], *, input: str | None = None, runs: int = 15) -> float:
    """Median wall time in milliseconds of running ``command`` to completion."""
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, input=input, capture_output=True, text=True, check=True)
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def time_call(call: Callable[[], object], *, runs: int = 15) -> float:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def row(label: str, value_ms: float, reference_ms: float, reference_label: str) -> str:
    return f"{label:<52} {value_ms:8.1f} ms   {value_ms / reference_ms:5.2f}x {reference_label}"
