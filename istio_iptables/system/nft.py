"""The kernel edge of the nftables backend: run ``nft``, read what the namespace holds, and remove
the iptables form of our rules.

Everything here is a side effect behind a small interface; the decisions live in
:mod:`istio_iptables.engine.nft` and the rules in :mod:`istio_iptables.policy.sidecar_nft`.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from istio_iptables._lib.log import log
from istio_iptables._lib.records import factory, record
from istio_iptables.errors import ApplyError, EnvironmentProblem
from istio_iptables.nft.listing import read_listing_objects
from istio_iptables.policy.footprint import SIDECAR, Footprint
from istio_iptables.system.spawn import Finished, run_program, which
from istio_iptables.xtables.model import OWN_CHAINS

# Names read back from the kernel are spliced into nft/iptables input only if they look like this.
_KERNEL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
IPTABLES_NFT_FAMILIES = {"ip": "IPv4", "ip6": "IPv6"}
LEGACY_PROGRAMS = {"ip_tables_names": "iptables-legacy", "ip6_tables_names": "ip6tables-legacy"}


def _kernel_name(name: object) -> str:
    if not isinstance(name, str) or not _KERNEL_NAME.fullmatch(name):
        raise ApplyError(f"refusing to handle a kernel object named {name!r}: unexpected characters")
    return name


def _run_tool(argv: Sequence[str], stdin: str | None = None) -> Finished:
    try:
        return run_program(argv, input=stdin, timeout=60)
    except FileNotFoundError:
        raise EnvironmentProblem(f"'{argv[0]}' is missing") from None


def nft_program() -> str:
    """The ``nft`` command. Measured against libnftables' Python binding (bench/bench_nft.py), the
    binding saves nothing on a one-shot run: importing ctypes and loading the library cost what
    starting ``nft`` costs, and the binding is one more package outside pip's reach."""
    path = which("nft")
    if path is None:
        raise EnvironmentProblem("--native-nftables needs the 'nft' command (Debian/Ubuntu: apt-get install nftables)")
    return path


def apply_script(script: str) -> None:
    """Load ``script`` with ``nft -f -`` as one transaction: the kernel takes all of it or nothing."""
    log.info("nftables: applying %d commands as one transaction", script.count("\n"))
    result = _run_tool([nft_program(), "-f", "-"], stdin=script)
    if result.returncode != 0:
        raise ApplyError(f"nftables refused the ruleset, nothing was changed: {result.stderr.strip()}")


@record(frozen=False)  # not a dataclass: importing dataclasses costs ~15 ms, a third of a cleanup
class NamespaceState:
    """What the namespace holds that concerns us: our nft tables and the iptables form of our rules."""

    our_tables: list[str] = factory(list)
    # iptables-nft: ISTIO_* chains as (family, table, chain), and rules of other chains jumping to them.
    iptables_nft_chains: list[tuple[str, str, str]] = factory(list)
    iptables_nft_jumps: list[tuple[str, str, str, int]] = factory(list)
    # iptables-legacy: per program, the iptables-save text holding ISTIO_* chains.
    legacy_saves: dict[str, str] = factory(dict)
    # What our live tables imply for cleanup: the TPROXY mark (its policy route) and IPv6 (the ::6 address).
    tproxy_mark: int | None = None
    our_ipv6: bool = False
    # Our tables as listed (``nft -j`` objects), to put them back if a later step fails.
    our_objects: list[dict] = factory(list)
    # Whose tables and chains these are (docs/architecture.md: footprints).
    footprint: Footprint = SIDECAR
    # What only another mode writes (its nft tables, its iptables chains), described: a run refuses.
    rivals: list[str] = factory(list)

    def held(self) -> dict[str, tuple[list[str], list[str]]]:
        """Per table of ours: the chains and sets it holds, by name (checked before they reach nft input)."""
        found: dict[str, tuple[list[str], list[str]]] = {table: ([], []) for table in self.our_tables}
        for entry in self.our_objects:
            for kind, index in (("chain", 0), ("set", 1)):
                if kind in entry and entry[kind]["table"] in found:
                    found[entry[kind]["table"]][index].append(_kernel_name(entry[kind]["name"]))
        return found

    @property
    def has_iptables_form(self) -> bool:
        return bool(self.iptables_nft_chains or self.legacy_saves)

    def describe_iptables_form(self) -> str:
        found = [
            f"{IPTABLES_NFT_FAMILIES[family]} {table} {chain} (iptables-nft)"
            for family, table, chain in self.iptables_nft_chains
        ]
        for program, text in self.legacy_saves.items():
            found += [f"{chain} ({program})" for chain in legacy_own_chains(text, self.footprint.chains)]
        return ", ".join(found)


