"""explain and parse without a kernel: the six traffic types, the parser, unknown matches, the CLI."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from istio_iptables.config.sidecar import Config, PortSelection
from istio_iptables.explain.walk import Flow, Tables, chain_path, explain, render_text, to_data
from istio_iptables.frontends.cli.explain import explain_command
from istio_iptables.net import Family
from istio_iptables.policy.sidecar_xtables import build_plan
from istio_iptables.xtables.model import PortRange, Ports, SetMatch, Unsupported
from istio_iptables.xtables.save import parse_rule_spec, read_save_model
from tests.support.explain_support import DEFAULT, config

DATA = Path(__file__).parents[1] / "data"
POD = ipaddress.ip_address("10.0.0.2")
POD_IPS = (POD,)


TPROXY = config("-u", "1337", "-m", "TPROXY", "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020")


def tables_of(cfg: Config, family: Family = Family.V4) -> Tables:
    ruleset = build_plan(cfg).ruleset(family)
    assert ruleset is not None
    return Tables.from_ruleset(ruleset)


def local(
    dst: str,
    dport: int,
    uid: int = 1000,
    gid: int = 1000,
    src: str | None = None,
    proto: str = "tcp",
    out: str = "eth0",
) -> Flow:
    address = ipaddress.ip_address(dst)
    source = ipaddress.ip_address(src) if src else (address if address.is_loopback or address == POD else POD)
    origin = "proxy" if uid == 1337 else "local"
    return Flow(origin, proto, source, address, 40000, dport, uid, gid, out_interface=out, local_addresses=POD_IPS)


def remote(dport: int, dst: str = "10.0.0.2", proto: str = "tcp", iif: str = "eth0") -> Flow:
    return Flow(
        "remote",
        proto,
        ipaddress.ip_address("203.0.113.10"),
        ipaddress.ip_address(dst),
        40000,
        dport,
        in_interface=iif,
        local_addresses=POD_IPS,
    )


def path(cfg_tables: Tables, flow: Flow) -> str:
    explanation = explain(cfg_tables, flow)
    counts = {key: len(rules) for key, rules in cfg_tables.chains.items()}
    return chain_path(explanation, counts)


# --- the six traffic types of the walkthrough (REDIRECT) --------------------------------


def test_t1_inbound_is_redirected_to_15006() -> None:
    assert path(tables_of(DEFAULT), remote(8080)) == (
        "Remote host → PREROUTING → ISTIO_INBOUND rule 5 → ISTIO_IN_REDIRECT → 15006"
    )


def test_t2_outbound_is_redirected_to_15001() -> None:
    assert path(tables_of(DEFAULT), local("10.1.2.3", 80)) == (
        "Local process → OUTPUT → ISTIO_OUTPUT rule 9 → ISTIO_REDIRECT → 15001"
    )


def test_t3_metrics_port_passes_through() -> None:
    explanation = explain(tables_of(DEFAULT), remote(15090))
    assert explanation.landing.kind == "local"
    assert [(s.chain, s.number) for s in explanation.exclusions] == [("ISTIO_INBOUND", 2)]


def test_t4_proxy_to_own_pod_ip_goes_through_the_inbound_listener() -> None:
    assert path(tables_of(DEFAULT), local("10.0.0.2", 8080, 1337, 1337)) == (
        "Proxy → OUTPUT → ISTIO_OUTPUT rule 2 → ISTIO_IN_REDIRECT → 15006"
    )


def test_t5_loopback_and_passthrough_are_left_alone() -> None:
    tables = tables_of(DEFAULT)
    assert explain(tables, local("127.0.0.1", 8080)).exclusions[0].number == 3
    passthrough = explain(tables, local("10.0.0.2", 8080, 1337, 1337, src="127.0.0.6"))
    assert passthrough.landing.kind == "local"
    assert passthrough.exclusions[0].text == "-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN"


def test_t6_proxy_to_istiod_is_not_captured() -> None:
    explanation = explain(tables_of(DEFAULT), local("10.96.0.10", 15012, 1337, 1337))
    assert explanation.landing.kind == "network"
    assert path(tables_of(DEFAULT), local("10.96.0.10", 15012, 1337, 1337)) == (
        "Proxy → OUTPUT → ISTIO_OUTPUT rule 4 (RETURN) → 10.96.0.10:15012 via eth0"
    )


# --- TPROXY, DNS, groups, IPv6 -------------------------------------------------------------


def test_tproxy_inbound_and_the_loopback_second_pass() -> None:
    tables = tables_of(TPROXY)
    inbound = explain(tables, remote(8080))
    assert (inbound.landing.kind, inbound.landing.port) == ("tproxy", 15006)
    assert inbound.decision is not None and inbound.decision.chain == "ISTIO_TPROXY"
    assert "packet mark 0x539 (TPROXY)" in inbound.effects
    # T4: mark 1338 in mangle OUTPUT, nat REDIRECT to 127.0.0.1:15006; on lo, ISTIO_TPROXY skips 127.0.0.1.
    own = explain(tables, local("10.0.0.2", 8080, 1337, 1337))
    assert (own.landing.kind, own.landing.port) == ("redirect", 15006)
    assert any(s.loopback_pass and s.chain == "ISTIO_INBOUND" for s in own.steps)
    # App to localhost: nat RETURN, then mangle ISTIO_INBOUND rule 3 on the way back in over lo.
    app = explain(tables, local("127.0.0.1", 8080))
    assert [(s.table, s.number, s.loopback_pass) for s in app.exclusions] == [
        ("nat", 3, False),
        ("mangle", 3, True),
    ]


def test_dns_capture_sets_zone_and_redirects_to_15053() -> None:
    cfg = config("-u", "1337", "-i", "*", ISTIO_META_DNS_CAPTURE="dns")
    explanation = explain(tables_of(cfg), local("127.0.0.53", 53, proto="udp"))
    assert (explanation.landing.kind, explanation.landing.port) == ("redirect", 15053)
    assert "conntrack zone 2" in explanation.effects
    ct_on_lo = [s for s in explanation.steps if s.action == "CT" and s.loopback_pass]
    assert all("no effect" in s.note for s in ct_on_lo)
    # The agent's own query matches the uid rule (zone 1) first; the later zone 2 rule cannot override it.
    agent = explain(tables_of(cfg), local("127.0.0.53", 53, 1337, 1337, proto="udp"))
    assert agent.effects == ("conntrack zone 1",)
    assert any("earlier CT rule" in s.note for s in agent.steps)


def test_owner_group_names_are_resolved() -> None:
    cfg = config("-u", "1337", "-i", "*", owner_groups_include="java")
    tables = tables_of(cfg)
    java = explain(tables, local("10.1.2.3", 80, gid=60001), groups={"java": 60001}.get)
    other = explain(tables, local("10.1.2.3", 80, gid=1000), groups={"java": 60001}.get)
    unknown = explain(tables, local("10.1.2.3", 80, gid=1000))
    assert (java.landing.kind, other.landing.kind, unknown.landing.kind) == (
        "redirect",
        "network",
        "undetermined",
    )
    assert "java" in unknown.landing.reason


def test_ipv6_uses_its_own_loopback() -> None:
    flow = Flow(
        "local",
        "tcp",
        ipaddress.ip_address("fd00::2"),
        ipaddress.ip_address("2001:db8::1"),
        40000,
        80,
        1000,
        1000,
    )
    explanation = explain(tables_of(DEFAULT, Family.V6), flow)
    assert explanation.landing.address == "::1"
    assert explain(None, flow).landing.kind == "network"  # no IPv6 rules at all


def test_established_packets_skip_nat() -> None:
    flow = Flow("remote", "tcp", ipaddress.ip_address("203.0.113.10"), POD, 40000, 8080, ct_state="ESTABLISHED")
    assert explain(tables_of(DEFAULT), flow).landing.kind == "local"
    tproxy = explain(tables_of(TPROXY), flow)
    assert [s.chain for s in tproxy.steps][-1] == "ISTIO_DIVERT"


# --- parse: iptables-save back into the model ---------------------------------------------


def test_parse_reads_back_what_we_render() -> None:
    saved = read_save_model((DATA / "explain-tproxy-dns.save").read_text(), Family.V4)
    assert saved.problems == []
    cfg = config(
        "-u",
        "1337",
        "-g",
        "1337",
        "-m",
        "TPROXY",
        "-b",
        "*",
        "-i",
        "9.9.0.0/16",
        "-x",
        "1.1.0.0/16",
        "-c",
        "not-istio-nic",
        "-o",
        "22",
        "-d",
        "15090,15021",
        ISTIO_META_DNS_CAPTURE="dns",
    )
    ruleset = build_plan(cfg).ruleset(Family.V4)
    assert ruleset is not None
    for table in ruleset.tables():
        for chain, rules in ruleset.chain_order(table).items():
            read = [item.rule for item in saved.chains[(table, chain)]]
            assert [(set(r.matches), r.target) for r in read] == [(set(r.matches), r.target) for r in rules]


@pytest.mark.parametrize(
    "spec, text",
    [
        ("-m addrtype --dst-type LOCAL -j RETURN", "-m addrtype --dst-type LOCAL"),
        ("-p tcp -m tcp --dport 1:2 --tcp-flags SYN SYN -j RETURN", "-m tcp --dport 1:2 --tcp-flags SYN SYN"),
        ("-p tcp -m tcp --syn -j RETURN", "-m tcp --syn"),
        ("-j REJECT --reject-with icmp-port-unreachable", "-j REJECT --reject-with icmp-port-unreachable"),
        ("-g KUBE-SVC", "-g KUBE-SVC"),
        ("-j MARK --or-mark 0x4000", "-j MARK --or-mark 0x4000"),
    ],
)
def test_parse_keeps_what_it_does_not_understand(spec: str, text: str) -> None:
    matches, target = parse_rule_spec(spec.split())
    unsupported = [part.text for part in (*matches, target) if isinstance(part, Unsupported)]
    assert unsupported == [text]


@pytest.mark.parametrize(
    "spec, ports",
    [
        ("-p tcp -m tcp --dport 8000:9000 -j RETURN", (PortRange(8000, 9000),)),
        ("-p tcp -m tcp --dport 0:100 -j RETURN", (PortRange(0, 100),)),
        ("-p tcp -m multiport --dports 80,8000:9000,443 -j RETURN", (80, PortRange(8000, 9000), 443)),
    ],
)
def test_parse_reads_port_ranges_as_iptables_save_prints_them(spec: str, ports: tuple) -> None:
    matches, _ = parse_rule_spec(spec.split())
    assert Ports("dst", ports) in matches


def test_parse_understands_comments_masks_and_sets() -> None:
    matches, target = parse_rule_spec(
        [
            "-m",
            "comment",
            "--comment",
            "kube",
            "-m",
            "mark",
            "--mark",
            "0x1/0xff",
            "-m",
            "set",
            "!",
            "--match-set",
            "kube-ips",
            "dst",
            "-j",
            "MARK",
            "--set-mark",
            "0x2/0xf",
        ]
    )
    assert [type(m).__name__ for m in matches] == ["Mark", "SetMatch"]
    assert matches[1] == SetMatch("kube-ips", "dst", True)
    assert target.mask == 0xF and target.value == 2  # type: ignore[union-attr]


def test_an_unknown_match_is_reported_never_skipped() -> None:
    saved = read_save_model(
        "*nat\n:OUTPUT ACCEPT [0:0]\n:X - [0:0]\n-A OUTPUT -j X\n"
        "-A X -p tcp -m addrtype --dst-type LOCAL -j RETURN\n-A X -p tcp -j REDIRECT --to-ports 1\n"
        "COMMIT\n",
        Family.V4,
    )
    assert len(saved.problems) == 1
    tables = Tables.from_saved(saved, "test")
    explanation = explain(tables, local("10.1.2.3", 80))
    assert explanation.landing.kind == "undetermined"
    assert explanation.decision is not None and explanation.decision.number == 1
    assert "addrtype" in explanation.landing.reason
    # A UDP packet fails -p tcp first, so the unknown match cannot matter.
    assert explain(tables, local("10.1.2.3", 80, proto="udp")).landing.kind == "network"


def test_sets_and_policies() -> None:
    text = "*mangle\n:OUTPUT DROP [0:0]\n-A OUTPUT -m set --match-set allowed dst -j ACCEPT\nCOMMIT\n"
    saved = read_save_model(text, Family.V4)
    allowed = {"allowed": (ipaddress.ip_network("10.1.0.0/16"),)}
    assert explain(Tables.from_saved(saved, "t", allowed), local("10.1.2.3", 80)).landing.kind == "network"
    dropped = explain(Tables.from_saved(saved, "t", allowed), local("10.2.2.3", 80))
    assert dropped.landing.kind == "drop" and dropped.decision is not None and dropped.decision.number is None
    assert explain(Tables.from_saved(saved, "t"), local("10.1.2.3", 80)).landing.kind == "undetermined"


# --- the command -----------------------------------------------------------------------


def test_cli_text_and_json() -> None:
    runner = CliRunner()
    args = ["-u", "1337", "-i", "*", "-b", "*", "--disable-ipv6", "--dst", "10.1.2.3", "--dport", "80"]
    text = runner.invoke(explain_command, args)
    assert text.exit_code == 0, text.output
    assert "Local process → OUTPUT → ISTIO_OUTPUT rule 9 → ISTIO_REDIRECT → 15001" in text.output
    data = json.loads(runner.invoke(explain_command, [*args, "--json"]).output)
    assert data["verdict"]["landing"] == "redirect" and data["verdict"]["port"] == 15001
    assert data["decision"]["chain"] == "ISTIO_REDIRECT"


def test_cli_proxy_origin_uses_the_proxy_uid_and_rejects_bad_input() -> None:
    runner = CliRunner()
    done = runner.invoke(
        explain_command,
        ["-u", "7", "-i", "*", "--origin", "proxy", "--dst", "10.1.2.3", "--dport", "80", "--json"],
    )
    assert json.loads(done.output)["flow"]["uid"] == 7
    assert runner.invoke(explain_command, ["--dst", "nope", "--dport", "80"]).exit_code == 2
    assert runner.invoke(explain_command, ["-p", "0", "--dst", "10.1.2.3", "--dport", "80"]).exit_code == 2


def test_render_text_names_every_step() -> None:
    explanation = explain(tables_of(DEFAULT), local("10.1.2.3", 80))
    text = render_text(explanation, tables_of(DEFAULT))
    assert "nat ISTIO_OUTPUT #9" in text and "Verdict: redirected to port 15001" in text
    assert to_data(explanation)["steps"][0]["chain"] == "OUTPUT"


def test_inbound_ports_list_only_captures_listed_ports() -> None:
    cfg = config("-u", "1337", "-b", "4000")
    assert cfg.inbound_ports == PortSelection(ports=(4000,))
    tables = tables_of(cfg)
    assert explain(tables, remote(4000)).landing.port == 15006
    assert explain(tables, remote(4001)).landing.kind == "local"


@pytest.mark.parametrize("use_sets", ["never", "always"])
def test_port_ranges_from_the_configuration(use_sets: str) -> None:
    cfg = config("-u", "1337", "-i", "*", "-b", "8000:9000,80", "-o", "400:500", use_sets=use_sets)
    tables = tables_of(cfg)
    assert explain(tables, remote(8000)).landing.port == 15006
    assert explain(tables, remote(9000)).landing.port == 15006
    assert explain(tables, remote(9001)).landing.kind == "local"
    assert explain(tables, local("10.1.2.3", 400)).landing.kind == "network"
    assert explain(tables, local("10.1.2.3", 501)).landing.port == 15001
