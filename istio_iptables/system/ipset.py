"""The ipset side effects of set-based rules: load sets before the rules that match them, remove ours.

The text comes from :mod:`istio_iptables.policy.lists` (pure); this module only runs ``ipset``. Order
matters: sets are loaded before the ``iptables-restore`` that references them, and removed only
after the rules that match them are gone (the kernel refuses to destroy a set in use).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from istio_iptables._lib.log import log
from istio_iptables.errors import ApplyError, EnvironmentProblem
from istio_iptables.policy.footprint import SIDECAR, Footprint
from istio_iptables.policy.lists import (
    holds_what_its_name_says,
    render_ipset_destroy,
    render_ipset_restore,
    temporary_name,
)
from istio_iptables.system.spawn import Finished, run_program, which
from istio_iptables.xtables.model import NamedSet


def ipset_program() -> str:
    path = which("ipset")
    if path is None:
        raise EnvironmentProblem(
            "long lists are written as ipsets, but the ipset command is missing: install it "
            "(Debian: apt install ipset), or pass --use-sets=never or --use-sets=multiport"
        )
    return path


class Ipset:
    """Runs ``ipset`` in the current network namespace."""

    def __init__(
        self, env: Mapping[str, str] | None = None, referenced: Iterable[str] = (), footprint: Footprint = SIDECAR
    ) -> None:
        """``referenced``: the sets our live rules match, ours whatever they hold (someone may have
        edited one; a load refills it). ``footprint``: whose set names to look for."""
        self.program = ipset_program()
        self.footprint = footprint
        self.env = dict(env) if env is not None else None
        self.referenced = set(referenced)

    def _run(self, *args: str, input: str | None = None) -> Finished:
        return run_program([self.program, *args], input=input, env=self.env)

    def listing(self) -> dict[str, list[str]]:
        """Every set of the namespace with its members, from one ``ipset save``."""
        saved = self._run("save")
        if saved.returncode != 0:
            raise EnvironmentProblem(f"ipset save failed: {saved.stderr.strip()}")
        sets: dict[str, list[str]] = {}
        for line in saved.stdout.splitlines():
            words = line.split()
            if len(words) >= 2 and words[0] == "create":
                sets[words[1]] = []
            elif len(words) >= 3 and words[0] == "add" and words[1] in sets:
                sets[words[1]].append(words[2])
        return sets

    def own_sets(self, listing: dict[str, list[str]] | None = None) -> list[str]:
        """Every set of ours: named like ours and holding what its name's digest says, or matched by
        our live rules (a temporary ``NAME-t`` is ours when ``NAME`` is). A foreign look-alike is
        never listed, so never refilled or destroyed."""
        listing = self.listing() if listing is None else listing
        ours = [
            name
            for name, members in listing.items()
            if self.footprint.owns_set_name(name)
            and not name.endswith("-t")
            and (name in self.referenced or holds_what_its_name_says(name, members))
        ]
        return [*ours, *(temporary_name(name) for name in ours if temporary_name(name) in listing)]

    def load(self, sets: Iterable[NamedSet]) -> None:
        """Create or refill each set so it holds exactly its members (atomically per set)."""
        listing = self.listing()
        before = set(self.own_sets(listing))
        # A set of ours that holds exactly its members already is left alone (no needless swap).
        sets = [
            named
            for named in sets
            if named.name not in before or not holds_what_its_name_says(named.name, listing[named.name])
        ]
        script = render_ipset_restore(sets, existing=before)
        if not script:
            return
        loaded = self._run("restore", input=script)
        if loaded.returncode != 0:
            # Nothing matches the sets yet: whatever this run created goes again (never a set that
            # existed before: a foreign one named like ours makes the create fail, and stays).
            created = [named.name for named in sets if named.name not in listing]
            temporaries = [temporary_name(named.name) for named in sets if temporary_name(named.name) not in listing]
            self.destroy([*created, *temporaries], quiet=True)
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


def matched_sets(states: Iterable[Mapping[str, Mapping[str, list[str]]]]) -> set[str]:
    """The names of the sets live rules of ours match."""
    return {
        words[words.index("--match-set") + 1]
        for state in states
        for chains in state.values()
        for specs in chains.values()
        for spec in specs
        if "--match-set" in (words := spec.split())
    }


def restore_kept_sets(document: str, env: Mapping[str, str] | None) -> None:
    """Load ``ipset restore`` input for sets kept across runs (``create -exist``, member changes)."""
    loaded = run_program([ipset_program(), "restore"], input=document, env=dict(env) if env is not None else None)
    if loaded.returncode != 0:
        raise ApplyError(f"ipset restore failed: {loaded.stderr.strip()}; no rules were changed")


def destroy_kept_sets(names: Iterable[str], env: Mapping[str, str] | None) -> bool:
    """Destroy these kept sets where they exist (after the rules matching them went); True if any went."""
    if which("ipset") is None:
        return False  # without the command no set of ours can have been created
    destroyed = False
    for name in names:
        done = run_program([ipset_program(), "destroy", name], env=dict(env) if env is not None else None)
        if done.returncode == 0:
            destroyed = True
        elif "does not exist" not in done.stderr:
            log.warning("could not remove ipset %s: %s", name, done.stderr.strip())
    return destroyed
