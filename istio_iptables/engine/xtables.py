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
from collections.abc import Mapping
from typing import Protocol

from istio_iptables._lib.log import log
from istio_iptables.config.sidecar import Config
from istio_iptables.errors import ApplyError, DriftError, EnvironmentProblem, IstioIptablesError
from istio_iptables.net import Family
from istio_iptables.policy.lists import sets_of
from istio_iptables.system.ipset import Ipset, matched_sets, uses_sets
from istio_iptables.system.xtables_backend import Backend, Detection, detect
from istio_iptables.system.xtables_restore import (
    DEFAULT_LOCKFILE,
    NAMESPACE_LOCKFILE,
    LockTimeout,
    RestoreApplier,
    RestoreFailed,
    drop_emptied_nft_chains,
    drop_nft_leftovers,
    explain_failure,
    tables_of,
)
from istio_iptables.xtables.model import BUILTIN_CHAINS, Plan
from istio_iptables.xtables.reconcile import (
    TableState,
    desired_state,
    diff_states,
    live_tproxy_mark,
    normalised,
    owned_state,
    rollback_script,
    state_lines,
    transition_script,
)
from istio_iptables.xtables.save import read_save

CAP_NET_ADMIN = 12
FAMILIES = (Family.V4, Family.V6)
Created = dict[Family, set[tuple[str, str]]]  # nft backend: (table, built-in chain) a write creates


class Applier(Protocol):
    name: str

    def write(self, family: Family, script: str) -> None: ...

    def read(self, family: Family) -> str: ...


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
        from istio_iptables.system.xtables_libiptc import LibiptcApplier

        return LibiptcApplier(backend, env)
    return RestoreApplier(backend, env)


def live_marks(live: dict[Family, TableState]) -> set[int]:
    """The TPROXY marks our live rules use, so cleanup and reconcile find the policy routes that go with them."""
    return {mark for state in live.values() if (mark := live_tproxy_mark(state.get("mangle", {}))) is not None}


def apply(config: Config, plan: Plan, namespace_path: str = "") -> Outcome:
    check_privileges()
    env = child_environment(config, namespace_path)
    planned = tuple(ruleset.family for ruleset in plan.rulesets)
    detection = detect(config.force_iptables_binary, FAMILIES if config.cleanup_only else planned, env)
    log.info("iptables backend: %s (%s)", detection.backend.name, detection.reason)
    applier = make_applier(config, detection.backend, env)
    wanted = _wanted_state(plan)
    live = _live_state(detection, wanted)
    # ipsets of long lists (istio_iptables/policy/lists.py): only runs that have or had some touch ipset.
    wanted_sets = sets_of(plan.rulesets)
    uses = wanted_sets or any(map(uses_sets, live.values()))
    ipset = Ipset(env, matched_sets(live.values())) if uses else None
    if config.cleanup_only:
        return _cleanup(config, detection, applier, live, ipset, wanted)
    if plan.routes is not None:
        from istio_iptables.system import routes

        routes.check_loopback_up()  # before anything is written: exit 4, not half the routes

    desired = {family: state for family, state in wanted.items() if state}
    has_ours = any(live.values())
    # Nothing of ours yet (every first run): no drift to describe, and no difflib to import.
    diffs = {family: diff_states(live[family], desired.get(family, {}), family) for family in FAMILIES if has_ours}
    drift = [line for lines in diffs.values() for line in lines]
    missing = interrupted_parts(live, desired) if drift else None
    if has_ours and not drift and not config.force_apply:
        log.info("the namespace already holds exactly these rules: nothing to write")
        if ipset:  # same names, so the same members were loaded; refill in case someone edited them
            ipset.load(wanted_sets)
        _ensure_routes(plan, detection, applier, {}, wanted)
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
    created = _absent_base_chains(scripts, detection)
    _prepare_routes(plan)
    try:
        touched = _write(scripts, detection, applier, wanted, created)
        _ensure_routes(plan, detection, applier, touched, wanted, created)
    except IstioIptablesError:
        if ipset:  # the old rules are back: the kernel keeps the sets they match, the rest go
            ipset.remove_stale([], quiet=True)
        raise
    if ipset:
        ipset.remove_stale([named.name for named in wanted_sets])
    if has_ours:
        if detection.backend.name == "nft":
            drop_emptied_nft_chains(detection, live, applier_env(applier), wanted)
        _remove_replaced_routes(config, plan, live)
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


def _remove_replaced_routes(config: Config, plan: Plan, live: dict[Family, TableState]) -> None:
    """After a reconcile: the policy routing (and ::6) of the replaced configuration, if this one has none of it."""
    stale = {(mark, config.route_table) for mark in live_marks(live)}
    wanted = plan.routes
    unchanged = wanted is not None and stale <= {(wanted.mark, wanted.table)} and len(wanted.families) == 2
    drop_v6 = bool(live[Family.V6]) and not plan.ipv6_passthrough_address
    if (not stale or unchanged) and not drop_v6:
        return
    from istio_iptables.system import routes

    routes.remove(stale, passthrough_v6=drop_v6, keep=wanted)


def _write(
    scripts: dict[Family, str],
    detection: Detection,
    applier: Applier,
    wanted: dict[Family, TableState],
    created: Created | None = None,
) -> dict[Family, list[str]]:
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
            rolled_back = _rollback(touched, detection, applier, wanted, created)
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


