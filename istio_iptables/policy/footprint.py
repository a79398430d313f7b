"""What each capture mode owns in a network namespace: its footprint (pure, cheap to import).

Apply, cleanup, drift and the cross-form guard ask a footprint, never a global constant, what is
theirs: which iptables chains are owned whole, which nft tables, which set names, which marks,
which built-in-chain rules and which policy routes. Ownership is always decided from what the
namespace shows *and* what the footprint says; a look-alike that the footprint does not claim
(a foreign ``ISTIO_OUTPUT`` rule, an ipset named like ours with other members, ``fwmark 1337
lookup 200``) stays.

Three footprints: the sidecar's, ambient's in-pod one and ambient's node one (:data:`FOOTPRINTS`).
The sidecar and ambient in-pod mode both name a chain ``ISTIO_OUTPUT`` (with other content): a
namespace never holds both modes' rules (a run refuses with exit 3 while the other mode's are
there, :meth:`Footprint.rival_in`), so each claims ``ISTIO_OUTPUT`` only where its own companions
are and the other mode's are not. A footprint also names its policy (how a configuration becomes
a plan and an nft ruleset), so the engine runs any mode the same way (docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from istio_iptables.config.ambient import INPOD_MARK, INPOD_MASK, INPOD_TPROXY_MARK, PROBE_SET_V4, PROBE_SET_V6
from istio_iptables.config.sidecar import OUTBOUND_MARK
from istio_iptables.net import Family
from istio_iptables.nft.names import AMBIENT_MANGLE, AMBIENT_NAT, AMBIENT_TABLES, OUR_TABLES
from istio_iptables.policy.lists import OWN_SET_NAME
from istio_iptables.xtables.model import FULL_MASK, OWN_CHAINS

TYPE_CHECKING = False
if TYPE_CHECKING:
    from istio_iptables.xtables.reconcile import Chains, TableState
    from istio_iptables.xtables.save import SaveDump

    Claim = Callable[[SaveDump, TableState | None, Family], TableState]


class RouteShape:
    """The policy routing a mode adds: ``ip rule fwmark MARK lookup TABLE`` (ours only when both
    match), ``local default dev lo`` in that table, and the IPv6 passthrough address on lo."""

    __slots__ = ("passthrough_v6", "route", "rule")

    def __init__(self, rule: str, route: str, passthrough_v6: str) -> None:
        self.rule, self.route, self.passthrough_v6 = rule, route, passthrough_v6


class Footprint:
    """What one capture mode writes into a namespace, and so what it may read back, replace and remove.

    - ``chains``: iptables chains owned whole (any rule in them is ours);
    - ``shared_chains``: chain names another mode also uses: owned by content (``claim_xtables``);
    - ``builtin_shapes``: the rules of built-in chains that are ours without jumping into our chains,
      described for people; the code that recognises them is ``claim_xtables``;
    - ``nft_tables``: our ``inet`` tables (``--native-nftables``), owned whole;
    - ``set_name_pattern``: ipsets named like ours (an ipset is ours only if its members match the
      digest in its name as well); ``nft_set_name_pattern``: where the nft set names' pattern lives
      (nft's renderer, imported only by the native paths);
    - ``marks``: packet marks by role; ``mark_mask``: the bits they use (full for the sidecar);
    - ``routes``: the policy routing (:class:`RouteShape`);
    - ``companion_chains``: the chains only this mode writes (``chains`` less the names another
      mode uses too, such as ``ISTIO_OUTPUT``);
    - ``rival_chains``/``rival_nft_tables``: what only another mode writes, so a namespace holding it
      is that mode's (``rival_mode``; removed with ``rival_cleanup``);
    - ``kept_sets``: sets created once and kept across runs, their members managed by their own
      commands (ambient's probe sets); cleanup destroys them after the rules that match them;
    - ``plan``/``nft_ruleset``: the policy, "module:function" building the run's plan (iptables
      rules and routes) and its native nftables ruleset from the configuration.
    """

    __slots__ = (
        "_claim",
        "_kept_set_lines",
        "_nft_ruleset",
        "_plan",
        "_tproxy_mark",
        "builtin_shapes",
        "chains",
        "companion_chains",
        "kept_sets",
        "mark_mask",
        "marks",
        "mode",
        "nft_set_name_pattern",
        "nft_tables",
        "rival_chains",
        "rival_cleanup",
        "rival_mode",
        "rival_nft_tables",
        "routes",
        "set_name_pattern",
        "shared_chains",
    )

    def __init__(
        self,
        *,
        mode: str,
        chains: frozenset[str],
        nft_tables: tuple[str, ...],
        set_name_pattern: str,
        nft_set_name_pattern: str,
        marks: Mapping[str, int],
        routes: RouteShape,
        claim: str,
        tproxy_mark: str,
        shared_chains: frozenset[str] = frozenset(),
        plan: str,
        nft_ruleset: str,
        companion_chains: frozenset[str],
        builtin_shapes: tuple[str, ...] = (),
        mark_mask: int = FULL_MASK,
        rival_chains: frozenset[str] = frozenset(),
        rival_nft_tables: tuple[str, ...] = (),
        rival_mode: str = "",
        rival_cleanup: str = "",
        kept_sets: tuple[str, ...] = (),
        kept_set_lines: str = "",
    ) -> None:
        self.mode = mode
        self.chains = chains
        self.shared_chains = shared_chains
        self.builtin_shapes = builtin_shapes
        self.nft_tables = nft_tables
        self.set_name_pattern = set_name_pattern
        self.nft_set_name_pattern = nft_set_name_pattern
        self.marks = dict(marks)
        self.mark_mask = mark_mask
        self.routes = routes
        # "module:function" of the xtables readers that claim our rules: imported on first use, so
        # the footprint costs nothing on the paths that never read iptables (dry runs, native nft).
        self._claim = claim
        self._tproxy_mark = tproxy_mark
        self._plan, self._nft_ruleset, self._kept_set_lines = plan, nft_ruleset, kept_set_lines
        self.rival_chains, self.rival_nft_tables = rival_chains, rival_nft_tables
        self.rival_mode, self.rival_cleanup = rival_mode, rival_cleanup
        self.kept_sets = kept_sets
        self.companion_chains = companion_chains

    def __repr__(self) -> str:
        return f"Footprint({self.mode!r})"

    # --- names ------------------------------------------------------------------------------

    def owns_chain(self, name: str) -> bool:
        """An iptables chain owned whole by this mode (a shared name is never owned by name)."""
        return name in self.chains and name not in self.shared_chains

    def owns_nft_table(self, family: str, name: str) -> bool:
        return family == "inet" and name in self.nft_tables

    def owns_set_name(self, name: str) -> bool:
        """Named like our sets; whether the members match the name is the caller's second question."""
        import re

        return re.fullmatch(self.set_name_pattern, name) is not None

    def owns_nft_set_name(self, name: str) -> bool:
        """An nft set of ours (inside our tables; names carry purpose, family and prefix length)."""
        return _resolve(self.nft_set_name_pattern).fullmatch(name) is not None

    def jumps_into_own_chain(self, expressions: list[dict]) -> bool:
        """An ``nft -j`` rule whose jump or goto targets one of our chains (iptables-nft's form)."""
        return any(
            verdict in expr and self.owns_chain(str(expr[verdict].get("target")))
            for expr in expressions
            for verdict in ("jump", "goto")
        )

    # --- reading the xtables form ---------------------------------------------------------------

    def claim_xtables(self, dump: SaveDump, wanted: TableState | None, family: Family) -> TableState:
        """Our part of one family's iptables-save: chains owned whole, and built-in-chain rules by shape."""
        return _resolve(self._claim)(dump, wanted, family)

    def live_tproxy_mark(self, mangle: Chains) -> int | None:
        """The TPROXY mark our live mangle chains use (its policy routes are ours too), if any."""
        return _resolve(self._tproxy_mark)(mangle)

    def rival_in(self, dump: SaveDump) -> str | None:
        """The chains of one family's iptables-save that only another mode writes, described; None if none."""
        found = sorted(
            f"{table} {name}" for table, chains in dump.tables.items() for name in chains if name in self.rival_chains
        )
        return f"{self.rival_mode} rules ({', '.join(found)})" if found else None

    def holds_own_companions(self, dump: SaveDump) -> bool:
        """Chains only this mode writes (no name another mode uses) in one family's iptables-save."""
        return any(name in self.companion_chains for chains in dump.tables.values() for name in chains)

    def rival_refusal(self, found: str) -> str:
        return (
            f"this namespace holds {found}, which {self.mode} rules never share a namespace with (the two "
            f"modes' chain names overlap); remove them first ({self.rival_cleanup}). Nothing was written"
        )

    # --- the policy -----------------------------------------------------------------------------

    def build_plan(self, config: Any) -> Any:
        """The run's :class:`~istio_iptables.xtables.model.Plan` (iptables rules, routes)."""
        return _resolve(self._plan)(config)

    def build_nft_ruleset(self, config: Any) -> Any:
        """The run's native nftables ruleset."""
        return _resolve(self._nft_ruleset)(config)

    def kept_set_nft_lines(self, config: Any) -> list[str]:
        """nft commands creating the kept sets if missing and applying membership changes (may be empty)."""
        return _resolve(self._kept_set_lines)(config) if self._kept_set_lines else []


def _resolve(reference: str) -> Any:
    import importlib

    module, _, function = reference.partition(":")
    return getattr(importlib.import_module(module), function)


# The chains only one of the two in-pod modes writes, beside the ISTIO_OUTPUT both name: each
# mode's companions are the other's rivals.
SIDECAR_COMPANIONS = OWN_CHAINS - {"ISTIO_OUTPUT"}
AMBIENT_POD_COMPANIONS = frozenset({"ISTIO_PRERT"})

SIDECAR = Footprint(
    mode="sidecar",
    chains=OWN_CHAINS,
    nft_tables=OUR_TABLES,
    set_name_pattern=OWN_SET_NAME,
    nft_set_name_pattern="istio_iptables.nft.render:OWN_NFT_SET_NAME",
    marks={"tproxy default": 1337, "outbound (Envoy to its own pod IP)": OUTBOUND_MARK},
    routes=RouteShape(
        rule="fwmark MARK lookup TABLE (both ours: -t and -r, or the mark of our live TPROXY rule)",
        route="local default dev lo table TABLE",
        passthrough_v6="::6/128 on lo (with IPv6)",
    ),
    builtin_shapes=(
        "any rule jumping into one of our chains",
        "a rule this run's configuration writes (as often as it writes it)",
        "TPROXY: mangle PREROUTING CONNMARK --save-mark, mangle OUTPUT -o lo RETURN and --restore-mark of "
        "the live TPROXY mark; the proxy owners' MARK 0x53a that our nat ISTIO_OUTPUT exempts",
        "-k X: nat PREROUTING -i X -j RETURN beside our -i X ... -j ISTIO_REDIRECT",
    ),
    claim="istio_iptables.xtables.reconcile:owned_state",
    tproxy_mark="istio_iptables.xtables.reconcile:live_tproxy_mark",
    plan="istio_iptables.policy.sidecar_xtables:build_plan",
    nft_ruleset="istio_iptables.policy.sidecar_nft:build_nft_ruleset",
    companion_chains=SIDECAR_COMPANIONS,
    rival_chains=AMBIENT_POD_COMPANIONS,
    rival_nft_tables=(AMBIENT_MANGLE,),
    rival_mode="Istio ambient in-pod",
    rival_cleanup="istio-iptables ambient --cleanup-only",
)

# Istio's node agent in a pod (cni/pkg/iptables AppendInpodRules): ISTIO_PRERT and ISTIO_OUTPUT in
# mangle, nat and (DNS capture) raw; ztunnel's packets are marked 0x539/0xfff, the connections it
# accepted 0x111/0xfff, whose replies the in-pod ip rule sends back through lo.
AMBIENT_POD = Footprint(
    mode="ambient",
    chains=frozenset({"ISTIO_PRERT", "ISTIO_OUTPUT"}),
    nft_tables=AMBIENT_TABLES,
    set_name_pattern=r"(?!)",  # no sets of its own in a pod
    nft_set_name_pattern="istio_iptables.policy.ambient_nft:NO_SET_NAME",
    marks={"ztunnel's packets": INPOD_MARK, "connections ztunnel accepted": INPOD_TPROXY_MARK},
    mark_mask=INPOD_MASK,
    routes=RouteShape(
        rule="fwmark 0x111/0xfff pref 32764 lookup 100",
        route="local default dev lo table 100",
        passthrough_v6="none",
    ),
    builtin_shapes=("any rule jumping into ISTIO_PRERT or ISTIO_OUTPUT (mangle, nat, raw)",),
    claim="istio_iptables.policy.ambient_xtables:claim_pod",
    tproxy_mark="istio_iptables.policy.ambient_xtables:no_tproxy_mark",
    plan="istio_iptables.policy.ambient_xtables:build_plan",
    nft_ruleset="istio_iptables.policy.ambient_nft:ruleset",
    companion_chains=AMBIENT_POD_COMPANIONS,
    rival_chains=SIDECAR_COMPANIONS,
    rival_nft_tables=OUR_TABLES,
    rival_mode="Istio sidecar",
    rival_cleanup="istio-iptables --cleanup-only",
)

# The node's rules (AppendHostRules): kubelet's probes to ambient pods are SNATed to the probe address.
AMBIENT_HOST = Footprint(
    mode="ambient node",
    chains=frozenset({"ISTIO_POSTRT"}),
    nft_tables=(AMBIENT_NAT,),
    set_name_pattern=r"(?!)",  # the probe sets are kept_sets: named by Istio, never digests
    nft_set_name_pattern="istio_iptables.policy.ambient_nft:PROBE_SET_NAME",
    marks={},
    routes=RouteShape(rule="none", route="none", passthrough_v6="none"),
    builtin_shapes=("nat POSTROUTING -j ISTIO_POSTRT (inserted first)",),
    claim="istio_iptables.policy.ambient_xtables:claim_host",
    tproxy_mark="istio_iptables.policy.ambient_xtables:no_tproxy_mark",
    plan="istio_iptables.policy.ambient_xtables:build_plan",
    nft_ruleset="istio_iptables.policy.ambient_nft:ruleset",
    companion_chains=frozenset({"ISTIO_POSTRT"}),
    kept_sets=(PROBE_SET_V4, PROBE_SET_V6),
    kept_set_lines="istio_iptables.policy.ambient_nft:probe_set_lines",
)

# Every capture mode, by name.
FOOTPRINTS: dict[str, Footprint] = {footprint.mode: footprint for footprint in (SIDECAR, AMBIENT_POD, AMBIENT_HOST)}
