"""Whole-process cost of the in-process applier against the default one (root only).

    .venv/bin/python bench/bench_apply.py [--rounds N]

``--applier libiptc`` vs the default restore applier (legacy backend), the injector's argv in a
fresh namespace each time.                                                         goal <= 2x
(The init run and a TPROXY run against their floors are bench_speed.py's (a) and (b).)

Every round uses fresh namespaces and measures both sides back to back; the ratio is the
median of the per-round ratios. The bench process enters each
namespace itself, so no ``ip netns exec`` overhead lands on either side.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from istio_iptables.system.netns import entered

PYTHON = sys.executable
CLI = str(Path(sys.executable).parent / "istio-iptables")
INJECTOR = [
    "-p",
    "15001",
    "-z",
    "15006",
    "-u",
    "1337",
    "-m",
    "REDIRECT",
    "-i",
    "*",
    "-x",
    "",
    "-b",
    "*",
    "-d",
    "15090,15021,15020",
]


class Namespace:
    def __init__(self) -> None:
        self.name = f"bench-{uuid.uuid4().hex[:10]}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        subprocess.run(["ip", "-n", self.name, "link", "set", "lo", "up"], check=True)

    def __enter__(self) -> Namespace:
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=False)


def timed(command: list[str], namespace: str, stdin: str | None = None, env: dict[str, str] | None = None) -> float:
    with entered(namespace):
        started = time.perf_counter()
        done = subprocess.run(command, input=stdin, capture_output=True, text=True, env=env, check=False)
        elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{command[0]} failed: {done.stderr}")
    return elapsed


def one_run(argv: list[str], env: dict[str, str] | None = None) -> float:
    with Namespace() as namespace:
        return timed([CLI, *argv], namespace.name, env=env)


def paired(ours: Callable[[], float], floor_: Callable[[], float], rounds: int) -> list[tuple[float, float]]:
    """Alternate the two measurements, so load from elsewhere on the machine hits both alike."""
    return [(ours(), floor_()) for _ in range(rounds)]


def report(label: str, samples: list[tuple[float, float]], goal: float) -> None:
    ours = statistics.median(sample[0] for sample in samples)
    base = statistics.median(sample[1] for sample in samples)
    ratio = statistics.median(sample[0] / sample[1] for sample in samples)
    print(f"{label:32s} {ours * 1e3:6.1f} ms vs {base * 1e3:6.1f} ms  -> {ratio:.2f}x  (goal <= {goal}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    rounds = parser.parse_args().rounds
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces)")
    quiet = ["--log_output_level=default:none"]
    legacy = {**os.environ, "FORCE_IPTABLES_BINARY": "legacy"}
    libiptc = {**legacy, "ISTIO_IPTABLES_APPLIER": "libiptc"}
    for _ in range(2):  # warm the page cache for every binary and module
        one_run([*INJECTOR, *quiet], legacy), one_run([*INJECTOR, *quiet], libiptc)

    report(
        "libiptc vs restore (legacy)",
        paired(lambda: one_run([*INJECTOR, *quiet], libiptc), lambda: one_run([*INJECTOR, *quiet], legacy), rounds),
        2.0,
    )
    print(f"(medians of {rounds} paired rounds, fresh namespaces, load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
