"""Names of our nftables objects (constants only: cheap to import from the iptables path)."""

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
