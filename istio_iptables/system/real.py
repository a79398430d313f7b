"""The real side effects behind the engine's seam (:class:`istio_iptables.engine.seam.System`).

One object carries every side effect the engine causes: programs (saves, restores, ``nft``,
``ipset``), netlink (policy routes, ``::6``), the per-namespace lock, namespaces and the CNI
sandbox. The engine receives it as a parameter, so its ordering and rollback run against a fake
in tests/unit without root, and against this one everywhere else.

Cheap to import: every method imports its module on first use, so each entry path loads only the
modules it uses (tests/kernel/test_import_budget.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager

TYPE_CHECKING = False
if TYPE_CHECKING:
    from istio_iptables.net import Family
    from istio_iptables.policy.footprint import Footprint
    from istio_iptables.system.ipset import Ipset
    from istio_iptables.system.nft import NamespaceState
    from istio_iptables.system.routes import Added
    from istio_iptables.system.xtables_backend import Backend, Detection
    from istio_iptables.system.xtables_restore import RestoreApplier
    from istio_iptables.xtables.model import TproxyRoutes

CAP_NET_ADMIN = 12


class RealSystem:
    """The kernel, the programs and the filesystem of this host."""

    # --- the invocation: privilege, namespace, sandbox, lock -----------------------------------

    def check_privileges(self, status_path: str = "/proc/self/status") -> None:
        """Exit 4 before anything is read when netfilter cannot be written (no CAP_NET_ADMIN)."""
        from istio_iptables.errors import EnvironmentProblem

        try:
            with open(status_path, encoding="ascii") as status:
                effective = next((line.split()[1] for line in status if line.startswith("CapEff:")), "0")
        except OSError:
            effective = "0" if os.geteuid() != 0 else "ffffffff"
        if not int(effective, 16) & (1 << CAP_NET_ADMIN):
            raise EnvironmentProblem(
                "writing netfilter rules needs CAP_NET_ADMIN: run as root, or add the NET_ADMIN (and NET_RAW) "
                "capability to the init container"
            )

    def enter_namespace(self, name_or_path: str, source: str) -> AbstractContextManager[str]:
        from istio_iptables.system.netns import entered

        return entered(name_or_path, source)

    def enter_cni_sandbox(self) -> None:
        from istio_iptables.system.netns import enter_cni_sandbox

        enter_cni_sandbox()

    def namespace_lock(self) -> AbstractContextManager[None]:
        from istio_iptables.system.nslock import namespace_lock

        return namespace_lock()

    # --- the xtables forms ------------------------------------------------------------------------

    def xtables_environment(self, cni_mode: bool, namespace_path: str) -> dict[str, str] | None:
        """The xtables lock our children take.

        Istio's CNI mode: one lock per pod namespace, so pods never wait for each other. A read-only
        root filesystem (Kubernetes' readOnlyRootFilesystem puts no tmpfs on /run) cannot hold
        /run/xtables.lock: lock the namespace file itself then, which every process of the pod opens
        as the same inode, so it still serialises the pod's writers.
        """
        from istio_iptables._lib.log import log
        from istio_iptables.system.xtables_restore import DEFAULT_LOCKFILE, NAMESPACE_LOCKFILE

        if cni_mode and namespace_path:
            # The namespace's inode, as Istio's CNI plugin locks it, but through /proc/self: a path under
            # /run/netns would be created as an empty file if the namespace were deleted mid-run.
            return {**os.environ, "XTABLES_LOCKFILE": NAMESPACE_LOCKFILE}
        if not _lockfile_usable(os.environ.get("XTABLES_LOCKFILE") or DEFAULT_LOCKFILE):
            log.info("the xtables lock file cannot be created here (read-only root?): locking the namespace")
            return {**os.environ, "XTABLES_LOCKFILE": NAMESPACE_LOCKFILE}
        return None

    def detect(self, forced: str, needed: Iterable[Family], env: Mapping[str, str] | None) -> Detection:
        from istio_iptables.system.xtables_backend import detect

        return detect(forced, tuple(needed), env)

    def applier(self, kind: str, backend: Backend, env: Mapping[str, str] | None) -> RestoreApplier:
        if kind == "libiptc":
            from istio_iptables.system.xtables_libiptc import LibiptcApplier

            return LibiptcApplier(backend, env)  # type: ignore[return-value]
        from istio_iptables.system.xtables_restore import RestoreApplier

        return RestoreApplier(backend, env)

    def has_program(self, name: str) -> bool:
        from istio_iptables.system.spawn import which

        return which(name) is not None

    def ipset(self, env: Mapping[str, str] | None, referenced: Iterable[str], footprint: Footprint) -> Ipset:
        from istio_iptables.system.ipset import Ipset

        return Ipset(env, referenced, footprint)

    def ipset_restore(self, document: str, env: Mapping[str, str] | None) -> None:
        from istio_iptables.system.ipset import restore_kept_sets

        restore_kept_sets(document, env)

    def destroy_sets(self, names: Iterable[str], env: Mapping[str, str] | None) -> bool:
        from istio_iptables.system.ipset import destroy_kept_sets

        return destroy_kept_sets(names, env)

    def nft_chains(self, family: Family) -> set[tuple[str, str]]:
        from istio_iptables.system.xtables_restore import nft_chains

        return nft_chains(family)

    def drop_nft_leftovers(
        self, family: Family, new_tables: list[str], new_chains: list[tuple[str, str]], env: Mapping[str, str] | None
    ) -> bool:
        from istio_iptables.system.xtables_restore import drop_nft_leftovers

        return drop_nft_leftovers(family, new_tables, new_chains, env)

    def drop_emptied_nft_chains(
        self, detection: Detection, live: Mapping, env: Mapping[str, str] | None, wanted: Mapping | None = None
    ) -> bool:
        from istio_iptables.system.xtables_restore import drop_emptied_nft_chains

        return drop_emptied_nft_chains(detection, live, env, wanted)

    # --- policy routing (raw netlink) ----------------------------------------------------------

    def check_loopback_up(self) -> None:
        from istio_iptables.system import routes

        routes.check_loopback_up()

    def ensure_routes(self, wanted: TproxyRoutes | None, passthrough_v6: bool) -> Added:
        from istio_iptables.system import routes

        return routes.ensure(wanted, passthrough_v6)

    def remove_routes(
        self, keys: Iterable[tuple[int, int, int]], passthrough_v6: bool, keep: TproxyRoutes | None = None
    ) -> bool:
        from istio_iptables.system import routes

        return routes.remove_routes(keys, passthrough_v6=passthrough_v6, keep=keep)

    def fwmark_rules_present(self, keys: Iterable[tuple[int, int, int]]) -> set[Family]:
        from istio_iptables.system import routes

        return routes.fwmark_rules_present(keys)

    # --- the native nft form ---------------------------------------------------------------------

    def nft_tables_may_exist(self, footprint: Footprint) -> bool:
        """A quick ``nft list tables``: the full JSON reading (and its ~12 ms of imports) only if needed.

        True when a table of ours or of the rival mode's (whose presence refuses a run) is listed."""
        from istio_iptables.system.spawn import run_program, which

        nft = which("nft")
        if nft is None:
            return False  # without nft there can be no tables of ours
        listing = run_program([nft, "list", "tables"], timeout=30)
        if listing.returncode != 0:
            return True  # let the full reading report why nft cannot list
        return any(
            len(words := line.split()) == 3
            and (footprint.owns_nft_table(words[1], words[2]) or words[2] in footprint.rival_nft_tables)
            for line in listing.stdout.splitlines()
        )

    def read_nft_state(self, footprint: Footprint, *, with_legacy: bool) -> NamespaceState:
        """Our nft tables and iptables-nft's chains; with ``with_legacy``, iptables-legacy's too."""
        from istio_iptables.system import nft

        state = nft.NamespaceState(footprint=footprint)
        nft.read_nft_state(state)
        if with_legacy:
            nft.read_legacy_state(state)
        return state

    def apply_nft_script(self, script: str) -> None:
        from istio_iptables.system import nft

        nft.apply_script(script)

    def restore_nft_tables(self, before: NamespaceState) -> None:
        from istio_iptables.system import nft

        nft.restore_our_tables(before)

    def remove_nft_tables(self, present: list[str]) -> None:
        from istio_iptables.system import nft

        nft.remove_our_tables(present)

    def remove_legacy_form(self, state: NamespaceState) -> None:
        from istio_iptables.system import nft

        nft.remove_legacy_form(state)


def _lockfile_usable(path: str) -> bool:
    if os.path.exists(path):
        return os.access(path, os.R_OK)
    return os.access(os.path.dirname(path) or ".", os.W_OK)
