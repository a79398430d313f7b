"""Choose the iptables backend (legacy x_tables or nf_tables) from what the namespace already holds.

Read-only: Istio writes a probe rule to decide, which initialises the legacy tables and makes a
later run pick differently; we only read both backends' ``*-save`` output. Rules in exactly one
backend pick it; none anywhere picks nft (what current kernels and kube-proxy use); rules in both
is an error naming the evidence, resolved with ``--force-iptables-binary``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from istio_iptables.errors import EnvironmentProblem
from istio_iptables.net import Family
from istio_iptables.system.spawn import run_all, which
from istio_iptables.xtables.save import SaveDump, read_save

BackendName = Literal["legacy", "nft"]
BACKENDS: tuple[BackendName, ...] = ("legacy", "nft")


class Backend:
    # Plain classes rather than dataclasses here: a dataclass costs ~1 ms to create at import.
    __slots__ = ("name",)

    def __init__(self, name: BackendName) -> None:
        self.name = name

    def program(self, family: Family, kind: Literal["save", "restore"]) -> str:
        prefix = "iptables" if family is Family.V4 else "ip6tables"
        return f"{prefix}-{self.name}-{kind}"


def find_program(name: str) -> str:
    path = which(name)
    if path is None:
        raise EnvironmentProblem(f"{name} not found in PATH: install iptables 1.8+ (Debian: apt install iptables)")
    return path


class Detection:
    def __init__(self, backend: Backend, saves: dict[Family, str], reason: str) -> None:
        self.backend = backend
        self.saves = saves  # the chosen backend's save output per family: the rollback snapshot
        self.reason = reason

    def dump(self, family: Family) -> SaveDump:
        return read_save(self.saves[family])


def legacy_tables_exist(family: Family) -> bool:
    """Legacy tables exist in a namespace once something used them; the kernel lists them in /proc.

    Reading the list is ~1000x cheaper than starting ``iptables-legacy-save`` to print nothing.
    """
    names = "/proc/net/ip_tables_names" if family is Family.V4 else "/proc/net/ip6_tables_names"
    try:
        with open(names, encoding="ascii") as listing:
            return bool(listing.read().strip())
    except OSError:
        return False  # x_tables not loaded at all: no legacy table anywhere


NFT_FAMILY = {Family.V4: "ip", Family.V6: "ip6"}  # the nf_tables family iptables-nft keeps each family's tables in


def nft_table_families() -> set[str] | None:
    """The nf_tables families holding a table here (one in-process netlink dump); None if unknown."""
    from istio_iptables.system.nf_tables import table_names

    tables = table_names()
    return None if tables is None else {family for family, _ in tables}


def run_saves(
    programs: Mapping[tuple[BackendName, Family], str],
    env: Mapping[str, str] | None,
    needed: Sequence[Family],
) -> dict[tuple[BackendName, Family], str]:
    """Run every save at once (they are independent) and collect their output."""
    outputs: dict[tuple[BackendName, Family], str] = {}
    paths: dict[tuple[BackendName, Family], str] = {}
    nft_families = nft_table_families() if any(backend == "nft" for backend, _ in programs) else None
    for (backend, family), program in programs.items():
        if backend == "legacy" and not legacy_tables_exist(family):
            outputs[(backend, family)] = ""  # what the save would print, without starting it
            continue
        if backend == "nft" and nft_families is not None and NFT_FAMILY[family] not in nft_families:
            outputs[(backend, family)] = ""  # iptables-nft-save prints nothing without a table of its family
            continue
        paths[(backend, family)] = find_program(program)
    # run_all reaps every save if one cannot start or times out.
    finished_saves = run_all([[path] for path in paths.values()], env=env, timeout=60)
    for (backend, family), finished in zip(paths, finished_saves, strict=True):
        stdout, stderr = finished.stdout, finished.stderr
        if finished.returncode != 0:
            if family not in needed:
                outputs[(backend, family)] = ""  # e.g. ip6tables on a host booted with ipv6.disable=1
                continue
            raise EnvironmentProblem(
                f"{programs[(backend, family)]} failed (exit {finished.returncode}): {stderr.strip()[-300:]}"
            )
        outputs[(backend, family)] = stdout
    return outputs


def detect(forced: str, needed: Sequence[Family], env: Mapping[str, str] | None = None) -> Detection:
    """Pick the backend; ``forced`` is ``--force-iptables-binary`` ("" to detect)."""
    names: tuple[BackendName, ...] = (forced,) if forced in BACKENDS else BACKENDS  # type: ignore[assignment]
    programs = {
        (name, family): Backend(name).program(family, "save") for name in names for family in (Family.V4, Family.V6)
    }
    outputs = run_saves(programs, env, needed)
    if forced:
        backend = Backend(forced)  # type: ignore[arg-type]
        reason = f"--force-iptables-binary={forced}"
    else:
        evidence = {
            name: [
                f"{family.label} {item}"
                for family in (Family.V4, Family.V6)
                for item in read_save(outputs[(name, family)]).holds_rules()
            ]
            for name in BACKENDS
        }
        if evidence["legacy"] and evidence["nft"]:
            raise EnvironmentProblem(
                "both iptables backends hold rules in this namespace (legacy: "
                + ", ".join(evidence["legacy"])
                + "; nft: "
                + ", ".join(evidence["nft"])
                + "); pass --force-iptables-binary=legacy or =nft to choose"
            )
        chosen: BackendName = "legacy" if evidence["legacy"] else "nft"
        backend = Backend(chosen)
        reason = (
            f"{chosen} holds rules ({', '.join(evidence[chosen])})"
            if evidence[chosen]
            else "no backend holds rules: nft by default"
        )
    saves = {family: outputs[(backend.name, family)] for family in (Family.V4, Family.V6)}
    return Detection(backend, saves, reason)
