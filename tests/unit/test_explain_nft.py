"""explain on native nftables rules without a kernel: the adapter (istio_iptables.explain.from_nft) from the
configuration's nft model and from a recorded ``nft -j list ruleset``, and the CLI."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from istio_iptables.config.sidecar import Config
from istio_iptables.explain.from_nft import listed_texts, masked_members, read_model, to_tables
from istio_iptables.explain.walk import Flow, Tables, chain_path, explain, verdict_text
from istio_iptables.frontends.cli.explain import explain_command
from istio_iptables.net import Family
from istio_iptables.nft.listing import ListedTable, NftJsonError, read_listing
from istio_iptables.policy.sidecar_nft import build_nft_ruleset
from istio_iptables.xtables.model import Address, L4Protocol, Owner, PortRange, Ports, Tproxy, Unsupported
from tests.support.explain_nft_support import SIDECAR, config

RECORDED = Path(__file__).parents[1] / "data" / "explain-nft-tproxy-dns.json"
# The configuration RECORDED was listed from (nft -f of its dry-run script, then nft -j list ruleset).
RECORDED_ARGS = (
    "-p", "15001", "-z", "15006", "-u", "1337", "-m", "TPROXY", "-i", "*", "-x", "", "-b", "*",
    "-d", "15090,15021,15020", "--redirect-dns", "-c", "not-istio-nic", "-k", "eth1", "-o", "22",
    "--resolv-conf", "/resolv.conf", "--enable-ipv6",
)  # fmt: skip
POD = {4: "10.0.0.2", 6: "fd00::2"}


def model_tables(cfg: Config, family: Family) -> Tables:
    return to_tables(read_model(build_nft_ruleset(cfg)), family, "configuration")[0]


def recorded(family: Family) -> Tables:
    return to_tables(read_listing(RECORDED.read_text()), family, "live", handles=True)[0]


def flow(origin: str, dst: str, dport: int, proto: str = "tcp", uid: int = 1000, src: str | None = None) -> Flow:
    address = ipaddress.ip_address(dst)
    pod = ipaddress.ip_address(POD[address.version])
    if src is None:
        src = "203.0.113.10" if origin == "remote" and address.version == 4 else None
        src = src or ("2001:db8:ffff::10" if origin == "remote" else str(address if address.is_loopback else pod))
    return Flow(
        origin,  # type: ignore[arg-type]
        proto,
        ipaddress.ip_address(src),
        address,
        40000,
        dport,
        None if origin == "remote" else uid,
        None if origin == "remote" else uid,
        local_addresses=(pod,),
    )


FLOWS = [
    flow("remote", "10.0.0.2", 8080),
    flow("remote", "10.0.0.2", 15021),
    flow("local", "10.1.2.3", 80),
    flow("local", "10.1.2.3", 22),
    flow("local", "127.0.0.1", 8080),
    flow("local", "10.0.0.2", 8080, uid=1337),
    flow("local", "10.1.2.3", 80, uid=1337),
    flow("local", "10.255.255.53", 53, proto="udp"),
    flow("local", "10.255.255.53", 53, proto="udp", uid=1337),
    flow("remote", "fd00::2", 8080),
    flow("local", "2001:db8::1", 80),
    flow("local", "fd00::53", 53, proto="udp"),
    flow("local", "::1", 8080),
]


@pytest.mark.parametrize("probe", FLOWS, ids=[f"{f.origin}-{f.protocol}-{f.dst}-{f.dport}-{f.uid}" for f in FLOWS])
def test_the_kernel_listing_explains_as_the_configuration_does(probe: Flow) -> None:
    cfg = config(*RECORDED_ARGS)
    from_model = explain(model_tables(cfg, probe.family), probe)
    from_listing = explain(recorded(probe.family), probe)
    assert from_listing.problems == ()
    assert from_listing.landing == from_model.landing
    assert from_listing.matched == from_model.matched
    assert from_listing.effects == from_model.effects


SETS_RECORDED = Path(__file__).parents[1] / "data" / "explain-nft-sets.json"
SETS_ARGS = (
    "-u", "1337", "-i", "*", "-x", "10.1.0.0/16,10.2.0.0/16,10.3.0.5/32,10.4.0.0/16", "-b", "*",
    "-d", "15090,15021,15020,1,2,3,4,5,6,7,8,9", "-o", "1,2,3,4,5,6,7,8,9,10", "--disable-ipv6", "--use-sets", "always",
)  # fmt: skip
SET_FLOWS = [
    flow("local", "10.2.3.4", 80),
    flow("local", "10.3.0.5", 80),
    flow("local", "10.3.0.6", 80),
    flow("local", "10.9.0.1", 5, proto="udp"),
    flow("local", "10.9.0.1", 11),
    flow("remote", "10.0.0.2", 15020),
    flow("remote", "10.0.0.2", 10),
]


@pytest.mark.parametrize("probe", SET_FLOWS, ids=[f"{f.origin}-{f.protocol}-{f.dst}-{f.dport}" for f in SET_FLOWS])
def test_named_sets_explain_as_the_configuration_does(probe: Flow) -> None:
    from_model = explain(model_tables(config(*SETS_ARGS), Family.V4), probe)
    from_listing = explain(to_tables(read_listing(SETS_RECORDED.read_text()), Family.V4, "live")[0], probe)
    assert from_listing.problems == () and from_listing.landing.kind != "undetermined"
    assert (from_listing.landing, from_listing.matched) == (from_model.landing, from_model.matched)


def test_namedmasked_members_at_the_matched_prefix_length() -> None:
    tables = to_tables(read_listing(SETS_RECORDED.read_text()), Family.V4, "live")[0]
    assert tables.sets is not None
    assert tables.sets["istio-proxy-nat @istio-v4-out-excl-16/16"] == tuple(
        ipaddress.ip_network(f"10.{n}.0.0/16") for n in (1, 2, 4)
    )
    assert tables.sets["istio-proxy-nat @istio-port-out-excl"] == (PortRange(1, 10),)  # an interval, as nft holds it
    excluded = explain(tables, flow("local", "10.2.3.4", 80))
    assert [step.text for step in excluded.exclusions] == ["ip daddr & 255.255.0.0 @istio-v4-out-excl-16 return"]


def test_maskedmasked_members() -> None:
    elements = tuple(ipaddress.ip_network(text) for text in ("10.1.0.0/32", "10.2.0.1/32", "10.8.0.0/13"))
    # 10.2.0.1 has bits past /16: no masked address equals it. A /13 interval holds what it contains.
    assert masked_members(elements, 16) == (ipaddress.ip_network("10.1.0.0/16"), ipaddress.ip_network("10.8.0.0/13"))
    assert masked_members((80, 443), None) == (80, 443)


def test_the_traffic_types_read_like_istios_chain_paths() -> None:
    tables = model_tables(config(*SIDECAR, "-m", "REDIRECT"), Family.V4)
    counts = {key: len(rules) for key, rules in tables.chains.items()}

    def path(probe: Flow) -> str:
        return chain_path(explain(tables, probe), counts)

    assert path(flow("local", "10.1.2.3", 80)) == (
        "Local process → istio-proxy-nat OUTPUT → istio-output rule 9 → istio-redirect → 15001"
    )
    assert path(flow("remote", "10.0.0.2", 8080)) == (
        "Remote host → istio-proxy-nat PREROUTING → istio-inbound rule 5 → istio-in-redirect → 15006"
    )
    metrics = path(flow("remote", "10.0.0.2", 15090))
    assert metrics.endswith("istio-inbound rule 2 (RETURN) → delivered to 10.0.0.2:15090")
    proxy_to_pod = explain(tables, flow("local", "10.0.0.2", 8080, uid=1337))
    assert proxy_to_pod.landing.port == 15006 and proxy_to_pod.decision is not None
    assert proxy_to_pod.decision.chain == "istio-in-redirect"


def test_recorded_listing_hooks_priorities_and_handles() -> None:
    tables = recorded(Family.V4)
    assert [(base.table, base.priority, base.kind) for base in tables.hooks["PREROUTING"]] == [
        ("istio-proxy-raw", -300, "filter"),
        ("istio-proxy-mangle", -150, "filter"),
        ("istio-proxy-nat", -100, "nat"),
    ]
    assert tables.policies[("istio-proxy-nat", "output")] == "ACCEPT"
    tproxy = tables.chains[("istio-proxy-mangle", "istio-tproxy")]
    assert tproxy[0].rule.target == Tproxy(15006, 1337)
    assert tproxy[0].text.startswith("meta l4proto tcp ip daddr != 127.0.0.1/32 tproxy ip to :15006 meta mark set 1337")
    assert "# handle" in tproxy[0].text


def test_rules_of_the_other_family_keep_their_place_but_never_match() -> None:
    ipv6 = recorded(Family.V6)
    tproxy = ipv6.chains[("istio-proxy-mangle", "istio-tproxy")]
    assert [rule.rule.target for rule in tproxy] == [Tproxy(15006, 1337), Tproxy(15006, 1337)]
    landing = explain(ipv6, flow("remote", "fd00::2", 8080))
    assert landing.landing.kind == "tproxy" and landing.decision is not None and landing.decision.number == 2
    assert "if nothing listens there: the rule does not match and the packet goes on" in verdict_text(landing)


def listing(*rules: dict, chain: dict | None = None, tables: tuple[tuple[str, str], ...] = ()) -> str:
    objects: list[dict] = [{"table": {"family": "inet", "name": "istio-proxy-nat", "handle": 1}}]
    objects.append(
        {
            "chain": chain
            or {
                "family": "inet",
                "table": "istio-proxy-nat",
                "name": "output",
                "handle": 1,
                "type": "nat",
                "hook": "output",
                "prio": -100,
                "policy": "accept",
            }
        }
    )
    for handle, expr in enumerate(rules, 2):
        objects.append(
            {"rule": {"family": "inet", "table": "istio-proxy-nat", "chain": "output", "handle": handle, "expr": expr}}
        )
    objects += [{"table": {"family": family, "name": name, "handle": 9}} for family, name in tables]
    return json.dumps({"nftables": [{"metainfo": {"version": "1.0.6"}}, *objects]})


def match(op: str, left: dict, right: object) -> dict:
    return {"match": {"op": op, "left": left, "right": right}}


COUNTER = {"counter": {"packets": 3, "bytes": 180}}


def test_live_texts_are_nfts_own_by_handle() -> None:
    listing_text = (
        "table inet istio-proxy-nat { # handle 4\n\tchain output { # handle 2\n"
        "\t\ttype nat hook output priority dstnat; policy accept;\n"
        "\t\tfib daddr type local counter packets 3 bytes 180 return # handle 25\n\t}\n}\n"
        "table ip nat { # handle 5\n\tchain OUTPUT { # handle 1\n\t\tcounter packets 1 bytes 2 # handle 3\n\t}\n}\n"
    )
    assert listed_texts(listing_text) == {("istio-proxy-nat", "output", 25): "fib daddr type local counter return"}


def test_expressions_map_to_the_model() -> None:
    text = listing(
        [
            match("!=", {"payload": {"protocol": "tcp", "field": "dport"}}, {"set": [53, {"range": [15000, 15002]}]}),
            match("==", {"payload": {"protocol": "ip6", "field": "daddr"}}, {"prefix": {"addr": "fd00::", "len": 8}}),
            match("==", {"meta": {"key": "oifname"}}, "eth*"),
            match("!=", {"meta": {"key": "skgid"}}, 1337),
            COUNTER,
            {"redirect": {"port": 15001}},
        ]
    )
    (table,) = read_listing(text)
    rule = table.chains["output"].rules[0]
    assert rule.packets == 3 and rule.handle == 2
    tables, index = to_tables([table], Family.V6, "t")
    model = tables.chains[("istio-proxy-nat", "output")][0].rule
    assert model.matches[:2] == (L4Protocol("tcp"), Ports("dst", (53, PortRange(15000, 15002)), negate=True))
    assert model.matches[2] == Address("dst", ipaddress.ip_network("fd00::/8"))
    assert model.matches[3].name == "eth+"  # type: ignore[union-attr]
    assert model.matches[4] == Owner("gid", "1337", negate=True)
    assert index[("istio-proxy-nat", "output", 1)] is rule
    # The IPv4 view: an ip6 address never matches, so the rule is there but guarded.
    guarded = to_tables([table], Family.V4, "t")[0].chains[("istio-proxy-nat", "output")][0].rule
    assert guarded.matches[0].network.version == 6  # type: ignore[union-attr]


def test_what_is_not_understood_is_reported_never_skipped() -> None:
    text = listing(
        [match("==", {"fib": {"result": "type", "flags": ["daddr"]}}, "local"), {"redirect": {"port": 15001}}],
        [COUNTER, {"masquerade": None}],
    )
    tables, _ = to_tables(read_listing(text), Family.V4, "t")
    assert len(tables.problems) == 2 and all("not understood" in problem for problem in tables.problems)
    # Statements we know, in a combination our model has no single target for, are reported too.
    mark_and_accept = [{"mangle": {"key": {"meta": {"key": "mark"}}, "value": 7}}, {"accept": None}]
    combined = to_tables(read_listing(listing(mark_and_accept)), Family.V4, "t")[0]
    assert combined.problems == ["istio-proxy-nat output rule 1: not understood: meta mark set 7 accept in "
                                 "'meta mark set 7 accept'"]
    assert isinstance(tables.chains[("istio-proxy-nat", "output")][0].rule.matches[0], Unsupported)
    explanation = explain(tables, flow("local", "10.1.2.3", 80))
    assert explanation.landing.kind == "undetermined" and "fib" in explanation.landing.reason


@pytest.mark.parametrize("text", ["", "[]", '{"nftables": [{"rule": {"family": "inet"}}]}', '{"nftables": 3}'])
def test_a_listing_that_is_not_one_is_an_error(text: str) -> None:
    with pytest.raises(NftJsonError):
        read_listing(text)


def test_foreign_tables_are_named_when_they_hold_rules() -> None:
    tables = read_listing(listing([{"accept": None}], tables=(("ip", "filter"),)))
    assert to_tables(tables, Family.V4, "t")[0].problems == []  # empty: no effect
    foreign = ListedTable("ip", "filter")
    foreign.chains["input"] = read_listing(listing([{"drop": None}]))[0].chains["output"]
    problems = to_tables([*tables, foreign], Family.V4, "t")[0].problems
    assert problems == ["table ip filter is not ours and is not evaluated"]


def test_socket_owner_never_matches_a_packet_without_a_socket() -> None:
    text = listing(
        [match("!=", {"meta": {"key": "skuid"}}, 1337), {"redirect": {"port": 15001}}],
        chain={
            "family": "inet",
            "table": "istio-proxy-nat",
            "name": "output",
            "type": "nat",
            "hook": "prerouting",
            "prio": -100,
            "policy": "accept",
        },
    )
    tables, _ = to_tables(read_listing(text), Family.V4, "t")
    assert explain(tables, flow("remote", "10.0.0.2", 8080)).landing.kind == "local"


def test_cli_explains_native_nftables_from_the_configuration() -> None:
    args = [*SIDECAR, "--native-nftables", "--disable-ipv6", "--dst", "10.1.2.3", "--dport", "80", "--json"]
    done = CliRunner().invoke(explain_command, args)
    assert done.exit_code == 0, done.output
    data = json.loads(done.output)
    assert data["rules"].startswith("configuration (native nftables")
    assert data["verdict"]["landing"] == "redirect" and data["verdict"]["port"] == 15001
    assert data["decision"]["table"] == "istio-proxy-nat" and data["decision"]["text"].endswith("redirect to :15001")


@pytest.mark.parametrize("use_sets", ["never", "always"])
def test_port_ranges_from_the_configuration(use_sets: str) -> None:
    cfg = config("-u", "1337", "-i", "*", "-b", "8000:9000,80", "-o", "400:500", "--use-sets", use_sets)
    tables = model_tables(cfg, Family.V4)
    assert explain(tables, flow("remote", "10.0.0.2", 9000)).landing.port == 15006
    assert explain(tables, flow("remote", "10.0.0.2", 9001)).landing.kind == "local"
    assert explain(tables, flow("local", "10.1.2.3", 500)).landing.kind == "network"
    assert explain(tables, flow("local", "10.1.2.3", 399)).landing.port == 15001


def test_nft_range_expressions_are_read_as_ranges() -> None:
    from istio_iptables.nft.listing import _ports

    assert _ports({"range": [8000, 9000]}) == (PortRange(8000, 9000),)
    assert _ports({"set": [80, {"range": [0, 100]}, {"range": [7, 7]}]}) == (80, PortRange(0, 100), 7)
    with pytest.raises(ValueError):
        _ports({"range": [9000, 8000]})