def read_nft_state(state: NamespaceState) -> None:
    """Our inet tables and iptables-nft's ISTIO_* chains, from one ``nft -j list ruleset``."""
    path = which("nft")
    if path is None:
        return  # without nft there are neither our tables nor iptables-nft rules to look at
    from istio_iptables.system.nf_tables import table_names

    if table_names() == set():
        return  # the kernel holds no nf_tables table at all (a fresh pod): nothing to list
    listing = _run_tool([path, "-j", "list", "ruleset"])
    if listing.returncode != 0:
        raise EnvironmentProblem(f"cannot list the nftables ruleset: {listing.stderr.strip()}")
    parse_nft_listing(json.loads(listing.stdout or "{}").get("nftables", []), state)


def parse_nft_listing(objects: list[dict], state: NamespaceState) -> None:
    """Fill ``state`` from ``nft -j list ruleset`` objects (read by :mod:`istio_iptables.nft.listing`);
    what is ours is what ``state.footprint`` claims."""
    ours = state.footprint
    for table in read_listing_objects(objects):
        if table.family == "inet" and table.name in ours.rival_nft_tables:
            state.rivals.append(f"table inet {table.name}")
        if ours.owns_nft_table(table.family, table.name):
            if any("table" in entry for entry in table.objects):
                state.our_tables.append(table.name)
            state.our_objects += table.objects  # sets listed before the rules that match them, as a restore needs
            for chain in table.chains.values():
                for rule in chain.rules:
                    _note_our_rule(rule.expressions, state)
        elif table.family in IPTABLES_NFT_FAMILIES:
            for chain in table.chains.values():
                if chain.name in ours.rival_chains:
                    where = f"{IPTABLES_NFT_FAMILIES[table.family]} {table.name} {chain.name}"
                    state.rivals.append(f"{where} (iptables-nft)")
                if ours.owns_chain(chain.name):
                    state.iptables_nft_chains.append((table.family, table.name, chain.name))
                    continue
                state.iptables_nft_jumps += [
                    (table.family, table.name, chain.name, rule.handle)
                    for rule in chain.rules
                    if ours.jumps_into_own_chain(rule.expressions)
                ]


def _note_our_rule(expressions: list[Any], state: NamespaceState) -> None:
    text = json.dumps(expressions)
    state.our_ipv6 = state.our_ipv6 or '"protocol": "ip6"' in text
    if any("tproxy" in expr for expr in expressions):
        marks = [expr["mangle"]["value"] for expr in expressions if "mangle" in expr]
        if marks and isinstance(marks[0], int):
            state.tproxy_mark = marks[0]


def read_legacy_state(state: NamespaceState, proc_net: Path = Path("/proc/thread-self/net")) -> None:
    """ISTIO_* chains in iptables-legacy; skipped (no process started) when no legacy table exists."""
    for names_file, program in LEGACY_PROGRAMS.items():
        try:
            tables = (proc_net / names_file).read_text().split()
        except OSError:
            continue  # the legacy x_tables module is not even loaded
        if not tables or which(f"{program}-save") is None:
            continue
        save = _run_tool([f"{program}-save"])
        if save.returncode != 0:
            continue
        rival_chains = legacy_own_chains(save.stdout, state.footprint.rival_chains)
        if rival_chains:
            state.rivals.append(f"{', '.join(rival_chains)} ({program})")
        if legacy_own_chains(save.stdout, state.footprint.chains):
            state.legacy_saves[program] = save.stdout


def read_state(footprint: Footprint = SIDECAR) -> NamespaceState:
    state = NamespaceState(footprint=footprint)
    read_nft_state(state)
    read_legacy_state(state)
    return state


