"""The ipset side effects of set-based rules: load sets before the rules that match them, remove ours.

The text comes from :mod:`istio_iptables.sets` (pure); this module only runs ``ipset``. Order
matters: sets are loaded before the ``iptables-restore`` that references them, and removed only
after the rules that match them are gone (the kernel refuses to destroy a set in use).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from istio_iptables.config import Config
from istio_iptables.errors import ApplyError, EnvironmentProblem
from istio_iptables.logging_setup import log
from istio_iptables.model import NamedSet, Plan
from istio_iptables.sets import (
    SET_THRESHOLD,
    is_own_set,
    render_ipset_destroy,
    render_ipset_restore,
    sets_of,
    temporary_name,
)
from istio_iptables.spawn import Finished, run, which


def ipset_program() -> str:
    path = which("ipset")
    if path is None:
        raise EnvironmentProblem(
            "long lists are written as ipsets, but the ipset command is missing: install it "
            "(Debian: apt install ipset), or pass --use-sets=never or --use-sets=multiport"
        )
    return path


def plan_for_this_host(config: Config, plan: Plan) -> Plan:
    """``--use-sets=auto`` without the ipset command: the same policy without sets, and a warning."""
    if not sets_of(plan.rulesets) or which("ipset"):
        return plan
    if config.use_sets != "auto":
        ipset_program()  # raises, saying what to install or pass
    log.warning(
        "lists longer than %d entries would be ipsets, but the ipset command is missing: writing rules "
        "instead (one per CIDR, multiport for ports); install ipset for sets",
        SET_THRESHOLD,
    )
    from dataclasses import replace

    from istio_iptables.capture import build_plan

    return build_plan(replace(config, use_sets="multiport"))


class Ipset:
    """Runs ``ipset`` in the current network namespace."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self.program = ipset_program()
        self.env = dict(env) if env is not None else None

    def _run(self, *args: str, input: str | None = None) -> Finished:
        return run([self.program, *args], input=input, env=self.env)

    def own_sets(self) -> list[str]:
        """Every set whose name is one of ours (temporary ones included)."""
        listing = self._run("list", "-n")
        if listing.returncode != 0:
            raise EnvironmentProblem(f"ipset list -n failed: {listing.stderr.strip()}")
        return [name for name in listing.stdout.split() if is_own_set(name)]

    def load(self, sets: Iterable[NamedSet]) -> None:
        """Create or refill each set so it holds exactly its members (atomically per set)."""
        sets = list(sets)
        before = set(self.own_sets())
        script = render_ipset_restore(sets, existing=before)
        if not script:
            return
        loaded = self._run("restore", input=script)
        if loaded.returncode != 0:
            # Nothing matches the sets yet: whatever this run created goes again.
            created = [named.name for named in sets if named.name not in before]
            self.destroy([*created, *(temporary_name(named.name) for named in sets)], quiet=True)
            raise ApplyError(f"ipset restore failed: {loaded.stderr.strip()}; no rules were changed")

    def destroy(self, names: Iterable[str], *, quiet: bool = False) -> list[str]:
        """Destroy these sets of ours; returns those still there (in use, or gone already is fine)."""
        names = list(names)
        if not names or self._run("restore", input=render_ipset_destroy(names)).returncode == 0:
            return []
        # One failed line stops ipset restore: retry one by one to learn which sets stay.
        kept = []
        for name in names:
            done = self._run("destroy", name)
            if done.returncode != 0 and "does not exist" not in done.stderr:
                kept.append(name)
                if not quiet:
                    log.warning("could not remove ipset %s: %s", name, done.stderr.strip())
        return kept

    def remove_stale(self, wanted: Iterable[str], *, quiet: bool = False) -> list[str]:
        """After our rules changed: destroy our sets other than ``wanted`` (the kernel keeps those in use)."""
        keep = set(wanted)
        return self.destroy([name for name in self.own_sets() if name not in keep], quiet=quiet)


def uses_sets(state: Mapping[str, Mapping[str, list[str]]]) -> bool:
    """Whether live rules of ours (table -> chain -> rule specs) match any set of ours."""
    return any(
        "--match-set istio-" in spec for chains in state.values() for specs in chains.values() for spec in specs
    )
