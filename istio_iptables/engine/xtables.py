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

from collections.abc import Mapping

from istio_iptables._lib.log import log
from istio_iptables.config.sidecar import Config
from istio_iptables.errors import ApplyError, DriftError, IstioIptablesError
from istio_iptables.net import Family
from istio_iptables.policy.footprint import SIDECAR, Footprint
from istio_iptables.policy.lists import SET_THRESHOLD, sets_of
from istio_iptables.system.ipset import matched_sets, uses_sets
from istio_iptables.system.xtables_backend import Detection
from istio_iptables.system.xtables_restore import LockTimeout, RestoreFailed, explain_failure, tables_of
from istio_iptables.xtables.model import BUILTIN_CHAINS, Plan
from istio_iptables.xtables.reconcile import (
    TableState,
    desired_state,
    diff_states,
    normalised,
    rollback_script,
    state_lines,
    transition_script,
)
from istio_iptables.xtables.save import read_save

FAMILIES = (Family.V4, Family.V6)
Created = dict[Family, set[tuple[str, str]]]  # nft backend: (table, built-in chain) a write creates

TYPE_CHECKING = False
if TYPE_CHECKING:  # the seam is for annotations: its protocols are never needed at run time
    from istio_iptables.engine.seam import Applier, Sets, System


class Outcome:
    """What a run did, for logs and tests."""

    def __init__(self, action: str, backend: str, scripts: dict[Family, str]) -> None:
        self.action = action  # "applied", "unchanged", "reconciled", "resumed", "cleaned", "nothing-to-clean"
        self.backend = backend
        self.scripts = scripts