def legacy_own_chains(save_text: str, own_chains: frozenset[str] = OWN_CHAINS) -> list[str]:
    return [chain for chains in _parse_legacy_save(save_text, own_chains)[0].values() for chain in chains]


def _parse_legacy_save(
    save_text: str, own_chains: frozenset[str] = OWN_CHAINS
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Per table: our chains (``:ISTIO_X`` headers), and the rules of other chains that jump into them."""
    from istio_iptables.xtables.save import read_save  # only when iptables-legacy holds tables

    own: dict[str, list[str]] = {}
    jumps: dict[str, list[str]] = {}
    for table, chains in read_save(save_text).tables.items():
        for chain, specs in chains.items():
            if chain in own_chains:
                own.setdefault(table, []).append(chain)
                continue
            for spec in specs:
                words = spec.split()
                if any(word in ("-j", "-g") and target in own_chains for word, target in itertools.pairwise(words)):
                    jumps.setdefault(table, []).append(f"-A {chain} {spec}")
    return own, jumps


# --- removing the iptables form --------------------------------------------------------------------


def iptables_nft_removal_lines(state: NamespaceState) -> list[str]:
    """nft commands that remove iptables-nft's ISTIO_* chains; they join our transaction."""
    lines = [
        f"delete rule {_kernel_name(family)} {_kernel_name(table)} {_kernel_name(chain)} handle {int(handle)}"
        for family, table, chain, handle in state.iptables_nft_jumps
    ]
    chains = [(_kernel_name(family), _kernel_name(table), _kernel_name(chain))
              for family, table, chain in state.iptables_nft_chains]
    # Flush all first: our chains jump to each other, and a chain still referenced cannot go.
    lines += [f"flush chain {family} {table} {chain}" for family, table, chain in chains]
    lines += [f"delete chain {family} {table} {chain}" for family, table, chain in chains]
    return lines


def legacy_removal_document(save_text: str, own_chains: frozenset[str] = OWN_CHAINS) -> str:
    """iptables-restore --noflush input deleting every chain of ours and the jumps into them."""
    own, jumps = _parse_legacy_save(save_text, own_chains)
    document: list[str] = []
    for table in dict.fromkeys([*own, *jumps]):
        chains = own.get(table, [])
        document.append(f"*{_kernel_name(table)}")
        document += [f":{chain} - [0:0]" for chain in chains]  # declaring a chain under --noflush flushes it
        document += ["-D " + rule[len("-A ") :] for rule in jumps.get(table, [])]
        document += [f"-X {chain}" for chain in chains]
        document.append("COMMIT")
    return "\n".join(document) + "\n"


def remove_legacy_form(state: NamespaceState) -> None:
    for program, save_text in state.legacy_saves.items():
        document = legacy_removal_document(save_text, state.footprint.chains)
        result = _run_tool([f"{program}-restore", "--noflush", "--wait=30"], stdin=document)
        if result.returncode != 0:
            raise ApplyError(f"{program}-restore could not remove the old iptables rules: {result.stderr.strip()}")
        log.info("removed the iptables rules left by %s", program)


def restore_our_tables(before: NamespaceState) -> None:
    """Put our tables back as ``before`` listed them, in one transaction (JSON in, no text spliced)."""
    commands: list[dict] = [
        {verb: {"table": {"family": "inet", "name": table}}} for table in before.footprint.nft_tables
        for verb in ("add", "delete")
    ]
    for entry in before.our_objects:
        kind, body = next(iter(entry.items()))
        # In an add command a rule's handle names the rule to append after: drop it (and the table's).
        commands.append({"add": {kind: {key: value for key, value in body.items() if key != "handle"}}})
    result = _run_tool([nft_program(), "-j", "-f", "-"], stdin=json.dumps({"nftables": commands}))
    if result.returncode != 0:
        raise ApplyError(f"could not put the previous nftables rules back: {result.stderr.strip()}")


def remove_our_tables(present: list[str]) -> None:
    """Delete those of our tables that ``read_nft_state`` found (deleting costs the kernel ~10 ms each)."""
    from istio_iptables.nft.names import render_cleanup  # not nft.render: the cleanup needs no model

    if present:
        apply_script(render_cleanup(present))
