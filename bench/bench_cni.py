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
   - a pod skipped after reading it from the API (vs ``pass`` + the API round trip).
3. DEL of a pod with rules, on each form (iptables' nft backend, its legacy backend, native nftables).
   It cannot come near ``pass``: a cleanup must at least read the namespace and write the removal,
   and the kernel's commit of a removal costs ~10 ms per nf_tables transaction. So each is compared
   with the programs its cleanup must run, timed one after the other in a namespace holding the
   same rules, plus ``pass``:                                                          goal <= 1.2x
   - nft backend: ``iptables-save`` + ``iptables-restore --noflush`` of the removal + one ``nft -f``
     deleting the built-in chains and the table iptables-nft created for our rules;
   - legacy backend: ``iptables-legacy-save`` + ``iptables-legacy-restore --noflush`` of the removal;
   - native nftables: ``nft -j list ruleset`` + one ``nft -f`` deleting our tables.
   The ratio against ``pass`` alone is printed too (issue 15's figure; no goal can hold there), and
   against the floor plus what the DEL imports (``python -I`` importing the plugin and the engine's
   cleanup modules, ending with ``os._exit`` as the plugin does): what is left above it is the
   cleanup's own work.

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


# What the plugin's DEL imports (tests/kernel/test_import_budget.py pins it), per form; os._exit as the plugin.
CLEANUP_IMPORTS = (
    "from istio_iptables.frontends.cni import actions, plugin; from istio_iptables.config.sidecar import parse; "
    "from istio_iptables.engine import actions, forms; from istio_iptables.system import host, netns, nslock, real, "
    "routes, nf_tables; import ctypes; "
)
IPTABLES_CLEANUP_IMPORTS = CLEANUP_IMPORTS + "from istio_iptables.engine import xtables; import os; os._exit(0)"
NATIVE_CLEANUP_IMPORTS = (
    CLEANUP_IMPORTS + "from istio_iptables.engine import nft; from istio_iptables.system import nft; "
    "import os; os._exit(0)"
)


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


def run_in(namespace: Namespace, command: Sequence[str], stdin: str = "") -> None:
    """Set-up, untimed: ``command`` in ``namespace``."""
    with entered(namespace.path):
        done = subprocess.run(command, input=stdin, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{command[0]} failed: {done.stdout}{done.stderr}")


def removal_commands(rules: str) -> str:
    """``nft -f`` input deleting the built-in chains our restore appended to, then their tables: what a cleanup
    on the nft backend deletes once our rules are gone (iptables-nft created them for us)."""
    from istio_iptables.engine.xtables import added_builtin_chains
    from istio_iptables.system.xtables_restore import tables_of

    chains = sorted(added_builtin_chains(rules))
    lines = [f"delete chain ip {table} {chain}" for table, chain in chains]
    lines += [f"delete table ip {table}" for table in tables_of(rules)]
    return "\n".join(lines) + "\n"


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
    native_rules = subprocess.run([CLI, "--dry-run", "--from-pod", str(pod_file), "--disable-ipv6",
                                   "--native-nftables"], capture_output=True, text=True, check=True).stdout
    restore = ["iptables-restore", "--noflush"]
    # What a cleanup writes: the removal (our own --cleanup-only --dry-run, read from a namespace holding the rules).
    scratch = Namespace()
    try:
        run_in(scratch, restore, rules)
        preview = subprocess.run([CLI, "--cleanup-only", "--dry-run", "--network-namespace", scratch.path],
                                 capture_output=True, text=True, check=True).stdout
        run_in(scratch, [CLI, "--from-pod", str(pod_file), "--disable-ipv6", "--native-nftables", "--reconcile"])
        with entered(scratch.path):
            native_tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True,
                                           check=True).stdout.split()
    finally:
        scratch.delete()
    removal = "".join(line + "\n" for line in preview.splitlines() if not line.startswith("#"))
    nft_removal = removal_commands(rules)
    native_removal = "".join(f"delete table inet {name}\n" for name in native_tables if name.startswith("istio-"))
    native_config = json.dumps({**config, "native_nftables": True})

    samples: dict[str, list[float]] = {}

    def record(label: str, value: float) -> None:
        samples.setdefault(label, []).append(value)

    for _ in range(args.rounds):
        pod_ns, floor_ns = Namespace(), Namespace()
        legacy_ns, floor_legacy_ns, native_ns, floor_native_ns = Namespace(), Namespace(), Namespace(), Namespace()
        try:
            record("pass", timed([PYTHON, "-I", "-c", "pass"]))
            record("click", timed([PYTHON, "-I", "-c", "import click"]))
            with entered(floor_ns.path):
                record("restore", timed(restore, stdin=rules))
                # the floor of DEL on the nft backend, in a namespace holding the rules
                record("floor_save", timed(["iptables-save"]))
                record("floor_removal", timed(restore, stdin=removal))
                record("floor_nft_delete", timed(["nft", "-f", "-"], stdin=nft_removal))
            run_in(floor_legacy_ns, ["iptables-legacy-restore", "--noflush"], rules)
            with entered(floor_legacy_ns.path):
                record("floor_legacy_save", timed(["iptables-legacy-save"]))
                record("floor_legacy_removal", timed(["iptables-legacy-restore", "--noflush"], stdin=removal))
            run_in(floor_native_ns, ["nft", "-f", "-"], native_rules)
            with entered(floor_native_ns.path):
                record("floor_native_list", timed(["nft", "-j", "list", "ruleset"]))
                record("floor_native_delete", timed(["nft", "-f", "-"], stdin=native_removal))
            record("imports", timed([PYTHON, "-I", "-c", IPTABLES_CLEANUP_IMPORTS]))
            record("imports_native", timed([PYTHON, "-I", "-c", NATIVE_CLEANUP_IMPORTS]))
            record("api", timed([PYTHON, "-I", "-c", client_code]))
            record("add", timed([PLUGIN], env=plugin_env("ADD", pod_ns.path, "default", "sidecar"), stdin=stdin))
            record("del", timed([PLUGIN], env=plugin_env("DEL", pod_ns.path, "default", "sidecar"), stdin=stdin))
            run_in(legacy_ns, [CLI, "--from-pod", str(pod_file), "--force-iptables-binary=legacy"])
            record("del_legacy", timed([PLUGIN], env=plugin_env("DEL", legacy_ns.path, "default", "sidecar"),
                                       stdin=stdin))
            run_in(native_ns, [CLI, "--from-pod", str(pod_file), "--native-nftables"])
            record("del_native", timed([PLUGIN], env=plugin_env("DEL", native_ns.path, "default", "sidecar"),
                                       stdin=native_config))
            record("del_gone", timed([PLUGIN], env=plugin_env("DEL", "/run/netns/bench-cni-gone", "default",
                                                                 "sidecar"), stdin=stdin))
            record("skip_excluded", timed([PLUGIN], env=plugin_env("ADD", pod_ns.path, "kube-system", "dns"),
                                          stdin=stdin))
            record("skip_runtime", timed([PLUGIN], env=plugin_env("ADD", pod_ns.path, "default", "plain"),
                                         stdin=annotated))
            record("skip_api", timed([PLUGIN], env=plugin_env("ADD", pod_ns.path, "default", "plain"), stdin=stdin))
        finally:
            for namespace in (pod_ns, floor_ns, legacy_ns, floor_legacy_ns, native_ns, floor_native_ns):
                namespace.delete()

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
        ("DEL with rules, nft backend", "del", lambda i: samples["pass"][i] + samples["floor_save"][i]
         + samples["floor_removal"][i] + samples["floor_nft_delete"][i], "pass + save + removal + nft delete", 1.2),
        ("DEL with rules, legacy backend", "del_legacy", lambda i: samples["pass"][i]
         + samples["floor_legacy_save"][i] + samples["floor_legacy_removal"][i], "pass + save + removal", 1.2),
        ("DEL with rules, native nftables", "del_native", lambda i: samples["pass"][i]
         + samples["floor_native_list"][i] + samples["floor_native_delete"][i], "pass + nft list + nft delete", 1.2),
        ("DEL with rules, nft backend", "del", lambda i: samples["imports"][i] + samples["floor_save"][i]
         + samples["floor_removal"][i] + samples["floor_nft_delete"][i], "its imports + the same programs", None),
        ("DEL with rules, legacy backend", "del_legacy", lambda i: samples["imports"][i]
         + samples["floor_legacy_save"][i] + samples["floor_legacy_removal"][i], "its imports + the same programs",
         None),
        ("DEL with rules, native nftables", "del_native", lambda i: samples["imports_native"][i]
         + samples["floor_native_list"][i] + samples["floor_native_delete"][i], "its imports + the same programs",
         None),
        ("DEL with rules, nft backend", "del", lambda i: samples["pass"][i], "python -I -c pass", None),
        ("DEL with rules, legacy backend", "del_legacy", lambda i: samples["pass"][i], "python -I -c pass", None),
        ("DEL with rules, native nftables", "del_native", lambda i: samples["pass"][i], "python -I -c pass", None),
    ]
    print(f"rounds: {args.rounds}; medians in ms; API trip = {statistics.median(samples['api']):.1f} - "
          f"{statistics.median(samples['pass']):.1f} (python -I -c pass); the DEL's imports: "
          f"{statistics.median(samples['imports']):.1f} (iptables), {statistics.median(samples['imports_native']):.1f}"
          " (native)")
    for label, key, floor, floor_label, goal in rows:
        value, floor_ms, median_ratio = ratio(key, floor)
        verdict = "" if goal is None else ("  ok" if median_ratio <= goal else f"  OVER goal {goal}x")
        print(f"{label:<42} {value:7.1f} ms  vs {floor_label:<34} {floor_ms:7.1f} ms  {median_ratio:5.2f}x{verdict}")
    api.close()


if __name__ == "__main__":
    main()
