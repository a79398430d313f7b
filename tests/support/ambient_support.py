"""Ambient conformance data (../shared/conformance/ambient-cases.json) and helpers to load our dry
run and Istio's goldens into namespaces. Support code: no test imports a test."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.support.conformance import CONFORMANCE_DIR
from tests.support.netns import NetNS

CLI = [sys.executable, "-m", "istio_iptables"]


@dataclass(frozen=True)
class AmbientCase:
    name: str
    scope: str
    ipv6: bool
    argv: tuple[str, ...]
    argv_nftables: tuple[str, ...]
    golden_iptables: Path
    golden_nftables: Path


def load_ambient_cases() -> list[AmbientCase]:
    entries = json.loads((CONFORMANCE_DIR / "ambient-cases.json").read_text())
    return [
        AmbientCase(
            name=entry["name"],
            scope=entry["scope"],
            ipv6=entry["ipv6"],
            argv=tuple(entry["argv"]),
            argv_nftables=tuple(entry["argv_nftables"]),
            golden_iptables=CONFORMANCE_DIR / entry["golden_iptables"],
            golden_nftables=CONFORMANCE_DIR / entry["golden_nftables"],
        )
        for entry in entries
    ]


def split_dry_run(text: str) -> tuple[str, list[str]]:
    """(the ipset restore input, or "", [the IPv4 restore document, the IPv6 one]) of an iptables dry run."""
    sets = ""
    match = re.search(r"(?ms)^# ipset restore\n(.*?)(?=^# ip6?tables-restore$)", text)
    if match:
        sets = match.group(1)
    return sets, re.split(r"(?m)^(?=# ip6?tables-restore$)", text)[1:]


def probe_ipsets(ipv6: bool) -> str:
    """``ipset restore`` input creating the probe sets as Istio does (hash:ip with comments)."""
    lines = ["create istio-inpod-probes-v4 hash:ip family inet comment -exist"]
    if ipv6:
        lines.append("create istio-inpod-probes-v6 hash:ip family inet6 comment -exist")
    return "\n".join(lines) + "\n"


def probe_nft_sets(ipv6: bool) -> str:
    """Istio's host_sets.go: the probe sets of ``inet istio-ambient-nat``, created before the rules."""
    comment = '"ambient pods: kubelet probes are SNATed"'
    lines = ["add table inet istio-ambient-nat",
             f"add set inet istio-ambient-nat istio-inpod-probes-v4 {{ type ipv4_addr ; comment {comment} ; }}"]
    if ipv6:
        lines.append(f"add set inet istio-ambient-nat istio-inpod-probes-v6 {{ type ipv6_addr ; comment {comment} ; }}")
    return "\n".join(lines) + "\n"


