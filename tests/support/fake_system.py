"""A fake :class:`istio_iptables.engine.seam.System`: the engine's side effects as a list of events.

The "kernel" is one iptables-save text per family. A write replaces it with the text the test
says that write produces (``after``), or fails at the step the test names; a rollback write puts
the snapshot back. Nothing here needs root: tests/unit/test_engine_seam.py drives the real
engine (orchestrator, forms, transitions, rollback) against it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from istio_iptables.config.sidecar import Config, RawSettings, Setting, parse
from istio_iptables.errors import ApplyError, EnvironmentProblem
from istio_iptables.net import Family
from istio_iptables.system.xtables_backend import Backend, Detection
from istio_iptables.system.xtables_restore import LockTimeout, RestoreFailed
from istio_iptables.xtables.model import BUILTIN_CHAINS, RuleSet
from istio_iptables.xtables.reconcile import desired_state
from tests.support.fakes import FakeHost

EMPTY_SAVE = ""


def save_text(ruleset: RuleSet | None) -> str:
    """The iptables-save text of a namespace holding exactly ``ruleset`` (kernel spelling)."""
    if ruleset is None:
        return EMPTY_SAVE
    lines: list[str] = []
    for table, chains in desired_state(ruleset).items():
        lines.append(f"*{table}")
        builtin = [name for name in chains if name in BUILTIN_CHAINS]
        lines += [f":{name} ACCEPT [0:0]" for name in builtin]
        lines += [f":{name} - [0:0]" for name in chains if name not in builtin]
        lines += [f"-A {name} {spec}" for name, specs in chains.items() for spec in specs]
        lines.append("COMMIT")
    return "\n".join(lines) + "\n"


class FakeApplier:
    name = "fake-restore"

    def __init__(self, system: FakeSystem) -> None:
        self.system = system
        self.env = None

    def write(self, family: Family, script: str) -> None:
        system = self.system
        rollback = family in system.written
        step = f"{'rollback' if rollback else 'write'} {family.label}"
        system.events.append(step)
        if step in system.fail_at:
            error = system.fail_at[step]
            if error == "lock":
                raise LockTimeout(family, "iptables-legacy-restore", script, 4, "/run/xtables.lock stayed held by test")
            raise RestoreFailed(family, "iptables-legacy-restore", script, 1, "iptables-restore: line 2 failed")
        if rollback:
            system.saves[family] = system.before[family]
            system.written.discard(family)
        else:
            system.saves[family] = system.after.get(family, system.saves[family])
            system.written.add(family)

    def read(self, family: Family) -> str:
        self.system.events.append(f"read {family.label}")
        return self.system.saves[family]


class FakeSets:
    def __init__(self, system: FakeSystem) -> None:
        self.system = system

    def load(self, sets: Iterable[Any]) -> None:
        self.system.events.append("ipset load")
        if "ipset load" in self.system.fail_at:
            raise ApplyError("ipset restore failed: test; no rules were changed")

    def remove_stale(self, wanted: Iterable[str], *, quiet: bool = False) -> list[str]:
        self.system.events.append("ipset remove stale")
        return []


class FakeSystem:
    """``before``: the save text per family at the start; ``after``: what a (first) write leaves."""

    def __init__(
        self,
        before: Mapping[Family, str] | None = None,
        after: Mapping[Family, str] | None = None,
        fail_at: Mapping[str, str] | None = None,
    ) -> None:
        self.before = {Family.V4: EMPTY_SAVE, Family.V6: EMPTY_SAVE, **(before or {})}
        self.saves = dict(self.before)
        self.after = dict(after or {})
        self.fail_at = dict(fail_at or {})  # event -> "fail" | "lock"
        self.written: set[Family] = set()
        self.events: list[str] = []

    def _step(self, event: str) -> None:
        self.events.append(event)
        if event in self.fail_at:
            raise EnvironmentProblem(f"{event}: failing as the test asked")

    # the invocation
    def check_privileges(self) -> None:
        self._step("check privileges")

    @contextmanager
    def enter_namespace(self, name_or_path: str, source: str) -> Iterator[str]:
        if name_or_path:
            self.events.append(f"enter {name_or_path}")
        yield name_or_path

    def enter_cni_sandbox(self) -> None:
        self.events.append("cni sandbox")

    @contextmanager
    def namespace_lock(self) -> Iterator[None]:
        self._step("lock")
        try:
            yield
        finally:
            self.events.append("unlock")

    # the xtables forms
    def xtables_environment(self, cni_mode: bool, namespace_path: str) -> dict[str, str] | None:
        return None

    def detect(self, forced: str, needed: Iterable[Family], env: Mapping[str, str] | None) -> Detection:
        self.events.append("detect")
        return Detection(Backend("legacy"), dict(self.saves), "test")

    def applier(self, kind: str, backend: Backend, env: Mapping[str, str] | None) -> FakeApplier:
        return FakeApplier(self)

    def has_program(self, name: str) -> bool:
        return True

    def ipset(self, env: Mapping[str, str] | None, referenced: Iterable[str], footprint: Any) -> FakeSets:
        return FakeSets(self)

    def ipset_restore(self, document: str, env: Mapping[str, str] | None) -> None:
        self._step("kept sets")

    def destroy_sets(self, names: Iterable[str], env: Mapping[str, str] | None) -> bool:
        self.events.append("destroy kept sets")
        return False

    def nft_chains(self, family: Family) -> set[tuple[str, str]]:
        return set()

    def drop_nft_leftovers(self, *args: Any) -> bool:
        return False

    def drop_emptied_nft_chains(self, *args: Any) -> bool:
        return False

    # policy routing
    def check_loopback_up(self) -> None:
        self._step("check lo")

    def ensure_routes(self, wanted: Any, passthrough_v6: bool) -> None:
        self._step("routes")

    def remove_routes(self, keys: Iterable[tuple[int, int, int]], passthrough_v6: bool, keep: Any = None) -> bool:
        self.events.append("remove routes")
        return False

    def fwmark_rules_present(self, keys: Iterable[tuple[int, int, int]]) -> set[Family]:
        return set()

    # the native nft form
    def nft_tables_may_exist(self, footprint: Any) -> bool:
        self.events.append("nft tables?")
        return False

    def read_nft_state(self, footprint: Any, *, with_legacy: bool) -> Any:
        from istio_iptables.system.nft import NamespaceState

        self.events.append("read nft")
        return NamespaceState(footprint=footprint)

    def apply_nft_script(self, script: str) -> None:
        self._step("nft -f")

    def restore_nft_tables(self, before: Any) -> None:
        self.events.append("restore nft tables")

    def remove_nft_tables(self, present: list[str]) -> None:
        self.events.append("remove nft tables")

    def remove_legacy_form(self, state: Any) -> None:
        self.events.append("remove legacy form")


# A configuration for the engine tests: the injector's argv, TPROXY or not, long lists (ipsets) or not.
CIDRS = ",".join(f"10.{n // 250}.{n % 250}.0/24" for n in range(100))  # above the set threshold: ipsets


def config(*, tproxy: bool = False, ipv6: bool = True, sets: bool = False, **flags: str) -> Config:
    values = {
        "envoy_port": "15001",
        "inbound_capture_port": "15006",
        "proxy_uid": "1337",
        "istio_service_cidr": "*",
        "istio_inbound_ports": "*",
        "istio_inbound_interception_mode": "TPROXY" if tproxy else "REDIRECT",
    }
    if sets:
        values["istio_service_exclude_cidr"] = CIDRS
    raw = RawSettings(
        values={name: Setting(value, f"--{name}") for name, value in values.items()},
        flags={name: Setting(value, f"--{name}") for name, value in flags.items()},
        enable_ipv6=ipv6,
    )
    return parse(raw, FakeHost(interface_addresses=["10.1.2.3", "fd00::3"]))
