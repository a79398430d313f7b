"""The test bed's pure parts, without root: DNS encoding, argv building, landing checks."""

from __future__ import annotations

from tests.beds import testbed_node
from tests.beds.testbed import Hop, Landing, injector_args
from tests.beds.traffic_paths import Expect

HOP = Hop(node="proxy", port=15001, original_dst="10.88.1.1:80", peer="10.88.0.2:40000",
          local="127.0.0.1:15001", how="SO_ORIGINAL_DST")


def test_dns_answer_carries_the_path_back() -> None:
    hops = [{"node": "proxy", "port": 15053, "peer": "x" * 300}]  # longer than one TXT string
    query = testbed_node.dns_query("probe.test", 7)
    answer = testbed_node.dns_answer(query, hops)
    assert answer[:2] == query[:2]
    assert testbed_node.json.loads(testbed_node.dns_text(answer)) == hops


def test_injector_args_replace_and_add_flags() -> None:
    args = injector_args("TPROXY", {"-x": "10.0.0.0/8", "--redirect-dns": None})
    assert args[args.index("-m") + 1] == "TPROXY"
    assert args[args.index("-x") + 1] == "10.0.0.0/8"
    assert args[-2:] == ["--redirect-dns", "--dual-stack"]
    assert "--dual-stack" not in injector_args(dual_stack=False)


def test_expect_reports_each_mismatch() -> None:
    landing = Landing(hops=(HOP,), reply_from="10.88.1.1:80")
    assert Expect(("proxy:15001",), ("10.88.1.1:80",), peer_host="10.88.0.2").mismatches(landing) == []
    assert Expect(("proxy:15006",)).mismatches(landing)[0].startswith("path proxy:15001 (want proxy:15006)")
    problems = Expect(("proxy:15001",), ("10.9.9.9:80",), reply_from="10.9.9.9:80").mismatches(landing)
    assert len(problems) == 2
    assert Expect(("proxy:15001",)).mismatches(Landing(error="TimeoutError")) != []
