"""Speed and scale, side by side in one run (docs/speed.md explains every row).

    sudo .venv/bin/python bench/bench_speed.py [--rounds 15] [--sizes 0,100,1000,10000] [--skip-scale|--only-scale]

(a) init run: the injector's argv applied in a fresh namespace, against the floor (python with
    click + one iptables-restore of the same text per family) and against bare Python;
(a2) the same for ambient: ``istio-iptables ambient`` (a pod's rules and in-pod policy routing, as the
    node agent asks for them) applied in a fresh namespace, against the same kind of floor, measured
    in the same rounds as (a) so the two read side by side;
(b) the same for TPROXY + DNS capture (floor: python with click + restore: the policy routes go over
    raw rtnetlink, no pyroute2 any more);
(c) dry run against ``python -I -c 'import click'``;
(d) N excluded CIDRs and N included ports: load time and per-new-connection cost, our rules
    (sets above the threshold) against one rule per entry, on both iptables backends and with
    native nftables (``--native-nftables``: named sets in our tables, one ``nft -f`` transaction).
Process timings are medians over interleaved rounds, so a busy machine slows all sides alike.
"""

from __future__ import annotations

import argparse
import ctypes
import ipaddress
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from common import CLI, INJECTOR_ARGV, PYTHON, REPO

sys.path.insert(0, str(REPO))
from istio_iptables.config.sidecar import Config, RawSettings, Setting, parse
from istio_iptables.engine.xtables import apply
from istio_iptables.policy.sidecar_xtables import build_plan
from istio_iptables.system.netns import entered
from istio_iptables.xtables.model import Plan, RuleSet
from istio_iptables.xtables.render import render_documents
from tests.support.netns import NetNS

try:
    try:
        from istio_iptables.engine.nft import NftForm
        from istio_iptables.engine.seam import real_system

        def run_nftables(config: Config, out: object, plan: Plan) -> None:
            NftForm(config, real_system()).apply(plan)
    except ImportError:  # before the engine refactor (issue 13)
        from istio_iptables.engine.nft import run_nftables  # type: ignore[no-redef]
    from istio_iptables.nft.render import render_script
    from istio_iptables.policy.sidecar_nft import build_nft_ruleset

    BACKENDS: tuple[str, ...] = ("legacy", "nft", "native")
except ImportError:  # a tree from before the native nftables backend
    BACKENDS = ("legacy", "nft")
try:
    from istio_iptables.policy.lists import SET_THRESHOLD, render_ipset_document

    try:
        from istio_iptables.engine.xtables import plan_for_this_host
    except ImportError:  # before the engine refactor (issue 13)
        from istio_iptables.system.ipset import plan_for_this_host  # type: ignore[no-redef]
except ImportError:  # a tree from before sets (to print the "before" figures): one rule per entry only
    SET_THRESHOLD = 10**9

    def render_ipset_document(rulesets: Sequence[RuleSet]) -> str:
        return ""

    def plan_for_this_host(config: Config, plan: Plan) -> Plan:
        return plan

