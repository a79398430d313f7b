"""What each entry path imports: the start-time rules of docs/speed.md, for every path, not only the dry run.

Each path runs the CLI in a fresh interpreter (``python -I``) and lists ``sys.modules`` at the end;
the paths that write run inside a throwaway namespace. A module named in a path's budget must not
be loaded there: a heavy library (pyroute2 ~350 ms, python-iptables ~30 ms, subprocess ~5 ms,
logging ~4 ms, dataclasses' compile ~0.4 ms per class) or one of our modules the path has no use for.
"""

from __future__ import annotations

import ast
import shlex
import sys
from pathlib import Path

import pytest

from tests.support.netns import NetNS

# Never on any path below: heavy libraries the default paths avoid on purpose.
HEAVY = frozenset({"iptc", "pyroute2", "subprocess", "logging", "difflib", "shutil", "locale", "socket", "ctypes"})
# xtables/save.py reads iptables-save on the apply path too; only explain's model reader needs shlex.
EXPLAIN_LIBRARIES = frozenset({"shlex"})
HEAVY_DIGESTS = frozenset({"zlib", "hashlib"})  # set names carry a CRC; Istio's short lists never need one
EXPLAIN_AND_EXTRAS = frozenset(
    {
        "istio_iptables.explain.walk",
        "istio_iptables.explain.from_nft",
        "istio_iptables.frontends.cli.explain",
        "istio_iptables.system.xtables_libiptc",  # --applier libiptc only
        "istio_iptables.system.routes",  # policy routes and ::6 only (raw netlink)
        "istio_iptables.engine.validation",  # --run-validation only
    }
)
NATIVE_MODULES = frozenset(
    {
        "istio_iptables.nft.model",
        "istio_iptables.policy.sidecar_nft",
        "istio_iptables.nft.render",
        "istio_iptables.system.nft",
        "istio_iptables.engine.nft",
    }
)
IPTABLES_ENGINE = frozenset(
    {
        "istio_iptables.engine.xtables",
        "istio_iptables.system.xtables_backend",
        "istio_iptables.system.xtables_restore",
        "istio_iptables.xtables.reconcile",
        "istio_iptables.xtables.save",
        "istio_iptables.system.ipset",
    }
)
# dataclasses and json stay off the iptables paths (records.py, JSON only for JSON logs); the native
# paths pay for them today (nft/model.py's dataclasses, ~8 ms; nft -j listings): a known cost.
IPTABLES_ONLY = frozenset({"dataclasses", "json"}) | NATIVE_MODULES
BASE = HEAVY | HEAVY_DIGESTS | EXPLAIN_AND_EXTRAS | EXPLAIN_LIBRARIES

INJECTOR = "-p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x '' -b '*' -d 15090,15021,15020"
TPROXY = "-p 15001 -z 15006 -u 1337 -m TPROXY -i '*' -x '' -b '*' -d 15090,15021,15020"

# Cleanup also looks for orphan policy routes (a raw netlink read: our routes and netlink modules)
# and for our native nft tables (`nft -j`: json); it is not the init path.
ROUTES = frozenset({"istio_iptables.system.routes", "istio_iptables.system.netlink"})
CLEANUP_EXTRAS = ROUTES | {"socket", "json"}

# The ambient dry runs need neither the sidecar's policy and configuration nor any system module.
AMBIENT_NOT_ON_DRY_RUN = frozenset(
    {"istio_iptables.policy.sidecar_xtables", "istio_iptables.policy.sidecar_nft", "istio_iptables.system.spawn",
    "istio_iptables.system.host",
     "istio_iptables.engine.actions", "istio_iptables.policy.lists", "istio_iptables.system.netns"}
)

