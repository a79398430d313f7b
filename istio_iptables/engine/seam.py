"""The engine's one seam to the outside world: every side effect goes through a :class:`System`.

The real implementation is :class:`istio_iptables.system.real.RealSystem` (kernel tests and every
front end); tests/unit use a fake that records calls and fails on demand, so the order of the
engine's steps (lock before reading, sets before rules, routes after them) and every rollback
path are tested without root.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager
from typing import Protocol

TYPE_CHECKING = False
if TYPE_CHECKING:
    from istio_iptables.net import Family
    from istio_iptables.policy.footprint import Footprint
    from istio_iptables.system.nft import NamespaceState
    from istio_iptables.system.xtables_backend import Backend, Detection
    from istio_iptables.xtables.model import NamedSet, TproxyRoutes


class Applier(Protocol):
    """Writes and reads one iptables backend (``iptables-restore``/``-save``, or libiptc)."""

    name: str

    def write(self, family: Family, script: str) -> None: ...

    def read(self, family: Family) -> str: ...


class Sets(Protocol):
    """The ipsets of one namespace (``ipset``)."""

    def load(self, sets: Iterable[NamedSet]) -> None: ...

    def remove_stale(self, wanted: Iterable[str], *, quiet: bool = False) -> list[str]: ...


class System(Protocol):
    # the invocation
    def check_privileges(self) -> None: ...

    def enter_namespace(self, name_or_path: str, source: str) -> AbstractContextManager[str]: ...

    def enter_cni_sandbox(self) -> None: ...

    def namespace_lock(self) -> AbstractContextManager[None]: ...

    # the xtables forms
    def xtables_environment(self, cni_mode: bool, namespace_path: str) -> dict[str, str] | None: ...

    def detect(self, forced: str, needed: Iterable[Family], env: Mapping[str, str] | None) -> Detection: ...

    def applier(self, kind: str, backend: Backend, env: Mapping[str, str] | None) -> Applier: ...

    def has_program(self, name: str) -> bool: ...

    def ipset(self, env: Mapping[str, str] | None, referenced: Iterable[str], footprint: Footprint) -> Sets: ...

    def ipset_restore(self, document: str, env: Mapping[str, str] | None) -> None: ...

    def destroy_sets(self, names: Iterable[str], env: Mapping[str, str] | None) -> bool: ...

    def nft_chains(self, family: Family) -> set[tuple[str, str]]: ...

    def drop_nft_leftovers(
        self, family: Family, new_tables: list[str], new_chains: list[tuple[str, str]], env: Mapping[str, str] | None
    ) -> bool: ...

    def drop_emptied_nft_chains(
        self, detection: Detection, live: Mapping, env: Mapping[str, str] | None, wanted: Mapping | None = None
    ) -> bool: ...

    # policy routing
    def check_loopback_up(self) -> None: ...

    def ensure_routes(self, wanted: TproxyRoutes | None, passthrough_v6: bool) -> object: ...

    def remove_routes(
        self, keys: Iterable[tuple[int, int, int]], passthrough_v6: bool, keep: TproxyRoutes | None = None
    ) -> bool: ...

    def fwmark_rules_present(self, keys: Iterable[tuple[int, int, int]]) -> set[Family]: ...

    # the native nft form
    def nft_tables_may_exist(self, footprint: Footprint) -> bool: ...

    def read_nft_state(self, footprint: Footprint, *, with_legacy: bool) -> NamespaceState: ...

    def apply_nft_script(self, script: str) -> None: ...

    def restore_nft_tables(self, before: NamespaceState) -> None: ...

    def remove_nft_tables(self, present: list[str]) -> None: ...

    def remove_legacy_form(self, state: NamespaceState) -> None: ...


def real_system() -> System:
    """The host's side effects (imports nothing heavy: each method loads its module when called)."""
    from istio_iptables.system.real import RealSystem

    return RealSystem()
