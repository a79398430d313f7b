#!/usr/bin/env python3
"""The demo: Istio's default sidecar rules in a throwaway pod, and where live traffic lands (root).

Creates a pod namespace (an app as uid 1000, a stand-in Envoy as uid 1337 on 15001/15006) and a
"remote" namespace, applies the injector's default rules with istio-iptables, sends the sidecar's
kinds of traffic over IPv4 and IPv6, prints where each connection landed, then removes everything.
Exit status 0 when every connection landed where Istio's design sends it, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.beds.testbed import FAMILIES, Landing, Testbed, injector_args
from tests.beds.traffic_paths import SIDECAR_PATHS

LISTENERS = {
    "proxy:15001": "envoy:15001 (outbound)",
    "proxy:15006": "envoy:15006 (inbound)",
    "proxy:15008": "envoy:15008 (tunnel)",
    "proxy:15090": "envoy:15090 (stats)",
    "proxy:15021": "envoy:15021 (health)",
    "proxy:15020": "agent:15020 (status)",
}
REQUIRED = ("ip", "setpriv")


def describe(landing: Landing) -> str:
    if not landing.hops:
        return f"nowhere ({landing.error})"
    return " -> ".join(LISTENERS.get(hop.listener, hop.listener) for hop in landing.hops)


def table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("nft", "legacy"), default="nft", help="iptables backend (nft)")
    parser.add_argument("--mode", choices=("REDIRECT", "TPROXY"), default="REDIRECT",
                        help="inbound interception mode (REDIRECT, the injector's default)")
    parser.add_argument("--ambient", action="store_true",
                        help="ambient mode instead: a ztunnel stand-in (mark 0x539) and the node agent's rules")
    parser.add_argument("--native", action="store_true", help="with --ambient: native nftables")
    options = parser.parse_args()
    if os.geteuid() != 0:
        print("demo: needs root (it creates network namespaces): sudo make demo", file=sys.stderr)
        return 2
    missing = [tool for tool in (*REQUIRED, f"iptables-{options.backend}-restore") if shutil.which(tool) is None]
    if missing:
        print(f"demo: missing {', '.join(missing)} (apt-get install iptables iproute2 util-linux)", file=sys.stderr)
        return 2

    if options.ambient:
        return ambient_demo("native-nftables" if options.native else options.backend)
    started = time.monotonic()
    args = injector_args(options.mode)
    with Testbed(backend=options.backend, mode=options.mode) as bed:
        print(f"pod namespace {bed.pod.name}: app (uid 1000) on :8080, stand-in Envoy (uid 1337) on :15001/:15006")
        print(f"  pod {bed.v4.pod} / {bed.v6.pod}, remote side {bed.v4.remote} / {bed.v6.remote}\n")
        bed.apply(args)
        dumps = [bed.pod.save(f"{program}-{options.backend}-save") for program in ("iptables", "ip6tables")]
        rules = sum(line.startswith("-A ") for dump in dumps for line in dump.splitlines())
        print(f"# istio-iptables {shlex.join(args)}")
        print(f"  {rules} rules (IPv4 + IPv6), {options.backend} backend\n")

        cases = [(path, family) for path in SIDECAR_PATHS for family in FAMILIES]
        landings = bed.send([path.probe(family) for path, family in cases])
        rows = [("traffic (T1-T6: Istio's sidecar traffic types)", "to", "landed on", "original dst", "check")]
        failures = 0
        for (path, family), landing in zip(cases, landings, strict=True):
            probe = path.probe(family)
            expect = path.expect(family, options.mode)
            problems = expect.mismatches(landing)
            failures += bool(problems)
            if landing.path != expect.path:
                problems = [f"want {' -> '.join(LISTENERS.get(hop, hop) for hop in expect.path)}"]
            captured = landing.hops and landing.hops[0].port in (15001, 15006)
            rows.append((
                path.name if family.version == 4 else "",
                f"[{probe.host}]:{probe.port}" if ":" in probe.host else f"{probe.host}:{probe.port}",
                describe(landing),
                (landing.original_dst or "") if captured else "-",
                "ok" if not problems else "WRONG: " + "; ".join(problems),
            ))
        print(table(rows))
    elapsed = time.monotonic() - started
    print(f"\n{len(cases) - failures}/{len(cases)} connections landed where Istio sends them "
          f"({elapsed:.1f} s); namespaces removed.")
    return 1 if failures else 0


def ambient_demo(backend: str) -> int:
    """Ambient capture with live traffic: the pod's rules, then the node's probe SNAT (docs/ambient.md)."""
    from tests.beds.ambient_testbed import AmbientTestbed
    from tests.beds.testbed import APP_PORT, Probe
    from tests.support.netns import NetNS

    started = time.monotonic()
    left = ""
    bed = AmbientTestbed(backend=backend, make_namespace=NetNS)
    try:
        print(f"pod namespace {bed.pod.name}: app (uid 1000) on :8080, ztunnel stand-in (SO_MARK 0x539) on "
              f":15001/:15006/:15008/:15053; the remote namespace doubles as the node\n")
        pod_args = ["--redirect-dns", "--enable-ipv6"]
        bed.load(*pod_args)
        print(f"# istio-iptables ambient --network-namespace {bed.pod.name} {shlex.join(pod_args)}"
              f"  (applied, {backend})")
        kinds = [
            ("app -> remote service (outbound)", lambda f: Probe("app", f.service, 80), ("ztunnel:15001", "remote:80")),
            ("remote -> the app's port (inbound)", lambda f: Probe("remote", f.pod, APP_PORT),
             ("ztunnel:15006", f"app:{APP_PORT}")),
            ("remote -> 15008 (HBONE)", lambda f: Probe("remote", f.pod, 15008), ("ztunnel:15008",)),
            ("ztunnel's own connection", lambda f: Probe("ztunnel", f.service, 80), ("remote:80",)),
            ("app -> itself over lo", lambda f: Probe("app", f.pod, APP_PORT), (f"app:{APP_PORT}",)),
            ("app DNS query (udp 53)", lambda f: Probe("app", f.dns, 53, op="dns", proto="udp"), ("ztunnel:15053",)),
        ]
        cases = [(name, family, make(family), want) for name, make, want in kinds for family in FAMILIES]
        landings = bed.send([probe for _name, _family, probe, _want in cases])
        host_args = ["--host", "--enable-ipv6", *(["--kubelet-uid", "0"] if backend == "native-nftables" else []),
                     "--enrol", ",".join(f.pod for f in FAMILIES), "--pod-uid", "demo-pod"]
        bed.load(*host_args, namespace=bed.remote)
        print(f"# istio-iptables ambient --network-namespace {bed.remote.name} {shlex.join(host_args)}"
              "  (applied in the node)\n")
        probes = [("kubelet probe from the node (SNATed)", family, Probe("remote", family.pod, APP_PORT),
                   (f"app:{APP_PORT}",)) for family in FAMILIES]
        cases += probes
        landings += bed.send([probe for _name, _family, probe, _want in probes])
        rows = [("traffic (ambient)", "to", "landed on", "seen from", "check")]
        failures = 0
        for (name, family, probe, want), landing in zip(cases, landings, strict=True):
            ok = landing.path == want if probe.op == "tcp" else landing.listener == want[0]
            failures += not ok
            rows.append((name if family.version == 4 else "",
                         f"[{probe.host}]:{probe.port}" if ":" in probe.host else f"{probe.host}:{probe.port}",
                         describe(landing), landing.hops[0].peer_host if landing.hops else "-",
                         "ok" if ok else f"WRONG: want {' -> '.join(want)}"))
        print(table(rows))
        bed.unload(bed.remote)  # the node's rules and probe sets, then the pod's rules and policy routing
        bed.unload()
        left = leftovers(bed, backend)
        print(f"\n# istio-iptables ambient --cleanup-only, in the node and in the pod: {left or 'nothing of ours'}")
    finally:
        bed.close()
    print(f"\n{len(cases) - failures}/{len(cases)} connections landed where Istio's ambient design sends them "
          f"({time.monotonic() - started:.1f} s); namespaces removed.")
    return 1 if failures or left else 0


def leftovers(bed: Any, backend: str) -> str:
    """What of ambient's rules, policy routing and probe sets is still in the pod or the node."""
    found = []
    for namespace in (bed.pod, bed.remote):
        if backend == "native-nftables":
            text = namespace.run("nft", "list", "tables").stdout
        else:
            text = "".join(namespace.run(f"{program}-{backend}-save", env=bed._environment()).stdout
                           for program in ("iptables", "ip6tables"))
        text += namespace.run("ip", "rule").stdout + namespace.run("ipset", "list", "-n", check=False).stdout
        found += [f"{namespace.name}: {word}" for word in ("ISTIO_", "istio-ambient", "0x111", "istio-inpod")
                  if word in text]
    return ", ".join(found)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        print(f"demo: could not set up the throwaway pod: {error}", file=sys.stderr)
        sys.exit(2)
