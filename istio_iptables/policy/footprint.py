"""What each capture mode owns in a network namespace: its footprint (pure, cheap to import).

Apply, cleanup, drift and the cross-form guard ask a footprint, never a global constant, what is
theirs: which iptables chains are owned whole, which nft tables, which set names, which marks,
which built-in-chain rules and which policy routes. Ownership is always decided from what the
namespace shows *and* what the footprint says; a look-alike that the footprint does not claim
(a foreign ``ISTIO_OUTPUT`` rule, an ipset named like ours with other members, ``fwmark 1337
lookup 200``) stays.

Only the sidecar footprint is wired today. Ambient (issue 14) will be a second entry of
:data:`FOOTPRINTS`; its ``ISTIO_OUTPUT`` shares the sidecar's chain name with other content, so it
lists that chain under ``shared_chains`` (owned by content, not by name) and brings its own
``claim_xtables`` that tells its rules from the sidecar's; its marks are masked (``0x539/0xfff``),
which ``mark_mask`` records so a re-run reads them as unchanged (docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from istio_iptables.config.sidecar import OUTBOUND_MARK
from istio_iptables.net import Family
from istio_iptables.nft.names import OUR_TABLES
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
    - ``routes``: the policy routing (:class:`RouteShape`).
    """

    __slots__ = (
        "_claim",
        "_tproxy_mark",
        "builtin_shapes",
        "chains",
        "mark_mask",
        "marks",
        "mode",
        "nft_set_name_pattern",
        "nft_tables",
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
        builtin_shapes: tuple[str, ...] = (),
        mark_mask: int = FULL_MASK,
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


def _resolve(reference: str) -> Any:
    import importlib

    module, _, function = reference.partition(":")
    return getattr(importlib.import_module(module), function)


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
)

# Every capture mode, by name: cleanup and the cross-form guard walk them all.
FOOTPRINTS: dict[str, Footprint] = {SIDECAR.mode: SIDECAR}
