"""Cold start of the init-container image: `podman run` to exit, next to the same command on the host.

    .venv/bin/python bench/bench_image_start.py      (root; builds the image first, cached)

Each sample targets a namespace of its own, as a new pod does. The commands are interleaved
(one sample of each per round), so a change of machine load hits all of them alike.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from common import CLI, INJECTOR_ARGV, REPO, row

sys.path.insert(0, str(REPO))
from tests.support import container
from tests.support.netns import NetNS

ROUNDS = 15
CAPS = ("NET_ADMIN", "NET_RAW")


def podman_run(namespace: NetNS, args: Sequence[str], **options: Any) -> list[str]:
    return container.run_command(args, network=f"ns:{namespace.path}", **options)


def on_host(namespace: NetNS, args: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", namespace.name, *CLI, *args]


def inside_one_container(namespace: NetNS) -> list[str]:
    """A container that times the dry run started from inside itself: no podman in the loop."""
    loop = (
        "import statistics, subprocess, sys, time\n"
        "samples = []\n"
        f"for _ in range({ROUNDS}):\n"
        "    start = time.perf_counter()\n"
        "    subprocess.run(sys.argv[1:], capture_output=True, check=True)\n"
        "    samples.append((time.perf_counter() - start) * 1000)\n"
        "print(statistics.median(samples))\n"
    )
    return podman_run(namespace, ["-c", loop, "istio-iptables", *INJECTOR_ARGV, "--dry-run"],
                      entrypoint="/opt/istio-iptables/bin/python")


COMMANDS: dict[str, Callable[[NetNS], list[str]]] = {
    "podman run <image> /bin/true": lambda ns: podman_run(ns, [], entrypoint="/bin/true"),
    "host: istio-iptables --dry-run <injector argv>": lambda ns: on_host(ns, [*INJECTOR_ARGV, "--dry-run"]),
    "podman run <image> --dry-run <injector argv>": lambda ns: podman_run(ns, [*INJECTOR_ARGV, "--dry-run"]),
    "host: istio-iptables <injector argv>": lambda ns: on_host(ns, INJECTOR_ARGV),
    "podman run <image> <injector argv>": lambda ns: podman_run(ns, INJECTOR_ARGV, caps=CAPS),
}


def main() -> None:
    container.build_image()
    print(f"image {container.IMAGE}: {container.image_size() / 1e6:.0f} MB; medians of {ROUNDS} rounds")
    samples: dict[str, list[float]] = {label: [] for label in COMMANDS}
    for round_number in range(ROUNDS + 1):
        for label, command_for in COMMANDS.items():
            with NetNS("iit-bench") as namespace:
                command = command_for(namespace)
                start = time.perf_counter()
                subprocess.run(command, capture_output=True, check=True)
                if round_number:  # round 0 warms the page cache and podman's storage
                    samples[label].append((time.perf_counter() - start) * 1000)
    with NetNS("iit-bench") as namespace:
        inside = float(subprocess.run(inside_one_container(namespace), capture_output=True, text=True,
                                      check=True).stdout)
    median = {label: statistics.median(values) for label, values in samples.items()}
    true, host_dry, image_dry, host_apply, image_apply = median.values()
    print(row("podman run <image> /bin/true (runtime overhead)", true, host_dry, "host dry run"))
    print(row("host: istio-iptables --dry-run <injector argv>", host_dry, host_dry, "host dry run"))
    print(row("podman run <image> --dry-run <injector argv>", image_dry, host_dry, "host dry run"))
    print(row("  the same dry run started inside the container", inside, host_dry, "host dry run"))
    print(row("host: istio-iptables <injector argv> (writes)", host_apply, host_apply, "host apply"))
    print(row("podman run <image> <injector argv> (writes)", image_apply, host_apply, "host apply"))
    print(row("podman run <image> <injector argv> (writes)", image_apply, true, "podman /bin/true"))


if __name__ == "__main__":
    main()