def dry_run(namespace: NetNS | None, *argv: str) -> str:
    import subprocess

    command = [*CLI, *argv[:1], "--dry-run", *argv[1:]]
    if namespace is None:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    else:
        result = namespace.run(*command, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


def nft_listing(namespace: NetNS) -> list[str]:
    text = namespace.run("nft", "list", "ruleset").stdout
    return [re.sub(r"counter packets \d+ bytes \d+", "counter", line) for line in text.splitlines() if line.strip()]


# --- live traffic: the sidecar test bed with a ztunnel stand-in instead of the sidecar proxy ----------

ZTUNNEL_MARK = 0x539
ZTUNNEL_PORTS = {"outbound": 15001, "inbound": 15006, "hbone": 15008, "dns": 15053}


def _ambient_bed_class() -> type:
    """:class:`AmbientTestbed`, built on :class:`tests.beds.testbed.Testbed` (imported lazily: rootless tests
    importing this module need none of the bed)."""
    from dataclasses import dataclass

    from tests.beds.testbed import APP_PORT, APP_UID, FAMILIES, REMOTE_PORTS, Testbed, _node

    @dataclass
    class AmbientTestbed(Testbed):
        """The pod runs ``app`` and ``ztunnel`` (every socket marked 0x539, as ztunnel's are); rules come
        from our ``ambient --dry-run``, loaded test-side (iptables-restore / nft -f) until the engine applies them.
        ``remote`` doubles as the node: it is the pod's gateway, so the host rules' SNAT is undone there."""

        __test__ = False

        def _start_nodes(self) -> None:
            everywhere = ["0.0.0.0", "::"]
            ztunnel = {
                "name": "ztunnel",
                "mark": ZTUNNEL_MARK,
                "listeners": [
                    {"port": ZTUNNEL_PORTS["outbound"], "kind": "outbound"},
                    # ztunnel connects to the app itself (marked), not from Envoy's 127.0.0.6.
                    {"port": ZTUNNEL_PORTS["inbound"], "kind": "inbound", "passthrough_bind": False},
                    {"port": ZTUNNEL_PORTS["hbone"], "kind": "echo"},
                    {"port": ZTUNNEL_PORTS["dns"], "kind": "dns", "addresses": ["127.0.0.1", "::1"]},
                ],
            }
            remote_addresses = [address for family in FAMILIES for address in family.remote_addresses()]
            remote = {
                "name": "remote",
                "listeners": [
                    *({"port": port, "kind": "echo", "addresses": everywhere} for port in REMOTE_PORTS),
                    {"port": 53, "kind": "dns", "addresses": remote_addresses},
                ],
            }
            app = {"name": "app", "listeners": [{"port": APP_PORT, "kind": "echo"}]}
            self.nodes = {
                "ztunnel": _node(self.pod, ztunnel, uid=1337, caps=("net_admin",)),
                "app": _node(self.pod, app, uid=APP_UID),
                "remote": _node(self.remote, remote),
            }
            for node in self.nodes.values():
                node.ready.result(timeout=10)

        def _environment(self) -> dict[str, str]:
            import os
            import tempfile

            # Our own xtables lock: other people's tests never wait on ours (tests/support/netns.py's advice).
            lock = os.path.join(tempfile.gettempdir(), f"xtables-{self.pod.name}.lock")
            return {"XTABLES_LOCKFILE": lock}

        def load(self, *argv: str, namespace: NetNS | None = None) -> str:
            """Load ``istio-iptables ambient --dry-run ARGV`` into the pod (or ``namespace``) on this bed's
            backend, with the policy routing it lists; returns the dry run."""
            target = namespace or self.pod
            native = self.backend == "native-nftables"
            text = dry_run(None, "ambient", *(["--native-nftables"] if native else []), *argv)
            for line in text.splitlines():
                if line.startswith("#   ip "):
                    target.run(*line[4:].split())
            if native:
                target.run("nft", "-f", "-", input=text)
                return text
            sets, documents = split_dry_run(text)
            if sets:
                target.run("ipset", "restore", input=sets)
            for index, document in enumerate(documents):
                program = f"{'ip6tables' if index else 'iptables'}-{self.backend}-restore"
                target.run(program, "--noflush", input=document, env=self._environment())
            return text

        def unload(self, namespace: NetNS | None = None) -> None:
            """Remove every rule of the namespace (test namespaces hold only ours)."""
            target = namespace or self.pod
            if self.backend == "native-nftables":
                target.run("nft", "flush", "ruleset")
                return
            for program in ("iptables", "ip6tables"):
                for table in ("mangle", "nat", "raw"):
                    for action in ("-F", "-X"):
                        target.run(f"{program}-{self.backend}", "-t", table, action, env=self._environment())

        def enrol_probe_addresses(self, addresses: list[str]) -> None:
            """What the node agent does per pod: its addresses into the node's probe sets."""
            for address in addresses:
                v6 = ":" in address
                if self.backend == "native-nftables":
                    name = "istio-inpod-probes-v6" if v6 else "istio-inpod-probes-v4"
                    self.remote.run("nft", "add", "element", "inet", "istio-ambient-nat", name, f"{{ {address} }}")
                else:
                    name = "istio-inpod-probes-v6" if v6 else "istio-inpod-probes-v4"
                    self.remote.run("ipset", "add", name, address, "comment", "pod-uid", "-exist")

    return AmbientTestbed


def ambient_testbed(backend: str, make_namespace: object) -> object:
    return _ambient_bed_class()(backend=backend, make_namespace=make_namespace)  # type: ignore[arg-type]