class XtablesForm:
    """Our rules in iptables form, on whichever backend the namespace shows (legacy or nft).

    The steps of every form: **read** our footprint's part of the namespace (:meth:`read`),
    compute the **transition** to the plan (``transition_script``), **write** it (:meth:`write`),
    **roll back** exactly what the write changed when a later step fails (:meth:`rollback`).
    Every side effect goes through ``system`` (:class:`istio_iptables.engine.seam.System`).
    """

    name = "xtables"

    def __init__(
        self, config: Config, system: System, footprint: Footprint = SIDECAR, namespace_path: str = ""
    ) -> None:
        self.config = config
        self.system = system
        self.footprint = footprint
        self.namespace_path = namespace_path
        self._env: tuple[dict[str, str] | None] | None = None

    @property
    def env(self) -> dict[str, str] | None:
        """The environment of our iptables children (which xtables lock they take), decided once."""
        if self._env is None:
            self._env = (self.system.xtables_environment(self.config.cni_mode, self.namespace_path),)
        return self._env[0]

    # --- read ------------------------------------------------------------------------------------

    def detect(self, needed: tuple[Family, ...]) -> Detection:
        detection = self.system.detect(self.config.force_iptables_binary, needed, self.env)
        log.info("iptables backend: %s (%s)", detection.backend.name, detection.reason)
        return detection

    def read(self, detection: Detection, wanted: dict[Family, TableState]) -> dict[Family, TableState]:
        """Our part of each family, as the footprint claims it from the live save output.

        A family holding another mode's rules (the sidecar's and ambient's share chain names) is
        refused with exit 3 before anything is written; cleanup leaves it alone when none of our
        own companions are there (it is wholly the other mode's), and refuses a mix of both.
        """
        footprint = self.footprint
        live: dict[Family, TableState] = {}
        for family in FAMILIES:
            dump = detection.dump(family)
            rival = footprint.rival_in(dump)
            if rival is None:
                live[family] = footprint.claim_xtables(dump, wanted[family], family)
            elif self.config.cleanup_only and not footprint.holds_own_companions(dump):
                log.info("%s: %s, not ours to remove", family.label, rival)
                live[family] = {}
            else:
                raise DriftError(footprint.rival_refusal(f"{family.label} {rival}"))
        return live

    def live_marks(self, live: dict[Family, TableState]) -> set[int]:
        """The TPROXY marks our live rules use, so cleanup and reconcile find the policy routes that go with them."""
        marks = (self.footprint.live_tproxy_mark(state.get("mangle", {})) for state in live.values())
        return {mark for mark in marks if mark is not None}

    # --- the actions -----------------------------------------------------------------------------

    def apply(self, plan: Plan) -> Outcome:
        config, system = self.config, self.system
        planned = tuple(ruleset.family for ruleset in plan.rulesets)
        detection = self.detect(FAMILIES if config.cleanup_only else planned)
        applier = system.applier(config.applier, detection.backend, self.env)
        wanted = wanted_state(plan)
        live = self.read(detection, wanted)
        ipset = self._sets(plan, live)
        if config.cleanup_only:
            return self._cleanup(detection, applier, live, ipset, wanted)
        if plan.routes is not None:
            system.check_loopback_up()  # before anything is written: exit 4, not half the routes

        wanted_sets = sets_of(plan.rulesets)
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
            self._load_kept_sets(plan)
            self._ensure_routes(plan, detection, applier, {}, wanted)
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
        self._load_kept_sets(plan)
        created = self._absent_base_chains(scripts, detection)
        try:
            touched = self.write(scripts, detection, applier, wanted, created)
            self._ensure_routes(plan, detection, applier, touched, wanted, created)
        except IstioIptablesError:
            if ipset:  # the old rules are back: the kernel keeps the sets they match, the rest go
                ipset.remove_stale([], quiet=True)
            raise
        if ipset:
            ipset.remove_stale([named.name for named in wanted_sets])
        if has_ours:
            if detection.backend.name == "nft":
                system.drop_emptied_nft_chains(detection, live, applier_env(applier), wanted)
            self._remove_replaced_routes(plan, live)
        action = "resumed" if missing and not config.force_apply else "reconciled" if has_ours else "applied"
        return Outcome(action, detection.backend.name, scripts)

    def cleanup(self, plan: Plan) -> Outcome:
        """Remove our part (``plan``: the flags' claims on built-in chains, as Istio's --cleanup-only)."""
        detection = self.detect(FAMILIES)
        applier = self.system.applier(self.config.applier, detection.backend, self.env)
        wanted = wanted_state(plan)
        live = self.read(detection, wanted)
        return self._cleanup(detection, applier, live, self._sets(plan, live), wanted)

    def preview_cleanup(self, plan: Plan) -> dict[Family, str]:
        """``--cleanup-only --dry-run``: the restore input cleanup would write, read from the live namespace."""
        detection = self.system.detect(self.config.force_iptables_binary, FAMILIES, None)
        return removal_scripts(self.read(detection, wanted_state(plan)))

    def drift(self, plan: Plan) -> list[str]:
        """How our live part differs from the plan (empty: the namespace holds exactly the plan). Reads only."""
        detection = self.system.detect(self.config.force_iptables_binary, plan_families(plan), self.env)
        lines: list[str] = []
        for ruleset in plan.rulesets:
            rival = self.footprint.rival_in(detection.dump(ruleset.family))
            if rival is not None:
                lines.append(f"{ruleset.family.label}: the namespace holds {rival}")
                continue
            live = self.footprint.claim_xtables(detection.dump(ruleset.family), None, ruleset.family)
            lines += diff_states(live, desired_state(ruleset), ruleset.family)
        return lines

    # --- write and roll back --------------------------------------------------------------------

    def _load_kept_sets(self, plan: Plan) -> None:
        """Sets kept across runs (ambient's probe sets): created if missing, members changed only as asked."""
        if plan.ipset_document:
            self.system.ipset_restore(plan.ipset_document, self.env)

    def _sets(self, plan: Plan, live: dict[Family, TableState]) -> Sets | None:
        # ipsets of long lists (istio_iptables/policy/lists.py): only runs that have or had some touch ipset.
        if sets_of(plan.rulesets) or any(map(uses_sets, live.values())):
            return self.system.ipset(self.env, matched_sets(live.values()), self.footprint)
        return None

    def write(
        self,
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
                rolled_back = self.rollback(touched, detection, applier, wanted, created)
            except RestoreFailed as undo_failure:
                # The undo met the same obstacle (e.g. an unwritable lock file): say so, never a traceback.
                raise ApplyError(
                    f"{failure.program} failed ({_last_line(failure)}) and rolling back failed as well "
                    f"({undo_failure.program}: {_last_line(undo_failure)}): the namespace may hold part of "
                    "the rules; inspect it with iptables-save"
                ) from None
            raise explain_failure(failure, rolled_back) from None
        return touched

    def rollback(
        self,
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
            script = rollback_script(before, now, tables, wanted.get(family, {}), family, self.footprint.claim_xtables)
            if script:
                log.debug("%s rollback input for %s:\n%s", applier.name, family.label, script)
                applier.write(family, script)
                changed = True
            if detection.backend.name == "nft":
                new_tables = [table for table in tables if table not in before.tables]
                chains = (created or {}).get(family, set())
                changed |= self.system.drop_nft_leftovers(family, new_tables, sorted(chains), applier_env(applier))
        return changed

    def _absent_base_chains(self, scripts: dict[Family, str], detection: Detection) -> Created:
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
        return {family: chains - self.system.nft_chains(family) for family, chains in doubtful.items()}

    # --- policy routing ------------------------------------------------------------------------

    def _ensure_routes(
        self,
        plan: Plan,
        detection: Detection,
        applier: Applier,
        touched: dict[Family, list[str]],
        wanted: dict[Family, TableState],
        created: Created | None = None,
    ) -> None:
        if plan.routes is None and not plan.ipv6_passthrough_address:
            return
        try:
            # takes back its own additions on failure
            self.system.ensure_routes(plan.routes, plan.ipv6_passthrough_address)
        except IstioIptablesError as error:
            if touched:
                self.rollback(touched, detection, applier, wanted, created)
                raise type(error)(f"{error}; the rules were rolled back") from None
            raise

    def _remove_replaced_routes(self, plan: Plan, live: dict[Family, TableState]) -> None:
        """After a reconcile: the policy routing (and ::6) of the replaced configuration, if this one has none of it."""
        stale = {(mark, self.config.route_table, self.config.route_mask) for mark in self.live_marks(live)}
        wanted = plan.routes
        unchanged = wanted is not None and stale <= {wanted.key} and len(wanted.families) == 2
        drop_v6 = bool(live[Family.V6]) and not plan.ipv6_passthrough_address
        if (not stale or unchanged) and not drop_v6:
            return
        self.system.remove_routes(stale, drop_v6, keep=wanted)

    def _cleanup(
        self,
        detection: Detection,
        applier: Applier,
        live: dict[Family, TableState],
        ipset: Sets | None,
        wanted: dict[Family, TableState],
    ) -> Outcome:
        """Remove our part as found live, the ipsets it matched and the policy routing of ours.

        Policy routing is ours by mark *and* table: the marks of our live TPROXY rules and the mark given
        to this run (-t, default 1337), each with the table given to it (-r, default 133), so an orphan
        left by an interrupted TPROXY run is found too; a foreign ``fwmark 1337 lookup 200`` stays.
        """
        system = self.system
        scripts = removal_scripts(live)
        self.write(scripts, detection, applier, wanted)  # the flags' claims, so a failed cleanup puts back all of it
        emptied = False
        if detection.backend.name == "nft" and scripts:
            emptied = system.drop_emptied_nft_chains(detection, live, applier_env(applier))
        if ipset:  # no rule of ours matches them any more
            ipset.remove_stale([])
        if self.footprint.kept_sets:  # ambient's probe sets go with the node's rules
            emptied |= system.destroy_sets(self.footprint.kept_sets, self.env)
        marks = self.live_marks(live)
        config = self.config
        keys = {(mark, config.route_table, config.route_mask) for mark in {*marks, config.tproxy_mark}}
        orphans = system.fwmark_rules_present(keys)
        routed = False
        if orphans or live[Family.V6] or marks:
            routed = system.remove_routes(keys, bool(live[Family.V6]) or Family.V6 in orphans)
        done = bool(scripts) or routed or emptied
        return Outcome("cleaned" if done else "nothing-to-clean", detection.backend.name, scripts)


def apply(config: Config, plan: Plan, namespace_path: str = "", system: System | None = None) -> Outcome:
    """Apply (or, with --cleanup-only, clean up) ``plan`` in the current namespace, iptables form.

    Kept for the kernel tests and the bench; front ends go through :mod:`istio_iptables.engine.actions`.
    """
    system = system or _real_system()
    system.check_privileges()
    return XtablesForm(config, system, SIDECAR, namespace_path).apply(plan)


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



def plan_families(plan: Plan) -> tuple[Family, ...]:
    return tuple(ruleset.family for ruleset in plan.rulesets)


def _last_line(failure: RestoreFailed) -> str:
    lines = failure.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit {failure.returncode}"


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


def applier_env(applier: Applier) -> Mapping[str, str] | None:
    return getattr(applier, "env", None)


def wanted_state(plan: Plan) -> dict[Family, TableState]:
    """What this run's configuration writes, per family: the plan's side of ownership (see owned_state)."""
    return {family: desired_state(ruleset) if (ruleset := plan.ruleset(family)) else {} for family in FAMILIES}


def removal_scripts(live: dict[Family, TableState]) -> dict[Family, str]:
    """Per family with something of ours: the restore input that removes it."""
    return {family: script for family in FAMILIES if (script := transition_script(live[family], None))}


def plan_for_this_host(config: Config, plan: Plan, system: System | None = None) -> Plan:
    """``--use-sets=auto`` without the ipset command: the same policy without sets, and a warning."""
    system = system or _real_system()
    if not sets_of(plan.rulesets) or system.has_program("ipset"):
        return plan
    if config.use_sets != "auto":
        from istio_iptables.system.ipset import ipset_program

        ipset_program()  # raises, saying what to install or pass
    log.warning(
        "lists longer than %d entries would be ipsets, but the ipset command is missing: writing rules "
        "instead (one per CIDR, multiport for ports); install ipset for sets",
        SET_THRESHOLD,
    )
    from dataclasses import replace

    from istio_iptables.policy.sidecar_xtables import build_plan

    return build_plan(replace(config, use_sets="multiport"))


def _real_system() -> System:
    from istio_iptables.system.real import RealSystem

    return RealSystem()
