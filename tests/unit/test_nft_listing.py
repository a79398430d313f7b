"""The one ``nft -j`` reader (istio_iptables.nft.listing): both users read the same listing through it."""

from __future__ import annotations

import json
from pathlib import Path

from istio_iptables.nft import model as nft
from istio_iptables.nft.listing import read_listing, read_listing_objects
from istio_iptables.system import nft as system

RECORDED = Path(__file__).parents[1] / "data" / "explain-nft-tproxy-dns.json"


def test_the_backend_and_explain_see_the_same_tables() -> None:
    text = RECORDED.read_text()
    tables = read_listing(text)
    state = system.NamespaceState()
    system.parse_nft_listing(json.loads(text)["nftables"], state)
    assert state.our_tables == [table.name for table in tables if table.ours]
    assert state.our_objects == [entry for table in tables if table.ours for entry in table.objects]
    assert state.tproxy_mark is not None


def test_rules_are_read_into_the_model_only_when_asked() -> None:
    objects = [
        {"table": {"family": "inet", "name": "istio-proxy-nat"}},
        {"chain": {"family": "inet", "table": "istio-proxy-nat", "name": "output", "hook": "output",
                   "type": "nat", "prio": -100, "policy": "accept"}},
        {"rule": {"family": "inet", "table": "istio-proxy-nat", "chain": "output", "handle": 4,
                  "expr": [{"counter": {"packets": 2, "bytes": 120}}, {"redirect": {"port": 15001}}]}},
    ]  # fmt: skip
    (table,) = read_listing_objects(objects)
    (rule,) = table.chains["output"].rules
    assert (rule.handle, rule.packets, rule._parts) == (4, 2, None)  # nothing read into the model yet
    assert rule.parts == (nft.RedirectTo(15001),)
    assert table.chains["output"].hook == "output" and table.objects == objects


def test_set_elements_with_a_comment_are_read_like_plain_ones() -> None:
    """The probe sets' members carry the pod's UID as a comment: nft lists them wrapped in ``elem``."""
    import ipaddress

    objects = [
        {"table": {"family": "inet", "name": "istio-ambient-nat"}},
        {"set": {"family": "inet", "table": "istio-ambient-nat", "name": "istio-inpod-probes-v4", "type": "ipv4_addr",
                 "elem": [{"elem": {"val": "10.0.0.2", "comment": "pod-a"}}, "10.0.0.3"]}},
    ]  # fmt: skip
    (table,) = read_listing_objects(objects)
    members = (ipaddress.ip_network("10.0.0.2/32"), ipaddress.ip_network("10.0.0.3/32"))
    assert table.sets["istio-inpod-probes-v4"] == members
