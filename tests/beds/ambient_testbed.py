"""The sidecar test bed (:mod:`tests.beds.testbed`) with a ztunnel stand-in instead of the sidecar proxy,
for ambient capture with live traffic (root only). Same namespaces, wiring, app and remote side; only
the pod's proxy differs, and the rules come from ``istio-iptables ambient --dry-run``."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any

from tests.beds.testbed import Testbed
from tests.support.ambient_support import dry_run, split_dry_run
from tests.support.netns import NetNS

ZTUNNEL_MARK = 0x539
ZTUNNEL_PORTS = {"outbound": 15001, "inbound": 15006, "hbone": 15008, "dns": 15053}


@dataclass
class AmbientTestbed(Testbed):
    """The pod runs ``app`` and ``ztunnel`` (every socket marked 0x539, as ztunnel's are); rules come
    from our ``ambient --dry-run``, loaded test-side (iptables-restore / nft -f) until the engine applies them.
    ``remote`` doubles as the node: it is the pod's gateway, so the host rules' SNAT is undone there."""

    __test__ = False

    def _proxy_node(self) -> dict[str, Any]:
        return {
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

    def _environment(self) -> dict[str, str]:
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
            name = "istio-inpod-probes-v6" if ":" in address else "istio-inpod-probes-v4"
            if self.backend == "native-nftables":
                self.remote.run("nft", "add", "element", "inet", "istio-ambient-nat", name, f"{{ {address} }}")
            else:
                self.remote.run("ipset", "add", name, address, "comment", "pod-uid", "-exist")
