"""Apply time of --native-nftables next to iptables-restore, in one run (root; throwaway namespaces).

    .venv/bin/python bench/bench_nft.py

Two configurations: the injector's argv (REDIRECT, IPv4) and TPROXY + DNS capture with IPv6.
Every sample runs in a fresh network namespace, created and deleted outside the timing; the
timer runs inside the namespace (this script re-invoked under ``ip netns exec``), so namespace
entry costs are not counted. Whole runs compare ``--native-nftables`` with the iptables-restore
applier (issue 3) on each iptables backend; the apply step alone compares ``nft -f -`` with
``iptables-{nft,legacy}-restore --noflush`` of our dry-run text (one call per family). If Debian's
python3-nftables is installed, libnftables' binding is measured too (the road not taken).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from common import CLI, INJECTOR_ARGV, PYTHON

RUNS = 15
DEBIAN_BINDING = Path("/usr/lib/python3/dist-packages/nftables")
RESOLV_CONF = "nameserver 10.96.0.10\nnameserver fd00::10\n"
TPROXY_DNS_ARGV = ["-u", "1337", "-m", "TPROXY", "-b", "*", "-i", "*", "-d", "15090,15021,15020",
                   "--redirect-dns", "--enable-ipv6"]  # fmt: skip


def inside(method: str, work: Path, argv: list[str]) -> float:
    """One sample, taken inside the current (fresh) namespace; milliseconds."""
    start = time.perf_counter()
    if method == "libnftables":
        sys.path.insert(0, str(work / "binding"))
        import nftables  # type: ignore[import-not-found]

        rc, _out, err = nftables.Nftables().cmd((work / "script.nft").read_text())
        assert rc == 0, err
    elif method == "check+apply libnftables":
        sys.path.insert(0, str(work / "binding"))
        import nftables

        context = nftables.Nftables()
        context.set_json_output(True)
        assert context.cmd("list ruleset")[0] == 0
        context.set_json_output(False)
        rc, _out, err = context.cmd((work / "script.nft").read_text())
        assert rc == 0, err
    elif method == "check+apply nft":
        subprocess.run(["nft", "-j", "list", "ruleset"], check=True, capture_output=True)
        subprocess.run(["nft", "-f", work / "script.nft"], check=True)
    elif method == "nft -f -":
        subprocess.run(["nft", "-f", work / "script.nft"], check=True)
    elif method.startswith("iptables-"):
        backend = method.split("-")[1]
        for index, document in enumerate((work / "restore.txt").read_text().split("# ip6tables-restore\n")):
            program = f"{'iptables' if index == 0 else 'ip6tables'}-{backend}-restore"
            subprocess.run([program, "--noflush"], input=document, text=True, check=True)
    elif method == "istio-iptables --native-nftables":
        subprocess.run([*CLI, "--native-nftables", *argv], check=True, capture_output=True)
    elif method == "istio-iptables (restore applier, nft)":
        subprocess.run([*CLI, "--force-iptables-binary=nft", *argv], check=True, capture_output=True)
    elif method == "istio-iptables (restore applier, legacy)":
        subprocess.run([*CLI, "--force-iptables-binary=legacy", *argv], check=True, capture_output=True)
    else:
        raise ValueError(method)
    return (time.perf_counter() - start) * 1000


def sample(method: str, work: Path, argv: list[str]) -> float:
    name = f"iit-bench-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        result = subprocess.run(
            ["ip", "netns", "exec", name, PYTHON, __file__, "--inside", method, str(work), *argv],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        return float(result.stdout)
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def medians(methods: tuple[str, ...], work: Path, argv: list[str]) -> dict[str, float]:
    """Methods interleaved run by run, so a busy moment of the machine hits all of them alike."""
    samples: dict[str, list[float]] = {method: [] for method in methods}
    for _ in range(RUNS):
        for method in methods:
            samples[method].append(sample(method, work, argv))
    return {method: statistics.median(values) for method, values in samples.items()}


def fresh_namespace_script(dry_run: str) -> str:
    """What the CLI sends in a namespace without our tables: no deletions, a flush before first use."""
    lines = [line for line in dry_run.splitlines() if not line.startswith(("add table", "delete table"))]
    for table in dict.fromkeys(line.split()[3] for line in lines if line.startswith("add chain")):
        position = next(i for i, line in enumerate(lines) if line.startswith(f"add chain inet {table} "))
        lines[position:position] = [f"add table inet {table}", f"flush table inet {table}"]
    return "\n".join(lines) + "\n"


def prepare(work: Path, argv: list[str]) -> None:
    (work / "binding").mkdir(exist_ok=True)
    if DEBIAN_BINDING.is_dir() and not (work / "binding" / "nftables").exists():
        (work / "binding" / "nftables").symlink_to(DEBIAN_BINDING)
    for flag, name in (("--native-nftables", "script.nft"), ("", "restore.txt")):
        extra = [flag] if flag else []
        result = subprocess.run([*CLI, "--dry-run", *extra, *argv], check=True, capture_output=True, text=True)
        (work / name).write_text(result.stdout if flag == "" else fresh_namespace_script(result.stdout))


APPLY = ("nft -f -", "iptables-nft-restore", "iptables-legacy-restore")
WHOLE = ("istio-iptables --native-nftables", "istio-iptables (restore applier, nft)",
         "istio-iptables (restore applier, legacy)")  # fmt: skip
BINDING = ("libnftables", "check+apply nft", "check+apply libnftables")


def report(label: str, work: Path, times: dict[str, float]) -> None:
    nft_rules = (work / "script.nft").read_text().count("add rule")
    iptables_rules = sum(line.startswith("-A ") for line in (work / "restore.txt").read_text().splitlines())
    print(f"\n{label}: {nft_rules} nft rules / {iptables_rules} iptables rules; median of {RUNS} fresh namespaces")
    reference = times["nft -f -"]
    print("  apply step only (ratio: time / nft -f -)")
    for method in (*APPLY, *(("libnftables",) if "libnftables" in times else ())):
        name = "libnftables binding, cold (import + apply)" if method == "libnftables" else method
        print(f"    {name:<48} {times[method]:7.1f} ms  {times[method] / reference:5.2f}x")
    if "check+apply libnftables" in times:
        print("  state check (ruleset as JSON) + apply, as the CLI does them")
        for method in ("check+apply nft", "check+apply libnftables"):
            print(f"    {method:<48} {times[method]:7.1f} ms")
    print("  whole run, process start to exit (ratio: time / --native-nftables)")
    for method in WHOLE:
        print(f"    {method:<48} {times[method]:7.1f} ms  {times[method] / times[WHOLE[0]]:5.2f}x")


def main() -> None:
    with tempfile.TemporaryDirectory() as directory:
        work = Path(directory)
        (work / "resolv.conf").write_text(RESOLV_CONF)
        cases = {
            "injector argv (REDIRECT, IPv4)": [*INJECTOR_ARGV, "--disable-ipv6"],
            "TPROXY + DNS, IPv4+IPv6": [*TPROXY_DNS_ARGV, "--resolv-conf", str(work / "resolv.conf")],
        }
        methods = (*APPLY, *WHOLE, *(BINDING if DEBIAN_BINDING.is_dir() else ()))
        if not DEBIAN_BINDING.is_dir():
            print("(python3-nftables not installed: the libnftables binding is not measured)")
        for label, argv in cases.items():
            prepare(work, argv)
            report(label, work, medians(methods, work, argv))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--inside"]:
        print(inside(sys.argv[2], Path(sys.argv[3]), sys.argv[4:]))
    else:
        main()
