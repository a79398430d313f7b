"""The iptables policy (capture.py) and the nftables policy (nft/capture.py) send every flow to the same place.

They are two programs, as Istio's two ``run.go`` files are, with different rule orders; what must not
differ is where traffic lands. ``explain`` evaluates both models (explain.py on the iptables rules,
explain_nft.py on the nft rules) for the flows of the kernel proof (tests/beds/explain_proof.py) over the
conformance configurations and the proof's extra ones. No kernel, no root.
"""

from __future__ import annotations

from ipaddress import ip_address
from types import SimpleNamespace

import pytest

from istio_iptables.config.sidecar import Config
from istio_iptables.explain.from_nft import read_model, to_tables
from istio_iptables.explain.walk import Explanation, Tables, explain
from istio_iptables.net import Family
from istio_iptables.policy.sidecar_nft import build_nft_ruleset
from istio_iptables.policy.sidecar_xtables import build_plan
from istio_iptables.xtables.model import port_bounds
from tests.beds.explain_proof import APP, EXTRA_CASES, Probe, case_config, flow_of, group_id, probes
from tests.beds.flowsender import LINKS, pod_address
from tests.support.conformance import Case, load_cases

CASES = load_cases() + EXTRA_CASES
# The addresses of the proof's pod namespace, without building it.
POD = SimpleNamespace(pod_addresses=[pod_address(link, v) for _, _, link in LINKS for v in (4, 6)] + ["::6"])


def generated_probes(config: Config, version: int) -> list[Probe]:
    """Flows aimed at the configuration's own knobs: its ports, the first hosts of its CIDR lists."""
    ports = {53, 80, 5000, config.proxy_port, config.inbound_capture_port, config.inbound_tunnel_port}
    ports |= {*config.inbound_ports.ports, *config.inbound_exclude_ports}
    ports |= {*config.outbound_ports_include, *config.outbound_ports_exclude}
    # A range of ports (8000:9000) is probed at both ends.
    ports = {end for entry in ports for end in port_bounds(entry)}
    networks = [*config.outbound_exclude, *config.outbound_include.cidrs]
    hosts = {str(next(iter(network.hosts()), network.network_address)) for network in networks}
    pod, outside = ("10.10.0.2", "203.0.113.7") if version == 4 else ("fd00:10::2", "2001:db8:77::7")
    destinations = sorted(host for host in {*hosts, outside} if ip_address(host).version == version)
    proxy = (int(config.proxy_uids[0]), int(config.proxy_gids[0]))
    found = [
        Probe("local", "tcp", dst, port, uid, gid)
        for uid, gid in [(APP, APP), proxy]
        for dst in destinations
        for port in sorted(ports)
    ]
    found += [Probe("local", "udp", dst, 53, uid, gid) for uid, gid in [(APP, APP), proxy] for dst in destinations]
    found += [Probe("remote", "tcp", pod, port) for port in sorted(ports)]
    return found


def landing(explanation: Explanation) -> tuple[object, ...]:
    found = explanation.landing
    return (found.kind, found.address, found.port, found.original_destination, found.interface)


def disagreements(case: Case, config: Config) -> tuple[int, list[str]]:
    plan = build_plan(config)
    nft_ruleset = build_nft_ruleset(config)
    compared, differ = 0, []
    for family in (Family.V4, Family.V6) if config.enable_ipv6 else (Family.V4,):
        ruleset = plan.ruleset(family)
        iptables_tables = Tables.from_ruleset(ruleset) if ruleset else None
        nft_tables = to_tables(read_model(nft_ruleset), family, "configuration")[0]
        for probe in [*probes(config, family.value), *generated_probes(config, family.value)]:
            flow = flow_of(probe, POD)  # type: ignore[arg-type]
            by_iptables = explain(iptables_tables, flow, group_id)
            by_nft = explain(nft_tables, flow, group_id)
            compared += 1
            if landing(by_iptables) != landing(by_nft) or by_iptables.problems or by_nft.problems:
                differ.append(
                    f"{case.name} {probe}: iptables {landing(by_iptables)} {by_iptables.problems}, "
                    f"nft {landing(by_nft)} {by_nft.problems}"
                )
    return compared, differ


def test_both_policies_land_every_flow_alike() -> None:
    total, differ = 0, []
    for case in CASES:
        compared, found = disagreements(case, case_config(case))
        total += compared
        differ += found
    assert not differ, "\n".join(differ[:40])
    assert total >= 3500  # every configuration and family was walked (3,542 flows over 31 configurations)


@pytest.mark.parametrize("landing_kind", ["redirect", "tproxy", "local", "network"])
def test_the_flows_reach_every_kind_of_landing(landing_kind: str) -> None:
    """A parity check whose flows all went one way would prove little."""
    for case in CASES:
        config = case_config(case)
        plan = build_plan(config)
        for family in (Family.V4, Family.V6) if config.enable_ipv6 else (Family.V4,):
            ruleset = plan.ruleset(family)
            tables = Tables.from_ruleset(ruleset) if ruleset else None
            for probe in probes(config, family.value):
                if explain(tables, flow_of(probe, POD), group_id).landing.kind == landing_kind:  # type: ignore[arg-type]
                    return
    pytest.fail(f"no flow lands as {landing_kind}")
