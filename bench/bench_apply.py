"""Whole-process cost of applying rules, next to the floor measured in the same run (root only).

    .venv/bin/python bench/bench_apply.py [--rounds N]

1. The injector's default argv in a fresh namespace vs the floor: ``python -I -c 'import click'``
   plus one ``iptables-restore --noflush`` of the same text per family.        goal <= 1.25x
2. A TPROXY run (with its policy routes) vs that floor plus ``python -I -c 'import pyroute2'``.
                                                                                  goal <= 1.25x
3. ``--applier libiptc`` vs the default restore applier (legacy backend).        goal <= 2x

Every round uses fresh namespaces; the figures are medians. The bench process enters each
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

from istio_iptables.apply.netns import entered

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
TPROXY = [*INJECTOR[:6], "-m", "TPROXY", *INJECTOR[8:]]


class Namespace:
    def __init__(self) -> None:
        self.name = f"bench-{uuid.uuid4().hex[:10]}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        subprocess.run(["ip", "-n", self.name, "link", "set", "lo", "up"], check=True)

    def __enter__(self) -> Namespace:
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=False)


def timed(
    command: list[str], namespace: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> float:
    with entered(namespace):
        started = time.perf_counter()
        done = subprocess.run(command, input=stdin, capture_output=True, text=True, env=env, check=False)
        elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{command[0]} failed: {done.stderr}")
    return elapsed


def restore_documents(argv: list[str]) -> list[tuple[str, str]]:
    """(restore program, text) per family, from our dry run (identical to what a run writes)."""
    out = subprocess.run(
        [CLI, "--dry-run", *argv, "--log_output_level=default:none"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    documents: list[tuple[str, str]] = []
    for block in out.split("# ")[1:]:
        header, _, body = block.partition("\n")
        documents.append((header.strip(), body))
    return documents


def one_run(argv: list[str], env: dict[str, str] | None = None) -> float:
    with Namespace() as namespace:
        return timed([CLI, *argv], namespace.name, env=env)


def floor(argv: list[str], backend: str, extra_import: str | None = None) -> float:
    total = 0.0
    with Namespace() as namespace:
        total += timed([PYTHON, "-I", "-c", "import click"], namespace.name)
        if extra_import:
            total += timed([PYTHON, "-I", "-c", f"import {extra_import}"], namespace.name)
        for program, text in restore_documents(argv):
            name = program.replace("tables-restore", f"tables-{backend}-restore")
            total += timed([name, "--noflush"], namespace.name, stdin=text)
    return total


def measure(runs: Callable[[], float], rounds: int) -> tuple[float, float]:
    """(median, minimum): the minimum is the figure least disturbed by other load on the machine."""
    samples = [runs() for _ in range(rounds)]
    return statistics.median(samples), min(samples)


def report(label: str, ours: tuple[float, float], floor_: tuple[float, float], goal: float) -> None:
    print(
        f"{label:34s} median {ours[0] * 1e3:6.1f} vs {floor_[0] * 1e3:6.1f} ms -> {ours[0] / floor_[0]:.2f}x;"
        f" min {ours[1] * 1e3:6.1f} vs {floor_[1] * 1e3:6.1f} ms -> {ours[1] / floor_[1]:.2f}x (goal {goal}x)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=15)
    rounds = parser.parse_args().rounds
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces)")
    quiet = ["--log_output_level=default:none"]
    legacy = {**os.environ, "FORCE_IPTABLES_BINARY": "legacy"}
    libiptc = {**legacy, "ISTIO_IPTABLES_APPLIER": "libiptc"}
    for _ in range(2):  # warm the page cache for every binary and module
        one_run([*INJECTOR, *quiet]), floor(INJECTOR, "nft"), one_run([*INJECTOR, *quiet], libiptc)

    report(
        "1. injector argv vs floor",
        measure(lambda: one_run([*INJECTOR, *quiet]), rounds),
        measure(lambda: floor(INJECTOR, "nft"), rounds),
        1.25,
    )
    report(
        "2. TPROXY vs floor+pyroute2",
        measure(lambda: one_run([*TPROXY, *quiet]), rounds),
        measure(lambda: floor(TPROXY, "nft", "pyroute2"), rounds),
        1.25,
    )
    report(
        "3. libiptc vs restore (legacy)",
        measure(lambda: one_run([*INJECTOR, *quiet], libiptc), rounds),
        measure(lambda: one_run([*INJECTOR, *quiet], legacy), rounds),
        2.0,
    )
    print(f"({rounds} rounds per figure, fresh namespaces, load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
