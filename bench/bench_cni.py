"""istio-cni, whole process, as a runtime starts it, next to its floors measured in the same run (root only).

    .venv/bin/python bench/bench_cni.py [--rounds N]

1. ADD for a sidecar pod (the pod served by the tests' local HTTPS API server, tests/support/cni_support.py,
   a fresh pod-like namespace)
   vs the init floor: ``python -I -c 'import click'`` + one ``iptables-restore --noflush`` of the
   same rules (IPv4: the namespace has no IPv6 address), plus the API round trip.    goal <= 1.25x
   The API round trip is what any client process pays to read the pod: a ``python -I`` process
   that imports ssl/http.client/json and makes one HTTPS GET, minus ``python -I -c pass``.
2. Pods the plugin skips and DEL vs ``python -I -c pass``:                             goal <= 1.2x
   - an excluded namespace; a pod whose annotations the runtime passed (no sidecar status);
   - DEL when the namespace is already gone (kubelet repeats DEL after teardown);
   - a pod skipped after reading it from the API (vs ``pass`` + the API round trip);
   - DEL of a pod with rules (the cleanup: reads both families, one restore; reported, and
     compared with ``pass`` + one ``iptables-restore``).

Each round runs every command once, in turn; a ratio is the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from istio_iptables.system.netns import entered
from tests.support.cni_support import TOKEN, FakeApiServer

PYTHON = sys.executable
# The console script, as a node runs it (a venv made before istio-cni existed lacks it: `make venv`).
PLUGIN = str(Path(PYTHON).with_name("istio-cni"))
CLI = str(Path(PYTHON).with_name("istio-iptables"))
STATUS = '{"initContainers":["istio-validation"],"containers":["istio-proxy"]}'


def pod(name: str, annotated: bool = True) -> dict[str, object]:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default",
                     "annotations": {"sidecar.istio.io/status": STATUS} if annotated else {}},
        "spec": {"initContainers": [{"name": "istio-validation"}],
                 "containers": [{"name": "app"}, {"name": "istio-proxy", "args": ["proxy", "sidecar"],
                                                   "securityContext": {"runAsUser": 1337, "runAsGroup": 1337}}]},
    }  # fmt: skip


def write_kubeconfig(api: FakeApiServer, path: Path) -> Path:
    """A kubeconfig naming the CA by file (Istio's inline ``certificate-authority-data`` makes the plugin write
    the CA to a file first: not what these figures have measured)."""
    path.write_text(
        f"apiVersion: v1\nclusters:\n- cluster:\n    certificate-authority: {api.cert}\n    server: {api.url}\n"
        "  name: c\ncontexts:\n- context:\n    cluster: c\n    user: u\n  name: x\ncurrent-context: x\n"
        f"users:\n- name: u\n  user:\n    token: {TOKEN}\n"
    )
    return path


def api_client_code(api: FakeApiServer) -> str:
    """A ``python -I`` program that reads the sidecar pod once, as any client process would."""
    return (
        "import http.client, json, ssl\n"
        f"context = ssl.create_default_context(cafile={str(api.cert)!r})\n"
        f"connection = http.client.HTTPSConnection('127.0.0.1', {api.httpd.server_address[1]}, context=context,"
        " timeout=5)\n"
        f"connection.request('GET', '/api/v1/namespaces/default/pods/sidecar', headers={{'Authorization': "
        f"'Bearer {TOKEN}'}})\n"
        "json.loads(connection.getresponse().read())\n"
    )


class Namespace:
    """A pod-like network namespace: lo up, an eth0 (a veth; no dummy module here) with an IPv4 address."""

    def __init__(self) -> None:
        self.name = f"bench-cni-{uuid.uuid4().hex[:8]}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        for command in (["link", "set", "lo", "up"], ["link", "add", "eth0", "type", "veth", "peer", "name", "eth1"],
                        ["addr", "add", "10.244.1.5/24", "dev", "eth0"], ["link", "set", "eth0", "up"]):
            subprocess.run(["ip", "-n", self.name, *command], check=True)

    @property
    def path(self) -> str:
        return f"/run/netns/{self.name}"

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=False)


def timed(command: Sequence[str], *, env: dict[str, str] | None = None, stdin: str = "") -> float:
    start = time.perf_counter()
    done = subprocess.run(command, input=stdin, capture_output=True, text=True, env=env)
    elapsed = (time.perf_counter() - start) * 1000
    if done.returncode != 0:
        raise SystemExit(f"{command[0]} failed: {done.stdout}{done.stderr}")
    return elapsed


def plugin_env(command: str, netns: str, namespace: str, name: str) -> dict[str, str]:
    return {**os.environ, "CNI_COMMAND": command, "CNI_CONTAINERID": "bench", "CNI_IFNAME": "eth0",
            "CNI_NETNS": netns, "CNI_PATH": "/opt/cni/bin",
            "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name}"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces)")
    if not os.access(PLUGIN, os.X_OK):
        raise SystemExit(f"{PLUGIN} is missing: reinstall the package (pip install -e . in the venv)")
    subprocess.run([PYTHON, "-m", "compileall", "-q", str(Path(__file__).resolve().parents[1] / "istio_iptables")],
                   check=True)
    directory = Path(tempfile.mkdtemp(prefix="bench-cni-"))
    api = FakeApiServer(directory)
    api.add_pod(pod("sidecar"))
    api.add_pod(pod("plain", annotated=False))
    kubeconfig = write_kubeconfig(api, directory / "kubeconfig")
    client_code = api_client_code(api)
    config = {"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "istio-cni", "plugin_log_level": "info",
              "exclude_namespaces": ["kube-system"], "kubernetes": {"kubeconfig": str(kubeconfig)},
              "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "10.244.1.5/24", "interface": 0}]}}
    stdin = json.dumps(config)
    annotated = json.dumps({**config, "runtimeConfig": {"io.kubernetes.cri.pod-annotations": {"team": "a"}}})
    pod_file = directory / "pod.json"
    pod_file.write_text(json.dumps(pod("sidecar")))
    rules = subprocess.run([CLI, "--dry-run", "--from-pod", str(pod_file), "--disable-ipv6"], capture_output=True,
                           text=True, check=True).stdout
    restore = ["iptables-restore", "--noflush"]

    samples: dict[str, list[float]] = {}

    def record(label: str, value: float) -> None:
        samples.setdefault(label, []).append(value)

    for _ in range(args.rounds):
        pod_ns, floor_ns = Namespace(), Namespace()
        try:
            record("pass", timed([PYTHON, "-I", "-c", "pass"]))
            record("click", timed([PYTHON, "-I", "-c", "import click"]))
            with entered(floor_ns.path):
                record("restore", timed(restore, stdin=rules))
            record("api", timed([PYTHON, "-I", "-c", client_code]))
            record("add", timed([PLUGIN], env=plugin_env("ADD", pod_ns.path, "default", "sidecar"), stdin=stdin))
            record("del", timed([PLUGIN], env=plugin_env("DEL", pod_ns.path, "default", "sidecar"), stdin=stdin))
            record("del_gone", timed([PLUGIN], env=plugin_env("DEL", "/run/netns/bench-cni-gone", "default",
                                                                 "sidecar"), stdin=stdin))
            record("skip_excluded", timed([PLUGIN], env=plugin_env("ADD", pod_ns.path, "kube-system", "dns"),
                                          stdin=stdin))
            record("skip_runtime", timed([PLUGIN], env=plugin_env("ADD", pod_ns.path, "default", "plain"),
                                         stdin=annotated))
            record("skip_api", timed([PLUGIN], env=plugin_env("ADD", pod_ns.path, "default", "plain"), stdin=stdin))
        finally:
            pod_ns.delete()
            floor_ns.delete()

    def ratio(value: str, floor: Callable[[int], float]) -> tuple[float, float, float]:
        ratios = [samples[value][i] / floor(i) for i in range(args.rounds)]
        floors = [floor(i) for i in range(args.rounds)]
        return statistics.median(samples[value]), statistics.median(floors), statistics.median(ratios)

    def api_trip(i: int) -> float:
        return max(samples["api"][i] - samples["pass"][i], 0.0)

    rows = [
        ("ADD, sidecar pod", "add", lambda i: samples["click"][i] + samples["restore"][i] + api_trip(i),
         "import click + restore + API trip", 1.25),
        ("skip: excluded namespace", "skip_excluded", lambda i: samples["pass"][i], "python -I -c pass", 1.2),
        ("skip: runtime's annotations, no sidecar", "skip_runtime", lambda i: samples["pass"][i],
         "python -I -c pass", 1.2),
        ("DEL, namespace already gone", "del_gone", lambda i: samples["pass"][i], "python -I -c pass", 1.2),
        ("skip: read from the API, no sidecar", "skip_api", lambda i: samples["pass"][i] + api_trip(i),
         "pass + API trip", 1.2),
        ("DEL of a pod with rules (cleanup)", "del", lambda i: samples["pass"][i] + samples["restore"][i],
         "pass + one restore", None),
    ]
    print(f"rounds: {args.rounds}; medians in ms; API trip = {statistics.median(samples['api']):.1f} - "
          f"{statistics.median(samples['pass']):.1f} (python -I -c pass)")
    for label, key, floor, floor_label, goal in rows:
        value, floor_ms, median_ratio = ratio(key, floor)
        verdict = "" if goal is None else ("  ok" if median_ratio <= goal else f"  OVER goal {goal}x")
        print(f"{label:<42} {value:7.1f} ms  vs {floor_label:<34} {floor_ms:7.1f} ms  {median_ratio:5.2f}x{verdict}")
    api.close()


if __name__ == "__main__":
    main()
