"""Apply a plan to the current network namespace: idempotent, drift-aware, all or nothing.

1. Pick the backend from what the namespace holds (read-only) and keep both families' save
   output as the snapshot.
2. Compare our live part with the plan, in order. Equal: nothing is written. Nothing of ours:
   apply. Anything else is drift: exit 3 with the diff unless --reconcile or --force-apply,
   which replace our part atomically per table.
3. Write one restore transaction per family; on any failure (a table, the IPv6 half, the
   routes) every touched table goes back to the snapshot before the error is reported.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Protocol

from istio_iptables.apply.backend import Backend, Detection, detect
from istio_iptables.apply.restore import (
    DEFAULT_LOCKFILE,
    NAMESPACE_LOCKFILE,
    LockTimeout,
    RestoreApplier,
    RestoreFailed,
    explain_failure,
    tables_of,
)
from istio_iptables.apply.state import (
    TableState,
    desired_state,
    diff_states,
    normalised,
    owned_state,
    state_lines,
    transition_script,
)
from istio_iptables.config import Config
from istio_iptables.errors import ApplyError, DriftError, EnvironmentProblem, IstioIptablesError
from istio_iptables.ipset import Ipset, uses_sets
from istio_iptables.logging_setup import log
from istio_iptables.model import ISTIO_DIVERT, ISTIO_TPROXY, Family, Plan
from istio_iptables.sets import sets_of

CAP_NET_ADMIN = 12
FAMILIES = (Family.V4, Family.V6)
_MARK = re.compile(r"--(?:tproxy-mark|set-xmark) (0x[0-9a-f]+)/")


class Applier(Protocol):
    name: str

    def write(self, family: Family, script: str) -> None: ...

    def rollback(self, family: Family, snapshot: str, tables: list[str]) -> None: ...


class Outcome:
    """What a run did, for logs and tests."""

    def __init__(self, action: str, backend: str, scripts: dict[Family, str]) -> None:
        self.action = action  # "applied", "unchanged", "reconciled", "cleaned", "nothing-to-clean"
        self.backend = backend
        self.scripts = scripts


def check_privileges(status_path: str = "/proc/self/status") -> None:
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


def child_environment(config: Config, namespace_path: str) -> dict[str, str] | None:
    """The xtables lock our children take.

    Istio's CNI mode: one lock per pod namespace, so pods never wait for each other. A read-only
    root filesystem (Kubernetes' readOnlyRootFilesystem puts no tmpfs on /run) cannot hold
    /run/xtables.lock: lock the namespace file itself then, which every process of the pod opens
    as the same inode, so it still serialises the pod's writers.
    """
    if config.cni_mode and namespace_path:
        # The namespace's inode, as Istio's CNI plugin locks it, but through /proc/self: a path under
        # /run/netns would be created as an empty file if the namespace were deleted mid-run.
        return {**os.environ, "XTABLES_LOCKFILE": NAMESPACE_LOCKFILE}
    if not lockfile_usable(os.environ.get("XTABLES_LOCKFILE") or DEFAULT_LOCKFILE):
        log.info("the xtables lock file cannot be created here (read-only root?): locking the namespace")
        return {**os.environ, "XTABLES_LOCKFILE": NAMESPACE_LOCKFILE}
    return None


def lockfile_usable(path: str) -> bool:
    if os.path.exists(path):
        return os.access(path, os.R_OK)
    return os.access(os.path.dirname(path) or ".", os.W_OK)


def make_applier(config: Config, backend: Backend, env: Mapping[str, str] | None) -> Applier:
    if config.applier == "libiptc":
        from istio_iptables.apply.libiptc import LibiptcApplier

        return LibiptcApplier(backend, env)
    return RestoreApplier(backend, env)


def live_mark(live: TableState) -> int | None:
    """The TPROXY mark our live rules use, so cleanup finds the policy routes that go with it."""
    mangle = live.get("mangle", {})
    for spec in [*mangle.get(ISTIO_TPROXY, []), *mangle.get(ISTIO_DIVERT, [])]:
        found = _MARK.search(spec)
        if found:
            return int(found.group(1), 16)
    return None


def apply(config: Config, plan: Plan, namespace_path: str = "") -> Outcome:
    check_privileges()
    env = child_environment(config, namespace_path)
    planned = tuple(ruleset.family for ruleset in plan.rulesets)
    detection = detect(config.force_iptables_binary, FAMILIES if config.cleanup_only else planned, env)
    log.info("iptables backend: %s (%s)", detection.backend.name, detection.reason)
    applier = make_applier(config, detection.backend, env)
    live = _live_state(detection)
    # ipsets of long lists (istio_iptables/sets.py): only runs that have or had some touch ipset.
    wanted_sets = sets_of(plan.rulesets)
    ipset = Ipset(env) if wanted_sets or any(map(uses_sets, live.values())) else None
    if config.cleanup_only:
        return _cleanup(detection, applier, live, ipset)

    desired = {ruleset.family: desired_state(ruleset) for ruleset in plan.rulesets}
    has_ours = any(live.values())
    # Nothing of ours yet (every first run): no drift to describe, and no difflib to import.
    diffs = {family: diff_states(live[family], desired.get(family, {}), family) for family in FAMILIES if has_ours}
    drift = [line for lines in diffs.values() for line in lines]
    missing = interrupted_parts(live, desired) if drift else None
    if has_ours and not drift and not config.force_apply:
        log.info("the namespace already holds exactly these rules: nothing to write")
        if ipset:  # same names, so the same members were loaded; refill in case someone edited them
            ipset.load(wanted_sets)
        _ensure_routes(plan, detection, applier, {})
        return Outcome("unchanged", detection.backend.name, {})
    if missing and not config.force_apply:
        # An interrupted run of this very configuration (killed between the IPv4 and the IPv6
        # write, or between two legacy tables): finish it, as a restarted init container expects.
        log.info("finishing an interrupted run of this configuration: %s missing", ", ".join(missing))
    elif has_ours and drift and not (config.reconcile or config.force_apply):
        raise DriftError(
            "the namespace holds istio-iptables rules of another configuration (or edited ones); "
            "rerun with --reconcile to replace them, or --cleanup-only to remove them:\n" + "\n".join(drift)
        )
    scripts = {
        family: script
        for family in FAMILIES
        if not (missing and not diffs.get(family))  # resuming: a family already complete stays as it is
        and (script := transition_script(live[family], plan.ruleset(family)))
    }
    if ipset:  # before the rules that match them
        ipset.load(wanted_sets)
    _prepare_routes(plan)
    try:
        touched = _write(scripts, detection, applier)
        _ensure_routes(plan, detection, applier, touched)
    except IstioIptablesError:
        if ipset:  # the old rules are back: the kernel keeps the sets they match, the rest go
            ipset.remove_stale([], quiet=True)
        raise
    if ipset:
        ipset.remove_stale([named.name for named in wanted_sets])
    action = "resumed" if missing and not config.force_apply else "reconciled" if has_ours else "applied"
    return Outcome(action, detection.backend.name, scripts)


def interrupted_parts(live: dict[Family, TableState], desired: dict[Family, TableState]) -> list[str] | None:
    """What an interrupted run of this configuration left undone, or None if ``live`` is not one.

    A run writes one restore transaction per family (iptables-nft commits a family at once,
    iptables-legacy one table at a time), so a run killed part-way leaves every (family, table)
    either exactly as planned or holding nothing of ours. Such a state, with at least one part
    missing, is resumed; any other difference (a part of another configuration, an edited rule,
    a table we would not write) is drift.
    """
    missing: list[str] = []
    for family in FAMILIES:
        live_tables, wanted_tables = normalised(live[family]), normalised(desired.get(family, {}))
        if not set(live_tables) <= set(wanted_tables):
            return None
        for table in wanted_tables:
            if table not in live_tables:
                missing.append(f"{family.label} {table}")
            elif state_lines({table: live_tables[table]}) != state_lines({table: wanted_tables[table]}):
                return None
    return missing or None


def _write(scripts: dict[Family, str], detection: Detection, applier: Applier) -> dict[Family, list[str]]:
    touched: dict[Family, list[str]] = {}
    try:
        for family, script in scripts.items():
            touched[family] = tables_of(script)
            log.debug("%s input for %s:\n%s", applier.name, family.label, script)
            applier.write(family, script)
    except RestoreFailed as failure:
        if isinstance(failure, LockTimeout):
            del touched[failure.family]  # its write never started
        try:
            rolled_back = _rollback(touched, detection, applier)
        except RestoreFailed as undo_failure:
            # The undo met the same obstacle (e.g. an unwritable lock file): say so, never a traceback.
            raise ApplyError(
                f"{failure.program} failed ({_last_line(failure)}) and rolling back failed as well "
                f"({undo_failure.program}: {_last_line(undo_failure)}): the namespace may hold part of "
                "the rules; inspect it with iptables-save"
            ) from None
        raise explain_failure(failure, rolled_back) from None
    return touched


def _last_line(failure: RestoreFailed) -> str:
    lines = failure.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit {failure.returncode}"


def _rollback(touched: dict[Family, list[str]], detection: Detection, applier: Applier) -> bool:
    for family, tables in touched.items():
        applier.rollback(family, detection.saves[family], tables)
    return bool(touched)


def _prepare_routes(plan: Plan) -> None:
    """Load pyroute2 (~0.3-0.7 s) before the rules go in, not between them and their routes.

    TPROXY rules without their ``ip rule``/route (or ``::6``) send marked packets nowhere: what
    is left of that window is one netlink socket and a few messages (a few ms).
    """
    if plan.routes is not None or plan.ipv6_passthrough_address:
        from pyroute2 import IPRoute  # noqa: F401  (cached for routes.ensure)


def _ensure_routes(plan: Plan, detection: Detection, applier: Applier, touched: dict[Family, list[str]]) -> None:
    if plan.routes is None and not plan.ipv6_passthrough_address:
        return
    from istio_iptables.apply import routes

    try:
        routes.ensure(plan.routes, plan.ipv6_passthrough_address)
    except IstioIptablesError as error:
        if touched:
            _rollback(touched, detection, applier)
            raise type(error)(f"{error}; the rules were rolled back") from None
        raise


def cleanup_preview(config: Config) -> dict[Family, str]:
    """``--cleanup-only --dry-run``: the restore input cleanup would write, read from the live namespace."""
    return _removal_scripts(_live_state(detect(config.force_iptables_binary, FAMILIES)))


def _live_state(detection: Detection) -> dict[Family, TableState]:
    return {family: owned_state(detection.dump(family)) for family in FAMILIES}


def _removal_scripts(live: dict[Family, TableState]) -> dict[Family, str]:
    """Per family with something of ours: the restore input that removes it."""
    return {family: script for family in FAMILIES if (script := transition_script(live[family], None))}


def _cleanup(
    detection: Detection, applier: Applier, live: dict[Family, TableState], ipset: Ipset | None
) -> Outcome:
    scripts = _removal_scripts(live)
    _write(scripts, detection, applier)
    if ipset:  # no rule of ours matches them any more
        ipset.remove_stale([])
    mark = live_mark(live[Family.V4]) if live[Family.V4] else live_mark(live[Family.V6])
    if mark is not None or live[Family.V6]:
        from istio_iptables.apply import routes

        routes.remove(mark, passthrough_v6=bool(live[Family.V6]))
    return Outcome("cleaned" if scripts else "nothing-to-clean", detection.backend.name, scripts)
