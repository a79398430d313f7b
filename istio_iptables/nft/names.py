"""Names of our nftables objects, and the script that deletes our tables (cheap to import: no model; the
iptables paths and every cleanup use it)."""

from collections.abc import Collection

NAT = "istio-proxy-nat"
MANGLE = "istio-proxy-mangle"
RAW = "istio-proxy-raw"
OUR_TABLES = (NAT, MANGLE, RAW)  # everything named here (and nothing else) is ours to replace or delete

PREROUTING = "prerouting"
OUTPUT = "output"
ISTIO_INBOUND = "istio-inbound"
ISTIO_REDIRECT = "istio-redirect"
ISTIO_IN_REDIRECT = "istio-in-redirect"
ISTIO_OUTPUT = "istio-output"
ISTIO_OUTPUT_DNS = "istio-output-dns"
ISTIO_DIVERT = "istio-divert"
ISTIO_TPROXY = "istio-tproxy"
ISTIO_DROP = "istio-drop"

# Ambient mode's tables (Istio's node agent, cni/pkg/nftables): ours too, owned by the ambient footprint.
AMBIENT_NAT = "istio-ambient-nat"
AMBIENT_MANGLE = "istio-ambient-mangle"
AMBIENT_RAW = "istio-ambient-raw"
AMBIENT_TABLES = (AMBIENT_NAT, AMBIENT_MANGLE, AMBIENT_RAW)

HEADER = "# istio-iptables --native-nftables: load with 'nft -f FILE'; applied as one transaction\n"


def remove_tables_lines(tables: Collection[str] = OUR_TABLES) -> list[str]:
    """Delete these of our tables whether or not they exist (``add`` first makes ``delete`` always valid)."""
    lines = []
    for table in (*OUR_TABLES, *AMBIENT_TABLES):  # only names of ours ever reach nft input
        if table in tables:
            lines += [f"add table inet {table}", f"delete table inet {table}"]
    return lines


def render_cleanup(tables: Collection[str] = OUR_TABLES) -> str:
    return HEADER + "\n".join(remove_tables_lines(tables)) + "\n"
