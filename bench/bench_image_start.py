"""Cold start of the init-container image: `podman run` to exit, next to the same command on the host.

    .venv/bin/python bench/bench_image_start.py      (root; builds the image first, cached)

Every run targets a throwaway pod namespace; real runs get a fresh one each time, as a new pod does.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from common import CLI, INJECTOR_ARGV, REPO, row, time_command

sys.path.insert(0, str(REPO))
from tests import container
from tests.netns import NetNS

RUNS = 9


def podman_run(namespace: NetNS, args: Sequence[str], **options: Any) -> list[str]:
    return container.run_command(args, network=f"ns:{namespace.path}", **options)

def time_in_fresh_namespaces(command_for: Callable[[NetNS], list[str]]) -> float:
    """Median milliseconds of ``command_for(namespace)``, each sample in a namespace of its own."""
    samples = []
    for _ in range(RUNS):
        with NetNS("iit-bench") as namespace:
            command = command_for(namespace)
            start = time.perf_counter()
            subprocess.run(command, capture_output=True, check=True)
            samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def inside_the_container(namespace: NetNS) -> float:
    """Median milliseconds of the dry run started inside one running container: no podman in the loop."""
    loop = (
        "import statistics, subprocess, sys, time\n"
        "samples = []\n"
        f"for _ in range({RUNS}):\n"
        "    start = time.perf_counter()\n"
        "    subprocess.run(sys.argv[1:], capture_output=True, check=True)\n"
        "    samples.append((time.perf_counter() - start) * 1000)\n"
        "print(statistics.median(samples))\n"
    )
    command = podman_run(namespace, ["-c", loop, "istio-iptables", *INJECTOR_ARGV, "--dry-run"],
                         entrypoint="/opt/istio-iptables/bin/python")
    return float(subprocess.run(command, capture_output=True, text=True, check=True).stdout)


def main() -> None:
    container.build_image()
    print(f"image {container.IMAGE}: {container.image_size() / 1e6:.0f} MB")
    with NetNS("iit-bench") as pod:
        host_ns = ["ip", "netns", "exec", pod.name]
        # Warm caches (page cache, podman's storage) so no sample pays a first-time cost.
        subprocess.run(podman_run(pod, [*INJECTOR_ARGV, "--dry-run"]), capture_output=True, check=True)
        true = time_command(podman_run(pod, [], entrypoint="/bin/true"), runs=RUNS)
        host_dry = time_command([*host_ns, *CLI, "--dry-run", *INJECTOR_ARGV], runs=RUNS)
        image_dry = time_command(podman_run(pod, ["istio-iptables", *INJECTOR_ARGV, "--dry-run"]), runs=RUNS)
        inside = inside_the_container(pod)
    host_apply = time_in_fresh_namespaces(lambda ns: ["ip", "netns", "exec", ns.name, *CLI, *INJECTOR_ARGV])
    image_apply = time_in_fresh_namespaces(
        lambda ns: podman_run(ns, ["istio-iptables", *INJECTOR_ARGV], caps=("NET_ADMIN", "NET_RAW"))
    )
    print(row("podman run <image> /bin/true (runtime overhead)", true, host_dry, "host dry run"))
    print(row("host: istio-iptables --dry-run <injector argv>", host_dry, host_dry, "host dry run"))
    print(row("podman run <image> --dry-run <injector argv>", image_dry, host_dry, "host dry run"))
    print(row("inside one container: istio-iptables --dry-run ...", inside, host_dry, "host dry run"))
    print(row("host: istio-iptables <injector argv> (apply)", host_apply, host_apply, "host apply"))
    print(row("podman run <image> <injector argv> (apply)", image_apply, host_apply, "host apply"))
    print(row("podman run <image> <injector argv> (apply)", image_apply, true, "podman /bin/true"))


if __name__ == "__main__":
    main()