CLONE_NEWNET = 0x40000000
POD_ADDRESS = "10.1.2.3/24"  # what a pod's eth0 holds: IPv4 only, so one family
RESOLV_CONF = "nameserver 10.96.0.10\nsearch default.svc.cluster.local\n"
TPROXY_DNS_ARGV = [*("TPROXY" if arg == "REDIRECT" else arg for arg in INJECTOR_ARGV), "--redirect-dns"]
# What Istio's node agent asks for an IPv4 pod with DNS capture on (AMBIENT_DNS_CAPTURE, on by default).
AMBIENT_ARGV = ["ambient", "--redirect-dns", "--disable-ipv6", "--log_output_level=default:info"]
# The per-connection probe: one process that enters each namespace in turn (interleaved rounds,
# so load on the machine hits every variant alike) and times new TCP connections to 192.0.2.10:80,
# which the rules REDIRECT to a stand-in proxy on 15001 in the same namespace. Bounded: ROUNDS x
# CONNECTIONS per namespace.
CONNECTIONS, ROUNDS = 200, 15
CONNECT_LOOP = """
import ctypes, gc, os, socket, struct, sys, time
libc = ctypes.CDLL(None, use_errno=True)
os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})  # one CPU: no migrations mid-batch
gc.disable()
count, rounds, paths = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
fds = [os.open(path, os.O_RDONLY) for path in paths]
def enter(fd):
    if libc.setns(fd, 0x40000000) != 0:
        raise OSError(ctypes.get_errno(), "setns")
listeners = []
for fd in fds:
    enter(fd)
    listeners.append(socket.create_server(("0.0.0.0", 15001), backlog=128))
linger = struct.pack("ii", 1, 0)  # close with RST: no TIME_WAIT pile-up
best = [float("inf")] * len(fds)
for _ in range(rounds):
    for index, fd in enumerate(fds):
        enter(fd)
        start = time.perf_counter()
        for _ in range(count):
            client = socket.socket()
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            client.connect(("192.0.2.10", 80))  # not excluded, not an included port: walks every rule
            server, _ = listeners[index].accept()
            server.close()
            client.close()
        best[index] = min(best[index], (time.perf_counter() - start) / count)
print(" ".join(f"{cost * 1e6:.3f}" for cost in best))
"""
_libc = ctypes.CDLL(None, use_errno=True)


# --- running processes ---------------------------------------------------------------------


@dataclass
class Step:
    argv: Sequence[str]
    input: str | None = None
    env: dict[str, str] | None = None


@dataclass
class Job:
    """One whole-process measurement: its steps run one after another, in a fresh namespace or not."""

    label: str
    steps: list[Step]
    fresh_namespace: bool = False
    check: Step | None = None  # run once after the first run, in its namespace: did it do its job?
    walls: list[float] = field(default_factory=list)
    peak_rss_kb: int = 0
    failure: str | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.walls)

    def ratio(self, reference: Job) -> float:
        """The median of per-round ratios: both sides of a round met the same load on the machine."""
        return statistics.median(mine / theirs for mine, theirs in zip(self.walls, reference.walls, strict=True))


def make_pod_namespace(address: str = POD_ADDRESS) -> NetNS:
    """A namespace with an ``eth0`` holding ``address`` (a veth: not every kernel has dummy links)."""
    namespace = NetNS("iit-bench")
    try:
        namespace.run("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0-peer")
        namespace.run("ip", "addr", "add", address, "dev", "eth0")
        for link in ("eth0", "eth0-peer"):
            namespace.run("ip", "link", "set", link, "up")
    except BaseException:
        namespace.delete()
        raise
    return namespace


def spawn(step: Step, namespace: NetNS | None) -> tuple[float, int, str]:
    """Wall ms, exit status and stderr of one process, entered into ``namespace``."""
    enter: Callable[[], None] | None = None
    if namespace is not None:
        fd = os.open(namespace.path, os.O_RDONLY)

        def enter() -> None:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                os._exit(127)

    with tempfile.TemporaryFile("w+") as stdin, tempfile.TemporaryFile("w+") as stderr:
        stdin.write(step.input or "")
        stdin.flush()
        stdin.seek(0)
        env = {**os.environ, **step.env} if step.env else None
        start = time.perf_counter()
        process = subprocess.Popen(
            step.argv, stdin=stdin, stdout=subprocess.DEVNULL, stderr=stderr, env=env, preexec_fn=enter
        )
        _, status, _usage = os.wait4(process.pid, 0)
        wall = (time.perf_counter() - start) * 1000
        process.returncode = os.waitstatus_to_exitcode(status)
        stderr.seek(0)
        message = stderr.read()
    if namespace is not None:
        os.close(fd)
    return wall, process.returncode, message


