"""What the iptables backends need from the nft backend: our nft tables block them (exit 3) unless
--reconcile, which removes the tables once the iptables rules are in. Cheap to import."""

from __future__ import annotations

from istio_iptables.config.sidecar import Config
from istio_iptables.errors import DriftError
from istio_iptables.nft.names import OUR_TABLES
from istio_iptables.system.spawn import run, which


def our_tables_may_exist() -> bool:
    """A quick ``nft list tables``: the full JSON reading (and its ~12 ms of imports) only if needed."""
    nft = which("nft")
    if nft is None:
        return False  # without nft there can be no tables of ours
    listing = run([nft, "list", "tables"], timeout=30)
    if listing.returncode != 0:
        return True  # let the full reading report why nft cannot list
    return any(line.split()[1:] in (["inet", table] for table in OUR_TABLES) for line in listing.stdout.splitlines())


def guard_iptables_run(config: Config) -> bool:
    """Before the iptables backends write: True if our nft tables must go once they are done.

    Raises DriftError while our nft tables are present, unless --reconcile.
    """
    from istio_iptables.engine.xtables import check_privileges

    if config.cleanup_only:
        return False  # removing iptables rules is never blocked by our nft tables
    check_privileges()  # before listing, so a missing capability is reported as the engine words it
    if not our_tables_may_exist():
        return False
    from istio_iptables.system import nft as system

    state = system.NamespaceState()
    system.read_nft_state(state)
    if not state.our_tables:
        return False
    if not config.reconcile:
        raise DriftError(
            f"this namespace already holds istio-iptables rules in nftables form ({', '.join(state.our_tables)}); "
            "re-run with --reconcile to replace them with iptables rules"
        )
    return True


def remove_nft_tables() -> None:
    """Delete our nft tables (after the iptables rules replaced them)."""
    from istio_iptables.system import nft as system

    state = system.NamespaceState()
    system.read_nft_state(state)
    system.remove_our_tables(state.our_tables)


def cleanup_nft_tables(config: Config) -> bool:
    """``--cleanup-only`` without --native-nftables: our nft tables go too (the apply path refuses
    while they exist, so cleanup must see them). True if there were any."""
    if not our_tables_may_exist():
        return False
    from istio_iptables.engine.nft import cleanup

    return cleanup(config)