# path -> (argv, forbidden modules)
ROOTLESS_PATHS = {
    "iptables dry run": (
        f"--dry-run {INJECTOR}",
        BASE | IPTABLES_ONLY | IPTABLES_ENGINE | {"select", "istio_iptables.system.spawn",
        "istio_iptables.engine.forms"},
    ),
    "native dry run": (f"--dry-run --native-nftables {INJECTOR}", BASE | IPTABLES_ENGINE),
    # `istio-iptables ambient --dry-run`: the policy modules and the renderers, nothing of the engine.
    "ambient dry run": (
        "ambient --dry-run --redirect-dns --enable-ipv6",
        BASE | IPTABLES_ONLY | IPTABLES_ENGINE | AMBIENT_NOT_ON_DRY_RUN | {"select", "istio_iptables.engine.forms"},
    ),
    "ambient host dry run": (
        "ambient --dry-run --host --enable-ipv6",
        BASE | IPTABLES_ONLY | IPTABLES_ENGINE | AMBIENT_NOT_ON_DRY_RUN | {"select", "istio_iptables.engine.forms"},
    ),
    "ambient native dry run": (
        "ambient --dry-run --native-nftables --redirect-dns --enable-ipv6",
        BASE | IPTABLES_ENGINE | (AMBIENT_NOT_ON_DRY_RUN - {"istio_iptables.policy.lists"})  # nft.render's set helpers
        | {"istio_iptables.system.nft", "istio_iptables.engine.nft"},
    ),
}
KERNEL_PATHS = {
    "iptables apply": (INJECTOR, BASE | IPTABLES_ONLY),
    "iptables cleanup": (
        "--cleanup-only",
        (BASE | IPTABLES_ONLY) - CLEANUP_EXTRAS,
    ),
    "native apply": (f"--native-nftables {INJECTOR}", BASE | IPTABLES_ENGINE),
    "native cleanup": ("--cleanup-only --native-nftables", (BASE | IPTABLES_ENGINE) - CLEANUP_EXTRAS),
    # Policy routes are a few raw netlink messages: no pyroute2, no socket.py, nothing heavy.
    "iptables TPROXY apply": (TPROXY, (BASE | IPTABLES_ONLY) - ROUTES),
    "ambient apply": ("ambient --redirect-dns --enable-ipv6", (BASE | IPTABLES_ONLY) - ROUTES),
}
# The cleanups clean up after an apply of the same form.
SET_UP = {"iptables cleanup": INJECTOR, "native cleanup": f"--native-nftables {INJECTOR}"}

PROBE = """
import sys
from istio_iptables.frontends.cli.main import main
try:
    main(sys.argv[1:] + ["--log_output_level=default:none"])
except SystemExit as done:
    if done.code:
        raise
print(sorted(sys.modules), file=sys.stderr)
"""


def loaded_modules(stderr: str) -> set[str]:
    return set(ast.literal_eval(stderr.strip().splitlines()[-1]))


def cli_probe(argv: str) -> list[str]:
    return [sys.executable, "-I", "-c", PROBE, *shlex.split(argv)]


def over_budget(loaded: set[str], forbidden: frozenset[str] | set[str]) -> list[str]:
    return sorted(name for name in loaded if name in forbidden or name.split(".")[0] in forbidden)


@pytest.mark.parametrize("path", sorted(ROOTLESS_PATHS))
def test_rootless_paths_stay_within_their_import_budget(path: str) -> None:
    import subprocess

    argv, forbidden = ROOTLESS_PATHS[path]
    done = subprocess.run(cli_probe(argv), capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr[-2000:]
    assert over_budget(loaded_modules(done.stderr), forbidden) == []


@pytest.mark.parametrize("path", sorted(KERNEL_PATHS))
def test_paths_that_write_stay_within_their_import_budget(path: str, netns: NetNS, tmp_path: Path) -> None:
    argv, forbidden = KERNEL_PATHS[path]
    lock = {"XTABLES_LOCKFILE": str(tmp_path / "xtables.lock")}  # not the global lock other tests wait on
    netns.run("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p")
    netns.run("ip", "addr", "add", "10.1.0.7/24", "dev", "eth0")
    if path in SET_UP:
        netns.run(*cli_probe(SET_UP[path]), env=lock)
    done = netns.run(*cli_probe(argv), env=lock, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = loaded_modules(done.stderr)
    assert over_budget(loaded, forbidden) == []
    if "TPROXY" in path or "ambient" in path:
        assert "istio_iptables.system.routes" in loaded  # the probe really took the routes path