# A process forked from this bench starts with the bench's own pages, and the kernel's peak RSS
# (ru_maxrss) survives exec: measured directly, every step would report at least the bench's size.
# So the peak is measured once, in a grandchild: a small launcher forks and execs the step.
RSS_LAUNCHER = (
    "import os, sys\n"
    "pid = os.fork()\n"
    "if pid == 0:\n"
    "    os.execvp(sys.argv[1], sys.argv[1:])\n"
    "_, status, usage = os.wait4(pid, 0)\n"
    "print(f'peak-rss-kb {usage.ru_maxrss}', file=sys.stderr)\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


def measure_peak_rss(job: Job) -> None:
    """The largest peak RSS of the job's steps, each run once through the launcher."""
    namespace = make_pod_namespace() if job.fresh_namespace else None
    try:
        for step in job.steps:
            launched = Step([sys.executable, "-I", "-S", "-c", RSS_LAUNCHER, *step.argv], step.input, step.env)
            _wall, code, message = spawn(launched, namespace)
            peaks = [line.split()[1] for line in message.splitlines() if line.startswith("peak-rss-kb ")]
            if code == 0 and peaks:
                job.peak_rss_kb = max(job.peak_rss_kb, int(peaks[-1]))
    finally:
        if namespace is not None:
            namespace.delete()


def run_job(job: Job, *, check: bool = False) -> None:
    if job.failure:
        return
    namespace = make_pod_namespace() if job.fresh_namespace else None
    try:
        total = 0.0
        for step in [*job.steps, *([job.check] if check and job.check else [])]:
            wall, code, message = spawn(step, namespace)
            if code != 0:
                job.failure = message.strip().splitlines()[-1] if message.strip() else f"exit {code}"
                return
            if step is not job.check:
                total += wall
        job.walls.append(total)
    finally:
        if namespace is not None:
            namespace.delete()


def measure(jobs: list[Job], rounds: int) -> None:
    for job in jobs:  # warm the page cache, and find jobs that fail or do not do their job
        run_job(job, check=True)
        job.walls.clear()
        if not job.failure:
            measure_peak_rss(job)
    for _ in range(rounds):
        for job in jobs:
            run_job(job)
    for job in jobs:
        if not job.failure and len(job.walls) != rounds:
            raise RuntimeError(f"{job.label}: failed in a later round")


# --- configurations ------------------------------------------------------------------------


class BenchHost:
    def user_uid(self, name: str) -> int | None:
        return 1337

    def group_exists(self, name: str) -> bool:
        return True

    def addresses(self) -> list:
        return []

    def read_text(self, path: str) -> str:
        return RESOLV_CONF


def config_for(values: dict[str, str]) -> Config:
    """Settings parsed in-process: 10 000 CIDRs do not fit in one argv string (128 KiB at most)."""
    raw = RawSettings(values={name: Setting(value, name) for name, value in values.items()}, enable_ipv6=False)
    return parse(raw, BenchHost())


def plan_text(values: dict[str, str], backend: str = "") -> str:
    """What the dry run would print for these settings; for native nftables, the ``nft -f`` script
    an apply sends into a namespace without our tables (the dry run's also deletes them: ~10 ms each)."""
    if backend == "native":
        return render_script(build_nft_ruleset(config_for(values)), present=())
    plan = build_plan(config_for(values))
    return render_ipset_document(plan.rulesets) + render_documents(plan.rulesets)


def sections(printed: str) -> list[tuple[str, str]]:
    """The dry run's documents: [(program, text)], ipset first as it must be loaded first."""
    found: list[tuple[str, list[str]]] = []
    for line in printed.splitlines():
        if line.startswith("# "):
            found.append((line[2:], []))
        else:
            found[-1][1].append(line)
    return [(program, "\n".join(lines) + "\n") for program, lines in found]


def dry_run_text(argv: Sequence[str], env: dict[str, str] | None = None, dry_run_flag: bool = True) -> str:
    namespace = make_pod_namespace()
    try:
        return namespace.run(*CLI, *(["--dry-run"] if dry_run_flag else []), *argv, env=env).stdout
    finally:
        namespace.delete()


def ambient_floor_steps(argv: Sequence[str]) -> tuple[list[Step], list[Step]]:
    """The restores of ``ambient --dry-run`` (one per family), and the policy routing it lists as
    ``ip`` commands (shown beside the floor: the floor itself is the restores alone, as for (a))."""
    from tests.support.ambient_support import split_dry_run

    printed = dry_run_text([argv[0], "--dry-run", *argv[1:]], dry_run_flag=False)
    _sets, documents = split_dry_run(printed)
    restores = [Step([f"{'ip6tables' if index else 'iptables'}-restore", "--noflush"], document)
                for index, document in enumerate(documents)]
    routing = [Step(line[4:].split()) for line in printed.splitlines() if line.startswith("#   ip ")]
    return restores, routing


def restore_steps(printed: str, backend: str | None) -> list[Step]:
    steps = []
    for program, text in sections(printed):
        if program == "ipset restore":
            steps.append(Step(["ipset", "restore"], text))
        else:
            binary = program if backend is None else program.replace("-restore", f"-{backend}-restore")
            steps.append(Step([binary, "--noflush"], text))
    return steps


# --- report --------------------------------------------------------------------------------


def ratio(job: Job, reference: Job) -> str:
    if job.failure or reference.failure:
        return "  pending" if job.failure else "      n/a"
    return f"{job.ratio(reference):8.2f}x"


def report_process_jobs(title: str, subject: Job, references: list[Job], goal: str) -> None:
    print(f"\n{title}")
    for job in [subject, *references]:
        shown = f"{job.median:7.1f} ms" if not job.failure else f"pending ({job.failure[:70]})"
        print(f"  {job.label:<60} {shown}")
    for reference in references:
        print(f"  {'  ratio vs ' + reference.label.split(':')[0]:<60} {ratio(subject, reference)}")
    if not subject.failure and subject.peak_rss_kb:
        print(f"  {'  peak RSS':<60} {subject.peak_rss_kb / 1024:7.1f} MiB")
    print(f"  goal: {goal}")


def process_section(rounds: int) -> None:
    version = subprocess.run(["iptables-restore", "--version"], capture_output=True, text=True, check=True).stdout
    restore = f"iptables-restore {version.split()[-1]}"  # e.g. "(nf_tables)": the system's default backend
    has_rules = "for b in nft legacy; do iptables-$b-save | grep -q ISTIO_OUTPUT && exit 0; done; exit 1"
    applied = Step(["sh", "-c", has_rules])
    routed = Step(["sh", "-c", "ip rule | grep -q 'lookup 133'"])
    dns_env = {"ISTIO_META_DNS_CAPTURE": "true"}
    with tempfile.NamedTemporaryFile("w", suffix=".resolv.conf", delete=False) as resolv:
        resolv.write(RESOLV_CONF)
    tproxy_argv = [*TPROXY_DNS_ARGV, "--resolv-conf", resolv.name]
    injector_text = dry_run_text(INJECTOR_ARGV)
    tproxy_text = dry_run_text(tproxy_argv, dns_env)

    python_pass = Job("python -I -c pass", [Step([PYTHON, "-I", "-c", "pass"])])
    click = Job("python -I -c 'import click'", [Step([PYTHON, "-I", "-c", "import click"])])
    init = Job("istio-iptables <injector argv> (apply, fresh ns)", [Step([*CLI, *INJECTOR_ARGV])], True, applied)
    init_floor = Job(
        f"floor: import click + {restore} of that text",
        [Step([PYTHON, "-I", "-c", "import click"]), *restore_steps(injector_text, None)],
        True,
    )
    tproxy = Job(
        "istio-iptables <TPROXY+DNS argv> (apply, fresh ns)", [Step([*CLI, *tproxy_argv], env=dns_env)], True, routed
    )
    tproxy_floor = Job(
        f"floor: import click + {restore} of that text",
        [Step([PYTHON, "-I", "-c", "import click"]), *restore_steps(tproxy_text, None)],
        True,
    )
    dry = Job("istio-iptables --dry-run <injector argv>", [Step([*CLI, "--dry-run", *INJECTOR_ARGV])])
    ambient_restores, ambient_routing = ambient_floor_steps(AMBIENT_ARGV)
    ambient_routed = Step(["sh", "-c", f"{has_rules} && ip rule | grep -q 'fwmark 0x111/0xfff lookup 100'"])
    ambient = Job(f"istio-iptables {' '.join(AMBIENT_ARGV[:3])} (apply, fresh ns)", [Step([*CLI, *AMBIENT_ARGV])],
                  True, ambient_routed)
    ambient_floor = Job(
        f"floor: import click + {restore} of that text",
        [Step([PYTHON, "-I", "-c", "import click"]), *ambient_restores],
        True,
    )
    ambient_floor_ip = Job(
        f"floor + {len(ambient_routing)} ip commands of its policy routing",
        [Step([PYTHON, "-I", "-c", "import click"]), *ambient_restores, *ambient_routing],
        True,
    )
    measure([python_pass, click, init, init_floor, ambient, ambient_floor, ambient_floor_ip, tproxy, tproxy_floor,
             dry], rounds)
    os.unlink(resolv.name)

    report_process_jobs("(a) init run", init, [init_floor, python_pass], "<= 1.25x floor, peak RSS <= 30 MiB")
    report_process_jobs("(a2) ambient init run (node agent's in-pod rules + policy routing), same rounds as (a)",
                        ambient, [ambient_floor, ambient_floor_ip, init, python_pass],
                        "<= 1.25x floor (issue 14); beside the sidecar's (a)")
    report_process_jobs("(b) init run, TPROXY + DNS capture", tproxy, [tproxy_floor, python_pass], "<= 1.25x floor")
    report_process_jobs("(c) dry run", dry, [click, python_pass], "<= 1.2x import click")


def scattered_cidrs(count: int) -> list[str]:
    """``count`` distinct CIDRs of mixed lengths, spread like cloud address lists (fixed seed).

    Mixed lengths matter: a hash:net set probes once per prefix length it holds. None covers the
    probe's destination 192.0.2.10 or loopback.
    """
    generator = random.Random(7)
    found: dict[str, None] = {}
    while len(found) < count:
        prefix = generator.choice((16, 20, 24, 28, 32))
        first = generator.choice([octet for octet in range(11, 192) if octet != 127])
        address = (first << 24) | generator.getrandbits(24)
        found.setdefault(str(ipaddress.ip_network((address, prefix), strict=False)))
    return list(found)


def scale_values(count: int) -> dict[str, str]:
    ports = ",".join(str(port) for port in range(20000, 20000 + count))
    return {
        "proxy_uid": "1337", "istio_service_cidr": "*", "istio_inbound_ports": "*",
        "istio_local_exclude_ports": "15090,15021,15020",
        "istio_service_exclude_cidr": ",".join(scattered_cidrs(count)), "istio_outbound_ports": ports,
    }  # fmt: skip


@dataclass
class Variant:
    backend: str
    count: int
    form: str
    values: dict[str, str]
    printed: str
    loads: list[float] = field(default_factory=list)
    applies: list[float] = field(default_factory=list)
    namespace: NetNS | None = None
    cost_us: float = 0.0

    @property
    def rules(self) -> int:
        return sum(line.startswith(("-A", "-I", "add rule", "insert rule")) for line in self.printed.splitlines())

    def load(self, namespace: NetNS) -> float:
        """Milliseconds to load the ipsets (if any) and the rules into ``namespace``, as an applier would."""
        total = 0.0
        native = [Step(["nft", "-f", "-"], self.printed)]
        for step in native if self.backend == "native" else restore_steps(self.printed, self.backend):
            wall, code, message = spawn(step, namespace)
            if code != 0:
                raise RuntimeError(f"{step.argv[0]} failed: {message.strip()}")
            total += wall
        return total

    def apply(self, namespace: NetNS) -> float:
        """Milliseconds of the whole apply engine (backend detection, ipsets, rules) in ``namespace``."""
        if self.backend == "native":
            config = replace(config_for(self.values), native_nftables=True)
            plan = build_plan(config)  # as for the iptables backends: the engine gets the plan
            with entered(namespace.path):
                started = time.perf_counter()
                run_nftables(config, sys.stdout, plan)
                return (time.perf_counter() - started) * 1000
        config = config_for({**self.values, "force_iptables_binary": self.backend})
        plan = plan_for_this_host(config, build_plan(config))
        with entered(namespace.path):
            started = time.perf_counter()
            apply(config, plan)
            return (time.perf_counter() - started) * 1000


def scale_section(sizes: Sequence[int], rounds: int) -> None:
    variants = []
    for backend in BACKENDS:
        for count in sizes:
            for form, use_sets in (("ours", "auto"), ("per-entry", "never")):
                if count or form == "ours":
                    values = {**scale_values(count), "use_sets": use_sets}
                    variants.append(Variant(backend, count, form, values, plan_text(values, backend)))
    for _ in range(max(3, rounds // 3)):
        for variant in variants:
            for measure_into, how in ((variant.loads, variant.load), (variant.applies, variant.apply)):
                namespace = NetNS("iit-bench")
                try:
                    measure_into.append(how(namespace))
                finally:
                    namespace.delete()
    try:
        for variant in variants:
            variant.namespace = make_pod_namespace("192.0.2.1/24")
            variant.load(variant.namespace)
        paths = [variant.namespace.path for variant in variants if variant.namespace]
        probe = [PYTHON, "-c", CONNECT_LOOP, str(CONNECTIONS), str(ROUNDS), *paths]
        costs = subprocess.run(probe, capture_output=True, text=True, check=True, timeout=600).stdout.split()
        for variant, cost in zip(variants, costs, strict=True):
            variant.cost_us = float(cost)
    finally:
        for variant in variants:
            if variant.namespace is not None:
                variant.namespace.delete()

    ours = f"sets above {SET_THRESHOLD} entries" if SET_THRESHOLD < 10**9 else "this tree has no sets"
    print(f"\n(d) N excluded CIDRs + N included ports: ours ({ours}) vs one rule per entry")
    print(
        f"  {'backend':<8}{'N':>7}  {'form':<10}{'rules':>7}{'load ms':>9}{'apply ms':>9}"
        f"{'µs/conn':>9}{'+µs':>7}{'vs N=0':>8}"
    )
    for variant in variants:
        baseline = next(v for v in variants if v.backend == variant.backend and v.count == 0).cost_us
        print(
            f"  {variant.backend:<8}{variant.count:>7}  {variant.form if variant.count else 'both':<10}"
            f"{variant.rules:>7}{statistics.median(variant.loads):>9.1f}{statistics.median(variant.applies):>9.1f}"
            f"{variant.cost_us:>9.1f}"
            f"{variant.cost_us - baseline:>7.1f}{variant.cost_us / baseline:>7.2f}x"
        )
    print("  load: ipset restore + iptables-restore of the text (native: nft -f) into an empty namespace;")
    print("  apply: the whole engine in-process (backend detection, ipsets, rules; native: read the")
    print("  namespace, one nft transaction); µs/conn: best of "
          f"{ROUNDS} rounds of {CONNECTIONS} new connections; +µs: over N=0")
    print("  goal at N = 10 000 (ours): apply <= 100 ms on either backend, µs/conn <= 1.2x N=0")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--sizes", default="0,100,1000,10000")
    parser.add_argument("--skip-scale", action="store_true", help="only (a), (b) and (c)")
    parser.add_argument("--only-scale", action="store_true", help="only (d)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_speed.py needs root: it creates network namespaces")
    # Byte-compile first: with PYTHONDONTWRITEBYTECODE set, every run would compile our modules.
    subprocess.run([PYTHON, "-m", "compileall", "-q", str(REPO / "istio_iptables")], check=True)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, medians of {args.rounds} interleaved rounds")
    if not args.only_scale:
        process_section(args.rounds)
    if not args.skip_scale:
        scale_section([int(size) for size in args.sizes.split(",")], args.rounds)


if __name__ == "__main__":
    main()