def _absent_base_chains(scripts: dict[Family, str], detection: Detection) -> Created:
    """nft backend: the built-in chains our scripts add to that do not exist yet (so a rollback removes them).

    iptables-nft-save prints every built-in chain of a table whether nft holds it or not; only a chain
    without rules in an existing table is in doubt, and only then is nft asked.
    """
    if detection.backend.name != "nft":
        return {}
    doubtful: Created = {}
    for family, script in scripts.items():
        tables = detection.dump(family).tables
        for table, chain in added_builtin_chains(script):
            if table in tables and not tables[table].get(chain):
                doubtful.setdefault(family, set()).add((table, chain))
    if not doubtful:
        return {}
    from istio_iptables.system.xtables_restore import nft_chains

    return {family: chains - nft_chains(family) for family, chains in doubtful.items()}


def added_builtin_chains(script: str) -> set[tuple[str, str]]:
    """(table, chain) of every built-in chain a restore script appends or inserts into."""
    found: set[tuple[str, str]] = set()
    table = ""
    for line in script.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith(("-A ", "-I ")):
            chain = line.split()[1]
            if chain in BUILTIN_CHAINS:
                found.add((table, chain))
    return found


def _rollback(
    touched: dict[Family, list[str]],
    detection: Detection,
    applier: Applier,
    wanted: dict[Family, TableState],
    created: Created | None = None,
) -> bool:
    """Undo exactly what this run changed: the inverse of its transition, computed from what the
    namespace holds now, written with --noflush. Foreign rules keep their place and counters;
    tables nobody changed are not written at all."""
    changed = False
    for family, tables in touched.items():
        before = detection.dump(family)
        now = read_save(applier.read(family))
        script = rollback_script(before, now, tables, wanted.get(family, {}), family)
        if script:
            log.debug("%s rollback input for %s:\n%s", applier.name, family.label, script)
            applier.write(family, script)
            changed = True
        if detection.backend.name == "nft":
            new_tables = [table for table in tables if table not in before.tables]
            chains = (created or {}).get(family, set())
            changed |= drop_nft_leftovers(family, new_tables, sorted(chains), applier_env(applier))
    return changed


def applier_env(applier: Applier) -> Mapping[str, str] | None:
    return getattr(applier, "env", None)


def _prepare_routes(plan: Plan) -> None:
    """Load pyroute2 (~0.3-0.7 s) before the rules go in, not between them and their routes.

    TPROXY rules without their ``ip rule``/route (or ``::6``) send marked packets nowhere: what
    is left of that window is one netlink socket and a few messages (a few ms).
    """
    if plan.routes is not None or plan.ipv6_passthrough_address:
        from pyroute2 import IPRoute  # noqa: F401  (cached for routes.ensure)


def _ensure_routes(
    plan: Plan,
    detection: Detection,
    applier: Applier,
    touched: dict[Family, list[str]],
    wanted: dict[Family, TableState],
    created: Created | None = None,
) -> None:
    if plan.routes is None and not plan.ipv6_passthrough_address:
        return
    from istio_iptables.system import routes

    try:
        routes.ensure(plan.routes, plan.ipv6_passthrough_address)  # takes back its own additions on failure
    except IstioIptablesError as error:
        if touched:
            _rollback(touched, detection, applier, wanted, created)
            raise type(error)(f"{error}; the rules were rolled back") from None
        raise


def cleanup_preview(config: Config, plan: Plan) -> dict[Family, str]:
    """``--cleanup-only --dry-run``: the restore input cleanup would write, read from the live namespace."""
    return _removal_scripts(_live_state(detect(config.force_iptables_binary, FAMILIES), _wanted_state(plan)))


def _wanted_state(plan: Plan) -> dict[Family, TableState]:
    """What this run's configuration writes, per family: the plan's side of ownership (see owned_state)."""
    return {family: desired_state(ruleset) if (ruleset := plan.ruleset(family)) else {} for family in FAMILIES}


def _live_state(detection: Detection, wanted: dict[Family, TableState]) -> dict[Family, TableState]:
    return {family: owned_state(detection.dump(family), wanted[family], family) for family in FAMILIES}


def _removal_scripts(live: dict[Family, TableState]) -> dict[Family, str]:
    """Per family with something of ours: the restore input that removes it."""
    return {family: script for family in FAMILIES if (script := transition_script(live[family], None))}


def _cleanup(
    config: Config,
    detection: Detection,
    applier: Applier,
    live: dict[Family, TableState],
    ipset: Ipset | None,
    wanted: dict[Family, TableState],
) -> Outcome:
    """Remove our part as found live, the ipsets it matched and the policy routing of ours.

    Policy routing is ours by mark *and* table: the marks of our live TPROXY rules and the mark given
    to this run (-t, default 1337), each with the table given to it (-r, default 133), so an orphan
    left by an interrupted TPROXY run is found too; a foreign ``fwmark 1337 lookup 200`` stays.
    """
    scripts = _removal_scripts(live)
    _write(scripts, detection, applier, wanted)  # the flags' claims, so a failed cleanup puts back all of it
    emptied = False
    if detection.backend.name == "nft" and scripts:
        emptied = drop_emptied_nft_chains(detection, live, applier_env(applier))
    if ipset:  # no rule of ours matches them any more
        ipset.remove_stale([])
    pairs = {(mark, config.route_table) for mark in {*live_marks(live), config.tproxy_mark}}
    from istio_iptables.system import routes

    orphans = routes.fwmark_rules_present(pairs)
    routed = False
    if orphans or live[Family.V6] or live_marks(live):
        routed = routes.remove(pairs, passthrough_v6=bool(live[Family.V6]) or Family.V6 in orphans)
    done = bool(scripts) or routed or emptied
    return Outcome("cleaned" if done else "nothing-to-clean", detection.backend.name, scripts)
